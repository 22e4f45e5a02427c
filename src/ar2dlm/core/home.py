"""Where ar2dlm keeps what it makes once per machine: the bundled base, cost tables, built kernels, checks."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError


def ar2dlm_home() -> Path:
    """``$AR2DLM_HOME``, or ``~/.cache/ar2dlm`` when unset or empty; a value that cannot be a directory is
    refused, naming the variable."""
    home = os.environ.get("AR2DLM_HOME")
    if not home:
        return Path.home() / ".cache" / "ar2dlm"
    path = Path(home).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"environment variable AR2DLM_HOME={home} is a file, not a directory: point it at a "
                          f"directory for ar2dlm's cache, or unset it to use ~/.cache/ar2dlm", field="AR2DLM_HOME")
    return path
