//! No account can exhaust the server's memory or disk through the API: upload limits,
//! the storage quota, retention of old deployments, project deletion, the deploy rate
//! limit and the bound on deploys received at once. All against the real server.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::Server;
use serde_json::{json, Value};

const MIB: usize = 1024 * 1024;

/// A project whose block returns `version`; `source` names an uploaded file.
fn manifest(project: &str, version: u32) -> String {
    format!(
        r#"name = "{project}"

[[blocks]]
name = "b"
language = "python"
source = "b.py"
"#
    ) + &format!("# version {version}\n")
}

fn source(version: u32, padding: usize) -> String {
    format!(
        "def main(block_input, backpack):\n    return {version}\n# {}\n",
        "x".repeat(padding)
    )
}

async fn deploy_version(
    server: &Server,
    key: &str,
    project: &str,
    version: u32,
    padding: usize,
) -> (u16, Value) {
    let code = source(version, padding);
    server
        .deploy(key, &manifest(project, version), &[("b.py", &code)])
        .await
}

async fn quota(server: &Server, account: &str) -> Value {
    let (status, body) = server
        .request(
            "GET",
            &format!("/v1/accounts/{account}/quota"),
            Some(&server.operator_key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn projects(server: &Server, key: &str) -> Vec<Value> {
    let (status, body) = server.request("GET", "/v1/projects", Some(key), None).await;
    assert_eq!(status, 200, "{body}");
    body["projects"].as_array().cloned().unwrap_or_default()
}

async fn deployment_numbers(server: &Server, key: &str, project: &str) -> Vec<i64> {
    let (status, body) = server
        .request(
            "GET",
            &format!("/v1/projects/{project}/deployments"),
            Some(key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["deployments"]
        .as_array()
        .expect("deployments")
        .iter()
        .map(|d| d["deployment"].as_i64().expect("number"))
        .collect()
}

/// Deployment directories laid out under `<data>/code`.
fn code_dirs(server: &Server) -> usize {
    std::fs::read_dir(server.data_dir.join("code"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

fn assert_refused(status: u16, body: &Value, limit: &str, value: usize) {
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    assert_eq!(body["error"]["limit"], limit, "{body}");
    assert_eq!(body["error"]["limit_value"], value, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&value.to_string()), "{body}");
}

/// Sends a deploy's headers declaring `length` bytes with `Expect: 100-continue`, and reads
/// the answer without sending the body.
fn refused_before_the_body(server: &Server, key: &str, length: usize) -> (u16, Value) {
    let address = server.url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "POST /v1/deployments HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).expect("write");
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.to_string())),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_uploads_are_refused_naming_the_limit_and_nothing_is_stored() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;

    // The outside testers' case: a 57 MB body (a manifest padded with comments) is
    // refused from its headers, before any of it is read (curl sends `Expect:
    // 100-continue` for large bodies: the client is told before it sends a byte).
    let (status, body) = refused_before_the_body(&server, &key, 57_000_000);
    assert_refused(status, &body, "deploy_body_bytes", 24 * MIB);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("57000000 bytes"));

    // A manifest over 1 MiB, although the body is within its limit.
    let padded = manifest("big", 1) + &"# comment\n".repeat(MIB / 10 + 1);
    let (status, body) = server
        .deploy(&key, &padded, &[("b.py", &source(1, 0))])
        .await;
    assert_refused(status, &body, "manifest_bytes", MIB);

    // One file over 5 MiB.
    let (status, body) = deploy_version(&server, &key, "big", 1, 5 * MIB + 1).await;
    assert_refused(status, &body, "file_bytes", 5 * MIB);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("b.py"));

    // Files within the per-file limit, over the total.
    let chunk = "y".repeat(4 * MIB);
    let files: Vec<(String, &str)> = (0..5)
        .map(|i| (format!("f{i}.txt"), chunk.as_str()))
        .collect();
    let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (p.as_str(), *c)).collect();
    let mut with_source = files.clone();
    let code = source(1, 0);
    with_source.push(("b.py", &code));
    let (status, body) = server.deploy(&key, &manifest("big", 1), &with_source).await;
    assert_refused(status, &body, "files_bytes", 16 * MIB);

    // Too many files.
    let names: Vec<String> = (0..300).map(|i| format!("f{i}.txt")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "z")).collect();
    let (status, body) = server.deploy(&key, &manifest("big", 1), &many).await;
    assert_refused(status, &body, "files", 256);

    // Nothing was stored: no project, no storage used.
    assert!(projects(&server, &key).await.is_empty());
    assert_eq!(quota(&server, "acme").await["usage"]["storage_bytes"], 0);

    // The same project within the limits deploys (the server is still serving).
    let (status, body) = deploy_version(&server, &key, "big", 1, MIB).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        server.invoke_ok(&key, "big", "b", Value::Null).await["output"],
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_quota_refuses_a_deploy_over_it_and_the_quota_api_shows_usage() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    let (_, other) = server.account("other").await;
    let (status, body) = server
        .request(
            "PUT",
            "/v1/accounts/acme/quota",
            Some(&server.operator_key),
            Some(json!({ "storage_mb": 1 })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["quota"]["storage_mb"], 1, "{body}");
    assert_eq!(body["overrides"]["storage_mb"], 1, "{body}");
    assert_eq!(body["defaults"]["storage_mb"], 1024, "{body}");

    // 300 KB of code: the manifest, the code stored and the code laid out.
    let (status, body) = deploy_version(&server, &key, "p", 1, 300 * 1024).await;
    assert_eq!(status, 201, "{body}");
    let expected = manifest("p", 1).len() + 2 * source(1, 300 * 1024).len();
    let usage = quota(&server, "acme").await;
    assert_eq!(usage["usage"]["storage_bytes"], expected, "{usage}");
    assert_eq!(usage["quota"]["storage_mb"], 1, "{usage}");

    // A second project of the same size would exceed 1 MiB: 422 naming the quota, the
    // usage and how to free space; nothing stored.
    let (status, body) = deploy_version(&server, &key, "q", 1, 300 * 1024).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "storage_quota", "{body}");
    assert_eq!(body["error"]["limit"], "storage_mb", "{body}");
    assert_eq!(body["error"]["usage_bytes"], expected, "{body}");
    assert_eq!(body["error"]["limit_bytes"], MIB, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    for needle in [
        "1 MiB storage",
        "refinery projects delete",
        "--keep-deployments",
        "set-quota acme --storage-mb",
    ] {
        assert!(message.contains(needle), "`{needle}` missing: {message}");
    }
    assert_eq!(projects(&server, &key).await.len(), 1);
    assert_eq!(
        quota(&server, "acme").await["usage"]["storage_bytes"],
        expected
    );

    // Another account is not affected (its own default quota).
    let (status, body) = deploy_version(&server, &other, "q", 1, 300 * 1024).await;
    assert_eq!(status, 201, "{body}");

    // Raising the quota lets the deploy through.
    let (status, _) = server
        .request(
            "PUT",
            "/v1/accounts/acme/quota",
            Some(&server.operator_key),
            Some(json!({ "storage_mb": 2 })),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = deploy_version(&server, &key, "q", 1, 300 * 1024).await;
    assert_eq!(status, 201, "{body}");

    // The CLI shows the storage line.
    let (code, out, err) = server.cli(&server.operator_key, &["accounts", "quota", "acme"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("storage") && out.contains("of 2 MiB kept"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_prunes_beyond_n_and_rollback_to_a_pruned_one_is_a_clear_error() {
    let server = Server::start_with(&["--keep-deployments", "3"]).await;
    let (_, key) = server.account("acme").await;
    for version in 1..=5 {
        let (status, body) = deploy_version(&server, &key, "p", version, 1000).await;
        assert_eq!(status, 201, "{body}");
        // Lays out the deployment's code dir.
        assert_eq!(
            server.invoke_ok(&key, "p", "b", Value::Null).await["output"],
            version
        );
    }
    assert_eq!(deployment_numbers(&server, &key, "p").await, vec![3, 4, 5]);
    assert_eq!(
        code_dirs(&server),
        3,
        "code dirs of pruned deployments removed"
    );
    let one = manifest("p", 5).len() + 2 * source(5, 1000).len();
    assert_eq!(
        quota(&server, "acme").await["usage"]["storage_bytes"],
        3 * one
    );

    // Rollback to a pruned deployment: 410, saying so and how many are kept.
    let (status, body) = server.rollback(&key, "p", 1).await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["error"]["code"], "gone", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("was pruned") && message.contains("last 3 deployments"),
        "{message}"
    );
    // A number that never existed is still "not found".
    let (status, _) = server.rollback(&key, "p", 9).await;
    assert_eq!(status, 404);

    // Rollback to a kept one works, and it serves.
    let (status, body) = server.rollback(&key, "p", 3).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        server.invoke_ok(&key, "p", "b", Value::Null).await["output"],
        3
    );

    // The next deploy keeps the newest three: 3 (live until now) is pruned.
    let (status, body) = deploy_version(&server, &key, "p", 6, 1000).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["deployment"], 6);
    assert_eq!(deployment_numbers(&server, &key, "p").await, vec![4, 5, 6]);
    assert_eq!(
        server.invoke_ok(&key, "p", "b", Value::Null).await["output"],
        6
    );

    // The CLI lists only the kept ones.
    let (code, out, err) = server.cli(&key, &["deployments", "p"], None);
    assert_eq!(code, 0, "{out}{err}");
    let listed: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(listed.contains(&"6") && !listed.contains(&"3"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_project_removes_deployments_and_instances_keeps_executions_and_usage() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    for version in 1..=2 {
        let (status, body) = deploy_version(&server, &key, "p", version, 100).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = deploy_version(&server, &key, "keep", 1, 100).await;
    assert_eq!(status, 201, "{body}");
    let execution = server.invoke_ok(&key, "p", "b", Value::Null).await;
    let execution_id = execution["execution_id"].as_str().expect("id").to_string();
    server.invoke_ok(&key, "keep", "b", Value::Null).await;
    assert_eq!(server.instances_of("p", "b").await.len(), 1);
    let kept_usage = manifest("keep", 1).len() + 2 * source(1, 100).len();

    // Through the CLI, with --json.
    let (code, out, err) = server.cli(&key, &["projects", "delete", "p", "--json"], None);
    assert_eq!(code, 0, "{out}{err}");
    let reply: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(reply["deleted"], true, "{reply}");
    assert_eq!(reply["deployments_deleted"], 2, "{reply}");

    // Its deployments and instances are gone, the other project's stay.
    let (status, _) = server
        .request("GET", "/v1/projects/p/deployments", Some(&key), None)
        .await;
    assert_eq!(status, 404);
    let (status, _) = server.invoke(&key, "p", "b", Value::Null).await;
    assert_eq!(status, 404);
    let mut gone = false;
    for _ in 0..100 {
        if server.instances_of("p", "b").await.is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "instances of the deleted project remain");
    assert_eq!(server.instances_of("keep", "b").await.len(), 1);
    assert_eq!(
        code_dirs(&server),
        1,
        "only the kept project's code is laid out"
    );
    let names: Vec<Value> = projects(&server, &key)
        .await
        .iter()
        .map(|p| p["project"].clone())
        .collect();
    assert_eq!(names, vec![json!("keep")]);
    assert_eq!(
        quota(&server, "acme").await["usage"]["storage_bytes"],
        kept_usage
    );

    // Its executions and usage stay.
    let (status, body) = server
        .request(
            "GET",
            &format!("/v1/executions/{execution_id}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["project"], "p", "{body}");
    let (status, usage) = server.request("GET", "/v1/usage", Some(&key), None).await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(usage["totals"]["requests"], 2, "{usage}");
    assert!(
        usage["blocks"]
            .as_array()
            .expect("blocks")
            .iter()
            .any(|b| b["project"] == "p"),
        "{usage}"
    );

    // Deleting again: 404.
    let (status, body) = server
        .request("DELETE", "/v1/projects/p", Some(&key), None)
        .await;
    assert_eq!(status, 404, "{body}");
    // Another account cannot delete it either.
    let (_, intruder) = server.account("intruder").await;
    let (status, _) = server
        .request("DELETE", "/v1/projects/keep", Some(&intruder), None)
        .await;
    assert_eq!(status, 404);

    // The same name deploys again, as a new project from deployment 1.
    let (status, body) = deploy_version(&server, &key, "p", 7, 100).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["deployment"], 1, "{body}");
    assert_eq!(
        server.invoke_ok(&key, "p", "b", Value::Null).await["output"],
        7
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deploys_beyond_the_rate_limit_get_429_with_retry_after() {
    let server = Server::start_with(&["--deploy-rate", "3/1m"]).await;
    let (_, key) = server.account("acme").await;
    let (_, other) = server.account("other").await;
    for version in 1..=3 {
        let (status, body) = deploy_version(&server, &key, "p", version, 10).await;
        assert_eq!(status, 201, "{body}");
    }
    let response = server
        .http
        .post(format!("{}/v1/deployments", server.url))
        .bearer_auth(&key)
        .json(&json!({ "manifest": manifest("p", 4), "files": { "b.py": source(4, 10) } }))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 429);
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "throttled", "{body}");
    assert_eq!(body["error"]["limit"], "deploy_rate", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("3 deploys per 1m"),
        "{body}"
    );
    assert_eq!(deployment_numbers(&server, &key, "p").await, vec![1, 2, 3]);

    // Per account: another account deploys, and invocations are not limited by it.
    let (status, body) = deploy_version(&server, &other, "p", 1, 10).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        server.invoke_ok(&key, "p", "b", Value::Null).await["output"],
        3
    );
}

/// Starts a deploy whose body never finishes arriving: it holds its turn to be received.
fn stalled_deploy(server: &Server, key: &str) -> TcpStream {
    let address = server.url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).expect("connect");
    let head = format!(
        "POST /v1/deployments HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"manifest\": \""
    );
    stream.write_all(head.as_bytes()).expect("write");
    stream
}

#[tokio::test(flavor = "multi_thread")]
async fn deploys_received_at_once_are_bounded_per_account_and_server_wide() {
    let server = Server::start_with(&[
        "--deploys-at-once",
        "2",
        "--deploys-at-once-per-account",
        "1",
    ])
    .await;
    let (_, a) = server.account("a").await;
    let (_, b) = server.account("b").await;
    let (_, c) = server.account("c").await;
    let (_, d) = server.account("d").await;
    let message = |body: &Value| {
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };

    // Account a's one turn is taken: its next deploy waits, then gets 429; account b
    // still deploys (one of the server's two turns is free).
    let stalled_a = stalled_deploy(&server, &a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = deploy_version(&server, &a, "p", 1, 10).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["limit"], "deploys_at_once", "{body}");
    assert!(
        message(&body).contains("account a")
            && message(&body).contains("--deploys-at-once-per-account"),
        "names the account and its flag: {body}"
    );
    let (status, body) = deploy_version(&server, &b, "p", 1, 10).await;
    assert_eq!(status, 201, "{body}");
    // When the stalled client goes away, its turn comes back.
    drop(stalled_a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = deploy_version(&server, &a, "p", 1, 10).await;
    assert_eq!(status, 201, "{body}");

    // Two accounts' stalled deploys take the server's two turns: a third account waits,
    // then gets 429; once they are gone it deploys.
    let stalled_b = stalled_deploy(&server, &b);
    let stalled_c = stalled_deploy(&server, &c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = deploy_version(&server, &d, "p", 1, 10).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["limit"], "deploys_at_once", "{body}");
    assert!(
        message(&body).contains("the server") && message(&body).contains("--deploys-at-once`"),
        "names the server-wide flag: {body}"
    );
    drop(stalled_b);
    drop(stalled_c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = deploy_version(&server, &d, "p", 1, 10).await;
    assert_eq!(status, 201, "{body}");
}
