//! Crash durability of service runs (issue 12, "Durable runs"): each test `kill -9`s the
//! real server at one of the moments the issue names — mid-step, mid fan-out, at random
//! moments (between a step's commit and its successors included), during a `?wait=` and
//! after a cancel — restarts it on the same data dir and checks that every run ended, every
//! expected step ran, and no transition fired twice (no fan-in or merge ran twice).
//!
//! A block may run more than once after a crash (at least once); a step stays one row.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{steps_named, Server};
use rand::Rng;
use serde_json::{json, Value};

/// How long a resumed run may take to end after the restart (generous: the machine is
/// shared; the tests never assert on speed).
const RUN_END: Duration = Duration::from_secs(60);

/// `first` → `slow` (sleeps `{sleep}` s) → `last`.
fn chain(project: &str, sleep: f64) -> String {
    format!(
        r#"
name = "{project}"

[[blocks]]
name = "first"
language = "python"
code = """
def main(x, backpack):
    backpack["first"] = x
    return x + 1
"""

[[blocks]]
name = "slow"
language = "python"
code = """
import time
def main(x, backpack):
    time.sleep({sleep})
    return x * 10
"""

[[blocks]]
name = "last"
language = "python"
code = """
def main(x, backpack):
    return {{"result": x, "first": backpack["first"]}}
"""

[[transitions]]
from = "first"
to = "slow"
type = "then"

[[transitions]]
from = "slow"
to = "last"
type = "then"
"#
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn rfc3339_ms(text: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("`{text}` is not an RFC 3339 time: {e}"))
        .timestamp_millis()
}

/// A fresh data dir (kept by the returned guard) and a server on it.
async fn server_in_fresh_dir() -> (tempfile::TempDir, Server) {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start_in(&root.path().join("data"), &[]).await;
    (root, server)
}

/// `kill -9` of the server, then a new one on the same data dir.
async fn crash_and_restart(server: &mut Server, data_dir: &Path) -> Server {
    server.kill9();
    Server::start_in(data_dir, &[]).await
}

/// Polls run `run_id` until `check` holds for it (up to 60 s); returns it.
async fn run_until(
    server: &Server,
    key: &str,
    run_id: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let run = server.get_run(key, run_id).await;
        if check(&run) {
            return run;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "run {run_id} never got to {what}: {run:#}"
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// Starts a run without waiting; returns its id.
async fn start_async(
    server: &Server,
    key: &str,
    project: &str,
    start: &str,
    input: Value,
) -> String {
    let (status, body) = server.start_run(key, project, start, input, None).await;
    assert_eq!(status, 202, "start a run: {body}");
    body["run_id"].as_str().expect("run_id").to_string()
}

fn step_status<'a>(run: &'a Value, name: &str) -> Vec<&'a str> {
    steps_named(run, name)
        .iter()
        .map(|s| s["status"].as_str().unwrap_or_default())
        .collect()
}

/// The executions of `block` in `project`.
async fn executions_of(server: &Server, key: &str, project: &str, block: &str) -> Vec<Value> {
    let (status, body) = server
        .request(
            "GET",
            &format!("/v1/projects/{project}/executions?block={block}&limit=1000"),
            Some(key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["executions"].as_array().cloned().unwrap_or_default()
}

/// A transition fires once: no two steps of `run` were started by the same parents through
/// the same transition to the same block for the same item. (A retry has its own parent:
/// the attempt before it.)
fn assert_no_transition_fired_twice(run: &Value) {
    let mut seen: HashMap<(Vec<String>, String, String, Option<i64>), String> = HashMap::new();
    for step in run["steps"].as_array().expect("steps") {
        let mut parents: Vec<String> = step["parents"]
            .as_array()
            .expect("parents")
            .iter()
            .filter_map(|p| p.as_str().map(str::to_string))
            .collect();
        parents.sort();
        let key = (
            parents,
            step["transition"].as_str().unwrap_or_default().to_string(),
            step["name"].as_str().unwrap_or_default().to_string(),
            step["item"].as_i64(),
        );
        let id = step["step_id"].as_str().unwrap_or_default().to_string();
        if let Some(other) = seen.insert(key.clone(), id.clone()) {
            panic!("steps {other} and {id} are the same transition fired twice ({key:?}): {run:#}");
        }
    }
}

/// 1. Mid-step: the server dies while `slow` runs. After the restart the run succeeds, the
/// killed step ran again as the same step (one row), and its recorded execution started
/// after the kill.
#[tokio::test(flavor = "multi_thread")]
async fn a_step_killed_mid_run_runs_again_as_the_same_step() {
    let (root, mut server) = server_in_fresh_dir().await;
    let data_dir = root.path().join("data");
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, &chain("chain", 1.5)).await;

    let run_id = start_async(&server, &key, "chain", "first", json!(4)).await;
    let before = run_until(&server, &key, &run_id, "`slow` running", |r| {
        step_status(r, "slow") == ["running"]
    })
    .await;
    let slow_id = steps_named(&before, "slow")[0]["step_id"].clone();
    let killed_at = now_ms();
    let server = crash_and_restart(&mut server, &data_dir).await;

    let run = server.await_run(&key, &run_id, RUN_END).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let names: Vec<&str> = run["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["first", "slow", "last"],
        "one row per step: {run:#}"
    );
    let slow = steps_named(&run, "slow")[0];
    assert_eq!(
        slow["step_id"], slow_id,
        "the killed step is the one that ran"
    );
    assert_eq!(slow["attempt"], 1, "a crash is not a retry");
    assert_eq!(slow["output"], 50);
    let last = steps_named(&run, "last")[0];
    assert_eq!(last["output"], json!({"result": 50, "first": 4}));
    assert_eq!(last["parents"], json!([slow_id]));

    // It ran again after the crash: its execution started after the kill (the one that was
    // killed never finished, so it left no record; at least once).
    let execution_id = slow["execution_id"].as_str().expect("execution id");
    let executions = executions_of(&server, &key, "chain", "slow").await;
    assert!(!executions.is_empty());
    let execution = executions
        .iter()
        .find(|e| e["execution_id"] == execution_id)
        .unwrap_or_else(|| panic!("{execution_id} is not listed: {executions:#?}"));
    assert_eq!(execution["status"], "ok");
    let started = rfc3339_ms(execution["started_at"].as_str().expect("started_at"));
    assert!(
        started >= killed_at,
        "the step's execution started at {started}, before the kill at {killed_at}: it did not run again"
    );
    assert_eq!(executions_of(&server, &key, "chain", "last").await.len(), 1);
}

const FAN_500: &str = r#"
name = "fan"

[[blocks]]
name = "split"
language = "python"
code = """
def main(n, backpack):
    return list(range(n))
"""

[[blocks]]
name = "square"
language = "python"
max_concurrency = 20
code = """
import time
def main(x, backpack):
    time.sleep(0.02)
    return x * x
"""

[[blocks]]
name = "total"
language = "python"
code = """
def main(squares, backpack):
    return {"count": len(squares), "sum": sum(squares)}
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

/// 2. Mid fan-out: the server dies with some of 500 items done. After the restart every
/// item ran (one step each) and the fan-in ran exactly once, with the 500 outputs in item
/// order.
#[tokio::test(flavor = "multi_thread")]
async fn a_fan_out_killed_half_way_fans_in_once_with_every_item() {
    const ITEMS: i64 = 500;
    let (root, mut server) = server_in_fresh_dir().await;
    let data_dir = root.path().join("data");
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, FAN_500).await;

    let run_id = start_async(&server, &key, "fan", "split", json!(ITEMS)).await;
    let before = run_until(&server, &key, &run_id, "50 items done", |r| {
        step_status(r, "square")
            .iter()
            .filter(|s| **s == "succeeded")
            .count()
            >= 50
    })
    .await;
    let server = crash_and_restart(&mut server, &data_dir).await;
    let done_before = step_status(&before, "square")
        .iter()
        .filter(|s| **s == "succeeded")
        .count();
    assert!(
        before["status"] == "running" && done_before < ITEMS as usize,
        "the fan-out had ended before the kill: nothing to resume: {}",
        before["status"]
    );
    assert!(steps_named(&before, "total").is_empty());

    let run = server.await_run(&key, &run_id, RUN_END).await;
    assert_eq!(run["status"], "succeeded", "{}", run["error"]);
    let squares = steps_named(&run, "square");
    assert_eq!(squares.len(), ITEMS as usize, "one step per item");
    let mut by_item: BTreeMap<i64, &Value> = BTreeMap::new();
    for s in &squares {
        assert_eq!(s["status"], "succeeded", "{s}");
        let item = s["item"].as_i64().expect("item");
        assert!(by_item.insert(item, s).is_none(), "item {item} twice");
    }
    assert_eq!(
        by_item.keys().copied().collect::<Vec<_>>(),
        (0..ITEMS).collect::<Vec<_>>()
    );

    let total = steps_named(&run, "total");
    assert_eq!(total.len(), 1, "the fan-in ran exactly once");
    let expected: Vec<i64> = (0..ITEMS).map(|x| x * x).collect();
    assert_eq!(
        total[0]["input"],
        json!(expected),
        "the outputs in item order"
    );
    assert_eq!(
        total[0]["output"],
        json!({"count": ITEMS, "sum": expected.iter().sum::<i64>()})
    );
    let item_ids: Vec<&Value> = by_item.values().map(|s| &s["step_id"]).collect();
    assert_eq!(
        total[0]["parents"]
            .as_array()
            .expect("parents")
            .iter()
            .collect::<Vec<_>>(),
        item_ids,
        "each item reached the fan-in once, in item order"
    );
    assert_eq!(executions_of(&server, &key, "fan", "total").await.len(), 1);
    assert_no_transition_fired_twice(&run);
}

/// `start` → (then) `left` and `right` → (merge) `combine` → (fan-out) `work` → (fan-in)
/// `sum`.
const MESH: &str = r#"
name = "mesh"

[[blocks]]
name = "start"
language = "python"
code = """
def main(n, backpack):
    backpack["n"] = n
    return n
"""

[[blocks]]
name = "left"
language = "python"
code = """
def main(n, backpack):
    return list(range(n))
"""

[[blocks]]
name = "right"
language = "python"
code = """
def main(n, backpack):
    return n * 1000
"""

[[blocks]]
name = "combine"
language = "python"
code = """
def main(parts, backpack):
    items, offset = parts
    return [offset + i for i in items]
"""

[[blocks]]
name = "work"
language = "python"
max_concurrency = 4
code = """
def main(x, backpack):
    return x * 2
"""

[[blocks]]
name = "sum"
language = "python"
code = """
def main(xs, backpack):
    return {"xs": xs, "sum": sum(xs), "n": backpack["n"]}
"""

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
to = "combine"
type = "merge"

[[transitions]]
from = "combine"
to = "work"
type = "fan-out"

[[transitions]]
from = "work"
to = "sum"
type = "fan-in"
"#;

/// Checks a run of MESH with input `n` after everything: it succeeded with the right
/// result, every step ran once (one fan-in, one merge), and no transition fired twice.
fn assert_mesh_run(run: &Value, n: i64) {
    assert_eq!(run["status"], "succeeded", "n = {n}: {run:#}");
    for step in run["steps"].as_array().expect("steps") {
        assert_eq!(step["status"], "succeeded", "{step}");
    }
    for name in ["start", "left", "right"] {
        assert_eq!(steps_named(run, name).len(), 1, "`{name}` once: {run:#}");
    }
    let combine = steps_named(run, "combine");
    assert_eq!(combine.len(), 1, "the merge ran exactly once: {run:#}");
    assert_eq!(combine[0]["transition"], "merge");
    let (left, right) = (steps_named(run, "left")[0], steps_named(run, "right")[0]);
    assert_eq!(
        combine[0]["parents"],
        json!([left["step_id"], right["step_id"]])
    );
    let offset = n * 1000;
    assert_eq!(
        combine[0]["input"],
        json!([(0..n).collect::<Vec<_>>(), offset]),
        "the merge's input in manifest order"
    );

    let work = steps_named(run, "work");
    assert_eq!(work.len(), n as usize, "one step per item: {run:#}");
    let mut by_item: BTreeMap<i64, &Value> = BTreeMap::new();
    for w in &work {
        let item = w["item"].as_i64().expect("item");
        assert!(
            by_item.insert(item, w).is_none(),
            "item {item} ran as two steps"
        );
    }
    assert_eq!(
        by_item.keys().copied().collect::<Vec<_>>(),
        (0..n).collect::<Vec<_>>()
    );

    let sum = steps_named(run, "sum");
    assert_eq!(sum.len(), 1, "the fan-in ran exactly once: {run:#}");
    assert_eq!(sum[0]["transition"], "fan-in");
    let xs: Vec<i64> = (0..n).map(|i| 2 * (offset + i)).collect();
    // Every succeeded item appears once in the fan-in's input, in item order.
    assert_eq!(sum[0]["input"], json!(xs));
    let item_ids: Vec<&Value> = by_item.values().map(|w| &w["step_id"]).collect();
    assert_eq!(
        sum[0]["parents"]
            .as_array()
            .expect("parents")
            .iter()
            .collect::<Vec<_>>(),
        item_ids
    );
    assert_eq!(
        sum[0]["output"],
        json!({"xs": xs, "sum": xs.iter().sum::<i64>(), "n": n})
    );
    assert_no_transition_fired_twice(run);
}

/// (steps created, runs ended) of the project `mesh` now.
async fn progress(server: &Server, key: &str) -> (i64, usize) {
    let (status, list) = server
        .request("GET", "/v1/projects/mesh/runs?limit=100", Some(key), None)
        .await;
    assert_eq!(status, 200, "{list}");
    let runs = list["runs"].as_array().cloned().unwrap_or_default();
    let steps = runs.iter().filter_map(|r| r["steps"].as_i64()).sum();
    let ended = runs.iter().filter(|r| r["status"] != "running").count();
    (steps, ended)
}

/// 3. At random moments: K kills, each 0–300 ms after a start, while runs of a service with
/// then + merge + fan-out/fan-in are in flight (a new run starts after each restart, so
/// some die while being created). In the end every run ended with the right result, and
/// the step trees hold: one merge and one fan-in per run, no transition fired twice, every
/// item once in the fan-in's input.
#[tokio::test(flavor = "multi_thread")]
async fn runs_survive_kills_at_random_moments() {
    const KILLS: usize = 12;
    let seed: u64 = std::env::var("REFINERY_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    // Printed so that a failure can be replayed: REFINERY_CRASH_SEED=<seed>.
    eprintln!("runs_survive_kills_at_random_moments: REFINERY_CRASH_SEED={seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);

    let (root, mut server) = server_in_fresh_dir().await;
    let data_dir = root.path().join("data");
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, MESH).await;

    let mut runs: Vec<(String, i64)> = Vec::new();
    for n in [12, 25, 40] {
        runs.push((
            start_async(&server, &key, "mesh", "start", json!(n)).await,
            n,
        ));
    }
    let mut kills = Vec::new();
    for k in 0..KILLS {
        let delay = rng.gen_range(0..=300);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        kills.push((delay, progress(&server, &key).await));
        server = crash_and_restart(&mut server, &data_dir).await;
        let n = 5 + k as i64;
        runs.push((
            start_async(&server, &key, "mesh", "start", json!(n)).await,
            n,
        ));
    }
    // (delay in ms, steps created, runs ended) at each kill.
    eprintln!("kills: {kills:?}");

    for (run_id, n) in &runs {
        let run = server.await_run(&key, run_id, RUN_END).await;
        assert_mesh_run(&run, *n);
    }
    let (status, list) = server
        .request("GET", "/v1/projects/mesh/runs?limit=100", Some(&key), None)
        .await;
    assert_eq!(status, 200, "{list}");
    let listed = list["runs"].as_array().expect("runs");
    assert_eq!(listed.len(), runs.len(), "no run lost or made up: {list:#}");
    assert!(
        listed.iter().all(|r| r["status"] == "succeeded"),
        "{list:#}"
    );
    // At least once: every step has an execution (more may exist after a crash).
    let sums = executions_of(&server, &key, "mesh", "sum").await;
    assert!(sums.len() >= runs.len(), "{} sum executions", sums.len());
}

/// 4. A run started with `?wait=` whose server dies: the waiting client loses its
/// connection, and after the restart the run completes (GET shows it).
#[tokio::test(flavor = "multi_thread")]
async fn a_run_waited_on_when_the_server_dies_completes_after_the_restart() {
    let (root, mut server) = server_in_fresh_dir().await;
    let data_dir = root.path().join("data");
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, &chain("waited", 1.5)).await;

    let url = format!("{}/v1/projects/waited/runs?wait=60", server.url);
    let waiting = tokio::spawn({
        let (http, key) = (server.http.clone(), key.clone());
        async move {
            http.post(url)
                .bearer_auth(key)
                .json(&json!({"start": "first", "input": 1}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    // The waiting client has no run id yet: find the run in the project's list.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let run_id = loop {
        let (status, list) = server
            .request("GET", "/v1/projects/waited/runs", Some(&key), None)
            .await;
        assert_eq!(status, 200, "{list}");
        if let Some(id) = list["runs"][0]["run_id"].as_str() {
            break id.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run never started"
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    };
    run_until(&server, &key, &run_id, "`slow` running", |r| {
        step_status(r, "slow") == ["running"]
    })
    .await;
    let server = crash_and_restart(&mut server, &data_dir).await;
    let answer = waiting.await.expect("join");
    assert!(
        answer.is_err(),
        "the waiting request was answered although the server died mid-run: {answer:?}"
    );

    let run = server.await_run(&key, &run_id, RUN_END).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(step_status(&run, "slow"), ["succeeded"]);
    assert_eq!(
        steps_named(&run, "last")[0]["output"],
        json!({"result": 20, "first": 1})
    );
    assert!(run["ended_at"].is_string());
}

/// 5. Cancel, then `kill -9` before the running step finished: after the restart the run
/// ends `cancelled`, and nothing after the cancelled step ran.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_run_killed_before_its_step_finished_ends_cancelled() {
    let (root, mut server) = server_in_fresh_dir().await;
    let data_dir = root.path().join("data");
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, &chain("cancel", 5.0)).await;

    let run_id = start_async(&server, &key, "cancel", "first", json!(1)).await;
    run_until(&server, &key, &run_id, "`slow` running", |r| {
        step_status(r, "slow") == ["running"]
    })
    .await;
    let (status, body) = server
        .request(
            "POST",
            &format!("/v1/runs/{run_id}/cancel"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        body["status"], "running",
        "the run waits for its running step: {body}"
    );
    let server = crash_and_restart(&mut server, &data_dir).await;

    let run = server.await_run(&key, &run_id, RUN_END).await;
    assert_eq!(run["status"], "cancelled", "{run:#}");
    assert!(run["ended_at"].is_string());
    assert_eq!(
        step_status(&run, "slow"),
        ["cancelled"],
        "the step was still running at the kill: {run:#}"
    );
    assert!(
        steps_named(&run, "last").is_empty(),
        "nothing new started: {run:#}"
    );
    assert!(run["error"].is_null(), "{run:#}");
    // It stays cancelled: the restarted engine runs none of it again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = server.get_run(&key, &run_id).await;
    assert_eq!(again["steps"], run["steps"]);
    assert!(executions_of(&server, &key, "cancel", "last")
        .await
        .is_empty());
}

/// 6. Publications to a topic: `kill -9` while runs publish (each publishing step's success
///    and its subscriber runs are one transaction), then every publishing run has ended with
///    exactly one run per subscriber — none lost, none twice.
#[tokio::test]
async fn publications_survive_a_kill_exactly_once() {
    let (root, mut server) = server_in_fresh_dir().await;
    let data = root.path().join("data");
    let (_, key) = server.account("pubcrash").await;
    let manifest = r#"
name = "pubs"

[[blocks]]
name = "emit"
language = "python"
code = """
import time
def main(n, backpack):
    time.sleep(0.05)
    return {"n": n}
"""

[[blocks]]
name = "sub_a"
language = "python"
code = "def main(e, b):\n    return e\n"

[[blocks]]
name = "sub_b"
language = "python"
code = "def main(e, b):\n    return e\n"

[[topics]]
name = "out"

[[transitions]]
from = "emit"
to = "out"
type = "then"

[[transitions]]
from = "out"
to = "sub_a"
type = "then"

[[transitions]]
from = "out"
to = "sub_b"
type = "then"
"#;
    server.deploy_ok(&key, manifest).await;
    const RUNS: i64 = 20;
    let mut emitters = Vec::new();
    for n in 0..RUNS {
        emitters.push(start_async(&server, &key, "pubs", "emit", json!(n)).await);
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let server = crash_and_restart(&mut server, &data).await;
    for id in &emitters {
        let run = server.await_run(&key, id, RUN_END).await;
        assert_eq!(run["status"], "succeeded", "{run}");
    }
    // Every subscriber run, once each: 2 per emitted number.
    let deadline = std::time::Instant::now() + RUN_END;
    let counts = loop {
        let (status, list) = server
            .request("GET", "/v1/projects/pubs/runs?limit=1000", Some(&key), None)
            .await;
        assert_eq!(status, 200, "{list}");
        let runs = list["runs"].as_array().cloned().unwrap_or_default();
        let subscribers: Vec<&Value> = runs.iter().filter(|r| r["start"] == "out").collect();
        let done = subscribers.iter().all(|r| r["status"] != "running");
        if done && subscribers.len() as i64 >= 2 * RUNS || std::time::Instant::now() > deadline {
            let mut counts: BTreeMap<(i64, String), usize> = BTreeMap::new();
            for r in subscribers {
                let run = server
                    .get_run(&key, r["run_id"].as_str().expect("id"))
                    .await;
                assert_eq!(run["status"], "succeeded", "{run}");
                let step = &run["steps"][0];
                let n = step["input"]["n"].as_i64().expect("n");
                *counts
                    .entry((n, step["name"].as_str().expect("name").to_string()))
                    .or_default() += 1;
            }
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for n in 0..RUNS {
        for sub in ["sub_a", "sub_b"] {
            assert_eq!(
                counts.get(&(n, sub.to_string())),
                Some(&1),
                "{sub} for {n}: {counts:?}"
            );
        }
    }
    assert_eq!(counts.len() as i64, 2 * RUNS, "{counts:?}");
}
