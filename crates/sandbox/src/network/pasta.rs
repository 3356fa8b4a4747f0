//! One `pasta` process (Debian package `passt`) per network instance: a user-mode TCP/UDP/ICMP
//! stack that owns a tap device in the instance's network namespace and turns the instance's
//! connections into ordinary sockets of the host.
//!
//! Lifetime: pasta runs in the foreground as a direct child of one long-lived launcher thread
//! with `PR_SET_PDEATHSIG = SIGKILL` (pasta stays uid 0 and only drops capabilities, which keeps
//! the parent-death signal), so it dies with the server; [`Pasta`] SIGKILLs and reaps it when
//! the instance is destroyed.
//!
//! Options, and why:
//! - `--runas 0`: pasta must keep CAP_SYS_ADMIN to join a namespace owned by the host's user
//!   namespace; it still drops every other capability, sets no_new_privs, installs its own
//!   seccomp filter and unshares mount/IPC/UTS namespaces.
//! - `--netns /proc/self/fd/N --netns-only`: the namespace handed over as an inherited fd (pasta
//!   cannot open another process's `/proc/<pid>/ns/net` without CAP_SYS_PTRACE).
//! - `--config-net`: addresses, routes and the interface set up before pasta reports ready.
//! - `--no-map-gw`: the gateway address is *not* translated to the host's loopback.
//! - `-t none -u none`: nothing on the host is forwarded into the instance (no inbound).
//! - `-T none -U none`: the instance's own loopback ports are *not* forwarded to the host's
//!   loopback (pasta's default, `auto`, would).
//! - `--dns-forward`: UDP port 53 to [`super::egress::DNS_FORWARD`] goes to the host's resolver.
//! - `--no-dhcp --no-dhcpv6 --no-ra`: the addresses are configured directly; fewer parsers.
//! - `--pid /proc/self/fd/W`: pasta writes its pid there once set up: that is the readiness
//!   signal.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::egress::DNS_FORWARD;

/// How long pasta may take to set up the namespace.
const READY_BUDGET: Duration = Duration::from_secs(10);

/// A running pasta; SIGKILLed and reaped on drop.
#[derive(Debug)]
pub(crate) struct Pasta {
    child: Child,
    /// Read end of pasta's stderr, kept open so pasta's (non-blocking) writes never hit EPIPE.
    stderr: OwnedFd,
}

impl Drop for Pasta {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pasta {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
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

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd with integer arguments.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The argv after the binary.
pub(crate) fn args(netns_fd: RawFd, pid_fd: RawFd) -> Vec<String> {
    let mut args: Vec<String> = [
        "--foreground",
        "--quiet",
        "--runas",
        "0",
        "--config-net",
        "--no-map-gw",
        "-t",
        "none",
        "-u",
        "none",
        "-T",
        "none",
        "-U",
        "none",
        "--no-dhcp",
        "--no-dhcpv6",
        "--no-ra",
        "--netns-only",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--netns".into(),
        format!("/proc/self/fd/{netns_fd}"),
        "--pid".into(),
        format!("/proc/self/fd/{pid_fd}"),
        "--dns-forward".into(),
        DNS_FORWARD.to_string(),
    ]);
    args
}

type Job = Box<dyn FnOnce() + Send>;

/// The launcher thread: PR_SET_PDEATHSIG fires when the parent *thread* exits, so every pasta is
/// forked from this one thread, which lives as long as the process.
fn launcher() -> Result<&'static Mutex<mpsc::Sender<Job>>, String> {
    static LAUNCHER: OnceLock<Result<Mutex<mpsc::Sender<Job>>, String>> = OnceLock::new();
    LAUNCHER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("refinery-pasta-launcher".into())
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                })
                .map_err(|e| format!("starting the pasta launcher thread: {e}"))?;
            Ok(Mutex::new(tx))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Starts pasta on `netns` and waits until it has configured the namespace.
pub(crate) fn start(pasta: &Path, netns: &OwnedFd) -> Result<Pasta, String> {
    let (pid_r, pid_w) = pipe().map_err(|e| format!("creating pasta's pid pipe: {e}"))?;
    let (err_r, err_w) = pipe().map_err(|e| format!("creating pasta's stderr pipe: {e}"))?;
    set_nonblocking(&err_w).map_err(|e| format!("pasta's stderr pipe: {e}"))?;
    set_nonblocking(&err_r).map_err(|e| format!("pasta's stderr pipe: {e}"))?;
    let ns = netns.as_raw_fd();
    let pw = pid_w.as_raw_fd();
    let mut cmd = Command::new(pasta);
    cmd.args(args(ns, pw))
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(err_w));
    // SAFETY: runs in the forked child before exec; prctl and fcntl are async-signal-safe and
    // act on integers / fds that are open in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // Hand over exactly these two fds (everything else of ours is close-on-exec).
            for fd in [ns, pw] {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let binary: PathBuf = pasta.to_path_buf();
    let (tx, rx) = mpsc::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(cmd.spawn());
    });
    launcher()?
        .lock()
        .map_err(|_| "the pasta launcher lock is poisoned".to_string())?
        .send(job)
        .map_err(|_| "the pasta launcher thread is gone".to_string())?;
    let child = rx
        .recv()
        .map_err(|_| "the pasta launcher thread is gone".to_string())?
        .map_err(|e| format!("starting {}: {e}", binary.display()))?;
    // Only pasta holds the write end now: EOF before a pid means it exited.
    drop(pid_w);
    let mut pasta = Pasta {
        child,
        stderr: err_r,
    };
    match wait_ready(&pid_r) {
        Ok(()) => Ok(pasta),
        Err(why) => {
            let _ = pasta.child.kill();
            let status = pasta
                .child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_default();
            let mut log = [0u8; 4096];
            // SAFETY: reads into a valid buffer from our non-blocking pipe end.
            let n =
                unsafe { libc::read(pasta.stderr.as_raw_fd(), log.as_mut_ptr().cast(), log.len()) };
            let log = if n > 0 {
                String::from_utf8_lossy(&log[..n as usize])
                    .trim()
                    .to_string()
            } else {
                String::new()
            };
            Err(format!(
                "{} did not come up ({why}; {status}): {log}",
                binary.display()
            ))
        }
    }
}

/// Reads the pid line pasta writes once it is set up.
fn wait_ready(pid_r: &OwnedFd) -> Result<(), String> {
    let deadline = Instant::now() + READY_BUDGET;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no readiness within {READY_BUDGET:?}"));
        }
        let mut pfd = libc::pollfd {
            fd: pid_r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis())
            .unwrap_or(libc::c_int::MAX)
            .max(1);
        // SAFETY: polls one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        if rc == 0 {
            continue;
        }
        let mut buf = [0u8; 64];
        // SAFETY: reads into a valid buffer.
        let n = unsafe { libc::read(pid_r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("reading its pid: {e}"));
        }
        if n == 0 {
            return Err("it exited before it was ready".into());
        }
        got.extend_from_slice(&buf[..n as usize]);
        if got.contains(&b'\n') {
            return Ok(());
        }
    }
}
