//! Deployments over time: rollback and draining, restart persistence, graceful shutdown.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{eventually, process_alive, Server};
use serde_json::{json, Value};

fn versioned(version: u32) -> String {
    format!(
        r#"
name = "versions"
[[blocks]]
name = "v"
language = "python"
code = """
def main(block_input, backpack):
    return {version}
"""
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn deployments_are_numbered_and_rollback_drains_replaced_instances() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    assert_eq!(server.deploy_ok(&key, &versioned(1)).await["deployment"], 1);
    let one = server.invoke_ok(&key, "versions", "v", json!(null)).await;
    assert_eq!(one["output"], 1);
    let old_pid = server.instances().await[0]["pid"].as_i64().expect("pid");

    assert_eq!(server.deploy_ok(&key, &versioned(2)).await["deployment"], 2);
    // The replaced deployment's warm instance is drained and reaped at once.
    assert!(eventually(Duration::from_secs(5), || !process_alive(old_pid)).await);
    let two = server.invoke_ok(&key, "versions", "v", json!(null)).await;
    assert_eq!(two["output"], 2);
    assert_eq!(two["cold"], true);

    let (status, list) = server
        .request("GET", "/v1/projects/versions/deployments", Some(&key), None)
        .await;
    assert_eq!(status, 200);
    let live: Vec<&Value> = list["deployments"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|d| d["live"] == true)
        .collect();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0]["deployment"], 2);

    let (status, body) = server.rollback(&key, "versions", 1).await;
    assert_eq!(status, 200, "{body}");
    let back = server.invoke_ok(&key, "versions", "v", json!(null)).await;
    assert_eq!(back["output"], 1);
    let instances = server.instances().await;
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert_eq!(instances[0]["deployment"], 1);

    let (status, _) = server.rollback(&key, "versions", 9).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn deployments_and_executions_survive_a_restart() {
    let root = tempfile::tempdir().expect("tempdir");
    let data_dir = root.path().join("data");
    let mut server = Server::start_in(&data_dir, &[]).await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, &versioned(1)).await;
    server.deploy_ok(&key, &versioned(2)).await;
    let execution = server
        .invoke_ok(&key, "versions", "v", json!({ "keep": "me" }))
        .await;
    let execution_id = execution["execution_id"].as_str().expect("id").to_string();
    let operator_key = server.operator_key.clone();
    assert!(server.stop().success());

    let server = Server::start_in(&data_dir, &[]).await;
    assert_eq!(
        server.operator_key, operator_key,
        "the operator key is kept"
    );
    let (status, list) = server
        .request("GET", "/v1/projects/versions/deployments", Some(&key), None)
        .await;
    assert_eq!(
        status, 200,
        "the account key still works after restart: {list}"
    );
    assert_eq!(list["deployments"].as_array().map_or(0, Vec::len), 2);
    let (status, record) = server
        .request(
            "GET",
            &format!("/v1/executions/{execution_id}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(record["input"], json!({ "keep": "me" }));
    assert_eq!(record["output"], 2);
    let again = server.invoke_ok(&key, "versions", "v", json!(null)).await;
    assert_eq!(again["output"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_running_invocations_then_kills_every_instance() {
    let mut server = Server::start().await;
    let (_, key) = server.account("acme").await;
    let manifest = r#"
name = "drain"
[[blocks]]
name = "slow"
language = "python"
code = """
import time
def main(block_input, backpack):
    time.sleep(block_input)
    return "finished"
"""
"#;
    server.deploy_ok(&key, manifest).await;
    server.invoke_ok(&key, "drain", "slow", json!(0)).await;
    let warm = server.instances().await;
    assert_eq!(warm.len(), 1);
    let cgroups: Vec<String> = warm[0]["cgroups"]
        .as_array()
        .expect("cgroups")
        .iter()
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect();
    let warm_pid = warm[0]["pid"].as_i64().expect("pid");

    // An invocation in flight when SIGTERM arrives still completes.
    let url = format!("{}/v1/projects/drain/blocks/slow/invoke", server.url);
    let in_flight = tokio::spawn({
        let http = server.http.clone();
        let key = key.clone();
        async move {
            let response = http
                .post(url)
                .bearer_auth(key)
                .json(&json!(1.5))
                .send()
                .await
                .expect("send");
            response.json::<Value>().await.expect("json")
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy_pids: Vec<i64> = server
        .instances()
        .await
        .iter()
        .filter_map(|i| i["pid"].as_i64())
        .collect();
    let status = tokio::task::spawn_blocking(move || {
        let status = server.stop();
        (status, server)
    })
    .await
    .expect("stop");
    assert!(status.0.success(), "exit status {:?}", status.0);
    let finished = in_flight.await.expect("in-flight");
    assert_eq!(finished["output"], "finished", "{finished}");

    for pid in busy_pids.iter().chain(std::iter::once(&warm_pid)) {
        assert!(!process_alive(*pid), "instance {pid} outlived the server");
    }
    for path in &cgroups {
        assert!(!Path::new(path).exists(), "cgroup {path} left behind");
        // The account's group and the server's root cgroup are removed too.
        let root = Path::new(path)
            .parent()
            .and_then(Path::parent)
            .expect("root");
        assert!(!root.exists(), "cgroup root {} left behind", root.display());
    }
}

/// A server killed outright (SIGKILL: no shutdown, no cleanup) takes its instances with it —
/// frozen idle ones included, which the v1 freezer would keep alive until thawed — and its
/// next start in the same data dir leaves no cgroup of the old run behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_server_takes_its_frozen_instances_with_it() {
    let root = tempfile::tempdir().expect("tempdir");
    let data_dir = root.path().join("data");
    let mut server = Server::start_in(&data_dir, &[]).await;
    let (_, key) = server.account("acme").await;
    let manifest = r#"
name = "idle"
[[blocks]]
name = "py"
language = "python"
code = "def main(block_input, backpack):\n    return 1\n"
[[blocks]]
name = "js"
language = "node"
code = "exports.main = () => 1;"
[[blocks]]
name = "sh"
language = "shell"
code = "echo 1"
"#;
    server.deploy_ok(&key, manifest).await;
    for block in ["py", "js", "sh"] {
        let reply = server.invoke_ok(&key, "idle", block, json!(null)).await;
        assert_eq!(reply["status"], "ok", "{reply}");
    }
    let instances = server.instances().await;
    assert_eq!(instances.len(), 3, "{instances:?}");
    let frozen = eventually(Duration::from_secs(10), || {
        instances.iter().all(|i| {
            let cgroups = i["cgroups"].as_array().cloned().unwrap_or_default();
            common::cgroup_frozen(&cgroups) == Some(true)
        })
    })
    .await;
    assert!(frozen, "the idle instances are frozen: {instances:?}");
    let pids: Vec<i64> = instances.iter().filter_map(|i| i["pid"].as_i64()).collect();
    assert_eq!(pids.len(), 3);

    // SAFETY: kill(2) on the server process this test started.
    unsafe { libc::kill(server.pid() as i32, libc::SIGKILL) };
    let _ = server.stop();
    assert!(
        eventually(Duration::from_secs(10), || pids
            .iter()
            .all(|&p| common::exited(p)))
        .await,
        "frozen instances {pids:?} outlived the killed server"
    );

    // The next start cleans up the old run's cgroups.
    let server = Server::start_in(&data_dir, &[]).await;
    let reply = server.invoke_ok(&key, "idle", "py", json!(null)).await;
    assert_eq!(reply["cold"], true, "{reply}");
    assert!(common::exited(pids[0]));
}
