//! Refinery's process-tier sandbox: every function instance runs in its own pid, mount,
//! network, IPC, UTS and cgroup namespaces (its entry as pid 2 under a tiny reaper, pid 1), on a
//! minimal read-only root with masked /proc internals, as its own unprivileged uid without
//! capabilities, under a seccomp deny list (`seccomp.rs`) and a Landlock ruleset (`fs_access.rs`),
//! inside cgroups that cap its memory, pids and CPU and can freeze it — and, per account, a
//! group cgroup whose memory limit caps all of the account's instances together
//! ([`SandboxHost::set_group_limits`]).
//!
//! What this crate owns:
//! - host checks ([`SandboxHost::detect`]) and the cgroup subtree `<cgroup_root_name>` in every
//!   cgroup hierarchy it uses (`<root>/<group>/<instance_id>`), including cleaning up after a
//!   crashed run ([`SandboxHost::cleanup_stale`]);
//! - the sandbox uid range (100000..=165535), one uid per live instance, unique host-wide: each
//!   process hands out uids only from the blocks it claims under `/run/refinery/uids/`
//!   (`uid.rs`, [`owns_uid`]);
//! - creating instances ([`SandboxHost::spawn`]) from one dedicated spawner thread, and their
//!   whole life up to [`SandboxedInstance::destroy`];
//! - the in-sandbox init ([`init_main`]) that builds the sandbox around itself;
//! - pre-initialised runtimes: zygotes that fork instances (`zygote.rs`, Python) and standby
//!   sandboxes that cold starts adopt (`standby.rs`, Python, Node and shell);
//! - outbound network for instances that ask for it (`network/`: one pasta per instance and
//!   an nftables egress filter in its namespace, attached before its code runs; killed with
//!   the instance), enabled by [`SandboxHost::enable_network`].
//!
//! What it must never do:
//! - leak a process, a cgroup or a uid: every instance is destroyed at the latest on drop;
//! - expose anything of the host beyond the mount table in `mounts.rs` (no /sys, no host /tmp,
//!   no data dirs), or let the entry keep any capability, supplementary group or root uid;
//! - touch cgroups outside `<cgroup_root_name>`, or run anything but async-signal-safe code
//!   between clone(2) and execve(2);
//! - interpret the runtime protocol on fds 3/4 beyond the single setup frame.

mod cgroup;
mod error;
mod fs_access;
mod init;
mod instance;
mod job;
mod mounts;
mod network;
mod seccomp;
mod spawn;
mod spec;
mod standby;
mod superblock;
mod uid;
mod zygote;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use cgroup::{CgroupLayout, FreezerState};
pub use error::SandboxError;
pub use init::init_main;
pub use instance::{ExitReport, SandboxedInstance};
pub use job::{JobOutcome, ScratchMount};
pub use network::{Cidr, DNS_FORWARD};
pub use standby::StandbySpec;
pub use uid::{owns_uid, FIRST_UID, LAST_UID, UID_BLOCK_SIZE, UID_LOCK_DIR};
pub use zygote::ZygoteSpec;

use cgroup::{CgroupHost, Limits};
use instance::Pid1;
use mounts::{HostRootfs, InstanceFs};
use network::NetworkHost;
use spec::{InitSpec, Rlimit, RlimitKind};
use standby::Standbys;
use uid::UidLease;
use zygote::{ZygoteConfig, Zygotes};

/// Hostname every instance sees.
pub const HOSTNAME: &str = "refinery";
/// Variables every instance gets besides the block's own.
pub const BASE_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    ("HOME", "/tmp"),
    ("TMPDIR", "/tmp"),
    ("LANG", "C.UTF-8"),
];
/// Working directory of the entry.
const WORKDIR: &str = "/tmp";

/// One row of the seccomp filter every instance runs under (see `seccomp.rs`): a denial, or a
/// quiet answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyscallDenial {
    pub syscall: &'static str,
    /// Its number on this architecture; None = the architecture has no such syscall.
    pub number: Option<i64>,
    /// What a denied call fails with; 0: it returns 0 without running (a no-op).
    pub errno: i32,
    /// A call leaves a kernel audit record (the deny list proper). False for the quiet answers
    /// ordinary code meets (`clone3` → ENOSYS so libc falls back to `clone`, `sync` → 0, ...).
    pub logged: bool,
    /// Only some calls are denied, by argument (e.g. `clone` with a CLONE_NEW* flag).
    pub by_argument: bool,
    pub why: &'static str,
}

/// The seccomp filter, row by row: the deny list (logged), then the quiet answers (for operators'
/// reports and the test suite, which proves every row from inside an instance). Everything
/// else is allowed.
pub fn seccomp_deny_list() -> Vec<SyscallDenial> {
    let logged = seccomp::DENY.iter().map(|d| (d, true));
    let quiet = seccomp::QUIET.iter().map(|d| (d, false));
    logged
        .chain(quiet)
        .map(|(d, logged)| SyscallDenial {
            syscall: d.syscall,
            number: seccomp::nr(d.syscall),
            errno: d.errno,
            logged,
            by_argument: matches!(d.when, seccomp::When::Any(_)),
            why: d.why,
        })
        .collect()
}

/// The egress deny list of network instances as (range, why) rows (see `network/egress.rs`);
/// the host's own addresses are denied as well, the operator's `allow` ranges are exempt.
pub fn egress_deny_list() -> Vec<(&'static str, &'static str)> {
    network::egress::DENY
        .iter()
        .map(|d| (d.cidr, d.why))
        .collect()
}

/// How the sandbox host is set up.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Executable re-exec'd as the in-sandbox init, e.g. /proc/self/exe of `refinery`.
    pub init_exe: PathBuf,
    /// Arguments before anything else, e.g. `vec!["__sandbox-init".into()]`.
    pub init_args: Vec<String>,
    /// A directory the sandbox owns for its state (mount staging dir etc.); created if missing.
    pub state_dir: PathBuf,
    /// Name of the cgroup subtree Refinery owns, e.g. "refinery".
    pub cgroup_root_name: String,
}

/// What an instance runs once the sandbox is set up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// execve this argv inside the sandbox (argv[0] is an absolute path inside the sandbox).
    Exec { argv: Vec<String> },
    /// Don't exec: the init itself calls the builtin runner passed to [`init_main`] after the
    /// sandbox is set up and privileges dropped.
    Builtin { name: String, args: Vec<String> },
    /// Fork the instance from the pre-initialised runtime `zygote` ([`SandboxHost::add_zygote`]),
    /// which builds the same sandbox around the fork and runs its preloaded shim with `args`.
    /// If that zygote is not registered or cannot fork, exec `fallback` instead (when given).
    Fork {
        zygote: String,
        args: Vec<String>,
        fallback: Option<Vec<String>>,
    },
    /// Adopt a waiting sandbox of the standby runtime `runtime` ([`SandboxHost::add_standby`]),
    /// which then serves `args` with the instance's environment. If none is waiting or it
    /// cannot be adopted, start `fallback` instead (when given: a fork or an exec entry).
    Standby {
        runtime: String,
        args: Vec<String>,
        fallback: Option<Box<Entry>>,
    },
}

/// One instance to start.
#[derive(Clone, Debug)]
pub struct InstanceSpec {
    /// Unique, `[a-z0-9-]`; used in cgroup names.
    pub instance_id: String,
    /// The owning account's id (`[a-z0-9-]`); cgroups live at `<root>/<group>/<instance_id>`.
    pub group: String,
    /// Host dir, bind-mounted read-only at /code.
    pub code_dir: PathBuf,
    /// Host dir bind-mounted read-only (and noexec) at /shared: the project shared
    /// directories the block lists, one subdirectory each. `None`: no /shared.
    pub shared_dir: Option<PathBuf>,
    /// Host dir, bind-mounted read-only at /runtime.
    pub runtime_dir: PathBuf,
    pub entry: Entry,
    /// The block's variables: the only environment besides [`BASE_ENV`].
    pub env: BTreeMap<String, String>,
    pub memory_mb: u32,
    /// Size of the private tmpfs /tmp.
    pub tmp_mb: u32,
    pub pids_max: u32,
    /// 100 = one core (cfs quota / cpu.max); 0 = unlimited.
    pub cpu_percent: u32,
    /// Outbound network through pasta and the egress filter (`network = true`); needs
    /// [`SandboxHost::enable_network`]. False: an empty network namespace.
    pub network: bool,
    /// Further host paths bound into the instance (a dependency layer, read-only; a build's
    /// writable scratch dir; a package manager's configuration file), each at one of the
    /// places [`EXTRA_MOUNT_POINTS`] allows.
    pub extra_mounts: Vec<ExtraMount>,
}

/// One host path bound into an instance besides its code and runtime ([`InstanceSpec::extra_mounts`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraMount {
    /// Absolute host path (a directory, or a file for a `/etc/...` destination).
    pub src: PathBuf,
    /// Where inside the instance: one of [`EXTRA_MOUNT_POINTS`], or a file under `/etc/`.
    pub dst: String,
    /// Read-write (only at `/build`); otherwise read-only.
    pub writable: bool,
    /// A read-only directory that may instead be hard-linked into the code dir of an
    /// adopted standby sandbox, at this path relative to `/code` (a standby was started
    /// without this mount, and its Landlock ruleset covers only what existed then). None:
    /// an instance with this mount never adopts a standby sandbox.
    pub standby_at: Option<String>,
}

/// The directories an [`ExtraMount`] may be bound at, and whether it may be writable there:
/// dependency layers (`/deps` for Python's `sys.path`, `/node_modules` where Node's module
/// resolution from `/code` looks last) and a build's scratch dir. Landlock grants exactly
/// these (`fs_access.rs`); a file under `/etc/` (read-only) is the only other destination.
pub const EXTRA_MOUNT_POINTS: &[(&str, bool)] =
    &[("/deps", false), ("/node_modules", false), ("/build", true)];

/// The host ends of an instance's pipes.
#[derive(Debug)]
pub struct Channels {
    /// Host writes here; the instance reads it as its fd 3.
    pub requests: OwnedFd,
    /// The instance writes its fd 4; host reads here.
    pub responses: OwnedFd,
    /// The instance's fd 1 and 2 (stray output, sandbox setup errors); host drains it.
    pub logs: OwnedFd,
}

/// A started instance and its channels.
#[derive(Debug)]
pub struct Spawned {
    pub instance: SandboxedInstance,
    pub channels: Channels,
}

/// A host checked for sandboxing; shared (`Arc`) by everything that spawns instances.
#[derive(Debug)]
pub struct SandboxHost {
    config: HostConfig,
    init_exe: CString,
    cgroups: CgroupHost,
    rootfs: HostRootfs,
    staging_dir: PathBuf,
    landlock_abi: Option<u32>,
    zygotes: Zygotes,
    standbys: Arc<Standbys>,
    /// Set by [`SandboxHost::enable_network`]; None = `network` instances are refused.
    network: Option<NetworkHost>,
}

fn detect_err(what: impl Into<String>, fix: impl Into<String>) -> SandboxError {
    SandboxError::Detect {
        what: what.into(),
        fix: fix.into(),
    }
}

/// `[a-z0-9-]{1,64}`.
fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl SandboxHost {
    /// Checks root, namespaces, the cgroup layout and the controllers needed (memory, pids, cpu,
    /// freezer or v2 cgroup.freeze). An error names the missing feature and how to fix it.
    pub fn detect(config: HostConfig) -> Result<SandboxHost, SandboxError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(detect_err(
                "not running as root",
                "run the Refinery server as root (it needs namespaces, cgroups and uid switching)",
            ));
        }
        for ns in ["pid", "mnt", "net", "ipc", "uts", "cgroup"] {
            if !Path::new("/proc/self/ns").join(ns).exists() {
                return Err(detect_err(
                    format!("the kernel has no {ns} namespaces (/proc/self/ns/{ns} missing)"),
                    format!("use a kernel built with CONFIG_{}_NS", ns.to_uppercase()),
                ));
            }
        }
        let name = &config.cgroup_root_name;
        if name.is_empty()
            || name.starts_with('.')
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(SandboxError::InvalidSpec(format!(
                "cgroup_root_name {name:?} must be a single [A-Za-z0-9._-] path component"
            )));
        }
        let init_exe = CString::new(config.init_exe.as_os_str().as_bytes()).map_err(|_| {
            SandboxError::InvalidSpec(format!(
                "init_exe {} contains a NUL byte",
                config.init_exe.display()
            ))
        })?;
        // SAFETY: access(2) with a valid NUL-terminated path.
        if unsafe { libc::access(init_exe.as_ptr(), libc::X_OK) } != 0 {
            return Err(detect_err(
                format!(
                    "init_exe {} is not an executable file",
                    config.init_exe.display()
                ),
                "point HostConfig::init_exe at the refinery binary (/proc/self/exe)",
            ));
        }
        let staging_dir = config.state_dir.join("rootfs");
        std::fs::create_dir_all(&staging_dir).map_err(|e| {
            detect_err(
                format!(
                    "cannot create the sandbox staging dir {}: {e}",
                    staging_dir.display()
                ),
                "make state_dir a writable local directory",
            )
        })?;
        let cgroups = CgroupHost::detect(name)?;
        let landlock_abi = fs_access::kernel_abi();
        if landlock_abi.is_none() {
            tracing::warn!(
                "the kernel has no Landlock (or it is disabled): instances run without the Landlock \
                 filesystem layer (mount table, uid and seccomp still apply)"
            );
        }
        let zygotes = Zygotes::new(&config.state_dir, &zygote_config(landlock_abi)?)?;
        Ok(SandboxHost {
            config,
            init_exe,
            cgroups,
            rootfs: HostRootfs::probe(),
            staging_dir,
            landlock_abi,
            zygotes,
            standbys: Arc::default(),
            network: None,
        })
    }

    /// Lets instances ask for outbound network ([`InstanceSpec::network`]): checks that `pasta`
    /// (package passt) and `nft` (package nftables) are installed and parses the operator's
    /// exceptions to the egress deny list (`allow`, CIDRs such as `203.0.113.0/24`).
    pub fn enable_network(&mut self, allow: &[String]) -> Result<(), SandboxError> {
        let allow = allow
            .iter()
            .map(|s| s.parse::<Cidr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SandboxError::InvalidSpec(format!("network allow list: {e}")))?;
        let host = NetworkHost::detect(allow).map_err(|(what, fix)| detect_err(what, fix))?;
        self.network = Some(host);
        Ok(())
    }

    /// Whether [`SandboxHost::enable_network`] succeeded.
    pub fn network_enabled(&self) -> bool {
        self.network.is_some()
    }

    /// The Landlock ABI version instances are restricted with (the kernel's), or None when the
    /// kernel has no enabled Landlock and instances run without that layer.
    pub fn landlock_abi(&self) -> Option<u32> {
        self.landlock_abi
    }

    /// Sets the memory limit of the group (account) cgroup `<root>/<group>` that holds all of
    /// the group's instances, creating it if needed: together they can never use more than
    /// `memory_mb` (None = unlimited), whatever the scheduler believes. cgroup v1:
    /// `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes` when swap accounting exists);
    /// v2: `memory.max`. Lowering it below the group's current usage fails once the kernel
    /// cannot reclaim enough (v1: EBUSY) or OOM-kills inside the group (v2).
    pub fn set_group_limits(
        &self,
        group: &str,
        memory_mb: Option<u64>,
    ) -> Result<(), SandboxError> {
        if !valid_id(group) {
            return Err(SandboxError::InvalidSpec(format!(
                "group {group:?} must match [a-z0-9-]{{1,64}}"
            )));
        }
        let bytes = match memory_mb {
            Some(mb) => Some(mb.checked_mul(1024 * 1024).ok_or_else(|| {
                SandboxError::InvalidSpec(format!("group memory limit {mb} MB is too large"))
            })?),
            None => None,
        };
        self.cgroups.set_group_memory(group, bytes)
    }

    pub fn cgroup_layout(&self) -> CgroupLayout {
        self.cgroups.layout()
    }

    /// The `<hierarchy>/<cgroup_root_name>` directories this host owns.
    pub fn cgroup_root_paths(&self) -> Vec<PathBuf> {
        self.cgroups.root_dirs()
    }

    /// Kills processes and removes cgroups left under `cgroup_root_name` by a previous (crashed)
    /// run; returns how many instances it removed. Call it at start-up, before any spawn: it
    /// would also kill this host's live instances.
    pub fn cleanup_stale(&self) -> Result<usize, SandboxError> {
        standby::remove_code_dirs(&self.config.state_dir);
        self.cgroups.cleanup_stale()
    }

    /// Kills every remaining instance and zygote and removes this host's whole cgroup subtree;
    /// call it once, when the server stops. Returns how many instances were still there.
    pub fn release(&self) -> Result<usize, SandboxError> {
        self.zygotes.stop_all();
        self.standbys.stop();
        self.cgroups.release()
    }

    /// Starts a pre-initialised runtime that [`Entry::Fork`] entries naming it fork from
    /// (replacing a running one of the same name). Fails if it does not come up.
    pub fn add_zygote(&self, spec: ZygoteSpec) -> Result<(), SandboxError> {
        self.zygotes.add(spec)
    }

    /// Keeps `spec.count` sandboxes of a runtime that cannot be forked started and waiting
    /// (replacing a runtime of the same name); [`Entry::Standby`] entries naming it adopt one.
    /// A keeper thread starts them in the background, now and after every adoption; one that
    /// fails to start is logged and retried later, its instances starting by exec meanwhile.
    pub fn add_standby(self: &Arc<Self>, spec: StandbySpec) -> Result<(), SandboxError> {
        if !matches!(spec.entry, Entry::Exec { .. } | Entry::Builtin { .. }) {
            return Err(SandboxError::InvalidSpec(format!(
                "standby runtime {}: its entry must be an exec or a builtin",
                spec.name
            )));
        }
        // Starting standbys is work done ahead of time: it yields the CPU to instances.
        self.cgroups
            .set_group_cpu_weight(standby::STANDBY_GROUP, standby::STANDBY_CPU_WEIGHT)?;
        self.standbys.add(Arc::downgrade(self), spec)
    }

    /// How many standby sandboxes are waiting, by runtime (every registered runtime).
    pub fn standby_counts(&self) -> Vec<(String, usize)> {
        self.standbys.waiting()
    }

    /// The uids of the standby sandboxes waiting now (none of them is any account's yet).
    pub fn standby_uids(&self) -> Vec<u32> {
        self.standbys.uids()
    }

    fn validate(&self, spec: &InstanceSpec) -> Result<(), SandboxError> {
        let bad = |m: String| Err(SandboxError::InvalidSpec(m));
        if !valid_id(&spec.instance_id) {
            return bad(format!(
                "instance_id {:?} must match [a-z0-9-]{{1,64}}",
                spec.instance_id
            ));
        }
        if !valid_id(&spec.group) {
            return bad(format!(
                "group {:?} must match [a-z0-9-]{{1,64}}",
                spec.group
            ));
        }
        for (what, dir) in [
            ("code_dir", &spec.code_dir),
            ("runtime_dir", &spec.runtime_dir),
        ]
        .into_iter()
        .chain(spec.shared_dir.as_ref().map(|d| ("shared_dir", d)))
        {
            if !dir.is_absolute() || !dir.is_dir() {
                return bad(format!(
                    "{what} {} is not an existing absolute directory",
                    dir.display()
                ));
            }
        }
        if let Entry::Exec { argv } = &spec.entry {
            if !argv.first().is_some_and(|a| a.starts_with('/')) {
                return bad(format!(
                    "Exec argv {argv:?} must start with an absolute path"
                ));
            }
        }
        if spec.network && self.network.is_none() {
            return bad(format!(
                "instance {} asks for network but this host has outbound network off \
                 (SandboxHost::enable_network was not called)",
                spec.instance_id
            ));
        }
        if spec.memory_mb == 0 || spec.tmp_mb == 0 || spec.pids_max == 0 {
            return bad("memory_mb, tmp_mb and pids_max must be positive".into());
        }
        for k in spec.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return bad(format!("environment variable name {k:?} is invalid"));
            }
        }
        for m in &spec.extra_mounts {
            let point = EXTRA_MOUNT_POINTS.iter().find(|(p, _)| *p == m.dst);
            let etc_file = m.dst.starts_with("/etc/")
                && !m.dst.contains("/../")
                && !m.dst.ends_with("/..")
                && m.src.is_file();
            let ok = match point {
                Some((_, may_write)) => m.src.is_dir() && (*may_write || !m.writable),
                None => etc_file && !m.writable,
            };
            if !ok || !m.src.is_absolute() {
                return bad(format!(
                    "extra mount {} at {} is not allowed: a directory at one of {:?} (writable \
                     only at /build) or a read-only file under /etc/",
                    m.src.display(),
                    m.dst,
                    EXTRA_MOUNT_POINTS
                        .iter()
                        .map(|(p, _)| *p)
                        .collect::<Vec<_>>()
                ));
            }
        }
        Ok(())
    }

    fn init_spec(
        &self,
        spec: &InstanceSpec,
        entry: Entry,
        uid: u32,
        procs: Vec<PathBuf>,
    ) -> InitSpec {
        let fs = InstanceFs {
            code_dir: &spec.code_dir,
            shared_dir: spec.shared_dir.as_deref(),
            runtime_dir: &spec.runtime_dir,
            tmp_mb: spec.tmp_mb,
            uid,
            gid: uid,
            hostname: HOSTNAME,
            extra: &spec.extra_mounts,
        };
        let env = instance_env(spec);
        let mut mounts = mounts::layout(&self.rootfs, &fs);
        if spec.network {
            network::adjust_mounts(&mut mounts);
        }
        InitSpec {
            instance_id: spec.instance_id.clone(),
            cgroup_procs: procs,
            staging_dir: self.staging_dir.clone(),
            mounts,
            hostname: HOSTNAME.into(),
            workdir: WORKDIR.into(),
            uid,
            gid: uid,
            // No RLIMIT_NPROC: it counts every process of the *real uid* host-wide and is only
            // checked at fork, while the pids cgroup (pids_max) bounds the instance's processes
            // and threads exactly, including zombies, and cannot be raised from inside.
            rlimits: vec![
                Rlimit {
                    kind: RlimitKind::Core,
                    limit: 0,
                },
                Rlimit {
                    kind: RlimitKind::NoFile,
                    limit: 1024,
                },
                Rlimit {
                    kind: RlimitKind::FSize,
                    limit: u64::from(spec.tmp_mb) * 1024 * 1024,
                },
            ],
            env,
            entry,
        }
    }

    /// Starts an instance. Synchronous and fast (a few ms); callers run it in spawn_blocking.
    pub fn spawn(&self, spec: &InstanceSpec) -> Result<Spawned, SandboxError> {
        self.validate(spec)?;
        match &spec.entry {
            Entry::Fork {
                zygote,
                args,
                fallback,
            } => {
                // A forked child builds its sandbox and runs at once; the network hook needs the
                // instance to wait for it, which only the exec-started init does.
                let forked = if spec.network {
                    Err(SandboxError::Zygote {
                        zygote: zygote.clone(),
                        what: "network instances start by exec".into(),
                    })
                } else if self.zygotes.has(zygote) {
                    self.start(spec, Launch::Fork { zygote, args })
                } else {
                    Err(SandboxError::Zygote {
                        zygote: zygote.clone(),
                        what: "not started".into(),
                    })
                };
                match (forked, fallback) {
                    (Ok(spawned), _) => Ok(spawned),
                    (Err(e), Some(argv)) => {
                        tracing::debug!(error = %e, "zygote unavailable; starting by exec");
                        self.start(spec, Launch::Exec(Entry::Exec { argv: argv.clone() }))
                    }
                    (Err(e), None) => Err(e),
                }
            }
            Entry::Standby {
                runtime,
                args,
                fallback,
            } => {
                // Network instances need their hook before the entry starts (see above).
                let adopted = if spec.network {
                    Err(SandboxError::Standby {
                        runtime: runtime.clone(),
                        what: "network instances start by exec".into(),
                    })
                } else {
                    self.adopt(spec, runtime, args)
                };
                match (adopted, fallback) {
                    (Ok(spawned), _) => Ok(spawned),
                    (Err(e), Some(fallback)) => {
                        tracing::debug!(error = %e, "no standby sandbox adopted; starting its fallback");
                        let mut fallback_spec = spec.clone();
                        fallback_spec.entry = (**fallback).clone();
                        self.spawn(&fallback_spec)
                    }
                    (Err(e), None) => Err(e),
                }
            }
            entry => self.start(spec, Launch::Exec(entry.clone())),
        }
    }

    /// Creates the cgroups `<root>/<group>/<instance_id>` of `spec`, with its limits.
    fn instance_cgroups(
        &self,
        spec: &InstanceSpec,
    ) -> Result<cgroup::InstanceCgroups, SandboxError> {
        let limits = Limits {
            memory_mb: spec.memory_mb,
            pids_max: spec.pids_max,
            cpu_percent: spec.cpu_percent,
        };
        self.cgroups
            .create_instance(&spec.group, &spec.instance_id, &limits)
    }

    fn start(&self, spec: &InstanceSpec, launch: Launch<'_>) -> Result<Spawned, SandboxError> {
        let uid = UidLease::allocate()?;
        let cgroups = self.instance_cgroups(spec)?;
        let remove = |cg: &cgroup::InstanceCgroups| {
            let _ = cg.remove(std::time::Duration::from_millis(500));
        };
        let (host_fds, child_fds) = match spawn::channels() {
            Ok(c) => c,
            Err(source) => {
                remove(&cgroups);
                return Err(SandboxError::Channels {
                    instance: spec.instance_id.clone(),
                    source,
                });
            }
        };
        let entry = match &launch {
            Launch::Exec(entry) => entry.clone(),
            Launch::Fork { zygote, args } => Entry::Fork {
                zygote: zygote.to_string(),
                args: args.to_vec(),
                fallback: None,
            },
        };
        let init = self.init_spec(spec, entry, uid.uid(), cgroups.procs_files());
        // Both kinds of first process read this same frame from their own fd 3 (so the zygote
        // never sees what an instance is for).
        let launched = spec::encode(&init)
            .map_err(|e| SandboxError::InvalidSpec(format!("encoding the setup spec: {e}")))
            .and_then(|frame| {
                let pid1 = match launch {
                    Launch::Exec(_) => Pid1::Child(self.clone_init(&init, &child_fds)?),
                    Launch::Fork { zygote, .. } => {
                        let (pid, pidfd, zygote) = self.zygotes.fork(zygote, &child_fds)?;
                        Pid1::Forked { pid, pidfd, zygote }
                    }
                };
                Ok((pid1, frame))
            });
        let (pid1, frame) = match launched {
            Ok(l) => l,
            Err(e) => {
                remove(&cgroups);
                return Err(e);
            }
        };
        drop(child_fds);
        // From here on the instance owns the process: dropping it on error destroys everything.
        let instance = SandboxedInstance::new(spec.instance_id.clone(), pid1, cgroups, uid);
        // Network hook: the namespace exists, the init waits for its setup frame (none of
        // the block's code has run). Connect it now or not at all. (Network instances are
        // never forked: see `spawn`.)
        if let (true, Some(net)) = (spec.network, &self.network) {
            match net.attach(instance.pid()) {
                Ok(attachment) => instance.set_network(attachment),
                Err(what) => {
                    let _ = instance.destroy();
                    return Err(SandboxError::Network {
                        instance: spec.instance_id.clone(),
                        what,
                    });
                }
            }
        }
        if let Err(source) = spawn::write_frame(&host_fds.requests, &frame) {
            let _ = instance.destroy();
            return Err(SandboxError::SendSpec {
                instance: spec.instance_id.clone(),
                log: spawn::drain_log(&host_fds.logs),
                source,
            });
        }
        Ok(Spawned {
            instance,
            channels: Channels {
                requests: host_fds.requests,
                responses: host_fds.responses,
                logs: host_fds.logs,
            },
        })
    }

    /// clone(2) the Rust init into fresh namespaces; returns its pid.
    fn clone_init(
        &self,
        init: &InitSpec,
        child_fds: &spawn::ChildFds,
    ) -> Result<libc::pid_t, SandboxError> {
        let mut argv = vec![self.init_exe.clone()];
        for a in &self.config.init_args {
            argv.push(CString::new(a.as_bytes()).map_err(|_| {
                SandboxError::InvalidSpec(format!("init arg {a:?} contains a NUL byte"))
            })?);
        }
        let pid = spawn::clone_on_spawner(
            self.init_exe.clone(),
            argv,
            child_fds,
            spawn::INSTANCE_NAMESPACES,
        )?
        .map_err(|source| SandboxError::Clone {
            instance: init.instance_id.clone(),
            source,
        })?;
        Ok(pid)
    }
}

/// The complete environment of an instance: [`BASE_ENV`], overridden and extended by the
/// block's variables.
fn instance_env(spec: &InstanceSpec) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = BASE_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in &spec.env {
        env.retain(|(have, _)| have != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// How [`SandboxHost::start`] creates the instance's first process.
enum Launch<'a> {
    /// clone(2) the Rust init, which execs or runs this entry.
    Exec(Entry),
    /// Fork from a zygote.
    Fork { zygote: &'a str, args: &'a [String] },
}

/// What every zygote fork needs besides its [`InitSpec`], computed once per host.
fn zygote_config(landlock_abi: Option<u32>) -> Result<ZygoteConfig, SandboxError> {
    let programs = seccomp::programs().map_err(|e| SandboxError::InvalidSpec(e.to_string()))?;
    Ok(ZygoteConfig {
        kind: "config",
        sys: zygote::syscall_numbers(),
        root_tmpfs_options: mounts::ROOT_TMPFS_OPTIONS,
        seccomp: programs
            .iter()
            .map(|p| zygote::SeccompProgram {
                log: p.log,
                code: p.bpf.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect(),
            })
            .collect(),
        landlock: fs_access::plan(landlock_abi),
    })
}
