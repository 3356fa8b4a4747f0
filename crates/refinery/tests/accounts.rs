//! Account administration against a real server: disabling an account (403 for its keys,
//! its instances reaped, provisioned ones too, nothing re-provisioned, across a restart;
//! an invocation waiting for its turn refused, not started),
//! enabling it again, rotating its key (the old one refused at once, the key cache
//! included); and a failed start (port in use) that says so once, prints no operator key
//! and leaves no cgroups behind.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{eventually, Server, BIN};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// `warm` keeps one provisioned instance; `slow` sleeps for its input's seconds.
const PROJECT: &str = r#"
name = "work"

[[blocks]]
name = "warm"
language = "python"
min_warm = 1
code = """
def main(block_input, backpack):
    return "warm"
"""

[[blocks]]
name = "slow"
language = "python"
code = """
import time
def main(block_input, backpack):
    time.sleep(block_input or 0)
    return "slept"
"""
"#;

async fn account_instances(server: &Server, account_id: &str) -> Vec<Value> {
    server
        .instances()
        .await
        .into_iter()
        .filter(|i| i["account_id"] == account_id)
        .collect()
}

/// Polls the account's instances until `check` holds (or 20 s pass); returns the last list.
async fn instances_until(
    server: &Server,
    account_id: &str,
    check: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    for _ in 0..200 {
        let list = account_instances(server, account_id).await;
        if check(&list) {
            return list;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    account_instances(server, account_id).await
}

/// `GET /v1/projects` with `key`: its status and body (whether the key works now).
async fn list_projects(server: &Server, key: &str) -> (u16, Value) {
    server.request("GET", "/v1/projects", Some(key), None).await
}

fn assert_disabled(status: u16, body: &Value, account: &str) {
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "account_disabled", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("account {account} is disabled"))
            && message.contains(&format!("refinery accounts enable {account}")),
        "says what and how to fix: {message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disabled_account_is_refused_reaped_and_stays_disabled_until_enabled() {
    let server = Server::start().await;
    let op = server.operator_key.clone();
    let (alpha_id, alpha) = server.account("alpha").await;
    let (beta_id, beta) = server.account("beta").await;
    server.deploy_ok(&alpha, PROJECT).await;
    server.deploy_ok(&beta, PROJECT).await;
    server.invoke_ok(&alpha, "work", "slow", json!(0)).await;
    // alpha: the provisioned `warm` instance and an idle `slow` one.
    let before = instances_until(&server, &alpha_id, |l| l.len() == 2).await;
    assert_eq!(before.len(), 2, "{before:?}");

    // A long invocation is running when the account is disabled.
    let busy = server.invoke_in_background(&alpha, "work", "slow", json!(3));
    let running = instances_until(&server, &alpha_id, |l| {
        l.iter()
            .any(|i| i["block"] == "slow" && i["state"] == "busy")
    })
    .await;
    assert!(running.iter().any(|i| i["state"] == "busy"), "{running:?}");

    let (code, out, err) = server.cli(&op, &["accounts", "disable", "alpha", "--json"], None);
    assert_eq!(code, 0, "{out}{err}");
    let disabled: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(disabled["state"], "disabled", "{disabled}");
    assert!(disabled["disabled_at"].is_string(), "{disabled}");

    // Idle instances (the provisioned one too) are gone at once; only the busy one is left.
    let left = account_instances(&server, &alpha_id).await;
    assert!(
        left.iter().all(|i| i["state"] == "busy"),
        "idle instances of a disabled account must be destroyed at once: {left:?}"
    );
    // Its keys are refused everywhere, and nothing of it runs.
    let (status, body) = server.invoke(&alpha, "work", "warm", json!(null)).await;
    assert_disabled(status, &body, "alpha");
    let (status, body) = list_projects(&server, &alpha).await;
    assert_disabled(status, &body, "alpha");
    let (status, body) = server.deploy(&alpha, PROJECT, &[]).await;
    assert_disabled(status, &body, "alpha");
    let (code, _, err) = server.cli(&alpha, &["projects"], None);
    assert_ne!(code, 0);
    assert!(
        err.contains("is disabled") && err.contains("HTTP 403"),
        "{err}"
    );

    // The running invocation finishes; then its instance goes too, and none comes back.
    let (status, _, reply) = busy.await.expect("join");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["output"], "slept", "{reply}");
    let after = instances_until(&server, &alpha_id, <[Value]>::is_empty).await;
    assert!(after.is_empty(), "{after:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await; // a few reaper rounds
    let later = account_instances(&server, &alpha_id).await;
    assert!(
        later.is_empty(),
        "min_warm must not be re-provisioned while disabled: {later:?}"
    );

    // Another account is untouched.
    assert_eq!(
        server.invoke_ok(&beta, "work", "warm", json!(null)).await["output"],
        "warm"
    );
    assert!(!account_instances(&server, &beta_id).await.is_empty());

    // The state is listed (API and CLI, with a header row).
    let (status, list) = server.request("GET", "/v1/accounts", Some(&op), None).await;
    assert_eq!(status, 200, "{list}");
    let state_of = |name: &str| {
        list["accounts"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["name"] == name))
            .map(|a| a["state"].clone())
    };
    assert_eq!(state_of("alpha"), Some(json!("disabled")), "{list}");
    assert_eq!(state_of("beta"), Some(json!("active")), "{list}");
    let (code, out, err) = server.cli(&op, &["accounts", "list"], None);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert!(
        rows[0].contains("NAME") && rows[0].contains("STATE"),
        "{out}"
    );
    assert!(
        rows.iter()
            .any(|r| r.contains("alpha") && r.contains("disabled since")),
        "{out}"
    );
    assert!(
        rows.iter()
            .any(|r| r.contains("beta") && r.contains("active")),
        "{out}"
    );

    // Stored: after a restart alpha is still disabled and nothing of it is provisioned.
    let mut server = server;
    server.stop();
    let server = Server::start_in(&server.data_dir.clone(), &[]).await;
    let (status, body) = server.invoke(&alpha, "work", "warm", json!(null)).await;
    assert_disabled(status, &body, "alpha");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restarted = account_instances(&server, &alpha_id).await;
    assert!(restarted.is_empty(), "{restarted:?}");
    let beta_warm = instances_until(&server, &beta_id, |l| {
        l.iter().any(|i| i["block"] == "warm")
    })
    .await;
    assert!(
        beta_warm.iter().any(|i| i["block"] == "warm"),
        "beta's min_warm is provisioned at start as before: {beta_warm:?}"
    );

    // Enabled: the key works again and the provisioned instance is back before the reply.
    let (code, out, err) = server.cli(&op, &["accounts", "enable", "alpha"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("is enabled"), "{out}");
    let provisioned = account_instances(&server, &alpha_id).await;
    assert!(
        provisioned
            .iter()
            .any(|i| i["block"] == "warm" && i["state"] == "frozen"),
        "{provisioned:?}"
    );
    let reply = server.invoke_ok(&alpha, "work", "warm", json!(null)).await;
    assert_eq!(reply["output"], "warm", "{reply}");
    assert_eq!(
        reply["cold"], false,
        "served by the provisioned instance: {reply}"
    );

    // Only the operator disables or enables; unknown accounts are named.
    let (status, body) = server
        .request("POST", "/v1/accounts/beta/disable", Some(&alpha), None)
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = server
        .request("POST", "/v1/accounts/nobody/disable", Some(&op), None)
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(body.to_string().contains("nobody"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_key_replaces_the_old_one_at_once() {
    let server = Server::start().await;
    let op = server.operator_key.clone();
    let (acme_id, old_key) = server.account("acme").await;
    let (_, other) = server.account("other").await;
    // Used once, so the server has the old key in its cache.
    let (status, _) = list_projects(&server, &old_key).await;
    assert_eq!(status, 200);

    // The operator rotates it (CLI, JSON like `accounts create`).
    let (code, out, err) = server.cli(&op, &["accounts", "rotate-key", "acme", "--json"], None);
    assert_eq!(code, 0, "{out}{err}");
    let rotated: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(rotated["id"], acme_id.as_str(), "{rotated}");
    assert_eq!(rotated["name"], "acme", "{rotated}");
    let new_key = rotated["api_key"].as_str().expect("api_key").to_string();
    assert!(new_key.starts_with("rfk_"), "{new_key}");
    assert_ne!(new_key, old_key);
    let (status, body) = list_projects(&server, &old_key).await;
    assert_eq!(status, 401, "the old key must stop working at once: {body}");
    let (code, _, err) = server.cli(&old_key, &["projects"], None);
    assert_ne!(code, 0);
    assert!(
        err.contains("is not valid on the server") && err.contains("HTTP 401"),
        "{err}"
    );
    assert_eq!(
        err.matches("REFINERY_API_KEY").count(),
        1,
        "said once: {err}"
    );
    let (status, body) = list_projects(&server, &new_key).await;
    assert_eq!(status, 200, "{body}");

    // The account rotates its own key (human output: the key, once).
    let (code, out, err) = server.cli(&new_key, &["accounts", "rotate-key", "acme"], None);
    assert_eq!(code, 0, "{out}{err}");
    let newest = out
        .lines()
        .find_map(|l| l.strip_prefix("API key (shown once, keep it safe): "))
        .expect("key line")
        .trim()
        .to_string();
    let (status, _) = list_projects(&server, &new_key).await;
    assert_eq!(status, 401);
    let (status, _) = list_projects(&server, &newest).await;
    assert_eq!(status, 200);

    // Nobody else can rotate it: another account sees no such account.
    let (status, body) = server
        .request("POST", "/v1/accounts/acme/rotate-key", Some(&other), None)
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = list_projects(&server, &newest).await;
    assert_eq!(status, 200, "a refused rotation changes nothing");

    // Rotation survives a restart (it is stored, not only cached).
    let mut server = server;
    server.stop();
    let server = Server::start_in(&server.data_dir.clone(), &[]).await;
    let (status, _) = list_projects(&server, &old_key).await;
    assert_eq!(status, 401);
    let (status, _) = list_projects(&server, &newest).await;
    assert_eq!(status, 200);
}

/// Where this host mounts cgroup hierarchies (v1 controllers and the v2 tree).
fn cgroup_mounts() -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount = left.split_whitespace().nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(mount))
        })
        .collect()
}

/// The cgroup subtree name a server on `data_dir` uses (serve.rs `cgroup_root_name`).
fn cgroup_root_name(data_dir: &Path) -> String {
    let canonical = std::fs::canonicalize(data_dir).expect("canonical data dir");
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    format!("refinery-{}", &hex::encode(digest)[..12])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_on_a_port_in_use_fails_clearly_and_leaves_no_cgroups() {
    let first = Server::start().await;
    let port = first.url.rsplit(':').next().expect("port").to_string();
    let root = tempfile::tempdir().expect("tempdir");
    let data_dir = root.path().join("data");
    std::fs::create_dir_all(&data_dir).expect("data dir");
    let name = cgroup_root_name(&data_dir);
    let mounts = cgroup_mounts();
    assert!(!mounts.is_empty(), "no cgroup hierarchy mounted");
    // Sanity: the first server's own subtree is where this test looks.
    let first_name = cgroup_root_name(&first.data_dir);
    assert!(
        mounts.iter().any(|m| m.join(&first_name).is_dir()),
        "the running server's cgroups are not under {mounts:?}"
    );

    let output = std::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(&data_dir)
        .env("REFINERY_LOG", "warn")
        .output()
        .expect("run serve");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("listening on 127.0.0.1:{port}")) && stderr.contains("--listen"),
        "names the address and the fix: {stderr}"
    );
    // Said once, on one line; no operator key is printed by a start that failed.
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );
    assert!(!stdout.contains("Operator key"), "{stdout}");
    let left: Vec<PathBuf> = mounts
        .iter()
        .map(|m| m.join(&name))
        .filter(|dir| dir.exists())
        .collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");

    // The same data dir starts fine on a free port afterwards, and prints the key then; its
    // log, written to a file, has no colour codes.
    let log_path = root.path().join("server.log");
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data_dir)
        .env("REFINERY_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log_path).expect("log file"))
        .spawn()
        .expect("start serve");
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let done = line.starts_with("Refinery listening on ");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    });
    let up = eventually(Duration::from_secs(30), || reader.is_finished()).await;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert!(up, "the second start did not come up");
    let lines = reader.join().expect("reader");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("Operator key (shown once")),
        "{lines:?}"
    );
    let log = std::fs::read_to_string(&log_path).expect("log");
    assert!(log.contains("listening"), "{log}");
    assert!(!log.contains('\x1b'), "ANSI codes in a log file: {log:?}");
}

/// `one` runs one invocation at a time: a second one waits for the first.
const ONE_AT_A_TIME: &str = r#"
name = "queue"

[[blocks]]
name = "one"
language = "python"
max_concurrency = 1
code = """
import time
def main(block_input, backpack):
    time.sleep(block_input or 0)
    return "ran"
"""
"#;

#[tokio::test(flavor = "multi_thread")]
async fn an_invocation_waiting_when_its_account_is_disabled_never_runs() {
    let server = Server::start().await;
    let op = server.operator_key.clone();
    let (alpha_id, alpha) = server.account("alpha").await;
    server.deploy_ok(&alpha, ONE_AT_A_TIME).await;

    // The first invocation runs; the second waits for the block's one slot.
    let running = server.invoke_in_background(&alpha, "queue", "one", json!(3));
    let busy = instances_until(&server, &alpha_id, |l| {
        l.iter().any(|i| i["state"] == "busy")
    })
    .await;
    assert!(busy.iter().any(|i| i["state"] == "busy"), "{busy:?}");
    let waiting = server.invoke_in_background(&alpha, "queue", "one", json!(0));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (status, body) = server
        .request("POST", "/v1/accounts/alpha/disable", Some(&op), None)
        .await;
    assert_eq!(status, 200, "{body}");

    // The running one finishes; the waiting one is refused instead of starting an instance.
    let (status, _, reply) = running.await.expect("join");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["output"], "ran", "{reply}");
    let (status, _, reply) = waiting.await.expect("join");
    assert_disabled(status, &reply, "alpha");
    let left = instances_until(&server, &alpha_id, |l| l.is_empty()).await;
    assert!(
        left.is_empty(),
        "nothing of a disabled account is left: {left:?}"
    );
}
