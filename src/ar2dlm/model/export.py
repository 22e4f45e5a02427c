"""Shipping an adapter folder (a run's final/): `export` a compact copy of it, or `merge` an ungated LoRA into a
complete converted checkpoint (`ar2dlm export`, `ar2dlm merge`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..core import files
from ..core.errors import ConfigError
from . import checkpoint
from .bundled import resolve_model
from .checkpoint import check_adapter
from .lm import DiffusionLM
from .settings import DiffusionConfig


def export(src, out, dtype: str = "bfloat16", force: bool = False) -> Path:
    """Copy an adapter folder into OUT with its weights cast to `dtype`, without tokenizer files.

    The tokenizer is rebuilt on load from the base model (plus the mask token,
    whose id is checked against ar2dlm.json), so OUT holds only
    adapter_config.json, adapter_model.safetensors and ar2dlm.json. OUT must
    not exist or be empty (force=True replaces it).
    """
    from safetensors.torch import load_file, save_file

    src, out = files.check_path(src, "src"), files.check_path(out, "out")
    weights = src / "adapter_model.safetensors"
    if not (src / "adapter_config.json").is_file() or not weights.is_file():
        raise ConfigError(f"{src} is not an adapter folder (needs adapter_config.json and "
                          f"adapter_model.safetensors, as written to a run's final/)")
    settings = DiffusionConfig.load(src)
    if not settings.adapter:
        raise ConfigError(f"{src}: ar2dlm.json has no adapter kind; export takes a drafting or lora adapter folder")
    target = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
    if target is None:
        raise ConfigError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}", field="dtype")
    check_adapter(src)
    only_gitkeep = out.is_dir() and all(p.name == ".gitkeep" for p in out.iterdir())
    files.check_output_dir(out, force or only_gitkeep, inputs=[src])
    tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in load_file(weights).items()}
    with files.output_dir(out, force or only_gitkeep, inputs=[src]) as tmp:
        config = files.read_json(src / "adapter_config.json", "adapter config")
        config["base_model_name_or_path"] = settings.base_model  # not a machine-specific path
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        settings.save(tmp)
    return out


def merge(adapter: str | Path, out: str | Path, force: bool = False) -> Path:
    """Merge the LoRA of ADAPTER (a run's final/) into its base's weights and write OUT (a converted checkpoint).

    Only an ungated LoRA merges: the drafting adapter acts on mask-slot rows only, so merging it would change
    the AR path. OUT must not exist or be empty (force=True replaces it).
    """
    files.check_path(adapter, "adapter")
    files.check_output_dir(out, force)
    folder = resolve_model(str(adapter))
    inputs = [folder, checkpoint.read_settings(folder, False)[1]]  # the adapter folder and its base
    files.check_not_input(out, inputs, "output directory")
    lm = DiffusionLM.from_pretrained(adapter)
    kind = lm.settings.adapter
    if kind == "":
        raise ConfigError(f"{adapter} is a complete converted checkpoint, not an adapter folder: there is "
                          f"nothing to merge; use it as it is")
    if kind != "lora":
        raise ConfigError(f"{adapter} holds a {kind!r} adapter; only an ungated LoRA can be merged. "
                          "The drafting adapter acts on mask-slot rows only, so merging it into the weights "
                          "would change the AR path: ship the adapter folder instead")
    merged = lm.model.merge_and_unload()
    with files.output_dir(out, force, inputs=inputs) as tmp:
        merged.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        dataclasses.replace(lm.settings, adapter="").save(tmp)
    return Path(out)
