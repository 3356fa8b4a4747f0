//! The in-sandbox init: runs as pid 1 of the new namespaces, still root, reads its setup frame
//! from fd 3, builds the sandbox around itself, drops every privilege, then splits in two: a
//! reaper that stays pid 1 and the entry, pid 2.
//!
//! Order matters and is spelled out in [`run`]: join cgroups → cgroup namespace → mounts →
//! pivot_root → hostname → rlimits → capabilities and uid → no_new_privs → Landlock → seccomp
//! → fork: the child (pid 2) resets its signals and becomes the entry; the parent (pid 1)
//! becomes [`reaper`].
//!
//! Why a separate pid 1: the entry's stragglers (daemons, `cmd &`) are re-parented to pid 1 when
//! their parent dies. A shim running as pid 1 would collect zombies it never waits for (and
//! pids.max counts them); and as pid 1 it could not be the target of `kill(-1)`-style clean-up
//! that spares it. So pid 1 is a tiny loop that holds no fd of the instance, waits for every
//! child, and exits with the entry's status when the entry exits — which, as the namespace's
//! init, takes every other process of the instance with it. The host sees the same thing as
//! before: EOF on the responses pipe and the death of the process it cloned.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;

use crate::spec::{InitSpec, RlimitKind, MAX_FRAME};
use crate::Entry;
use crate::{fs_access, mounts, seccomp};

/// fd of the requests pipe, where the setup frame arrives.
const REQUESTS_FD: libc::c_int = 3;

/// A setup step that failed: what, and the OS's reason.
struct InitError(String);

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, InitError>;
}

impl<T, E: fmt::Display> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, InitError> {
        self.map_err(|e| InitError(format!("{}: {e}", what())))
    }
}

fn check(rc: libc::c_long, what: &str) -> Result<(), InitError> {
    if rc < 0 {
        Err(InitError(format!("{what}: {}", io::Error::last_os_error())))
    } else {
        Ok(())
    }
}

/// The in-sandbox side; see the crate docs. Returns only in the entry process (pid 2) for a
/// `Builtin` entry (its exit code), or on failure (125, after writing
/// `refinery-sandbox: <reason>` to fd 2). The reaper (pid 1) never returns.
pub fn init_main(builtin: fn(&str, &[String]) -> i32) -> i32 {
    match run() {
        Ok((name, args)) => builtin(&name, &args),
        Err(InitError(reason)) => {
            let msg = format!("refinery-sandbox: {reason}\n");
            // SAFETY: writes a valid buffer to fd 2.
            unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
            125
        }
    }
}

fn read_exact_fd(fd: libc::c_int, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: reads into the unfilled tail of a valid buffer.
        let n = unsafe { libc::read(fd, buf[done..].as_mut_ptr().cast(), buf.len() - done) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the host closed the requests pipe (server gone?)",
            ));
        }
        done += n as usize;
    }
    Ok(())
}

/// Read exactly one setup frame from fd 3 (never more: the rest of fd 3 belongs to the runtime).
fn read_spec() -> Result<InitSpec, InitError> {
    let mut len = [0u8; 4];
    read_exact_fd(REQUESTS_FD, &mut len)
        .context(|| "reading the setup frame length from fd 3".into())?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(InitError(format!(
            "setup frame of {len} bytes exceeds {MAX_FRAME}"
        )));
    }
    let mut buf = vec![0u8; len];
    read_exact_fd(REQUESTS_FD, &mut buf).context(|| "reading the setup frame from fd 3".into())?;
    serde_json::from_slice(&buf).context(|| "decoding the setup frame".into())
}

/// Exit now if the server died (nobody holds the requests pipe's write end any more). Closes the
/// race between the server's death and (re-)arming PR_SET_PDEATHSIG.
fn exit_if_orphaned() {
    let mut pfd = libc::pollfd {
        fd: REQUESTS_FD,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd without waiting.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    if rc > 0 && pfd.revents & libc::POLLHUP != 0 {
        // SAFETY: _exit never returns and has no preconditions.
        unsafe { libc::_exit(125) };
    }
}

fn prctl(option: libc::c_int, arg: libc::c_ulong, what: &str) -> Result<(), InitError> {
    // SAFETY: prctl with integer arguments only.
    check(
        unsafe { libc::prctl(option, arg, 0, 0, 0) } as libc::c_long,
        what,
    )
}

/// Everything up to the point where the entry runs. Returns the builtin to call, or execs.
fn run() -> Result<(String, Vec<String>), InitError> {
    let spec = read_spec()?;

    // 1. Cgroups: join them, then hide the host's cgroup tree behind a cgroup namespace.
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, "0").context(|| format!("joining cgroup {}", procs.display()))?;
    }
    // SAFETY: unshare with a flag constant.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWCGROUP) };
    check(rc as libc::c_long, "unshare(CLONE_NEWCGROUP)")?;

    // 2. Filesystem: the mount table on a fresh tmpfs root, then pivot into it.
    mounts::build_root(&spec.staging_dir, &spec.mounts)
        .context(|| "building the sandbox root".into())?;
    mounts::pivot_into(&spec.staging_dir, &spec.workdir)
        .context(|| "pivoting into the sandbox root".into())?;

    // 3. Hostname (own UTS namespace).
    // SAFETY: passes a valid buffer and its length.
    let rc = unsafe { libc::sethostname(spec.hostname.as_ptr().cast(), spec.hostname.len()) };
    check(rc as libc::c_long, "sethostname")?;

    // 4. Resource limits.
    for r in &spec.rlimits {
        let resource = match r.kind {
            RlimitKind::Core => libc::RLIMIT_CORE,
            RlimitKind::NoFile => libc::RLIMIT_NOFILE,
            RlimitKind::FSize => libc::RLIMIT_FSIZE,
        };
        let lim = libc::rlimit {
            rlim_cur: r.limit,
            rlim_max: r.limit,
        };
        // SAFETY: passes a valid rlimit struct.
        let rc = unsafe { libc::setrlimit(resource, &lim) };
        check(rc as libc::c_long, &format!("setrlimit {:?}", r.kind))?;
    }

    // 5. Privileges: empty bounding and ambient sets, no supplementary groups, the instance's
    //    uid/gid (which clears permitted/effective caps), then clear the inheritable set too.
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments; EINVAL past the last capability is ignored.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    // SAFETY: setgroups with an empty list.
    let rc = unsafe { libc::setgroups(0, std::ptr::null()) };
    check(rc as libc::c_long, "setgroups([])")?;
    let (uid, gid) = (spec.uid, spec.gid);
    // SAFETY: integer-only syscalls.
    let rc = unsafe { libc::setresgid(gid, gid, gid) };
    check(rc as libc::c_long, "setresgid")?;
    // SAFETY: integer-only syscalls.
    let rc = unsafe { libc::setresuid(uid, uid, uid) };
    check(rc as libc::c_long, "setresuid")?;
    clear_all_caps()?;
    // SAFETY: integer-only syscalls.
    if unsafe { (libc::getuid(), libc::geteuid(), libc::getgid()) } != (uid, uid, gid) {
        return Err(InitError("uid/gid did not change".into()));
    }
    // The uid change cleared the parent-death signal: re-arm it and make sure the server is still
    // there.
    prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        "PR_SET_PDEATHSIG",
    )?;
    exit_if_orphaned();
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")?;

    // 6. Landlock (needs no_new_privs), then the syscall filter, last: from here on the process
    //    and everything it starts is filtered. Landlock is best effort: a kernel without it
    //    leaves the mount table and the uid as the filesystem walls (the host reports it).
    fs_access::restrict().context(|| "applying the Landlock ruleset".into())?;
    seccomp::install().map_err(|e| InitError(e.to_string()))?;

    // 7. Split: pid 1 stays behind as the reaper, pid 2 becomes the entry. Signals are blocked
    //    across the fork (the spawner handed us a full mask; keep it for the reaper) with
    //    default dispositions, so SIGCHLD is never SIG_IGN (which would auto-reap the entry).
    default_dispositions();
    // SAFETY: this process is single-threaded (the init runs before anything starts a thread),
    // so the child may run arbitrary code after fork.
    let entry_pid = unsafe { libc::fork() };
    if entry_pid < 0 {
        return Err(InitError(format!("fork: {}", io::Error::last_os_error())));
    }
    if entry_pid > 0 {
        reaper(entry_pid);
    }

    // 8. The entry: an empty signal mask, its environment, and exec (or the builtin).
    unblock_signals();
    match spec.entry {
        Entry::Exec { argv } => Err(exec(&argv, &spec.env)),
        Entry::Builtin { name, args } => {
            for (k, _) in std::env::vars_os() {
                std::env::remove_var(k);
            }
            for (k, v) in &spec.env {
                std::env::set_var(k, v);
            }
            Ok((name, args))
        }
        Entry::Fork { zygote, .. } => Err(InitError(format!(
            "a zygote entry ({zygote}) reached the exec init; the host resolves it before clone"
        ))),
        Entry::Standby { runtime, .. } => Err(InitError(format!(
            "a standby entry ({runtime}) reached the exec init; the host resolves it before clone"
        ))),
    }
}

/// pid 1 of the instance after the fork: closes every fd (so the entry alone holds the protocol
/// pipes and the host sees EOF when it dies), then reaps every child — the entry and whatever
/// is re-parented here — and exits with the entry's status once the entry is gone (`128 + N`
/// if a signal N killed it). Its exit kills every other process of the pid namespace.
///
/// It keeps every signal blocked: as a namespace init, signals from inside the instance without
/// a handler are dropped anyway, and the host only ever sends SIGKILL.
fn reaper(entry_pid: libc::pid_t) -> ! {
    // SAFETY: close_range on integers; a fallback loop of close(2) if the kernel lacks it.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
            for fd in 0..4096 {
                libc::close(fd);
            }
        }
    }
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid with a valid status pointer; __WALL also reaps clone children whose
        // exit signal is not SIGCHLD.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
        if pid == entry_pid {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                125
            };
            // SAFETY: _exit has no preconditions; no destructors must run in this process.
            unsafe { libc::_exit(code) };
        }
        if pid < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // ECHILD: cannot happen while the entry lives; never spin.
            // SAFETY: as above.
            unsafe { libc::_exit(125) };
        }
    }
}

/// capset(2) with every set empty (drops the inheritable set that setresuid leaves alone).
fn clear_all_caps() -> Result<(), InitError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and a 2-element data array as capset(2) v3 expects; both outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    check(rc, "capset(empty)")
}

/// Default dispositions for every signal, with every signal blocked.
fn default_dispositions() {
    // SAFETY: blocking every signal, then resetting dispositions to SIG_DFL; errors for
    // SIGKILL/SIGSTOP and invalid numbers are ignored.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

/// An empty signal mask (the entry's starting state).
fn unblock_signals() {
    // SAFETY: sigemptyset initialises the set; sigprocmask only changes this thread's mask.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

fn cstring(s: &[u8], what: &str) -> Result<CString, InitError> {
    CString::new(s).map_err(|_| InitError(format!("{what} contains a NUL byte")))
}

/// execve the entry with exactly `env`. Returns only on failure.
fn exec(argv: &[String], env: &[(String, String)]) -> InitError {
    let build = || -> Result<(Vec<CString>, Vec<CString>), InitError> {
        let argv = argv
            .iter()
            .map(|a| cstring(a.as_bytes(), "argv"))
            .collect::<Result<Vec<_>, _>>()?;
        let env = env
            .iter()
            .map(|(k, v)| cstring(format!("{k}={v}").as_bytes(), "environment"))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((argv, env))
    };
    let (argv_c, env_c) = match build() {
        Ok(v) => v,
        Err(e) => return e,
    };
    let Some(path) = argv_c.first() else {
        return InitError("the entry's argv is empty".into());
    };
    let mut argv_p: Vec<*const libc::c_char> = argv_c.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut env_p: Vec<*const libc::c_char> = env_c.iter().map(|a| a.as_ptr()).collect();
    env_p.push(std::ptr::null());
    // SAFETY: NULL-terminated arrays of valid NUL-terminated strings that outlive the call.
    unsafe { libc::execve(path.as_ptr(), argv_p.as_ptr(), env_p.as_ptr()) };
    let e = io::Error::last_os_error();
    let shown = std::path::Path::new(std::ffi::OsStr::from_bytes(path.as_bytes()));
    InitError(format!("execve {}: {e}", shown.display()))
}
