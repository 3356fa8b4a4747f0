//! Reconfiguring a mounted filesystem's superblock from the host with fspick(2) and
//! fsconfig(2): unlike a `mount -o remount`, it leaves the mount's own flags (nosuid, nodev,
//! …) alone, and it works on a mount of another mount namespace reached through
//! `/proc/<pid>/root`, without entering that namespace.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const FSPICK_CLOEXEC: libc::c_uint = 1;
const FSPICK_SYMLINK_NOFOLLOW: libc::c_uint = 2;
const FSPICK_NO_AUTOMOUNT: libc::c_uint = 4;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_RECONFIGURE: libc::c_uint = 7;

/// One superblock parameter.
pub(crate) enum Param<'a> {
    /// A flag such as cgroup2's `favordynmods`.
    Flag(&'a str),
    /// A key and its value, such as tmpfs's `size`.
    Value(&'a str, &'a str),
}

fn cstring(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Applies `params` to the superblock of the filesystem mounted at `mount` (which must be a
/// mount's root: fspick refuses anything else; symlinks are not followed). Filesystems that
/// reset what is not given on reconfiguration (cgroup2 does) need all their options passed.
pub(crate) fn reconfigure(mount: &Path, params: &[Param<'_>]) -> io::Result<()> {
    let path = cstring(mount.as_os_str().as_bytes())?;
    // SAFETY: fspick with a valid NUL-terminated path; returns a new fd or -1.
    let raw = unsafe {
        libc::syscall(
            libc::SYS_fspick,
            libc::AT_FDCWD,
            path.as_ptr(),
            FSPICK_CLOEXEC | FSPICK_SYMLINK_NOFOLLOW | FSPICK_NO_AUTOMOUNT,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new fd nobody else owns.
    let fs_fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    for param in params {
        let (command, key, value) = match param {
            Param::Flag(key) => (FSCONFIG_SET_FLAG, cstring(key.as_bytes())?, None),
            Param::Value(key, value) => (
                FSCONFIG_SET_STRING,
                cstring(key.as_bytes())?,
                Some(cstring(value.as_bytes())?),
            ),
        };
        let value_ptr = value.as_ref().map_or(std::ptr::null(), |v| v.as_ptr());
        // SAFETY: fsconfig on our fs fd with a valid key and a valid or null value.
        if unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs_fd.as_raw_fd(),
                command,
                key.as_ptr(),
                value_ptr,
                0,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: fsconfig command without key or value.
    if unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs_fd.as_raw_fd(),
            FSCONFIG_CMD_RECONFIGURE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
