"""Checkpoint folders: reading, checking and writing them. Every loader of a model, tokenizer or adapter reads
its files through here.

`DiffusionLM.from_pretrained` (converted checkpoints, adapter folders),
`convert.load_base` and training's `model_to_train` call these, so a
truncated weight file, a malformed JSON file, a folder without tokenizer
files or a base path that only made sense elsewhere is a `ConfigError` that
names the file, never a traceback from deep inside transformers or peft.
Each check runs once, before the expensive step it protects: the settings and
an adapter's files before anything loads, the architecture (config.json
alone) before the weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..core import files
from ..core.errors import ConfigError
from ..nn.vocab import embedding_rows
from . import architectures, bundled
from .settings import SETTINGS_FILE, DiffusionConfig

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError)
"""What transformers and peft raise for unreadable or inconsistent files."""


class NotConvertedError(ConfigError):
    """A model without ar2dlm.json where a converted one is needed."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(f"{path} has no {SETTINGS_FILE}: it is an unconverted AR model. Convert it with "
                         f"`ar2dlm convert {path} OUT_DIR`, or load it with allow_ar=True for plain AR decoding")


# ---------------------------------------------------------------------------- settings
def read_settings(folder: Path, allow_ar: bool = False) -> tuple[DiffusionConfig | None, Path]:
    """(the settings of ar2dlm.json, the folder the weights load from) of a checkpoint or adapter folder.

    The weights load from `folder` itself, or from an adapter folder's base
    (its `base_model`), checked here with the adapter's own files. Settings
    None: a plain AR model, accepted only with allow_ar=True.
    """
    if not folder.is_dir():
        raise ConfigError(f"{folder} is a file; give a checkpoint directory (config.json, weights, tokenizer)")
    if not (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
        raise ConfigError(f"{folder} is not a Hugging Face checkpoint directory (no config.json)")
    if not (folder / SETTINGS_FILE).exists():
        if not allow_ar:
            raise NotConvertedError(folder)
        return None, folder
    settings = DiffusionConfig.load(folder)
    if not settings.adapter:
        return settings, folder
    if not (folder / "adapter_config.json").exists():
        raise ConfigError(f"{folder}: ar2dlm.json says adapter={settings.adapter!r} but adapter_config.json is "
                          f"missing")
    check_adapter(folder)
    return settings, adapter_base(folder, settings)


def check_adapter(folder: Path) -> None:
    """adapter_config.json is a JSON object peft can read; the adapter weights are complete."""
    from peft import PeftConfig

    cfg_file = folder / "adapter_config.json"
    raw = files.read_json(cfg_file, "adapter config")
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise ConfigError(f"adapter config {cfg_file} must be a JSON object written by peft (with peft_type); "
                          f"re-export the adapter")
    try:
        with warnings.catch_warnings():  # peft warns again when it loads the folder
            warnings.simplefilter("ignore")
            PeftConfig.from_peft_type(**raw)
    except LOAD_ERRORS as e:
        raise ConfigError(f"adapter config {cfg_file} is malformed: {first_line(e)}") from e
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise ConfigError(f"{folder} has no adapter_model.safetensors; is the adapter folder complete?")
    files.check_safetensors(weights, "adapter weights")


def adapter_base(folder: Path, settings: DiffusionConfig) -> Path:
    """The base directory an adapter folder names in its ar2dlm.json; errors say where the name came from."""
    name, origin = settings.base_model, folder / SETTINGS_FILE
    if not name:
        raise ConfigError(f"{origin}: base_model is empty; an adapter folder must name its base model")
    inside = folder / name  # a base shipped inside the folder (context extension), relative to it
    if (inside / "config.json").is_file():
        return inside
    if bundled.is_bundled(name):
        return bundled.resolve_base(name)
    where = Path(name).expanduser()
    if (where / "config.json").is_file():  # absolute, or (older folders) relative to the working directory
        return where
    hint = ("it is a relative path: run from the directory the adapter was trained in, or " if not where.is_absolute()
            else "")
    raise ConfigError(f"base model {name!r} (base_model in {origin}) is not a checkpoint directory here; "
                      f"{hint}set base_model in {origin} to the base's absolute path or a bundled name")


def base_model_name(base: str | Path) -> str:
    """What a converted checkpoint or adapter records as its base: a bundled name as is, a path made absolute
    (so the folder loads from any working directory)."""
    if bundled.is_bundled(str(base)):
        return str(base)
    return str(Path(base).expanduser().resolve())


# ---------------------------------------------------------------------------- architecture
def read_config(folder: Path):
    """The config.json of a causal LM, read alone (no weights)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    files.read_json(folder / "config.json", "model config")  # not UTF-8, a directory, not JSON: named
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{folder}: unreadable config.json ({first_line(e)})") from e
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(f"{folder} is not a causal-LM checkpoint (model_type {config.model_type!r}): transformers "
                          f"has no causal-LM class for it")
    return config


def check_architecture(folder: Path, settings: DiffusionConfig | None = None, exact: bool = True,
                       origin: Path | None = None):
    """The config of `folder`, checked before any weight loads; returns it.

    A causal LM; with `exact` (a model to convert or to decode with drafts)
    one whose every layer ar2dlm decodes exactly (architectures.py); with
    `settings` (from `origin`, named in the error), one whose context holds
    their blocks and drafts.
    """
    config = read_config(folder)
    if exact:
        architectures.check_architecture(config, str(folder))
    ctx = getattr(config, "max_position_embeddings", None)
    if settings is not None and ctx is not None:
        K = settings.decode_defaults()[0]
        if max(K, settings.block_size) >= ctx:
            draft = f" / draft_len {settings.draft_len}" if settings.draft_len else ""
            raise ConfigError(f"{f'{origin}: ' if origin else ''}block_size {settings.block_size}{draft} must be "
                              f"below the model's context of {ctx} tokens",
                              field="draft_len" if K > settings.block_size else "block_size")
    return config


# ---------------------------------------------------------------------------- weights and tokenizer
def load_weights(folder: Path, config, **kwargs):
    """AutoModelForCausalLM.from_pretrained(folder, **kwargs) for the `config` that `check_architecture` read
    from it, with the weight files checked first."""
    from transformers import AutoModelForCausalLM

    if not any(any(folder.glob(g)) for g in WEIGHT_FILES):
        raise ConfigError(f"{folder}: cannot load the weights (no *.safetensors file); is the checkpoint complete?")
    files.check_weights(folder)
    for index in folder.glob("*.index.json"):
        files.read_json(index, "weights index")
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except ValueError as e:
        raise ConfigError(f"{folder} is not a causal-LM checkpoint (model_type {config.model_type!r}): "
                          f"{first_line(e)}") from e
    except LOAD_ERRORS as e:
        raise ConfigError(f"{folder}: cannot load the weights ({first_line(e)}); is the checkpoint complete?") from e


def attention_implementation(config, wanted: str) -> str:
    """`wanted`, or "eager" where the model class has no sdpa attention (gpt-oss: its attention sinks)."""
    from transformers import AutoModelForCausalLM

    mapping = getattr(AutoModelForCausalLM, "_model_mapping", None)
    cls = mapping.get(type(config), None) if mapping is not None else None
    if wanted == "sdpa" and cls is not None and getattr(cls, "_supports_sdpa", True) is False:
        return "eager"
    return wanted


def load_tokenizer(folder: Path):
    """AutoTokenizer.from_pretrained(folder); a folder without tokenizer files is named as such."""
    from transformers import AutoTokenizer

    present = [f for f in TOKENIZER_FILES if (folder / f).is_file()]
    if not present:
        raise ConfigError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); copy them from the "
                          f"base model (tokenizer.save_pretrained), or re-run `ar2dlm convert`")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            files.read_json(folder / name, "tokenizer file")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except LOAD_ERRORS as e:
        raise ConfigError(f"{folder}: cannot load its tokenizer from {', '.join(present)} ({first_line(e)})") from e


def check_mask_token(model, settings: DiffusionConfig, origin: Path) -> None:
    """The mask token that `settings` (from `origin`) name is a row of the loaded model's vocabulary."""
    rows = embedding_rows(model)
    if not 0 <= settings.mask_token_id < rows:
        raise ConfigError(f"{origin}: mask_token_id {settings.mask_token_id} is outside the model's vocabulary "
                          f"(0..{rows - 1}); re-run `ar2dlm convert`", field="mask_token_id")


# ---------------------------------------------------------------------------- errors
def first_line(e: BaseException) -> str:
    """The first line of a loader's error (at most 300 characters), to quote in a ConfigError."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
