"""Ctrl-C and SIGTERM: one exit-code policy for every verb.

A verb stops where it is, saves what it saves (train a checkpoint, distill and
eval the records written so far, convert nothing half-written) and the process
exits 130 on SIGINT, 143 on SIGTERM: 128 + the signal, as a shell reports a
process it killed, so that `ar2dlm train ... && ar2dlm merge ...` stops.
SIGTERM is raised as `Terminated`, a KeyboardInterrupt, so every `except
KeyboardInterrupt` and `finally` on the way runs for it too.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from typing import Callable, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is."""


def _terminate(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside, SIGTERM raises Terminated (in the main thread; elsewhere signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def exit_code(e: KeyboardInterrupt, name: str = "ar2dlm") -> int:
    """Say that `name` was interrupted, by which signal; return 130 (SIGINT) or 143 (SIGTERM)."""
    term = isinstance(e, Terminated)
    print(f"\n{name}: interrupted ({'SIGTERM' if term else 'SIGINT'})", file=sys.stderr, flush=True)
    return 128 + (signal.SIGTERM if term else signal.SIGINT)


def exit_codes(main: Callable[..., int]) -> Callable[..., int]:
    """A command-line entry point under this policy: SIGTERM raises Terminated inside, and an interrupted
    command returns its exit code instead of a traceback."""
    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        with sigterm_raises():
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt as e:
                return exit_code(e)
    return run
