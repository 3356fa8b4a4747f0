//! A running instance: freeze/thaw, OOM state and the one way it ends, [`SandboxedInstance::destroy`].

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::cgroup::{FreezerState, InstanceCgroups};
use crate::network::Attachment;
use crate::uid::UidLease;
use crate::SandboxError;

/// How long destroy waits for the init to be reaped after SIGKILL.
const REAP_BUDGET: Duration = Duration::from_secs(5);
/// How long destroy retries rmdir of a busy cgroup.
const RMDIR_BUDGET: Duration = Duration::from_secs(2);
/// How long freeze() waits for the kernel to report Frozen.
/// Longest [`SandboxedInstance::freeze`] waits for killed stragglers to leave the cgroup; a
/// process stuck in the kernel past it is frozen as it is (and dies on thaw or destroy).
const STRAGGLER_WAIT: Duration = Duration::from_millis(50);

/// How an instance ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitReport {
    /// The kernel OOM-killed a process of the instance.
    pub oom_killed: bool,
    /// The init's wait status: "exit N", "signal N", or "unknown" if someone else reaped it.
    pub exit: String,
}

#[derive(Debug)]
struct State {
    uid: Option<UidLease>,
    /// Wait status of the init once reaped.
    exit: Option<String>,
    report: Option<ExitReport>,
    /// The pasta of a network instance; dropped (pasta killed) once the instance is reaped.
    network: Option<Attachment>,
    /// A host directory of this instance's own bound at its /code (adopted standby
    /// sandboxes), removed once the instance is reaped.
    code_copy: Option<PathBuf>,
}

/// How the host holds an instance's pid 1.
#[derive(Debug)]
pub(crate) enum Pid1 {
    /// Cloned by the host: its child, reaped with waitpid. Idle, the instance holds two
    /// processes: the reaper (pid 1) and the entry.
    Child(libc::pid_t),
    /// Forked by a zygote (which reaps it): watched and signalled through a pidfd, so a reused
    /// pid can never be hit. Idle, the instance is one process: the runtime as pid 1.
    Forked {
        pid: libc::pid_t,
        pidfd: OwnedFd,
        /// The zygote's pidfd: once it is readable the zygote is gone, and so is this
        /// instance (at the latest when thawed).
        zygote: std::sync::Arc<OwnedFd>,
    },
}

impl Pid1 {
    fn pid(&self) -> libc::pid_t {
        match self {
            Pid1::Child(pid) | Pid1::Forked { pid, .. } => *pid,
        }
    }

    /// Processes of a healthy idle instance.
    fn idle_processes(&self) -> usize {
        match self {
            Pid1::Child(_) => 2,
            Pid1::Forked { .. } => 1,
        }
    }

    fn kill(&self) {
        match self {
            // SAFETY: kill(2) on our own unreaped child (the pid cannot have been reused).
            Pid1::Child(pid) => unsafe {
                libc::kill(*pid, libc::SIGKILL);
            },
            // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo.
            Pid1::Forked { pidfd, .. } => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    pidfd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0u32,
                );
            },
        }
    }
}

/// One sandboxed instance. Destroyed (processes killed, cgroups removed) on drop at the latest.
#[derive(Debug)]
pub struct SandboxedInstance {
    id: String,
    pid1: Pid1,
    cgroups: InstanceCgroups,
    state: Mutex<State>,
}

impl SandboxedInstance {
    pub(crate) fn new(id: String, pid1: Pid1, cgroups: InstanceCgroups, uid: UidLease) -> Self {
        SandboxedInstance {
            id,
            pid1,
            cgroups,
            state: Mutex::new(State {
                uid: Some(uid),
                exit: None,
                report: None,
                network: None,
                code_copy: None,
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Host pid of the namespace's init (pid 1 inside).
    pub fn pid(&self) -> i32 {
        self.pid1.pid()
    }

    /// The instance's uid (= gid) inside and outside the sandbox.
    pub fn uid(&self) -> Option<u32> {
        self.lock().uid.as_ref().map(UidLease::uid)
    }

    pub(crate) fn set_network(&self, attachment: Attachment) {
        self.lock().network = Some(attachment);
    }

    pub(crate) fn set_code_copy(&self, dir: PathBuf) {
        self.lock().code_copy = Some(dir);
    }

    /// The host directory bound at this instance's /code when it is its own copy.
    pub(crate) fn code_copy(&self) -> Option<PathBuf> {
        self.lock().code_copy.clone()
    }

    /// Gives the instance a new id and cgroups (an adopted standby sandbox, whose processes
    /// were just moved into `cgroups`); returns the old cgroups for the caller to remove.
    pub(crate) fn rehome(&mut self, id: String, cgroups: InstanceCgroups) -> InstanceCgroups {
        self.id = id;
        std::mem::replace(&mut self.cgroups, cgroups)
    }

    pub(crate) fn move_processes_to(&self, to: &InstanceCgroups) -> std::io::Result<()> {
        self.cgroups.move_processes_to(to)
    }

    /// Host pid of the instance's pasta (network instances only).
    pub fn pasta_pid(&self) -> Option<u32> {
        self.lock().network.as_ref().map(Attachment::pasta_pid)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Freezes at once when the instance holds nothing but its idle processes — the common
    /// case, a few microseconds, fine on an async worker. None when stragglers are still
    /// dying: call [`SandboxedInstance::freeze`] (which waits for them) off the async workers.
    pub fn freeze_if_settled(&self) -> Option<Result<(), SandboxError>> {
        let count = self.cgroups.process_count().unwrap_or(usize::MAX);
        if count > self.pid1.idle_processes() {
            return None;
        }
        Some(self.freeze_now())
    }

    fn freeze_now(&self) -> Result<(), SandboxError> {
        self.cgroups
            .set_frozen(true)
            .map_err(|source| SandboxError::Freeze {
                instance: self.id.clone(),
                path: self.cgroups.freeze_file(),
                source,
            })
    }

    /// Freeze every process of the instance. Does not wait for the kernel to report the cgroup
    /// frozen (v1 passes through FREEZING): nothing needs that confirmation, and thawing a
    /// freezing cgroup is fine, so the invocation's reply is not held up by it.
    ///
    /// First it gives the processes the entry killed after its invocation a moment to finish
    /// dying: a SIGKILLed task that gets frozen before it runs again stays in the cgroup,
    /// dead-on-thaw, until the next invocation.
    pub fn freeze(&self) -> Result<(), SandboxError> {
        self.wait_for_stragglers();
        self.freeze_now()
    }

    /// Waits (at most [`STRAGGLER_WAIT`]) until the cgroup holds only the processes of an idle
    /// instance ([`Pid1::idle_processes`]). Exited tasks leave `cgroup.procs` before they are
    /// reaped, so zombies don't count. Costs one small read when there is nothing to wait for.
    fn wait_for_stragglers(&self) {
        let deadline = Instant::now() + STRAGGLER_WAIT;
        let mut pause = Duration::from_micros(50);
        loop {
            let count = self.cgroups.process_count().unwrap_or(0);
            if count <= self.pid1.idle_processes() || Instant::now() >= deadline {
                return;
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    pub fn thaw(&self) -> Result<(), SandboxError> {
        self.cgroups
            .set_frozen(false)
            .map_err(|source| SandboxError::Thaw {
                instance: self.id.clone(),
                path: self.cgroups.freeze_file(),
                source,
            })
    }

    /// The freezer state as the kernel reports it.
    pub fn freezer_state(&self) -> Result<FreezerState, SandboxError> {
        self.cgroups
            .freezer_state()
            .map_err(|source| SandboxError::FreezerState {
                instance: self.id.clone(),
                path: self.cgroups.freeze_file(),
                source,
            })
    }

    pub fn cgroup_paths(&self) -> Vec<PathBuf> {
        self.cgroups.paths()
    }

    /// The kernel OOM-killed a process of this instance.
    pub fn oom_killed(&self) -> bool {
        if let Some(r) = &self.lock().report {
            return r.oom_killed;
        }
        self.cgroups.oom_killed()
    }

    /// Whether the instance's pid 1 has exited (a cheap non-blocking check; the status is kept
    /// for [`SandboxedInstance::destroy`]).
    pub fn has_exited(&self) -> bool {
        let mut state = self.lock();
        if state.exit.is_none() {
            state.exit = self.try_reap();
        }
        state.exit.is_some()
    }

    /// Reap the init without blocking; Some(status) once it has exited.
    fn try_reap(&self) -> Option<String> {
        let pid = match &self.pid1 {
            Pid1::Child(pid) => *pid,
            Pid1::Forked { pidfd, zygote, .. } => {
                return if exited(pidfd) {
                    Some("exited (reaped by its zygote)".to_string())
                } else if exited(zygote) {
                    Some("killed with its zygote".to_string())
                } else {
                    None
                };
            }
        };
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
        if rc == pid {
            Some(if libc::WIFEXITED(status) {
                format!("exit {}", libc::WEXITSTATUS(status))
            } else if libc::WIFSIGNALED(status) {
                format!("signal {}", libc::WTERMSIG(status))
            } else {
                format!("status {status}")
            })
        } else if rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            Some("unknown".into())
        } else {
            None
        }
    }

    /// SIGKILL the init (and with it the whole pid namespace), thaw, reap, remove the cgroups,
    /// free the uid. Idempotent; blocks for a bounded time.
    pub fn destroy(&self) -> Result<ExitReport, SandboxError> {
        let mut state = self.lock();
        if let Some(r) = &state.report {
            return Ok(r.clone());
        }
        if state.exit.is_none() {
            state.exit = self.try_reap();
        }
        if state.exit.is_none() {
            let deadline = Instant::now() + REAP_BUDGET;
            let mut pause = Duration::from_micros(50);
            loop {
                self.pid1.kill();
                self.cgroups.kill_all();
                // v1: frozen tasks only die once thawed.
                let _ = self.cgroups.set_frozen(false);
                if let Some(exit) = self.try_reap() {
                    state.exit = Some(exit);
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(SandboxError::Destroy {
                        instance: self.id.clone(),
                        what: format!(
                            "pid {} not reaped {REAP_BUDGET:?} after SIGKILL",
                            self.pid1.pid()
                        ),
                    });
                }
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(10));
            }
        }
        // The namespace's init is gone, so is every process of its pid namespace. Free the uid
        // and remove the cgroups (processes leave a v1 cgroup asynchronously: retry while busy).
        state.uid = None;
        state.network = None;
        if let Some(dir) = state.code_copy.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        let oom_killed = self.cgroups.oom_killed();
        if !self.cgroups.is_empty() {
            self.cgroups.kill_all();
            let _ = self.cgroups.set_frozen(false);
        }
        self.cgroups
            .remove(RMDIR_BUDGET)
            .map_err(|(path, e)| SandboxError::Destroy {
                instance: self.id.clone(),
                what: format!("removing cgroup {}: {e}", path.display()),
            })?;
        let report = ExitReport {
            oom_killed,
            exit: state.exit.clone().unwrap_or_else(|| "unknown".into()),
        };
        state.report = Some(report.clone());
        Ok(report)
    }
}

impl Drop for SandboxedInstance {
    fn drop(&mut self) {
        if let Err(e) = self.destroy() {
            tracing::error!(instance = %self.id, error = %e, "destroying sandbox instance on drop failed");
        }
    }
}

/// Whether the process behind `pidfd` has exited (a pidfd is readable from then on).
fn exited(pidfd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd without waiting.
    unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
}
