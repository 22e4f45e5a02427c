"""Bad inputs, one test per class: the real CLI exits 2 (130 for Ctrl-C) with one message that names the bad
thing, no traceback and no user file changed; the Python API raises ConfigError without naming CLI flags."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import VOCAB, refusal, run_cli

from ar2dlm import DiffusionLM, convert
from ar2dlm.core.errors import ConfigError
from ar2dlm.measure.bench_config import BenchConfig
from ar2dlm.model.settings import SETTINGS_FILE, AdapterSection, DiffusionConfig

PROMPT = "w5 w7 w9"


# ---------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict:
    """{file: sha1} of every file under root (what 'no user file changed' compares)."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, root: Path, *argv, code: int = 2) -> str:
    """Run `ar2dlm ARGV`; it must exit `code` with one error line, no traceback, nothing changed under root.
    Returns the line (a Refusal: its `.field` is the setting the error is about)."""
    before = snapshot(root)
    rc, out, err, seen = run_cli(argv, capsys)
    assert rc == code, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert snapshot(root) == before, "a user file changed"
    if code == 2 and "usage:" not in err:
        return refusal(err, argv[0], seen)
    return err


def api_error(fn, *args, **kwargs) -> ConfigError:
    """The ConfigError fn raises; its message names no CLI flag."""
    with pytest.raises(ConfigError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert message and not [w for w in message.split() if w.startswith("--")], f"API error names a CLI flag: {message}"
    return e.value


@pytest.fixture(scope="module")
def conv(converted_dirs):
    return converted_dirs["llama"]


@pytest.fixture(scope="module")
def lm(conv):
    return DiffusionLM.from_pretrained(conv)


@pytest.fixture
def copy(conv, tmp_path):
    """A converted checkpoint the test may damage."""
    return Path(shutil.copytree(conv, tmp_path / "model"))


@pytest.fixture(scope="module")
def adapter_dir(conv, base_dirs, tmp_path_factory):
    """A drafting-adapter folder (untrained LoRA) over the tiny llama base, saved as training saves one."""
    from ar2dlm.model import adapter

    d = tmp_path_factory.mktemp("adapter") / "final"
    lm = DiffusionLM.from_pretrained(conv)
    lm.settings = dataclasses.replace(lm.settings, base_model=str(base_dirs["llama"]))
    adapter.attach(lm, AdapterSection(rank=2, alpha=4.0))
    lm.model.save_pretrained(d, save_embedding_layers=False)
    lm.tokenizer.save_pretrained(d)
    lm.settings.save(d)
    return d


# ---------------------------------------------------------------------------- silently wrong: mask tokens
@pytest.mark.parametrize("args, shown", [
    (["--mask-token", ""], "''"),
    (["--mask-token", " "], "' '"),
    (["--mask-token", "<mask> x"], "<mask> x"),
    (["--mask-token", "<eos>", "--reuse-token"], "<eos>"),
    (["--mask-token", "<unk>", "--reuse-token"], "<unk>"),
    (["--mask-token", "w5"], "w5"),
])
def test_mask_token_must_be_new_and_distinct(capsys, base_dirs, tmp_path, args, shown):
    msg = refused(capsys, tmp_path, "convert", base_dirs["llama"], tmp_path / "out", *args)
    assert msg.field == "mask_token" and shown in msg, msg
    assert "=True" not in msg  # the command line's words: --reuse-token, not reuse_token=True
    assert not (tmp_path / "out").exists()


def test_mask_token_api(base_dirs, tmp_path):
    from conftest import make_tokenizer, tiny_model

    from ar2dlm.model.convert import add_mask_token

    for token, reuse in (("", False), ("\t", False), ("<eos>", True), ("<unk>", True)):
        assert api_error(add_mask_token, tiny_model("llama"), make_tokenizer(), token, reuse).field == "mask_token"
    assert api_error(convert, base_dirs["llama"], tmp_path / "out", mask_token=" ").field == "mask_token"


# ---------------------------------------------------------------------------- silently dropped settings
@pytest.mark.parametrize("args, field", [
    (["--temperature", "0.5"], "temperature"),
    (["--top-p", "0.9"], "top_p"),
    (["--top-k", "5"], "top_k"),
    (["--sampler", "lossless", "--mix-weight", "0.5"], "mix_weight"),
    (["--ar", "--draft-len", "4"], "draft_len"),
    (["--ar", "--proposals", "2"], "proposals"),
    (["--ar", "--adaptive"], "adaptive"),
    (["--ar", "--sampler", "mix", "--mix-weight", "0.5"], "mix_weight"),
    (["--batch-size", "2"], "batch_size"),
])
def test_generate_refuses_settings_it_would_ignore(capsys, conv, tmp_path, args, field):
    msg = refused(capsys, tmp_path, "generate", conv, "--prompt", PROMPT, "--max-new-tokens", "4", *args)
    assert msg.field == field, msg
    assert "=True" not in msg, msg  # the command line's words (--ar), not the API's (ar=True)


def test_api_refuses_settings_it_would_ignore(lm):
    for settings, field in ((dict(temperature=0.5), "temperature"), (dict(top_p=0.9), "top_p"),
                            (dict(ar=True, draft_len=4), "draft_len"), (dict(ar=True, adaptive=True), "adaptive"),
                            (dict(sampler="lossless", mix_weight=0.3), "mix_weight")):
        assert api_error(lm.generate, PROMPT, max_new_tokens=4, **settings).field == field
    assert lm.generate(PROMPT, max_new_tokens=4, temperature=0.0)[0].token_ids  # temperature 0 is greedy


@pytest.mark.parametrize("args, field", [
    (["--draft-lens", "0"], "draft_lens"), (["--draft-lens", "-4"], "draft_lens"),
    (["--draft-lens", "4", "--proposals", "9"], "proposals"), (["--proposals", "9"], "proposals"),
    (["--runs", "0"], "runs"), (["--max-new-tokens", "0"], "max_new_tokens"), (["--n-prompts", "0"], "n_prompts"),
    (["--batch-sizes", "0"], "batch_sizes"), (["--batch-sizes", "1,-2"], "batch_sizes"),
    (["--mix-weights", "2"], "mix_weights"), (["--samplers", "beam"], "samplers"), (["--seed", str(2**64)], "seed"),
])
def test_bench_refuses_settings_out_of_range(capsys, conv, tmp_path, args, field):
    msg = refused(capsys, tmp_path, "bench", conv, "--quick", "--out", tmp_path / "b", *args)
    assert msg.field == field and args[-1].split(",")[-1] in msg, msg  # names the value
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, field", [
    (["--n-prompts", "0"], "n_prompts"), (["--n-prompts", "-1"], "n_prompts"),
    (["--max-draft-len", "1"], "max_draft_len"), (["--max-draft-len", "100"], "max_draft_len"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
])
def test_tune_refuses_settings_out_of_range_before_timing(capsys, copy, args, field):
    msg = refused(capsys, copy, "tune", copy, *args)
    assert msg.field == field and args[-1] in msg, msg


def test_bench_presets_only_fill_what_is_not_given():
    cfg = BenchConfig(quick=True, runs=1, draft_lens=(8,)).resolved(4, 3)
    assert (cfg.runs, cfg.draft_lens, cfg.n_prompts, cfg.proposals, cfg.max_new_tokens) == (1, (8,), 2, (3,), 40)
    assert BenchConfig(draft_lens=(2,)).resolved(4, 3).proposals == (1, 2)  # the preset fits the draft lengths
    with pytest.raises(ConfigError) as e:
        BenchConfig(draft_lens=(2,), proposals=(3,))  # given: refused, never dropped
    assert e.value.field == "proposals"


# ---------------------------------------------------------------------------- block size; checkpoint settings
@pytest.mark.parametrize("size", ["65", "1000"])
def test_convert_block_size_beyond_the_cap(capsys, base_dirs, tmp_path, size):
    msg = refused(capsys, tmp_path, "convert", base_dirs["llama"], tmp_path / "out", "--block-size", size)
    assert msg.field == "block_size" and size in msg


def test_convert_block_size_beyond_the_context(capsys, tmp_path):
    from conftest import make_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    base = tmp_path / "short"
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 max_position_embeddings=16)).save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    msg = refused(capsys, tmp_path, "convert", base, tmp_path / "out", "--block-size", "16")
    assert msg.field == "block_size" and "16" in msg


@pytest.mark.parametrize("edit", [{"block_size": 1000}, {"draft_len": 100}, {"mask_token_id": 10**6},
                                  {"mask_token_id": None}])
def test_bad_checkpoint_settings_name_the_file(capsys, copy, edit):
    raw = json.loads((copy / SETTINGS_FILE).read_text())
    for k, v in edit.items():
        if v is None:
            del raw[k]
        else:
            raw[k] = v
    (copy / SETTINGS_FILE).write_text(json.dumps(raw))
    msg = refused(capsys, copy, "generate", copy, "--prompt", PROMPT)
    (field,) = edit
    assert msg.field == field and SETTINGS_FILE in msg, msg
    assert api_error(DiffusionLM.from_pretrained, copy).field == field


def test_checkpoint_default_conflict_names_the_file(capsys, copy):
    msg = refused(capsys, copy, "generate", copy, "--prompt", PROMPT, "--proposals", "5")
    assert msg.field == "proposals" and SETTINGS_FILE in msg and "draft_len=4" in msg


# ---------------------------------------------------------------------------- data harmed: never overwrite
def test_prompts_never_overwrites(capsys, tmp_path):
    out = tmp_path / "prompts"
    out.mkdir()
    (out / "train.jsonl").write_text('"mine"\n')
    msg = refused(capsys, tmp_path, "prompts", out)
    assert "train.jsonl" in msg and "--force" in msg


@pytest.mark.parametrize("verb", ["convert", "export", "merge"])
def test_output_directories_are_never_replaced(capsys, base_dirs, adapter_dir, tmp_path, verb):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    source = base_dirs["llama"] if verb == "convert" else adapter_dir
    msg = refused(capsys, tmp_path, verb, source, out)
    assert str(out) in msg and "--force" in msg


def test_bench_out_is_never_overwritten(capsys, conv, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bench.json").write_text("{}")
    msg = refused(capsys, tmp_path, "bench", conv, "--quick", "--out", tmp_path / "b")
    assert "bench.json" in msg and "--force" in msg


def test_convert_force_replaces_atomically(base_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    convert(base_dirs["llama"], out, block_size=4, force=True)
    assert not (out / "old.txt").exists() and DiffusionConfig.load(out).block_size == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling left


# ---------------------------------------------------------------------------- corrupt or truncated files
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_truncated_model_weights(capsys, copy, tmp_path):
    _truncate(copy / "model.safetensors")
    msg = refused(capsys, tmp_path, "generate", copy, "--prompt", PROMPT)
    assert "model.safetensors" in msg and "truncated" in msg
    msg = refused(capsys, tmp_path, "convert", copy, tmp_path / "out")
    assert "model.safetensors" in msg
    (copy / "model.safetensors").write_bytes(b"\x07" * 40)  # garbage, not a header
    assert "model.safetensors" in refused(capsys, tmp_path, "generate", copy, "--prompt", PROMPT)


def test_truncated_or_malformed_adapter(capsys, adapter_dir, tmp_path):
    bad = Path(shutil.copytree(adapter_dir, tmp_path / "bad"))
    _truncate(bad / "adapter_model.safetensors")
    for argv in (["generate", bad, "--prompt", PROMPT], ["export", bad, tmp_path / "o"],
                 ["merge", bad, tmp_path / "m"]):
        assert "adapter_model.safetensors" in refused(capsys, tmp_path, *argv)
    shutil.copy(adapter_dir / "adapter_model.safetensors", bad / "adapter_model.safetensors")
    for text in ('{"r": 2', "[]", '{"peft_type": "NOPE"}'):
        (bad / "adapter_config.json").write_text(text)
        msg = refused(capsys, tmp_path, "generate", bad, "--prompt", PROMPT)
        assert "adapter_config.json" in msg, msg


def test_checkpoint_without_tokenizer_files(capsys, copy):
    for f in copy.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    msg = refused(capsys, copy, "generate", copy, "--prompt", PROMPT)
    assert "no tokenizer files" in msg and "sentencepiece" not in msg


# ---------------------------------------------------------------------------- wrong kinds of files and paths
def test_text_files_that_are_not_utf8(capsys, conv, base_dirs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'"w5"\n"\xff\xfe w7"\n')
    assert "not UTF-8" in refused(capsys, tmp_path, "generate", conv, "--prompts", bad)
    (tmp_path / "recipe.yaml").write_bytes(b"run_dir: \xff\n")
    msg = refused(capsys, tmp_path, "train", "--config", tmp_path / "recipe.yaml")
    assert "recipe.yaml" in msg and "not UTF-8" in msg
    (tmp_path / "corpus.txt").write_bytes(b"w5 w6 \xff\xfe")
    recipe = tmp_path / "data.yaml"
    recipe.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "model": {"path": str(base_dirs["llama"])},
                                  "data": {"train": [str(tmp_path / "corpus.txt")], "seq_len": 8}}))
    msg = refused(capsys, tmp_path / "corpus.txt", "train", "--config", recipe)
    assert "corpus.txt" in msg and "not UTF-8" in msg


def test_paths_of_the_wrong_kind(capsys, conv, base_dirs, tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    msg = refused(capsys, tmp_path, "generate", conv, "--prompts", tmp_path / "a-dir")
    assert "a-dir" in msg and "directory" in msg
    msg = refused(capsys, tmp_path, "convert", base_dirs["llama"], tmp_path / "a-file")
    assert "a-file" in msg and "not a directory" in msg
    msg = refused(capsys, tmp_path, "prompts", tmp_path / "a-file")
    assert "a-file" in msg
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"run_dir": str(tmp_path / "a-file")}))
    msg = refused(capsys, tmp_path, "train", "--config", recipe)
    assert "a-file" in msg and "run_dir" in msg
    msg = refused(capsys, tmp_path, "train", "--config", tmp_path / "a-dir")
    assert "a-dir" in msg
    msg = refused(capsys, tmp_path, "generate", tmp_path / "a-file", "--prompt", PROMPT)
    assert "a-file" in msg


# ---------------------------------------------------------------------------- numbers out of range
@pytest.mark.parametrize("args, field", [
    (["--sampler", "lossless", "--temperature", "inf"], "temperature"),
    (["--sampler", "lossless", "--temperature", "nan"], "temperature"),
    (["--sampler", "lossless", "--temperature", "1e-310"], "temperature"),
    (["--sampler", "lossless", "--seed", str(2**64)], "seed"),
    (["--sampler", "lossless", "--seed", "-1"], "seed"),
    (["--json", "--batch-size", "0"], "batch_size"),
])
def test_numbers_out_of_range(capsys, conv, tmp_path, args, field):
    msg = refused(capsys, tmp_path, "generate", conv, "--prompt", PROMPT, "--max-new-tokens", "4", *args)
    assert msg.field == field, msg


def test_api_numbers_and_empty_batches(lm):
    api_error(lm.generate, [])
    from ar2dlm.decode.engine import generate

    api_error(generate, lm, [], lm.decode_config())
    assert api_error(lm.generate, PROMPT, sampler="lossless", temperature=float("inf")).field == "temperature"
    assert api_error(lm.generate, PROMPT, sampler="lossless", seed=2**64).field == "seed"
    assert api_error(lm.generate, PROMPT, draft_len="4").field == "draft_len"


def test_prompt_longer_than_the_context_says_how_much_to_cut(lm):
    msg = str(api_error(lm.generate, [[5] * 300], max_new_tokens=4))
    assert "at most 255" in msg and "-" not in msg.split("at most")[1]


# ---------------------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize("json_out", [False, True])
def test_ctrl_c_stops_cleanly_with_stats(capsys, conv, tmp_path, monkeypatch, json_out):
    from ar2dlm.decode import core

    real, calls = core.step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "step", interrupted)
    err = refused(capsys, tmp_path, "generate", conv, "--prompt", PROMPT, "--max-new-tokens", "40",
                  *(["--json"] if json_out else []), code=130)
    assert "interrupted" in err
    if not json_out:
        assert "tokens, 3 forwards" in err  # the stats of what was generated: prefill + 2 steps


# ---------------------------------------------------------------------------- chat sets without a chat template
@pytest.mark.parametrize("verb", ["bench", "tune"])
def test_chat_set_without_template_fails_up_front(capsys, copy, tmp_path, verb):
    extra = ["--out", tmp_path / "b"] if verb == "bench" else []
    msg = refused(capsys, tmp_path, verb, copy, "--sets", "chat", *extra)
    assert msg.field == "sets" and "chat" in msg
    chat_file = tmp_path / "chat.jsonl"
    chat_file.write_text(json.dumps({"prompt": "w5", "chat": True}) + "\n")
    msg = refused(capsys, tmp_path, verb, copy, "--sets", chat_file, *extra)
    assert "chat.jsonl" in msg and "template" in msg


def test_default_sets_skip_chat_with_a_note(lm, capsys):
    from ar2dlm.measure.bench_config import without_chat

    cfg = without_chat(BenchConfig(), False, "tiny", explicit=False)
    assert cfg.sets == ("code", "prose")
    assert "no chat template" in capsys.readouterr().err


def test_sets_take_any_existing_file(lm, tmp_path):
    from ar2dlm.measure.bench import load_prompt_set

    (tmp_path / "p.txt").write_text('"w5 w6"\n"w7"\n')
    assert load_prompt_set(lm, str(tmp_path / "p.txt"), 5) == [[5, 6], [7]]
    assert "no file" in str(api_error(load_prompt_set, lm, str(tmp_path / "nope"), 5))


# ---------------------------------------------------------------------------- messages that point the right way
@pytest.mark.parametrize("verb", ["bench", "demo", "tune"])
def test_unconverted_model_without_ar_flag(capsys, base_dirs, tmp_path, verb):
    msg = refused(capsys, tmp_path, verb, base_dirs["llama"])
    assert "ar2dlm convert" in msg and "--ar" not in msg


def test_merge_of_a_complete_model(capsys, conv, tmp_path):
    msg = refused(capsys, tmp_path, "merge", conv, tmp_path / "m")
    assert "nothing to merge" in msg and "drafting" not in msg


def test_bad_override_is_not_blamed_on_the_file(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 0.001\n")
    msg = refused(capsys, tmp_path, "train", "--config", recipe, "--optim.lr", "fast")
    assert msg.field == "optim.lr" and "command-line" in msg and "itself is fine" in msg
    recipe.write_text("adapter:\n  rnk: 3\n")
    msg = refused(capsys, tmp_path, "train", "--config", recipe)
    assert msg.field == "adapter.rnk" and "r.yaml" in msg


@pytest.mark.parametrize("argv", [["bench", "M", "--draft-lens", "x"], ["bench", "M", "--runs", "two"],
                                  ["tune", "M", "--sets", "a", "--n-prompts", "1.5"]])
def test_argparse_errors_name_the_expected_type(capsys, tmp_path, argv):
    err = refused(capsys, tmp_path, *argv)
    assert "lambda" not in err and "expected" in err


def test_api_errors_name_no_cli_flags(lm, base_dirs, tmp_path):
    from conftest import make_tokenizer, tiny_model

    from ar2dlm.model.convert import add_mask_token
    from ar2dlm.train.trainer import check_run_dir

    api_error(lm.generate, PROMPT, chat=True)
    api_error(DiffusionLM.from_pretrained, base_dirs["llama"])
    api_error(add_mask_token, tiny_model("llama"), make_tokenizer(), "<|x|>", True)
    api_error(add_mask_token, tiny_model("llama"), make_tokenizer(), "w5")
    api_error(check_run_dir, tmp_path / "run", True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f").write_text("x")
    api_error(convert, base_dirs["llama"], tmp_path / "out")


# ---------------------------------------------------------------------------- relative base of an adapter
def test_adapter_base_saved_as_relative_path(capsys, adapter_dir, base_dirs, tmp_path, monkeypatch):
    moved = Path(shutil.copytree(adapter_dir, tmp_path / "a" / "final"))
    settings = DiffusionConfig.load(moved)
    monkeypatch.chdir(base_dirs["llama"].parent)
    relative = dataclasses.replace(settings, base_model="llama")  # as an older run stored it
    relative.save(moved)
    assert DiffusionLM.from_pretrained(moved).settings.base_model == "llama"  # from the training directory
    monkeypatch.chdir(tmp_path)
    msg = refused(capsys, tmp_path / "a", "generate", moved, "--prompt", PROMPT)
    assert "'llama'" in msg and "base_model" in msg and SETTINGS_FILE in msg and "relative" in msg


def test_new_checkpoints_store_an_absolute_base(base_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(base_dirs["llama"].parent)
    out = convert("llama", tmp_path / "out", block_size=4)
    assert Path(DiffusionConfig.load(out).base_model) == base_dirs["llama"].resolve()


# ---------------------------------------------------------------------------- train --resume
def test_resume_without_a_checkpoint_refuses(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"run_dir": str(tmp_path / "typo")}))
    msg = refused(capsys, tmp_path, "train", "--config", recipe, "--resume")
    assert "no checkpoint" in msg and "typo" in msg and "--resume" in msg
    assert not (tmp_path / "typo").exists()


# ---------------------------------------------------------------------------- fuzz: decode settings
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.just(1e-310),
                     st.sampled_from([0.0, 0.5, 1.0, 1.5]), st.text(max_size=2), st.none(), st.booleans())
_ints = st.one_of(st.integers(-3, 70), st.integers(-2**70, 2**70), st.floats(0, 5), st.text(max_size=2), st.none(),
                  st.booleans())
SETTINGS = st.fixed_dictionaries({}, optional={
    "max_new_tokens": _ints, "draft_len": _ints, "proposals": _ints,
    "sampler": st.one_of(st.sampled_from(["greedy", "lossless", "mix", "beam", ""]), st.integers(0, 2)),
    "mix_weight": _numbers, "temperature": _numbers, "top_k": _ints, "top_p": _numbers, "seed": _ints,
    "stop": st.one_of(st.lists(st.text(max_size=3), max_size=2), st.text(max_size=3), st.integers(0, 3), st.none()),
    "eos_token_id": st.one_of(st.lists(st.integers(-2, 200), max_size=2), st.integers(-2, 200), st.none()),
    "ar": st.one_of(st.booleans(), st.integers(0, 1), st.none()),
    "adaptive": st.one_of(st.booleans(), st.none()),
})


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(settings=SETTINGS)
def test_any_decode_settings_decode_or_raise_config_error(lm, settings):
    n = settings.setdefault("max_new_tokens", 12)
    if isinstance(n, int) and not isinstance(n, bool):
        settings["max_new_tokens"] = min(n, 12)  # keep each example fast
    try:
        (g,) = lm.generate([5, 7, 9], **settings)
    except ConfigError:
        return
    limit = settings["max_new_tokens"] if settings["max_new_tokens"] is not None else 128  # None = the default
    assert 1 <= len(g.token_ids) <= limit and all(0 <= t < VOCAB for t in g.token_ids)
    assert lm.mask_token_id not in g.token_ids


PLAUSIBLE = st.fixed_dictionaries({"max_new_tokens": st.integers(1, 12)}, optional={
    "draft_len": st.integers(1, 8), "proposals": st.integers(1, 8),
    "sampler": st.sampled_from(["greedy", "lossless", "mix"]), "mix_weight": st.floats(0, 1),
    "temperature": st.one_of(st.just(0.0), st.floats(1e-3, 1e3)), "top_k": st.integers(0, 200),
    "top_p": st.floats(1e-6, 1.0), "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(st.sampled_from(["w1", "w9 ", "w"]), max_size=2),
    "eos_token_id": st.lists(st.integers(0, VOCAB), max_size=2), "ar": st.booleans(), "adaptive": st.booleans(),
})


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(settings=PLAUSIBLE)
def test_plausible_decode_settings_decode_or_raise_config_error(lm, settings):
    """The same over values near the valid range: most combinations decode, on every code path."""
    test_any_decode_settings_decode_or_raise_config_error.hypothesis.inner_test(lm, settings)
