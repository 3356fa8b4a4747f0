//! Creating an instance: channels, the clone(2) of the init (or of a zygote) on the one
//! long-lived spawner thread, and sending the setup frame.
//!
//! All clones happen on a single dedicated thread because the init's parent-death signal
//! (PR_SET_PDEATHSIG) fires when the parent *thread* exits; this thread lives as long as the
//! process. The cloned child runs only async-signal-safe syscalls before execve, since the server
//! is multi-threaded.

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::SandboxError;

// The raw clone(2) below passes only zeros after `flags`; that is correct for every argument
// order except CLONE_BACKWARDS2 (stack first), used by s390.
#[cfg(target_arch = "s390x")]
compile_error!("refinery-sandbox: raw clone(2) argument order not supported on s390x");

/// Namespaces every instance gets at clone time (the cgroup namespace is entered by the init
/// after it joined its cgroups).
pub(crate) const INSTANCE_NAMESPACES: libc::c_int = libc::CLONE_NEWPID
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

/// Child-side descriptors, in the order they become fds 0..=4 of the init.
pub(crate) struct ChildFds {
    pub stdin: OwnedFd,
    pub log: OwnedFd,
    pub requests: OwnedFd,
    pub responses: OwnedFd,
}

/// Host-side ends of the instance's pipes.
pub(crate) struct HostFds {
    pub requests: OwnedFd,
    pub responses: OwnedFd,
    pub logs: OwnedFd,
}

/// Lowest fd number used for child-side descriptors, so dup2 onto 0..=4 never clobbers a source.
const HIGH_FD: RawFd = 10;

fn cloexec_high(fd: OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd that we then own exclusively.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, HIGH_FD) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a freshly created fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two fds into the 2-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Create the three pipes and /dev/null handle of an instance.
pub(crate) fn channels() -> io::Result<(HostFds, ChildFds)> {
    let (req_r, req_w) = pipe()?;
    let (resp_r, resp_w) = pipe()?;
    let (log_r, log_w) = pipe()?;
    let devnull: OwnedFd = std::fs::File::open("/dev/null")?.into();
    Ok((
        HostFds {
            requests: req_w,
            responses: resp_r,
            logs: log_r,
        },
        ChildFds {
            stdin: cloexec_high(devnull)?,
            log: cloexec_high(log_w)?,
            requests: cloexec_high(req_r)?,
            responses: cloexec_high(resp_w)?,
        },
    ))
}

struct CloneRequest {
    exe: CString,
    argv: Vec<CString>,
    /// stdin, log, requests, responses raw fds (kept open by the requester until the reply).
    fds: [RawFd; 4],
    /// Extra clone(2) flags (namespaces).
    flags: libc::c_int,
    reply: mpsc::Sender<io::Result<libc::pid_t>>,
}

static SPAWNER: OnceLock<io::Result<mpsc::Sender<CloneRequest>>> = OnceLock::new();

fn spawner() -> Result<&'static mpsc::Sender<CloneRequest>, SandboxError> {
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<CloneRequest>();
            std::thread::Builder::new()
                .name("refinery-sandbox-spawner".into())
                .spawn(move || spawner_loop(rx))?;
            Ok(tx)
        })
        .as_ref()
        .map_err(|_| SandboxError::SpawnerGone)
}

fn spawner_loop(rx: mpsc::Receiver<CloneRequest>) {
    // Block every signal on this thread: children inherit the mask, so no handler of the server
    // can run in a child between clone and execve. The init restores an empty mask before it
    // runs the entry.
    // SAFETY: sigfillset initialises the set; pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    }
    while let Ok(req) = rx.recv() {
        let result = clone_init(&req);
        let _ = req.reply.send(result);
    }
}

/// clone(2) the init. Runs on the spawner thread only.
fn clone_init(req: &CloneRequest) -> io::Result<libc::pid_t> {
    // Everything the child touches is prepared here, before the clone: no allocation after it.
    let mut argv: Vec<*const libc::c_char> = req.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let flags = (req.flags | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: a fork-like clone (no CLONE_VM, null stack = the child continues on a copy of this
    // stack). In the child we only call async-signal-safe syscalls on data prepared above and
    // never return from `child_exec`.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the freshly cloned child; see `child_exec`.
        unsafe { child_exec(&req.fds, req.exe.as_ptr(), argv.as_ptr(), envp.as_ptr()) }
    }
    Ok(pid as libc::pid_t)
}

/// The cloned child: parent-death signal, fds 0..=4, close the rest, execve the init.
///
/// # Safety
/// Must only be called in a child created by `clone_init`; the pointers must be valid argv/envp
/// arrays of NUL-terminated strings. Uses async-signal-safe syscalls only and never returns.
unsafe fn child_exec(
    fds: &[RawFd; 4],
    exe: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> ! {
    let [stdin, log, requests, responses] = *fds;
    // SAFETY: plain syscalls on integers and on the caller-guaranteed valid pointers; all
    // async-signal-safe.
    unsafe {
        // Dies with the spawner thread. Survives execve of the (non-setuid) init binary.
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        let ok = libc::dup2(stdin, 0) == 0
            && libc::dup2(log, 1) == 1
            && libc::dup2(log, 2) == 2
            && libc::dup2(requests, 3) == 3
            && libc::dup2(responses, 4) == 4;
        if !ok {
            libc::_exit(126);
        }
        if libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0u32) != 0 {
            for fd in 5..4096 {
                libc::close(fd);
            }
        }
        libc::execve(exe, argv, envp);
        let msg = b"refinery-sandbox: execve of the sandbox init failed\n";
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// The descriptors of a zygote: /dev/null in, the server's stderr out, `control` as fd 3.
pub(crate) fn zygote_fds(control: OwnedFd) -> io::Result<ChildFds> {
    let devnull = || -> io::Result<OwnedFd> { Ok(std::fs::File::open("/dev/null")?.into()) };
    let stderr = std::io::stderr().as_fd().try_clone_to_owned()?;
    Ok(ChildFds {
        stdin: cloexec_high(devnull()?)?,
        log: cloexec_high(stderr)?,
        requests: cloexec_high(control)?,
        responses: cloexec_high(devnull()?)?,
    })
}

/// Clone `exe` with `child` as its fds 0..=4 and `flags` (e.g. [`INSTANCE_NAMESPACES`]).
/// Returns the host pid.
pub(crate) fn clone_on_spawner(
    exe: CString,
    argv: Vec<CString>,
    child: &ChildFds,
    flags: libc::c_int,
) -> Result<io::Result<libc::pid_t>, SandboxError> {
    let (reply, result) = mpsc::channel();
    let req = CloneRequest {
        exe,
        argv,
        fds: [
            child.stdin.as_raw_fd(),
            child.log.as_raw_fd(),
            child.requests.as_raw_fd(),
            child.responses.as_raw_fd(),
        ],
        flags,
        reply,
    };
    spawner()?
        .send(req)
        .map_err(|_| SandboxError::SpawnerGone)?;
    result.recv().map_err(|_| SandboxError::SpawnerGone)
}

/// Reads one frame (a 4-byte big-endian length, then at most `max` bytes) from `fd` within
/// `timeout`: for the one frame the sandbox itself reads from an instance (a standby saying
/// it is waiting), before the runtime protocol takes the pipe over.
pub(crate) fn read_frame(fd: &OwnedFd, max: usize, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut header = [0u8; 4];
    read_exact_until(fd, &mut header, deadline)?;
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (at most {max} expected)"),
        ));
    }
    let mut body = vec![0u8; len];
    read_exact_until(fd, &mut body, deadline)?;
    Ok(body)
}

fn read_exact_until(fd: &OwnedFd, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let wait_ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: polls one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, wait_ms) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if pfd.revents == 0 {
            continue;
        }
        let rest = &mut buf[off..];
        // SAFETY: reads at most rest.len() bytes into memory we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
        match n {
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    return Err(e);
                }
            }
            n => off += n as usize,
        }
    }
    Ok(())
}

/// Write one frame to the requests pipe.
pub(crate) fn write_frame(fd: &OwnedFd, frame: &[u8]) -> io::Result<()> {
    let mut f = std::fs::File::from(fd.try_clone()?);
    f.write_all(frame)
}

/// Whatever the init wrote to its log pipe so far (non-blocking, bounded).
pub(crate) fn drain_log(fd: &OwnedFd) -> String {
    let Ok(dup) = fd.try_clone() else {
        return String::new();
    };
    // SAFETY: fcntl on an fd we own; only sets O_NONBLOCK on this open file description.
    unsafe {
        let fl = libc::fcntl(dup.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(dup.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let mut f = std::fs::File::from(dup);
    let mut buf = vec![0u8; 8192];
    let mut out = Vec::new();
    while let Ok(n) = f.read(&mut buf) {
        if n == 0 || out.len() > 64 * 1024 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    // Restore blocking mode: the open file description is shared with the caller's fd.
    // SAFETY: as above.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
    }
    String::from_utf8_lossy(&out).trim().to_string()
}
