"""`ar2dlm eval`: scores, the HumanEval program, rule checks, resume, frontier output, the CLI.

Oracles: pass@k against brute-force enumeration of every k-subset; HumanEval's canonical solutions
(they must pass in the sandbox, in both forms; a broken one must fail); greedy answers against the AR
loop's answers on the same model (float64, so no near-tie flips); a resumed run against one whole run.
"""

from __future__ import annotations

import itertools
import json
from math import comb

import pytest

from ar2dlm.cli import main
from ar2dlm.core.errors import ConfigError
from ar2dlm.evaluate import run, tasks
from ar2dlm.evaluate.config import EvalConfig
from ar2dlm.evaluate.sandbox import SandboxLimits

LIMITS = SandboxLimits(timeout=10.0, memory_mb=512)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} w3{% endif %}"


# ---------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in range(1, 8) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_equals_brute_force(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
    assert run.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    assert len(subsets) == comb(n, k)


def test_mean_ci_is_normal_approximation():
    m, ci = run.mean_ci([1, 0, 1, 1])
    assert m == 0.75 and ci == pytest.approx(1.96 * 0.5 / 2)


def test_tau_is_mean_committed_per_step():
    assert run.tau([{"1": 2, "3": 1}, {"4": 1}]) == pytest.approx((1 + 1 + 3 + 4) / 4)


# ---------------------------------------------------------------------------- humaneval
@pytest.fixture(scope="module")
def humaneval():
    return {p.id: p for p in tasks.load_problems("humaneval", "raw")}


def test_humaneval_has_164_problems_and_instruct_prompts(humaneval):
    assert len(humaneval) == 164
    inst = tasks.load_problems("humaneval", "instruct")
    assert all(p.chat and p.data["prompt"] in p.prompt and "```python" in p.prompt for p in inst)


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/2", "HumanEval/32", "HumanEval/163"])
def test_canonical_solutions_pass_in_both_forms(humaneval, task_id):
    p = humaneval[task_id]
    cfg = EvalConfig(form="raw")
    assert run.score_answer(p, p.data["canonical_solution"], cfg, LIMITS)["passed"]
    # instruct: the model repeats the whole function in a code block, with chatter around it
    answer = f"Sure! Here it is:\n\n```python\n{p.data['prompt']}{p.data['canonical_solution']}```\nDone."
    assert run.score_answer(p, answer, EvalConfig(form="instruct"), LIMITS)["passed"]


def test_wrong_or_truncated_answers_fail(humaneval):
    p = humaneval["HumanEval/0"]
    assert not run.score_answer(p, "    return False\n", EvalConfig(form="raw"), LIMITS)["passed"]
    cut = f"```python\n{p.data['prompt']}{p.data['canonical_solution']}"[:-40]  # unclosed block, cut mid-body
    assert not run.score_answer(p, cut, EvalConfig(form="instruct"), LIMITS)["passed"]


def test_extract_code():
    assert tasks.extract_code("text\n```python\nx = 1\n```\nmore ```python\ny\n```") == "x = 1\n"
    assert tasks.extract_code("```\nx = 2\n```") == "x = 2\n"
    assert tasks.extract_code("```python\nx = 3\n") == "x = 3\n"  # unclosed: to the end
    assert tasks.extract_code("def f(): pass") == "def f(): pass"


# ---------------------------------------------------------------------------- ifeval rules
@pytest.mark.parametrize("check,good,bad", [
    ({"kind": "lowercase"}, "all small here.", "Not all small."),
    ({"kind": "uppercase"}, "ALL BIG!", "Not All Big"),
    ({"kind": "max_words", "n": 4}, "one two three", "one two three four"),
    ({"kind": "min_words", "n": 3}, "one two three", "one two"),
    ({"kind": "bullets", "n": 2}, "Intro\n* a\n* b", "* a\n* b\n* c"),
    ({"kind": "forbidden", "words": ["cat"]}, "a dog and a catalogue", "the Cat sat"),
    ({"kind": "keywords", "words": ["sun", "moon"]}, "Sun and MOON", "sun only"),
    ({"kind": "keyword_count", "word": "smooth", "n": 2}, "smooth, very smooth", "smooth once"),
    ({"kind": "json"}, "```json\n{\"a\": 1}\n```", "{a: 1}"),
    ({"kind": "ends_with", "text": "Bye."}, "Hello. Bye.\n", "Bye. Hello."),
    ({"kind": "title"}, "<<A Title>>\ntext", "<A Title>"),
    ({"kind": "no_commas"}, "no commas here", "one, two"),
    ({"kind": "paragraphs", "n": 2}, "first\n***\nsecond", "only one"),
    ({"kind": "quoted"}, '"quoted all"', 'not "quoted"'),
    ({"kind": "min_sentences", "n": 2}, "One. Two!", "Only one."),
])
def test_ifeval_rules(check, good, bad):
    p = tasks.Problem("x", "prompt", True, {"checks": [check]})
    assert tasks.ifeval_checks(p, good) == [True]
    assert tasks.ifeval_checks(p, bad) == [False]


def test_ifeval_set_uses_only_known_rules():
    problems = tasks.load_problems("ifeval", "instruct")
    assert len(problems) >= 30 and len({p.id for p in problems}) == len(problems)
    assert all(c["kind"] in tasks.CHECKS for p in problems for c in p.data["checks"])


# ---------------------------------------------------------------------------- runs on a tiny model
def records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_greedy_answers_equal_ar_and_summary_matches_records(drafter, tmp_path):
    cfg = EvalConfig(form="raw", limit=3, max_new_tokens=12, batch_size=2)
    summary = run.evaluate(drafter, cfg, tmp_path, "tiny", progress=False)
    rs = records(tmp_path)
    assert len(rs) == 6 and {(r["setting"], r["problem"]) for r in rs} == \
        {(s, f"HumanEval/{i}") for s in ("ar", "greedy") for i in range(3)}
    ar = {r["problem"]: r["answer"] for r in rs if r["setting"] == "ar"}
    assert {r["problem"]: r["answer"] for r in rs if r["setting"] == "greedy"} == ar
    s = summary["settings"]
    assert s["ar"]["tpf"] == 1.0 and s["ar"]["tau"] == 1.0 and s["ar"]["speedup"] == 1.0
    g = [r for r in rs if r["setting"] == "greedy"]
    assert s["greedy"]["tpf"] == pytest.approx(sum(r["new_tokens"] for r in g) / sum(r["forwards"] for r in g))
    assert s["greedy"]["scores"]["pass@1"]["score"] == sum(r["passed"] for r in g) / 3
    assert json.loads((tmp_path / "summary.json").read_text())["form"] == "raw"


def test_resume_equals_one_whole_run(drafter, tmp_path):
    cfg = EvalConfig(form="raw", settings=("greedy", "lossless"), n_samples=2, k=(1, 2), max_new_tokens=8,
                       batch_size=2)
    whole, part = tmp_path / "whole", tmp_path / "part"
    run.evaluate(drafter, dataclasses_replace(cfg, limit=4), whole, "tiny", progress=False)
    run.evaluate(drafter, dataclasses_replace(cfg, limit=2), part, "tiny", progress=False)
    first = (part / "results.jsonl").read_text()
    with open(part / "results.jsonl", "a") as f:
        f.write('{"setting": "greedy", "probl')  # a line cut by an interruption
    run.evaluate(drafter, dataclasses_replace(cfg, limit=4), part, "tiny", progress=False)
    key = lambda r: (r["setting"], r["problem"], r["sample"])
    a, b = records(whole), records(part)  # the cut line is gone, every other line parses
    assert sorted(map(key, a)) == sorted(map(key, b))  # nothing redone, nothing missing
    assert {key(r): r["answer"] for r in a} == {key(r): r["answer"] for r in b}  # same seeds per chunk
    assert (part / "results.jsonl").read_text().startswith(first)


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_resume_refuses_other_settings(drafter, tmp_path):
    run.evaluate(drafter, EvalConfig(form="raw", limit=1, max_new_tokens=4), tmp_path, "tiny", progress=False)
    with pytest.raises(ConfigError, match="max_new_tokens: 4 -> 5.*--force"):
        run.evaluate(drafter, EvalConfig(form="raw", limit=1, max_new_tokens=5), tmp_path, "tiny", progress=False)


def test_frontier_writes_table_png_json(drafter, tmp_path):
    cfg = EvalConfig(form="raw", limit=2, max_new_tokens=8, frontier=True, mix_weights=(0.5, 1.0))
    summary = run.evaluate(drafter, cfg, tmp_path, "tiny", progress=False)
    names = ["ar", "ar-sample", "greedy", "lossless", "mix:0.5", "mix:1"]
    assert list(summary["settings"]) == names
    assert all(s["speedup"] > 0 for s in summary["settings"].values())
    sampled = {n for n, s in summary["settings"].items() if "speedup_vs_ar_sample" in s}
    assert sampled == {"ar-sample", "lossless", "mix:0.5", "mix:1"}
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    assert all(name in run.table(summary["settings"]) for name in names)


def test_ifeval_through_a_chat_template(drafter, tmp_path):
    drafter.tokenizer.chat_template = CHAT_TEMPLATE
    try:
        summary = run.evaluate(drafter, EvalConfig(task="ifeval", limit=3, max_new_tokens=6), tmp_path, "tiny",
                             progress=False)
    finally:
        drafter.tokenizer.chat_template = None
    rs = records(tmp_path)
    for r in rs:
        p = next(p for p in tasks.load_problems("ifeval", "instruct") if p.id == r["problem"])
        assert r["checks"] == tasks.ifeval_checks(p, r["answer"]) and r["passed"] == all(r["checks"])
    assert "instruction_level" in summary["settings"]["greedy"]["scores"]


# ---------------------------------------------------------------------------- config and CLI
@pytest.mark.parametrize("kw,field", [
    ({"settings": ("fast",)}, "settings"),
    ({"settings": ("mix:x",)}, "settings"),
    ({"k": (2,)}, "k"),
    ({"task": "ifeval", "form": "raw"}, "form"),
    ({"limit": 0}, "limit"),
    ({"timeout": 0}, "timeout"),
    ({"memory_mb": 8}, "memory_mb"),
])
def test_config_refusals(kw, field):
    with pytest.raises(ConfigError) as e:
        EvalConfig(**kw)
    assert e.value.field == field and str(e.value)


def test_cli_eval(capsys, drafter_dir, tmp_path):
    out = tmp_path / "ev"
    rc = main(["eval", str(drafter_dir), "--form", "raw", "--limit", "2", "--max-new-tokens", "6", "--out", str(out),
               "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0 and "raw form" in stdout
    assert json.loads(stdout.strip().splitlines()[-1])["settings"]["greedy"]["problems"] == 2
    rc = main(["eval", str(drafter_dir), "--task", "ifeval", "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and "needs a chat template" in capsys.readouterr().err
    rc = main(["eval", str(drafter_dir), "--k", "3", "--out", str(tmp_path / "y")])
    assert rc == 2 and "--n-samples" in capsys.readouterr().err


@pytest.fixture(scope="module")
def drafter_dir(drafter, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval") / "drafter"
    drafter.model.save_pretrained(d)
    drafter.tokenizer.save_pretrained(d)
    drafter.settings.save(d)
    return d


def test_cli_eval_of_an_unconverted_base_with_ar_settings(capsys, base_dirs, tmp_path):
    # the base of an ungated conversion is evaluated with the AR settings alone
    rc = main(["eval", str(base_dirs["llama"]), "--form", "raw", "--settings", "ar", "--limit", "1",
               "--max-new-tokens", "4", "--out", str(tmp_path / "base"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rc = main(["eval", str(base_dirs["llama"]), "--form", "raw", "--limit", "1", "--out", str(tmp_path / "b2")])
    assert rc == 2 and "convert it first" in capsys.readouterr().err
    rc = main(["eval", str(base_dirs["llama"]), "--lm-eval"])
    assert rc == 2 and "right after" in capsys.readouterr().err
