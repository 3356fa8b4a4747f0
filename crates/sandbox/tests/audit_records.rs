//! Which seccomp answers reach the kernel's audit log, read back from `/dev/kmsg`: the quiet
//! answers (`clone3` → ENOSYS, `sync`/`syncfs` → 0) and everything ordinary Node, shell and
//! Python work does leave no record; a genuine refusal (`mount`) does — from an exec-started
//! instance (the Rust init installs the filters) and from a zygote-forked one (the Python
//! zygote installs the same programs). Runs as root with `/dev/kmsg` readable.
//!
//! The kernel rate-limits audit records host-wide (printk: 10 per 5 s), so the instances run
//! again until each path's `mount` record has come through; any record of a quiet answer or
//! of ordinary work fails the test at once.

#![cfg(target_arch = "x86_64")]

mod common;

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use common::{read_to_end, test_host, wait_gone, TestHost};
use refinery_sandbox::{Entry, Spawned, ZygoteSpec};

const SYS_MOUNT: i64 = 165;

/// Ordinary work that makes glibc try `clone3` (a thread, a spawn), the quiet calls made
/// directly, then one genuine refusal, `mount`.
const PY_WORK: &str = r#"
import ctypes, json, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(nr, *a):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(x) for x in a])
    return r if r >= 0 else -ctypes.get_errno()
def work(attack):
    out = {"clone3": call(435, 0, 0), "sync": call(162)}
    fd = os.open("/code", os.O_RDONLY)
    out["syncfs"] = call(306, fd)
    os.close(fd)
    t = threading.Thread(target=lambda: None); t.start(); t.join()
    out["spawn"] = subprocess.run(["/bin/sh", "-c", "echo x | cat >/dev/null"]).returncode
    if attack:
        out["mount"] = call(165, 0, 0, 0, 0, 0)
    os.write(4, json.dumps(out).encode())
"#;

const NODE_WORK: &str = "\
const { Worker } = require('node:worker_threads');
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const w = new Worker('require(\"node:worker_threads\").parentPort.postMessage(1)', { eval: true });
w.on('message', () => {
  execFileSync('/bin/sh', ['-c', 'echo x | cat >/dev/null']);
  fs.writeSync(4, 'ok');
  w.terminate();
});
";

/// The kernel log from its current end, non-blocking.
fn open_kmsg() -> File {
    let mut kmsg = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .expect("this test reads the kernel's audit records from /dev/kmsg (run as root on a host that has it)");
    kmsg.seek(SeekFrom::End(0)).expect("seek /dev/kmsg");
    kmsg
}

/// (uid, syscall, message) of every seccomp record (`type=1326`) read so far.
fn seccomp_records(kmsg: &mut File) -> Vec<(u32, i64, String)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if !text.contains("type=1326") {
                    continue;
                }
                let field = |key: &str| {
                    text.split_whitespace()
                        .find_map(|w| w.strip_prefix(key))
                        .and_then(|v| v.parse::<i64>().ok())
                };
                if let (Some(uid), Some(syscall)) = (field("uid="), field("syscall=")) {
                    out.push((uid as u32, syscall, text.trim().to_string()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("reading /dev/kmsg: {e}"),
        }
    }
    out
}

/// Runs one instance to its end; returns its uid and what it wrote on fd 4.
fn run(t: &TestHost, entry: Entry) -> (u32, String) {
    let Spawned { instance, channels } = t.spawn(&t.spec(entry));
    let uid = instance.uid().expect("a uid");
    let out = read_to_end(channels.responses);
    drop(channels.requests);
    let logs = read_to_end(channels.logs);
    wait_gone(instance.pid(), Duration::from_secs(10));
    instance.destroy().expect("destroy");
    assert!(!out.is_empty(), "no output; logs: {logs}");
    (uid, out)
}

fn python_exec(attack: bool) -> Entry {
    let cap = if attack { "True" } else { "False" };
    Entry::Exec {
        argv: vec![
            "/usr/bin/python3".into(),
            "-c".into(),
            format!("{PY_WORK}\nwork({cap})\n"),
        ],
    }
}

#[test]
fn only_genuine_refusals_leave_kernel_audit_records() {
    let t = test_host();
    // A zygote whose preloaded "shim" does the same work from a forked instance.
    let shim = t.runtime.path().join("work_shim.py");
    std::fs::write(
        &shim,
        format!("{PY_WORK}\ndef main():\n    work(True)\n    os.close(4)\n    return 0\n"),
    )
    .expect("write shim");
    t.host
        .add_zygote(ZygoteSpec {
            name: "work".into(),
            interpreter: vec!["/usr/bin/python3".into(), "-I".into(), "-B".into()],
            preload: shim,
        })
        .expect("the zygote starts");
    let mut kmsg = open_kmsg();

    let mut ours = BTreeSet::new();
    let (mut exec_uids, mut zygote_uids) = (BTreeSet::new(), BTreeSet::new());
    let mut proven = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while proven.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no mount record came through for {:?} of [exec, zygote] (the kernel's rate limit, or refusals are not logged)",
            ["exec", "zygote"]
                .iter()
                .filter(|p| !proven.contains(*p))
                .collect::<Vec<_>>()
        );
        let (node, out) = run(
            &t,
            Entry::Exec {
                argv: vec!["/usr/bin/node".into(), "-e".into(), NODE_WORK.into()],
            },
        );
        assert_eq!(out, "ok");
        let (sh, out) = run(&t, common::sh("echo x | cat | tr x y; sleep 0 & wait"));
        assert_eq!(out, "y\n");
        let (quiet, out) = run(&t, python_exec(false));
        let reply: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(
            reply,
            serde_json::json!({"clone3": -libc::ENOSYS, "sync": 0, "syncfs": 0, "spawn": 0})
        );
        let (exec, out) = run(&t, python_exec(true));
        assert!(out.contains("\"mount\": -1}"), "{out}");
        let (zygote, out) = run(
            &t,
            Entry::Fork {
                zygote: "work".into(),
                args: vec![],
                fallback: None,
            },
        );
        assert!(out.contains("\"mount\": -1}"), "{out}");
        ours.extend([node, sh, quiet, exec, zygote]);
        exec_uids.insert(exec);
        zygote_uids.insert(zygote);
        std::thread::sleep(Duration::from_millis(500));
        for (uid, syscall, line) in seccomp_records(&mut kmsg) {
            if !ours.contains(&uid) {
                continue; // another process's instance
            }
            assert_eq!(syscall, SYS_MOUNT, "only the mount is a refusal: {line}");
            if exec_uids.contains(&uid) {
                proven.insert("exec");
            } else if zygote_uids.contains(&uid) {
                proven.insert("zygote");
            } else {
                panic!("a mount record of an instance that made none: {line}");
            }
        }
    }
}
