//! Refinery's dependency layers (issue 14, BRIEF §7c): a directory source's
//! `requirements.txt` (Python) or `package.json` (+ lockfile, Node) built at deploy into an
//! immutable, read-only layer that the block's instances mount.
//!
//! - What a block declares and how each language builds and mounts it:
//!   `refinery_runtimes::deps` (one descriptor per language).
//! - The layer's key ([`Builder::key`]): SHA-256 of the language, the runtime's version and
//!   the dependency files (the whole block directory when they name a package inside it),
//!   stored per account at `<layers>/<account>/<key>`: never shared across accounts, so one
//!   account's build cannot poison another's.
//! - The build ([`Builder::build`]): the package manager runs in a sandbox instance of the
//!   process tier like any block's (own uid, namespaces, seccomp, Landlock, the account's
//!   cgroup group with a memory, pids and time limit), with outbound network only through the
//!   egress filter of `network = true` blocks (loopback, private ranges and the host refused),
//!   its writable space a size-limited tmpfs (`/build`) and its own `/tmp`; the host's
//!   pip/npm configuration (`PIP_*`, `NPM_CONFIG_*`, `/etc/pip.conf`, `/etc/npmrc`, the CA
//!   certificates) passed in. Nothing of the data dir or of other accounts is visible.
//! - The result is copied (never following a symlink) into the layer dir, made read-only
//!   (root-owned, 0555/0444) and renamed into place atomically.
//!
//! What it must never do: run a package manager outside a sandbox, let a build write
//! anywhere but its scratch dir, or hand one account's layer to another.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use refinery_domain::{BlockSpec, Language};
use refinery_runtimes::deps::{self as rdeps, BUILD_DIR};
use refinery_sandbox::{Entry, ExtraMount, InstanceSpec, JobOutcome, SandboxHost, ScratchMount};
use sha2::{Digest, Sha256};

pub use refinery_runtimes::deps::{declared, Declared};

/// The limits of one build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildLimits {
    /// Memory of the build's cgroup (its `/tmp` and `/build` tmpfs pages included).
    pub memory_mb: u32,
    /// Wall-clock time before it is killed.
    pub time: Duration,
    /// Size of the writable scratch dir `/build` (the block's copied directory and the
    /// result).
    pub disk_mb: u32,
    /// Size of its private `/tmp` (pip's and npm's temporary files, npm's cache).
    pub tmp_mb: u32,
    pub pids_max: u32,
}

impl Default for BuildLimits {
    fn default() -> Self {
        BuildLimits {
            memory_mb: 1024,
            time: Duration::from_secs(300),
            disk_mb: 512,
            tmp_mb: 256,
            pids_max: 256,
        }
    }
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum DepsError {
    /// The package manager failed: `message` is its own error (which package, which
    /// version), `log_tail` its last lines.
    #[error("building the dependencies of block `{block}` failed ({exit}): {message}")]
    Failed {
        block: String,
        exit: String,
        message: String,
        log_tail: Vec<String>,
    },
    #[error(
        "building the dependencies of block `{block}` took longer than {limit_s} s and was stopped"
    )]
    TimedOut {
        block: String,
        limit_s: u64,
        log_tail: Vec<String>,
    },
    #[error("building the dependencies of block `{block}` ran out of its {memory_mb} MB of memory (or filled its {disk_mb} MB build dir) and was stopped")]
    OutOfMemory {
        block: String,
        memory_mb: u32,
        disk_mb: u32,
        log_tail: Vec<String>,
    },
    #[error("block `{block}` declares dependencies, but this server has no outbound network for builds: the operator must install Debian's `passt` and `nftables` packages and restart `refinery serve` (or remove {file})")]
    NoNetwork { block: String, file: String },
    /// The dependency files themselves are wrong (the message names the block and the file).
    #[error("{message}")]
    Invalid { block: String, message: String },
    /// Something of the host (not the block's doing).
    #[error("building the dependencies of block `{block}`: {what}")]
    Host { block: String, what: String },
}

impl DepsError {
    /// The build's last log lines, for the answer (empty when it never ran).
    pub fn log_tail(&self) -> &[String] {
        match self {
            DepsError::Failed { log_tail, .. }
            | DepsError::TimedOut { log_tail, .. }
            | DepsError::OutOfMemory { log_tail, .. } => log_tail,
            _ => &[],
        }
    }

    /// The block's (or its author's) doing: a 4xx, not a 500.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, DepsError::Host { .. })
    }
}

/// A finished build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    pub key: String,
    pub duration: Duration,
    /// The layer's size and file count.
    pub bytes: u64,
    pub files: u64,
    /// The memory limit it ran under (metered like an invocation's).
    pub memory_mb: u32,
}

/// Builds layers on one sandbox host; shared by the server.
#[derive(Debug)]
pub struct Builder {
    host: Arc<SandboxHost>,
    runtime_dir: PathBuf,
    layers_root: PathBuf,
    scratch_root: PathBuf,
    limits: BuildLimits,
    /// Variables of the server's environment passed to builds (the package managers' own
    /// configuration and the TLS trust settings).
    passed_env: Vec<(String, String)>,
    versions: Mutex<HashMap<Language, String>>,
}

/// How many log lines a failure carries back.
const TAIL_LINES: usize = 30;

impl Builder {
    /// `layers_root`: `<data>/layers`; `scratch_root`: a root-only dir for the builds'
    /// scratch mounts (leftovers of a crashed run are unmounted here).
    pub fn new(
        host: Arc<SandboxHost>,
        runtime_dir: PathBuf,
        layers_root: PathBuf,
        scratch_root: PathBuf,
        limits: BuildLimits,
    ) -> io::Result<Builder> {
        for dir in [&layers_root, &scratch_root] {
            fs::create_dir_all(dir)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
        ScratchMount::remove_stale(&scratch_root);
        let passed_env = std::env::vars()
            .filter(|(k, _)| {
                rdeps::BUILD_TRUST_ENV.contains(&k.as_str())
                    || [&rdeps::PYTHON, &rdeps::NODE]
                        .iter()
                        .flat_map(|d| d.config_env_prefixes)
                        .any(|p| k.starts_with(p))
            })
            .collect();
        Ok(Builder {
            host,
            runtime_dir,
            layers_root,
            scratch_root,
            limits,
            passed_env,
            versions: Mutex::default(),
        })
    }

    pub fn limits(&self) -> BuildLimits {
        self.limits
    }

    /// The runtime's version as its interpreter reports it on this host (cached).
    fn runtime_version(&self, language: Language) -> Result<String, String> {
        if let Some(v) = self
            .versions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&language)
        {
            return Ok(v.clone());
        }
        let argv = rdeps::version_argv(language)
            .ok_or_else(|| format!("{language} has no dependency builds"))?;
        let out = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .map_err(|e| format!("running {} for its version: {e}", argv[0]))?;
        if !out.status.success() {
            return Err(format!("{} --version failed: {}", argv[0], out.status));
        }
        let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        self.versions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(language, version.clone());
        Ok(version)
    }

    /// The layer key of `block`'s declared dependencies: hex SHA-256 of the language, its
    /// runtime's version and the dependency files (every file of the block when they name
    /// a package inside its directory).
    pub fn key(&self, block: &BlockSpec, declared: &Declared) -> Result<String, DepsError> {
        let version = self
            .runtime_version(block.language)
            .map_err(|what| DepsError::Host {
                block: block.name.clone(),
                what,
            })?;
        Ok(layer_key(block, declared, &version))
    }

    /// The layer dir of `key` for `account`, if that layer exists.
    pub fn existing(&self, account: &str, key: &str) -> Option<PathBuf> {
        rdeps::layer_path(&self.layers_root, account, key).filter(|p| p.is_dir())
    }

    /// Builds the layer `key` of `block` for `account` (blocking: run it on a blocking
    /// thread), each line of the package manager's output passed to `on_line` as it comes.
    pub fn build(
        &self,
        account: &str,
        block: &BlockSpec,
        declared: &Declared,
        key: &str,
        mut on_line: impl FnMut(&str),
    ) -> Result<Built, DepsError> {
        let host_err = |what: String| DepsError::Host {
            block: block.name.clone(),
            what,
        };
        let target = rdeps::layer_path(&self.layers_root, account, key)
            .ok_or_else(|| host_err(format!("account id {account:?} is not a path component")))?;
        if !self.host.network_enabled() {
            return Err(DepsError::NoNetwork {
                block: block.name.clone(),
                file: declared.descriptor.manifest.to_string(),
            });
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let scratch = ScratchMount::mount(&self.scratch_root.join(&id), self.limits.disk_mb)
            .map_err(|e| {
                host_err(format!(
                    "mounting its {} MB build dir: {e}",
                    self.limits.disk_mb
                ))
            })?;
        let src = scratch.path().join("src");
        lay_out(block, &src).map_err(|e| host_err(format!("copying the block's files: {e}")))?;
        make_dir(&scratch.path().join("out"), 0o777)
            .map_err(|e| host_err(format!("creating the build's output dir: {e}")))?;

        let mut extra_mounts = vec![ExtraMount {
            src: scratch.path().to_path_buf(),
            dst: BUILD_DIR.to_string(),
            writable: true,
            standby_at: None,
        }];
        for file in declared.descriptor.config_files {
            if Path::new(file).is_file() {
                extra_mounts.push(ExtraMount {
                    src: PathBuf::from(file),
                    dst: file.to_string(),
                    writable: false,
                    standby_at: None,
                });
            }
        }
        let mut env: std::collections::BTreeMap<String, String> =
            self.passed_env.iter().cloned().collect();
        // npm reads the invoking user's ~/.npmrc as its user config: the server's (root's)
        // is passed read-only (npm's own default would be the sandbox's empty HOME).
        if block.language == Language::Node {
            if let Some(home) = std::env::var_os("HOME") {
                let user_rc = Path::new(&home).join(".npmrc");
                if user_rc.is_file() && !env.contains_key("NPM_CONFIG_USERCONFIG") {
                    extra_mounts.push(ExtraMount {
                        src: user_rc,
                        dst: "/etc/refinery-user-npmrc".into(),
                        writable: false,
                        standby_at: None,
                    });
                    env.insert(
                        "NPM_CONFIG_USERCONFIG".into(),
                        "/etc/refinery-user-npmrc".into(),
                    );
                }
            }
        }
        let spec = InstanceSpec {
            instance_id: format!("build-{}", &id[..20]),
            group: cgroup_group(account),
            code_dir: src.clone(),
            runtime_dir: self.runtime_dir.clone(),
            entry: Entry::Exec {
                argv: rdeps::build_argv(declared),
            },
            env,
            memory_mb: self.limits.memory_mb,
            tmp_mb: self.limits.tmp_mb,
            pids_max: self.limits.pids_max,
            cpu_percent: 100,
            network: true,
            extra_mounts,
            shared_dir: None,
        };
        let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        let mut errors: Vec<String> = Vec::new();
        let outcome = self
            .host
            .run_job(&spec, self.limits.time, |line| {
                if is_error_line(line) && errors.len() < 20 {
                    errors.push(line.to_string());
                }
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.to_string());
                on_line(line);
            })
            .map_err(|e| host_err(format!("starting its sandbox: {e}")))?;
        let tail: Vec<String> = tail.into_iter().collect();
        check_outcome(block, &outcome, &self.limits, errors, tail)?;

        let layer = scratch.path().join(declared.descriptor.layer_in_build);
        let (bytes, files) =
            publish(&layer, &target).map_err(|e| host_err(format!("storing the layer: {e}")))?;
        drop(scratch);
        Ok(Built {
            key: key.to_string(),
            duration: outcome.duration,
            bytes,
            files,
            memory_mb: self.limits.memory_mb,
        })
    }
}

/// The layer key (see [`Builder::key`]).
pub fn layer_key(block: &BlockSpec, declared: &Declared, runtime_version: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"refinery-deps-v1\0");
    h.update(block.language.as_str().as_bytes());
    h.update(b"\0");
    h.update(runtime_version.as_bytes());
    h.update(b"\0");
    let mut files: Vec<(&str, &str)> = if declared.local {
        block.source_files().collect()
    } else {
        declared
            .files
            .iter()
            .map(|(n, c)| (n.as_str(), c.as_str()))
            .collect()
    };
    files.sort();
    for (name, contents) in files {
        h.update(name.as_bytes());
        h.update(b"\0");
        h.update((contents.len() as u64).to_le_bytes());
        h.update(contents.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The cgroup group of an account's instances (the pool's naming), so a build counts in
/// the account's group memory limit.
fn cgroup_group(account: &str) -> String {
    account
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// A line of the package manager's own error report.
fn is_error_line(line: &str) -> bool {
    let l = line.trim_start();
    l.starts_with("ERROR:")
        || l.starts_with("error:")
        || l.starts_with("npm ERR!")
        || l.starts_with("npm error")
        || l.contains("No matching distribution")
        || l.contains("ResolutionImpossible")
}

fn check_outcome(
    block: &BlockSpec,
    outcome: &JobOutcome,
    limits: &BuildLimits,
    errors: Vec<String>,
    tail: Vec<String>,
) -> Result<(), DepsError> {
    if outcome.succeeded() {
        return Ok(());
    }
    let block = block.name.clone();
    if outcome.timed_out {
        return Err(DepsError::TimedOut {
            block,
            limit_s: limits.time.as_secs(),
            log_tail: tail,
        });
    }
    if outcome.oom_killed {
        return Err(DepsError::OutOfMemory {
            block,
            memory_mb: limits.memory_mb,
            disk_mb: limits.disk_mb,
            log_tail: tail,
        });
    }
    let message = if errors.is_empty() {
        tail.iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .cloned()
            .unwrap_or_else(|| "the package manager failed without a message".into())
    } else {
        errors.join("\n")
    };
    Err(DepsError::Failed {
        block,
        exit: outcome.exit.clone(),
        message,
        log_tail: tail,
    })
}

fn make_dir(path: &Path, mode: u32) -> io::Result<()> {
    fs::create_dir_all(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Writes the block's files into `dir` for the build (writable by the build's uid: in-tree
/// builds of a local package write beside it).
fn lay_out(block: &BlockSpec, dir: &Path) -> io::Result<()> {
    make_dir(dir, 0o777)?;
    for (name, contents) in block.source_files() {
        // Paths were checked at deploy (relative, no `..`): they stay inside `dir`.
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            let mut missing = Vec::new();
            let mut p = parent;
            while !p.exists() {
                missing.push(p.to_path_buf());
                match p.parent() {
                    Some(up) => p = up,
                    None => break,
                }
            }
            for m in missing.iter().rev() {
                make_dir(m, 0o777)?;
            }
        }
        fs::write(&path, contents)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666))?;
    }
    Ok(())
}

/// Copies the build's result `from` (a missing one is an empty layer) into `target`,
/// read-only, through a staging sibling renamed into place; returns (bytes, files). A layer
/// already there (another deploy built the same key) is kept.
fn publish(from: &Path, target: &Path) -> io::Result<(u64, u64)> {
    let parent = target
        .parent()
        .ok_or_else(|| io::Error::other("layer path has no parent"))?;
    fs::create_dir_all(parent)?;
    fs::set_permissions(parent, fs::Permissions::from_mode(0o755))?;
    let staging = parent.join(format!(".staging-{}", uuid::Uuid::new_v4().simple()));
    fs::create_dir(&staging)?;
    let mut counts = (0u64, 0u64);
    let copied = if from.is_dir() && !from.is_symlink() {
        copy_tree(from, &staging, &mut counts)
    } else {
        Ok(())
    }
    .and_then(|()| fs::set_permissions(&staging, fs::Permissions::from_mode(0o555)));
    if let Err(e) = copied {
        let _ = make_writable(&staging);
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    match fs::rename(&staging, target) {
        Ok(()) => Ok(counts),
        Err(_) if target.is_dir() => {
            let _ = make_writable(&staging);
            let _ = fs::remove_dir_all(&staging);
            Ok(counts)
        }
        Err(e) => Err(e),
    }
}

/// Copies regular files, directories and symlinks (as links, never followed); anything else
/// (a fifo, a device node) is left out. Files keep their execute bits, nothing is writable.
fn copy_tree(from: &Path, to: &Path, counts: &mut (u64, u64)) -> io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let dst = to.join(entry.file_name());
        if kind.is_dir() {
            fs::create_dir(&dst)?;
            copy_tree(&entry.path(), &dst, counts)?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o555))?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path())?, &dst)?;
        } else if kind.is_file() {
            let mode = entry.metadata()?.permissions().mode();
            counts.0 += fs::copy(entry.path(), &dst)?;
            counts.1 += 1;
            let exec = if mode & 0o111 != 0 { 0o555 } else { 0o444 };
            fs::set_permissions(&dst, fs::Permissions::from_mode(exec))?;
        }
    }
    Ok(())
}

/// Gives root's write bit back to a staging tree so it can be removed.
fn make_writable(dir: &Path) -> io::Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            make_writable(&entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_layers_are_read_only_and_keep_symlinks() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let from = tmp.path().join("out");
        fs::create_dir_all(from.join("pkg/.bin")).expect("mkdir");
        fs::write(from.join("pkg/a.py"), "x = 1\n").expect("write");
        std::os::unix::fs::symlink("../a.py", from.join("pkg/.bin/a")).expect("symlink");
        let target = tmp.path().join("layers/acct/k");
        let (bytes, files) = publish(&from, &target).expect("publish");
        assert_eq!((bytes, files), (6, 1));
        let mode = |p: &Path| fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&target), 0o555);
        assert_eq!(mode(&target.join("pkg/a.py")), 0o444);
        assert!(fs::symlink_metadata(target.join("pkg/.bin/a"))
            .expect("stat")
            .file_type()
            .is_symlink());
        // A missing result is an empty layer.
        let empty = tmp.path().join("layers/acct/e");
        assert_eq!(
            publish(&tmp.path().join("none"), &empty).expect("publish"),
            (0, 0)
        );
        assert!(empty.is_dir());
        make_writable(tmp.path()).expect("writable");
    }
}
