//! Standby sandboxes: a cold start whose sandbox and runtime were set up ahead of time.
//!
//! Node's runtime is multi-threaded (V8's platform workers, libuv), so a loaded `node` cannot
//! fork instances the way the Python zygote does; and a zygote fork still builds its whole
//! sandbox on the cold start's path. Instead the host keeps a few complete sandboxes waiting
//! per standby runtime: each was started exactly like any instance (same namespaces, mounts,
//! uid, Landlock, seccomp, see `init.rs`), runs its runtime already loaded (an interpreter
//! and its shim, or the built-in shell runtime), belongs to no account, holds no code and has run no one's code. It
//! says so on its fd 4 (only then is it offered), then blocks on its fd 3 for one *adoption
//! frame*.
//!
//! A cold start of that language adopts the oldest waiting one ([`Standbys::take`]; the host
//! does the rest in `SandboxHost::adopt`):
//! 1. its processes move into the new instance's cgroups `<root>/<account>/<instance>` (the
//!    block's memory, pids and CPU limits), and its standby cgroups are removed;
//! 2. the block's code files are copied into the host directory its `/code` is bound to
//!    (read-only inside), and the shared directories it lists into the one bound at its
//!    `/shared` (empty, and so nothing visible, for a block that lists none);
//! 3. its `/tmp` is resized to the block's `tmp_mb` if that differs ([`resize_tmp`]);
//! 4. the adoption frame gives it the block's environment and the shim's arguments.
//!
//! An adopted sandbox is the block's instance from then on and never returns to standby. A
//! keeper thread tops every runtime back up to its count after each adoption. Each standby is
//! a separate `exec`, so unlike forked instances they share no memory layout or hash secrets.
//!
//! What it costs: each waiting sandbox's memory (docs/BENCHMARKS.md);
//! what the runtime allocated before adoption stays charged to the `standby` cgroup group,
//! not to the account — as a forked instance's pages shared with its zygote stay charged to
//! the zygote.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::Duration;

use crate::spec::{self, AdoptFrame};
use crate::superblock::{self, Param};
use crate::{instance_env, spawn, Entry, InstanceSpec, SandboxError, SandboxHost, Spawned};

/// The cgroup group standby sandboxes live in until adopted. Account groups are derived from
/// account ids (`acct-…`), so it cannot collide with one.
pub(crate) const STANDBY_GROUP: &str = "standby";
/// The standby group's CPU weight (100 = an account group's): when the CPU is contended, a
/// standby starting up yields to instances serving invocations, and never delays them much.
pub(crate) const STANDBY_CPU_WEIGHT: u32 = 10;
/// How long the keeper waits before trying again after a standby failed to start; doubled
/// after each further failure in a row, up to [`RETRY_MAX`].
const RETRY_AFTER: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(600);
/// How often an idle keeper checks that its host still exists.
const KEEPER_TICK: Duration = Duration::from_secs(1);
/// How long a standby may take to say it is waiting.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A runtime the host keeps standby sandboxes of.
#[derive(Clone, Debug)]
pub struct StandbySpec {
    /// What [`crate::Entry::Standby`] names it by, e.g. "node".
    pub name: String,
    /// What each standby sandbox runs (an `Exec`, paths inside the sandbox, or a `Builtin`):
    /// the runtime in standby mode. Frames are a 4-byte big-endian length and JSON. Once
    /// loaded it must write `{"type":"standby"}` on fd 4 (only then is it offered for
    /// adoption: its sandbox is complete and its processes settled), then read one adoption
    /// frame from fd 3, `{"type":"adopt","env":[[k,v],…],"args":[…]}`, replace its whole
    /// environment with `env`, and serve the block given by `args`.
    pub entry: Entry,
    /// Host directory mounted read-only at /runtime (holds the shim).
    pub runtime_dir: PathBuf,
    /// How many to keep waiting. Each costs the runtime's idle memory.
    pub count: usize,
    /// Limits while waiting (the adopting block's replace them).
    pub memory_mb: u32,
    pub pids_max: u32,
    /// Size of /tmp and RLIMIT_FSIZE when started: the largest `tmp_mb` a block may ask for.
    /// On adoption /tmp is resized to the block's; RLIMIT_FSIZE stays (lowering another
    /// uid's limit takes CAP_SYS_RESOURCE, which not every host grants its root), which is
    /// harmless: /tmp is an instance's only writable filesystem, and its size bounds every
    /// file.
    pub tmp_mb: u32,
}

/// One waiting sandbox. Its instance owns the host directory bound at its /code (empty until
/// adoption; see `SandboxedInstance::code_copy`).
pub(crate) struct Standby {
    pub spawned: Spawned,
    /// The size its /tmp was started with.
    pub tmp_mb: u32,
}

struct Runtime {
    spec: StandbySpec,
    waiting: VecDeque<Standby>,
    /// Set after a failed start: the keeper leaves this runtime alone until then.
    retry_at: Option<std::time::Instant>,
    /// Failed starts in a row (the retry delay doubles with each).
    failures: u32,
}

#[derive(Default)]
struct State {
    runtimes: HashMap<String, Runtime>,
    /// The keeper thread; joined by [`Standbys::stop`] so that nothing is started after it.
    keeper: Option<std::thread::JoinHandle<()>>,
    stopped: bool,
    /// The uid of the sandbox the keeper is starting, before it is offered.
    starting: Option<u32>,
}

/// The host's standby runtimes; shared with the keeper thread.
#[derive(Default)]
pub(crate) struct Standbys {
    state: Mutex<State>,
    wake: Condvar,
}

/// Standby ids are unique in the process (tests run several hosts in one).
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl std::fmt::Debug for Standbys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standbys").finish_non_exhaustive()
    }
}

impl Standbys {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `spec` (replacing a runtime of the same name, whose waiting sandboxes are
    /// destroyed) and makes sure a keeper thread fills it. `host` is the host the keeper starts
    /// sandboxes on; the keeper ends when the host is gone or [`Standbys::stop`] is called.
    pub(crate) fn add(
        self: &Arc<Self>,
        host: Weak<SandboxHost>,
        spec: StandbySpec,
    ) -> Result<(), SandboxError> {
        let replaced = {
            let mut state = self.lock();
            if state.stopped {
                return Err(SandboxError::InvalidSpec(
                    "the sandbox host was released; no standby runtimes can be added".into(),
                ));
            }
            let replaced = state.runtimes.insert(
                spec.name.clone(),
                Runtime {
                    spec,
                    waiting: VecDeque::new(),
                    retry_at: None,
                    failures: 0,
                },
            );
            if state.keeper.as_ref().is_none_or(|k| k.is_finished()) {
                let standbys = Arc::clone(self);
                let keeper = std::thread::Builder::new()
                    .name("refinery-standby-keeper".into())
                    .spawn(move || standbys.keep(host))
                    .map_err(|e| {
                        SandboxError::InvalidSpec(format!(
                            "starting the standby keeper thread: {e}"
                        ))
                    })?;
                state.keeper = Some(keeper);
            }
            replaced
        };
        drop(replaced);
        self.wake.notify_all();
        Ok(())
    }

    /// The oldest waiting sandbox of `name` (the likeliest to have finished loading), if any;
    /// wakes the keeper to replace it.
    pub(crate) fn take(&self, name: &str) -> Option<Standby> {
        let taken = self
            .lock()
            .runtimes
            .get_mut(name)
            .and_then(|r| r.waiting.pop_front());
        self.wake.notify_all();
        taken
    }

    /// How many sandboxes are waiting now, by runtime.
    pub(crate) fn waiting(&self) -> Vec<(String, usize)> {
        let mut counts: Vec<(String, usize)> = self
            .lock()
            .runtimes
            .iter()
            .map(|(name, r)| (name.clone(), r.waiting.len()))
            .collect();
        counts.sort();
        counts
    }

    /// A fresh id for a standby sandbox (unique within this process; the cgroup subtree and
    /// the state dir are per server).
    pub(crate) fn next_id() -> String {
        format!("sb-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed))
    }

    /// The uids of the sandboxes waiting or being started (their kernel audit records are
    /// the runtime's own start-up, no account's).
    pub(crate) fn uids(&self) -> Vec<u32> {
        let state = self.lock();
        state
            .runtimes
            .values()
            .flat_map(|r| r.waiting.iter())
            .filter_map(|s| s.spawned.instance.uid())
            .chain(state.starting)
            .collect()
    }

    fn set_starting(&self, uid: Option<u32>) {
        self.lock().starting = uid;
    }

    /// Stops the keeper (waiting for a sandbox it is starting) and destroys every waiting
    /// sandbox (at shutdown).
    pub(crate) fn stop(&self) {
        let (runtimes, keeper) = {
            let mut state = self.lock();
            state.stopped = true;
            (std::mem::take(&mut state.runtimes), state.keeper.take())
        };
        self.wake.notify_all();
        if let Some(keeper) = keeper {
            let _ = keeper.join();
        }
        drop(runtimes);
    }

    /// The keeper thread: tops every runtime up to its count, one sandbox at a time, then
    /// sleeps until one is taken.
    fn keep(self: Arc<Self>, host: Weak<SandboxHost>) {
        loop {
            let due = {
                let mut state = self.lock();
                loop {
                    if state.stopped {
                        return;
                    }
                    let now = std::time::Instant::now();
                    let due = state.runtimes.values().find_map(|r| {
                        let ready = r.retry_at.is_none_or(|at| at <= now);
                        (ready && r.waiting.len() < r.spec.count).then(|| r.spec.clone())
                    });
                    if let Some(spec) = due {
                        break spec;
                    }
                    state = self
                        .wake
                        .wait_timeout(state, KEEPER_TICK)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    if host.strong_count() == 0 {
                        return;
                    }
                }
            };
            let Some(host) = host.upgrade() else {
                return;
            };
            let started = host.start_standby(&due);
            drop(host);
            let mut state = self.lock();
            // Offered (or discarded) in this same critical section, so its uid is always in
            // one of the two lists until then.
            state.starting = None;
            let Some(runtime) = state.runtimes.get_mut(&due.name) else {
                drop(state);
                continue; // removed meanwhile: the new sandbox is dropped (destroyed)
            };
            match started {
                Ok(standby) => {
                    runtime.retry_at = None;
                    runtime.failures = 0;
                    runtime.waiting.push_back(standby);
                }
                Err(error) => {
                    let delay = RETRY_AFTER
                        .saturating_mul(1 << runtime.failures.min(6))
                        .min(RETRY_MAX);
                    runtime.failures += 1;
                    tracing::warn!(runtime = %due.name, %error, retry_in = ?delay, "cannot start a standby sandbox; this language's instances start by exec meanwhile");
                    runtime.retry_at = Some(std::time::Instant::now() + delay);
                }
            }
        }
    }
}

impl SandboxHost {
    /// Starts one standby sandbox of `runtime`: an instance like any other, in the
    /// [`STANDBY_GROUP`] group, with an empty code dir of its own and no
    /// environment but [`crate::BASE_ENV`].
    pub(crate) fn start_standby(&self, runtime: &StandbySpec) -> Result<Standby, SandboxError> {
        let id = Standbys::next_id();
        let own_dir =
            create_code_dir(&self.config.state_dir, &id).map_err(|e| SandboxError::Standby {
                runtime: runtime.name.clone(),
                what: format!("creating its code dir: {e}"),
            })?;
        let spec = InstanceSpec {
            instance_id: id,
            group: STANDBY_GROUP.into(),
            code_dir: own_dir.join(CODE),
            shared_dir: Some(own_dir.join(SHARED)),
            runtime_dir: runtime.runtime_dir.clone(),
            entry: runtime.entry.clone(),
            env: BTreeMap::new(),
            memory_mb: runtime.memory_mb,
            tmp_mb: runtime.tmp_mb,
            pids_max: runtime.pids_max,
            cpu_percent: 100,
            network: false,
            extra_mounts: Vec::new(),
        };
        let spawned = match self.spawn(&spec) {
            Ok(spawned) => spawned,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&own_dir);
                return Err(e);
            }
        };
        // Removed with the instance from here on.
        spawned.instance.set_code_copy(own_dir);
        self.standbys.set_starting(spawned.instance.uid());
        // Offered for adoption only once it says it is waiting: its init has joined its
        // cgroups and pivoted, and its processes are settled.
        let waiting = spawn::read_frame(&spawned.channels.responses, 4096, READY_TIMEOUT)
            .map_err(|e| e.to_string())
            .and_then(|frame| {
                let kind = serde_json::from_slice::<serde_json::Value>(&frame)
                    .ok()
                    .and_then(|v| v.get("type")?.as_str().map(str::to_string));
                match kind.as_deref() {
                    Some("standby") => Ok(()),
                    _ => Err(format!(
                        "unexpected first frame {:?}",
                        String::from_utf8_lossy(&frame)
                    )),
                }
            });
        if let Err(what) = waiting {
            let log = spawn::drain_log(&spawned.channels.logs);
            return Err(SandboxError::Standby {
                runtime: runtime.name.clone(),
                what: format!("it did not report waiting ({what}); its output: {log}"),
            });
        }
        Ok(Standby {
            spawned,
            tmp_mb: runtime.tmp_mb,
        })
    }

    /// Makes a waiting sandbox of `runtime` the instance `spec` (see `standby.rs` for the
    /// steps). Any failure destroys that sandbox; the caller may then start one by exec.
    pub(crate) fn adopt(
        &self,
        spec: &InstanceSpec,
        runtime: &str,
        args: &[String],
    ) -> Result<Spawned, SandboxError> {
        let err = |what: String| SandboxError::Standby {
            runtime: runtime.to_string(),
            what,
        };
        let Standby { spawned, tmp_mb } = loop {
            let standby = self
                .standbys
                .take(runtime)
                .ok_or_else(|| err("none waiting".into()))?;
            if standby.spawned.instance.has_exited() {
                let log = spawn::drain_log(&standby.spawned.channels.logs);
                tracing::warn!(runtime, %log, "a standby sandbox had exited; discarded");
                continue; // dropped: destroyed
            }
            break standby;
        };
        let Spawned {
            mut instance,
            channels,
        } = spawned;
        let cgroups = self.instance_cgroups(spec)?;
        if let Err(e) = instance.move_processes_to(&cgroups) {
            // Its processes may now be split between the two: kill them all.
            drop(instance);
            cgroups.kill_all();
            let _ = cgroups.remove(std::time::Duration::from_millis(500));
            return Err(err(format!("moving it into its cgroups: {e}")));
        }
        let standby_cgroups = instance.rehome(spec.instance_id.clone(), cgroups);
        if let Err((path, e)) = standby_cgroups.remove(std::time::Duration::from_millis(500)) {
            // Something stayed outside the block's limits: it all goes.
            drop(instance);
            standby_cgroups.kill_all();
            let _ = standby_cgroups.remove(std::time::Duration::from_secs(2));
            return Err(err(format!(
                "removing its standby cgroup {}: {e}",
                path.display()
            )));
        }
        // From here on the instance is the block's: dropping it on error destroys everything.
        let own_dir = instance
            .code_copy()
            .ok_or_else(|| err("it has no code dir of its own".into()))?;
        copy_code(&spec.code_dir, &own_dir.join(CODE))
            .map_err(|e| err(format!("copying the block's code: {e}")))?;
        if let Some(shared) = &spec.shared_dir {
            copy_tree(shared, &own_dir.join(SHARED), Copy::Link)
                .map_err(|e| err(format!("copying the block's shared directories: {e}")))?;
        }
        for m in &spec.extra_mounts {
            let rel = m
                .standby_at
                .as_deref()
                .filter(|r| !m.writable && is_plain_relative(r))
                .ok_or_else(|| err(format!("its mount at {} cannot be linked in", m.dst)))?;
            let target = own_dir.join(CODE).join(rel);
            if target.exists() {
                return Err(err(format!("its code already has {rel}")));
            }
            let mut budget = MAX_LINKED_FILES;
            link_tree(&m.src, &target, &mut budget)
                .map_err(|e| err(format!("linking {} into its code: {e}", m.src.display())))?;
        }
        if spec.tmp_mb != tmp_mb {
            resize_tmp(instance.pid(), spec.tmp_mb)
                .map_err(|e| err(format!("resizing its /tmp to {} MB: {e}", spec.tmp_mb)))?;
        }
        let env = instance_env(spec);
        let frame = spec::encode(&AdoptFrame {
            kind: "adopt",
            env: &env,
            args,
        })
        .map_err(|e| err(format!("encoding the adoption frame: {e}")))?;
        if let Err(source) = spawn::write_frame(&channels.requests, &frame) {
            return Err(SandboxError::SendSpec {
                instance: spec.instance_id.clone(),
                log: spawn::drain_log(&channels.logs),
                source,
            });
        }
        Ok(Spawned { instance, channels })
    }
}

/// The subdirectory of a standby's own directory bound at its /code.
const CODE: &str = "code";
/// The subdirectory of a standby's own directory bound at its /shared.
const SHARED: &str = "shared";

/// A standby's own directory, `<state>/standby/<id>`, holding the two host directories
/// bound at its /code (`code/`) and its /shared (`shared/`), both empty and world-readable
/// (the instance's uid must read its code).
pub(crate) fn create_code_dir(state_dir: &Path, id: &str) -> io::Result<PathBuf> {
    let parent = state_dir.join("standby");
    fs::create_dir_all(&parent)?;
    let dir = parent.join(id);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        // Left by a crashed run with the same id: start empty.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_dir_all(&dir)?;
            fs::create_dir(&dir)?;
        }
        Err(e) => return Err(e),
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    for sub in [CODE, SHARED] {
        fs::create_dir(dir.join(sub))?;
        fs::set_permissions(dir.join(sub), fs::Permissions::from_mode(0o755))?;
    }
    Ok(dir)
}

/// Removes every standby code dir (left by a crashed run, or at start-up).
pub(crate) fn remove_code_dirs(state_dir: &Path) {
    let _ = fs::remove_dir_all(state_dir.join("standby"));
}

/// Copies the block's code dir (regular files and subdirectories, as the pool lays out a
/// directory source) into a standby's code dir, world-readable as the pool lays them out.
/// Anything else (a symlink, a device) is refused: the caller then starts the instance by
/// exec, which mounts the block's own directory. The copy is read-only inside the instance
/// as the block's own directory is (the standby's /code is a read-only bind of it).
pub(crate) fn copy_code(from: &Path, to: &Path) -> io::Result<()> {
    copy_tree(from, to, Copy::Bytes)
}

/// How [`copy_tree`] places a file.
#[derive(Clone, Copy)]
enum Copy {
    /// A copy of its bytes.
    Bytes,
    /// A hard link to it where one can be made (the shared directories: laid out by the
    /// pool as root-owned 0644 files, read-only inside), else a copy: adoption then costs
    /// a link per file, not the directories' bytes.
    Link,
}

fn copy_tree(from: &Path, to: &Path, how: Copy) -> io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            fs::create_dir(&target)?;
            fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
            copy_tree(&entry.path(), &target, how)?;
            continue;
        }
        if !kind.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{} is not a regular file or directory (standby sandboxes take plain code dirs)",
                    entry.path().display()
                ),
            ));
        }
        if matches!(how, Copy::Link) && fs::hard_link(entry.path(), &target).is_ok() {
            continue;
        }
        fs::copy(entry.path(), &target)?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// At most this many entries of a layer are hard-linked into an adopted standby's code dir;
/// a larger layer starts the instance by its fallback (which mounts it).
const MAX_LINKED_FILES: usize = 4000;

/// `a/b`, without `..`, `.`, empty parts or a leading `/`.
fn is_plain_relative(rel: &str) -> bool {
    !rel.is_empty()
        && !rel.starts_with('/')
        && rel
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
}

/// Recreates the tree `from` (a read-only layer, root's) at `to`: directories made
/// (world-readable), files hard-linked (the same read-only inodes: nothing is copied, and
/// the copy is as immutable as the layer), symlinks recreated as links (never followed).
/// Fails past `budget` entries.
pub(crate) fn link_tree(from: &Path, to: &Path, budget: &mut usize) -> io::Result<()> {
    fs::create_dir(to)?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        *budget = budget
            .checked_sub(1)
            .ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "too many files to link"))?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            link_tree(&entry.path(), &target, budget)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path())?, &target)?;
        } else if kind.is_file() {
            fs::hard_link(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Resizes the tmpfs at the sandbox's /tmp to `tmp_mb` from the host, through
/// `/proc/<pid>/root/tmp` (see `superblock.rs`). That path must be the mount's root, so a
/// replaced /tmp could not redirect it; and no code of any block has run in a standby
/// sandbox anyway.
pub(crate) fn resize_tmp(pid: libc::pid_t, tmp_mb: u32) -> io::Result<()> {
    let size = format!("{tmp_mb}m");
    superblock::reconfigure(
        Path::new(&format!("/proc/{pid}/root/tmp")),
        &[Param::Value("size", &size)],
    )
}
