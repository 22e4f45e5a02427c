"""lm-eval tasks that ar2dlm ships, over local data (nothing is fetched): the quality of a conversion.

- `ar2dlm_heldout`: perplexity (`loglikelihood_rolling`) of held-out human text: the bench split of
  ar2dlm's own prompt sets (chat questions, HumanEval stubs, Shakespeare passages, stdlib source),
  split by name (`prompts.split_key`), so no conversion trained on the train split has seen it.
- `ar2dlm_arith_mc`: 200 multiple-choice arithmetic questions (one right answer, three near misses),
  scored by log-likelihood (acc, acc_norm); written from a fixed seed.

`ar2dlm eval --lm-eval` writes them (data and YAML with absolute paths) into a folder and passes it
as `--include_path` unless the command line names its own, so `--tasks ar2dlm_heldout,ar2dlm_arith_mc`
just works. Comparing a conversion with its base (the README's "Quality of a conversion"):

    ar2dlm eval --lm-eval --model ar2dlm --model_args pretrained=BASE_OR_RUN/final \\
        --tasks ar2dlm_heldout,ar2dlm_arith_mc --output_path runs/quality-NAME
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..train.prompts import SOURCES, load_prompts

TASKS = ("ar2dlm_heldout", "ar2dlm_arith_mc")
ARITH_N = 200


def heldout_docs() -> list[dict]:
    return [{"id": r["id"], "source": r["source"], "text": r["prompt"]}
            for s in SOURCES for r in load_prompts(s, "bench")]


def arith_docs(n: int = ARITH_N, seed: int = 0) -> list[dict]:
    """'Question: What is a + b?' with the right sum among four choices (distinct near misses)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        op = rng.choice("+-")
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        if op == "-" and b > a:
            a, b = b, a
        right = a + b if op == "+" else a - b
        wrong = set()
        while len(wrong) < 3:
            w = right + rng.choice([-10, -2, -1, 1, 2, 10])
            if w >= 0 and w != right:
                wrong.add(w)
        choices = [right, *sorted(wrong)]
        rng.shuffle(choices)
        docs.append({"id": f"arith/{i}", "question": f"Question: What is {a} {op} {b}?\nAnswer:",
                     "choices": [f" {c}" for c in choices], "label": choices.index(right)})
    return docs


def _yaml(task: str, data: Path, body: str) -> str:
    return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\n{body}")


def write(folder: Path) -> Path:
    """Write both tasks' data and YAML into `folder` (rewritten every time: the data is deterministic)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs in (("heldout.jsonl", heldout_docs()), ("arith.jsonl", arith_docs())):
        (folder / name).write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    (folder / "ar2dlm_heldout.yaml").write_text(_yaml(
        "ar2dlm_heldout", folder / "heldout.jsonl",
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"))
    (folder / "ar2dlm_arith_mc.yaml").write_text(_yaml(
        "ar2dlm_arith_mc", folder / "arith.jsonl",
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"))
    return folder


def default_folder() -> Path:
    import os

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ar2dlm" / "lm_eval_tasks"
