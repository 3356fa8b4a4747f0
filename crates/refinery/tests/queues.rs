//! Durable queues (issue 13, the Queues part), against the real server: sending and
//! consuming in batches, partial batch failures (`batchItemFailures`), dead letters and
//! their redrive, a `then` into a queue, the limits, tenancy, and `kill -9` mid-way through
//! 1,000 messages with none lost.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{steps_named, Server};
use serde_json::{json, Value};

const DRAIN: Duration = Duration::from_secs(120);

/// A project with queue `jobs` consumed by `work`: items whose body has `"fail": true`
/// are reported failed (`batchItemFailures`); a body with `"crash": true` fails the batch.
fn project(name: &str, batch: u32, max_receive: u32, extra_block: &str) -> String {
    format!(
        r#"
name = "{name}"

[[blocks]]
name = "work"
language = "python"
max_concurrency = 4
code = """
def main(batch, backpack):
    if any(m["body"].get("crash") for m in batch if isinstance(m["body"], dict)):
        raise RuntimeError("crash requested")
    failed = [{{"itemIdentifier": m["messageId"]}} for m in batch
              if isinstance(m["body"], dict) and m["body"].get("fail")]
    return {{"batchItemFailures": failed, "seen": [m["body"] for m in batch]}}
"""

[[queues]]
name = "jobs"
batch_size = {batch}
visibility_timeout_s = 5
max_receive_count = {max_receive}

[[transitions]]
from = "jobs"
to = "work"
type = "then"
{extra_block}
"#
    )
}

/// The bodies every succeeded `work` step was given (all of its batch).
fn consumed_bodies(runs: &[Value]) -> Vec<Value> {
    let mut out = Vec::new();
    for run in runs {
        for step in steps_named(run, "work") {
            if step["status"] != "succeeded" {
                continue;
            }
            for m in step["input"].as_array().cloned().unwrap_or_default() {
                out.push(m["body"].clone());
            }
        }
    }
    out
}

#[tokio::test]
async fn messages_are_consumed_in_batches() {
    let server = Server::start().await;
    let (_, key) = server.account("q-basic").await;
    server.deploy_ok(&key, &project("shop", 10, 3, "")).await;

    let q = server.queue(&key, "shop", "jobs").await;
    assert_eq!(q["visible"], 0, "{q}");
    assert_eq!(q["settings"]["batch_size"], 10, "{q}");
    assert_eq!(q["settings"]["consumer"], "work", "{q}");

    let messages: Vec<Value> = (0..25).map(|i| json!({"n": i})).collect();
    let (status, body) = server.send_messages(&key, "shop", "jobs", messages).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body, json!({"enqueued": 25}));

    let q = server
        .await_queue_drained(&key, "shop", "jobs", DRAIN)
        .await;
    assert_eq!(
        (q["visible"].as_u64(), q["in_flight"].as_u64()),
        (Some(0), Some(0)),
        "{q}"
    );
    assert_eq!(q["dead_letter"], 0, "{q}");
    assert!(q["oldest_age_s"].is_null(), "{q}");

    let runs = server.all_runs(&key, "shop").await;
    let mut seen: Vec<i64> = consumed_bodies(&runs)
        .iter()
        .filter_map(|b| b["n"].as_i64())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, (0..25).collect::<Vec<_>>());
    for run in &runs {
        assert_eq!(run["start"], "jobs", "{run}");
        let batch = steps_named(run, "work")[0]["input"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            !batch.is_empty() && batch.len() <= 10,
            "batch of {}",
            batch.len()
        );
        let m = &batch[0];
        assert!(
            m["messageId"]
                .as_str()
                .is_some_and(|id| id.starts_with("msg_")),
            "{m}"
        );
        assert!(m["receiveCount"].as_i64() >= Some(1), "{m}");
        assert!(m["enqueuedAt"].as_str().is_some(), "{m}");
    }

    // Unknown queues and bad requests say what is wrong.
    let (status, body) = server
        .send_messages(&key, "shop", "nope", vec![json!(1)])
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("jobs")),
        "{body}"
    );
    let (status, body) = server.send_messages(&key, "shop", "jobs", vec![]).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = server
        .request(
            "POST",
            "/v1/projects/shop/queues/jobs/messages",
            Some(&key),
            Some(json!({"message": 1})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn partial_batch_failures_dead_letter_and_redrive() {
    let server = Server::start().await;
    let (_, key) = server.account("q-partial").await;
    server.deploy_ok(&key, &project("shop", 5, 2, "")).await;

    // 12 good, 3 reported failed (each received twice, then dead-lettered), one batch that
    // crashes (its messages are received twice, then dead-lettered — the good ones with it
    // only if they always share the crashing batch, so the crash is alone in its own send).
    let mut messages: Vec<Value> = (0..12).map(|i| json!({"n": i})).collect();
    for i in 100..103 {
        messages.push(json!({"n": i, "fail": true}));
    }
    let (status, body) = server.send_messages(&key, "shop", "jobs", messages).await;
    assert_eq!(status, 202, "{body}");

    let q = server
        .await_queue_drained(&key, "shop", "jobs", DRAIN)
        .await;
    assert_eq!(q["visible"], 0, "{q}");
    assert_eq!(q["dead_letter"], 3, "{q}");

    let runs = server.all_runs(&key, "shop").await;
    let good: BTreeSet<i64> = consumed_bodies(&runs)
        .iter()
        .filter(|b| b.get("fail").is_none())
        .filter_map(|b| b["n"].as_i64())
        .collect();
    assert_eq!(good, (0..12).collect());

    let (status, dlq) = server
        .request(
            "GET",
            "/v1/projects/shop/queues/jobs/dead-letters",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{dlq}");
    let dead: BTreeSet<i64> = dlq["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            assert_eq!(m["receive_count"], 2, "{m}");
            assert!(m["dead_lettered_at"].is_string(), "{m}");
            m["body"]["n"].as_i64().expect("n")
        })
        .collect();
    assert_eq!(dead, (100..103).collect());

    // The consumer is fixed (a redeploy: the messages stay with the project), then the
    // dead letters go back into the queue and are processed.
    let fixed = project("shop", 5, 2, "").replace(
        "if isinstance(m[\"body\"], dict) and m[\"body\"].get(\"fail\")]",
        "if False]",
    );
    assert_ne!(fixed, project("shop", 5, 2, ""));
    server.deploy_ok(&key, &fixed).await;
    let (status, body) = server
        .request(
            "POST",
            "/v1/projects/shop/queues/jobs/dead-letters/redrive",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(
        (status, body.clone()),
        (200, json!({"redriven": 3})),
        "{body}"
    );
    let q = server
        .await_queue_drained(&key, "shop", "jobs", DRAIN)
        .await;
    assert_eq!(
        (q["visible"].as_u64(), q["dead_letter"].as_u64()),
        (Some(0), Some(0)),
        "{q}"
    );

    // A crashing batch: received max_receive_count times, then dead-lettered; purge.
    let (status, _) = server
        .send_messages(&key, "shop", "jobs", vec![json!({"crash": true})])
        .await;
    assert_eq!(status, 202);
    let q = server
        .await_queue_drained(&key, "shop", "jobs", DRAIN)
        .await;
    assert_eq!(q["dead_letter"], 1, "{q}");
    let (status, body) = server
        .request(
            "POST",
            "/v1/projects/shop/queues/jobs/dead-letters/purge",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(
        (status, body.clone()),
        (200, json!({"purged": 1})),
        "{body}"
    );
    assert_eq!(server.queue(&key, "shop", "jobs").await["dead_letter"], 0);
}

#[tokio::test]
async fn a_then_into_a_queue_enqueues_one_message_per_item() {
    let server = Server::start().await;
    let (_, key) = server.account("q-then").await;
    let producer = r#"
[[blocks]]
name = "split"
language = "python"
code = """
def main(x, backpack):
    return [{"n": i} for i in range(x)]
"""

[[transitions]]
from = "split"
to = "jobs"
type = "then"
"#;
    server
        .deploy_ok(&key, &project("shop", 10, 3, producer))
        .await;
    let run = server.run_to_end(&key, "shop", "split", json!(7)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    server
        .await_queue_drained(&key, "shop", "jobs", DRAIN)
        .await;
    let runs = server.all_runs(&key, "shop").await;
    let seen: BTreeSet<i64> = consumed_bodies(&runs)
        .iter()
        .filter_map(|b| b["n"].as_i64())
        .collect();
    assert_eq!(seen, (0..7).collect());
}

#[tokio::test]
async fn limits_are_enforced_with_clear_errors() {
    let server =
        Server::start_with(&["--max-message-bytes", "100", "--max-queued-messages", "5"]).await;
    let (_, key) = server.account("q-limits").await;
    // A consumer that never succeeds keeps the messages stored (no retry: dead letters).
    let manifest = project("shop", 10, 1000, "");
    server.deploy_ok(&key, &manifest).await;

    let big = json!({"text": "x".repeat(200)});
    let (status, body) = server
        .send_messages(&key, "shop", "jobs", vec![json!(1), big])
        .await;
    assert_eq!(status, 413, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("message 1") && message.contains("--max-message-bytes"),
        "{body}"
    );
    assert_eq!(body["error"]["limit"], "max_message_bytes", "{body}");

    let crash: Vec<Value> = (0..6).map(|_| json!({"crash": true})).collect();
    let (status, body) = server.send_messages(&key, "shop", "jobs", crash).await;
    assert_eq!(status, 429, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("--max-queued-messages") && message.contains("limit of 5"),
        "{body}"
    );
    // Nothing of the refused request was stored.
    let q = server.queue(&key, "shop", "jobs").await;
    assert_eq!(
        (q["visible"].as_u64(), q["in_flight"].as_u64()),
        (Some(0), Some(0)),
        "{q}"
    );
}

#[tokio::test]
async fn another_accounts_queue_is_a_404() {
    let server = Server::start().await;
    let (_, alice) = server.account("q-alice").await;
    let (_, bob) = server.account("q-bob").await;
    server.deploy_ok(&alice, &project("shop", 10, 3, "")).await;
    let (status, body) = server
        .send_messages(&bob, "shop", "jobs", vec![json!(1)])
        .await;
    assert_eq!(status, 404, "{body}");
    for path in [
        "/v1/projects/shop/queues/jobs",
        "/v1/projects/shop/queues/jobs/dead-letters",
    ] {
        let (status, body) = server.request("GET", path, Some(&bob), None).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    for path in [
        "/v1/projects/shop/queues/jobs/dead-letters/redrive",
        "/v1/projects/shop/queues/jobs/dead-letters/purge",
    ] {
        let (status, body) = server.request("POST", path, Some(&bob), None).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    // Alice's own still answers.
    assert_eq!(server.queue(&alice, "shop", "jobs").await["dead_letter"], 0);
}

#[tokio::test]
async fn kill_9_mid_way_through_1000_messages_loses_none() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let mut server = Server::start_in(&data, &[]).await;
    let (_, key) = server.account("q-crash").await;
    // Some messages fail on their first receipts (reported failed), so redelivery and
    // dead-lettering both happen around the crash.
    let manifest = project("shop", 10, 3, "").replace(
        "def main(batch, backpack):",
        "import time\ndef main(batch, backpack):\n    time.sleep(0.02)",
    );
    server.deploy_ok(&key, &manifest).await;
    let mut expected = BTreeMap::new();
    for chunk in 0..10 {
        let messages: Vec<Value> = (0..100)
            .map(|i| {
                let n = chunk * 100 + i;
                expected.insert(n, n % 97 == 0);
                json!({"n": n, "fail": n % 97 == 0})
            })
            .collect();
        let (status, body) = server.send_messages(&key, "shop", "jobs", messages).await;
        assert_eq!((status, body), (202, json!({"enqueued": 100})));
    }
    // Mid-way: some consumed, some not.
    let deadline = std::time::Instant::now() + DRAIN;
    loop {
        let q = server.queue(&key, "shop", "jobs").await;
        let left = q["visible"].as_u64().unwrap_or(0) + q["in_flight"].as_u64().unwrap_or(0);
        if left <= 700 || std::time::Instant::now() > deadline {
            assert!(left > 0, "everything was consumed before the kill: {q}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9();

    let server = Server::start_in(&data, &[]).await;
    let q = server
        .await_queue_drained(&key, "shop", "jobs", DRAIN)
        .await;
    assert_eq!(
        (q["visible"].as_u64(), q["in_flight"].as_u64()),
        (Some(0), Some(0)),
        "{q}"
    );

    let runs = server.all_runs(&key, "shop").await;
    for run in &runs {
        assert_ne!(run["status"], "running", "{run}");
    }
    let processed: BTreeSet<i64> = consumed_bodies(&runs)
        .iter()
        .filter(|b| b["fail"] == false)
        .filter_map(|b| b["n"].as_i64())
        .collect();
    let (status, dlq) = server
        .request(
            "GET",
            "/v1/projects/shop/queues/jobs/dead-letters?limit=1000",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{dlq}");
    let dead: BTreeSet<i64> = dlq["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["body"]["n"].as_i64())
        .collect();
    for (n, fails) in &expected {
        if *fails {
            assert!(
                dead.contains(n),
                "message {n} (always failing) is not a dead letter"
            );
        } else {
            assert!(
                processed.contains(n),
                "message {n} was lost: never processed"
            );
        }
    }
    assert_eq!(q["dead_letter"].as_u64(), Some(dead.len() as u64), "{q}");
}

#[tokio::test]
async fn the_cli_sends_shows_and_manages_dead_letters() {
    let server = Server::start().await;
    let (_, key) = server.account("q-cli").await;
    server.deploy_ok(&key, &project("shop", 10, 1, "")).await;

    let (code, out, err) = server.cli(
        &key,
        &[
            "queues",
            "send",
            "shop",
            "jobs",
            r#"{"n": 1}"#,
            r#"{"n": 2, "fail": true}"#,
            "--json",
        ],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    let sent: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(sent, json!({"enqueued": 2}));
    let (code, out, err) = server.cli(&key, &["queues", "send", "shop", "jobs", "{oops"], None);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("message 1 is not valid JSON"), "{err}");

    server
        .await_queue_drained(&key, "shop", "jobs", DRAIN)
        .await;
    let (code, out, err) = server.cli(&key, &["queues", "show", "shop", "jobs", "--json"], None);
    assert_eq!(code, 0, "{out}{err}");
    let shown: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        (shown["visible"].as_u64(), shown["dead_letter"].as_u64()),
        (Some(0), Some(1)),
        "{shown}"
    );
    let (code, out, _) = server.cli(&key, &["queues", "show", "shop", "jobs"], None);
    assert_eq!(code, 0);
    assert!(
        out.contains("dead letter  1") && out.contains("consumer `work`"),
        "{out}"
    );

    let (code, out, _) = server.cli(&key, &["queues", "dlq", "shop", "jobs", "list"], None);
    assert_eq!(code, 0);
    assert!(out.starts_with("MESSAGE") && out.contains("msg_"), "{out}");
    let (code, out, _) = server.cli(
        &key,
        &["queues", "dlq", "shop", "jobs", "purge", "--json"],
        None,
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).expect("JSON"),
        json!({"purged": 1})
    );
    let (code, out, _) = server.cli(&key, &["queues", "dlq", "shop", "jobs", "redrive"], None);
    assert_eq!(code, 0);
    assert!(out.contains("Moved 0 dead letters"), "{out}");
    let (code, _, err) = server.cli(&key, &["queues", "show", "shop", "nope"], None);
    assert_ne!(code, 0);
    assert!(err.contains("no queue `nope`"), "{err}");
}

#[tokio::test]
async fn metrics_show_each_queue() {
    let server = Server::start().await;
    let (account, key) = server.account("q-metrics").await;
    // A consumer that sleeps long keeps the messages visible / in flight for the scrape.
    let manifest = project("shop", 1, 3, "")
        .replace(
            "def main(batch, backpack):",
            "import time\ndef main(batch, backpack):\n    time.sleep(3)",
        )
        .replace("max_concurrency = 4", "max_concurrency = 1");
    server.deploy_ok(&key, &manifest).await;
    let (status, _) = server
        .send_messages(&key, "shop", "jobs", vec![json!(1), json!(2), json!(3)])
        .await;
    assert_eq!(status, 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let response = server
        .http
        .get(format!("{}/metrics", server.url))
        .bearer_auth(&server.operator_key)
        .send()
        .await
        .expect("metrics");
    let text = response.text().await.expect("text");
    let labels = format!("account=\"{account}\",project=\"shop\",queue=\"jobs\"");
    for series in [
        "refinery_queue_visible",
        "refinery_queue_in_flight",
        "refinery_queue_dead_letter",
        "refinery_queue_oldest_age_seconds",
    ] {
        assert!(
            text.contains(&format!("{series}{{{labels}}}")),
            "{series} missing:\n{text}"
        );
    }
    assert!(
        text.contains(&format!("refinery_queue_in_flight{{{labels}}} 1")),
        "{text}"
    );
    assert!(
        text.contains(&format!("refinery_queue_visible{{{labels}}} 2")),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"));
}

#[tokio::test]
async fn a_batch_in_flight_past_its_visibility_timeout_is_delivered_again() {
    let server = Server::start().await;
    let (_, key) = server.account("q-visibility").await;
    let manifest = r#"
name = "slow"

[[blocks]]
name = "work"
language = "python"
timeout_s = 4
max_concurrency = 4
code = """
import time
def main(batch, backpack):
    # The first receipt takes `first` seconds, later ones `later`.
    time.sleep(max(m["body"]["first"] if m["receiveCount"] == 1 else m["body"]["later"]
                   for m in batch))
    return None
"""

[[queues]]
name = "jobs"
batch_size = 1
visibility_timeout_s = 1
max_receive_count = 2

[[transitions]]
from = "jobs"
to = "work"
type = "then"
"#;
    server.deploy_ok(&key, manifest).await;
    // `a`: 2 s of work on its first receipt against a 1 s visibility timeout: received
    // again meanwhile (two runs at once); the first run's settlement finds the message
    // taken by the second and leaves it; the second (quick) deletes it. `b`: 10 s against
    // the block's 4 s timeout, at every receipt: dead-lettered after its second.
    let (status, _) = server
        .send_messages(
            &key,
            "slow",
            "jobs",
            vec![
                json!({"first": 2, "later": 0, "id": "a"}),
                json!({"first": 10, "later": 10, "id": "b"}),
            ],
        )
        .await;
    assert_eq!(status, 202);
    let q = server
        .await_queue_drained(&key, "slow", "jobs", DRAIN)
        .await;
    assert_eq!(
        (q["visible"].as_u64(), q["in_flight"].as_u64()),
        (Some(0), Some(0)),
        "{q}"
    );
    assert_eq!(q["dead_letter"], 1, "{q}");
    // Wait for the overtaken runs to end too.
    let deadline = std::time::Instant::now() + DRAIN;
    let runs = loop {
        let runs = server.all_runs(&key, "slow").await;
        if runs.iter().all(|r| r["status"] != "running") || std::time::Instant::now() > deadline {
            break runs;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let receipts = |id: &str| {
        runs.iter()
            .filter(|r| steps_named(r, "work")[0]["input"][0]["body"]["id"] == id)
            .map(|r| {
                (
                    r["status"].as_str().unwrap_or("?").to_string(),
                    steps_named(r, "work")[0]["input"][0]["receiveCount"]
                        .as_i64()
                        .unwrap_or(0),
                )
            })
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(
        receipts("a"),
        BTreeSet::from([("succeeded".to_string(), 1), ("succeeded".to_string(), 2)]),
        "{runs:?}"
    );
    assert_eq!(
        receipts("b"),
        BTreeSet::from([("failed".to_string(), 1), ("failed".to_string(), 2)]),
    );
    let (_, dlq) = server
        .request(
            "GET",
            "/v1/projects/slow/queues/jobs/dead-letters",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(dlq["messages"][0]["body"]["id"], "b", "{dlq}");
    assert_eq!(dlq["messages"][0]["receive_count"], 2, "{dlq}");
}
