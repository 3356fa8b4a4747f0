//! Instances forked from a zygote (a pre-initialised runtime) must be exactly as sandboxed as
//! exec-started ones, and the zygote itself must hold nothing an instance could use.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{read_to_end, test_host, wait_gone, TestHost};
use refinery_sandbox::{Entry, Spawned, ZygoteSpec, BASE_ENV};
use serde_json::Value;

/// A stand-in for a language shim: `main()` reports what the instance looks like from inside
/// on fd 4, then tries what a hostile block would.
const PROBE: &str = r#"
import json, os, socket, sys

def status_field(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()

def attempt(f):
    try:
        f()
        return "allowed"
    except OSError as e:
        return e.strerror

def write_code():
    with open("/code/x", "w") as f:
        f.write("x")

def write_tmp():
    with open("/tmp/x", "w") as f:
        f.write("x")

def main():
    facts = {
        "argv": sys.argv[1:],
        "pid": os.getpid(),
        "uid": [os.getuid(), os.geteuid(), os.getgid()],
        "groups": os.getgroups(),
        "cap_eff": status_field("CapEff"),
        "cap_bnd": status_field("CapBnd"),
        "cap_inh": status_field("CapInh"),
        "no_new_privs": status_field("NoNewPrivs"),
        "seccomp": status_field("Seccomp"),
        "hostname": socket.gethostname(),
        "cwd": os.getcwd(),
        "root": sorted(os.listdir("/")),
        "env": dict(os.environ),
        "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
        "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "code": open("/code/main.sh").read(),
        "write_code": attempt(write_code),
        "write_tmp": attempt(write_tmp),
        "unshare": attempt(lambda: os.unshare(0)) if hasattr(os, "unshare") else "n/a",
        "mount_ns_differs": os.readlink("/proc/self/ns/mnt"),
    }
    with os.fdopen(4, "w") as out:
        out.write(json.dumps(facts))
    os.read(3, 1)  # stay alive until the host closes the requests pipe
    return 0
"#;

fn with_probe_zygote() -> TestHost {
    let t = test_host();
    let probe = t.runtime.path().join("probe_shim.py");
    std::fs::write(&probe, PROBE).expect("write probe");
    t.host
        .add_zygote(ZygoteSpec {
            name: "probe".into(),
            interpreter: vec!["/usr/bin/python3".into(), "-I".into(), "-B".into()],
            preload: probe,
        })
        .expect("the probe zygote starts");
    t
}

fn fork_entry(zygote: &str, fallback: Option<Vec<String>>) -> Entry {
    Entry::Fork {
        zygote: zygote.into(),
        args: vec!["arg-1".into()],
        fallback,
    }
}

fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = stat.rsplit(')').next().expect("stat fields");
    after
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("ppid")
}

/// Runs one forked probe; returns its facts and the host pid of its parent (the zygote).
fn probe(t: &TestHost, env: BTreeMap<String, String>) -> (Value, i32, Option<u32>) {
    let mut spec = t.spec(fork_entry("probe", None));
    spec.env = env;
    let Spawned { instance, channels } = t.spawn(&spec);
    let zygote = parent_of(instance.pid());
    let uid = instance.uid();
    let out = read_to_end(channels.responses);
    drop(channels.requests);
    let logs = read_to_end(channels.logs);
    assert!(wait_gone(instance.pid(), Duration::from_secs(5)));
    instance.destroy().expect("destroy");
    let facts = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?} {logs}"));
    (facts, zygote, uid)
}

#[test]
fn a_forked_instance_is_sandboxed_like_an_exec_started_one() {
    let t = with_probe_zygote();
    let env = BTreeMap::from([("SECRET".to_string(), "s3".to_string())]);
    let (facts, zygote, uid) = probe(&t, env);
    let uid = u64::from(uid.expect("a uid"));

    assert_ne!(zygote, std::process::id() as i32, "forked by the zygote");
    assert_eq!(facts["argv"], serde_json::json!(["arg-1"]));
    assert_eq!(facts["pid"], 1, "pid 1 of its own pid namespace");
    assert_eq!(facts["procs"], serde_json::json!([1]), "sees only itself");
    assert_eq!(facts["uid"], serde_json::json!([uid, uid, uid]));
    assert_eq!(facts["groups"], serde_json::json!([]));
    for caps in ["cap_eff", "cap_bnd", "cap_inh"] {
        assert_eq!(facts[caps], "0000000000000000", "{caps}");
    }
    assert_eq!(facts["no_new_privs"], "1");
    assert_eq!(facts["seccomp"], "2", "a seccomp filter is installed");
    assert_eq!(facts["hostname"], "refinery");
    assert_eq!(facts["cwd"], "/tmp");
    let root: Vec<&str> = facts["root"]
        .as_array()
        .expect("root listing")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for host_only in ["home", "root", "var", "work", "sys", "srv", "opt"] {
        assert!(!root.contains(&host_only), "/{host_only} visible: {root:?}");
    }
    for expected in ["code", "dev", "etc", "proc", "runtime", "tmp", "usr"] {
        assert!(root.contains(&expected), "/{expected} missing: {root:?}");
    }
    let mut env: BTreeMap<String, String> = BASE_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.insert("SECRET".into(), "s3".into());
    assert_eq!(facts["env"], serde_json::to_value(&env).expect("env"));
    // 0..=4 and the descriptor listdir itself opened; nothing of the zygote's.
    let fds: Vec<i64> = facts["fds"]
        .as_array()
        .expect("fds")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    assert_eq!(&fds[..5], &[0, 1, 2, 3, 4]);
    assert!(fds.len() <= 6, "stray descriptors: {fds:?}");
    assert_eq!(facts["code"], "echo from-code\n");
    assert_eq!(facts["write_tmp"], "allowed");
    assert_ne!(facts["write_code"], "allowed");
    let host_mnt = std::fs::read_link("/proc/self/ns/mnt").expect("own mnt ns");
    assert_ne!(
        facts["mount_ns_differs"],
        host_mnt.to_string_lossy().as_ref()
    );
}

#[test]
fn the_zygote_holds_no_environment_and_only_its_control_socket() {
    let t = with_probe_zygote();
    let (_, zygote, _) = probe(&t, BTreeMap::new());
    let environ = std::fs::read(format!("/proc/{zygote}/environ")).expect("environ");
    assert!(environ.is_empty(), "zygote environment: {environ:?}");
    let mut targets: Vec<String> = std::fs::read_dir(format!("/proc/{zygote}/fd"))
        .expect("fd dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    targets.sort();
    let sockets = targets.iter().filter(|t| t.starts_with("socket:")).count();
    assert_eq!(sockets, 1, "one control socket: {targets:?}");
    for t in &targets {
        let allowed = t == "/dev/null"
            || t.starts_with("socket:")
            || t.starts_with("pid:")
            || t.starts_with("pipe:")
            || t.starts_with("/dev/pts")
            || t.starts_with("/tmp/")
            || t.contains("/.tmp");
        assert!(
            allowed,
            "unexpected zygote descriptor {t} among {targets:?}"
        );
    }
}

#[test]
fn a_killed_zygote_is_restarted_by_the_next_fork() {
    let t = with_probe_zygote();
    let (_, first, _) = probe(&t, BTreeMap::new());
    // SAFETY: kill(2) on the zygote's pid, a child of this test process.
    unsafe { libc::kill(first, libc::SIGKILL) };
    assert!(wait_gone(first, Duration::from_secs(5)));
    let (facts, second, _) = probe(&t, BTreeMap::new());
    assert_ne!(first, second, "a new zygote");
    assert_eq!(facts["pid"], 1);
}

#[test]
fn an_unknown_zygote_falls_back_to_exec_or_fails_clearly() {
    let t = test_host();
    let fallback = vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        "echo exec-fallback >&4".to_string(),
    ];
    let (out, _, _) = t.run(&t.spec(fork_entry("nope", Some(fallback))));
    assert_eq!(out, "exec-fallback\n");
    let err = t
        .host
        .spawn(&t.spec(fork_entry("nope", None)))
        .expect_err("no zygote, no fallback");
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn concurrent_forks_get_separate_namespaces() {
    let t = with_probe_zygote();
    let spawned: Vec<(refinery_sandbox::SandboxedInstance, std::os::fd::OwnedFd)> = (0..8)
        .map(|_| t.spawn(&t.spec(fork_entry("probe", None))))
        .map(|Spawned { instance, channels }| {
            // The probe reports once its sandbox is built, then waits for fd 3 to close.
            let facts = read_to_end(channels.responses);
            assert!(facts.contains("\"pid\": 1"), "{facts}");
            (instance, channels.requests)
        })
        .collect();
    let mut namespaces: Vec<String> = spawned
        .iter()
        .flat_map(|(instance, _)| {
            ["pid", "mnt", "net", "ipc", "uts"].map(|ns| {
                std::fs::read_link(format!("/proc/{}/ns/{ns}", instance.pid()))
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
        })
        .collect();
    let total = namespaces.len();
    namespaces.sort();
    namespaces.dedup();
    assert_eq!(
        namespaces.len(),
        total,
        "every namespace is the instance's own"
    );
    for (instance, _requests) in spawned {
        instance.destroy().expect("destroy");
    }
}

/// Every byte `pid` has mapped writable or private (its heap, stacks, anonymous memory).
fn memory_of(pid: i32) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    let mut all = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let mut buf = vec![0u8; (end - start) as usize];
        if mem.read_exact_at(&mut buf, start).is_ok() {
            all.extend_from_slice(&buf);
        }
    }
    all
}

#[test]
fn the_zygote_never_holds_what_an_instance_is_for() {
    let t = with_probe_zygote();
    let secret = format!("zygote-leak-canary-{}", std::process::id());
    let env = BTreeMap::from([("API_TOKEN".to_string(), secret.clone())]);
    let (facts, zygote, _) = probe(&t, env);
    assert_eq!(
        facts["env"]["API_TOKEN"],
        secret.as_str(),
        "the instance got it"
    );
    let memory = memory_of(zygote);
    assert!(memory.len() > 1_000_000, "read the zygote's memory");
    // The scan does find what the zygote was sent: its own (public) configuration.
    let config_key = b"landlock_create_ruleset";
    assert!(
        memory.windows(config_key.len()).any(|w| w == config_key),
        "the scan should see the zygote's configuration"
    );
    let found = memory.windows(secret.len()).any(|w| w == secret.as_bytes());
    assert!(
        !found,
        "the block's secret is in the zygote's memory, where later forks would inherit it"
    );
}
