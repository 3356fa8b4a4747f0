//! Services in the manifest: `[[transitions]]`, `log_level` and `retry` are parsed and
//! validated at deploy, with located errors; a valid service deploys and runs. Trigger
//! tables are validated too (an endpoint that starts nothing is located).

mod common;

use common::Server;
use serde_json::json;

const SERVICE: &str = r#"name = "orders"
log_level = "errors"

[[blocks]]
name = "validate"
language = "shell"
code = "cat"
retry = { attempts = 3, interval_s = 1, backoff = 2.0 }

[[blocks]]
name = "charge"
language = "shell"
code = "cat"

[[blocks]]
name = "refund"
language = "shell"
code = "cat"

[[transitions]]
from = "validate"
to = "charge"
type = "if"
expression = "output.total > 0"

[[transitions]]
from = "validate"
to = "refund"
type = "else"

[[transitions]]
from = ["charge", "refund"]
to = "validate"
type = "merge"
"#;

/// The blocks of SERVICE alone (no transitions, no retry, no log level).
fn blocks_only() -> String {
    let start = SERVICE.find("[[transitions]]").expect("transitions");
    SERVICE[..start]
        .replace("log_level = \"errors\"\n", "")
        .replace(
            "retry = { attempts = 3, interval_s = 1, backoff = 2.0 }\n",
            "",
        )
}

#[tokio::test]
async fn a_valid_service_deploys_and_a_merge_that_cannot_complete_fails_the_run() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;

    let deployed = server.deploy_ok(&key, SERVICE).await;
    assert_eq!(deployed["deployment"], 1, "{deployed}");
    // `charge` and `refund` are alternatives (if / else), so the merge of both never
    // completes: the run fails saying so instead of waiting forever.
    let run = server
        .run_to_end(&key, "orders", "validate", json!({"total": 1}))
        .await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["error"]["type"], "MergeIncomplete", "{run:#}");
    let message = run["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("`validate`") && message.contains("`refund`"),
        "{message}"
    );
    // log_level = "errors": succeeded steps keep status and timing only.
    let charge = &run["steps"][1];
    assert_eq!(charge["name"], "charge");
    assert_eq!(charge["status"], "succeeded");
    assert!(
        charge["input"].is_null() && charge["output"].is_null(),
        "{charge}"
    );
    assert!(charge["duration_ms"].is_number(), "{charge}");

    // The blocks alone deploy too: deployment 2.
    let deployed = server.deploy_ok(&key, &blocks_only()).await;
    assert_eq!(deployed["deployment"], 2, "{deployed}");
}

#[tokio::test]
async fn invalid_transitions_are_located_deploy_errors() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;

    // A CEL syntax error: the line of the `expression`, the expression itself.
    let bad_cel = SERVICE.replace("output.total > 0", "output.total >");
    let line = bad_cel
        .lines()
        .position(|l| l.starts_with("expression"))
        .expect("expression line")
        + 1;
    let (status, body) = server.deploy(&key, &bad_cel, &[]).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_manifest", "{body}");
    assert_eq!(body["error"]["file"], "refinery.toml", "{body}");
    assert_eq!(body["error"]["line"], line, "{body}");
    assert_eq!(
        body["error"]["field"], "transitions[0].expression",
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("invalid CEL expression `output.total >`"),
        "{message}"
    );

    // An unknown block, named with the known ones.
    let unknown = SERVICE.replace("to = \"refund\"", "to = \"refnud\"");
    let (status, body) = server.deploy(&key, &unknown, &[]).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "transitions[1].to", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("unknown name `refnud`"), "{message}");
    assert!(
        message.contains("`charge` (block), `refund` (block), `validate` (block)"),
        "{message}"
    );

    // A merge from one block.
    let merge = SERVICE.replace("from = [\"charge\", \"refund\"]", "from = \"charge\"");
    let (status, body) = server.deploy(&key, &merge, &[]).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "transitions[2].from", "{body}");

    // A trigger that starts nothing is located and says how to fix it.
    let trigger = format!(
        "{SERVICE}\n[[endpoints]]\nname = \"api\"\nmethod = \"POST\"\npath = \"/orders\"\n"
    );
    let (status, body) = server.deploy(&key, &trigger, &[]).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "endpoints[0]", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("endpoint `api` starts nothing: add a transition `from = \"api\"`"),
        "{message}"
    );

    // An expression nested deep enough to exhaust a thread's stack in CEL's parser is
    // refused, and the server lives on.
    let deep = format!("{}output.ok{}", "(".repeat(400), ")".repeat(400));
    let (status, body) = server
        .deploy(&key, &SERVICE.replace("output.total > 0", &deep), &[])
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"]["field"], "transitions[0].expression",
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("nests 400 levels deep; the limit is 24"),
        "{message}"
    );
    server.assert_still_serving().await;

    // None of these left a project behind.
    let (_, projects) = server
        .request("GET", "/v1/projects", Some(&key), None)
        .await;
    assert!(!projects.to_string().contains("orders"), "{projects}");
}

#[tokio::test]
async fn the_cli_deploys_a_service_and_catches_a_bad_expression_locally() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("refinery.toml"), SERVICE).expect("write");

    let (code, stdout, stderr) = server.cli(&key, &["deploy", "--json"], Some(dir.path()));
    assert_eq!(code, 0, "{stdout}{stderr}");
    let deployed: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(deployed["deployment"], 1, "{deployed}");

    // An invalid expression is caught locally, with the file and line.
    let bad = SERVICE.replace("output.total > 0", "output.total >");
    std::fs::write(dir.path().join("refinery.toml"), &bad).expect("write");
    let (code, _, stderr) = server.cli(&key, &["deploy"], Some(dir.path()));
    assert_ne!(code, 0);
    assert!(stderr.contains("refinery.toml:24:"), "{stderr}");
    assert!(stderr.contains("invalid CEL expression"), "{stderr}");
}
