//! Per-account quotas: setting and reading them (API and CLI), the instance, memory and
//! rate limits (429 + Retry-After, nothing half-run), eviction of idle instances to make
//! room, and one account flooding past its limits without hurting another.
//!
//! No timing assertions: slow blocks sleep long enough that "concurrent" holds on a slow
//! machine, and every wait is generous.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use serde_json::{json, Value};

/// `slow` sleeps for its input (seconds); `quick` and `other` return at once.
const PROJECT: &str = r#"
name = "q"

[[blocks]]
name = "slow"
language = "python"
memory_mb = 128
code = """
import time
def main(block_input, backpack):
    time.sleep(block_input or 0)
    return "slept"
"""

[[blocks]]
name = "quick"
language = "python"
memory_mb = 128
code = """
def main(block_input, backpack):
    return block_input
"""

[[blocks]]
name = "other"
language = "shell"
memory_mb = 128
code = """
cat
"""
"#;

/// Long enough that invocations fired together overlap even on a slow 2-core CI.
const SLOW_S: f64 = 4.0;

async fn set_quota(server: &Server, account: &str, quota: Value) -> Value {
    let (status, body) = server
        .request(
            "PUT",
            &format!("/v1/accounts/{account}/quota"),
            Some(&server.operator_key),
            Some(quota),
        )
        .await;
    assert_eq!(status, 200, "set quota: {body}");
    body
}

async fn executions(server: &Server, key: &str, project: &str) -> Vec<Value> {
    let (status, body) = server
        .request(
            "GET",
            &format!("/v1/projects/{project}/executions?limit=1000"),
            Some(key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["executions"].as_array().cloned().unwrap_or_default()
}

async fn own_instances(server: &Server, key: &str) -> Vec<Value> {
    let (status, body) = server
        .request("GET", "/v1/instances", Some(key), None)
        .await;
    assert_eq!(status, 200, "{body}");
    body["instances"].as_array().cloned().unwrap_or_default()
}

/// Fires `n` invocations at once; returns (status, Retry-After, body) of each.
async fn concurrently(
    server: &Server,
    key: &str,
    block: &str,
    input: Value,
    n: usize,
) -> Vec<(u16, Option<String>, Value)> {
    let calls = (0..n).map(|_| server.invoke_retry_after(key, "q", block, input.clone()));
    futures::future::join_all(calls).await
}

fn assert_throttled(status: u16, retry_after: &Option<String>, body: &Value, limit: &str) {
    assert_eq!(status, 429, "{body}");
    let seconds: u64 = retry_after
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("429 without a numeric Retry-After: {retry_after:?} {body}"));
    assert!(seconds >= 1, "Retry-After {seconds}");
    assert_eq!(body["error"]["code"], "throttled", "{body}");
    assert_eq!(body["error"]["limit"], limit, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("set-quota"),
        "says how to get more: {message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_sets_quotas_over_api_and_cli_and_accounts_read_only_their_own() {
    let mut server = Server::start().await;
    let (acme_id, acme_key) = server.account("acme").await;
    let (other_id, other_key) = server.account("other").await;

    // Defaults first, as the operator and as the account itself (by name or id).
    let (status, body) = server
        .request(
            "GET",
            "/v1/accounts/acme/quota",
            Some(&server.operator_key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["account_id"], acme_id.as_str());
    assert_eq!(body["quota"], body["defaults"], "{body}");
    assert_eq!(body["overrides"]["instances"], Value::Null);
    assert_eq!(body["usage"]["instances"], 0);
    for name_or_id in ["acme", acme_id.as_str()] {
        let (status, body) = server
            .request(
                "GET",
                &format!("/v1/accounts/{name_or_id}/quota"),
                Some(&acme_key),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["account"], "acme");
    }

    // The operator sets some limits over the API; the others stay at the defaults.
    let body = set_quota(&server, &acme_id, json!({ "instances": 5, "rate": 10 })).await;
    assert_eq!(body["quota"]["instances"], 5);
    assert_eq!(body["quota"]["rate"], 10.0);
    assert_eq!(body["quota"]["memory_mb"], body["defaults"]["memory_mb"]);
    assert_eq!(body["overrides"]["memory_mb"], Value::Null);

    // ... and over the CLI, by name; fields not given stay.
    let operator = server.operator_key.clone();
    let (code, stdout, stderr) = server.cli(
        &operator,
        &[
            "accounts",
            "set-quota",
            "acme",
            "--memory-mb",
            "512",
            "--burst",
            "7",
            "--json",
        ],
        None,
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let reply: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(reply["quota"]["instances"], 5);
    assert_eq!(reply["quota"]["memory_mb"], 512);
    assert_eq!(reply["quota"]["burst"], 7);
    // The account reads its own quota with the CLI.
    let (code, stdout, stderr) = server.cli(&acme_key, &["accounts", "quota", "acme"], None);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("acme") && stdout.contains("512"),
        "{stdout}"
    );
    assert!(stdout.contains("set for this account"), "{stdout}");

    // Account keys cannot set quotas, not even their own.
    for account in ["acme", acme_id.as_str(), "other"] {
        let (status, body) = server
            .request(
                "PUT",
                &format!("/v1/accounts/{account}/quota"),
                Some(&acme_key),
                Some(json!({ "instances": 1000 })),
            )
            .await;
        assert_eq!(status, 403, "{body}");
    }
    let (code, _, stderr) = server.cli(
        &acme_key,
        &["accounts", "set-quota", "acme", "--instances", "1000"],
        None,
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("403"), "{stderr}");
    // An account cannot read another's quota: 404, as if it did not exist.
    for account in ["other", other_id.as_str(), "nobody"] {
        let (status, body) = server
            .request(
                "GET",
                &format!("/v1/accounts/{account}/quota"),
                Some(&acme_key),
                None,
            )
            .await;
        assert_eq!(status, 404, "{account}: {body}");
        assert!(!body.to_string().contains("\"quota\""), "{body}");
    }
    let (code, _, stderr) = server.cli(&other_key, &["accounts", "quota", "acme"], None);
    assert_ne!(code, 0);
    assert!(stderr.contains("404"), "{stderr}");

    // Bad values and unknown accounts are refused with a reason.
    for bad in [
        json!({ "instances": 0 }),
        json!({ "memory_mb": 1 }),
        json!({ "rate": -1 }),
        json!({ "burst": 0 }),
        json!({ "cpus": 4 }),
    ] {
        let (status, body) = server
            .request(
                "PUT",
                "/v1/accounts/acme/quota",
                Some(&server.operator_key),
                Some(bad.clone()),
            )
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, _) = server
        .request(
            "PUT",
            "/v1/accounts/nobody/quota",
            Some(&server.operator_key),
            Some(json!({ "instances": 3 })),
        )
        .await;
    assert_eq!(status, 404);

    // null returns a limit to the default.
    let body = set_quota(&server, "acme", json!({ "rate": null })).await;
    assert_eq!(body["quota"]["rate"], body["defaults"]["rate"]);
    assert_eq!(body["quota"]["instances"], 5);

    // Overrides survive a restart (and are enforced from the start: the pool shows them).
    server.stop();
    let data_dir = server.data_dir.clone();
    let restarted = Server::start_in(&data_dir, &[]).await;
    let (status, body) = restarted
        .request("GET", "/v1/accounts/acme/quota", Some(&acme_key), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["quota"]["instances"], 5);
    assert_eq!(body["quota"]["memory_mb"], 512);
    assert_eq!(body["quota"]["burst"], 7);

    // --reset returns everything not given to the defaults.
    let (code, stdout, stderr) = restarted.cli(
        &restarted.operator_key,
        &[
            "accounts",
            "set-quota",
            acme_id.as_str(),
            "--reset",
            "--json",
        ],
        None,
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let reply: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(reply["quota"], reply["defaults"], "{reply}");
}

#[tokio::test(flavor = "multi_thread")]
async fn instance_quota_refuses_the_extra_cold_start_then_evicts_idle_instances() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, PROJECT).await;
    set_quota(&server, "acme", json!({ "instances": 2 })).await;

    let results = concurrently(&server, &key, "slow", json!(SLOW_S), 3).await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let throttled: Vec<_> = results.iter().filter(|r| r.0 != 200).collect();
    assert_eq!(ok, 2, "{results:?}");
    assert_eq!(throttled.len(), 1, "{results:?}");
    let (status, retry_after, body) = throttled[0];
    assert_throttled(*status, retry_after, body, "instances");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("acme") && message.contains("limit of 2 concurrent instances"),
        "{message}"
    );
    for (status, _, body) in &results {
        if *status == 200 {
            assert_eq!(body["status"], "ok", "{body}");
        }
    }

    // Two warm `slow` instances now fill the quota. A cold start of another block evicts
    // the least recently used one instead of being refused.
    let instances = own_instances(&server, &key).await;
    assert_eq!(instances.len(), 2, "{instances:?}");
    let reply = server.invoke_ok(&key, "q", "other", json!("x")).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["cold"], true);
    let instances = own_instances(&server, &key).await;
    let blocks: Vec<&str> = instances
        .iter()
        .filter_map(|i| i["block"].as_str())
        .collect();
    assert_eq!(instances.len(), 2, "{instances:?}");
    assert!(
        blocks.contains(&"other") && blocks.contains(&"slow"),
        "{blocks:?}"
    );
    let (_, quota) = server
        .request("GET", "/v1/accounts/acme/quota", Some(&key), None)
        .await;
    assert_eq!(quota["usage"]["instances"], 2, "{quota}");
    assert_eq!(quota["usage"]["memory_mb"], 256, "{quota}");

    // Three executions recorded: the throttled invocation left none.
    assert_eq!(executions(&server, &key, "q").await.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_quota_refuses_the_instance_that_would_exceed_it() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, PROJECT).await;
    set_quota(&server, "acme", json!({ "memory_mb": 256 })).await;

    let results = concurrently(&server, &key, "slow", json!(SLOW_S), 3).await;
    assert_eq!(
        results.iter().filter(|r| r.0 == 200).count(),
        2,
        "{results:?}"
    );
    let throttled: Vec<_> = results.iter().filter(|r| r.0 != 200).collect();
    assert_eq!(throttled.len(), 1, "{results:?}");
    let (status, retry_after, body) = throttled[0];
    assert_throttled(*status, retry_after, body, "memory_mb");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("acme") && message.contains("limit of 256 MB of total instance memory"),
        "{message}"
    );
    assert_eq!(executions(&server, &key, "q").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_quota_throttles_a_burst_with_retry_after() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, PROJECT).await;
    set_quota(&server, "acme", json!({ "rate": 2, "burst": 2 })).await;

    let results = concurrently(&server, &key, "quick", json!(1), 5).await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let throttled: Vec<_> = results.iter().filter(|r| r.0 != 200).collect();
    assert!(!throttled.is_empty(), "{results:?}");
    assert!(ok >= 1, "the burst lets some through: {results:?}");
    for (status, retry_after, body) in &throttled {
        assert_throttled(*status, retry_after, body, "rate");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("rate limit of 2 per second"), "{message}");
    }
    // Only what ran is recorded.
    assert_eq!(executions(&server, &key, "q").await.len(), ok);

    // The bucket refills: after a pause the account may invoke again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.invoke_ok(&key, "q", "quick", json!(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_invocation_starts_nothing_and_records_nothing() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, PROJECT).await;
    set_quota(&server, "acme", json!({ "instances": 1 })).await;

    // One busy instance fills the quota; it is not idle, so nothing can be evicted.
    let slow = {
        let (url, key) = (server.url.clone(), key.clone());
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{url}/v1/projects/q/blocks/slow/invoke"))
                .bearer_auth(key)
                .json(&json!(SLOW_S))
                .send()
                .await
                .expect("send")
                .status()
                .as_u16()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = own_instances(&server, &key).await;
        if list.iter().any(|i| i["state"] == "busy") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow invocation never ran: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = server.instances().await;

    let (status, retry_after, body) = server
        .invoke_retry_after(&key, "q", "other", json!("x"))
        .await;
    assert_throttled(status, &retry_after, &body, "instances");
    let after = server.instances().await;
    let ids = |list: &[Value]| -> Vec<String> {
        list.iter()
            .filter_map(|i| i["id"].as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(ids(&before), ids(&after), "no instance was started");
    assert!(after.iter().all(|i| i["block"] == "slow"), "{after:?}");

    assert_eq!(slow.await.expect("join"), 200);
    let recorded = executions(&server, &key, "q").await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["block"], "slow");

    // Rate refusals are as clean: with the bucket at one token, the second call is
    // refused before it reaches a (warm) instance.
    set_quota(&server, "acme", json!({ "rate": 0.01, "burst": 1 })).await;
    let (status, first) = server.invoke(&key, "q", "slow", json!(0)).await;
    assert_eq!(status, 200, "{first}");
    let (status, retry_after, body) = server.invoke_retry_after(&key, "q", "slow", json!(0)).await;
    assert_throttled(status, &retry_after, &body, "rate");
    let seconds: u64 = retry_after.as_deref().unwrap_or("0").parse().unwrap_or(0);
    assert!(seconds >= 50, "a token comes only every 100 s: {seconds}");
    let recorded = executions(&server, &key, "q").await;
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    let invocations: u64 = own_instances(&server, &key)
        .await
        .iter()
        .filter_map(|i| i["invocations"].as_u64())
        .sum();
    assert_eq!(
        invocations as usize,
        recorded.len(),
        "every run was recorded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_noisy_account_past_its_limits_does_not_hurt_another() {
    let server = Server::start().await;
    let (_, key_a) = server.account("noisy").await;
    let (_, key_b) = server.account("quiet").await;
    server.deploy_ok(&key_a, PROJECT).await;
    server.deploy_ok(&key_b, PROJECT).await;
    set_quota(
        &server,
        "noisy",
        json!({ "instances": 2, "memory_mb": 256, "rate": 5, "burst": 5 }),
    )
    .await;
    // B's first (cold) call before the flood, so the comparison is warm vs warm.
    server.invoke_ok(&key_b, "q", "quick", json!(0)).await;

    let flood = async {
        let mut statuses = Vec::new();
        // 30 at once, then sequential bursts for about 3 s.
        let wave = concurrently(&server, &key_a, "slow", json!(0.5), 30).await;
        statuses.extend(wave.iter().map(|r| r.0));
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            let burst = concurrently(&server, &key_a, "quick", json!(0), 10).await;
            statuses.extend(burst.iter().map(|r| r.0));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        statuses
    };
    let quiet = async {
        let mut replies = Vec::new();
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until || replies.len() < 10 {
            replies.push(
                server
                    .invoke(&key_b, "q", "quick", json!(replies.len()))
                    .await,
            );
        }
        replies
    };
    let (a_statuses, b_replies) = tokio::join!(flood, quiet);

    let count = |status: u16| a_statuses.iter().filter(|s| **s == status).count();
    let (a_ok, a_throttled) = (count(200), count(429));
    assert!(a_throttled > 0, "A went past its limits: {a_ok} ok");
    let unexpected: Vec<&u16> = a_statuses
        .iter()
        .filter(|s| **s != 200 && **s != 429)
        .collect();
    assert!(
        unexpected.is_empty(),
        "A got only 200s and 429s: {unexpected:?}"
    );
    for (n, (status, body)) in b_replies.iter().enumerate() {
        assert_eq!(*status, 200, "B's call {n} was refused: {body}");
        assert_eq!(body["status"], "ok", "B's call {n}: {body}");
        assert_eq!(body["output"], json!(n), "{body}");
    }
}
