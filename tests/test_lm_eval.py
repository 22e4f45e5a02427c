"""The `ar2dlm` lm-eval model against lm-eval's own `hf` model, through lm-eval's command line, offline.

Oracle: lm-eval's `hf` model on the base checkpoint. On a local task (task YAML over local JSONL)
the `ar2dlm` model on its conversion must give the same loglikelihoods (1e-5), the same rolling
loglikelihoods, and exactly the same greedy generations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

CONTEXTS = ["w5 w7 w9", "w11 w13", "w2 w3 w4 w5", "w40 w41 w42", "w60", "w8 w8 w8"]


def write_tasks(root):
    data = root / "data.jsonl"
    with open(data, "w") as f:
        for i, c in enumerate(CONTEXTS):
            f.write(json.dumps({"context": c, "choices": [f" w{10 + i}", f" w{20 + i} w{30 + i}", " w50"],
                                "label": i % 3, "target": "w12", "text": f"{c} w{70 + i} w{71 + i}"}) + "\n")
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (root / "mc.yaml").write_text(
        "task: local_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")
    (root / "gen.yaml").write_text(
        "task: local_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: '{{target}}'\ngeneration_kwargs:\n  until: ['w9 w9']\n  max_gen_toks: 16\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    (root / "roll.yaml").write_text(
        "task: local_roll\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    return root


def run(model, model_args, tasks_dir, out, tasks="local_mc,local_gen,local_roll", extra=()):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "XDG_CACHE_HOME": str(out.parent / "cache")}
    include = ["--include_path", str(tasks_dir)] if tasks_dir else []  # none: the wrapper adds ar2dlm's own
    cmd = [sys.executable, "-m", "ar2dlm", "eval", "--lm-eval", "--model", model, "--model_args", model_args,
           "--tasks", tasks, *include, "--output_path", str(out), "--log_samples", "--batch_size", "2", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.split("_", 1)[1].rsplit("_", 1)[0]
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return samples


@pytest.fixture(scope="module")
def both(base_dirs, converted_dirs, tmp_path_factory):
    from ar2dlm.evaluate import local_tasks

    root = write_tasks(tmp_path_factory.mktemp("lm_eval"))
    local_tasks.write(root)  # ar2dlm's shipped tasks too (each task limited to 6 documents)
    tasks = "local_mc,local_gen,local_roll," + ",".join(local_tasks.TASKS)
    hf = run("hf", f"pretrained={base_dirs['llama']},dtype=float64", root, root / "hf", tasks, ("--limit", "6"))
    ours = run("ar2dlm", f"pretrained={converted_dirs['llama']},dtype=float64", root, root / "ours", tasks,
               ("--limit", "6"))
    return hf, ours, root


def test_loglikelihoods_equal_hf(both):
    hf, ours, _ = both
    for task in ("local_mc", "local_roll"):
        assert len(hf[task]) == len(ours[task]) > 0
        for a, b in zip(hf[task], ours[task]):
            la = [r[0][0] if isinstance(r[0], list) else r[0] for r in a["resps"]]
            lb = [r[0][0] if isinstance(r[0], list) else r[0] for r in b["resps"]]
            assert [float(x) for x in lb] == pytest.approx([float(x) for x in la], abs=1e-5), task


def test_greedy_generations_equal_hf(both):
    hf, ours, root = both
    a = [s["resps"] for s in hf["local_gen"]]
    b = [s["resps"] for s in ours["local_gen"]]
    assert len(a) == len(CONTEXTS) and a == b
    assert sum(bool(r[0][0].strip()) for r in a) >= len(CONTEXTS) // 2  # not vacuous: real generations
    stats = json.loads(next((root / "ours").rglob("ar2dlm_stats.json")).read_text())
    assert stats["local_gen"]["requests"] == len(CONTEXTS) and stats["local_gen"]["tpf"] >= 1.0


def test_shipped_local_tasks_equal_hf(both):
    """ar2dlm_heldout (perplexity) and ar2dlm_arith_mc (multiple choice), offline: log-likelihoods equal
    lm-eval's hf model on the base."""
    from ar2dlm.evaluate import local_tasks

    hf, ours, _ = both
    for task in local_tasks.TASKS:
        assert len(hf[task]) == len(ours[task]) == 6, task
        for a, b in zip(hf[task], ours[task]):
            la = [float(r[0][0] if isinstance(r[0], list) else r[0]) for r in a["resps"]]
            lb = [float(r[0][0] if isinstance(r[0], list) else r[0]) for r in b["resps"]]
            assert lb == pytest.approx(la, abs=1e-5), task
    assert all(len(s["resps"]) == 4 for s in ours["ar2dlm_arith_mc"])  # four choices each


def test_wrapper_adds_the_local_tasks_unless_given_an_include_path(tmp_path, monkeypatch):
    from ar2dlm.evaluate.lm_eval_model import cli_argv

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    argv = cli_argv(["--model", "ar2dlm", "--model_args", "pretrained=x", "--tasks", "ar2dlm_heldout",
                     "--output_path", str(tmp_path / "out")])
    folder = Path(argv[argv.index("--include_path") + 1])
    assert (folder / "ar2dlm_heldout.yaml").exists() and (folder / "arith.jsonl").exists()
    assert argv[argv.index("--model_args") + 1] == f"pretrained=x,stats_path={tmp_path / 'out' / 'ar2dlm_stats.json'}"
    mine = ["--tasks", "t", "--include_path", "mine"]
    assert cli_argv(mine) == mine


def test_arith_mc_docs_have_one_right_answer():
    from ar2dlm.evaluate import local_tasks

    docs = local_tasks.arith_docs()
    assert len(docs) == local_tasks.ARITH_N and docs == local_tasks.arith_docs()  # deterministic
    for d in docs:
        a, op, b = d["question"].split("What is ")[1].split("?")[0].split()
        right = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert [int(c) for c in d["choices"]].count(right) == 1 and int(d["choices"][d["label"]]) == right
        assert len(set(d["choices"])) == 4
