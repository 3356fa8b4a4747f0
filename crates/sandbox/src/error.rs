//! The crate's error type: one variant per operation, each message saying what failed, where, and
//! how to fix it when there is something an operator can do.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong on the host side of the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The host cannot run sandboxes (not root, no namespaces, missing cgroup controller, ...).
    #[error("sandbox host check failed: {what}; fix: {fix}")]
    Detect { what: String, fix: String },

    /// The caller's [`crate::InstanceSpec`] or [`crate::HostConfig`] is invalid.
    #[error("invalid sandbox configuration: {0}")]
    InvalidSpec(String),

    /// Every uid of this process's uid blocks is in use and every other block of the range is
    /// held by another Refinery process on this host.
    #[error(
        "no free sandbox uid in {first}..={last}: this process's blocks are all in use by live instances and every other block is held by other Refinery processes on this host (lock files in {dir}); destroy some instances or stop another server"
    )]
    UidExhausted { first: u32, last: u32, dir: PathBuf },

    /// A uid block's lock file could not be created or locked.
    #[error("claiming a block of sandbox uids through {path}: {source}; the sandbox needs a writable /run/refinery/uids on a filesystem with flock(2) (run as root)")]
    UidLock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Creating a cgroup directory or writing one of its limit files failed.
    #[error("setting up cgroup {path}: {source}; check that the cgroup filesystem is writable by root and the controller is enabled")]
    CgroupSetup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Creating the pipes or /dev/null handle for a new instance failed.
    #[error("creating the channels of instance {instance}: {source}; check the process fd limit (ulimit -n)")]
    Channels {
        instance: String,
        #[source]
        source: io::Error,
    },

    /// clone(2) of the in-sandbox init failed.
    #[error("clone(2) of the init of instance {instance} failed: {source}; the kernel must allow pid/mount/net/ipc/uts namespaces (check user.max_*_namespaces sysctls and that we run as root)")]
    Clone {
        instance: String,
        #[source]
        source: io::Error,
    },

    /// Attaching a network instance's pasta or egress filter failed.
    #[error("connecting instance {instance} to the network: {what}")]
    Network { instance: String, what: String },

    /// A standby sandbox could not be adopted (the caller starts the instance by exec).
    #[error("standby runtime `{runtime}`: {what}")]
    Standby { runtime: String, what: String },

    /// The dedicated spawner thread is gone (it never exits on its own; this is a bug).
    #[error("the sandbox spawner thread is gone")]
    SpawnerGone,

    /// Writing the setup frame to the new init failed (it died during start-up).
    #[error("sending the setup spec to instance {instance} failed: {source}; the init died during start-up: {log}")]
    SendSpec {
        instance: String,
        log: String,
        #[source]
        source: io::Error,
    },

    /// A zygote could not start or fork an instance.
    #[error("zygote `{zygote}`: {what}")]
    Zygote { zygote: String, what: String },

    /// Freezing an instance's cgroup failed.
    #[error("freezing instance {instance} via {path}: {source}")]
    Freeze {
        instance: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Thawing an instance's cgroup failed.
    #[error("thawing instance {instance} via {path}: {source}")]
    Thaw {
        instance: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Reading the kernel's freezer state failed.
    #[error("reading the freezer state of instance {instance} from {path}: {source}")]
    FreezerState {
        instance: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Destroying an instance did not complete (process not reaped or cgroup not removable).
    #[error("destroying instance {instance}: {what}")]
    Destroy { instance: String, what: String },

    /// Removing leftovers of a previous run failed.
    #[error("cleaning up stale cgroup {path}: {source}; kill the processes listed in its cgroup.procs and rmdir it by hand")]
    CleanupStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
