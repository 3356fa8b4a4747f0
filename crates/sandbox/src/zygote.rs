//! Pre-initialised runtimes ("zygotes"): one long-lived interpreter per language that has
//! already paid its start-up cost and forks every new instance of that language.
//!
//! A zygote is started by the host on the spawner thread (so it dies with the server), as root,
//! in the host's namespaces, with an empty environment and one open descriptor: the host end of
//! a `SOCK_SEQPACKET` control socket (its fd 3). Its own stdout/stderr are the server's stderr.
//! The protocol (one datagram per message, descriptors as `SCM_RIGHTS`) is documented at the top
//! of `zygote_python.py`, the only zygote so far. The fork reads the same host-built setup frame
//! as the Rust init, from its own requests pipe, and builds the same sandbox; the constant parts
//! (syscall numbers, the compiled seccomp filters, the Landlock masks) are sent to the zygote
//! once, at start, in [`ZygoteConfig`].
//!
//! The forked instance is not the host's child: the host holds a pidfd of it (sent by the
//! zygote, which opens it before it could reap the pid), signals through it and polls it to see
//! the instance exit. The zygote reaps its children.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use nix::sys::time::TimeVal;
use serde::Serialize;

use crate::spawn::{self, ChildFds};
use crate::SandboxError;

/// The Python zygote's source, written into the sandbox state dir at start.
const PYTHON_ZYGOTE_SOURCE: &str = include_str!("zygote_python.py");
const PYTHON_ZYGOTE_FILE: &str = "zygote_python.py";
/// How long a zygote may take to start (import its shim) or to answer one fork.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest reply a zygote sends (a pid or an error message).
const MAX_REPLY: usize = 64 * 1024;

/// A pre-initialised runtime the host keeps running.
#[derive(Clone, Debug)]
pub struct ZygoteSpec {
    /// What [`crate::Entry::Fork`] names it by, e.g. "python".
    pub name: String,
    /// The interpreter and its flags (host paths), e.g. `["/usr/bin/python3", "-I", "-B"]`.
    pub interpreter: Vec<String>,
    /// The language shim (a host path) the zygote imports before it forks anything: every
    /// instance starts with it loaded. It must hold no account's code or data.
    pub preload: PathBuf,
}

/// What every fork needs and the zygote keeps: sent once, as the first message.
#[derive(Serialize, Debug)]
pub(crate) struct ZygoteConfig {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Syscall numbers of this architecture for calls libc has no wrapper for.
    pub sys: HashMap<&'static str, i64>,
    pub root_tmpfs_options: &'static str,
    /// The compiled seccomp filters, in installation order.
    pub seccomp: Vec<SeccompProgram>,
    /// None: the kernel has no Landlock.
    pub landlock: Option<crate::fs_access::LandlockPlan>,
}

/// One compiled seccomp filter as the zygote installs it (`seccomp::Program`).
#[derive(Serialize, Debug)]
pub(crate) struct SeccompProgram {
    /// Install with `SECCOMP_FILTER_FLAG_LOG` (its refusals leave audit records).
    pub log: bool,
    /// `[code, jt, jf, k]` instructions.
    pub code: Vec<(u16, u8, u8, u32)>,
}

struct Running {
    pid: libc::pid_t,
    control: OwnedFd,
    /// A pidfd of the zygote, shared with every instance it forked: they die with it (their
    /// parent-death signal) — a frozen one only once thawed — so they check it.
    alive: Arc<OwnedFd>,
}

struct Slot {
    spec: ZygoteSpec,
    running: Option<Running>,
}

/// The host's zygotes, by name. One fork at a time per host: a fork takes about a millisecond
/// and the zygote serves one request at a time anyway.
pub(crate) struct Zygotes {
    script: PathBuf,
    config: Vec<u8>,
    slots: Mutex<HashMap<String, Slot>>,
}

impl std::fmt::Debug for Zygotes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zygotes")
            .field("script", &self.script)
            .finish_non_exhaustive()
    }
}

fn zygote_err(name: &str, what: impl Into<String>) -> SandboxError {
    SandboxError::Zygote {
        zygote: name.to_string(),
        what: what.into(),
    }
}

impl Zygotes {
    /// Writes the zygote program into `state_dir`; starts nothing yet.
    pub(crate) fn new(state_dir: &Path, config: &ZygoteConfig) -> Result<Zygotes, SandboxError> {
        let script = state_dir.join(PYTHON_ZYGOTE_FILE);
        std::fs::write(&script, PYTHON_ZYGOTE_SOURCE)
            .map_err(|e| SandboxError::InvalidSpec(format!("writing {}: {e}", script.display())))?;
        let config = serde_json::to_vec(config)
            .map_err(|e| SandboxError::InvalidSpec(format!("encoding the zygote config: {e}")))?;
        Ok(Zygotes {
            script,
            config,
            slots: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers and starts a zygote (replacing one of the same name).
    pub(crate) fn add(&self, spec: ZygoteSpec) -> Result<(), SandboxError> {
        let mut slots = self.lock();
        if let Some(old) = slots.remove(&spec.name) {
            if let Some(running) = old.running {
                stop(running);
            }
        }
        let running = self.start(&spec)?;
        slots.insert(
            spec.name.clone(),
            Slot {
                spec,
                running: Some(running),
            },
        );
        Ok(())
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Forks an instance from zygote `name` with `child` as its fds 0..=4; the instance then
    /// waits for its setup frame on its requests pipe (fd 3), which the caller writes.
    /// Returns the instance's host pid, a pidfd of it, and the zygote's pidfd. A zygote found
    /// dead is restarted once.
    pub(crate) fn fork(
        &self,
        name: &str,
        child: &ChildFds,
    ) -> Result<(libc::pid_t, OwnedFd, Arc<OwnedFd>), SandboxError> {
        // Only descriptors go through the zygote, never what the instance is for: the zygote's
        // memory, which every later fork inherits, must hold nothing of any account.
        let message = br#"{"type":"fork"}"#;
        let fds = [
            child.stdin.as_raw_fd(),
            child.log.as_raw_fd(),
            child.requests.as_raw_fd(),
            child.responses.as_raw_fd(),
        ];
        let mut slots = self.lock();
        let slot = slots
            .get_mut(name)
            .ok_or_else(|| zygote_err(name, "no such zygote"))?;
        let mut restarted = false;
        loop {
            let running = match slot.running.take() {
                Some(r) => r,
                None => self.start(&slot.spec)?,
            };
            match round_trip(&running.control, message, &fds) {
                Ok((reply, pidfd)) => {
                    let zygote = running.alive.clone();
                    slot.running = Some(running);
                    let (pid, pidfd) = parse_fork_reply(name, &reply, pidfd)?;
                    return Ok((pid, pidfd, zygote));
                }
                Err(e) => {
                    stop(running);
                    if restarted {
                        return Err(zygote_err(name, format!("fork request failed: {e}")));
                    }
                    restarted = true;
                    tracing::warn!(zygote = name, error = %e, "zygote gone; restarting it");
                }
            }
        }
    }

    fn start(&self, spec: &ZygoteSpec) -> Result<Running, SandboxError> {
        let name = spec.name.as_str();
        let err = |what: String| zygote_err(name, what);
        let (host_end, child_end) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| err(format!("socketpair: {e}")))?;
        let mut argv = spec.interpreter.clone();
        argv.push(self.script.display().to_string());
        argv.push(spec.preload.display().to_string());
        let exe = argv
            .first()
            .cloned()
            .ok_or_else(|| err("empty interpreter argv".into()))?;
        let cstr = |s: &str| {
            std::ffi::CString::new(s).map_err(|_| err(format!("{s:?} contains a NUL byte")))
        };
        let argv_c = argv
            .iter()
            .map(|a| cstr(a))
            .collect::<Result<Vec<_>, _>>()?;
        let child = spawn::zygote_fds(child_end).map_err(|e| err(format!("fds: {e}")))?;
        let pid = spawn::clone_on_spawner(cstr(&exe)?, argv_c, &child, 0)?
            .map_err(|e| err(format!("clone: {e}")))?;
        // SAFETY: pidfd_open on our own unreaped child; returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            kill_and_reap(pid);
            return Err(err(format!("pidfd_open: {e}")));
        }
        // SAFETY: `raw` is a fresh pidfd nobody else owns.
        let alive = Arc::new(unsafe { OwnedFd::from_raw_fd(raw as RawFd) });
        drop(child);
        let running = Running {
            pid,
            control: host_end,
            alive,
        };
        let timeout = TimeVal::new(REPLY_TIMEOUT.as_secs() as _, 0);
        let ready = setsockopt(&running.control, sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| e.to_string())
            .and_then(|()| round_trip(&running.control, &self.config, &[]).map(|(r, _)| r));
        match ready {
            Ok(reply) if is_ready(&reply) => {
                tracing::info!(zygote = name, pid, "pre-initialised runtime ready");
                Ok(running)
            }
            Ok(reply) => {
                stop(running);
                Err(err(format!(
                    "unexpected first reply {:?}",
                    String::from_utf8_lossy(&reply)
                )))
            }
            Err(e) => {
                stop(running);
                Err(err(format!(
                    "did not start ({e}); its error, if any, is on the server's stderr (is {exe} \
                     installed?)"
                )))
            }
        }
    }

    /// Kills every zygote (at shutdown).
    pub(crate) fn stop_all(&self) {
        for (_, slot) in self.lock().iter_mut() {
            if let Some(running) = slot.running.take() {
                stop(running);
            }
        }
    }
}

fn is_ready(reply: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(reply)
        .is_ok_and(|v| v.get("type").and_then(|t| t.as_str()) == Some("ready"))
}

fn parse_fork_reply(
    name: &str,
    reply: &[u8],
    pidfd: Option<OwnedFd>,
) -> Result<(libc::pid_t, OwnedFd), SandboxError> {
    let value: serde_json::Value = serde_json::from_slice(reply)
        .map_err(|e| zygote_err(name, format!("unreadable reply: {e}")))?;
    if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
        return Err(zygote_err(name, format!("fork failed: {error}")));
    }
    let pid = value
        .get("pid")
        .and_then(|p| p.as_i64())
        .and_then(|p| libc::pid_t::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| zygote_err(name, "reply without a pid"))?;
    let pidfd = pidfd.ok_or_else(|| zygote_err(name, "reply without a pidfd"))?;
    Ok((pid, pidfd))
}

/// Sends one message (with `fds`) and reads one reply (with at most one fd).
fn round_trip(
    control: &OwnedFd,
    message: &[u8],
    fds: &[RawFd],
) -> Result<(Vec<u8>, Option<OwnedFd>), String> {
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        control.as_raw_fd(),
        &[IoSlice::new(message)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| format!("sending: {e}"))?;
    let mut buf = vec![0u8; MAX_REPLY];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (len, fd) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            control.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| format!("receiving: {e}"))?;
        let mut received = None;
        for cmsg in msg.cmsgs().map_err(|e| format!("receiving: {e}"))? {
            if let ControlMessageOwned::ScmRights(list) = cmsg {
                for raw in list {
                    // SAFETY: the kernel just installed `raw` in our table for us alone.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    if received.is_none() {
                        received = Some(fd);
                    }
                }
            }
        }
        (msg.bytes, received)
    };
    if len == 0 {
        return Err("the zygote closed its socket (it exited)".into());
    }
    buf.truncate(len);
    Ok((buf, fd))
}

/// Kills and reaps a zygote. Its instances die with it (their parent-death signal): a zygote
/// is only stopped at shutdown or when it stopped answering.
fn stop(running: Running) {
    drop(running.control);
    kill_and_reap(running.pid);
}

fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: kill and waitpid on a child of this process that nobody else reaps.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), libc::__WALL);
    }
}

/// The syscall numbers the zygote calls through `syscall(2)`.
pub(crate) fn syscall_numbers() -> HashMap<&'static str, i64> {
    HashMap::from([
        ("pivot_root", libc::SYS_pivot_root),
        ("capset", libc::SYS_capset),
        ("seccomp", libc::SYS_seccomp),
        ("landlock_create_ruleset", libc::SYS_landlock_create_ruleset),
        ("landlock_add_rule", libc::SYS_landlock_add_rule),
        ("landlock_restrict_self", libc::SYS_landlock_restrict_self),
        ("pidfd_open", libc::SYS_pidfd_open),
    ])
}
