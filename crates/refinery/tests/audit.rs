//! The security audit trail over HTTP: a hostile block's refused syscalls come back as
//! events of its account (`GET /v1/audit`, `refinery audit`), never of another account's,
//! and as `refinery_refused_syscalls_total` in `/metrics`.
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
