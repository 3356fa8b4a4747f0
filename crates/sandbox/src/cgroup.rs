//! Cgroups: layout detection (v1, v2, hybrid), per-instance cgroups with limits, freeze/thaw,
//! kill, OOM detection and removal.
//!
//! Instance cgroups live at `<hierarchy>/<root_name>/<group>/<instance_id>` in every hierarchy the
//! sandbox uses. The limits written there are the [`LIMITS`] table.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::superblock::{self, Param};
use crate::SandboxError;

/// How the host's cgroup filesystems are arranged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Only cgroup v1 hierarchies (one per controller or co-mounted).
    V1,
    /// Only the unified cgroup v2 hierarchy.
    V2,
    /// v1 controller hierarchies plus a controller-less cgroup2 mount (e.g. /sys/fs/cgroup/unified).
    Hybrid,
}

impl fmt::Display for CgroupLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupLayout::V1 => "cgroup v1",
            CgroupLayout::V2 => "cgroup v2",
            CgroupLayout::Hybrid => "hybrid (cgroup v1 controllers + cgroup v2 unified)",
        })
    }
}

/// Kernel freezer state of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreezerState {
    Thawed,
    Freezing,
    Frozen,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Controller {
    Memory,
    Pids,
    Cpu,
    Freezer,
}

impl Controller {
    const ALL: [Controller; 4] = [
        Controller::Memory,
        Controller::Pids,
        Controller::Cpu,
        Controller::Freezer,
    ];
    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
            Controller::Freezer => "freezer",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// Limits of one instance, in the units the caller speaks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub memory_mb: u32,
    pub pids_max: u32,
    /// 100 = one core; 0 = unlimited.
    pub cpu_percent: u32,
}

const CPU_PERIOD_US: u64 = 100_000;

fn memory_bytes(l: &Limits) -> String {
    (u64::from(l.memory_mb) * 1024 * 1024).to_string()
}
fn zero(_: &Limits) -> String {
    "0".into()
}
fn pids(l: &Limits) -> String {
    l.pids_max.to_string()
}
fn cpu_period(_: &Limits) -> String {
    CPU_PERIOD_US.to_string()
}
fn cpu_quota_v1(l: &Limits) -> String {
    match cpu_quota_us(l) {
        Some(q) => q.to_string(),
        None => "-1".into(),
    }
}
fn cpu_max_v2(l: &Limits) -> String {
    match cpu_quota_us(l) {
        Some(q) => format!("{q} {CPU_PERIOD_US}"),
        None => format!("max {CPU_PERIOD_US}"),
    }
}
fn cpu_quota_us(l: &Limits) -> Option<u64> {
    // The kernel's minimum quota is 1 ms.
    (l.cpu_percent > 0).then(|| (u64::from(l.cpu_percent) * CPU_PERIOD_US / 100).max(1000))
}

/// One limit file written into every new instance cgroup.
struct LimitRow {
    version: Version,
    controller: Controller,
    file: &'static str,
    value: fn(&Limits) -> String,
    /// Skip silently when the kernel does not offer the file (e.g. no swap accounting).
    optional: bool,
}

/// Every limit the sandbox sets, in the order it is written (memsw must follow the memory limit).
#[rustfmt::skip]
const LIMITS: &[LimitRow] = &[
    // cgroup v1
    LimitRow { version: Version::V1, controller: Controller::Memory, file: "memory.limit_in_bytes",       value: memory_bytes, optional: false },
    LimitRow { version: Version::V1, controller: Controller::Memory, file: "memory.memsw.limit_in_bytes", value: memory_bytes, optional: true },
    LimitRow { version: Version::V1, controller: Controller::Pids,   file: "pids.max",                    value: pids,         optional: false },
    LimitRow { version: Version::V1, controller: Controller::Cpu,    file: "cpu.cfs_period_us",           value: cpu_period,   optional: false },
    LimitRow { version: Version::V1, controller: Controller::Cpu,    file: "cpu.cfs_quota_us",            value: cpu_quota_v1, optional: false },
    // cgroup v2
    LimitRow { version: Version::V2, controller: Controller::Memory, file: "memory.max",                  value: memory_bytes, optional: false },
    LimitRow { version: Version::V2, controller: Controller::Memory, file: "memory.swap.max",             value: zero,         optional: true },
    LimitRow { version: Version::V2, controller: Controller::Pids,   file: "pids.max",                    value: pids,         optional: false },
    LimitRow { version: Version::V2, controller: Controller::Cpu,    file: "cpu.max",                     value: cpu_max_v2,   optional: false },
];

/// What v2 parents must delegate to their children (`cgroup.subtree_control`).
const V2_SUBTREE_CONTROL: &str = "+memory +pids +cpu";

/// One mounted hierarchy the sandbox uses.
#[derive(Clone, Debug)]
struct Hierarchy {
    mount: PathBuf,
    version: Version,
    /// Controllers the sandbox uses from this hierarchy (v2: freezer = cgroup.freeze).
    controllers: Vec<Controller>,
}

/// The host's cgroup arrangement, detected once.
#[derive(Clone, Debug)]
pub(crate) struct CgroupHost {
    layout: CgroupLayout,
    hierarchies: Vec<Hierarchy>,
    root_name: String,
}

fn detect_err(what: impl Into<String>, fix: impl Into<String>) -> SandboxError {
    SandboxError::Detect {
        what: what.into(),
        fix: fix.into(),
    }
}

/// Undo the octal escapes (`\040`) of /proc/self/mountinfo paths.
fn unescape_mount_path(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The mounts of a mountinfo text as (mount point, filesystem type, superblock options).
fn mounts(text: &str) -> impl Iterator<Item = (PathBuf, &str, &str)> {
    text.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mountpoint = unescape_mount_path(left.split(' ').nth(4)?);
        let mut right = right.split(' ');
        let (Some(fstype), _, Some(super_opts)) = (right.next(), right.next(), right.next()) else {
            return None;
        };
        Some((mountpoint, fstype, super_opts))
    })
}

/// Cgroup mounts found in a mountinfo text: (v1 controller -> mountpoint, first cgroup2 mountpoint).
fn parse_mountinfo(text: &str) -> (Vec<(Controller, PathBuf)>, Option<PathBuf>) {
    let mut v1: Vec<(Controller, PathBuf)> = Vec::new();
    let mut v2: Option<PathBuf> = None;
    for (mountpoint, fstype, super_opts) in mounts(text) {
        match fstype {
            // Prefer the canonical location if several are mounted.
            "cgroup2" if v2.is_none() || mountpoint == Path::new("/sys/fs/cgroup") => {
                v2 = Some(mountpoint);
            }
            "cgroup" => {
                for opt in super_opts.split(',') {
                    for c in Controller::ALL {
                        if opt == c.name() && !v1.iter().any(|(have, _)| *have == c) {
                            v1.push((c, mountpoint.clone()));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    (v1, v2)
}

/// The superblock options of the cgroup2 filesystem mounted at `mount`, from mountinfo.
fn v2_super_options(mountinfo: &str, mount: &Path) -> Option<Vec<String>> {
    mounts(mountinfo)
        .find(|(mountpoint, fstype, _)| *fstype == "cgroup2" && mountpoint == mount)
        .map(|(_, _, options)| options.split(',').map(str::to_string).collect())
}

/// Turns on cgroup2's `favordynmods` (Linux 6.0+) unless already on. Every cold start moves
/// processes between cgroups (the init joins its cgroups; an adopted standby sandbox moves
/// into its block's), and without it each such move on an otherwise quiet host waits for an
/// RCU grace period on the kernel's global cgroup lock — measured here at ≈ 10 ms per move,
/// more than a whole Python cold start. With it, moves cost ≈ 0.1 ms, and forks and exits a
/// little more (the kernel's trade-off, documented with the option). The option is global to
/// the kernel and shared by every hierarchy, so setting it on the v2 mount helps the v1
/// controllers of a hybrid host too. Failing is not fatal: cold starts are slower.
fn favor_dynamic_modifications(mountinfo: &str, mount: &Path) {
    let Some(options) = v2_super_options(mountinfo, mount) else {
        return;
    };
    if options.iter().any(|o| o == "favordynmods") {
        return;
    }
    // cgroup2 resets every flag not given on reconfiguration: pass the current ones again.
    let mut params: Vec<Param<'_>> = options
        .iter()
        .filter(|o| !matches!(o.as_str(), "rw" | "ro"))
        .map(|o| Param::Flag(o))
        .collect();
    params.push(Param::Flag("favordynmods"));
    let outcome = superblock::reconfigure(mount, &params).and_then(|()| {
        // Outside the initial cgroup namespace the kernel accepts and ignores it.
        let now = fs::read_to_string("/proc/self/mountinfo")?;
        match v2_super_options(&now, mount) {
            Some(options) if options.iter().any(|o| o == "favordynmods") => Ok(()),
            _ => Err(io::Error::other("the kernel did not apply it")),
        }
    });
    match outcome {
        Ok(()) => {
            tracing::info!(mount = %mount.display(), "cgroup2 favordynmods on: moving processes between cgroups no longer waits for RCU grace periods")
        }
        Err(e) => {
            tracing::warn!(mount = %mount.display(), error = %e, "cannot turn on cgroup2 favordynmods (Linux 6.0+, initial cgroup namespace); each cold start may wait ≈ 10 ms for the kernel's cgroup lock")
        }
    }
}

impl CgroupHost {
    /// Detect the layout from /proc/self/mountinfo and check every needed controller.
    pub(crate) fn detect(root_name: &str) -> Result<CgroupHost, SandboxError> {
        let text = fs::read_to_string("/proc/self/mountinfo").map_err(|e| {
            detect_err(
                format!("cannot read /proc/self/mountinfo: {e}"),
                "mount /proc",
            )
        })?;
        let (v1, v2) = parse_mountinfo(&text);
        let has_v1_memory = v1.iter().any(|(c, _)| *c == Controller::Memory);
        let host = if has_v1_memory || (!v1.is_empty() && v2.is_none()) {
            let mut hierarchies: Vec<Hierarchy> = Vec::new();
            for c in Controller::ALL {
                let Some((_, mount)) = v1.iter().find(|(have, _)| *have == c) else {
                    return Err(detect_err(
                        format!("cgroup v1 controller `{}` is not mounted", c.name()),
                        format!(
                            "mount it (mount -t cgroup -o {0} cgroup /sys/fs/cgroup/{0}) or boot with the unified cgroup v2 hierarchy",
                            c.name()
                        ),
                    ));
                };
                match hierarchies.iter_mut().find(|h| &h.mount == mount) {
                    Some(h) => h.controllers.push(c),
                    None => hierarchies.push(Hierarchy {
                        mount: mount.clone(),
                        version: Version::V1,
                        controllers: vec![c],
                    }),
                }
            }
            // The unified hierarchy of a hybrid host adds cgroup.kill and cgroup.freeze (see
            // `InstanceCgroups::freezer_dir`): use it when we may create cgroups there and it
            // has cgroup.freeze (Linux 5.2+), otherwise run as plain v1.
            let usable_v2 = v2.filter(|mount| {
                let root = mount.join(root_name);
                mkdir_exist_ok(&root).is_ok() && root.join("cgroup.freeze").exists()
            });
            let layout = match usable_v2 {
                Some(mount) => {
                    hierarchies.push(Hierarchy {
                        mount,
                        version: Version::V2,
                        controllers: Vec::new(),
                    });
                    CgroupLayout::Hybrid
                }
                None => CgroupLayout::V1,
            };
            CgroupHost {
                layout,
                hierarchies,
                root_name: root_name.to_string(),
            }
        } else if let Some(mount) = v2 {
            let available = fs::read_to_string(mount.join("cgroup.controllers")).map_err(|e| {
                detect_err(
                    format!(
                        "cannot read {}: {e}",
                        mount.join("cgroup.controllers").display()
                    ),
                    "mount cgroup2 read-write at /sys/fs/cgroup",
                )
            })?;
            let available: BTreeSet<&str> = available.split_whitespace().collect();
            for c in [Controller::Memory, Controller::Pids, Controller::Cpu] {
                if !available.contains(c.name()) {
                    return Err(detect_err(
                        format!(
                            "cgroup v2 controller `{}` is not available in {}",
                            c.name(),
                            mount.display()
                        ),
                        "enable it in the kernel / parent cgroup's cgroup.subtree_control, or delegate it to Refinery (systemd: Delegate=yes)",
                    ));
                }
            }
            CgroupHost {
                layout: CgroupLayout::V2,
                hierarchies: vec![Hierarchy {
                    mount,
                    version: Version::V2,
                    controllers: Controller::ALL.to_vec(),
                }],
                root_name: root_name.to_string(),
            }
        } else {
            return Err(detect_err(
                "no cgroup filesystem is mounted",
                "mount cgroup2 at /sys/fs/cgroup (mount -t cgroup2 none /sys/fs/cgroup)",
            ));
        };
        host.prepare_roots()?;
        if let Some(mount) = host
            .hierarchies
            .iter()
            .find(|h| h.version == Version::V2)
            .map(|h| h.mount.clone())
        {
            favor_dynamic_modifications(&text, &mount);
        }
        Ok(host)
    }

    pub(crate) fn layout(&self) -> CgroupLayout {
        self.layout
    }

    pub(crate) fn root_dirs(&self) -> Vec<PathBuf> {
        self.hierarchies
            .iter()
            .map(|h| h.mount.join(&self.root_name))
            .collect()
    }

    /// Create `<root_name>` in every hierarchy; on v2 delegate the controllers into it and check
    /// that the kernel offers cgroup.freeze.
    fn prepare_roots(&self) -> Result<(), SandboxError> {
        for h in &self.hierarchies {
            let root = h.mount.join(&self.root_name);
            mkdir_exist_ok(&root).map_err(|e| {
                detect_err(
                    format!("cannot create cgroup {}: {e}", root.display()),
                    "run as root with the cgroup filesystem mounted read-write",
                )
            })?;
            if h.version == Version::V2 {
                if !h.controllers.is_empty() {
                    for dir in [&h.mount, &root] {
                        write_file(&dir.join("cgroup.subtree_control"), V2_SUBTREE_CONTROL).map_err(|e| detect_err(
                            format!("cannot enable {V2_SUBTREE_CONTROL} in {}/cgroup.subtree_control: {e}", dir.display()),
                            "the cgroup must have no processes of its own (move the server into a leaf cgroup) and the controllers must be delegated to it",
                        ))?;
                    }
                }
                // Hybrid was checked for cgroup.freeze when its layout was chosen.
                if self.layout == CgroupLayout::V2 && !root.join("cgroup.freeze").exists() {
                    return Err(detect_err(
                        "cgroup v2 has no cgroup.freeze (kernel older than 5.2)",
                        "upgrade the kernel to 5.2 or newer",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Create the cgroups of one instance and write its limits.
    pub(crate) fn create_instance(
        &self,
        group: &str,
        instance_id: &str,
        limits: &Limits,
    ) -> Result<InstanceCgroups, SandboxError> {
        let mut cg = InstanceCgroups {
            layout: self.layout,
            dirs: Vec::new(),
            freezer: std::sync::OnceLock::new(),
            procs: std::sync::OnceLock::new(),
        };
        for h in &self.hierarchies {
            let dir = self.group_dir(h, group)?.join(instance_id);
            let setup_err = |path: &Path, source: io::Error| SandboxError::CgroupSetup {
                path: path.to_path_buf(),
                source,
            };
            fs::create_dir(&dir).map_err(|e| setup_err(&dir, e))?;
            cg.dirs.push(CgroupDir {
                path: dir.clone(),
                version: h.version,
                controllers: h.controllers.clone(),
            });
            for row in LIMITS
                .iter()
                .filter(|r| r.version == h.version && h.controllers.contains(&r.controller))
            {
                let file = dir.join(row.file);
                match write_file(&file, &(row.value)(limits)) {
                    Ok(()) => {}
                    Err(e) if row.optional && e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        let _ = cg.remove(Duration::from_millis(200));
                        return Err(setup_err(&file, e));
                    }
                }
            }
        }
        Ok(cg)
    }

    /// Creates `<root_name>/<group>` in hierarchy `h` if missing (on v2, with the controllers
    /// delegated down to it) and returns its path.
    fn group_dir(&self, h: &Hierarchy, group: &str) -> Result<PathBuf, SandboxError> {
        let setup_err = |path: &Path, source: io::Error| SandboxError::CgroupSetup {
            path: path.to_path_buf(),
            source,
        };
        let root = h.mount.join(&self.root_name);
        let group_dir = root.join(group);
        for dir in [&root, &group_dir] {
            mkdir_exist_ok(dir).map_err(|e| setup_err(dir, e))?;
            if h.version == Version::V2 && !h.controllers.is_empty() {
                write_file(&dir.join("cgroup.subtree_control"), V2_SUBTREE_CONTROL)
                    .map_err(|e| setup_err(dir, e))?;
            }
        }
        Ok(group_dir)
    }

    /// Sets the CPU weight of the group cgroup `<root_name>/<group>` against its siblings
    /// (100 = the default share; v2 `cpu.weight`, v1 `cpu.shares` scaled from 1024), creating
    /// it if needed. It only matters when the CPU is contended.
    pub(crate) fn set_group_cpu_weight(
        &self,
        group: &str,
        weight: u32,
    ) -> Result<(), SandboxError> {
        for h in &self.hierarchies {
            let group_dir = self.group_dir(h, group)?;
            if !h.controllers.contains(&Controller::Cpu) {
                continue;
            }
            let (file, value) = match h.version {
                Version::V2 => ("cpu.weight", weight.clamp(1, 10_000)),
                Version::V1 => ("cpu.shares", (weight.saturating_mul(1024) / 100).max(2)),
            };
            let file = group_dir.join(file);
            write_file(&file, &value.to_string()).map_err(|source| SandboxError::CgroupSetup {
                path: file.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Create `<root_name>/<group>` in every hierarchy (as [`Self::create_instance`] would) and
    /// set its memory limit in the hierarchy that has the memory controller. `None` = unlimited.
    pub(crate) fn set_group_memory(
        &self,
        group: &str,
        bytes: Option<u64>,
    ) -> Result<(), SandboxError> {
        let setup_err = |path: &Path, source: io::Error| SandboxError::CgroupSetup {
            path: path.to_path_buf(),
            source,
        };
        for h in &self.hierarchies {
            let group_dir = self.group_dir(h, group)?;
            if !h.controllers.contains(&Controller::Memory) {
                continue;
            }
            match h.version {
                Version::V2 => {
                    let value = bytes.map_or_else(|| "max".to_string(), |b| b.to_string());
                    let file = group_dir.join("memory.max");
                    write_file(&file, &value).map_err(|e| setup_err(&file, e))?;
                }
                Version::V1 => {
                    let value = bytes.map_or_else(|| "-1".to_string(), |b| b.to_string());
                    let mem = group_dir.join("memory.limit_in_bytes");
                    let memsw = group_dir.join("memory.memsw.limit_in_bytes");
                    let has_memsw = memsw.exists();
                    // The kernel keeps memory <= memory+swap at every step: lower the memory
                    // limit first; when raising, the memsw limit must go first (EINVAL).
                    match write_file(&mem, &value) {
                        Ok(()) => {
                            if has_memsw {
                                write_file(&memsw, &value).map_err(|e| setup_err(&memsw, e))?;
                            }
                        }
                        Err(e) if has_memsw && e.raw_os_error() == Some(libc::EINVAL) => {
                            write_file(&memsw, &value).map_err(|e| setup_err(&memsw, e))?;
                            write_file(&mem, &value).map_err(|e| setup_err(&mem, e))?;
                        }
                        Err(e) => return Err(setup_err(&mem, e)),
                    }
                }
            }
        }
        Ok(())
    }

    /// Kill and remove every instance cgroup (and group dir) under `<root_name>`.
    pub(crate) fn cleanup_stale(&self) -> Result<usize, SandboxError> {
        let mut instances: BTreeSet<(String, String)> = BTreeSet::new();
        let mut all: Vec<InstanceCgroups> = Vec::new();
        for h in &self.hierarchies {
            let root = h.mount.join(&self.root_name);
            for group in subdirs(&root) {
                for inst in subdirs(&group) {
                    let key = (name_of(&group), name_of(&inst));
                    instances.insert(key);
                    all.push(InstanceCgroups {
                        freezer: std::sync::OnceLock::new(),
                        procs: std::sync::OnceLock::new(),
                        layout: self.layout,
                        dirs: vec![CgroupDir {
                            path: inst,
                            version: h.version,
                            controllers: h.controllers.clone(),
                        }],
                    });
                }
            }
        }
        for cg in &all {
            cg.kill_all();
            cg.set_frozen(false).ok();
        }
        for cg in &all {
            cg.remove(Duration::from_secs(2))
                .map_err(|(path, source)| SandboxError::CleanupStale { path, source })?;
        }
        for h in &self.hierarchies {
            for group in subdirs(&h.mount.join(&self.root_name)) {
                rmdir_retry(&group, Duration::from_secs(1)).map_err(|source| {
                    SandboxError::CleanupStale {
                        path: group,
                        source,
                    }
                })?;
            }
        }
        Ok(instances.len())
    }

    /// Kill what is left, then remove `<root_name>` itself from every hierarchy: nothing of
    /// this host stays in the cgroup tree after it stops.
    pub(crate) fn release(&self) -> Result<usize, SandboxError> {
        let removed = self.cleanup_stale()?;
        for root in self.root_dirs() {
            rmdir_retry(&root, Duration::from_secs(1))
                .map_err(|source| SandboxError::CleanupStale { path: root, source })?;
        }
        Ok(removed)
    }
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .collect()
}

fn mkdir_exist_ok(p: &Path) -> io::Result<()> {
    match fs::create_dir(p) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

fn write_file(p: &Path, value: &str) -> io::Result<()> {
    // Plain open+write without O_CREAT: cgroup files must already exist.
    use std::io::Write;
    let mut f = fs::OpenOptions::new().write(true).open(p)?;
    f.write_all(value.as_bytes())
}

fn rmdir_retry(p: &Path, budget: Duration) -> io::Result<()> {
    let deadline = Instant::now() + budget;
    let mut pause = Duration::from_micros(200);
    loop {
        match fs::remove_dir(p) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

#[derive(Clone, Debug)]
struct CgroupDir {
    path: PathBuf,
    version: Version,
    controllers: Vec<Controller>,
}

/// The cgroups of one instance, one directory per hierarchy.
#[derive(Debug)]
pub(crate) struct InstanceCgroups {
    layout: CgroupLayout,
    dirs: Vec<CgroupDir>,
    /// The freeze file, opened once, and whether it is v2's `cgroup.freeze`: every
    /// invocation freezes and thaws its instance, and an open + close per write is most of
    /// that cost.
    freezer: std::sync::OnceLock<(fs::File, bool)>,
    /// The first hierarchy's cgroup.procs, opened once (read after every invocation).
    procs: std::sync::OnceLock<fs::File>,
}

impl InstanceCgroups {
    pub(crate) fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.path.clone()).collect()
    }

    /// The cgroup.procs files the init writes "0" into to join.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|d| d.path.join("cgroup.procs"))
            .collect()
    }

    fn dir_with(&self, version: Version, c: Controller) -> Option<&CgroupDir> {
        self.dirs
            .iter()
            .find(|d| d.version == version && d.controllers.contains(&c))
    }

    /// The file through which the instance is frozen: v1 freezer.state or v2 cgroup.freeze.
    /// How many processes the instance holds (its first hierarchy's cgroup.procs; exited
    /// tasks leave it before they are reaped, so zombies don't count).
    pub(crate) fn process_count(&self) -> io::Result<usize> {
        let file = match self.procs.get() {
            Some(f) => f,
            None => {
                let path = self
                    .procs_files()
                    .into_iter()
                    .next()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup"))?;
                let opened = fs::File::open(path)?;
                self.procs.get_or_init(|| opened)
            }
        };
        let mut buf = [0u8; 4096];
        let mut text = Vec::new();
        loop {
            let n = std::os::unix::fs::FileExt::read_at(file, &mut buf, text.len() as u64)?;
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
        }
        Ok(text.iter().filter(|b| **b == b'\n').count())
    }

    /// The cgroup the instance is frozen through, and whether it is a v2 one. Pure v2 and
    /// hybrid hosts freeze through cgroup v2's `cgroup.freeze` (a hybrid host's unified
    /// hierarchy has it without any controller): a task frozen that way still dies of
    /// SIGKILL, so the instances of a server killed outright die with it (their parent-death
    /// signal), where the v1 freezer would keep them frozen, alive and holding memory until
    /// thawed. Pure v1 uses the v1 freezer. (A dir of the other kind, left by an older run,
    /// is still found, so that cleaning up can thaw it.)
    fn freezer_dir(&self) -> Option<&CgroupDir> {
        let v2 = self.dirs.iter().find(|d| d.version == Version::V2);
        let v1 = || self.dir_with(Version::V1, Controller::Freezer);
        match self.layout {
            CgroupLayout::V2 | CgroupLayout::Hybrid => v2.or_else(v1),
            CgroupLayout::V1 => v1(),
        }
    }

    /// The file through which the instance is frozen: v2 cgroup.freeze or v1 freezer.state.
    pub(crate) fn freeze_file(&self) -> PathBuf {
        self.freezer_dir()
            .map(|d| match d.version {
                Version::V2 => d.path.join("cgroup.freeze"),
                Version::V1 => d.path.join("freezer.state"),
            })
            .unwrap_or_default()
    }

    fn freezes_through_v2(&self) -> bool {
        self.freezer_dir().is_some_and(|d| d.version == Version::V2)
    }

    /// Every invocation freezes and thaws: after the first call this is one write to the
    /// file opened then, whose kind (v1 or v2) was decided with it.
    pub(crate) fn set_frozen(&self, frozen: bool) -> io::Result<()> {
        let (freezer, v2) = match self.freezer.get() {
            Some(opened) => opened,
            None => {
                let file = fs::OpenOptions::new()
                    .write(true)
                    .open(self.freeze_file())?;
                self.freezer
                    .get_or_init(|| (file, self.freezes_through_v2()))
            }
        };
        let value = match (v2, frozen) {
            (true, true) => "1",
            (true, false) => "0",
            (false, true) => "FROZEN",
            (false, false) => "THAWED",
        };
        // One write at offset 0, as a fresh open would do.
        std::os::unix::fs::FileExt::write_all_at(freezer, value.as_bytes(), 0)
    }

    pub(crate) fn freezer_state(&self) -> io::Result<FreezerState> {
        let file = self.freeze_file();
        if self.freezes_through_v2() {
            let wanted = fs::read_to_string(&file)?;
            let events = fs::read_to_string(file.with_file_name("cgroup.events"))?;
            let frozen = events.lines().any(|l| l.trim() == "frozen 1");
            Ok(match (wanted.trim() == "1", frozen) {
                (true, true) => FreezerState::Frozen,
                (true, false) => FreezerState::Freezing,
                (false, _) => FreezerState::Thawed,
            })
        } else {
            let s = fs::read_to_string(&file)?;
            match s.trim() {
                "THAWED" => Ok(FreezerState::Thawed),
                "FREEZING" => Ok(FreezerState::Freezing),
                "FROZEN" => Ok(FreezerState::Frozen),
                other => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected freezer state {other:?}"),
                )),
            }
        }
    }

    /// Did the kernel OOM-kill a process of this instance?
    pub(crate) fn oom_killed(&self) -> bool {
        let (file, dir) = match self.dir_with(Version::V2, Controller::Memory) {
            Some(d) => ("memory.events", d),
            None => match self.dir_with(Version::V1, Controller::Memory) {
                Some(d) => ("memory.oom_control", d),
                None => return false,
            },
        };
        let Ok(text) = fs::read_to_string(dir.path.join(file)) else {
            return false;
        };
        text.lines().any(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
    }

    /// SIGKILL every process in the instance's cgroups (cgroup.kill where available).
    pub(crate) fn kill_all(&self) {
        for d in &self.dirs {
            if d.version == Version::V2 && write_file(&d.path.join("cgroup.kill"), "1").is_ok() {
                continue;
            }
            if let Ok(procs) = fs::read_to_string(d.path.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: kill(2) has no memory-safety preconditions; the pid was read from
                    // the instance's own cgroup, so it names one of its processes.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }

    /// Moves every process of these cgroups into `to`'s, hierarchy by hierarchy (both were
    /// made by the same [`CgroupHost`], so their hierarchies line up). Memory already charged
    /// stays where it was; what the processes allocate from now on is charged to `to`.
    pub(crate) fn move_processes_to(&self, to: &InstanceCgroups) -> io::Result<()> {
        for (from, to) in self.dirs.iter().zip(&to.dirs) {
            let procs = fs::read_to_string(from.path.join("cgroup.procs"))?;
            let target = to.path.join("cgroup.procs");
            for pid in procs.lines().filter(|l| !l.trim().is_empty()) {
                write_file(&target, pid.trim())?;
            }
        }
        Ok(())
    }

    /// Are all cgroups of the instance empty?
    pub(crate) fn is_empty(&self) -> bool {
        self.dirs.iter().all(|d| {
            fs::read_to_string(d.path.join("cgroup.procs"))
                .map(|s| s.trim().is_empty())
                .unwrap_or(true)
        })
    }

    /// rmdir every cgroup dir, retrying while the kernel still reports it busy.
    pub(crate) fn remove(&self, budget: Duration) -> Result<(), (PathBuf, io::Error)> {
        for d in &self.dirs {
            rmdir_retry(&d.path, budget).map_err(|e| (d.path.clone(), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hybrid_mountinfo() {
        let text = "\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let (v1, v2) = parse_mountinfo(text);
        assert_eq!(v1.len(), 4);
        assert!(v1.contains(&(Controller::Cpu, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))));
        assert_eq!(v2, Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn reads_v2_super_options() {
        let text = "\
29 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory";
        assert_eq!(
            v2_super_options(text, Path::new("/sys/fs/cgroup")),
            Some(vec![
                "rw".to_string(),
                "nsdelegate".to_string(),
                "memory_recursiveprot".to_string()
            ])
        );
        assert_eq!(
            v2_super_options(text, Path::new("/sys/fs/cgroup/memory")),
            None
        );
    }

    #[test]
    fn parses_pure_v2_mountinfo() {
        let text =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        let (v1, v2) = parse_mountinfo(text);
        assert!(v1.is_empty());
        assert_eq!(v2, Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn cpu_limits() {
        let l = Limits {
            memory_mb: 64,
            pids_max: 10,
            cpu_percent: 150,
        };
        assert_eq!(cpu_quota_v1(&l), "150000");
        assert_eq!(cpu_max_v2(&l), "150000 100000");
        let l = Limits {
            cpu_percent: 0,
            ..l
        };
        assert_eq!(cpu_quota_v1(&l), "-1");
        assert_eq!(memory_bytes(&l), "67108864");
    }
}
