//! Jobs: an instance that runs one program to its end instead of serving invocations (a
//! dependency build), with its output read line by line as it comes, a wall-clock limit,
//! and a size-limited host scratch directory ([`ScratchMount`]) it may write.
//!
//! A job is an instance like any other ([`SandboxHost::spawn`] with an `Exec` entry: same
//! namespaces, uid, cgroup limits, seccomp and Landlock); only the host's side differs.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{InstanceSpec, SandboxError, SandboxHost, Spawned};

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    /// The program's wait status as the init reported it ("exit 0", "exit 1", "signal 9").
    pub exit: String,
    /// The kernel OOM-killed a process of the job (its memory limit).
    pub oom_killed: bool,
    /// It ran past its time limit and was killed.
    pub timed_out: bool,
    /// Wall-clock time from spawn to its end.
    pub duration: Duration,
    /// Output lines dropped once the job had written more than the log cap.
    pub lines_dropped: u64,
}

impl JobOutcome {
    /// Exited with status 0, within its limits.
    pub fn succeeded(&self) -> bool {
        self.exit == "exit 0" && !self.oom_killed && !self.timed_out
    }
}

/// At most this many bytes of a job's output are passed on (the rest is counted).
pub const JOB_LOG_CAP_BYTES: usize = 4 * 1024 * 1024;
/// A line longer than this is passed on in pieces.
const MAX_LINE: usize = 16 * 1024;

impl SandboxHost {
    /// Runs `spec` (an `Exec` entry) to its end, at most `limit`: each line it writes to
    /// stdout or stderr goes to `on_line` as it comes (the first [`JOB_LOG_CAP_BYTES`]).
    /// Blocking: callers run it on a blocking thread. The instance is destroyed before this
    /// returns, whatever happened.
    pub fn run_job(
        &self,
        spec: &InstanceSpec,
        limit: Duration,
        mut on_line: impl FnMut(&str),
    ) -> Result<JobOutcome, SandboxError> {
        let started = Instant::now();
        let Spawned { instance, channels } = self.spawn(spec)?;
        let deadline = started + limit;
        let fd = channels.logs;
        let mut pending: Vec<u8> = Vec::new();
        let mut passed = 0usize;
        let mut dropped = 0u64;
        let mut timed_out = false;
        let mut emit = |line: &[u8], passed: &mut usize, dropped: &mut u64| {
            if *passed >= JOB_LOG_CAP_BYTES {
                *dropped += 1;
                return;
            }
            *passed += line.len() + 1;
            on_line(String::from_utf8_lossy(line).trim_end_matches('\r'));
        };
        let mut buf = [0u8; 8192];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                timed_out = true;
                break;
            }
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let wait_ms =
                libc::c_int::try_from(left.as_millis().clamp(1, 1000)).unwrap_or(libc::c_int::MAX);
            // SAFETY: polls one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, wait_ms) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            if pfd.revents == 0 {
                continue;
            }
            // SAFETY: reads at most buf.len() bytes into memory we own.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                break; // every process holding its stdout/stderr has exited
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    continue;
                }
                break;
            }
            pending.extend_from_slice(&buf[..n as usize]);
            while let Some(at) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=at).collect();
                emit(&line[..line.len() - 1], &mut passed, &mut dropped);
            }
            while pending.len() > MAX_LINE {
                let piece: Vec<u8> = pending.drain(..MAX_LINE).collect();
                emit(&piece, &mut passed, &mut dropped);
            }
        }
        if !pending.is_empty() {
            emit(&pending, &mut passed, &mut dropped);
        }
        if !timed_out {
            // Output ends when the program exits; its reaper (pid 1) follows a moment later.
            // Let it, so the status is the program's own rather than destroy's SIGKILL.
            let until = Instant::now() + Duration::from_secs(2);
            while !instance.has_exited() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let report = instance.destroy()?;
        Ok(JobOutcome {
            exit: report.exit,
            oom_killed: report.oom_killed,
            timed_out,
            duration: started.elapsed(),
            lines_dropped: dropped,
        })
    }
}

/// A size-limited tmpfs mounted on the host at a directory of the caller's (a job's
/// writable scratch dir: a build can fill it up to `size_mb` and no further), unmounted
/// (lazily) and removed on drop. Its memory is charged to whoever writes it: the job's
/// cgroup.
#[derive(Debug)]
pub struct ScratchMount {
    path: PathBuf,
}

impl ScratchMount {
    /// Creates `path` (which must not exist; its parent must) and mounts a tmpfs of
    /// `size_mb` on it, world-writable (the job's uid is not known until it starts; nothing
    /// else can reach it when the parent is private to root).
    pub fn mount(path: &Path, size_mb: u32) -> io::Result<ScratchMount> {
        std::fs::create_dir(path)?;
        let scratch = ScratchMount {
            path: path.to_path_buf(),
        };
        let dst = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let options = CString::new(format!("size={size_mb}m,mode=0777"))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                dst.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(scratch)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts every scratch mount left directly under `parent` by a crashed run, and
    /// removes the directories.
    pub fn remove_stale(parent: &Path) {
        let Ok(entries) = std::fs::read_dir(parent) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            detach(&path);
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn detach(path: &Path) {
    if let Ok(c) = CString::new(path.as_os_str().as_bytes()) {
        // SAFETY: umount2 with a NUL-terminated path; failure (not a mount point) is fine.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

impl Drop for ScratchMount {
    fn drop(&mut self) {
        detach(&self.path);
        let _ = std::fs::remove_dir(&self.path);
    }
}
