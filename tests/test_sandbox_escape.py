"""Completions that try to leave a mark on the host, each checked from outside that the host is unchanged.

The boundary is the OS (sandbox.py), so every route runs with the harness as shipped and with its audit hook
taken out (a copy of the harness without `sys.addaudithook`), which shows the OS alone contains it; and under
each sandbox that works on this machine (bubblewrap, unshare + sandbox_jail.py).

Oracles, all read by this process outside the sandbox: a canary directory the test owns (listing, type, mode,
owner, size, mtime and SHA-256 of every entry, symlink targets), the evaluator's own files (the harness, the
package, the interpreter's prefix), names that must not appear in /tmp, /dev/shm, /var/tmp and site-packages,
processes (none whose command line carries the run's mark may outlive it; a process of ours it tries to kill
stays alive), the kernel's keys of the sandbox's uid (/proc/key-users), servers of ours it tries to reach, and
this process's environment and working directory.
"""

from __future__ import annotations

import hashlib
import os
import platform
import secrets
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from ar2dlm.evaluate import sandbox as S

BACKENDS = [kind for kind in ("bwrap", "unshare") if S.works(kind)]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no OS isolation (bubblewrap, unshare) on this machine")
LIMITS = S.SandboxLimits(timeout=5.0, memory_mb=512)
# started as root, the run drops every capability set; another user's bwrap leaves the (harmless) bounding set
CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapAmb", *(("CapBnd",) if os.geteuid() == 0 else ()))
EVALUATOR_FILES = [S.HARNESS, Path(S.__file__), Path(sys.executable).resolve(), Path(os.__file__)]


def state(root: Path) -> dict:
    """Everything about a tree that a write, link, rename, chmod or touch would change."""
    out = {}
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        body = os.readlink(path) if path.is_symlink() else \
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                            st.st_nlink, body)
    return out


def digest(paths) -> dict:
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths}


@pytest.fixture(params=[(kind, hook) for kind in BACKENDS or ["none"] for hook in ("hook", "no-hook")],
                ids=lambda p: "-".join(p))
def harness(request, tmp_path, monkeypatch):
    kind, hook = request.param
    monkeypatch.setattr(S, "isolation", lambda: kind)
    if hook == "no-hook":
        bare = tmp_path / "harness_without_hook.py"
        source = S.HARNESS.read_text()
        assert "    sys.addaudithook(hook)\n" in source
        bare.write_text(source.replace("    sys.addaudithook(hook)\n", ""))
        monkeypatch.setattr(S, "HARNESS", bare)
    return request.param


@pytest.fixture
def canary(tmp_path):
    """A directory the test owns, world-writable so that even nobody could write it if it could reach it."""
    root = tmp_path / "canary"
    (root / "sub").mkdir(parents=True)
    (root / "file.txt").write_text("canary\n")
    (root / "sub" / "inner.txt").write_text("inner\n")
    os.symlink("file.txt", root / "link")
    for p in (root, root / "sub", root / "file.txt", root / "sub" / "inner.txt", tmp_path):
        p.chmod(0o777 if p.is_dir() else 0o666)
    return root


def attempts(*codes: str) -> str:
    """A program that tries each snippet, whatever the one before did, then ends (so it passes if not killed)."""
    body = "import os, sys, signal, socket, stat, shutil, subprocess, time\n"
    body += f"nr = {S.SYSCALLS.get(platform.machine(), (0, {}))[1]!r}\n"
    for i, code in enumerate(codes):
        body += f"def _try{i}():\n" + "".join(f"    {line}\n" for line in code.strip().splitlines())
        body += f"try:\n    _try{i}()\nexcept BaseException as e:\n    print('attempt {i}:', repr(e), file=sys.stderr)\n"
    return body


def routes(canary: Path, mark: str) -> dict[str, list[str]]:
    c, f = str(canary), str(canary / "file.txt")
    hosts = [f"{c}/{mark}", f"/proc/self/root{c}/{mark}", f"/proc/1/root{c}/{mark}", "../" * 12 + f"{c[1:]}/{mark}",
             f"/tmp/{mark}", f"/dev/shm/{mark}", f"/var/tmp/{mark}", f"{Path.home()}/{mark}",
             f"{sysconfig.get_paths()['purelib']}/{mark}.pth", f"{S.HARNESS.parent}/{mark}.py"]
    shell = f"touch {c}/{mark} /tmp/{mark} /dev/shm/{mark}; echo x >> {f}; python3 -c 'pass' {mark}"
    return {
        "paths": [f"open({p!r}, 'w').write('x')" for p in hosts] + [
            f"open({f!r}, 'a').write('x')", f"open({f!r}, 'w')", f"open('/proc/self/root{f}', 'r+').write('x')",
            f"fd = os.open({f!r}, os.O_WRONLY | os.O_TRUNC); os.write(fd, b'x')",
            f"os.truncate({f!r}, 0)", f"open({str(S.HARNESS)!r}, 'a').write('x')",
            f"open({str(Path(os.__file__))!r}, 'a').write('x')", f"open({sys.executable!r}, 'ab').write(b'x')"],
        "kinds": [op.format(p=p) for p in (f"{c}/{mark}", f"/tmp/{mark}", f"/dev/shm/{mark}") for op in (
            "os.mkdir('{p}')", "os.mkfifo('{p}')", "socket.socket(socket.AF_UNIX).bind('{p}')",
            "os.symlink('/etc/passwd', '{p}')", f"os.link({f!r}, '{{p}}')",
            "os.mknod('{p}', stat.S_IFREG | 0o666)", "os.mknod('{p}', stat.S_IFCHR | 0o666, os.makedev(1, 3))",
            "os.mknod('{p}', stat.S_IFBLK | 0o666, os.makedev(7, 0))")],
        "links-renames": [
            f"os.rename({f!r}, {c + '/renamed'!r})", f"os.replace({c + '/sub/inner.txt'!r}, {f!r})",
            f"os.rename({c + '/sub'!r}, 'stolen')", f"os.symlink({f!r}, 'l'); open('l', 'w').write('x')",
            f"os.link({f!r}, 'h'); open('h', 'w').write('x')", f"os.remove({f!r})", f"os.unlink({c + '/link'!r})",
            f"shutil.rmtree({c!r})", f"os.chmod({f!r}, 0o000)", f"os.chown({f!r}, 65534, 65534)",
            f"os.utime({f!r}, (0, 0))", f"os.rmdir({c + '/sub'!r})"],
        "programs": [
            f"os.system({shell!r})", f"subprocess.run(['sh', '-c', {shell!r}])", f"os.popen({shell!r}).read()",
            f"import pty; pty.spawn(['sh', '-c', {shell!r}])",
            f"os.waitpid(os.posix_spawn('/bin/sh', ['sh', '-c', {shell!r}], {{}}), 0)",
            f"pid = os.fork()\nif pid == 0:\n    os.execv('/bin/sh', ['sh', '-c', {shell!r}])\nos.waitpid(pid, 0)",
            *(("import multiprocessing as mp\n"
               f"p = mp.get_context({how!r}).Process(target=open, args=({f!r}, 'w')); p.start(); p.join()")
              for how in ("fork", "spawn", "forkserver")),
            f"pid, fd = os.forkpty()\nif pid == 0:\n    os.execv('/bin/sh', ['sh', '-c', {shell!r}])\nos.waitpid(pid, 0)",
            f"import ctypes; ctypes.CDLL(None).system({shell.encode()!r})"],
        "outliving": [
            ("if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
             f"        time.sleep(1.0); open({f!r}, 'a').write('late'); open('/tmp/{mark}', 'w')\n"
             f"        os.execv('/bin/sh', ['sh', '-c', 'sleep 30 # {mark}'])\n    os._exit(0)"),
            (f"subprocess.Popen(['setsid', 'nohup', 'sh', '-c', 'sleep 1; touch {c}/{mark}; sleep 30 # {mark}'], "
             "start_new_session=True)")],
        "kernel-state": [  # kernel keyrings are the host's, and outlive the run: seccomp denies them
            ("import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n"
             f"assert libc.syscall(nr['add_key'], b'user', b'{mark}', b'x', 1, ctypes.c_int(-4)) == -1"),
            ("import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n"  # KEYCTL_JOIN_SESSION_KEYRING: a new one
             f"assert libc.syscall(nr['keyctl'], 1, b'{mark}') == -1"),
            ("import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n"
             f"assert libc.syscall(nr['request_key'], b'user', b'{mark}', None, ctypes.c_int(-4)) == -1")],
        "namespaces": [  # new namespaces (where allowed) hold only locked, read-only copies of the same view
            (f"subprocess.run(['unshare', '-Urm', 'sh', '-c', 'mount -o remount,rw /usr; touch /usr/{mark}; "
             f"mount -t tmpfs none /tmp && touch {c}/{mark}'])"),
            ("import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n"  # CLONE_NEWUSER | CLONE_NEWNS, then remount
             f"assert libc.unshare(0x10000000 | 0x20000) != 0 or libc.mount(b'none', b'/usr', None, 32 | 4096, None)"
             f" != 0 or not open('/usr/{mark}', 'w')"),
            f"os.system('mount --bind /tmp /usr; touch /usr/{mark}; mount -o remount,rw /; touch /{mark}')"],
    }


def alive_with(mark: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                running = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
                if running and mark.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def keys_of_the_sandbox_user() -> tuple[int, int]:
    """(keys, bytes) the kernel holds for the uid the sandbox runs as (from /proc/key-users, read outside)."""
    uid = S.NOBODY if os.geteuid() == 0 else os.getuid()
    for line in Path("/proc/key-users").read_text().splitlines():
        if line.split(":")[0].strip() == str(uid):
            fields = line.split(":")[1].split()
            return int(fields[2].split("/")[0]), int(fields[3].split("/")[0])
    return 0, 0


def host_marks(canary: Path, mark: str) -> list[str]:
    places = [canary, Path("/tmp"), Path("/dev/shm"), Path("/var/tmp"), Path.home(), S.HARNESS.parent,
              Path(sysconfig.get_paths()["purelib"]), Path("/usr"), Path("/")]
    return [str(p) for d in places if d.is_dir() for p in d.glob(f"{mark}*")]


@pytest.mark.parametrize("route", ["paths", "kinds", "links-renames", "programs", "outliving", "kernel-state",
                                   "namespaces"])
def test_no_mark_on_the_host(harness, canary, route):
    mark = f"ar2dlm-mark-{secrets.token_hex(6)}"
    before, files, keys = state(canary), digest(EVALUATOR_FILES), keys_of_the_sandbox_user()
    cwd, env = os.getcwd(), dict(os.environ)
    out = S.run_program(attempts(*routes(canary, mark)[route]), LIMITS)
    assert out.status == "passed", out  # every attempt ran (and failed or stayed inside), then the program ended
    if route == "outliving":
        time.sleep(1.5)  # the forks' delayed writes would have landed by now
    assert state(canary) == before
    assert digest(EVALUATOR_FILES) == files
    assert host_marks(canary, mark) == []
    assert all(a <= b for a, b in zip(keys_of_the_sandbox_user(), keys))  # (the kernel may collect old ones)
    assert alive_with(mark) == [] and alive_with(out.workdir) == []
    assert os.getcwd() == cwd and dict(os.environ) == env


def test_signals_reach_nothing_outside(harness):
    # a process of ours (same uid as the evaluator, same process group) and the evaluator itself
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pgid = os.getpgid(0)
        codes = [f"os.kill({bystander.pid}, signal.SIGKILL)", f"os.kill({os.getpid()}, signal.SIGTERM)",
                 f"os.killpg({pgid}, signal.SIGKILL)", "os.kill(os.getppid(), signal.SIGKILL)",
                 "os.kill(-1, signal.SIGKILL)", "os.killpg(0, signal.SIGKILL)"]
        out = S.run_program(attempts(*codes), LIMITS)
        assert out.status in ("passed", "failed"), out  # whatever the run did to itself, it ended in time
        time.sleep(0.1)
        assert bystander.poll() is None, "a process outside the sandbox was killed"
    finally:
        bystander.kill()
        bystander.wait()


def test_sees_nothing_of_the_evaluator(harness, tmp_path, monkeypatch):
    secret = secrets.token_hex(8)
    monkeypatch.setenv("AR2DLM_TEST_SECRET", secret)
    (tmp_path / "secret.txt").write_text(secret)
    # the evaluator's working directory may hold the interpreter's prefix (the project's own .venv), which the
    # sandbox shows read-only; nothing else of it may be there
    cwd = Path.cwd()
    prefix = {Path(sys.prefix).resolve().relative_to(cwd.resolve()).parts[0]} \
        if Path(sys.prefix).resolve().is_relative_to(cwd.resolve()) else set()
    body = ("import os, sys\n"
            f"assert {secret!r} not in repr(os.environ)\n"
            f"assert not os.path.exists({str(tmp_path)!r})\n"
            f"assert not os.path.exists({str(cwd)!r}) or set(os.listdir({str(cwd)!r})) <= {prefix!r}\n"
            f"assert not os.path.exists('/proc/{os.getpid()}/environ') or os.getpid() < 10\n"
            "assert os.getuid() != 0 and os.geteuid() != 0\n"
            "status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n"
            f"assert all(int(status[k], 16) == 0 for k in {CAP_SETS!r}), status\n"
            "assert status['NoNewPrivs'].strip() == '1'\n"
            "assert [p for p in os.listdir('/proc') if p.isdigit()] and max(map(int, filter(str.isdigit, "
            "os.listdir('/proc')))) < 100\n"  # a PID namespace of its own: only its few processes
            "assert [f for f in os.listdir('/proc/self/fd') if os.path.exists(f'/proc/self/fd/{f}')] == ['0', '1', '2']\n"
            "open('scratch', 'w').write('its working directory is writable')\n"
            "writable = {d for d in os.listdir('/') if os.access('/' + d, os.W_OK)}\n"  # /dev: bwrap's, as a user
            "assert 'tmp' in writable and writable <= {'tmp', 'dev'} and not os.access('/', os.W_OK), writable\n")
    out = S.run_program(body, LIMITS)
    assert out.passed, out


def test_no_channel_to_the_host(harness):
    # servers of this process: an abstract unix socket (no file to guard: only the network namespace hides it)
    # and a TCP port on the loopback
    name = f"\0ar2dlm-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX) as unix, socket.socket() as tcp:
        unix.bind(name)
        tcp.bind(("127.0.0.1", 0))
        for s in (unix, tcp):
            s.listen()
            s.setblocking(False)
        codes = [f"s = socket.socket(socket.AF_UNIX); s.settimeout(1); s.connect({name!r})",
                 f"s = socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', {tcp.getsockname()[1]}))",
                 "s = socket.socket(); s.settimeout(1); s.connect(('1.1.1.1', 80))"]
        out = S.run_program(attempts(*codes), LIMITS)
        assert out.status == "passed", out
        for s in (unix, tcp):
            with pytest.raises(BlockingIOError):
                s.accept()


def test_seccomp_filter_shape():
    for machine in S.SYSCALLS:
        bpf = S.seccomp_filter(machine)
        assert len(bpf) % 8 == 0 and len(bpf) // 8 < 64
    assert S.seccomp_filter("riscv64") is None  # no table: the sandbox runs without the filter
