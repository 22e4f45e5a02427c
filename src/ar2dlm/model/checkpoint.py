"""Checkpoint folders: reading, checking and writing them (loading a model, tokenizer or adapter; exporting
an adapter folder). Every loader of a model, tokenizer or adapter reads its files through here.

`DiffusionLM.from_pretrained` (converted checkpoints, adapter folders),
`convert.load_base` and training's `load_model` all call these, so a
truncated weight file, a malformed JSON file, a folder without tokenizer
files or a base path that only made sense elsewhere is a `ConfigError` that
names the file, never a traceback from deep inside transformers or peft.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core import files
from ..core.config import SETTINGS_FILE, ConfigError, DiffusionConfig

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError)
"""What transformers and peft raise for unreadable or inconsistent files."""
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_model(path: Path, exact: bool = False, **kwargs):
    """AutoModelForCausalLM.from_pretrained(path, **kwargs), with every file it reads checked first.

    exact=True (a model to convert or decode with drafts) also refuses, before the weights load, an
    architecture ar2dlm cannot decode exactly (`architectures.check_architecture`)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM

    path = Path(path)
    files.read_json(path / "config.json", "model config")  # not UTF-8, a directory, not JSON: named
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: unreadable config.json ({first_line(e)})") from e
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(f"{path} is not a causal-LM checkpoint (model_type {config.model_type!r}): transformers "
                          f"has no causal-LM class for it")
    if exact:
        from .architectures import check_architecture

        check_architecture(config, str(path))
    if not any(any(path.glob(g)) for g in WEIGHT_FILES):
        raise ConfigError(f"{path}: cannot load the weights (no *.safetensors file); is the checkpoint complete?")
    files.check_weights(path)
    for index in path.glob("*.index.json"):
        files.read_json(index, "weights index")
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as e:
        raise ConfigError(f"{path} is not a causal-LM checkpoint (model_type {config.model_type!r}): "
                          f"{first_line(e)}") from e
    except LOAD_ERRORS as e:
        raise ConfigError(f"{path}: cannot load the weights ({first_line(e)}); is the checkpoint complete?") from e


def load_tokenizer(path: Path):
    """AutoTokenizer.from_pretrained(path); a folder without tokenizer files is named as such."""
    from transformers import AutoTokenizer

    path = Path(path)
    present = [f for f in TOKENIZER_FILES if (path / f).is_file()]
    if not present:
        raise ConfigError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); copy them from the "
                          f"base model (tokenizer.save_pretrained), or re-run `ar2dlm convert`")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).exists():
            files.read_json(path / name, "tokenizer file")
    try:
        return AutoTokenizer.from_pretrained(path)
    except LOAD_ERRORS as e:
        raise ConfigError(f"{path}: cannot load its tokenizer from {', '.join(present)} ({first_line(e)})") from e


def check_adapter(path: Path) -> None:
    """adapter_config.json is a JSON object peft can read; the adapter weights are complete."""
    cfg_file = path / "adapter_config.json"
    raw = files.read_json(cfg_file, "adapter config")
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise ConfigError(f"adapter config {cfg_file} must be a JSON object written by peft (with peft_type); "
                          f"re-export the adapter")
    try:
        import warnings

        from peft import PeftConfig

        with warnings.catch_warnings():  # peft warns again when it loads the folder
            warnings.simplefilter("ignore")
            PeftConfig.from_peft_type(**raw)
    except LOAD_ERRORS as e:
        raise ConfigError(f"adapter config {cfg_file} is malformed: {first_line(e)}") from e
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        raise ConfigError(f"{path} has no adapter_model.safetensors; is the adapter folder complete?")
    files.check_safetensors(weights, "adapter weights")


def base_model_name(base: str | Path) -> str:
    """What a converted checkpoint or adapter records as its base: a bundled name as is, a path made absolute
    (so the folder loads from any working directory)."""
    from .bundled import is_bundled

    if is_bundled(str(base)):
        return str(base)
    return str(Path(base).expanduser().resolve())


def adapter_base(path: Path, settings: DiffusionConfig) -> Path:
    """The base directory an adapter folder names in its ar2dlm.json; errors say where the name came from."""
    from .bundled import is_bundled, resolve_base

    name, origin = settings.base_model, path / SETTINGS_FILE
    if not name:
        raise ConfigError(f"{origin}: base_model is empty; an adapter folder must name its base model")
    inside = path / name  # a base shipped inside the folder (context extension), relative to it
    if (inside / "config.json").is_file():
        return inside
    if is_bundled(name):
        return resolve_base(name)
    where = Path(name).expanduser()
    if (where / "config.json").is_file():  # absolute, or (older folders) relative to the working directory
        return where
    hint = ("it is a relative path: run from the directory the adapter was trained in, or " if not where.is_absolute()
            else "")
    raise ConfigError(f"base model {name!r} (base_model in {origin}) is not a checkpoint directory here; "
                      f"{hint}set base_model in {origin} to the base's absolute path or a bundled name")


def check_settings(lm, origin: Path) -> None:
    """Settings of ar2dlm.json that must fit the model they came with (and an architecture it decodes exactly:
    a checkpoint converted before `convert` refused it)."""
    from .architectures import check_architecture
    from ..nn.vocab import embedding_rows

    check_architecture(lm.model.config, str(origin.parent))
    s = lm.settings
    rows = embedding_rows(lm.model)
    if not 0 <= s.mask_token_id < rows:
        raise ConfigError(f"{origin}: mask_token_id {s.mask_token_id} is outside the model's vocabulary "
                          f"(0..{rows - 1}); re-run `ar2dlm convert`")
    ctx = lm.context_len
    K = s.draft_len or s.block_size
    if ctx is not None and max(K, s.block_size) >= ctx:
        raise ConfigError(f"{origin}: block_size {s.block_size} / draft_len {s.draft_len} must be below the "
                          f"model's context of {ctx} tokens")


def export(src, out, dtype: str = "bfloat16", force: bool = False) -> Path:
    """Copy an adapter folder into OUT with its weights cast to `dtype`, without tokenizer files.

    The tokenizer is rebuilt on load from the base model (plus the mask token,
    whose id is checked against ar2dlm.json), so OUT holds only
    adapter_config.json, adapter_model.safetensors and ar2dlm.json. OUT must
    not exist or be empty (force=True replaces it).
    """
    src, out = Path(src), Path(out)
    weights = src / "adapter_model.safetensors"
    if not (src / "adapter_config.json").is_file() or not weights.is_file():
        raise ConfigError(f"{src} is not an adapter folder (needs adapter_config.json and "
                          f"adapter_model.safetensors, as written to a run's final/)")
    settings = DiffusionConfig.load(src)
    if not settings.adapter:
        raise ConfigError(f"{src}: ar2dlm.json has no adapter kind; export takes a drafting or lora adapter folder")
    target = EXPORT_DTYPES.get(dtype)
    if target is None:
        raise ConfigError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    check_adapter(src)
    only_gitkeep = out.is_dir() and all(p.name == ".gitkeep" for p in out.iterdir())
    files.check_output_dir(out, force or only_gitkeep)
    tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in load_file(weights).items()}
    with files.output_dir(out, force or only_gitkeep) as tmp:
        config = files.read_json(src / "adapter_config.json", "adapter config")
        config["base_model_name_or_path"] = settings.base_model  # not a machine-specific path
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        settings.save(tmp)
    return out


def first_line(e: BaseException) -> str:
    """The first line of a loader's error (at most 300 characters), to quote in a ConfigError."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
