//! Loading the egress ruleset into an instance's network namespace with the `nft` binary
//! (Debian package `nftables`), entered with setns(2) between fork and exec.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs `nft -f -` inside the namespace `netns` with `ruleset` on stdin.
pub(crate) fn load(nft: &Path, netns: &OwnedFd, ruleset: &str) -> Result<(), String> {
    let ns = netns.as_raw_fd();
    let mut cmd = Command::new(nft);
    cmd.args(["-f", "-"])
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and makes one
    // async-signal-safe syscall on an fd that is open in the parent (and so in the child).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", nft.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error means nft died early; its exit status and stderr say why.
        let _ = stdin.write_all(ruleset.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {}: {e}", nft.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} -f - failed ({}): {}",
            nft.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
