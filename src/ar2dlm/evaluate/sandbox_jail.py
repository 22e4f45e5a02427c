"""The sandbox's filesystem view where bubblewrap is missing: run by path, never imported by the evaluator.

`unshare` starts it as PID 1 of new mount, PID, network, IPC and UTS namespaces (and of a user namespace when
the evaluator is not root, where it is root of that namespace only). argv: one JSON object, `spec` below.

1. Mount a fresh tmpfs on SPEC.newroot (an empty directory of the host: the mount exists only in this mount
   namespace) and build in it: read-only binds of the system paths, the symlinks, a new /proc, a /dev of a few
   device files bound from the host's, a private, size-limited /tmp holding the working directory with the
   program, and the harness.
2. Remount every mount below the new root read-only (nosuid, nodev), except /tmp, /proc and /dev/pts; a
   recursive bind's submounts included. Flags the host locked (noexec, ...) are kept.
3. chroot into it, leave the evaluator's session (no terminal to inject input into), install the seccomp
   filter (sandbox.seccomp_filter) and exec the harness
   through setpriv: an empty bounding set, inheritable and ambient set, no_new_privs, and (when started as
   real root) uid/gid nobody without groups. The interpreter it starts has no capabilities at all, and a
   chrooted process cannot create the user namespace that would give it some.
"""

import ctypes
import json
import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = \
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18
KEPT = MS_NOEXEC | 1024 | 2048 | 4096  # noexec, noatime, nodiratime, relatime: as the host has them (may be locked)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
libc = ctypes.CDLL(None, use_errno=True)


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: s.encode() if s is not None else None
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def bind(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        open(target, "a").close()
    mount(source, target, None, MS_BIND | MS_REC)


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.umask(0o022)  # what it builds must be readable by nobody, whatever the evaluator's umask
    root, workdir = spec["newroot"], spec["workdir"]
    with open(spec["program_fd"], "rb") as f, open(spec["harness"], "rb") as h:  # the fd is closed: no leak
        program, harness = f.read(), h.read()
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # 1.
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    # the private /tmp first: a read-only path under the host's /tmp (a venv there) is bound inside it, not hidden
    os.mkdir(root + "/tmp")
    mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={spec['tmp_bytes']}")
    for path in spec["ro"]:
        bind(path, root + path)
    for target, path in spec["symlinks"]:
        os.symlink(target, root + path)
    os.mkdir(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.mkdir(root + "/dev")
    mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID, "mode=0755,size=64k")
    for name in DEVICES:
        bind("/dev/" + name, f"{root}/dev/{name}")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")):
        os.symlink(target, f"{root}/dev/{name}")
    os.mkdir(root + "/dev/pts")
    try:  # a private pty instance (pty.openpty works); without it pty code fails, nothing else does
        mount("devpts", root + "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    except OSError:
        pass
    os.makedirs(root + workdir, mode=0o777)
    os.chmod(root + workdir, 0o777)
    with open(f"{root}{workdir}/program.py", "wb") as f:
        f.write(program)
    os.makedirs(root + os.path.dirname(spec["harness_inside"]), mode=0o755, exist_ok=True)
    with open(root + spec["harness_inside"], "wb") as f:
        f.write(harness)

    writable = {root + "/tmp", root + "/proc", root + "/dev/pts"}  # 2.
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    for point in points:
        # every mount of the view is read-only but the private /tmp itself, /proc and /dev/pts (binds under /tmp too)
        if (point == root or point.startswith(root + "/")) and not any(
                point == w or (point.startswith(w + "/") and w != root + "/tmp") for w in writable):
            device = point.startswith(root + "/dev/")  # a bound device node: nodev only if the host has it
            kept = os.statvfs(point).f_flag & (KEPT | (MS_NODEV if device else 0))
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (0 if device else MS_NODEV) | kept)

    os.chroot(root)  # 3.
    os.chdir(workdir)
    os.setsid()
    if spec["seccomp"]:  # sandbox.seccomp_filter's program; it stays through the exec
        bpf = bytes.fromhex(spec["seccomp"])
        buf = ctypes.create_string_buffer(bpf, len(bpf))
        prog = SockFprog(len(bpf) // 8, ctypes.addressof(buf))
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
                libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "seccomp filter refused")
    drop = ["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    if spec["nobody"] is not None:
        drop += [f"--reuid={spec['nobody']}", f"--regid={spec['nobody']}", "--clear-groups"]
    os.execv(spec["setpriv"], ["setpriv", *drop, *spec["exec"]])


if __name__ == "__main__":
    main()
