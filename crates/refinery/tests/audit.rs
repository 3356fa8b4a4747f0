//! The security audit trail over HTTP: a hostile block's refused syscalls come back as
//! events of its account (`GET /v1/audit`, `refinery audit`), never of another account's,
//! and as `refinery_refused_syscalls_total` in `/metrics`; ordinary work (threads, child
//! processes, `sync`: the filter's quiet answers) leaves no event; a second server on the
//! host records none of the first's. Also what those quiet answers and the shims mean for a
//! block: `sync`/`syncfs` flush nothing of the host; its threads survive into the next warm
//! invocation, its other processes do not.
//!
//! The kernel rate-limits its audit records (and other processes on the host produce them
//! too), so the block is invoked again until at least one event arrives, and the test asserts
//! at least one — never a count, never a speed.

#![cfg(target_arch = "x86_64")]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::{json, Value};

/// Tries four refused syscalls (x86_64 numbers) and reports the errno of each.
const HOSTILE: &str = r#"
name = "hostile"

[[blocks]]
name = "attack"
language = "python"
code = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def sc(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")

def main(block_input, backpack):
    return {
        "unshare": sc(272, 0x10000000),
        "mount": sc(165, 0, 0, 0, 0, 0),
        "bpf": sc(321, 0, 0, 0),
        "keyctl": sc(250, 0, -3, 0),
    }
"""
"#;

const REFUSED: [&str; 4] = ["unshare", "mount", "bpf", "keyctl"];

/// A generous bound on waiting for the kernel: a failure bound, not a speed assertion.
const PATIENCE: Duration = Duration::from_secs(120);

fn events(reply: &Value) -> Vec<Value> {
    reply["events"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_syscalls_are_logged_per_account() {
    let server = Server::start().await;
    let (alpha_id, alpha) = server.account("alpha").await;
    let (_beta_id, beta) = server.account("beta").await;

    if std::fs::File::open("/dev/kmsg").is_err() {
        // A host without the kernel log: the server still runs and says the trail is off.
        let (status, reply) = server.request("GET", "/v1/audit", Some(&alpha), None).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["watching"], false, "{reply}");
        eprintln!("/dev/kmsg unavailable: only the degraded mode was checked");
        return;
    }

    server.deploy_ok(&alpha, HOSTILE).await;
    let mut instances = BTreeSet::new();
    let deadline = Instant::now() + PATIENCE;
    let found = loop {
        let run = server
            .invoke_ok(&alpha, "hostile", "attack", json!(null))
            .await;
        // Every attempt was refused (the filter's errnos).
        for name in REFUSED {
            let errno = run["output"][name].as_str().unwrap_or("missing");
            assert!(errno == "EPERM" || errno == "ENOSYS", "{name}: {run}");
        }
        instances.insert(run["instance_id"].as_str().unwrap_or_default().to_string());
        let (status, reply) = server
            .request("GET", "/v1/audit?limit=1000", Some(&alpha), None)
            .await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["watching"], true, "{reply}");
        let found = events(&reply);
        if !found.is_empty() || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        !found.is_empty(),
        "no refused syscall of alpha's block reached the trail"
    );
    for event in &found {
        assert_eq!(event["project"], "hostile", "{event}");
        assert_eq!(event["block"], "attack", "{event}");
        let instance = event["instance_id"].as_str().unwrap_or_default();
        assert!(instances.contains(instance), "{event} not of {instances:?}");
        let syscall = event["syscall"].as_str().unwrap_or_default();
        assert!(!syscall.is_empty(), "{event}");
        if REFUSED.contains(&syscall) {
            assert_eq!(event["action"], "errno EPERM", "{event}");
        }
        assert!(
            !event["comm"].as_str().unwrap_or_default().is_empty(),
            "{event}"
        );
        // Host details are the operator's.
        assert!(event.get("uid").is_none(), "{event}");
        assert!(event.get("account_id").is_none(), "{event}");
    }
    // The block's own attempts are among them, by name (its runtime may add others).
    assert!(
        found
            .iter()
            .any(|e| REFUSED.contains(&e["syscall"].as_str().unwrap_or_default())),
        "{found:?}"
    );
    let at: Vec<i64> = found.iter().filter_map(|e| e["at_ms"].as_i64()).collect();
    assert!(at.windows(2).all(|w| w[0] >= w[1]), "newest first: {at:?}");

    // Another account sees none of it, and may not ask for alpha's.
    let (status, reply) = server.request("GET", "/v1/audit", Some(&beta), None).await;
    assert_eq!(status, 200, "{reply}");
    assert!(events(&reply).is_empty(), "{reply}");
    assert!(!reply.to_string().contains("hostile"), "{reply}");
    let (status, reply) = server
        .request(
            "GET",
            &format!("/v1/audit?account={alpha_id}"),
            Some(&beta),
            None,
        )
        .await;
    assert_eq!(status, 403, "{reply}");
    assert!(!reply.to_string().contains("hostile"), "{reply}");

    // The operator sees them, with the account and the uid.
    let (status, reply) = server
        .request(
            "GET",
            &format!("/v1/audit?account={alpha_id}&limit=1"),
            Some(&server.operator_key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let mine = events(&reply);
    assert_eq!(mine.len(), 1, "limit=1: {reply}");
    assert_eq!(mine[0]["account_id"], alpha_id.as_str(), "{reply}");
    assert!(
        mine[0]["uid"].as_u64().is_some_and(|u| u >= 100_000),
        "{reply}"
    );

    // The counter, labelled by account, project and block.
    let metrics = server
        .http
        .get(format!("{}/metrics", server.url))
        .bearer_auth(&server.operator_key)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let series = format!(
        "refinery_refused_syscalls_total{{account=\"{alpha_id}\",project=\"hostile\",block=\"attack\"}} "
    );
    let value = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(value.is_some_and(|v| v >= 1.0), "{series} in:\n{metrics}");

    // The CLI shows the same trail.
    let (code, out, err) = server.cli(&alpha, &["audit", "--json", "--limit", "5"], None);
    assert_eq!(code, 0, "{err}");
    let reply: Value = serde_json::from_str(&out).expect("json");
    assert!(!events(&reply).is_empty(), "{out}");
    let (code, out, err) = server.cli(&alpha, &["audit"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hostile/attack"), "{out}");
    let (code, out, err) = server.cli(&beta, &["audit"], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "(none)", "{out}");
}

// ---------------------------------------------------------------------------------------------
// Only genuine refusals reach the trail, and only the server's own.

/// Ordinary work in each language: threads and child processes (glibc tries `clone3` for each,
/// answered ENOSYS quietly so that it falls back to `clone`), and `sync`/`syncfs` (answered 0).
const ORDINARY: &str = r#"
name = "ordinary"

[[blocks]]
name = "py"
language = "python"
code = """
import ctypes, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)

def main(block_input, backpack):
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    os.sync()
    fd = os.open("/code", os.O_RDONLY)
    synced = libc.syncfs(fd)
    os.close(fd)
    out = subprocess.run(["/bin/sh", "-c", "echo hi | tr a-z A-Z"], capture_output=True)
    return {"sh": out.stdout.decode().strip(), "syncfs": synced}
"""

[[blocks]]
name = "node"
language = "node"
code = """
const { execFileSync } = require('node:child_process');
const { Worker } = require('node:worker_threads');
exports.main = async () => {
  const fromWorker = await new Promise((resolve) => {
    const w = new Worker('require("node:worker_threads").parentPort.postMessage(42)', { eval: true });
    w.on('message', (m) => { w.terminate(); resolve(m); });
  });
  return { sh: execFileSync('/bin/sh', ['-c', 'echo hi | tr a-z A-Z']).toString().trim(), worker: fromWorker };
};
"""

[[blocks]]
name = "shell"
language = "shell"
code = """
echo hi | tr a-z A-Z
sleep 0 &
wait
"""

[[blocks]]
name = "attack"
language = "python"
code = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)

def main(block_input, backpack):
    ctypes.set_errno(0)
    r = libc.mount(None, None, None, 0, None)
    return {"mount": errno.errorcode.get(ctypes.get_errno(), "?") if r != 0 else "ok"}
"""
"#;

async fn audit_events(server: &Server, key: &str) -> Vec<Value> {
    let (status, reply) = server
        .request("GET", "/v1/audit?limit=1000", Some(key), None)
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["watching"], true, "{reply}");
    events(&reply)
}

async fn metrics_text(server: &Server) -> String {
    server
        .http
        .get(format!("{}/metrics", server.url))
        .bearer_auth(&server.operator_key)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body")
}

fn unattributed(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("refinery_refused_syscalls_unattributed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Invokes the ordinary blocks (Python, Node, shell: the first time a cold start) and then the
/// attack, until the attack's `mount` shows in the trail; returns the trail (operator's view).
async fn ordinary_work_then_an_attack(server: &Server, key: &str) -> Vec<Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let py = server.invoke_ok(key, "ordinary", "py", json!(null)).await;
        assert_eq!(py["output"], json!({"sh": "HI", "syncfs": 0}), "{py}");
        let node = server.invoke_ok(key, "ordinary", "node", json!(null)).await;
        assert_eq!(node["output"], json!({"sh": "HI", "worker": 42}), "{node}");
        let shell = server
            .invoke_ok(key, "ordinary", "shell", json!(null))
            .await;
        assert_eq!(shell["output"], json!("HI"), "{shell}");
        let attack = server
            .invoke_ok(key, "ordinary", "attack", json!(null))
            .await;
        assert_eq!(attack["output"], json!({"mount": "EPERM"}), "{attack}");
        // The records arrive in the kernel's order: once the attack's is in, any record of
        // the ordinary blocks' work (made before it) would be too.
        let found = eventually_events(server, Duration::from_secs(3)).await;
        if found.iter().any(|e| e["syscall"] == "mount") {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "the attack's refused mount never reached the trail (the kernel's rate limit?): {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn eventually_events(server: &Server, within: Duration) -> Vec<Value> {
    let until = Instant::now() + within;
    loop {
        let found = audit_events(server, &server.operator_key).await;
        if found.iter().any(|e| e["syscall"] == "mount") || Instant::now() > until {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ordinary_instance_starts_leave_no_record_and_refusals_still_do() {
    let server = Server::start().await;
    let (account_id, key) = server.account("ordinary").await;
    server.deploy_ok(&key, ORDINARY).await;
    let found = ordinary_work_then_an_attack(&server, &key).await;
    for event in &found {
        assert_eq!(event["block"], "attack", "not a genuine refusal: {event}");
        assert_eq!(event["syscall"], "mount", "{event}");
        assert_eq!(event["action"], "errno EPERM", "{event}");
        assert_eq!(event["account_id"], account_id.as_str(), "{event}");
    }
    let metrics = metrics_text(&server).await;
    for block in ["py", "node", "shell"] {
        let series = format!(
            "refinery_refused_syscalls_total{{account=\"{account_id}\",project=\"ordinary\",block=\"{block}\"}}"
        );
        assert!(!metrics.contains(&series), "{series} in:\n{metrics}");
    }
    assert_eq!(unattributed(&metrics), 0.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_servers_on_one_host_see_only_their_own_instances() {
    let a = Server::start().await;
    let b = Server::start().await;
    let (a_id, a_key) = a.account("alpha").await;
    let (_, b_key) = b.account("beta").await;
    a.deploy_ok(&a_key, ORDINARY).await;
    b.deploy_ok(&b_key, ORDINARY).await;
    // B runs instances too (so it holds uids), of ordinary work only.
    let py = b.invoke_ok(&b_key, "ordinary", "py", json!(null)).await;
    assert_eq!(py["output"]["sh"], "HI", "{py}");

    let found = ordinary_work_then_an_attack(&a, &a_key).await;
    assert!(
        found
            .iter()
            .any(|e| e["account_id"] == a_id.as_str() && e["block"] == "attack"),
        "A's attack, attributed to A: {found:?}"
    );
    assert!(
        found.iter().all(|e| e["account_id"] == a_id.as_str()),
        "{found:?}"
    );

    // B read the same kernel records: none is its own, so none is stored or counted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b_found = audit_events(&b, &b.operator_key).await;
    assert!(b_found.is_empty(), "B recorded A's refusals: {b_found:?}");
    let b_metrics = metrics_text(&b).await;
    assert_eq!(unattributed(&b_metrics), 0.0, "{b_metrics}");
    assert!(
        !b_metrics.contains("refinery_refused_syscalls_total{"),
        "{b_metrics}"
    );

    // Their instances have distinct uids, from distinct uid blocks.
    let uids = |instances: Vec<Value>| -> BTreeSet<u64> {
        instances.iter().filter_map(|i| i["uid"].as_u64()).collect()
    };
    let (a_uids, b_uids) = (uids(a.instances().await), uids(b.instances().await));
    assert!(
        !a_uids.is_empty() && !b_uids.is_empty(),
        "{a_uids:?} {b_uids:?}"
    );
    let block = |u: &u64| (u - 100_000) / 1024;
    let a_blocks: BTreeSet<u64> = a_uids.iter().map(block).collect();
    let b_blocks: BTreeSet<u64> = b_uids.iter().map(block).collect();
    assert!(
        a_blocks.is_disjoint(&b_blocks),
        "A {a_uids:?}, B {b_uids:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// What outlives an invocation, and what a block cannot make the host do.

const LIFETIME: &str = r#"
name = "lifetime"

[[blocks]]
name = "l"
language = "python"
code = """
import os, threading, time
state = {"ticks": 0}

def tick():
    while True:
        state["ticks"] += 1
        time.sleep(0.01)

def gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True

def main(block_input, backpack):
    if block_input == "start":
        threading.Thread(target=tick, daemon=True, name="ticker").start()
        pid = os.fork()
        if pid == 0:
            while True:
                time.sleep(1)
        return {"child": pid, "pid": os.getpid()}
    before = state["ticks"]
    time.sleep(0.3)
    return {
        "threads": sorted(t.name for t in threading.enumerate()),
        "ticking": state["ticks"] > before,
        "child_gone": gone(block_input["child"]),
        "pid": os.getpid(),
    }
"""
"#;

/// Threads of the block's own process survive into its next warm invocation (as on Lambda:
/// the process is frozen, not restarted); every other process it started is killed after each
/// invocation (`kill(-1, SIGKILL)` in the shim).
#[tokio::test(flavor = "multi_thread")]
async fn threads_survive_into_the_next_warm_invocation_other_processes_do_not() {
    let server = Server::start().await;
    let (_, key) = server.account("lifetime").await;
    server.deploy_ok(&key, LIFETIME).await;
    let first = server
        .invoke_ok(&key, "lifetime", "l", json!("start"))
        .await;
    let child = first["output"]["child"].as_i64().expect("child pid");
    let second = server
        .invoke_ok(&key, "lifetime", "l", json!({"child": child}))
        .await;
    assert_eq!(second["instance_id"], first["instance_id"], "{second}");
    assert_eq!(second["cold"], false, "{second}");
    assert_eq!(second["output"]["pid"], first["output"]["pid"], "{second}");
    let threads = second["output"]["threads"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        threads.contains(&json!("ticker")),
        "the thread is gone: {second}"
    );
    assert_eq!(
        second["output"]["ticking"], true,
        "the thread stopped: {second}"
    );
    assert_eq!(
        second["output"]["child_gone"], true,
        "the forked child survived: {second}"
    );
}

const SYNC: &str = r#"
name = "flush"

[[blocks]]
name = "sync"
language = "python"
code = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)

def main(block_input, backpack):
    if block_input != "sync":
        return "warm"
    os.sync()
    out = {}
    for path in ["/code", "/usr", "/tmp"]:
        fd = os.open(path, os.O_RDONLY)
        out[path] = libc.syncfs(fd)
        os.close(fd)
    return out
"""
"#;

/// `cachestat(2)` (Linux 6.5): dirty pages of a file in the page cache.
fn dirty_pages(path: &std::path::Path) -> u64 {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct CacheStat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let file = std::fs::File::open(path).expect("open");
    let range = Range { off: 0, len: 0 };
    let mut stat = CacheStat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both alive for the call.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut CacheStat,
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "cachestat (Linux 6.5+) tells whether a block's sync flushed the host's disk: {}",
        std::io::Error::last_os_error()
    );
    stat.nr_dirty
}

/// `sync()`/`syncfs()` succeed (0) but flush nothing of the host: a block's only writable
/// filesystem is its /tmp (memory), so real flushes would only let it stall every tenant's
/// disk I/O. A host file's dirty pages stay dirty across the block's sync; no audit record.
#[tokio::test(flavor = "multi_thread")]
async fn sync_and_syncfs_are_no_ops_that_flush_nothing_of_the_host() {
    let server = Server::start().await;
    let (account_id, key) = server.account("flush").await;
    server.deploy_ok(&key, SYNC).await;
    let warm = server.invoke_ok(&key, "flush", "sync", json!(null)).await;
    assert_eq!(warm["output"], "warm", "{warm}");
    // On the filesystem under the instance's /code (the data dir's).
    let mut kept_dirty = false;
    let mut seen = Vec::new();
    // Another process on the host may sync at any moment: one round that keeps the file dirty
    // proves the block flushed nothing (a real sync would clean it in every round).
    for round in 0..5 {
        // A new file each round (ext4 flushes a truncated-and-rewritten one at close).
        let dirty = server.data_dir.join(format!("dirty-{round}.bin"));
        std::fs::write(&dirty, vec![0x5a_u8; 4 << 20]).expect("write");
        let before = dirty_pages(&dirty);
        let run = server.invoke_ok(&key, "flush", "sync", json!("sync")).await;
        assert_eq!(
            run["output"],
            json!({"/code": 0, "/usr": 0, "/tmp": 0}),
            "{run}"
        );
        let after = dirty_pages(&dirty);
        seen.push((before, after));
        if before > 0 && after > 0 {
            kept_dirty = true;
            break;
        }
    }
    assert!(
        kept_dirty,
        "the block's sync flushed the host's disk (dirty pages before, after): {seen:?}"
    );
    // Quiet: nothing of it in the trail.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let found = audit_events(&server, &server.operator_key).await;
    assert!(
        found.iter().all(|e| e["account_id"] != account_id.as_str()),
        "{found:?}"
    );
}
