"""The `ar2dlm` command's first instructions, before the verbs and their imports load (several seconds).

`ar2dlm serve` stops on SIGTERM or SIGINT with exit 0 whenever the signal comes, as a drained server does: from
here until the server installs its own handlers (while it imports, binds and loads the model) the process says
it stopped before it was up and exits 0. Every other verb keeps the default handling.
"""

from __future__ import annotations

import os
import signal
import sys


def _stopped(sig, frame) -> None:
    print("serve: stopped before it was up", file=sys.stderr, flush=True)
    os._exit(0)  # in the middle of an import: run no interpreter shutdown over half-loaded extensions


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stopped)
    from .cli import main as run

    return run()
