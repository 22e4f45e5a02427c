"""Every user file goes in and out through here, so every failure names the file.

Reading: `read_text` / `read_json` / `open_text` turn OSError (missing, a
directory, no permission) and UnicodeDecodeError into a `ConfigError` that
names the file and says what was expected. `check_safetensors` reads a
safetensors header (cheap) so a truncated or corrupt weight file is named
before a loader fails deep inside.

Writing: `output_dir` writes a directory into a temporary sibling and renames
it into place; `write_text` does the same for one file. Both refuse to replace
anything that exists unless `force=True`, and the message says how. `force`
replaces an old output, never an input: every writer passes the paths it reads
(`inputs`), and `check_not_input` refuses an output that is one of them, lies
inside one, or (a directory that is replaced whole) contains one. Paths are
compared after resolving symlinks, so a link to an input is that input.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .arguments import shown
from .errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The installed ar2dlm package."""
ASSETS = PACKAGE_DIR / "assets"
"""Files shipped in the package: chat instructions, the bundled drafter, the ZAYA1-8B config, ifeval_lite."""


# ---------------------------------------------------------------------------- reading
def _reason(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "does not exist"
    if isinstance(e, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(e, NotADirectoryError):
        return "has a file where a directory is expected in its path"
    if isinstance(e, PermissionError):
        return "cannot be read (permission denied)"
    if isinstance(e, UnicodeDecodeError):
        return f"is not UTF-8 text (byte {e.start}: {e.reason})"
    return f"cannot be read ({e.strerror or e})" if isinstance(e, OSError) else f"cannot be read ({e})"


def read_text(path: str | Path, what: str = "file") -> str:
    """The text of a UTF-8 file; ConfigError naming it (and `what` it should be) otherwise."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} {_reason(e)}") from e


def read_json(path: str | Path, what: str = "JSON file", hint: str = ""):
    """The parsed JSON of a file; ConfigError naming it (and ending with `hint`, what to do) otherwise."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid JSON (line {e.lineno}: {e.msg}){hint}") from e


@contextlib.contextmanager
def open_text(path: str | Path, what: str = "file") -> Iterator[IO[str]]:
    """A UTF-8 text file (``.gz`` decompressed) open for reading; read errors inside name it."""
    import gzip

    path = Path(path)
    try:
        f = gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else path.open(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} {_reason(e)}") from e
    try:
        with f:
            yield f
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise ConfigError(f"{what} {path} {_reason(e) if isinstance(e, UnicodeDecodeError) else f'is corrupt ({e})'}") \
            from e
    except OSError as e:
        raise ConfigError(f"{what} {path} {_reason(e)}") from e


def check_safetensors(path: str | Path, what: str = "weights file") -> None:
    """Read a safetensors header and check the file holds all the bytes it announces."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 <= n <= size - 8 else None
    except (OSError, ValueError) as e:  # ValueError: JSON or UTF-8 of a garbled header
        raise ConfigError(f"{what} {path} {_reason(e) if isinstance(e, OSError) else 'is corrupt (bad header)'}; "
                          f"re-create or re-download it") from e
    if not isinstance(header, dict):
        raise ConfigError(f"{what} {path} is not a safetensors file (bad header); re-create or re-download it")
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end != size:
        raise ConfigError(f"{what} {path} is truncated or corrupt ({size} bytes, its header announces "
                          f"{8 + n + end}); re-create or re-download it")


def check_weights(directory: str | Path) -> None:
    """check_safetensors on every *.safetensors file of a checkpoint directory."""
    for f in sorted(Path(directory).glob("*.safetensors")):
        check_safetensors(f)


# ---------------------------------------------------------------------------- writing
def check_path(value, name: str) -> Path:
    """`value` as a Path if it is a str or os.PathLike; else a ConfigError naming the argument `name`."""
    if isinstance(value, (str, os.PathLike)) and str(os.fspath(value)):
        return Path(value)
    raise ConfigError(f"{name} must be a path (str or os.PathLike), got {shown(value)}", field=name)


def check_not_input(out: str | Path, inputs, what: str = "output", replaces: bool = True,
                    field: str | None = "out") -> Path:
    """Refuse an output that is an input, lies inside one or, when `replaces` (a directory replaced whole),
    contains one; `inputs` are the paths the command reads (None entries are skipped)."""
    out = Path(out)
    target = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "lies inside"
        elif replaces and target in source.parents:
            relation = "contains"
        else:
            continue
        same = "" if str(given) == str(source) else f" ({source})"
        raise ConfigError(f"{what} {out} {relation} the input {given}{same}: writing it would change the input; "
                          f"choose an output outside every input (force=True replaces old outputs, never inputs)",
                          field=field)
    return out


def _exists_message(path: Path, what: str) -> str:
    return (f"{what} {path} already exists and would be overwritten; choose another path, or pass force=True "
            f"to replace it")


def check_output_dir(out: str | Path, force: bool = False, what: str = "output directory", inputs=()) -> Path:
    """Check that `out` can become a new directory (missing or empty, or force=True; never a file, never an
    input, inside one or around one)."""
    out = check_not_input(check_path(out, "out"), inputs, what)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what} {out} is a file, not a directory; choose a directory path", field="out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{what} {out} exists and is not empty; choose another path, or pass force=True to "
                          f"replace it", field="out")
    if not out.exists() and out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"{what} {out}: {out.parent} is a file, not a directory", field="out")
    return out


@contextlib.contextmanager
def output_dir(out: str | Path, force: bool = False, what: str = "output directory", inputs=()) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to write into; on success it becomes `out` in one rename.

    An interrupted or failed write leaves `out` as it was; `inputs` as in `check_output_dir`.
    """
    out = check_output_dir(out, force, what, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise ConfigError(f"{what} {out} cannot be created ({e.strerror or e})") from e
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_file(path: str | Path, force: bool = False, what: str = "output file", inputs=()) -> Path:
    """Check that `path` can be written (new, or force=True; never a directory, an input or inside one)."""
    path = check_not_input(check_path(path, "path"), inputs, what, replaces=False)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory, not a file", field="out")
    if path.exists() and not force:
        raise ConfigError(_exists_message(path, what), field="out")
    if path.parent.exists() and not path.parent.is_dir():
        raise ConfigError(f"{what} {path}: {path.parent} is a file, not a directory", field="out")
    return path


def write_text(path: str | Path, text: str, force: bool = False, what: str = "output file", inputs=()) -> Path:
    """Write a file atomically (temporary sibling, then rename); refuse to replace one unless force=True."""
    path = check_output_file(path, force, what, inputs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be written ({e.strerror or e})") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
