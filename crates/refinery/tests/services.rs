//! Services: blocks connected by transitions, run by the engine against the real server
//! (real sandboxes): every transition type alone and together, retries, the step limit,
//! log levels and tenancy. Crash durability is in `services_crash.rs`.

mod common;

use common::{steps_named, Server};
use serde_json::{json, Value};

/// A three-block service: `check` → (if total > 0) `charge` → `receipt`; else `reject`;
/// `charge` raises on a negative card and its exception goes to `refund`.
const SHOP: &str = r#"
name = "shop"

[[blocks]]
name = "check"
language = "python"
code = """
def main(order, backpack):
    backpack["checked"] = True
    return order
"""

[[blocks]]
name = "charge"
language = "python"
code = """
def main(order, backpack):
    if order["card"] < 0:
        raise ValueError("card declined")
    backpack["charged"] = order["total"]
    return {"paid": order["total"]}
"""

[[blocks]]
name = "receipt"
language = "python"
code = """
def main(payment, backpack):
    return {"receipt": payment["paid"], "seen": sorted(backpack)}
"""

[[blocks]]
name = "reject"
language = "python"
code = """
def main(order, backpack):
    return "rejected"
"""

[[blocks]]
name = "refund"
language = "python"
code = """
def main(failure, backpack):
    return {"refunded": failure["input_data"]["total"], "why": failure["exception_text"], "version": failure["version"]}
"""

[[transitions]]
from = "check"
to = "charge"
type = "if"
expression = "output.total > 0"

[[transitions]]
from = "check"
to = "reject"
type = "else"

[[transitions]]
from = "charge"
to = "receipt"
type = "then"

[[transitions]]
from = "charge"
to = "refund"
type = "exception"
"#;

fn names(run: &Value) -> Vec<String> {
    run["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn then_if_else_and_exception_in_one_service() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, SHOP).await;

    let run = server
        .run_to_end(&key, "shop", "check", json!({"total": 5, "card": 1}))
        .await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(names(&run), ["check", "charge", "receipt"]);
    let receipt = steps_named(&run, "receipt")[0];
    assert_eq!(receipt["output"]["receipt"], 5);
    // The backpack travelled: both upstream changes are seen downstream.
    assert_eq!(receipt["output"]["seen"], json!(["charged", "checked"]));
    assert_eq!(receipt["transition"], "then");
    assert_eq!(
        receipt["parents"],
        json!([steps_named(&run, "charge")[0]["step_id"]])
    );
    assert!(receipt["execution_id"]
        .as_str()
        .is_some_and(|e| e.starts_with("ex_")));

    let run = server
        .run_to_end(&key, "shop", "check", json!({"total": 0, "card": 1}))
        .await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(names(&run), ["check", "reject"]);
    assert_eq!(steps_named(&run, "reject")[0]["transition"], "else");

    let run = server
        .run_to_end(&key, "shop", "check", json!({"total": 7, "card": -1}))
        .await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(names(&run), ["check", "charge", "refund"]);
    let charge = steps_named(&run, "charge")[0];
    assert_eq!(charge["status"], "failed");
    assert_eq!(charge["error"]["type"], "ValueError");
    let refund = steps_named(&run, "refund")[0];
    assert_eq!(refund["output"]["refunded"], 7);
    assert_eq!(refund["output"]["version"], "1.0.0");
    assert!(
        refund["output"]["why"]
            .as_str()
            .is_some_and(|w| w.contains("card declined")),
        "{refund}"
    );

    // Every step is an execution like any other.
    let (status, executions) = server
        .request(
            "GET",
            "/v1/projects/shop/executions?limit=100",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let count = executions["executions"].as_array().map_or(0, Vec::len);
    assert_eq!(count, 8, "{executions}");
}

const FAN: &str = r#"
name = "fan"

[[blocks]]
name = "split"
language = "python"
code = """
def main(n, backpack):
    backpack["from"] = "split"
    return list(range(n))
"""

[[blocks]]
name = "square"
language = "python"
code = """
def main(x, backpack):
    if x == 13 and backpack.get("fail13"):
        raise RuntimeError("unlucky")
    backpack["item%d" % x] = True
    return x * x
"""

[[blocks]]
name = "total"
language = "python"
code = """
def main(squares, backpack):
    return {"squares": squares, "sum": sum(squares), "keys": len(backpack)}
"""

[[transitions]]
from = "split"
to = "square"
type = "fan-out"

[[transitions]]
from = "square"
to = "total"
type = "fan-in"
"#;

#[tokio::test]
async fn fan_out_of_100_items_fans_in_once_in_item_order() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, FAN).await;

    let run = server.run_to_end(&key, "fan", "split", json!(100)).await;
    assert_eq!(run["status"], "succeeded", "{}", run["error"]);
    let squares = steps_named(&run, "square");
    assert_eq!(squares.len(), 100);
    let mut items: Vec<i64> = squares.iter().filter_map(|s| s["item"].as_i64()).collect();
    items.sort_unstable();
    assert_eq!(items, (0..100).collect::<Vec<_>>());
    let total = steps_named(&run, "total");
    assert_eq!(total.len(), 1, "the fan-in ran exactly once");
    let expected: Vec<i64> = (0..100).map(|x| x * x).collect();
    assert_eq!(total[0]["input"], json!(expected), "outputs in item order");
    assert_eq!(total[0]["output"]["sum"], 328_350);
    // The backpacks joined: split's key plus one per item.
    assert_eq!(total[0]["output"]["keys"], 101);
    assert_eq!(total[0]["transition"], "fan-in");
    assert_eq!(total[0]["parents"].as_array().map(Vec::len), Some(100));

    // An empty list runs the fan-in target with [].
    let run = server.run_to_end(&key, "fan", "split", json!(0)).await;
    assert_eq!(run["status"], "succeeded", "{}", run["error"]);
    assert_eq!(steps_named(&run, "total")[0]["input"], json!([]));

    // A non-list output is a clear error that fails the run.
    let (status, started) = server
        .request(
            "POST",
            "/v1/projects/fan/runs?wait=60",
            Some(&key),
            Some(json!({"start": "split", "input": "x"})),
        )
        .await;
    assert_eq!(status, 200, "{started}");
    assert_eq!(started["status"], "failed");
    let split = steps_named(&started, "split")[0];
    assert_eq!(split["status"], "failed");
    // range("x") raised: the block's own error.
    assert_eq!(split["error"]["type"], "TypeError", "{split}");
}

#[tokio::test]
async fn a_failing_item_fails_the_run_naming_it_and_never_hangs() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, FAN).await;
    let (status, run) = server
        .request(
            "POST",
            "/v1/projects/fan/runs?wait=60",
            Some(&key),
            Some(json!({"start": "split", "input": 20, "backpack": {"fail13": true}})),
        )
        .await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["error"]["type"], "StepFailed");
    let message = run["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("`square` (item 13)") && message.contains("unlucky"),
        "{message}"
    );
    assert!(
        steps_named(&run, "total").is_empty(),
        "no fan-in after a failed item"
    );
    assert!(run["ended_at"].is_string());
}

#[tokio::test]
async fn a_list_output_that_is_not_a_list_or_too_long_is_named() {
    let server = Server::start_with(&["--max-fan-out", "5"]).await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, FAN).await;
    let run = server.run_to_end(&key, "fan", "split", json!(6)).await;
    assert_eq!(run["status"], "failed");
    let split = steps_named(&run, "split")[0];
    assert_eq!(split["error"]["type"], "FanOutTooLarge", "{split}");
    assert!(split["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("6 items") && m.contains("limit is 5")));
    let not_a_list = r#"
name = "odd"
[[blocks]]
name = "make"
language = "python"
code = "def main(i, b): return {'a': 1}"
[[blocks]]
name = "each"
language = "python"
code = "def main(i, b): return i"
[[transitions]]
from = "make"
to = "each"
type = "fan-out"
"#;
    server.deploy_ok(&key, not_a_list).await;
    let run = server.run_to_end(&key, "odd", "make", json!(null)).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    let make = steps_named(&run, "make")[0];
    assert_eq!(make["error"]["type"], "FanOutNotList", "{make}");
    assert!(make["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("returned an object")));
}

const DIAMOND: &str = r#"
name = "diamond"

[[blocks]]
name = "start"
language = "python"
code = "def main(i, b): return i"

[[blocks]]
name = "left"
language = "python"
code = """
import time
def main(i, b):
    time.sleep(0.2)
    b["left"] = 1
    return "L%d" % i
"""

[[blocks]]
name = "right"
language = "python"
code = """
def main(i, b):
    b["right"] = 1
    return "R%d" % i
"""

[[blocks]]
name = "join"
language = "python"
code = "def main(i, b): return {'got': i, 'keys': sorted(b)}"

[[transitions]]
from = "start"
to = "left"
type = "then"

[[transitions]]
from = "start"
to = "right"
type = "then"

[[transitions]]
from = ["left", "right"]
to = "join"
type = "merge"
"#;

#[tokio::test]
async fn a_merge_runs_once_with_its_branches_in_manifest_order() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, DIAMOND).await;
    let run = server.run_to_end(&key, "diamond", "start", json!(7)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let join = steps_named(&run, "join");
    assert_eq!(join.len(), 1, "{run:#}");
    // `right` finished first, yet the order is the manifest's.
    assert_eq!(join[0]["output"]["got"], json!(["L7", "R7"]));
    assert_eq!(join[0]["output"]["keys"], json!(["left", "right"]));
    assert_eq!(join[0]["transition"], "merge");
    assert_eq!(join[0]["parents"].as_array().map(Vec::len), Some(2));
}

const NESTED: &str = r#"
name = "nested"

[[blocks]]
name = "rows"
language = "python"
code = "def main(n, b): return [[r * 10 + c for c in range(3)] for r in range(n)]"

[[blocks]]
name = "row"
language = "python"
code = "def main(cells, b): return cells"

[[blocks]]
name = "cell"
language = "python"
code = "def main(x, b): return x + 1"

[[blocks]]
name = "row_sum"
language = "python"
code = "def main(xs, b): return sum(xs)"

[[blocks]]
name = "grand"
language = "python"
code = "def main(sums, b): return sums"

[[transitions]]
from = "rows"
to = "row"
type = "fan-out"

[[transitions]]
from = "row"
to = "cell"
type = "fan-out"

[[transitions]]
from = "cell"
to = "row_sum"
type = "fan-in"

[[transitions]]
from = "row_sum"
to = "grand"
type = "fan-in"
"#;

#[tokio::test]
async fn nested_fan_outs_join_level_by_level() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, NESTED).await;
    let run = server.run_to_end(&key, "nested", "rows", json!(4)).await;
    assert_eq!(run["status"], "succeeded", "{}", run["error"]);
    assert_eq!(steps_named(&run, "cell").len(), 12);
    assert_eq!(steps_named(&run, "row_sum").len(), 4, "one per row");
    let grand = steps_named(&run, "grand");
    assert_eq!(grand.len(), 1);
    // Row r: (10r+1) + (10r+2) + (10r+3) = 30r + 6, in row order.
    assert_eq!(grand[0]["output"], json!([6, 36, 66, 96]));
}

const FLAKY: &str = r#"
name = "flaky"

[[blocks]]
name = "try"
language = "python"
retry = { attempts = 3, interval_s = 0, backoff = 1.0 }
code = """
import os
def main(i, b):
    attempt = int(os.environ.get("REFINERY_ATTEMPT", "0"))
    if attempt < i:
        raise RuntimeError("attempt %d failed" % attempt)
    return attempt
"""

[[blocks]]
name = "after"
language = "python"
code = "def main(i, b): return i"

[[transitions]]
from = "try"
to = "after"
type = "then"
"#;

#[tokio::test]
async fn retries_are_each_a_visible_attempt() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, FLAKY).await;
    // Succeeds at the third attempt.
    let run = server.run_to_end(&key, "flaky", "try", json!(3)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let tries = steps_named(&run, "try");
    let attempts: Vec<(i64, &str, &str)> = tries
        .iter()
        .map(|s| {
            (
                s["attempt"].as_i64().unwrap_or(0),
                s["status"].as_str().unwrap_or(""),
                s["transition"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        attempts,
        [
            (1, "failed", "start"),
            (2, "failed", "retry"),
            (3, "succeeded", "retry")
        ]
    );
    assert_eq!(steps_named(&run, "after")[0]["output"], 3);
    // Four attempts needed, three allowed: the run fails after the third.
    let run = server.run_to_end(&key, "flaky", "try", json!(4)).await;
    assert_eq!(run["status"], "failed");
    assert_eq!(steps_named(&run, "try").len(), 3);
    assert!(steps_named(&run, "after").is_empty());
}

const LOOP: &str = r#"
name = "loop"

[[blocks]]
name = "inc"
language = "python"
code = "def main(i, b): return i + 1"

[[transitions]]
from = "inc"
to = "inc"
type = "if"
expression = "output < input + 100000"
"#;

#[tokio::test]
async fn a_runaway_loop_is_stopped_by_the_step_limit() {
    let server = Server::start_with(&["--max-run-steps", "25"]).await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, LOOP).await;
    let run = server.run_to_end(&key, "loop", "inc", json!(0)).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["error"]["type"], "StepLimit");
    assert!(run["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("25")));
    assert_eq!(steps_named(&run, "inc").len(), 25);
    // A loop that ends by itself is fine.
    let bounded = LOOP.replace("output < input + 100000", "output < 10");
    server.deploy_ok(&key, &bounded).await;
    let run = server.run_to_end(&key, "loop", "inc", json!(0)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(steps_named(&run, "inc").len(), 10);
}

#[tokio::test]
async fn log_level_none_keeps_status_and_timing_only() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    let quiet = SHOP.replace("name = \"shop\"", "name = \"shop\"\nlog_level = \"none\"");
    server.deploy_ok(&key, &quiet).await;
    let run = server
        .run_to_end(&key, "shop", "check", json!({"total": 7, "card": -1}))
        .await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    for step in run["steps"].as_array().expect("steps") {
        for field in ["input", "output", "backpack", "error"] {
            assert!(step[field].is_null(), "{field} kept: {step}");
        }
        assert!(step["duration_ms"].is_number(), "{step}");
        assert!(step["status"].is_string());
    }
    // The executions behind the steps keep no payloads either.
    let id = run["steps"][0]["execution_id"]
        .as_str()
        .expect("execution id");
    let (status, execution) = server
        .request("GET", &format!("/v1/executions/{id}"), Some(&key), None)
        .await;
    assert_eq!(status, 200, "{execution}");
    assert!(!execution.to_string().contains("total"), "{execution}");
}

#[tokio::test]
async fn another_accounts_run_is_a_404_and_its_fan_out_does_not_starve_us() {
    let server = Server::start().await;
    let (_, big) = server.account("big").await;
    let (_, small) = server.account("small").await;
    let slow = FAN.replace(
        "def main(x, backpack):\n",
        "import time\ndef main(x, backpack):\n    time.sleep(0.2)\n",
    );
    server.deploy_ok(&big, &slow).await;
    server.deploy_ok(&small, SHOP).await;
    let (status, started) = server
        .start_run(&big, "fan", "split", json!(400), None)
        .await;
    assert_eq!(status, 202, "{started}");
    let big_run = started["run_id"].as_str().expect("run id").to_string();

    // The small account's run goes through while the big fan-out is still going.
    let run = server
        .run_to_end(&small, "shop", "check", json!({"total": 1, "card": 1}))
        .await;
    assert_eq!(run["status"], "succeeded");
    assert_eq!(server.get_run(&big, &big_run).await["status"], "running");

    // Tenancy: the other account's run does not exist for us, and cannot be cancelled.
    let (status, body) = server
        .request("GET", &format!("/v1/runs/{big_run}"), Some(&small), None)
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = server
        .request(
            "POST",
            &format!("/v1/runs/{big_run}/cancel"),
            Some(&small),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 404);
    let (_, listed) = server
        .request("GET", "/v1/projects/fan/runs", Some(&small), None)
        .await;
    assert_eq!(listed["runs"], json!([]), "{listed}");

    let (status, cancelled) = server
        .request(
            "POST",
            &format!("/v1/runs/{big_run}/cancel"),
            Some(&big),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 202, "{cancelled}");
    let run = server
        .await_run(&big, &big_run, std::time::Duration::from_secs(60))
        .await;
    assert_eq!(run["status"], "cancelled");
    assert!(steps_named(&run, "total").is_empty());
}

#[tokio::test]
async fn a_run_keeps_its_deployment_through_redeploys_and_pruning() {
    let server = Server::start_with(&["--keep-deployments", "1"]).await;
    let (_, key) = server.account("acme").await;
    let slow = r#"
name = "slow"
[[blocks]]
name = "wait"
language = "python"
code = """
import time
def main(i, b):
    time.sleep(1.5)
    return i
"""
[[blocks]]
name = "done"
language = "python"
code = "def main(i, b): return 'v1'"
[[transitions]]
from = "wait"
to = "done"
type = "then"
"#;
    server.deploy_ok(&key, slow).await;
    let (status, started) = server.start_run(&key, "slow", "wait", json!(1), None).await;
    assert_eq!(status, 202, "{started}");
    let run_id = started["run_id"].as_str().expect("run id");
    // Two deploys while it runs: with one deployment kept, deployment 1 would be pruned.
    server.deploy_ok(&key, &slow.replace("'v1'", "'v2'")).await;
    server.deploy_ok(&key, &slow.replace("'v1'", "'v3'")).await;
    let run = server
        .await_run(&key, run_id, std::time::Duration::from_secs(60))
        .await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["deployment"], 1);
    assert_eq!(steps_named(&run, "done")[0]["output"], "v1");
    // A run started now uses the live deployment.
    let run = server.run_to_end(&key, "slow", "done", json!(null)).await;
    assert_eq!(run["deployment"], 3);
    assert_eq!(steps_named(&run, "done")[0]["output"], "v3");
}

#[tokio::test]
async fn bad_run_requests_get_clear_errors() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, SHOP).await;
    let post = |body: Value, query: &'static str| {
        let server = &server;
        let key = key.clone();
        async move {
            server
                .request(
                    "POST",
                    &format!("/v1/projects/shop/runs{query}"),
                    Some(&key),
                    Some(body),
                )
                .await
        }
    };
    let (status, body) = post(json!({"start": "nope"}), "").await;
    assert_eq!(status, 404, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no block `nope`") && message.contains("charge, check"),
        "{message}"
    );
    let (status, body) = post(json!({"start": "check", "backpack": [1]}), "").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("JSON object"), "{body}");
    let (status, body) = post(json!({"start": "check"}), "?wait=soon").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("wait=soon"), "{body}");
    let (status, body) = post(json!({"begin": "check"}), "").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("start"), "{body}");
    let (status, body) = post(
        json!({"start": "check", "input": "x".repeat(7_000_000)}),
        "",
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let (status, body) = server
        .request(
            "POST",
            "/v1/projects/none/runs",
            Some(&key),
            Some(json!({"start": "a"})),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = server
        .request("GET", "/v1/runs/run_0000", Some(&key), None)
        .await;
    assert_eq!(status, 404);

    // What ran is counted in the metrics.
    server
        .run_to_end(&key, "shop", "check", json!({"total": 1, "card": 1}))
        .await;
    let metrics = server
        .http
        .get(format!("{}/metrics", server.url))
        .bearer_auth(&server.operator_key)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("refinery_runs_started_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("refinery_runs_ended_total{status=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("refinery_run_steps_ended_total{status=\"succeeded\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("refinery_run_transition_seconds_count"),
        "{metrics}"
    );
    assert!(metrics.trim_end().ends_with("# EOF"));
}

#[tokio::test]
async fn an_if_that_fails_at_run_time_fails_the_step_and_takes_its_exception_edge() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    // No `total`: `output.total > 0` cannot be evaluated.
    server.deploy_ok(&key, SHOP).await;
    let run = server
        .run_to_end(&key, "shop", "check", json!({"card": 1}))
        .await;
    assert_eq!(run["status"], "failed", "{run:#}");
    let check = steps_named(&run, "check")[0];
    assert_eq!(check["error"]["type"], "ExpressionError", "{check}");
    assert!(check["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("output.total > 0")));
    assert!(
        steps_named(&run, "reject").is_empty(),
        "neither `if` nor `else` fired"
    );

    // With an exception edge the failure is handled.
    let handled = format!(
        "{SHOP}\n[[transitions]]\nfrom = \"check\"\nto = \"refund\"\ntype = \"exception\"\n"
    )
    .replace(
        "\"refunded\": failure[\"input_data\"][\"total\"]",
        "\"refunded\": failure[\"input_data\"].get(\"total\")",
    );
    server.deploy_ok(&key, &handled).await;
    let run = server
        .run_to_end(&key, "shop", "check", json!({"card": 1}))
        .await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let refund = steps_named(&run, "refund")[0];
    assert!(
        refund["output"]["why"]
            .as_str()
            .is_some_and(|w| w.contains("ExpressionError")),
        "{refund}"
    );
}

#[tokio::test]
async fn an_account_may_have_only_so_many_runs_running() {
    let server = Server::start_with(&["--max-runs-per-account", "2"]).await;
    let (_, key) = server.account("acme").await;
    let (_, other) = server.account("other").await;
    let slow = r#"
name = "slow"
[[blocks]]
name = "wait"
language = "python"
code = """
import time
def main(i, b):
    time.sleep(1)
    return i
"""
"#;
    server.deploy_ok(&key, slow).await;
    server.deploy_ok(&other, slow).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, body) = server.start_run(&key, "slow", "wait", json!(1), None).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["run_id"].as_str().expect("id").to_string());
    }
    let (status, body) = server.start_run(&key, "slow", "wait", json!(1), None).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["limit"], "runs", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("2 runs running")));
    // Another account is not affected.
    let (status, body) = server
        .start_run(&other, "slow", "wait", json!(1), None)
        .await;
    assert_eq!(status, 202, "{body}");
    // Once they end, runs start again.
    for id in &ids {
        let run = server
            .await_run(&key, id, std::time::Duration::from_secs(60))
            .await;
        assert_eq!(run["status"], "succeeded");
    }
    let run = server.run_to_end(&key, "slow", "wait", json!(2)).await;
    assert_eq!(run["status"], "succeeded");
}
