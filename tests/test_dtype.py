"""The decode dtype setting: an explicit dtype wins; `auto` is $AR2DLM_DTYPE, else the checkpoint's `dtype`
(ar2dlm.json), else bfloat16 where the hardware computes it natively."""

from __future__ import annotations

import json

import pytest
import torch

from ar2dlm.core.errors import ConfigError
from ar2dlm.core.hardware import DTYPE_ENV, decode_dtype, native_bf16
from ar2dlm.model.lm import DiffusionLM
from ar2dlm.model.settings import DiffusionConfig, LoadConfig


def test_auto_is_the_environment_then_the_checkpoint_then_the_hardware(monkeypatch):
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    native = torch.bfloat16 if native_bf16() else torch.float32
    assert decode_dtype("auto") == native
    assert decode_dtype("auto", "float32") == torch.float32
    assert decode_dtype("auto", "bfloat16") == torch.bfloat16
    assert decode_dtype("float32", "bfloat16") == torch.float32  # explicit wins
    assert decode_dtype(torch.float16, "float32") == torch.float16
    monkeypatch.setenv(DTYPE_ENV, "bfloat16")
    assert decode_dtype("auto", "float32") == torch.bfloat16
    assert decode_dtype("float32") == torch.float32
    monkeypatch.setenv(DTYPE_ENV, "fp8")
    with pytest.raises(ConfigError, match=DTYPE_ENV):
        decode_dtype("auto")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        decode_dtype("float8")


def test_the_defaults_are_auto():
    assert LoadConfig().dtype == "auto" and DiffusionConfig().dtype == "auto"
    with pytest.raises(ConfigError, match="dtype"):
        DiffusionConfig(dtype="int8")


def test_a_checkpoint_decodes_in_its_own_dtype(converted_dirs, monkeypatch, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(converted_dirs["llama"], folder)
    settings = json.loads((folder / "ar2dlm.json").read_text())
    settings["dtype"] = "bfloat16"
    (folder / "ar2dlm.json").write_text(json.dumps(settings))
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    lm = DiffusionLM.from_pretrained(folder)
    assert lm.model.dtype == torch.bfloat16 and lm.batch_invariant
    assert DiffusionLM.from_pretrained(folder, dtype="float32").model.dtype == torch.float32
    monkeypatch.setenv(DTYPE_ENV, "float32")
    assert DiffusionLM.from_pretrained(folder).model.dtype == torch.float32
