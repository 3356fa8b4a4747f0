//! Timers (issue 13, "Timers"): a `rate(2 seconds)` timer on the real server fires about
//! every 2 s with its `input`, each slot exactly once — no slot fires twice across a
//! `kill -9` and restart, a redeploy or a rollback, and after downtime only the most recent
//! missed slot fires, once. `refinery timers PROJECT` shows the next fire time.
//!
//! Every run a timer starts is listed with its slot (`GET /v1/projects/{p}/timers`), the
//! slot claimed in the transaction that created the run: the tests check that every run
//! started at the timer is one slot's run, and that no slot has two.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{metric_value, steps_named, Fire, Server};
use serde_json::{json, Value};

const PERIOD_MS: i64 = 2000;
/// Generous: the machine is shared. The benchmark measures lateness properly.
const MAX_LATE_MS: i64 = 1500;

fn manifest(project: &str, tag: &str, schedule: &str) -> String {
    format!(
        r#"
name = "{project}"

[[blocks]]
name = "tick"
language = "python"
code = """
def main(x, backpack):
    return {{"got": x, "backpack": backpack}}
"""

[[timers]]
name = "every2"
schedule = "{schedule}"
input = {{ tag = "{tag}", n = 1 }}

[[transitions]]
from = "every2"
to = "tick"
type = "then"
"#
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Every run started at the timer is one fire's run, and no slot fired twice.
async fn assert_each_slot_once(server: &Server, key: &str, project: &str) -> Vec<Fire> {
    let runs = server.run_ids_started_at(key, project, "every2").await;
    let fires = server.timer_fires(key, project, "every2").await;
    let slots: BTreeSet<i64> = fires.iter().map(|f| f.slot_ms).collect();
    assert_eq!(slots.len(), fires.len(), "a slot fired twice: {fires:?}");
    let fired_runs: HashSet<&str> = fires.iter().map(|f| f.run_id.as_str()).collect();
    assert_eq!(
        fired_runs.len(),
        fires.len(),
        "a run for two slots: {fires:?}"
    );
    for run in &runs {
        assert!(
            fired_runs.contains(run.as_str()),
            "run {run} started at the timer but is no slot's run (a double fire): {fires:?}"
        );
    }
    for f in &fires {
        assert_eq!(f.slot_ms % PERIOD_MS, 0, "slots are on the period: {f:?}");
    }
    fires
}

#[tokio::test]
async fn a_rate_timer_fires_every_slot_once_with_its_input() {
    let server = Server::start().await;
    let (_, key) = server.account("clockwork").await;
    let deployed_at = now_ms();
    server
        .deploy_ok(&key, &manifest("clock", "v1", "rate(2 seconds)"))
        .await;

    server
        .await_fires(&key, "clock", "every2", 3, Duration::from_secs(20))
        .await;
    let fires = assert_each_slot_once(&server, &key, "clock").await;
    // A new timer waits for its next slot (the latest slot before the deploy never fires).
    assert!(
        fires[0].slot_ms > deployed_at,
        "the first slot fired ({}) is before the deploy ({deployed_at})",
        fires[0].slot_ms
    );
    for pair in fires.windows(2) {
        assert_eq!(
            pair[1].slot_ms - pair[0].slot_ms,
            PERIOD_MS,
            "consecutive slots fire, none skipped: {fires:?}"
        );
    }
    for f in &fires {
        assert!(
            (0..MAX_LATE_MS).contains(&f.late_ms),
            "slot fired {} ms late: {f:?}",
            f.late_ms
        );
        let run = server
            .await_run(&key, &f.run_id, Duration::from_secs(60))
            .await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["start"], "every2");
        let ticks = steps_named(&run, "tick");
        assert_eq!(ticks.len(), 1, "{run}");
        // The timer's input, exactly; an empty backpack.
        assert_eq!(ticks[0]["input"], json!({"tag": "v1", "n": 1}));
        assert_eq!(
            ticks[0]["output"],
            json!({"got": {"tag": "v1", "n": 1}, "backpack": {}})
        );
    }

    // The API and the CLI show the next fire time, after the last fire.
    let body = server.timers(&key, "clock").await;
    let timer = &body["timers"][0];
    assert_eq!(timer["name"], "every2");
    assert_eq!(timer["schedule"], "rate(2 seconds)");
    let next = common::rfc3339_ms(timer["next_fire_at"].as_str().expect("next_fire_at"));
    let last = common::rfc3339_ms(timer["last_fired_at"].as_str().expect("last_fired_at"));
    assert!(next > last && next % PERIOD_MS == 0, "{timer}");
    assert!(next - now_ms() <= PERIOD_MS, "{timer}");
    let (code, stdout, stderr) = server.cli(&key, &["timers", "clock"], None);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("NEXT FIRE (UTC)")
            && stdout.contains("every2")
            && stdout.contains("rate(2 seconds)"),
        "{stdout}"
    );
    let (code, stdout, stderr) = server.cli(&key, &["timers", "clock", "--json"], None);
    assert_eq!(code, 0, "{stderr}");
    let parsed: Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    assert_eq!(parsed["timers"][0]["name"], "every2");

    // Lateness is a metric.
    let metrics = server.metrics_text().await;
    let count = metric_value(&metrics, "refinery_timer_lateness_seconds_count").unwrap_or(0.0);
    assert!(count >= 3.0, "{metrics}");

    // Another account sees none of it.
    let (_, other) = server.account("someone-else").await;
    let (status, body) = server
        .request("GET", "/v1/projects/clock/timers", Some(&other), None)
        .await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn no_slot_fires_twice_across_kill9_and_the_latest_missed_slot_fires_once() {
    let mut server = Server::start().await;
    let (_, key) = server.account("crashy").await;
    server
        .deploy_ok(&key, &manifest("clock", "v1", "rate(2 seconds)"))
        .await;
    server
        .await_fires(&key, "clock", "every2", 2, Duration::from_secs(20))
        .await;
    // Killed at some moment within a period (maybe while a slot fires).
    tokio::time::sleep(Duration::from_millis(
        now_ms().rem_euclid(PERIOD_MS) as u64 / 2,
    ))
    .await;
    server.kill9();
    let killed_at = now_ms();
    // Down for more than two periods (two or three slots are missed), restarted 100 ms
    // after a slot: the most recent missed slot is the one just before the restart.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    let phase = now_ms().rem_euclid(PERIOD_MS);
    tokio::time::sleep(Duration::from_millis(
        (PERIOD_MS - phase + 100).rem_euclid(PERIOD_MS) as u64,
    ))
    .await;
    let data_dir = server.data_dir.clone();
    let restarting_at = now_ms();
    let restarted = Server::start_in(&data_dir, &[]).await;
    let started_in = now_ms() - restarting_at;
    let before = restarted.timer_fires(&key, "clock", "every2").await;
    let last_before_kill = before
        .iter()
        .filter(|f| f.slot_ms <= killed_at)
        .map(|f| f.slot_ms)
        .max()
        .expect("fired before the kill");

    // Then it goes on: two further fires on time.
    restarted
        .await_fires(
            &key,
            "clock",
            "every2",
            before.len() + 2,
            Duration::from_secs(20),
        )
        .await;
    let fires = assert_each_slot_once(&restarted, &key, "clock").await;
    let since: Vec<&Fire> = fires
        .iter()
        .filter(|f| f.slot_ms > last_before_kill)
        .collect();
    // The slots missed while down but the most recent never fire; from then on each slot
    // fires once.
    assert!(
        since[0].slot_ms >= restarting_at - PERIOD_MS,
        "an earlier missed slot fired: {fires:?} (killed at {killed_at}, restarted at {restarting_at})"
    );
    for pair in since.windows(2) {
        assert_eq!(pair[1].slot_ms - pair[0].slot_ms, PERIOD_MS, "{fires:?}");
    }
    let metrics = restarted.metrics_text().await;
    let catch_up = metric_value(&metrics, "refinery_timer_catch_up_fires_total");
    if started_in < PERIOD_MS - 200 {
        // The restart was quick enough to begin within the period after the missed slot.
        let missed: Vec<&&Fire> = since
            .iter()
            .filter(|f| f.slot_ms <= restarting_at)
            .collect();
        assert_eq!(
            missed.len(),
            1,
            "exactly one of the slots missed while down fires (the most recent): {fires:?}"
        );
        assert_eq!(catch_up, Some(1.0), "{metrics}");
    } else {
        assert!(catch_up.unwrap_or(0.0) <= 1.0, "{metrics}");
    }
    // Every run the timer started ends (a run killed mid-step resumes).
    for f in &fires {
        let run = restarted
            .await_run(&key, &f.run_id, Duration::from_secs(60))
            .await;
        assert_eq!(run["status"], "succeeded", "{run}");
    }
    drop(server);
}

#[tokio::test]
async fn redeploys_and_rollbacks_keep_the_slots_and_a_removed_timer_stops() {
    let server = Server::start().await;
    let (_, key) = server.account("deployer").await;
    server
        .deploy_ok(&key, &manifest("clock", "v1", "rate(2 seconds)"))
        .await;
    server
        .await_fires(&key, "clock", "every2", 2, Duration::from_secs(20))
        .await;
    // A redeploy (new input) and a rollback, each taking effect mid-period.
    server
        .deploy_ok(&key, &manifest("clock", "v2", "rate(2 seconds)"))
        .await;
    let n = server.timer_fires(&key, "clock", "every2").await.len();
    server
        .await_fires(&key, "clock", "every2", n + 2, Duration::from_secs(20))
        .await;
    let (status, body) = server.rollback(&key, "clock", 1).await;
    assert_eq!(status, 200, "{body}");
    let n = server.timer_fires(&key, "clock", "every2").await.len();
    server
        .await_fires(&key, "clock", "every2", n + 2, Duration::from_secs(20))
        .await;

    let fires = assert_each_slot_once(&server, &key, "clock").await;
    for pair in fires.windows(2) {
        assert_eq!(
            pair[1].slot_ms - pair[0].slot_ms,
            PERIOD_MS,
            "across the redeploy and the rollback every slot fires once, none skipped: {fires:?}"
        );
    }
    // Each run has the input of the deployment live when its slot fired.
    let mut tags = Vec::new();
    for f in &fires {
        let run = server
            .await_run(&key, &f.run_id, Duration::from_secs(60))
            .await;
        let tag = steps_named(&run, "tick")[0]["input"]["tag"].clone();
        let expected = if run["deployment"] == 2 { "v2" } else { "v1" };
        assert_eq!(tag, expected, "{run}");
        tags.push(tag);
    }
    assert!(tags.contains(&json!("v2")) && tags.last() == Some(&json!("v1")));

    // A deployment without the timer: it stops firing, and the API lists no timers.
    let without = r#"
name = "clock"

[[blocks]]
name = "tick"
language = "python"
code = """
def main(x, backpack):
    return x
"""
"#;
    server.deploy_ok(&key, without).await;
    let stopped = server
        .run_ids_started_at(&key, "clock", "every2")
        .await
        .len();
    assert_eq!(server.timers(&key, "clock").await["timers"], json!([]));
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    let runs = server.run_ids_started_at(&key, "clock", "every2").await;
    assert!(
        runs.len() <= stopped + 1,
        "the removed timer went on firing: {} runs, {stopped} when it was removed",
        runs.len()
    );
}
