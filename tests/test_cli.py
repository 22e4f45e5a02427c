"""`ar2dlm convert` / `ar2dlm generate` through `ar2dlm.cli.main` (and once through real subprocesses).

Oracles: greedy TiDAR output must equal plain AR output on the same checkpoint and Hugging Face
`generate(do_sample=False)` of the base model; batched output must equal each prompt run alone; a stop
string must cut the unstopped text at its first occurrence.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, refusal, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from ar2dlm import DiffusionConfig
from ar2dlm.cli import main

PROMPT = "w5 w7 w9"
STATS_LINE = re.compile(r"^\[(?P<mode>[^\]]+)\] (?P<tokens>\d+) tokens, (?P<forwards>\d+) forwards, "
                        r"TPF (?P<tpf>[\d.]+), .*accepted \{(?P<hist>[^}]*)\}$", re.M)


# ---------------------------------------------------------------------------- helpers
def cli(capsys, *argv):
    """(exit code, stdout, stderr) of `ar2dlm ARGV`."""
    rc, out, err, _ = run_cli(argv, capsys)
    return rc, out, err


def gen_json(capsys, model, *argv) -> list[dict]:
    rc, out, err = cli(capsys, "generate", model, "--json", *argv)
    assert rc == 0, err
    return [json.loads(line) for line in out.splitlines()]


def gen_one(capsys, model, prompt, *argv) -> dict:
    (line,) = gen_json(capsys, model, "--prompt", prompt, *argv)
    return line


def hf_greedy(model_dir, prompt: str | list[int], max_new_tokens: int) -> list[int]:
    """New tokens of plain transformers greedy decoding."""
    if isinstance(prompt, str):
        prompt = AutoTokenizer.from_pretrained(model_dir)(prompt)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def error_of(capsys, *argv) -> str:
    """Run a command that must fail with exit code 2 and no output; return its error line (a Refusal: its `.field`
    is the setting the error is about)."""
    rc, out, err, seen = run_cli(argv, capsys)
    assert rc == 2, (rc, out, err)
    assert out == ""
    return refusal(err, argv[0], seen)


@pytest.fixture(scope="module")
def conv(converted_dirs):
    return converted_dirs["llama"]


@pytest.fixture(scope="module")
def drafter_dir(drafter, tmp_path_factory):
    """The trained drafter (conftest) saved as a converted checkpoint: its drafts are mostly accepted."""
    d = tmp_path_factory.mktemp("cli") / "drafter"
    drafter.model.save_pretrained(d)
    drafter.tokenizer.save_pretrained(d)
    drafter.settings.save(d)
    return d


@pytest.fixture(scope="module")
def drafter_prompt(drafter):
    return " ".join(f"w{t}" for t in drafter.pattern[:3])


# ---------------------------------------------------------------------------- convert + generate
def test_convert_then_generate(capsys, base_dirs, tmp_path):
    out_dir = tmp_path / "tidar"
    rc, out, err = cli(capsys, "convert", base_dirs["llama"], out_dir, "--block-size", "4")
    assert rc == 0, err
    assert out.strip() == str(out_dir)
    assert f"mask token '<|mask|>' = id {VOCAB}" in err
    assert DiffusionConfig.load(out_dir).block_size == 4
    assert AutoTokenizer.from_pretrained(out_dir)(PROMPT)["input_ids"] == [5, 7, 9]

    rc, streamed, err = cli(capsys, "generate", out_dir, "--prompt", PROMPT, "--max-new-tokens", "8")
    assert rc == 0, err
    j = gen_one(capsys, out_dir, PROMPT, "--max-new-tokens", "8")
    assert streamed == j["text"] and streamed.strip()
    (m,) = STATS_LINE.finditer(err)
    assert m["mode"] == "greedy K=4 |R|=3"
    tokens, forwards = int(m["tokens"]), int(m["forwards"])
    assert tokens == len(j["token_ids"]) == j["stats"]["new_tokens"]
    assert forwards == j["stats"]["forwards"]
    assert float(m["tpf"]) == pytest.approx(tokens / forwards, abs=0.006)
    hist = dict(map(int, kv.split(":")) for kv in m["hist"].split())
    assert sum(r * c for r, c in hist.items()) + 1 == tokens  # prefill gives 1 token, each step r

    ar = gen_one(capsys, out_dir, PROMPT, "--max-new-tokens", "8", "--ar")
    assert j["token_ids"] == ar["token_ids"] == hf_greedy(base_dirs["llama"], PROMPT, 8)
    assert j["text"] == ar["text"]


@pytest.mark.parametrize("which", ["random", "drafter"])
def test_greedy_tidar_equals_ar_and_hf(capsys, which, conv, base_dirs, drafter_dir, drafter_prompt):
    model, base, prompt, n = ((conv, base_dirs["llama"], PROMPT, 16) if which == "random"
                              else (drafter_dir, drafter_dir, drafter_prompt, 20))
    expected = hf_greedy(base, prompt, n)
    ar = gen_one(capsys, model, prompt, "--max-new-tokens", n, "--ar")
    assert ar["token_ids"] == expected
    assert ar["stats"]["forwards"] == len(expected)  # AR: one token per forward
    for extra in ([], ["--draft-len", "1", "--proposals", "1"], ["--draft-len", "3", "--proposals", "2"],
                  ["--draft-len", "8", "--proposals", "8"]):
        j = gen_one(capsys, model, prompt, "--max-new-tokens", n, *extra)
        assert j["token_ids"] == expected, extra
        assert j["text"] == ar["text"]
        if which == "drafter" and extra != ["--draft-len", "1", "--proposals", "1"]:
            assert j["stats"]["forwards"] < len(expected), extra  # drafts were accepted


def test_draft_len_alone_clips_default_proposals(capsys, conv):
    ar = gen_one(capsys, conv, PROMPT, "--max-new-tokens", "8", "--ar")
    j = gen_one(capsys, conv, PROMPT, "--max-new-tokens", "8", "--draft-len", "2")
    assert j["token_ids"] == ar["token_ids"]


def test_unconverted_base(capsys, base_dirs):
    base = base_dirs["llama"]
    msg = error_of(capsys, "generate", base, "--prompt", PROMPT, "--max-new-tokens", "8")
    assert "unconverted" in msg and "ar2dlm convert" in msg and "--ar" in msg
    j = gen_one(capsys, base, PROMPT, "--max-new-tokens", "8", "--ar")
    assert j["token_ids"] == hf_greedy(base, PROMPT, 8)
    rc, streamed, err = cli(capsys, "generate", base, "--prompt", PROMPT, "--max-new-tokens", "8", "--ar")
    assert rc == 0 and streamed == j["text"]
    (m,) = STATS_LINE.finditer(err)
    assert m["mode"] == "ar" and float(m["tpf"]) == 1.0


def test_reuse_token_convert_and_generate(capsys, base_dirs, tmp_path):
    from conftest import RESERVED, save_reserved_base

    base, out_dir = save_reserved_base(tmp_path / "base"), tmp_path / "reuse"
    rc, _, err = cli(capsys, "convert", base, out_dir, "--block-size", "4", "--mask-token", RESERVED, "--reuse-token")
    assert rc == 0, err
    assert DiffusionConfig.load(out_dir).mask_token_id == VOCAB
    j = gen_one(capsys, out_dir, PROMPT, "--max-new-tokens", "8")
    assert j["token_ids"] == hf_greedy(base, PROMPT, 8)


# ---------------------------------------------------------------------------- batches
def _write_prompts(path: Path, prompts) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return path


@pytest.mark.parametrize("which", ["random", "drafter"])
def test_prompts_file_batched_equals_each_alone(capsys, which, conv, drafter_dir, drafter, tmp_path):
    if which == "random":
        model = conv
        prompts = ["w5 w7 w9", {"prompt": [11, 12, 13, 14, 15, 16]}, {"prompt": "w40"}]
    else:  # different phases of the learnt cycle, and a prompt off the cycle: rows accept different r
        model, pat = drafter_dir, drafter.pattern
        prompts = [" ".join(f"w{t}" for t in pat[:3]), {"prompt": pat[2:7]}, {"prompt": "w3 w4"}]
    file = _write_prompts(tmp_path / "prompts.jsonl", prompts)
    batched = gen_json(capsys, model, "--prompts", file, "--batch-size", "2", "--max-new-tokens", "12")
    assert [j["index"] for j in batched] == [0, 1, 2]
    for p, j in zip(prompts, batched):
        alone_file = _write_prompts(tmp_path / "one.jsonl", [p])
        (alone,) = gen_json(capsys, model, "--prompts", alone_file, "--max-new-tokens", "12")
        assert (j["token_ids"], j["text"], j["finish_reason"]) == \
               (alone["token_ids"], alone["text"], alone["finish_reason"]), p
        ar = gen_json(capsys, model, "--prompts", alone_file, "--max-new-tokens", "12", "--ar")[0]
        assert j["token_ids"] == ar["token_ids"], p
    # a text prompt and its token ids give the same result
    if which == "random":
        by_text = gen_one(capsys, model, "w11 w12 w13 w14 w15 w16", "--max-new-tokens", "12")
        assert by_text["token_ids"] == batched[1]["token_ids"]


# ---------------------------------------------------------------------------- stop strings
@pytest.mark.parametrize("ar", [[], ["--ar"]])
def test_stop_cuts_text_before_stop_string(capsys, conv, ar):
    full = gen_one(capsys, conv, PROMPT, "--max-new-tokens", "12", *ar)
    words = full["text"].split()
    assert len(words) >= 4, full
    stop = words[len(words) // 2]
    expected = full["text"][:full["text"].find(stop)]
    j = gen_one(capsys, conv, PROMPT, "--max-new-tokens", "12", "--stop", stop, *ar)
    assert j["text"] == expected
    assert j["finish_reason"] == "stop"
    assert j["token_ids"] == full["token_ids"][:len(j["token_ids"])]  # a prefix of the unstopped output
    rc, streamed, err = cli(capsys, "generate", conv, "--prompt", PROMPT, "--max-new-tokens", "12", "--stop", stop,
                            *ar)
    assert rc == 0 and streamed == expected


def test_stop_token_ids_equal_ar(capsys, drafter_dir, drafter_prompt):
    full = gen_one(capsys, drafter_dir, drafter_prompt, "--max-new-tokens", "20", "--ar")
    words = full["text"].split()
    for stop in words[1:7]:
        ar = gen_one(capsys, drafter_dir, drafter_prompt, "--max-new-tokens", "20", "--stop", stop, "--ar")
        tidar = gen_one(capsys, drafter_dir, drafter_prompt, "--max-new-tokens", "20", "--stop", stop)
        assert tidar["text"] == ar["text"] == full["text"][:full["text"].find(stop)]
        assert tidar["token_ids"] == ar["token_ids"], stop
        assert tidar["stats"]["new_tokens"] == len(ar["token_ids"]), stop


def test_stop_spanning_tokens_streamed_equals_json(capsys, conv):
    full = gen_one(capsys, conv, PROMPT, "--max-new-tokens", "12")
    words = full["text"].split()
    stop = " ".join(words[2:4])
    j = gen_one(capsys, conv, PROMPT, "--max-new-tokens", "12", "--stop", stop)
    assert j["text"] == full["text"][:full["text"].find(stop)]
    rc, streamed, _ = cli(capsys, "generate", conv, "--prompt", PROMPT, "--max-new-tokens", "12", "--stop", stop)
    assert rc == 0 and streamed == j["text"]


# ---------------------------------------------------------------------------- invalid settings
@pytest.mark.parametrize("args, field", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-1"], "top_k"),
    (["--sampler", "mix", "--mix-weight", "1.5"], "mix_weight"),
    (["--mix-weight", "0.5"], "mix_weight"),
    (["--draft-len", "0"], "draft_len"),
    (["--draft-len", "65"], "draft_len"),
    (["--proposals", "0"], "proposals"),
    (["--proposals", "5"], "proposals"),  # > the checkpoint's draft length 4
    (["--draft-len", "2", "--proposals", "3"], "proposals"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--max-new-tokens", "300"], "max_new_tokens"),  # beyond the model's context of 256
])
def test_invalid_setting_exits_2(capsys, conv, args, field):
    defaults = {"--max-new-tokens": "8"}
    argv = ["generate", conv, "--prompt", PROMPT, *args]
    for flag, value in defaults.items():
        if flag not in args:
            argv += [flag, value]
    msg = error_of(capsys, *argv)
    assert msg.field == field and args[-1] in msg, msg


def test_empty_prompt(capsys, conv):
    msg = error_of(capsys, "generate", conv, "--prompt", "", "--max-new-tokens", "8")
    assert "empty" in msg and "prompt" in msg


@pytest.mark.parametrize("line3", ['{"prompt": "w5"', '{"text": "w5"}', "[]", '["w5", 7]', "42"])
def test_prompts_file_bad_line_3(capsys, conv, tmp_path, line3):
    file = tmp_path / "p.jsonl"
    file.write_text(f'"w5 w7"\n{{"prompt": [5, 6]}}\n{line3}\n"w9"\n')
    msg = error_of(capsys, "generate", conv, "--prompts", file, "--max-new-tokens", "8")
    assert "line 3" in msg and str(file) in msg


def test_prompts_file_missing_or_empty(capsys, conv, tmp_path):
    msg = error_of(capsys, "generate", conv, "--prompts", tmp_path / "nope.jsonl", "--max-new-tokens", "8")
    assert "does not exist" in msg and "nope.jsonl" in msg
    (tmp_path / "empty.jsonl").write_text("\n\n")
    msg = error_of(capsys, "generate", conv, "--prompts", tmp_path / "empty.jsonl", "--max-new-tokens", "8")
    assert "no prompts" in msg


def test_prompts_file_bad_second_prompt_fails_before_output(capsys, conv, tmp_path):
    file = _write_prompts(tmp_path / "p.jsonl", ["w5 w7", [5, 500]])
    msg = error_of(capsys, "generate", conv, "--prompts", file, "--max-new-tokens", "8")
    assert "outside the vocabulary" in msg and re.search(r"prompt 1\b|line 2\b", msg)


@pytest.mark.parametrize("ar", [[], ["--ar"]])
def test_nonexistent_model(capsys, tmp_path, ar):
    msg = error_of(capsys, "generate", tmp_path / "no-model", "--prompt", PROMPT, *ar)
    assert "no-model" in msg and "neither a local checkpoint directory" in msg


def test_model_dir_without_config(capsys, tmp_path):
    msg = error_of(capsys, "generate", tmp_path, "--prompt", PROMPT)
    assert "no config.json" in msg


@pytest.mark.parametrize("size", ["0", "-1"])
def test_invalid_batch_size(capsys, conv, size):
    try:
        msg = error_of(capsys, "generate", conv, "--prompt", PROMPT, "--json", "--batch-size", size)
    except ValueError as e:
        pytest.fail(f"uncaught {e!r}")
    assert msg.field == "batch_size" and size in msg


def test_chat_without_template(capsys, conv):
    try:
        msg = error_of(capsys, "generate", conv, "--prompt", PROMPT, "--chat")
    except ValueError as e:
        pytest.fail(f"uncaught {e!r}")
    assert "chat" in msg


# ---------------------------------------------------------------------------- convert errors
def test_convert_errors(capsys, base_dirs, tmp_path):
    msg = error_of(capsys, "convert", tmp_path / "missing", tmp_path / "o1")
    assert "neither a local checkpoint directory" in msg
    msg = error_of(capsys, "convert", base_dirs["llama"], tmp_path / "o2", "--mask-token", "w5")
    assert msg.field == "mask_token" and "w5" in msg and "--reuse-token" in msg  # named as the flag it is here
    msg = error_of(capsys, "convert", base_dirs["llama"], tmp_path / "o3", "--mask-token", "<|x|>", "--reuse-token")
    assert msg.field == "mask_token" and "<|x|>" in msg
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    msg = error_of(capsys, "convert", base_dirs["llama"], tmp_path / "full")
    assert "not empty" in msg
    msg = error_of(capsys, "convert", base_dirs["llama"], tmp_path / "o4", "--block-size", "0")
    assert msg.field == "block_size" and "0" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_convert_dir_without_config(capsys, tmp_path):
    (tmp_path / "base").mkdir()
    msg = error_of(capsys, "convert", tmp_path / "base", tmp_path / "out")
    assert "config.json" in msg


# ---------------------------------------------------------------------------- help
@pytest.mark.parametrize("argv, words", [
    ([], ["convert", "generate"]),
    (["convert"], ["base", "out", "--block-size", "--mask-token", "--reuse-token", "--masking", "--loss-weight"]),
    (["generate"], ["model", "--prompt", "--prompts", "--ar", "--json", "--sampler", "--draft-len", "--proposals",
                    "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--mix-weight", "--stop",
                    "--batch-size", "--chat", "--seed"]),
])
def test_help(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ar2dlm")
    for w in words:
        assert w in out, w


def test_usage_errors_exit_2(capsys, conv):
    for argv in ([], ["generate", str(conv)], ["generate", str(conv), "--prompt", "w5", "--prompts", "f"],
                 ["generate", str(conv), "--prompt", "w5", "--sampler", "beam"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        assert "usage: ar2dlm" in capsys.readouterr().err


# ---------------------------------------------------------------------------- real subprocesses
def _entry_points():
    script = Path(sys.executable).parent / "ar2dlm"
    script = str(script) if script.exists() else shutil.which("ar2dlm")
    return script, [sys.executable, "-m", "ar2dlm"]


def test_subprocess(capsys, conv):
    script, module = _entry_points()
    assert script is not None, "the ar2dlm console script is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["generate", str(conv), "--prompt", PROMPT, "--max-new-tokens", "8", "--json"]
    p = subprocess.run([script, *args], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    (line,) = p.stdout.splitlines()
    assert json.loads(line)["token_ids"] == gen_one(capsys, conv, PROMPT, "--max-new-tokens", "8")["token_ids"]

    p = subprocess.run([*module, "generate", str(conv), "--prompt", PROMPT, "--top-p", "0"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert "ar2dlm generate: error: top_p" in p.stderr
