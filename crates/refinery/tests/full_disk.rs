//! A full disk is an outage with a clear cause, never silent loss: the data dir on a small
//! tmpfs, filled by a filler file while the real server runs.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Server, Tmpfs};
use serde_json::{json, Value};

/// A Python block counting its own invocations in its (warm) instance: a refused
/// invocation that had run would show as a gap in the count.
const COUNTER: &str = r#"
name = "disk"
[[blocks]]
name = "count"
language = "python"
max_concurrency = 4
code = """
calls = 0
def main(block_input, backpack):
    global calls
    calls += 1
    print("call", calls)
    return {"calls": calls, "input": block_input}
"""
"#;

const OTHER: &str = r#"
name = "other"
[[blocks]]
name = "echo"
language = "shell"
code = "cat"
"#;

async fn executions(server: &Server, key: &str, project: &str) -> Vec<Value> {
    let (status, body) = server
        .request(
            "GET",
            &format!("/v1/projects/{project}/executions"),
            Some(key),
            None,
        )
        .await;
    assert_eq!(status, 200, "list executions: {body}");
    body["executions"].as_array().cloned().unwrap_or_default()
}

/// Every execution answered 200 is still there, with its output.
async fn assert_retrievable(server: &Server, key: &str, acknowledged: &[(String, Value)]) {
    for (id, output) in acknowledged {
        let (status, body) = server
            .request("GET", &format!("/v1/executions/{id}"), Some(key), None)
            .await;
        assert_eq!(
            status, 200,
            "acknowledged execution {id} is missing: {body}"
        );
        assert_eq!(&body["output"], output, "execution {id}: {body}");
    }
}

async fn health(server: &Server) -> (u16, Value) {
    server.request("GET", "/v1/health", None, None).await
}

fn assert_disk_full_error(status: u16, retry_after: Option<&str>, body: &Value, data_dir: &str) {
    assert_eq!(status, 503, "expected 503 for a full disk: {body}");
    assert_eq!(body["error"]["code"], "disk_full", "{body}");
    let secs: u64 = retry_after
        .unwrap_or_else(|| panic!("503 without Retry-After: {body}"))
        .parse()
        .expect("Retry-After in seconds");
    assert!(secs >= 1, "Retry-After {secs}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains(data_dir),
        "message should name the data dir {data_dir}: {message}"
    );
    assert!(
        message.contains(" free"),
        "message should say the free space: {message}"
    );
    assert!(
        message.contains("--disk-reserve"),
        "message should name the reserve flag: {message}"
    );
}

#[tokio::test]
async fn below_the_reserve_nothing_runs_health_degrades_and_all_recovers() {
    let disk = Tmpfs::mount(64);
    let data_dir = disk.path.join("data");
    let mut server =
        Server::start_in(&data_dir, &["--disk-reserve", "8MB", "--standby", "0"]).await;
    let data_dir = std::fs::canonicalize(&data_dir).expect("data dir");
    let data_dir_text = data_dir.display().to_string();
    let (_, key) = server.account("filler").await;
    server.deploy_ok(&key, COUNTER).await;

    let (status, body) = health(&server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok", "{body}");
    assert!(body["version"].is_string(), "{body}");

    let mut acknowledged = Vec::new();
    for n in 1..=3 {
        let reply = server.invoke_ok(&key, "disk", "count", json!(n)).await;
        assert_eq!(reply["output"]["calls"], n, "{reply}");
        acknowledged.push((
            reply["execution_id"].as_str().expect("id").to_string(),
            reply["output"].clone(),
        ));
    }
    let before = executions(&server, &key, "disk").await.len();
    assert_eq!(before, 3);

    let filler = disk.fill("filler");
    assert!(
        disk.available() < 8_000_000,
        "the filler left {} bytes",
        disk.available()
    );

    // Health says why, at once (it reads the free space itself).
    let (status, body) = health(&server).await;
    assert_eq!(status, 503, "health on a full disk: {body}");
    assert_eq!(body["status"], "degraded", "{body}");
    assert!(body["version"].is_string(), "{body}");
    let problem = &body["problems"][0];
    assert_eq!(problem["code"], "disk_full", "{body}");
    assert_eq!(problem["data_dir"], data_dir_text.as_str(), "{body}");
    assert_eq!(problem["reserve_bytes"], 8_000_000, "{body}");
    assert!(
        problem["free_bytes"].as_u64().expect("free_bytes") < 8_000_000,
        "{body}"
    );

    // Invocations: 503 before the block runs, within the watcher's second at most.
    let mut refused = 0;
    for n in 0..10 {
        let (status, retry_after, body) = server
            .invoke_retry_after(&key, "disk", "count", json!(100 + n))
            .await;
        if status == 200 {
            // Only possible before the background reading caught up (≤ 1 s); such an
            // execution was acknowledged and must survive too.
            assert!(refused == 0, "a 200 after a refusal: {body}");
            acknowledged.push((
                body["execution_id"].as_str().expect("id").to_string(),
                body["output"].clone(),
            ));
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        assert_disk_full_error(status, retry_after.as_deref(), &body, &data_dir_text);
        let message = body["error"]["message"].as_str().expect("message");
        assert!(
            message.contains("before any of the block's code ran"),
            "{message}"
        );
        refused += 1;
    }
    assert!(
        refused >= 5,
        "only {refused} of 10 invocations were refused"
    );
    let ran_before_refusals = acknowledged.len();

    // Deploys too: a clear 503, not a 500.
    let (status, body) = server.deploy(&key, OTHER, &[]).await;
    assert_eq!(status, 503, "deploy on a full disk: {body}");
    assert_eq!(body["error"]["code"], "disk_full", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&data_dir_text)),
        "{body}"
    );

    // Nothing refused was recorded; reads still work on a full disk.
    assert_eq!(
        executions(&server, &key, "disk").await.len(),
        ran_before_refusals
    );

    // Space returns: everything recovers by itself.
    std::fs::remove_file(&filler).expect("remove filler");
    let (status, body) = health(&server).await;
    assert_eq!(status, 200, "health after space returned: {body}");
    assert_eq!(body["status"], "ok", "{body}");
    let mut recovered = false;
    for _ in 0..40 {
        let (status, body) = server.invoke(&key, "disk", "count", json!("after")).await;
        if status == 200 {
            // The warm instance's count proves none of the refused invocations ran.
            assert_eq!(
                body["output"]["calls"],
                json!(ran_before_refusals + 1),
                "a refused invocation ran: {body}"
            );
            acknowledged.push((
                body["execution_id"].as_str().expect("id").to_string(),
                body["output"].clone(),
            ));
            recovered = true;
            break;
        }
        assert_eq!(status, 503, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "invocations did not recover after space returned"
    );
    server.deploy_ok(&key, OTHER).await;
    assert_retrievable(&server, &key, &acknowledged).await;
    server.stop();
}

/// The reserve raced (here: no reserve at all), so the block runs and its record cannot be
/// committed: 503 naming the cause, never a 500, never a 200 whose record is missing, and
/// the execution writer goes on once space returns.
#[tokio::test]
async fn a_commit_that_fails_for_space_answers_503_and_loses_nothing_acknowledged() {
    let disk = Tmpfs::mount(64);
    let data_dir = disk.path.join("data");
    let mut server = Server::start_in(&data_dir, &["--disk-reserve", "0", "--standby", "0"]).await;
    let data_dir_text = std::fs::canonicalize(&data_dir)
        .expect("data dir")
        .display()
        .to_string();
    let (_, key) = server.account("racer").await;
    server.deploy_ok(&key, COUNTER).await;
    let mut acknowledged = Vec::new();
    let reply = server.invoke_ok(&key, "disk", "count", json!(0)).await;
    acknowledged.push((
        reply["execution_id"].as_str().expect("id").to_string(),
        reply["output"].clone(),
    ));

    let filler = disk.fill("filler");
    // Concurrent invocations: batches of records fail together.
    let mut tasks = Vec::new();
    for n in 0..24 {
        tasks.push(server.invoke_in_background(&key, "disk", "count", json!(n)));
    }
    let mut failed = 0;
    for task in tasks {
        let (status, retry_after, body) = task.await.expect("task");
        if status == 200 {
            acknowledged.push((
                body["execution_id"].as_str().expect("id").to_string(),
                body["output"].clone(),
            ));
            continue;
        }
        assert_disk_full_error(status, retry_after.as_deref(), &body, &data_dir_text);
        let message = body["error"]["message"].as_str().expect("message");
        assert!(
            message.contains("could not be written"),
            "the message should say the record was not written: {message}"
        );
        failed += 1;
    }
    assert!(
        failed > 0,
        "no commit failed on a full disk; the test did not exercise the race"
    );

    // A deploy whose store write fails for space (no reserve to refuse it up front): 503.
    let (status, body) = server.deploy(&key, OTHER, &[]).await;
    assert!(
        status == 201 || (status == 503 && body["error"]["code"] == "disk_full"),
        "deploy on a full disk without reserve: {status} {body}"
    );

    std::fs::remove_file(&filler).expect("remove filler");
    server.deploy_ok(&key, OTHER).await;
    // The writer thread survived: later records are committed again.
    for n in 0..5 {
        let reply = server.invoke_ok(&key, "disk", "count", json!(n)).await;
        acknowledged.push((
            reply["execution_id"].as_str().expect("id").to_string(),
            reply["output"].clone(),
        ));
    }
    assert_retrievable(&server, &key, &acknowledged).await;
    let listed: HashSet<String> = executions(&server, &key, "disk")
        .await
        .iter()
        .filter_map(|e| e["execution_id"].as_str().map(str::to_string))
        .collect();
    for (id, _) in &acknowledged {
        assert!(listed.contains(id), "acknowledged {id} not listed");
    }
    server.stop();
    // And after a restart (the WAL's frames were written on a full disk).
    let server = Server::start_in(&data_dir, &["--disk-reserve", "0", "--standby", "0"]).await;
    assert_retrievable(&server, &key, &acknowledged).await;
}

/// With the server's stderr on the full filesystem, writing a log line fails: every request
/// is still answered (they were dropped when the failed write panicked the handler).
#[tokio::test]
async fn log_writes_failing_on_a_full_disk_never_drop_a_request() {
    let disk = Tmpfs::mount(64);
    let data_dir = disk.path.join("data");
    let log = std::fs::File::create(disk.path.join("server.log")).expect("log file");
    // No reserve: the invocations run and their failed commits are logged (WARN), so
    // every one of them writes to the full disk's log.
    let mut server = Server::start_logging_to(
        &data_dir,
        &[
            "--disk-reserve",
            "0",
            "--standby",
            "0",
            "--quota-rate",
            "100000",
            "--quota-burst",
            "100000",
            "--queue-timeout",
            "20s",
        ],
        log,
        "debug",
    )
    .await;
    let (_, key) = server.account("logger").await;
    server.deploy_ok(&key, COUNTER).await;
    server.invoke_ok(&key, "disk", "count", json!(0)).await;

    let filler = disk.fill("filler");
    const REQUESTS: usize = 200;
    // Bounded: a request the server never answers fails the test instead of hanging it.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(45))
        .build()
        .expect("client");
    let mut tasks = Vec::new();
    for n in 0..REQUESTS {
        let http = http.clone();
        let base = server.url.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let request = if n % 4 == 3 {
                http.get(format!("{base}/v1/health"))
            } else {
                http.post(format!("{base}/v1/projects/disk/blocks/count/invoke"))
                    .bearer_auth(key)
                    .json(&json!(n))
            };
            match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    response
                        .text()
                        .await
                        .map(|_| status)
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            }
        }));
    }
    let mut unanswered = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for task in tasks {
        match task.await.expect("task") {
            Ok(status) => *statuses.entry(status).or_default() += 1,
            Err(e) => unanswered.push(e),
        }
    }
    if !unanswered.is_empty() {
        // A server in that state does not stop on SIGTERM either: do not hang in Drop.
        let _ = std::process::Command::new("kill")
            .args(["-9", &server.pid().to_string()])
            .status();
    }
    assert!(
        unanswered.is_empty(),
        "{} of {REQUESTS} requests got no answer (statuses of the others: {statuses:?}); first: {}",
        unanswered.len(),
        unanswered[0]
    );
    assert!(
        !statuses.contains_key(&500),
        "internal errors on a full disk: {statuses:?}"
    );
    let (_, body) = health(&server).await;
    assert!(
        body["log_lines_dropped"].as_u64().is_some_and(|n| n > 0),
        "the log writes should have failed and been counted: {body}"
    );

    std::fs::remove_file(&filler).expect("remove filler");
    let reply = server
        .invoke_ok(&key, "disk", "count", json!("after"))
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let (status, body) = health(&server).await;
    assert_eq!(status, 200, "{body}");
    server.stop();
}
