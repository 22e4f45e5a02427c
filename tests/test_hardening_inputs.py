"""Bad inputs, second pass, one test per class (issue 21): checked where the input enters, for every verb and API
entry point. Each CLI case: exit 2 (130 / 143 for signals), no traceback, the message names the input (the
ConfigError's `field`), every input byte-identical afterwards."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import make_tokenizer, refusal, run_cli, save_base, tiny_model

from ar2dlm import DiffusionLM, convert
from ar2dlm.core.errors import ConfigError
from ar2dlm.model.export import export, merge
from ar2dlm.model.settings import AdapterSection
from ar2dlm.train import prompts as prompt_sets

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- helpers
def checksums(*paths) -> dict:
    """{file: sha1} of every file under each path (a file or a directory)."""
    out = {}
    for path in map(Path, paths):
        for f in ([path] if path.is_file() else sorted(path.rglob("*"))):
            if f.is_file():
                out[str(f)] = hashlib.sha1(f.read_bytes()).hexdigest()
    return out


def refused(capsys, inputs, *argv, field=None, names=None):
    """`ar2dlm ARGV` exits 2 with one error line (its ConfigError's field `field`, naming `names`), no traceback,
    and every file under `inputs` unchanged. Returns the line."""
    before = checksums(*inputs)
    rc, out, err, seen = run_cli(argv, capsys)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err + out
    assert checksums(*inputs) == before, "an input changed"
    line = refusal(err, str(argv[0]), seen)
    if field is not None:
        assert line.field == field, line
    if names is not None:
        assert str(names) in line, line
    return line


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny base, its conversion, a LoRA adapter folder over it, a prompts file and a training corpus."""
    from ar2dlm.model import adapter

    d = tmp_path_factory.mktemp("inputs")
    save_base("llama", d / "base")
    convert(d / "base", d / "conv", block_size=4)
    lm = DiffusionLM.from_pretrained(d / "conv")
    lm.settings = dataclasses.replace(lm.settings, base_model=str(d / "base"))
    adapter.attach(lm, AdapterSection(kind="lora", rank=2, alpha=4.0))
    lm.settings = dataclasses.replace(lm.settings, adapter="lora")
    lm.model.save_pretrained(d / "lora", save_embedding_layers=False)
    lm.tokenizer.save_pretrained(d / "lora")
    lm.settings.save(d / "lora")
    shutil.copy(prompt_sets.CHAT_FILE, d / "chat.jsonl")
    (d / "prompts.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"w{5 + i} w9"}) + "\n"
                                             for i in range(2)))
    with open(d / "data.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(f"w{2 + (i + j) % 7}" for j in range(40))}) + "\n")
    return d


def recipe(root: Path, run_dir, path: Path, **sections) -> Path:
    raw = {"run_dir": str(run_dir), "model": {"path": str(root / "base"), "precision": "fp32"},
           "data": {"train": [str(root / "data.jsonl")], "seq_len": 32, "heldout_fraction": 0.1},
           "objective": {"block_size": 4}, "adapter": {"kind": "drafting", "rank": 4, "alpha": 8},
           "optim": {"batch_size": 2}, "schedule": {"max_steps": 2, "warmup_fraction": 0.0},
           "eval": {"every_steps": 0, "log_every": 1}, "checkpoint": {"every_steps": 1000, "every_minutes": 0}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------------------- 1. --force never changes an input
RELATIONS = ("same", "parent", "child", "sibling", "link-to-input", "link-to-parent", "inside-link")


def _out_for(inp: Path, relation: str, scratch: Path) -> Path:
    if relation == "same":
        return inp
    if relation == "parent":
        return inp.parent
    if relation == "child":
        return inp / "sub"
    if relation == "sibling":
        return inp.parent / "sibling-out"
    link = scratch / f"link-{relation}"
    link.symlink_to(inp.parent if relation == "link-to-parent" else inp)
    return link / "sub" if relation == "inside-link" else link


def _stop_before_work(monkeypatch):
    """bench and eval: the checks are what is tested; the model load (the first step of the work) stops the
    command as Ctrl-C would (exit 130), so an accepted output costs nothing."""
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DiffusionLM, "from_pretrained", stop)


# verb -> (inputs it reads (names under the example's copy), argv given (out, copy))
WRITERS = {
    "convert": (("base",), lambda o, c: ["convert", c / "base", o, "--block-size", "4", "--force"]),
    "export": (("lora",), lambda o, c: ["export", c / "lora", o, "--force"]),
    "merge": (("lora", "base"), lambda o, c: ["merge", c / "lora", o, "--force"]),
    "distill": (("conv", "prompts.jsonl"), lambda o, c: ["distill", c / "conv", "--prompts", c / "prompts.jsonl",
                                                         "--out", o, "--max-new-tokens", "2"]),
    "bench": (("conv", "prompts.jsonl"), lambda o, c: ["bench", c / "conv", "--out", o, "--force", "--sets",
                                                       c / "prompts.jsonl"]),
    "eval": (("conv",), lambda o, c: ["eval", c / "conv", "--out", o, "--force"]),
    "train": (("base", "data.jsonl"), None),
    "prompts": (("chat.jsonl",), lambda o, c: ["prompts", o, "--force"]),
}


@pytest.mark.parametrize("verb", list(WRITERS))
def test_force_never_changes_an_input(verb, root, capsys):
    names, argv = WRITERS[verb]

    @hypothesis.settings(max_examples=10, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(relation=st.sampled_from(RELATIONS), which=st.sampled_from(names))
    def check(relation, which):
        scratch = Path(tempfile.mkdtemp(dir=root.parent))
        try:
            copy = scratch / "in"
            copy.mkdir()
            for n in {"base", "prompts.jsonl", "data.jsonl", *names}:
                (shutil.copytree if (root / n).is_dir() else shutil.copy)(root / n, copy / n)
            if verb == "merge":  # the adapter's base is this copy's
                settings = json.loads((copy / "lora" / "ar2dlm.json").read_text())
                (copy / "lora" / "ar2dlm.json").write_text(json.dumps({**settings, "base_model": str(copy / "base")}))
            inputs = [copy / n for n in names]
            out = _out_for(copy / which, relation, scratch)
            if verb == "train":
                args = ["train", "--config", recipe(copy, out, scratch / "r.yaml", model={"path": str(copy / "base")},
                                                    data={"train": [str(copy / "data.jsonl")]},
                                                    schedule={"max_steps": 1})]
            else:
                args = argv(out, copy)
            before = checksums(*inputs)
            with pytest.MonkeyPatch.context() as mp:
                if verb in ("bench", "eval"):
                    _stop_before_work(mp)
                mp.setattr(prompt_sets, "CHAT_FILE", copy / "chat.jsonl")  # the chat prompts are read from here
                rc, stdout, err, seen = run_cli(args, capsys)
            assert "Traceback" not in err + stdout
            assert all(p.exists() for p in inputs) and checksums(*inputs) == before, (relation, which, err)
            assert rc in (0, 2, 130), (rc, err)
            if relation in ("same", "link-to-input", "child", "inside-link") and verb != "distill" or \
                    relation == "parent" and verb in ("convert", "export", "merge"):
                assert rc == 2 and seen[0].field in ("out", "run_dir", "path"), (relation, which, err)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    check()


def test_api_writers_never_take_an_input(root, tmp_path):
    base = Path(shutil.copytree(root / "base", tmp_path / "base"))
    lora = Path(shutil.copytree(root / "lora", tmp_path / "lora"))
    before = checksums(base, lora)
    (tmp_path / "alias").symlink_to(base)
    (tmp_path / "lora-link").symlink_to(lora)
    for call in (lambda: convert(tmp_path / "alias", base / "x", force=True),
                 lambda: convert(str(base), tmp_path, force=True),
                 lambda: export(tmp_path / "lora-link", lora, force=True),
                 lambda: merge(root / "lora", root, force=True)):
        with pytest.raises(ConfigError) as e:
            call()
        assert e.value.field == "out", e.value
    assert checksums(base, lora) == before


# ---------------------------------------------------------------------------- 2. resume keeps what the run is
def test_resume_refuses_a_change_of_what_the_run_is(root, tmp_path, capsys):
    from ar2dlm.train import trainer
    from ar2dlm.train.config import TrainConfig

    run = tmp_path / "run"
    first = recipe(root, run, tmp_path / "a.yaml")
    rc, out, err, _ = run_cli(["train", "--config", first], capsys)
    assert rc == 0, err
    for section, change, field in [({"adapter": {"kind": "lora"}}, None, "adapter.kind"),
                                   ({"adapter": {"rank": 8}}, None, "adapter.rank"),
                                   ({"objective": {"masking": "half_life"}}, None, "objective.masking"),
                                   ({"model": {"path": str(root / "conv")}}, None, "model.path"),
                                   ({"optim": {"lr": 1e-2}}, None, "optim.lr")]:
        refused(capsys, [run, root / "base"], "train", "--config", recipe(root, run, tmp_path / "b.yaml", **section),
                "--resume", field=field, names=field)
    with pytest.raises(ConfigError) as e:  # the API: the same check
        trainer.train(TrainConfig.from_yaml(recipe(root, run, tmp_path / "c.yaml", seed=3)), resume=True)
    assert e.value.field == "seed"
    # steps, the learning-rate schedule and logging may change
    more = recipe(root, run, tmp_path / "d.yaml", schedule={"max_steps": 3, "min_lr_ratio": 0.5},
                  eval={"log_every": 2}, checkpoint={"keep_last": 3})
    rc, out, err, _ = run_cli(["train", "--config", more, "--resume"], capsys)
    assert rc == 0, err
    assert json.loads((run / "checkpoints" / "step-00000003" / "progress.json").read_text())["step"] == 3


# ---------------------------------------------------------------------------- 3. signals: 130 / 143, after saving
def test_sigterm_in_train_saves_and_exits_143(root, tmp_path):
    """A real signal to a real process (Ctrl-C is test_train.py's test_resume_after_a_real_signal_is_exact)."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    cfg = recipe(root, run, tmp_path / "r.yaml", schedule={"max_steps": 100000}, data={"seq_len": 64})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "ar2dlm", "train", "--config", str(cfg)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, deadline = run / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "Traceback" not in out
    (ckpt,) = sorted((run / "checkpoints").glob("step-*"))
    assert load_file(ckpt / "trainable.safetensors")
    assert json.loads((ckpt / "progress.json").read_text())["step"] >= 2


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_every_verb_exits_128_plus_the_signal(root, tmp_path, capsys, monkeypatch, signum, code):
    """convert interrupted while it writes: the signal's exit code, and no output, not even half of one."""
    from ar2dlm.model import settings

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(1)  # the handler runs here

    monkeypatch.setattr(settings.DiffusionConfig, "save", interrupted)
    # SIGINT raises KeyboardInterrupt, as in a terminal, whatever the suite was started under (`&` ignores it)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = checksums(root / "base")
        rc, out, err, _ = run_cli(["convert", root / "base", tmp_path / "out"], capsys)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert rc == code and "Traceback" not in err and "interrupted" in err
    assert checksums(root / "base") == before and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- 4. types at the API boundary
@pytest.fixture(scope="module")
def lm(root):
    return DiffusionLM.from_pretrained(root / "conv")


@pytest.mark.parametrize("call, field", [
    (lambda lm, r: DiffusionLM.from_pretrained(42), "path"),
    (lambda lm, r: DiffusionLM.from_pretrained(b"/tmp"), "path"),
    (lambda lm, r: convert(r / "base", 3.5), "out"),
    (lambda lm, r: convert(["base"], r / "x"), "base"),
    (lambda lm, r: export(None, r / "x"), "src"),
    (lambda lm, r: merge(r / "lora", None), "out"),
    (lambda lm, r: lm.generate({"w5": 1}), "prompts"),
    (lambda lm, r: lm.generate([["w5", "w6"]]), "prompts[0]"),
    (lambda lm, r: lm.generate([bytearray(b"w5")]), "prompts[0]"),
    (lambda lm, r: lm.generate(("w5", 7)), "prompts[1]"),
    (lambda lm, r: list(lm.stream(("w5", "w6"))), "prompt"),
    (lambda lm, r: list(lm.stream(b"w5 w6")), "prompt"),
    (lambda lm, r: list(lm.stream([5, 6.5])), "prompt"),
    (lambda lm, r: lm.encode(7), "prompts"),
    (lambda lm, r: lm.generate("w5", max_tokens=3), "max_tokens"),
    (lambda lm, r: list(lm.stream("w5", temprature=0.5)), "temprature"),
    (lambda lm, r: convert(r / "base", r / "y", blocksize=4), "blocksize"),
])
def test_api_types_are_checked_where_the_call_enters(lm, root, call, field):
    before = checksums(root)
    with pytest.raises(ConfigError) as e:
        call(lm, root)
    assert e.value.field == field and field.split("[")[0] in str(e.value), e.value
    assert checksums(root) == before


def test_api_accepts_what_it_documents(lm):
    a = lm.generate("w5 w6", max_new_tokens=3)[0].token_ids
    assert lm.generate([[*lm.encode("w5 w6")[0]]], max_new_tokens=3)[0].token_ids == a
    assert lm.generate(lm.encode("w5 w6")[0], max_new_tokens=3)[0].token_ids == a
    assert "".join(lm.stream(tuple(lm.encode("w5 w6")[0]), max_new_tokens=3)) == lm.generate("w5 w6",
                                                                                               max_new_tokens=3)[0].text


# ---------------------------------------------------------------------------- 5. plan checks what convert checks
@pytest.mark.parametrize("edit, extra, field", [
    ({"num_attention_heads": 0}, [], "num_attention_heads"),
    ({"vocab_size": 0}, [], "vocab_size"),
    ({"max_position_embeddings": -1}, [], "max_position_embeddings"),
    ({}, ["--context", "300"], "context"),
    ({"model_type": "falcon_mamba", "architectures": ["FalconMambaForCausalLM"]}, [], None),
])
def test_plan_refuses_what_it_cannot_price(capsys, tmp_path, edit, extra, field):
    tiny_model("llama").config.save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **edit}))
    line = refused(capsys, [config], "plan", config, "--hardware", "h100", "--block-size", "4", *extra, field=field)
    assert str(tmp_path) in line or field == "context"


# ---------------------------------------------------------------------------- 6. the mask token is no word
def test_reused_mask_token_must_not_be_text(capsys, root, tmp_path):
    from ar2dlm.model.convert import add_mask_token

    for word in ("w7", "w42"):
        refused(capsys, [root / "base"], "convert", root / "base", tmp_path / "out", "--reuse-token", "--mask-token",
                word, field="mask_token", names=word)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError) as e:
        add_mask_token(tiny_model("llama"), make_tokenizer(), "w3", reuse=True)
    assert e.value.field == "mask_token"


# ---------------------------------------------------------------------------- 7. settings from the environment
@pytest.mark.parametrize("var, value, verb", [
    ("AR2DLM_KERNELS", "fast", "generate"),
    ("AR2DLM_KERNELS", "STOCK ", "generate"),
    ("AR2DLM_HOME", "{file}", "smollm2"),
    ("AR2DLM_HOME", "{file}/sub", "smollm2"),
])
def test_environment_settings_name_the_variable(capsys, root, tmp_path, monkeypatch, var, value, verb):
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv(var, value.format(file=tmp_path / "a-file"))
    model = "smollm2-135m" if verb == "smollm2" else root / "conv"
    line = refused(capsys, [root / "conv", tmp_path], "generate", model, "--prompt", "w5", "--max-new-tokens", "2",
                   field=var, names=var)
    assert "Errno" not in line


# ---------------------------------------------------------------------------- 8. writers that resume
def test_distill_validates_what_it_appends_to(capsys, root, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    good = json.dumps({"id": "p0", "prompt_ids": [5], "completion_ids": [6], "text": "w6"})
    for bad, line in [(f"{good}\n[1, 2]\n", 2), (f"{good}\n\n{{oops\n{good}\n", 3), ('{"id": "p1"}\n', 1)]:
        (out / "distilled.jsonl").write_text(bad)
        msg = refused(capsys, [root / "conv", root / "prompts.jsonl", out], "distill", root / "conv", "--prompts",
                      root / "prompts.jsonl", "--out", out, "--max-new-tokens", "2")
        assert f"line {line}" in msg and "distilled.jsonl" in msg
    (out / "distilled.jsonl").write_text(good + "\n" + good[:20])  # cut by an interruption: repaired
    rc, _, err, _ = run_cli(["distill", root / "conv", "--prompts", root / "prompts.jsonl", "--out", out,
                             "--max-new-tokens", "2"], capsys)
    assert rc == 0, err
    assert [json.loads(x)["id"] for x in (out / "distilled.jsonl").read_text().splitlines()] == ["p0", "p1"]


# ---------------------------------------------------------------------------- 9. no blank success
@pytest.mark.parametrize("content", ["", "\n\n", '{"step": "one", "loss": "low"}\n', '{"note": 1}\n[1, 2]\n',
                                     '{"step": 1, "loss": NaN}\n'])
def test_plot_of_nothing_is_an_error(capsys, tmp_path, content):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text(content)
    refused(capsys, [tmp_path], "plot", tmp_path, names="metrics.jsonl")
    assert not list(tmp_path.glob("*.png"))


# ---------------------------------------------------------------------------- 10. messages that do not mislead
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_numbers_say_so(capsys, root, tmp_path, value):
    msg = refused(capsys, [root / "base"], "convert", root / "base", tmp_path / "o", f"--loss-weight={value}",
                  field="loss_weight")
    assert "finite" in msg and ">=" not in msg


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_empty_recipe_names_the_recipe(capsys, tmp_path, text):
    (tmp_path / "r.yaml").write_text(text)
    msg = refused(capsys, [tmp_path], "train", "--config", tmp_path / "r.yaml", names=tmp_path / "r.yaml")
    assert "empty" in msg and "data.train" not in msg


def test_api_folder_writers_never_write_into_an_input(lm, root, tmp_path):
    from ar2dlm.evaluate.config import EvalConfig
    from ar2dlm.evaluate.run import evaluate
    from ar2dlm.train.distill import distill

    before = checksums(root)
    for call in (lambda: distill(lm, root / "prompts.jsonl", root / "conv"),
                 lambda: distill(lm, root / "prompts.jsonl", root / "prompts.jsonl" / "x"),
                 lambda: evaluate(lm, EvalConfig(form="raw", limit=1, settings=("ar",)), root / "conv" / "ev", "m")):
        with pytest.raises(ConfigError) as e:
            call()
        assert e.value.field == "out", e.value
    assert checksums(root) == before
