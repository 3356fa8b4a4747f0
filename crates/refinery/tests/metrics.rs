//! `GET /metrics` over HTTP: only the operator may read it, and after a known series of
//! invocations its counters, histograms and gauges say exactly what happened, labelled by
//! account, project and block, with the label sets capped.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::Server;
use serde_json::json;

const PROJECT: &str = r#"
name = "m"

[[blocks]]
name = "ok"
language = "python"
code = """
def main(block_input, backpack):
    return block_input
"""

[[blocks]]
name = "fails"
language = "python"
code = """
def main(block_input, backpack):
    raise ValueError("no")
"""

[[blocks]]
name = "hangs"
language = "python"
timeout_s = 1
code = """
import time
def main(block_input, backpack):
    time.sleep(30)
"""

[[blocks]]
name = "single"
language = "python"
max_concurrency = 1
code = """
import time
def main(block_input, backpack):
    time.sleep(block_input or 0)
    return "done"
"""

[[blocks]]
name = "extra"
language = "shell"
code = "cat"
"#;

/// Samples by metric name and labels (`name{a="x",b="y"}` as written) → value.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn sample(samples: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let Some((n, rest)) = series.split_once('{') else {
                return series.as_str() == name && labels.is_empty();
            };
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| *v)
        .sum()
}

async fn scrape(server: &Server, key: Option<&str>) -> (u16, String, String) {
    let mut request = server.http.get(format!("{}/metrics", server.url));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, content_type, response.text().await.expect("body"))
}

#[tokio::test]
async fn metrics_count_invocations_starts_durations_throttles_timeouts_and_reaps() {
    // Four label sets of their own; the fifth block goes to the overflow set.
    let server = Server::start_with(&[
        "--keep-alive",
        "5s",
        "--queue-timeout",
        "1s",
        "--metrics-max-label-sets",
        "4",
    ])
    .await;
    let (account, key) = server.account("metered").await;
    server.deploy_ok(&key, PROJECT).await;

    // Two at once on a block with max_concurrency 1: the second waits 1 s, then 429.
    let (a, b) = tokio::join!(
        server.invoke(&key, "m", "single", json!(4)),
        server.invoke(&key, "m", "single", json!(4)),
    );
    let mut statuses = [a.0, b.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 429], "{a:?} {b:?}");
    let reply = server.invoke_ok(&key, "m", "fails", json!(null)).await;
    assert_eq!(reply["status"], "error", "{reply}");
    let reply = server.invoke_ok(&key, "m", "hangs", json!(null)).await;
    assert_eq!(reply["status"], "timeout", "{reply}");
    for i in 0..3 {
        let reply = server.invoke_ok(&key, "m", "ok", json!(i)).await;
        assert_eq!(reply["status"], "ok", "{reply}");
    }
    server.invoke_ok(&key, "m", "extra", json!("x")).await;

    // Who may read it.
    let (status, _, _) = scrape(&server, None).await;
    assert_eq!(status, 401);
    let (status, _, _) = scrape(&server, Some(&key)).await;
    assert_eq!(status, 403);
    let (status, content_type, text) = scrape(&server, Some(&server.operator_key)).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    let samples = parse(&text);
    let block = |name: &'static str| {
        [
            ("account", account.as_str()),
            ("project", "m"),
            ("block", name),
        ]
    };
    let with = |name: &'static str, extra: (&'static str, &'static str)| {
        let mut labels = block(name).to_vec();
        labels.push(extra);
        labels
    };

    assert_eq!(
        sample(
            &samples,
            "refinery_invocations_total",
            &with("ok", ("status", "ok"))
        ),
        3.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "refinery_invocations_total",
            &with("fails", ("status", "error"))
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "refinery_invocations_total",
            &with("hangs", ("status", "timeout"))
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "refinery_invocations_total",
            &with("single", ("status", "ok"))
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "refinery_invocations_total",
            &with("single", ("status", "throttled"))
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "refinery_throttles_total",
            &with("single", ("reason", "concurrency"))
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(&samples, "refinery_cold_starts_total", &block("ok")),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(&samples, "refinery_warm_starts_total", &block("ok")),
        2.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "refinery_init_duration_seconds_count",
            &block("ok")
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "refinery_run_duration_seconds_count",
            &block("ok")
        ),
        3.0,
        "{text}"
    );
    assert!(
        sample(&samples, "refinery_run_duration_seconds_sum", &block("ok")) > 0.0,
        "{text}"
    );
    // The +Inf bucket holds every observation.
    assert_eq!(
        sample(
            &samples,
            "refinery_run_duration_seconds_bucket",
            &with("ok", ("le", "+Inf"))
        ),
        3.0,
        "{text}"
    );
    assert_eq!(
        sample(&samples, "refinery_timeouts_total", &block("hangs")),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "refinery_instances",
            &with("ok", ("state", "frozen"))
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "refinery_instances",
            &with("hangs", ("state", "frozen"))
        ),
        0.0,
        "{text}"
    );
    // The fifth block is counted, under the overflow label set.
    let other = [
        ("account", "_other"),
        ("project", "_other"),
        ("block", "_other"),
        ("status", "ok"),
    ];
    assert_eq!(
        sample(&samples, "refinery_invocations_total", &other),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "refinery_invocations_total",
            &with("extra", ("status", "ok"))
        ),
        0.0,
        "{text}"
    );
    assert!(
        sample(
            &samples,
            "refinery_metrics_label_sets_overflowed_total",
            &[]
        ) >= 1.0,
        "{text}"
    );

    // Past the 5 s keep-alive the reaper takes the idle instances, and says so.
    let mut reaped = 0.0;
    for _ in 0..100 {
        let (_, _, text) = scrape(&server, Some(&server.operator_key)).await;
        let samples = parse(&text);
        reaped = sample(&samples, "refinery_reaps_total", &block("ok"));
        if reaped >= 1.0 {
            assert_eq!(
                sample(
                    &samples,
                    "refinery_instances",
                    &with("ok", ("state", "frozen"))
                ),
                0.0,
                "{text}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(reaped, 1.0);
}
