//! Topics against the real server: publishing starts one run per subscriber block, each
//! with the same input and backpack — by the API and by a block's `then` into the topic (the
//! subscriber runs are written with the publishing step) — and another account's topic is
//! a 404.

mod common;

use std::time::Duration;

use common::{steps_named, Server};
use serde_json::{json, Value};

const EVENTS: &str = r#"
name = "events"

[[blocks]]
name = "order"
language = "python"
code = """
def main(order, backpack):
    backpack["by"] = "order"
    return {"order": order["id"]}
"""

[[blocks]]
name = "mail"
language = "python"
code = """
def main(event, backpack):
    return {"mailed": event, "backpack": backpack}
"""

[[blocks]]
name = "audit"
language = "python"
code = """
def main(event, backpack):
    return {"audited": event, "backpack": backpack}
"""

[[blocks]]
name = "stats"
language = "python"
code = """
def main(event, backpack):
    return {"counted": event, "backpack": backpack}
"""

[[topics]]
name = "placed"

[[topics]]
name = "quiet"

[[transitions]]
from = "order"
to = "placed"
type = "then"

[[transitions]]
from = "placed"
to = "mail"
type = "then"

[[transitions]]
from = "placed"
to = "audit"
type = "then"

[[transitions]]
from = "placed"
to = "stats"
type = "then"
"#;

async fn publish(
    server: &Server,
    key: &str,
    project: &str,
    topic: &str,
    message: Value,
) -> (u16, Value) {
    server
        .request(
            "POST",
            &format!("/v1/projects/{project}/topics/{topic}/publish"),
            Some(key),
            Some(message),
        )
        .await
}

/// The ended runs of `run_ids`, by their one step's name.
async fn ended(server: &Server, key: &str, run_ids: &[Value]) -> Vec<(String, Value)> {
    let mut runs = Vec::new();
    for id in run_ids {
        let run = server
            .await_run(key, id.as_str().expect("id"), Duration::from_secs(60))
            .await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["start"], "placed", "{run}");
        let step = &run["steps"][0];
        runs.push((
            step["name"].as_str().expect("name").to_string(),
            step["output"].clone(),
        ));
    }
    runs.sort_by(|a, b| a.0.cmp(&b.0));
    runs
}

#[tokio::test]
async fn a_publication_starts_one_run_per_subscriber() {
    let server = Server::start().await;
    let (_, key) = server.account("pub").await;
    server.deploy_ok(&key, EVENTS).await;

    // By the API: three runs, the same input each.
    let (status, body) = publish(&server, &key, "events", "placed", json!({"id": 7})).await;
    assert_eq!(status, 202, "{body}");
    let ids = body["run_ids"].as_array().expect("run ids").clone();
    assert_eq!(ids.len(), 3, "{body}");
    let runs = ended(&server, &key, &ids).await;
    let names: Vec<&str> = runs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["audit", "mail", "stats"]);
    assert_eq!(runs[0].1["audited"], json!({"id": 7}));
    assert_eq!(runs[1].1["mailed"], json!({"id": 7}));

    // From the CLI.
    let (code, stdout, stderr) = server.cli(
        &key,
        &[
            "topics",
            "publish",
            "events",
            "placed",
            "--input",
            r#"{"id": 8}"#,
        ],
        None,
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("Published to placed: 3 runs started"),
        "{stdout}"
    );
    let (code, stdout, stderr) = server.cli(
        &key,
        &["topics", "publish", "events", "placed", "--json"],
        None,
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let reply: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(
        reply["run_ids"].as_array().map(Vec::len),
        Some(3),
        "{reply}"
    );

    // A topic without subscribers starts nothing; an unknown one is a 404.
    let (status, body) = publish(&server, &key, "events", "quiet", json!(1)).await;
    assert_eq!(
        (status, body["run_ids"].clone()),
        (202, json!([])),
        "{body}"
    );
    let (status, body) = publish(&server, &key, "events", "nope", json!(1)).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no topic `nope`"),
        "{body}"
    );

    // By a block's `then`: the publisher's output and backpack reach every subscriber.
    let run = server
        .run_to_end(&key, "events", "order", json!({"id": 9}))
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(steps_named(&run, "order").len(), 1);
    let list = server
        .request("GET", "/v1/projects/events/runs?limit=10", Some(&key), None)
        .await
        .1;
    let subscriber_ids: Vec<Value> = list["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .filter(|r| r["start"] == "placed")
        .take(3)
        .map(|r| r["run_id"].clone())
        .collect();
    assert_eq!(subscriber_ids.len(), 3, "{list}");
    let runs = ended(&server, &key, &subscriber_ids).await;
    for (name, output) in &runs {
        let event = output
            .as_object()
            .and_then(|o| o.iter().find(|(k, _)| *k != "backpack"))
            .map(|(_, v)| v)
            .expect("event");
        assert_eq!(*event, json!({"order": 9}), "{name}: {output}");
        assert_eq!(
            output["backpack"],
            json!({"by": "order"}),
            "{name}: {output}"
        );
    }

    // Tenancy: another account's key does not reach this topic.
    let (_, other) = server.account("other").await;
    let (status, body) = publish(&server, &other, "events", "placed", json!(1)).await;
    assert_eq!(status, 404, "{body}");
}
