"""Refinery's Python zygote: a pre-initialised Python that forks each new instance.

Started once per server by the sandbox host (`zygote.rs`), as root, in the host's namespaces,
with an empty environment and only its control socket (fd 3) open. It imports the language
shim named on its command line (and with it the interpreter's start-up work, which is most of a
Python cold start), then serves fork requests forever:

  host -> zygote   {"type": "config", ...}                     once: syscall numbers, filters
  zygote -> host   {"type": "ready"}
  host -> zygote   {"type": "fork"}          + fds: stdin, log, requests, responses
  zygote -> host   {"pid": N} + a pidfd of the instance, or {"error": "..."}
  host -> instance its InitSpec, as one frame on its requests pipe (as for the Rust init)

Each instance is a fork that becomes pid 1 of a fresh pid namespace, reads its plan, then builds
its sandbox around itself exactly as the Rust init (`init.rs`) does, from the same plan: join its
cgroups, new cgroup/mount/net/ipc/uts namespaces, the mount table (`mounts.rs` ops), pivot_root,
hostname, rlimits, capabilities and uid, no_new_privs, Landlock (`fs_access.rs` rules, as access
masks) and seccomp (`seccomp.rs`, as compiled BPF). Any failed step ends the child with status
125 before a line of the block's code runs. Only then does it call the shim's `main`.

This process never runs user code and never holds anything of any account: a fork request
carries only descriptors, and each instance reads its own setup plan (its mounts, uid,
cgroups, the block's environment) from its own pipe after the fork, so no instance can find
another's in memory it inherited from the zygote. See SECURITY.md ("Pre-initialised
runtimes").
"""

import ctypes
import fcntl
import importlib.util
import json
import os
import resource
import select
import signal
import socket
import struct
import sys

CONTROL_FD = 3
MAX_MESSAGE = 1 << 20
MAX_SPEC = 4 * 1024 * 1024  # spec.rs MAX_FRAME

# <linux/sched.h>, <linux/mount.h>, <linux/prctl.h> (stable across architectures).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 4, 24, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_LOG = 1, 2
LANDLOCK_RULE_PATH_BENEATH = 1
FLAGS = {"ReadOnly": MS_RDONLY, "NoSuid": MS_NOSUID, "NoDev": MS_NODEV, "NoExec": MS_NOEXEC}
RLIMITS = {
    "Core": resource.RLIMIT_CORE,
    "NoFile": resource.RLIMIT_NOFILE,
    "FSize": resource.RLIMIT_FSIZE,
}

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]
libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.syscall.restype = ctypes.c_long


class SetupError(Exception):
    pass


def check(rc, what):
    if rc < 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)} (errno {err})")
    return rc


def sys_call(config, name, *args):
    return libc.syscall(ctypes.c_long(config["sys"][name]), *args)


# ------------------------------------------------------------------ the instance's setup


def b(path):
    return path.encode()


def mount(src, dst, fstype, flags, data):
    rc = libc.mount(src and b(src), b(dst), fstype and b(fstype), flags, data and b(data))
    check(rc, f"mount on {dst}")


def ms_flags(flags):
    out = 0
    for f in flags:
        out |= FLAGS[f]
    return out


def inside(root, dst):
    return os.path.join(root, dst.lstrip("/"))


def ensure_file(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def lexists(path):
    return os.path.lexists(path)


def bind_remount(target, flags):
    mount(None, target, None, MS_BIND | MS_REMOUNT | flags, None)


def apply(root, op):
    """One `mounts::MountOp` (externally tagged JSON), as `mounts::apply` does it."""
    ((kind, a),) = op.items()
    if kind == "Bind":
        target = inside(root, a["dst"])
        if os.path.isdir(a["src"]):
            os.makedirs(target, exist_ok=True)
        else:
            ensure_file(target)
        mount(a["src"], target, None, MS_BIND, None)
        if a["flags"]:
            bind_remount(target, ms_flags(a["flags"]))
    elif kind == "Tmpfs":
        target = inside(root, a["dst"])
        os.makedirs(target, exist_ok=True)
        mount("tmpfs", target, "tmpfs", ms_flags(a["flags"]), a["options"])
    elif kind == "Proc":
        target = inside(root, a["dst"])
        os.makedirs(target, exist_ok=True)
        mount("proc", target, "proc", ms_flags(a["flags"]), None)
    elif kind == "Symlink":
        link = inside(root, a["dst"])
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(a["target"], link)
    elif kind == "File":
        path = inside(root, a["dst"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, a["mode"])
        try:
            os.write(fd, a["contents"].encode())
            os.fchmod(fd, a["mode"])
        finally:
            os.close(fd)
    elif kind == "Remount":
        bind_remount(inside(root, a["dst"]), ms_flags(a["flags"]))
    elif kind == "MaskFile":
        target = inside(root, a["dst"])
        if lexists(target):
            mount("/dev/null", target, None, MS_BIND, None)
            bind_remount(target, MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    elif kind == "MaskDir":
        target = inside(root, a["dst"])
        if lexists(target):
            flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
            mount("tmpfs", target, "tmpfs", flags, "size=4k,nr_inodes=2,mode=0555")
    elif kind == "ReadOnly":
        target = inside(root, a["dst"])
        if lexists(target):
            mount(target, target, None, MS_BIND | MS_REC, None)
            bind_remount(target, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    else:
        raise SetupError(f"unknown mount op {kind!r}")


def build_root(config, spec):
    root = spec["staging_dir"]
    mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, config["root_tmpfs_options"])
    for op in spec["mounts"]:
        try:
            apply(root, op)
        except (OSError, SetupError) as e:
            raise SetupError(f"{op}: {e}") from None
    os.chdir(root)
    check(sys_call(config, "pivot_root", b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "detaching the old root")
    os.chdir(spec["workdir"])


def prctl(option, arg, what):
    check(libc.prctl(option, arg, 0, 0, 0), what)


def exit_if_orphaned():
    """The host holds the requests pipe (fd 3): POLLHUP means the server is gone."""
    p = select.poll()
    p.register(3, select.POLLIN)
    for _, events in p.poll(0):
        if events & select.POLLHUP:
            os._exit(125)


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_privileges(config, spec):
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last capability
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    uid, gid = spec["uid"], spec["gid"]
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    header = CapHeader(0x20080522, 0)
    data = (CapData * 2)()
    check(sys_call(config, "capset", ctypes.byref(header), ctypes.byref(data)), "capset(empty)")
    if (os.getuid(), os.geteuid(), os.getgid()) != (uid, uid, gid):
        raise SetupError("uid/gid did not change")
    # The uid change made the process non-dumpable (its /proc files root-owned, /proc/self/ns
    # unreadable to itself); an exec would reset that. Dumpable lets only the same uid — the
    # instance's own processes — at it, and ptrace is refused by seccomp anyway.
    prctl(PR_SET_DUMPABLE, 1, "PR_SET_DUMPABLE")
    # The uid change cleared the parent-death signal: re-arm it, then check the server is there.
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "PR_SET_PDEATHSIG")
    exit_if_orphaned()
    prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


def restrict_landlock(config):
    plan = config.get("landlock")
    if not plan:
        return
    attr = struct.pack("<QQQ", plan["handled_fs"], 0, plan["scoped"])[: plan["attr_size"]]
    ruleset = check(sys_call(config, "landlock_create_ruleset", attr, len(attr), 0), "landlock_create_ruleset")
    try:
        for path, access in plan["rules"]:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # this host lacks it (e.g. /lib32)
            try:
                rule = struct.pack("<Qi", access, fd)
                check(
                    sys_call(config, "landlock_add_rule", ruleset, LANDLOCK_RULE_PATH_BENEATH, rule, 0),
                    f"landlock_add_rule {path}",
                )
            finally:
                os.close(fd)
        check(sys_call(config, "landlock_restrict_self", ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def compile_seccomp(config):
    """The filters as kernel `sock_fprog`s, built once in the zygote (every fork inherits them),
    each with its flags: SECCOMP_FILTER_FLAG_LOG for the deny list's, none for the quiet answers
    (`seccomp.rs`; same order as `seccomp::install`)."""
    programs = []
    for program in config["seccomp"]:
        code = b"".join(struct.pack("<HBBI", *ins) for ins in program["code"])
        flags = SECCOMP_FILTER_FLAG_LOG if program["log"] else 0
        programs.append((SockFprog(len(program["code"]), code), code, flags))  # keep `code` alive
    config["seccomp_compiled"] = programs


def install_seccomp(config):
    for prog, _code, flags in config["seccomp_compiled"]:
        rc = sys_call(config, "seccomp", SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog))
        check(rc, "installing the seccomp filter")


def enter(config, spec):
    """Everything `init.rs::run` does, in the same order, on this (forked, pid 1) process."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "PR_SET_PDEATHSIG")
    exit_if_orphaned()
    # Raw fds, not open(): text-mode file objects cost ≈ 0.3 ms more per cgroup.procs write
    # here (measured: 1.8 ms → 0.4 ms for the five joins of a hybrid host).
    for procs in spec["cgroup_procs"]:
        fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    check(libc.unshare(CLONE_NEWCGROUP | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    build_root(config, spec)
    socket.sethostname(spec["hostname"])
    for r in spec["rlimits"]:
        resource.setrlimit(RLIMITS[r["kind"]], (r["limit"], r["limit"]))
    drop_privileges(config, spec)
    restrict_landlock(config)
    install_seccomp(config)
    os.environ.clear()
    os.environ.update(dict(spec["env"]))


# ------------------------------------------------------------------ the fork server


def read_exact(fd, n):
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise SetupError("the host closed the requests pipe before the setup frame")
        data += chunk
    return data


def read_spec():
    """The instance's setup frame, from its own requests pipe (fd 3), exactly as the Rust init
    reads it: the zygote itself never sees what an instance is for."""
    (length,) = struct.unpack(">I", read_exact(3, 4))
    if length > MAX_SPEC:
        raise SetupError(f"setup frame of {length} bytes exceeds {MAX_SPEC}")
    return json.loads(read_exact(3, length))


def child(config, fds, control, pidns_fd, shim):
    """The new instance: never returns."""
    status = 125
    try:
        control.close()
        os.close(pidns_fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        # Lift the received fds above 0..=4 first, so no dup2 below clobbers a later source.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds]
        for target, fd in zip((0, 1, 2, 3, 4), (high[0], high[1], high[1], high[2], high[3])):
            os.dup2(fd, target)
        os.closerange(5, 65536)
        spec = read_spec()
        enter(config, spec)
    except BaseException as e:  # noqa: BLE001 - any failure ends this child, never the zygote
        os.write(2, f"refinery-sandbox: {e}\n".encode(errors="replace"))
        os._exit(status)
    args = spec["entry"]["Fork"]["args"]
    sys.argv = [shim.__file__, *args]
    try:
        status = shim.main()
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001
        status = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
        os._exit(status or 0)


def reap(_signum, _frame):
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def receive(control):
    fds = []
    msg, ancdata, _flags, _addr = control.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 8))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4]))
    return msg, fds


def reply(control, body, fds=()):
    data = json.dumps(body).encode()
    if fds:
        control.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
    else:
        control.sendmsg([data])


def fork_instance(config, fds, control, pidns_fd, shim):
    """unshare(CLONE_NEWPID) makes the next child pid 1 of a new pid namespace; setns back to
    our own namespace afterwards, so the next fork gets a namespace of its own too."""
    # SIGCHLD stays blocked until the pidfd is open: the reaper (the signal handler) cannot
    # collect the child, so its pid cannot be reused, before the pidfd pins it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        check(libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
        try:
            pid = os.fork()
            if pid == 0:
                child(config, fds, control, pidns_fd, shim)
        finally:
            check(libc.setns(pidns_fd, CLONE_NEWPID), "setns back to the zygote's pid namespace")
        return pid, check(sys_call(config, "pidfd_open", pid, 0), "pidfd_open")
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


def load_shim(path):
    spec = importlib.util.spec_from_file_location("refinery_shim", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    if len(sys.argv) != 2:
        print("usage: zygote_python.py SHIM.py", file=sys.stderr)
        return 2
    # The host's spawner thread runs with every signal blocked and we inherit its mask: unblock
    # them, or SIGCHLD never reaches the reaper below.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    control = socket.socket(fileno=CONTROL_FD)
    shim = load_shim(sys.argv[1])
    signal.signal(signal.SIGCHLD, reap)
    pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    msg, _ = receive(control)
    if not msg:
        return 0
    config = json.loads(msg)
    compile_seccomp(config)
    reply(control, {"type": "ready"})
    while True:
        msg, fds = receive(control)
        if not msg:
            return 0  # the host closed the socket
        try:
            request = json.loads(msg)
            if len(fds) != 4:
                raise SetupError(f"a fork request needs 4 fds, got {len(fds)}")
            if request.get("type") != "fork":
                raise SetupError(f"unknown request {request.get('type')!r}")
            pid, pidfd = fork_instance(config, fds, control, pidns_fd, shim)
        except (OSError, SetupError, ValueError, KeyError) as e:
            reply(control, {"error": str(e)})
        else:
            reply(control, {"pid": pid}, [pidfd])
            os.close(pidfd)
        finally:
            for fd in fds:
                os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
