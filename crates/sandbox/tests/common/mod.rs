//! The sandbox tests' harness: a real `SandboxHost` with its own cgroup root (removed on
//! drop), instance specs, and helpers to run an entry and read what it wrote.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use refinery_sandbox::{Entry, ExitReport, HostConfig, InstanceSpec, SandboxHost, Spawned};

/// The account group every test instance belongs to.
pub const GROUP: &str = "acct-1";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub struct TestHost {
    pub host: std::sync::Arc<SandboxHost>,
    pub state: tempfile::TempDir,
    pub code: tempfile::TempDir,
    pub runtime: tempfile::TempDir,
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn config(state: &Path, root_name: String) -> HostConfig {
    HostConfig {
        init_exe: PathBuf::from(env!("CARGO_BIN_EXE_refinery-sandbox-init")),
        init_args: vec!["__sandbox-init".into()],
        state_dir: state.to_path_buf(),
        cgroup_root_name: root_name,
    }
}

pub fn test_host() -> TestHost {
    let state = tempfile::tempdir().expect("tempdir");
    let code = tempfile::tempdir().expect("tempdir");
    std::fs::write(code.path().join("main.sh"), "echo from-code\n").expect("write code");
    let runtime = tempfile::tempdir().expect("tempdir");
    std::fs::write(runtime.path().join("runtime.txt"), "rt\n").expect("write runtime");
    let host = std::sync::Arc::new(
        SandboxHost::detect(config(state.path(), unique("refinery-test"))).expect("detect"),
    );
    TestHost {
        host,
        state,
        code,
        runtime,
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = self.host.release();
        let _ = self.host.cleanup_stale();
        for root in self.host.cgroup_root_paths() {
            let _ = std::fs::remove_dir(root);
        }
    }
}

impl TestHost {
    pub fn spec(&self, entry: Entry) -> InstanceSpec {
        InstanceSpec {
            instance_id: unique("inst"),
            group: GROUP.into(),
            code_dir: self.code.path().to_path_buf(),
            shared_dir: None,
            runtime_dir: self.runtime.path().to_path_buf(),
            entry,
            env: BTreeMap::new(),
            memory_mb: 128,
            tmp_mb: 16,
            pids_max: 64,
            cpu_percent: 100,
            network: false,
            extra_mounts: Vec::new(),
        }
    }

    pub fn spawn(&self, spec: &InstanceSpec) -> Spawned {
        self.host.spawn(spec).expect("spawn")
    }

    /// Run a shell script whose stdout goes to fd 4; return (stdout, logs, report).
    pub fn run_sh(&self, script: &str) -> (String, String, ExitReport) {
        self.run(&self.spec(sh(script)))
    }

    pub fn run(&self, spec: &InstanceSpec) -> (String, String, ExitReport) {
        let Spawned { instance, channels } = self.spawn(spec);
        let out = read_to_end(channels.responses);
        // EOF comes when the entry (pid 2) exits; the reaper (pid 1) follows a moment later.
        // Let it, so the report shows the entry's own status rather than destroy's SIGKILL.
        wait_gone(instance.pid(), Duration::from_secs(5));
        let report = instance.destroy().expect("destroy");
        let logs = read_to_end(channels.logs);
        (out, logs, report)
    }
}

pub fn sh(script: &str) -> Entry {
    Entry::Exec {
        argv: vec!["/bin/sh".into(), "-c".into(), format!("exec >&4; {script}")],
    }
}

pub fn read_to_end(fd: OwnedFd) -> String {
    let mut s = String::new();
    File::from(fd).read_to_string(&mut s).expect("read pipe");
    s
}

pub fn process_exists(pid: i32) -> bool {
    // A zombie still "exists" for kill(0); look at /proc instead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Wait up to `budget` for `pid` to exit (zombie or gone).
pub fn wait_gone(pid: i32, budget: Duration) -> bool {
    let deadline = Instant::now() + budget;
    while process_exists(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

/// Wait up to `budget` for `fd` to become readable.
pub fn readable(fd: &OwnedFd, budget: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, budget.as_millis() as i32) > 0 }
}
