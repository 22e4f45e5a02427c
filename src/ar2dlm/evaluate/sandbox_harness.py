"""The program the sandbox runs (by path, in a fresh interpreter): never imported by the evaluator.

argv: WORKDIR MEMORY_BYTES CPU_SECONDS FILE_BYTES NPROC. stdin: one line, the run's secret token.
In the sandbox (sandbox.py) it already runs behind the OS boundary, unprivileged; what it adds is the
limits and the per-run token, and an audit hook as a second line of defence only.

1. Read the token, then close stdin: the completion never sees the channel it came on.
2. Lower the limits (soft = hard, so the completion cannot raise them again): address space, CPU
   seconds, size of any file written, no core files, and processes of this uid (when NPROC > 0).
3. Install an audit hook (it cannot be removed from Python code) that refuses: sockets other than
   AF_UNIX, starting other programs (exec, spawn, system, Popen), loading native code through ctypes,
   and writing, creating, renaming or deleting files outside WORKDIR. Not a boundary (code can reach
   the kernel around it); it makes ordinary mistakes fail loudly in the rare unsandboxed run.
4. Run WORKDIR/program.py (completion + tests + check call) as __main__.
5. Only if it ran to its end: print the token. An early `os._exit(0)` or `sys.exit(0)`, an exception
   or a kill leaves no token, so the evaluator scores the run failed whatever the exit code.
"""

import os
import resource
import sys


def main() -> None:
    workdir, memory, cpu, fsize, nproc = sys.argv[1], *map(int, sys.argv[2:6])
    token = sys.stdin.readline().strip()  # 1.
    sys.stdin.close()
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)  # fd 0 again, so input() fails cleanly instead of reading a stray fd

    for kind, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                        (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):  # 2.
        if value > 0 or kind == resource.RLIMIT_CORE:
            resource.setrlimit(kind, (value, value))

    root = os.path.realpath(workdir)
    inside = lambda p: os.path.realpath(p if not isinstance(p, bytes) else os.fsdecode(p)) \
        .startswith(root + os.sep) or os.path.realpath(p) == os.devnull
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    path_events = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                   "shutil.rmtree", "os.listxattr", "os.setxattr", "os.removexattr"}
    two_path_events = {"os.rename", "os.link", "os.symlink", "shutil.move", "shutil.copyfile", "shutil.copytree"}
    refused = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
               "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.forkpty", "pty.spawn", "socket.sethostname"}
    import socket as _socket
    AF_UNIX = _socket.AF_UNIX

    def hook(event, args):  # 3.
        if event == "open":
            path, mode, flags = args
            wants_write = (mode is not None and any(c in mode for c in "wax+")) or \
                          (mode is None and flags is not None and flags & writing)
            if wants_write and isinstance(path, (str, bytes)) and not inside(path):
                raise PermissionError(f"sandbox: writing outside the working directory is refused: {path!r}")
        elif event == "socket.__new__":
            if args[1] != AF_UNIX:
                raise PermissionError("sandbox: network sockets are refused")
        elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo"):
            raise PermissionError("sandbox: network access is refused")
        elif event in refused:
            raise PermissionError(f"sandbox: {event} is refused")
        elif event in path_events:
            if isinstance(args[0], (str, bytes)) and not inside(args[0]):
                raise PermissionError(f"sandbox: {event} outside the working directory is refused")
        elif event in two_path_events:
            if any(isinstance(a, (str, bytes)) and not inside(a) for a in args[:2]):
                raise PermissionError(f"sandbox: {event} outside the working directory is refused")

    sys.addaudithook(hook)
    os.chdir(root)
    path = os.path.join(root, "program.py")
    with open(path) as f:
        source = f.read()
    namespace = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    del f
    try:
        exec(compile(source, path, "exec"), namespace)  # 4.
    except BaseException as e:  # SystemExit included: exiting before the end is not passing
        sys.stdout.flush()
        print(f"\nsandbox: {type(e).__name__}: {str(e)[:500]}", file=sys.stderr, flush=True)
        os._exit(1)
    sys.stdout.flush()
    sys.stdout.write("\n" + token + "\n")  # 5.
    sys.stdout.flush()
    os._exit(0)  # skip atexit handlers the completion may have registered


if __name__ == "__main__":
    main()
