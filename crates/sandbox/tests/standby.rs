//! Standby sandboxes (pre-started for runtimes that cannot fork): an adopted one must be the
//! block's instance in every respect an exec-started one is — its cgroups and limits, its
//! code, its /tmp size, its environment — and nothing of it may stay behind in the standby
//! group.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{read_to_end, sh, test_host, wait_gone, TestHost, GROUP};
use refinery_sandbox::{Entry, SandboxError, Spawned, StandbySpec, BASE_ENV};
use serde_json::{json, Value};

/// A stand-in for a shim in standby mode: it says it is waiting, reads the adoption frame on
/// fd 3, takes the
/// environment it carries, then reports what the instance looks like from inside on fd 4 (or,
/// given `alloc`, allocates until the memory limit stops it).
const PROBE: &str = r#"
import json, os, resource, struct, sys

def status_field(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()

def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = os.read(3, n - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    return data

def attempt(f):
    try:
        f()
        return "allowed"
    except OSError as e:
        return e.strerror

def write_code():
    with open("/code/x", "w") as f:
        f.write("x")

waiting = json.dumps({"type": "standby"}).encode()
os.write(4, struct.pack(">I", len(waiting)) + waiting)
(length,) = struct.unpack(">I", read_exact(4))
frame = json.loads(read_exact(length))
assert frame["type"] == "adopt", frame
os.environ.clear()
os.environ.update(dict(frame["env"]))
args = frame["args"]
if args == ["alloc"]:
    hog = []
    while True:
        hog.append(bytearray(16 * 1024 * 1024))
tmp = os.statvfs("/tmp")
facts = {
    "args": args,
    "pid": os.getpid(),
    "uid": [os.getuid(), os.geteuid(), os.getgid()],
    "cap_eff": status_field("CapEff"),
    "no_new_privs": status_field("NoNewPrivs"),
    "seccomp": status_field("Seccomp"),
    "env": dict(os.environ),
    "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "code": sorted(os.listdir("/code")),
    "main": open("/code/main.sh").read(),
    "write_code": attempt(write_code),
    "tmp_mb": tmp.f_blocks * tmp.f_frsize // (1024 * 1024),
    "fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0],
}
with os.fdopen(4, "w") as out:
    out.write(json.dumps(facts))
os.read(3, 1)  # stay alive until the host closes the requests pipe
"#;

/// The largest /tmp a block may ask for, as the server starts its standbys with.
const STANDBY_TMP_MB: u32 = 512;

/// A host with one standby runtime "probe" of `count` sandboxes, all of them started.
fn with_standbys(count: usize) -> TestHost {
    let t = test_host();
    std::fs::write(t.runtime.path().join("standby_probe.py"), PROBE).expect("write probe");
    t.host
        .add_standby(StandbySpec {
            name: "probe".into(),
            entry: Entry::Exec {
                argv: vec![
                    "/usr/bin/python3".into(),
                    "-I".into(),
                    "-B".into(),
                    "/runtime/standby_probe.py".into(),
                ],
            },
            runtime_dir: t.runtime.path().to_path_buf(),
            count,
            memory_mb: 128,
            pids_max: 16,
            tmp_mb: STANDBY_TMP_MB,
        })
        .expect("the standby runtime is registered");
    assert!(
        waiting_reaches(&t, count, Duration::from_secs(20)),
        "{count} standby sandboxes start"
    );
    t
}

fn waiting_reaches(t: &TestHost, count: usize, budget: Duration) -> bool {
    let deadline = Instant::now() + budget;
    while t.host.standby_counts() != [("probe".to_string(), count)] {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn standby_entry(args: &[&str], fallback: Option<Entry>) -> Entry {
    Entry::Standby {
        runtime: "probe".into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        fallback: fallback.map(Box::new),
    }
}

/// The standby group's cgroup dirs in every hierarchy (one per waiting sandbox).
fn standby_cgroups(t: &TestHost) -> Vec<PathBuf> {
    t.host
        .cgroup_root_paths()
        .iter()
        .filter_map(|root| std::fs::read_dir(root.join("standby")).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.path())
        .collect()
}

fn pids_in(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[test]
fn an_adopted_standby_is_the_blocks_instance() {
    let t = with_standbys(1);
    let standby_dirs = standby_cgroups(&t);
    assert!(!standby_dirs.is_empty(), "the standby lives in its group");
    let standby_uid = t.host.standby_uids()[0];
    // Starting standbys yields the CPU to instances: a tenth of an account group's weight.
    let weights: Vec<String> = t
        .host
        .cgroup_root_paths()
        .iter()
        .flat_map(|root| ["cpu.shares", "cpu.weight"].map(|f| root.join("standby").join(f)))
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .map(|v| v.trim().to_string())
        .collect();
    assert!(
        !weights.is_empty() && weights.iter().all(|w| w == "102" || w == "10"),
        "{weights:?}"
    );

    let mut spec = t.spec(standby_entry(&["/code/main.sh"], None));
    spec.env = BTreeMap::from([("SECRET".to_string(), "s3".to_string())]);
    spec.tmp_mb = 16;
    let Spawned { instance, channels } = t.spawn(&spec);
    assert_eq!(instance.id(), spec.instance_id);
    assert_eq!(instance.uid(), Some(standby_uid), "the standby became it");

    // Its processes are in the block's cgroups under the account group, nowhere else.
    let paths = instance.cgroup_paths();
    assert!(!paths.is_empty());
    for dir in &paths {
        assert!(
            dir.ends_with(Path::new(GROUP).join(&spec.instance_id)),
            "{}",
            dir.display()
        );
        let pids = pids_in(dir);
        assert!(
            pids.contains(&instance.pid()),
            "{}: {pids:?}",
            dir.display()
        );
    }
    for dir in &standby_dirs {
        assert!(
            !dir.exists(),
            "the standby cgroup {} is removed",
            dir.display()
        );
    }

    let out = read_to_end(channels.responses);
    drop(channels.requests);
    let logs = read_to_end(channels.logs);
    let facts: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?} {logs}"));
    let uid = u64::from(standby_uid);
    assert_eq!(facts["args"], json!(["/code/main.sh"]));
    assert_eq!(facts["pid"], 2, "the entry under the sandbox's reaper");
    assert_eq!(facts["procs"], json!([1, 2]), "sees only its own namespace");
    assert_eq!(facts["uid"], json!([uid, uid, uid]));
    assert_eq!(facts["cap_eff"], "0000000000000000");
    assert_eq!(facts["no_new_privs"], "1");
    assert_eq!(facts["seccomp"], "2");
    let mut expected: BTreeMap<String, String> = BASE_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    expected.insert("SECRET".into(), "s3".into());
    assert_eq!(
        facts["env"],
        json!(expected),
        "exactly the block's environment"
    );
    assert_eq!(
        facts["code"],
        json!(["main.sh"]),
        "the block's code, nothing else"
    );
    assert_eq!(facts["main"], "echo from-code\n");
    assert_ne!(facts["write_code"], "allowed", "/code is read-only");
    assert_eq!(facts["tmp_mb"], 16, "/tmp resized to the block's tmp_mb");
    assert_eq!(
        facts["fsize"],
        u64::from(STANDBY_TMP_MB) * 1024 * 1024,
        "RLIMIT_FSIZE stays the standby's (the /tmp size bounds files)"
    );

    assert!(wait_gone(instance.pid(), Duration::from_secs(5)));
    instance.destroy().expect("destroy");
    for dir in &paths {
        assert!(!dir.exists(), "{} removed on destroy", dir.display());
    }
}

#[test]
fn the_blocks_memory_limit_governs_an_adopted_standby() {
    let t = with_standbys(1);
    let spec = t.spec(standby_entry(&["alloc"], None));
    let Spawned { instance, channels } = t.spawn(&spec);
    drop(channels.requests);
    let _ = read_to_end(channels.responses);
    assert!(wait_gone(instance.pid(), Duration::from_secs(20)));
    let report = instance.destroy().expect("destroy");
    assert!(
        report.oom_killed,
        "the block's 128 MB limit stopped it: {report:?}"
    );
}

#[test]
fn the_keeper_replaces_adopted_standbys_and_their_code_dirs_go_with_them() {
    let t = with_standbys(2);
    let code_dirs = || {
        std::fs::read_dir(t.state.path().join("standby"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert_eq!(code_dirs(), 2);
    let first = t.spawn(&t.spec(standby_entry(&["/code/main.sh"], None)));
    let second = t.spawn(&t.spec(standby_entry(&["/code/main.sh"], None)));
    assert_ne!(first.instance.uid(), second.instance.uid());
    assert!(
        waiting_reaches(&t, 2, Duration::from_secs(20)),
        "the keeper started two more"
    );
    assert_eq!(code_dirs(), 4);
    for spawned in [first, second] {
        drop(spawned.channels);
        spawned.instance.destroy().expect("destroy");
    }
    assert_eq!(
        code_dirs(),
        2,
        "an adopted instance's code copy goes with it"
    );
}

#[test]
fn a_dead_standby_is_never_adopted() {
    let t = with_standbys(1);
    let uid = t.host.standby_uids()[0];
    // Kill the waiting sandbox from outside (its pid 1 takes the whole namespace with it).
    for dir in standby_cgroups(&t) {
        for pid in pids_in(&dir) {
            // SAFETY: kill(2) of a process of the test's own standby cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let fallback = sh("echo exec-fallback");
    let spec = t.spec(standby_entry(&["/code/main.sh"], Some(fallback)));
    let (out, logs, _) = t.run(&spec);
    // Discarding the dead one wakes the keeper, which may have a fresh standby up before the
    // host looks again: adopting that one is as right as falling back to exec.
    if out.trim() != "exec-fallback" {
        let facts: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?} {logs}"));
        assert_eq!(
            facts["main"], "echo from-code\n",
            "a live standby was adopted"
        );
        assert_ne!(facts["uid"][0], u64::from(uid), "not the dead one");
    }
    assert!(
        !t.host.standby_uids().contains(&uid),
        "the dead one was discarded"
    );
}

#[test]
fn without_a_standby_it_falls_back_to_exec_or_fails_clearly() {
    let t = test_host();
    let fallback = sh("echo exec-fallback");
    let (out, _, _) = t.run(&t.spec(standby_entry(&["x"], Some(fallback))));
    assert_eq!(out.trim(), "exec-fallback");
    match t.host.spawn(&t.spec(standby_entry(&["x"], None))) {
        Err(e @ SandboxError::Standby { .. }) => {
            assert!(e.to_string().contains("probe"), "{e}");
        }
        other => panic!("expected a standby error, got {other:?}"),
    }
}
