//! Service runs through the `refinery` CLI (issue 12): `run` (with and without `--wait`),
//! `runs PROJECT`, `runs show RUN_ID` (the step tree), `runs cancel RUN_ID`, each against
//! the real server. The tests that need the services engine are ignored until it is
//! merged; the argument checks run now.

mod common;

use std::time::Duration;

use common::{eventually, Server};
use serde_json::{json, Value};

/// A three-block chain of shell blocks: validate → charge → notify (`then`), with an `if`
/// to `refund` that fires when the input's total is negative (a block that fails).
const CHAIN: &str = r#"name = "orders"

[[blocks]]
name = "validate"
language = "shell"
code = "cat"

[[blocks]]
name = "charge"
language = "shell"
code = "cat"

[[blocks]]
name = "notify"
language = "shell"
code = "cat"

[[blocks]]
name = "refund"
language = "shell"
code = "echo 'refunds are closed' >&2; exit 1"

[[transitions]]
from = "validate"
to = "charge"
type = "then"

[[transitions]]
from = "charge"
to = "notify"
type = "then"

[[transitions]]
from = "validate"
to = "refund"
type = "if"
expression = "output.total < 0"
"#;

/// A fan-out of the input list to `work`, each item's output fanned in to `collect`.
const FAN: &str = r#"name = "fan"

[[blocks]]
name = "split"
language = "shell"
code = "cat"

[[blocks]]
name = "work"
language = "shell"
code = "cat"

[[blocks]]
name = "collect"
language = "shell"
code = "cat"

[[transitions]]
from = "split"
to = "work"
type = "fan-out"

[[transitions]]
from = "work"
to = "collect"
type = "fan-in"
"#;

/// A chain whose first block takes a while: for cancelling and for `--wait-s`.
const SLOW: &str = r#"name = "slow"

[[blocks]]
name = "nap"
language = "shell"
code = "sleep 3; cat"

[[blocks]]
name = "after"
language = "shell"
code = "cat"

[[transitions]]
from = "nap"
to = "after"
type = "then"
"#;

fn parse(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// `runs show RUN_ID --json` until the run ended; the run.
async fn ended_run(server: &Server, key: &str, run_id: &str) -> Value {
    let mut run = Value::Null;
    let ended = eventually(Duration::from_secs(60), || {
        let (code, stdout, stderr) = server.cli(key, &["runs", "show", run_id, "--json"], None);
        assert_eq!(code, 0, "{stderr}");
        run = parse(&stdout);
        run["status"] != "running"
    })
    .await;
    assert!(ended, "the run did not end: {run}");
    run
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_run_arguments_are_refused_before_anything_starts() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;

    let (code, _, stderr) = server.cli(
        &key,
        &["run", "orders", "validate", "--input", "{bad"],
        None,
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("--input is not valid JSON: {bad; give JSON, `-` for stdin or @FILE"),
        "{stderr}"
    );
    let (code, _, stderr) = server.cli(
        &key,
        &["run", "orders", "validate", "--backpack", "[1,"],
        None,
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--backpack is not valid JSON"), "{stderr}");
    let (code, _, stderr) = server.cli(
        &key,
        &[
            "run",
            "orders",
            "validate",
            "--input",
            "@/nonexistent/in.json",
        ],
        None,
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("reading the input file /nonexistent/in.json"),
        "{stderr}"
    );

    // Usage errors (clap's exit code 2): no project, no run id, a limit out of range.
    for args in [
        &["runs"][..],
        &["runs", "show"],
        &["runs", "cancel"],
        &["runs", "orders", "--limit", "0"],
        &["run", "orders"],
    ] {
        let (code, _, stderr) = server.cli(&key, args, None);
        assert_eq!(code, 2, "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]

async fn run_wait_prints_the_tree_and_exits_with_the_outcome() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, CHAIN).await;

    let (code, stdout, stderr) = server.cli(
        &key,
        &[
            "run",
            "orders",
            "validate",
            "--input",
            r#"{"total": 5}"#,
            "--wait",
        ],
        None,
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("run_") && lines[0].contains("project orders"),
        "{stdout}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("STEP") && l.contains("TRANSITION")),
        "{stdout}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("validate ") && l.contains("start")),
        "{stdout}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("└─ charge ") && l.contains("then")),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("   └─ notify ")),
        "{stdout}"
    );
    assert!(stdout.contains("Status: succeeded after"), "{stdout}");
    assert!(stdout.contains("Steps:  3 (3 succeeded)"), "{stdout}");

    // The `if` fires the failing refund: a failed run, its error under the step, exit 1.
    let (code, stdout, stderr) = server.cli(
        &key,
        &[
            "run",
            "orders",
            "validate",
            "--input",
            r#"{"total": -5}"#,
            "--wait",
        ],
        None,
    );
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("refund") && stdout.contains("failed"),
        "{stdout}"
    );
    assert!(stdout.contains("Status: failed"), "{stdout}");

    // --json: the server's run, unchanged.
    let (code, stdout, stderr) = server.cli(
        &key,
        &[
            "run",
            "orders",
            "validate",
            "--input",
            r#"{"total": 1}"#,
            "--wait",
            "--json",
        ],
        None,
    );
    assert_eq!(code, 0, "{stderr}");
    let run = parse(&stdout);
    assert_eq!(run["status"], "succeeded", "{run}");
    let (status, fetched) = server
        .request(
            "GET",
            &format!("/v1/runs/{}", run["run_id"].as_str().expect("run_id")),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{fetched}");
    assert_eq!(run, fetched);
}

#[tokio::test(flavor = "multi_thread")]

async fn run_prints_the_id_and_runs_lists_and_shows_it() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, CHAIN).await;

    let (code, stdout, stderr) = server.cli(
        &key,
        &["run", "orders", "validate", "--input", r#"{"total": 5}"#],
        None,
    );
    assert_eq!(code, 0, "{stderr}");
    let run_id = stdout.trim().to_string();
    assert!(
        run_id.starts_with("run_") && !run_id.contains(' '),
        "{stdout}"
    );
    let run = ended_run(&server, &key, &run_id).await;
    assert_eq!(run["status"], "succeeded", "{run}");

    let (code, stdout, stderr) = server.cli(&key, &["runs", "orders"], None);
    assert_eq!(code, 0, "{stderr}");
    let header = stdout.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("RUN") && header.contains("STATUS") && header.contains("STEPS"),
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with(&run_id))
        .unwrap_or_else(|| panic!("{run_id} not listed: {stdout}"));
    assert!(
        row.contains("succeeded") && row.contains("validate"),
        "{row}"
    );
    // `runs list PROJECT` is the same listing.
    let (code, listed, _) = server.cli(&key, &["runs", "list", "orders", "--json"], None);
    assert_eq!(code, 0);
    assert_eq!(
        parse(&listed)["runs"][0]["run_id"],
        run_id.as_str(),
        "{listed}"
    );

    // Another account does not see it.
    let (_, other) = server.account("other").await;
    let (code, _, stderr) = server.cli(&other, &["runs", "show", &run_id], None);
    assert_eq!(code, 1);
    assert!(stderr.contains("[HTTP 404]"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]

async fn runs_show_caps_a_long_fan_out_and_all_shows_every_item() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, FAN).await;
    let items: Vec<u32> = (0..100).collect();
    let input = json!(items).to_string();

    let (code, stdout, stderr) = server.cli(
        &key,
        &["run", "fan", "split", "--input", &input, "--wait", "--json"],
        None,
    );
    assert_eq!(code, 0, "{stderr}");
    let run_id = parse(&stdout)["run_id"]
        .as_str()
        .expect("run_id")
        .to_string();

    let (code, stdout, stderr) = server.cli(&key, &["runs", "show", &run_id], None);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout.lines().filter(|l| l.contains("work [item")).count(),
        20,
        "{stdout}"
    );
    assert!(
        stdout.contains("… 80 more items: 80 succeeded (--all shows them)"),
        "{stdout}"
    );
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.contains("collect (joins 100 steps)"))
            .count(),
        1,
        "{stdout}"
    );
    assert!(stdout.contains("Steps:  102 (102 succeeded)"), "{stdout}");

    let (code, stdout, _) = server.cli(&key, &["runs", "show", &run_id, "--all"], None);
    assert_eq!(code, 0);
    assert_eq!(
        stdout.lines().filter(|l| l.contains("work [item")).count(),
        100,
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]

async fn wait_s_gives_up_with_3_and_cancel_stops_the_run() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, SLOW).await;

    let (code, stdout, stderr) = server.cli(&key, &["run", "slow", "nap", "--wait-s", "1"], None);
    assert_eq!(code, 3, "{stdout}\n{stderr}");
    assert!(stdout.contains("Status: running for"), "{stdout}");
    assert!(
        stderr.contains("is still running after --wait-s 1"),
        "{stderr}"
    );
    let run_id = stdout
        .split_whitespace()
        .next()
        .expect("the header names the run")
        .to_string();

    let (code, stdout, stderr) = server.cli(&key, &["runs", "cancel", &run_id], None);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("Cancelling {run_id}")) || stdout.contains("is cancelled"),
        "{stdout}"
    );
    let run = ended_run(&server, &key, &run_id).await;
    assert_eq!(run["status"], "cancelled", "{run}");
    let names: Vec<&str> = run["steps"]
        .as_array()
        .map(|s| s.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        !names.contains(&"after"),
        "nothing new starts after a cancel: {run}"
    );
    let (code, stdout, _) = server.cli(&key, &["runs", "show", &run_id], None);
    assert_eq!(code, 0);
    assert!(stdout.contains("Status: cancelled"), "{stdout}");
}
