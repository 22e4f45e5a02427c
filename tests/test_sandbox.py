"""The sandbox contains hostile completions, survives them and scores them failed; a correct one passes.

Oracles: the file system (a file written outside the working directory must not exist), /proc (no
process of the run may be alive after it returns), the clock (a timeout returns within its bound).
Where the machine has no OS isolation the sandbox refuses unless told `unsandboxed`; those paths run here
with `isolation` patched to "none". Routes out of the sandbox: test_sandbox_escape.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ar2dlm import cli
from ar2dlm.core.errors import ConfigError
from ar2dlm.evaluate import sandbox as S
from ar2dlm.evaluate.sandbox import SandboxLimits, run_program

FAST = SandboxLimits(timeout=3.0, memory_mb=256)
BACKENDS = [kind for kind in ("bwrap", "unshare") if S.works(kind)]
TESTS = "\n\ndef check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n\ncheck(add)\n"


def program(body: str) -> str:
    return body + TESTS


def alive_in(workdir: str) -> list[int]:
    """Processes whose command line names the run's working directory (the harness and its forks)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                running = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # zombies are dead
                if running and workdir.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture(params=BACKENDS or [pytest.param("none", marks=pytest.mark.skip("no OS isolation here"))])
def backend(request, monkeypatch):
    """Each sandbox that works on this machine (the others' tests use the one `isolation()` picks)."""
    monkeypatch.setattr(S, "isolation", lambda: request.param)
    return request.param


def test_correct_solution_passes(backend):
    out = run_program(program("def add(a, b):\n    return a + b\n"), FAST)
    assert out.passed and out.status == "passed", out


def test_wrong_solution_fails():
    out = run_program(program("def add(a, b):\n    return a - b\n"), FAST)
    assert not out.passed and out.status == "failed" and "AssertionError" in out.detail


def test_infinite_loop_times_out(backend):
    start = time.monotonic()
    out = run_program(program("while True:\n    pass\n"), SandboxLimits(timeout=1.0, memory_mb=256))
    assert time.monotonic() - start < 5
    assert not out.passed and out.status == "timeout"
    assert not alive_in(out.workdir)


def test_memory_exhaustion_is_contained(backend):
    body = "chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))\n"
    out = run_program(program(body), FAST)
    assert not out.passed and "MemoryError" in out.detail, out


def test_children_that_sleep_are_killed(backend):
    body = ("import os, time\n"
            "for _ in range(3):\n"
            "    if os.fork() == 0:\n"
            "        os.setsid()\n"  # even a child that leaves the process group
            "        time.sleep(1000)\n"
            "time.sleep(1000)\n")
    out = run_program(program(body), SandboxLimits(timeout=1.5, memory_mb=256))
    assert not out.passed and out.status == "timeout"
    time.sleep(0.2)
    assert not alive_in(out.workdir), "processes of the run survived it"


def test_children_exit_with_the_parent(backend):
    body = "import os, time\nif os.fork() == 0:\n    time.sleep(1000)\n" \
           "def add(a, b):\n    return a + b\n"
    out = run_program(program(body), FAST)
    # the forked child also runs the tests, then sleeps; the parent passes and returns
    assert out.passed
    time.sleep(0.2)
    assert not alive_in(out.workdir)


def test_writing_outside_its_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    body = f"open({str(target)!r}, 'w').write('x')\ndef add(a, b):\n    return a + b\n"
    out = run_program(program(body), FAST)
    assert not out.passed and "PermissionError" in out.detail
    assert not target.exists()


@pytest.mark.parametrize("how", ["os.open", "shell", "rename"])
def test_other_ways_of_writing_outside(tmp_path, how):
    target = tmp_path / "escaped.txt"
    body = {"os.open": f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n",
            "shell": f"import os\nos.system('touch {target}')\n",
            "rename": f"open('a', 'w').write('x')\nimport os\nos.rename('a', {str(target)!r})\n"}[how]
    out = run_program(program(body + "def add(a, b):\n    return a + b\n"), FAST)
    assert not out.passed
    assert not target.exists()


def test_writing_inside_its_directory_is_allowed():
    body = "open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n" \
           "def add(a, b):\n    return a + b\n"
    assert run_program(program(body), FAST).passed


@pytest.mark.parametrize("code", [
    "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.connect(('1.1.1.1', 80))\n",
    "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)\n",
])
def test_network_socket_fails(code):
    out = run_program(program(code + "def add(a, b):\n    return a + b\n"), FAST)
    assert not out.passed and out.status == "failed"


@pytest.mark.parametrize("exit_code", ["import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "exit()\n",
                                       "raise SystemExit\n"])
def test_exit_before_tests_is_not_a_pass(exit_code):
    out = run_program(exit_code + "def add(a, b):\n    return a + b\n" + TESTS, FAST)
    assert not out.passed and out.status == "failed"
    # the same solution without the early exit passes: the early exit, not the code, made it fail
    assert run_program("def add(a, b):\n    return a + b\n" + TESTS, FAST).passed


def test_printing_a_fake_marker_is_not_a_pass():
    body = "print('passed')\nprint('OK')\nimport os\nos._exit(0)\n"
    assert not run_program(program(body), FAST).passed


def test_evaluator_process_is_untouched(tmp_path):
    cwd, env = os.getcwd(), dict(os.environ)
    run_program(program("import os\nos.chdir('/')\nos.environ['X'] = '1'\n"), FAST)
    assert os.getcwd() == cwd and dict(os.environ) == env


def test_isolation_uses_namespaces(backend):
    # its own PID namespace (the harness is its PID 1), a network namespace with only a loopback,
    # a read-only system and a private /tmp, as an unprivileged user
    body = ("import os\nassert os.getpid() == 1, os.getpid()\n"
            "names = [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]]\n"
            "assert names == ['lo'], names\n"
            "assert os.getuid() != 0 and os.getcwd().startswith('/tmp/run-'), (os.getuid(), os.getcwd())\n"
            "assert not os.access('/usr', os.W_OK) and os.access('/tmp', os.W_OK)\n")
    out = run_program(program(body + "def add(a, b):\n    return a + b\n"), FAST)
    assert out.passed, out
    assert S.describe_isolation().startswith({"bwrap": "bubblewrap", "unshare": "unshare"}[backend])


@pytest.fixture
def no_isolation(monkeypatch):
    monkeypatch.setattr(S, "isolation", lambda: "none")


def test_no_isolation_refuses_unless_unsandboxed(no_isolation):
    with pytest.raises(ConfigError, match="--unsandboxed") as e:
        run_program(program("def add(a, b):\n    return a + b\n"), FAST)
    assert e.value.field == "unsandboxed"
    risky = SandboxLimits(timeout=3.0, memory_mb=256, unsandboxed=True)
    assert run_program(program("def add(a, b):\n    return a + b\n"), risky).passed
    out = run_program(program("def add(a, b):\n    return a - b\n"), risky)
    assert not out.passed and "AssertionError" in out.detail
    assert S.describe_isolation().startswith("none")


def test_eval_refuses_before_loading_without_isolation(no_isolation, tmp_path, capsys):
    # the model does not exist: the refusal must come first, naming the flag
    code = cli.main(["eval", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "--unsandboxed" in err and "no-model" not in err


def test_eval_prints_its_isolation(tmp_path, capsys):
    cli.main(["eval", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), "--unsandboxed"])
    assert f"sandbox: {S.describe_isolation()}" in capsys.readouterr().out


def test_limits_validated():
    for kw, field in (({"timeout": 0}, "timeout"), ({"memory_mb": 1}, "memory_mb")):
        with pytest.raises(ConfigError) as e:
            SandboxLimits(**kw)
        assert e.value.field == field
