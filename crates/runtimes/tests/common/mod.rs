//! Runs real shims as child processes on the host, the way the sandbox would but without
//! isolation: protocol pipes on fds 3 and 4, a clean environment.

#![allow(dead_code)] // each test binary uses a different subset

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use nix::fcntl::OFlag;
use refinery_domain::Language;
use refinery_runtimes::{entry_in, install, InstanceChannel};
use tempfile::TempDir;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A running shim; killed and reaped on drop.
pub struct Running {
    pub channel: InstanceChannel,
    pub child: Child,
    pub code_dir: PathBuf,
    _dirs: (TempDir, TempDir),
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two pipes: (host write end, child read end) and (child write end, host read end).
pub fn pipes() -> io::Result<((OwnedFd, OwnedFd), (OwnedFd, OwnedFd))> {
    let (req_r, req_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (resp_r, resp_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    Ok(((req_w, req_r), (resp_w, resp_r)))
}

/// Spawns `language`'s shim on `source_name` = `code` (plus `extra` files in the code dir)
/// with its protocol pipes on fds 3 and 4.
pub fn spawn_raw(
    language: Language,
    source_name: &str,
    code: &str,
    extra: &[(&str, &str)],
) -> Result<Raw, Box<dyn std::error::Error>> {
    let runtime_dir = tempfile::tempdir()?;
    install(runtime_dir.path())?;
    let code_dir = tempfile::tempdir()?;
    for (name, bytes) in refinery_runtimes::code_files(language, source_name, code) {
        fs::write(code_dir.path().join(name), bytes)?;
    }
    for (name, text) in extra {
        fs::write(code_dir.path().join(name), text)?;
    }
    let Some(argv) = entry_in(
        language,
        source_name,
        runtime_dir.path().to_str().ok_or("non-UTF-8 tempdir")?,
        code_dir.path().to_str().ok_or("non-UTF-8 tempdir")?,
    )
    .exec_argv()
    .map(<[String]>::to_vec) else {
        return Err("not an exec entry".into());
    };

    let ((req_w, req_r), (resp_w, resp_r)) = pipes()?;
    let (child_in, child_out) = (req_r.as_raw_fd(), resp_w.as_raw_fd());
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null());
    protocol_fds_in_child(&mut command, child_in, child_out);
    let child = command.spawn()?;
    drop((req_r, resp_w));
    Ok(Raw {
        child,
        requests: req_w,
        responses: resp_r,
        dirs: (runtime_dir, code_dir),
    })
}

/// A shim process with the host ends of its pipes not yet wrapped.
pub struct Raw {
    pub child: Child,
    pub requests: OwnedFd,
    pub responses: OwnedFd,
    pub dirs: (TempDir, TempDir),
}

/// Starts `language`'s shim on `source_name` = `code`, plus `extra` files in the code dir.
pub fn start(
    language: Language,
    source_name: &str,
    code: &str,
    extra: &[(&str, &str)],
) -> Result<Running, Box<dyn std::error::Error>> {
    let Raw {
        child,
        requests,
        responses,
        dirs: (runtime_dir, code_dir),
    } = spawn_raw(language, source_name, code, extra)?;
    let channel = InstanceChannel::new(requests, responses)?;
    Ok(Running {
        channel,
        child,
        code_dir: code_dir.path().to_path_buf(),
        _dirs: (runtime_dir, code_dir),
    })
}

/// Makes `command`'s child see `requests` as fd 3 and `responses` as fd 4, the shims'
/// protocol fds.
pub fn protocol_fds_in_child(
    command: &mut Command,
    requests: std::os::fd::RawFd,
    responses: std::os::fd::RawFd,
) {
    // SAFETY: the closure only calls fcntl, dup2 and close, which are async-signal-safe,
    // and touches no memory shared with the parent.
    unsafe {
        command.pre_exec(move || {
            // Move both ends above 3/4 first so neither dup2 clobbers the other.
            let a = libc::fcntl(requests, libc::F_DUPFD, 10);
            let b = libc::fcntl(responses, libc::F_DUPFD, 10);
            if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::close(a);
            libc::close(b);
            Ok(())
        });
    }
}
