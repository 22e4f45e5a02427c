"""Run untrusted code (a model's completion plus its tests) behind an OS boundary.

The boundary is the kernel's, set up by bubblewrap (`bwrap`, Debian's `bubblewrap`; `make install` installs it
where it can) or, where bwrap is missing, by util-linux's `unshare` with sandbox_jail.py building the same view
(`isolation()` says which). Each run gets:
- its own mount namespace whose root is a fresh tmpfs holding only a read-only view of the system (/usr and the
  /bin, /lib links, a few files of /etc, the interpreter's own prefixes and this harness), a private /proc, a
  minimal /dev, and a private, size-limited /tmp holding the working directory `/tmp/run-<random>`: the only
  writable places, and none of them is the host's, so nothing the code writes outlives the run. The host's
  /root, /home, /work, /tmp, /dev/shm, sockets and the evaluator's files are simply not there;
- its own PID namespace whose PID 1 is the harness itself (bwrap --as-pid-1; unshare --fork): it sees only its
  own processes, and when the harness exits the kernel kills every process left in it (whatever it forked,
  setsid or not) before bwrap/unshare returns; a network namespace (a down loopback: no network), IPC and UTS
  namespaces, and a new session (no terminal to inject input into);
- no privileges: started as root, the run drops to uid/gid 65534 (`nobody`, no supplementary groups) with every
  capability set empty (bounding set included) before the interpreter starts; started as another user, a user
  namespace maps that (already unprivileged) user, with no capabilities left and no nested user namespaces.
  Either way `no_new_privs` is set, so no setuid program can give privileges back. It cannot remount, chown,
  mknod a device, or signal anything outside its PID namespace;
- a seccomp filter (`seccomp_filter`, x86_64 and aarch64) denying kernel keyrings (a key would outlive the run
  on the host), new namespaces, bpf, perf events, userfaultfd and io_uring;
- rlimits the harness sets on itself before the completion runs (address space, CPU seconds, size of any
  written file, no core files, processes when it runs as nobody), and, as a second line only, a Python audit
  hook refusing sockets, program starts, ctypes and writes outside the working directory (sandbox_harness.py);
- a wall-clock timeout, after which its PID 1, so its whole PID namespace (and bwrap's process group), is killed.

Where neither works (no user namespaces for a non-root user, no util-linux), there is no OS isolation:
`run_program` refuses unless the limits say `unsandboxed=True` (`ar2dlm eval --unsandboxed`), and then runs the
harness as the evaluator's own user on the host's filesystem with only the rlimits and the audit hook, which is
no security boundary (Python's docs say so). `isolation()` names what this machine has.

Pass/fail: a run passes only if the harness printed the run's random token, which it does only after
`program.py` ran to its end. Exiting early (`os._exit(0)`, `sys.exit(0)`), raising, being killed or
timing out all leave no token. The token reaches the harness on stdin and is never written to disk.
(A completion written to attack the harness, e.g. by walking the interpreter's frames, could still
find it and fake a pass: the token guards the score against wrong code, the OS boundary guards the host.)
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

from ..core.errors import ConfigError

HARNESS = Path(__file__).with_name("sandbox_harness.py")
HARNESS_INSIDE = "/ar2dlm/sandbox_harness.py"
JAIL = Path(__file__).with_name("sandbox_jail.py")
NOBODY = 65534
NPROC = 256  # processes of uid nobody (all its runs at once): a fork bomb fails fast instead of filling the table
ETC = ("/etc/ld.so.cache", "/etc/localtime", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/mime.types")


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
    """Largest file (stdout included) the run may write, in MiB; its private /tmp holds 4x that."""
    unsandboxed: bool = False
    """Run even where this machine has no OS isolation (then only rlimits and an audit hook guard the host)."""

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
    workdir: str  # the run's working directory (gone afterwards): its path names the run's processes


# ---------------------------------------------------------------------------- seccomp
# Denied system calls, per architecture: (AUDIT_ARCH, {name: number}). Kernel keyrings outlive the run (a key added
# to nobody's keyring stays on the host); new namespaces, bpf, perf events, userfaultfd and io_uring are kernel
# attack surface that no test program needs. clone3 says ENOSYS (its flags live in memory a filter cannot read), so
# libc falls back to clone, whose namespace flags the filter sees.
SYSCALLS = {
    "x86_64": (0xC000003E, {"add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "setns": 308,
                            "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "io_uring_setup": 425,
                            "io_uring_enter": 426, "io_uring_register": 427, "clone": 56, "clone3": 435}),
    "aarch64": (0xC00000B7, {"add_key": 217, "request_key": 218, "keyctl": 219, "unshare": 97, "setns": 268,
                             "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "io_uring_setup": 425,
                             "io_uring_enter": 426, "io_uring_register": 427, "clone": 220, "clone3": 435}),
}
CLONE_NEW = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """A classic-BPF seccomp program (struct sock_filter[]) denying SYSCALLS with EPERM; None on other machines.

    1. Another architecture's calling convention (e.g. 32-bit calls on x86_64): kill.
    2. x32 calls on x86_64 (nr with bit 30 set): EPERM.
    3. clone with any CLONE_NEW* flag: EPERM; clone3: ENOSYS.
    4. The other listed calls: EPERM. Everything else: allowed."""
    arch = SYSCALLS.get(machine or platform.machine())
    if arch is None:
        return None
    audit, nr = arch
    ld_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill, eperm, enosys = 0x7FFF0000, 0x80000000, 0x00050000 | 1, 0x00050000 | 38
    denied = [n for name, n in nr.items() if name not in ("clone", "clone3")]

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    prog = [op(ld_abs, 4), op(jeq, audit, 1, 0), op(ret, kill), op(ld_abs, 0)]  # 1.
    if audit == 0xC000003E:
        prog += [op(jge, 0x40000000, 0, 1), op(ret, eperm)]  # 2.
    prog += [op(jeq, nr["clone3"], 0, 1), op(ret, enosys),  # 3.
             op(jeq, nr["clone"], 0, 4), op(ld_abs, 16), op(jset, CLONE_NEW, 0, 1), op(ret, eperm), op(ret, allow)]
    for n in denied:  # 4.
        prog += [op(jeq, n, 0, 1), op(ret, eperm)]
    return b"".join(prog + [op(ret, allow)])


# ---------------------------------------------------------------------------- what this machine has
@lru_cache(maxsize=1)
def isolation() -> str:
    """'bwrap' or 'unshare' when that sandbox works here (bwrap first), else 'none'."""
    return next((kind for kind in ("bwrap", "unshare") if works(kind)), "none")


@cache
def works(kind: str) -> bool:
    """Whether the `kind` sandbox runs a program here: namespaces, the drop of privileges, interpreter, harness,
    token. Root can drop to nobody only through setpriv (util-linux); unshare's jail always execs it."""
    if shutil.which(kind) is None or ((os.geteuid() == 0 or kind == "unshare") and shutil.which("setpriv") is None):
        return False
    try:
        return _RUNS[kind]("pass\n", SandboxLimits(timeout=30.0)).passed
    except OSError:
        return False


def describe_isolation() -> str:
    """One line for `ar2dlm eval`: which isolation model code gets on this machine."""
    kind = isolation()
    if kind == "none":
        return ("none: neither bubblewrap nor unshare can build a sandbox here (install Debian's `bubblewrap`; a "
                "non-root user needs user namespaces); model code would run on this host, guarded by rlimits and an "
                "audit hook only")
    who = f"uid {NOBODY}, no capabilities" if os.geteuid() == 0 else "your uid in a user namespace, no capabilities"
    tool = "bubblewrap" if kind == "bwrap" else "unshare (bubblewrap missing or not working)"
    bpf = ", seccomp (no keyrings, namespaces, bpf, io_uring)" if seccomp_filter() else ""
    return (f"{tool}: read-only system view, private /tmp and working directory, mount/PID/network/IPC/UTS "
            f"namespaces, {who}, no_new_privs{bpf}, rlimits, wall-clock kill")


def require_isolation(unsandboxed: bool) -> str:
    """The isolation line, or a ConfigError when there is none and the user did not accept running without."""
    if isolation() == "none" and not unsandboxed:
        raise ConfigError("this machine has no OS isolation for model-written code (neither bubblewrap nor unshare "
                          "can start a sandbox: `apt-get install bubblewrap`, or allow user namespaces). Running it "
                          "anyway puts your files and processes within its reach: add --unsandboxed to accept that "
                          "risk",
                          field="unsandboxed")
    return describe_isolation()


def _system_view() -> tuple[list, list]:
    """What the sandbox sees of the host, read-only: ([(target, link)], [path]). /usr and the /bin, /lib links
    (or directories), a few /etc files, and the interpreter's prefixes that are not already inside /usr."""
    links, ro = [], []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/usr"):
        if os.path.islink(top):
            links.append((os.readlink(top), top))
        elif os.path.isdir(top):
            ro.append(top)
    ro += [f for f in ETC if os.path.exists(f)]
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                             os.path.dirname(os.path.realpath(sys.executable)))}
    bound = ["/usr"]
    for p in sorted(prefixes):  # shortest first: a prefix inside another (or inside /usr) is already there
        if p != "/" and not any(p == q or p.startswith(q + "/") for q in bound):
            ro.append(p)
            bound.append(p)
    return links, ro


def _bwrap_argv(workdir: str, program_fd: int, harness_fd: int, info_fd: int, seccomp_fd: int | None,
                tmp_bytes: int) -> list:
    """bwrap's command line up to the program it starts (as nobody when we are root)."""
    root = os.geteuid() == 0
    argv = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--as-pid-1", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    # root: no user namespace (one would map nobody back onto root's files), so keep the caps setpriv needs to
    # drop to nobody and empty every capability set; another user: bwrap's own user namespace, no nested ones
    argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"] if root else \
        ["--unshare-user", "--disable-userns"]
    argv += ["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []
    # /proc, /dev and /tmp first: an interpreter installed under /tmp (a venv in a checkout there) is bound
    # on top of the private /tmp below, not hidden by it
    argv += ["--info-fd", str(info_fd), "--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(tmp_bytes), "--tmpfs", "/tmp"]
    made = {"/", "/tmp"}

    def parents(path: str) -> list:
        out = []  # bwrap makes missing parents 0700: nobody could not walk through them
        for p in reversed(Path(path).parents):
            if str(p) not in made:
                made.add(str(p))
                out += ["--perms", "0755", "--dir", str(p)]
        return out

    links, ro = _system_view()
    for target, path in links:
        argv += ["--symlink", target, path]
    for path in ro:
        argv += [*parents(path), "--ro-bind", path, path]
    # the harness and the program are copied in (readable by nobody whatever the checkout's umask)
    argv += [*parents(HARNESS_INSIDE), "--perms", "0444", "--ro-bind-data", str(harness_fd), HARNESS_INSIDE,
             "--perms", "0777", "--dir", workdir]
    argv += ["--perms", "0644", "--file", str(program_fd), f"{workdir}/program.py",
             "--remount-ro", "/", "--chdir", workdir, "--"]  # the root tmpfs too (a user's own in a user namespace)
    if root:
        argv += ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
                 "--bounding-set=-all", "--no-new-privs"]
    return argv


# ---------------------------------------------------------------------------- one run
def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> Outcome:
    """Run `program` (Python source) in the sandbox; passed iff it ran to its end."""
    kind = isolation()
    if kind == "none":
        require_isolation(limits.unsandboxed)
        return _run_unsandboxed(program, limits)
    return _RUNS[kind](program, limits)


def _run_bwrap(program: str, limits: SandboxLimits) -> Outcome:
    token = secrets.token_hex(16)
    workdir = f"/tmp/run-{secrets.token_hex(8)}"
    nproc = NPROC if os.geteuid() == 0 else 0  # another user's count includes all their own processes
    bpf = seccomp_filter()
    with tempfile.TemporaryFile() as src, open(HARNESS, "rb") as harness, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as filt:
        for f, data in ((src, program.encode()), (filt, bpf or b"")):
            f.write(data)
            f.flush()
            f.seek(0)
        info_r, info_w = os.pipe()
        try:
            fds = (src.fileno(), harness.fileno(), info_w, filt.fileno() if bpf else None)
            cmd = [*_bwrap_argv(workdir, *fds, 4 * limits.file_mb * 2**20),
                   sys.executable, "-I", "-B", HARNESS_INSIDE, *_harness_args(workdir, limits, nproc)]
            timed_out = _start_and_wait(cmd, token, limits.timeout, out, err, {"HOME": workdir, "TMPDIR": workdir},
                                        pass_fds=[fd for fd in fds if fd is not None],
                                        pid1=lambda proc: _bwrap_child(info_r))
        finally:
            os.close(info_r)
            os.close(info_w)
        return _outcome(token, timed_out, _tail(out), _tail(err), limits, workdir)


def _run_unshare(program: str, limits: SandboxLimits) -> Outcome:
    """unshare's namespaces; sandbox_jail.py (their PID 1) builds the same view as bwrap's, then runs the harness."""
    token = secrets.token_hex(16)
    workdir = f"/tmp/run-{secrets.token_hex(8)}"
    root = os.geteuid() == 0
    newroot = tempfile.mkdtemp(prefix="ar2dlm-jail-")  # stays empty on the host: the tmpfs is mounted privately
    try:
        with tempfile.TemporaryFile() as src, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            src.write(program.encode())
            src.flush()
            src.seek(0)
            links, ro = _system_view()
            spec = {"newroot": newroot, "workdir": workdir, "program_fd": src.fileno(), "harness": str(HARNESS),
                    "harness_inside": HARNESS_INSIDE, "ro": ro, "symlinks": links,
                    "tmp_bytes": 4 * limits.file_mb * 2**20, "nobody": NOBODY if root else None,
                    "setpriv": shutil.which("setpriv"), "seccomp": (seccomp_filter() or b"").hex(),
                    "exec": [sys.executable, "-I", "-B", HARNESS_INSIDE,
                             *_harness_args(workdir, limits, NPROC if root else 0)]}
            cmd = ["unshare", "--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child",
                   "--propagation", "private", *([] if root else ["--user", "--map-root-user"]),
                   sys.executable, "-I", "-S", "-B", str(JAIL), json.dumps(spec)]
            timed_out = _start_and_wait(cmd, token, limits.timeout, out, err, {"HOME": workdir, "TMPDIR": workdir},
                                        pass_fds=(src.fileno(),), pid1=_only_child)
            return _outcome(token, timed_out, _tail(out), _tail(err), limits, workdir)
    finally:
        shutil.rmtree(newroot, ignore_errors=True)


def _run_unsandboxed(program: str, limits: SandboxLimits) -> Outcome:
    """No OS boundary: the harness runs on the host in a temporary directory (deleted afterwards)."""
    token = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="ar2dlm-sandbox-")
    try:
        Path(workdir, "program.py").write_text(program)
        cmd = [sys.executable, "-I", "-B", str(HARNESS), *_harness_args(workdir, limits, 0)]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            timed_out = _start_and_wait(cmd, token, limits.timeout, out, err,
                                        {"HOME": workdir, "TMPDIR": workdir}, cwd=workdir)
            return _outcome(token, timed_out, _tail(out), _tail(err), limits, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _harness_args(workdir: str, limits: SandboxLimits, nproc: int) -> list[str]:
    cpu = limits.cpu_seconds or int(limits.timeout) + 1
    return [workdir, str(limits.memory_mb * 2**20), str(cpu), str(limits.file_mb * 2**20), str(nproc)]


def _start_and_wait(cmd: list, token: str, timeout: float, out, err, env: dict, cwd: str | None = None,
                    pass_fds=(), pid1=None) -> bool:
    """Start the run in its own process group, hand it the token, wait; kill everything left. True if timed out.
    pid1(proc): the host pid of the run's PID 1, asked only while `proc` (its parent) is unreaped."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **env}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=cwd, env=env,
                            process_group=0, pass_fds=pass_fds)
    try:
        proc.stdin.write((token + "\n").encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    try:
        proc.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        if pid1 is not None:
            _kill_namespace(pid1(proc))
    _kill_group(proc)  # also after a normal exit: forks may linger in the group (unsandboxed runs)
    return timed_out


def _bwrap_child(info_r: int) -> int | None:
    """The sandbox's PID 1 as bwrap's --info-fd names it."""
    os.set_blocking(info_r, False)
    try:
        return json.loads(os.read(info_r, 4096) or b"{}").get("child-pid")
    except (OSError, ValueError):
        return None


def _only_child(proc: subprocess.Popen) -> int | None:
    """unshare --fork's one child: the namespace's PID 1."""
    try:
        return int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _kill_namespace(pid: int | None, grace: float = 5.0) -> None:
    """SIGKILL the sandbox's PID 1 and wait until it has exited: the kernel kills every other process of its
    namespace before that. Its parent (bwrap or unshare) is unreaped, so the pid cannot have been reused; a pidfd
    then holds on to that very process."""
    try:
        pidfd = os.pidfd_open(pid) if pid else None
    except OSError:
        pidfd = None
    if pidfd is None:
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], grace)  # readable once it has exited
    except OSError:
        pass
    finally:
        os.close(pidfd)


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


def _outcome(token: str, timed_out: bool, stdout: bytes, stderr: bytes, limits: SandboxLimits, workdir: str):
    if timed_out:
        return Outcome(False, "timeout", f"killed after {limits.timeout:g}s wall-clock", workdir)
    passed = token.encode() in stdout.splitlines()[-1:]
    detail = stderr.decode(errors="replace").strip()[-1000:]
    return Outcome(passed, "passed" if passed else "failed", "" if passed else detail, workdir)


def _tail(f, n: int = 65536) -> bytes:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - n))
    return f.read().rstrip(b"\n")


_RUNS = {"bwrap": _run_bwrap, "unshare": _run_unshare}
