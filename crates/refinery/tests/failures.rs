//! Failure cases: user code failing is a normal result; bad requests get clear errors;
//! the platform and other instances carry on.

mod common;

use common::{process_alive, Server};
use serde_json::json;

const FAILING: &str = r#"
name = "failing"

[[blocks]]
name = "raises"
language = "python"
code = """
def main(block_input, backpack):
    raise ValueError("bad input: %s" % block_input)
"""

[[blocks]]
name = "slow"
language = "python"
timeout_s = 1
code = """
import time
def main(block_input, backpack):
    time.sleep(block_input)
    return "done"
"""

[[blocks]]
name = "crash"
language = "python"
code = """
import os
def main(block_input, backpack):
    os._exit(3)
"""

[[blocks]]
name = "hog"
language = "python"
memory_mb = 128
code = """
def main(block_input, backpack):
    hoard = []
    for _ in range(64):
        hoard.append(bytearray(16 * 1024 * 1024))
    return len(hoard)
"""

[[blocks]]
name = "badimport"
language = "python"
code = """
import no_such_module_anywhere
def main(block_input, backpack):
    return 1
"""

[[blocks]]
name = "badsyntax"
language = "python"
code = """
def main(block_input, backpack)
    return 1
"""

[[blocks]]
name = "nomain"
language = "node"
code = "exports.other = () => 1;"

[[blocks]]
name = "throws"
language = "node"
code = "exports.main = () => { throw new TypeError('nope'); };"

[[blocks]]
name = "exits"
language = "shell"
code = "echo oops >&2; exit 3"

[[blocks]]
name = "ok"
language = "python"
code = """
def main(block_input, backpack):
    return "fine"
"""
"#;

#[tokio::test(flavor = "multi_thread")]
async fn user_code_failures_are_results_not_server_errors() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, FAILING).await;

    let raised = server.invoke_ok(&key, "failing", "raises", json!(5)).await;
    assert_eq!(raised["status"], "error");
    assert_eq!(raised["error"]["type"], "ValueError");
    assert_eq!(raised["error"]["message"], "bad input: 5");
    assert!(
        raised["error"]["traceback"]
            .as_str()
            .unwrap_or_default()
            .contains("raises.py"),
        "{raised}"
    );
    // The instance survives a raised exception and is reused.
    let again = server.invoke_ok(&key, "failing", "raises", json!(6)).await;
    assert_eq!(again["cold"], false);

    let thrown = server
        .invoke_ok(&key, "failing", "throws", json!(null))
        .await;
    assert_eq!(thrown["status"], "error");
    assert_eq!(thrown["error"]["type"], "TypeError");

    let exited = server
        .invoke_ok(&key, "failing", "exits", json!(null))
        .await;
    assert_eq!(exited["status"], "error", "{exited}");
    assert!(exited["logs"].as_str().unwrap_or_default().contains("oops"));

    for (block, kind) in [
        ("badimport", "ModuleNotFoundError"),
        ("badsyntax", "SyntaxError"),
    ] {
        let failed = server.invoke_ok(&key, "failing", block, json!(null)).await;
        assert_eq!(failed["status"], "init_error", "{failed}");
        assert_eq!(failed["error"]["type"], kind, "{failed}");
    }
    let nomain = server
        .invoke_ok(&key, "failing", "nomain", json!(null))
        .await;
    assert_eq!(nomain["status"], "init_error", "{nomain}");
    assert!(
        nomain["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("main"),
        "{nomain}"
    );

    // Every one of those was recorded.
    let (status, list) = server
        .request(
            "GET",
            "/v1/projects/failing/executions?limit=100",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        list["executions"].as_array().map_or(0, Vec::len) >= 7,
        "{list}"
    );

    let ok = server.invoke_ok(&key, "failing", "ok", json!(null)).await;
    assert_eq!(ok["output"], "fine");
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_kills_and_replaces_the_instance() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, FAILING).await;

    let warm = server.invoke_ok(&key, "failing", "slow", json!(0)).await;
    let slow = server.invoke_ok(&key, "failing", "slow", json!(30)).await;
    assert_eq!(slow["status"], "timeout", "{slow}");
    assert_eq!(slow["instance_id"], warm["instance_id"]);
    assert!(
        server.instances().await.is_empty(),
        "the timed-out instance must be gone"
    );
    let after = server.invoke_ok(&key, "failing", "slow", json!(0)).await;
    assert_eq!(after["status"], "ok");
    assert_eq!(after["cold"], true);
    assert_ne!(after["instance_id"], warm["instance_id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_and_oom_discard_the_instance_and_others_carry_on() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, FAILING).await;
    let bystander = server.invoke_ok(&key, "failing", "ok", json!(null)).await;
    let bystander_pid = server.instances().await[0]["pid"].as_i64().expect("pid");

    let crashed = server
        .invoke_ok(&key, "failing", "crash", json!(null))
        .await;
    assert_eq!(crashed["status"], "crashed", "{crashed}");

    let oom = server.invoke_ok(&key, "failing", "hog", json!(null)).await;
    assert_eq!(oom["status"], "oom", "{oom}");
    assert!(
        oom["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("memory_mb"),
        "{oom}"
    );

    // Only the bystander is left, still warm and still the same process.
    let instances = server.instances().await;
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert!(process_alive(bystander_pid));
    let again = server.invoke_ok(&key, "failing", "ok", json!(null)).await;
    assert_eq!(again["instance_id"], bystander["instance_id"]);
    assert_eq!(again["cold"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_errors() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, FAILING).await;

    // Oversized payload: 413 naming the limit.
    let big = "x".repeat(7 * 1024 * 1024);
    let (status, body) = server.invoke(&key, "failing", "ok", json!(big)).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("6 MB"),
        "{body}"
    );

    // Not JSON.
    let response = server
        .http
        .post(format!(
            "{}/v1/projects/failing/blocks/ok/invoke",
            server.url
        ))
        .bearer_auth(&key)
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 400);

    // Unknown block and project.
    let (status, body) = server.invoke(&key, "failing", "nope", json!(null)).await;
    assert_eq!(status, 404);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("nope"),
        "{body}"
    );
    let (status, _) = server.invoke(&key, "nothere", "ok", json!(null)).await;
    assert_eq!(status, 404);

    // Invalid manifest: file, line, field and expectation.
    let manifest = "name = \"bad\"\n\n[[blocks]]\nname = \"b\"\nlanguage = \"python\"\ncode = \"x\"\ntimeout_s = 5000\n";
    let (status, body) = server.deploy(&key, manifest, &[]).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["line"], 7, "{body}");
    assert_eq!(body["error"]["field"], "blocks[0].timeout_s", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("from 1 to 900"),
        "{body}"
    );

    let (status, body) = server
        .deploy(
            &key,
            "name = \"bad\"\n[[blocks]]\nname = \"b\"\nlanguage = \"cobol\"\ncode = \"x\"\n",
            &[],
        )
        .await;
    assert_eq!(status, 422);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("python, node, shell"),
        "{body}"
    );

    // A source file that was not uploaded.
    let (status, body) = server
        .deploy(
            &key,
            "name = \"bad\"\n[[blocks]]\nname = \"b\"\nlanguage = \"python\"\nsource = \"b.py\"\n",
            &[],
        )
        .await;
    assert_eq!(status, 422);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("b.py"),
        "{body}"
    );
}
