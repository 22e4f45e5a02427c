"""Loading checkpoint files: every loader of a model, tokenizer or adapter goes through here.

`DiffusionLM.from_pretrained` (converted checkpoints, adapter folders),
`convert.load_base` and training's `load_model` all call these, so a
truncated weight file, a malformed JSON file, a folder without tokenizer
files or a base path that only made sense elsewhere is a `ConfigError` that
names the file, never a traceback from deep inside transformers or peft.
"""

from __future__ import annotations

from pathlib import Path

from ..core import files
from ..core.errors import ConfigError
from .settings import SETTINGS_FILE, DiffusionConfig

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# what transformers and peft raise for unreadable or inconsistent files
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError)


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
        raise ConfigError(f"{path}: unreadable config.json ({_first_line(e)})") from e
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
                          f"{_first_line(e)}") from e
    except _LOAD_ERRORS as e:
        raise ConfigError(f"{path}: cannot load the weights ({_first_line(e)}); is the checkpoint complete?") from e


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
    except _LOAD_ERRORS as e:
        raise ConfigError(f"{path}: cannot load its tokenizer from {', '.join(present)} ({_first_line(e)})") from e


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
    except _LOAD_ERRORS as e:
        raise ConfigError(f"adapter config {cfg_file} is malformed: {_first_line(e)}") from e
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        raise ConfigError(f"{path} has no adapter_model.safetensors; is the adapter folder complete?")
    files.check_safetensors(weights, "adapter weights")


def load_adapter(lm, path: Path) -> None:
    """adapter.load, with peft's errors about the folder's files turned into a ConfigError naming it."""
    from . import adapter

    try:
        adapter.load(lm, path)
    except ConfigError:
        raise
    except _LOAD_ERRORS as e:
        raise ConfigError(f"{path}: cannot apply the adapter in adapter_config.json / adapter_model.safetensors "
                          f"to its base ({_first_line(e)})") from e


def base_model_name(base: str | Path) -> str:
    """What a converted checkpoint or adapter records as its base: a bundled name as is, a path made absolute
    (so the folder loads from any working directory)."""
    from .bundled import BUNDLED

    if str(base) in BUNDLED and not Path(base).exists():
        return str(base)
    return str(Path(base).expanduser().resolve())


def adapter_base(path: Path, settings: DiffusionConfig) -> Path:
    """The base directory an adapter folder names in its ar2dlm.json; errors say where the name came from."""
    from .bundled import BUNDLED, resolve_base

    name, origin = settings.base_model, path / SETTINGS_FILE
    if not name:
        raise ConfigError(f"{origin}: base_model is empty; an adapter folder must name its base model")
    inside = path / name  # a base shipped inside the folder (context extension), relative to it
    if (inside / "config.json").is_file():
        return inside
    if name in BUNDLED and not Path(name).exists():
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
    from ..decode.engine import _embedding_rows

    check_architecture(lm.model.config, str(origin.parent))
    s = lm.settings
    rows = _embedding_rows(lm.model)
    if not 0 <= s.mask_token_id < rows:
        raise ConfigError(f"{origin}: mask_token_id {s.mask_token_id} is outside the model's vocabulary "
                          f"(0..{rows - 1}); re-run `ar2dlm convert`", field="mask_token_id")
    ctx = lm.context_len
    K = s.decode_defaults()[0]
    if ctx is not None and max(K, s.block_size) >= ctx:
        raise ConfigError(f"{origin}: block_size {s.block_size} / draft_len {s.draft_len} must be below the "
                          f"model's context of {ctx} tokens", field="draft_len" if K > s.block_size else "block_size")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
