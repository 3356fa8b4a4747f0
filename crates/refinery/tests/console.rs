//! The web console (`/console/`): its headers and the graph route it reads, over HTTP; and
//! the console itself in a real browser — headless Chromium (Debian's `chromium`) driven by
//! Playwright for Python (`tests/console/console_test.py`) against the real server.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::Value;

const SHOP: &str = include_str!("console/shop.toml");

/// Account B's project: 32 blocks (a tree of `then`s under an `if`/`else`, closed by a
/// merge), to see a graph of 30+ nodes laid out without overlaps.
fn other_project() -> String {
    let mut manifest = String::from("name = \"hidden-plans\"\n");
    for i in 0..32 {
        manifest.push_str(&format!(
            "\n[[blocks]]\nname = \"n{i}\"\nlanguage = \"python\"\ncode = \"\"\"\ndef main(event, backpack):\n    return 1\n\"\"\"\n"
        ));
    }
    let edge = |from: &str, to: &str, kind: &str| {
        format!("\n[[transitions]]\nfrom = {from}\nto = \"{to}\"\ntype = \"{kind}\"\n")
    };
    manifest.push_str(&edge("\"n0\"", "n1", "if"));
    manifest.push_str("expression = \"output == 1\"\n");
    manifest.push_str(&edge("\"n0\"", "n2", "else"));
    for i in 1..15 {
        for child in [2 * i + 1, 2 * i + 2] {
            manifest.push_str(&edge(&format!("\"n{i}\""), &format!("n{child}"), "then"));
        }
    }
    manifest.push_str(&edge("[\"n29\", \"n30\"]", "n31", "merge"));
    manifest
}

#[tokio::test]
async fn console_pages_carry_a_strict_csp_and_api_answers_are_never_cached() {
    let server = Server::start().await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let root = http
        .get(format!("{}/", server.url))
        .send()
        .await
        .expect("GET /");
    assert!(
        root.status().is_redirection(),
        "GET / redirects to the console"
    );
    assert_eq!(root.headers()["location"], "/console/");

    for (path, content_type) in [
        ("/console/", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/api.js", "text/javascript"),
        ("/console/graph.js", "text/javascript"),
        ("/console/console.css", "text/css"),
    ] {
        let response = http
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers();
        let csp = headers["content-security-policy"].to_str().expect("csp");
        assert!(csp.contains("default-src 'self'"), "{path}: {csp}");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert!(
            headers["content-type"]
                .to_str()
                .expect("type")
                .starts_with(content_type),
            "{path}: {:?}",
            headers["content-type"]
        );
        let body = response.text().await.expect("body");
        if path == "/console/" {
            assert!(
                !body.contains("<script>") && !body.contains(" style="),
                "the page has no inline script or style: {body}"
            );
        }
    }
    let missing = http
        .get(format!("{}/console/nope.js", server.url))
        .send()
        .await
        .expect("GET");
    assert_eq!(missing.status(), 404);

    let (_, key) = server.account("acme").await;
    let answer = http
        .get(format!("{}/v1/projects", server.url))
        .bearer_auth(&key)
        .send()
        .await
        .expect("GET");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["cache-control"], "no-store");
    assert_eq!(answer.headers()["x-content-type-options"], "nosniff");
    let refused = http
        .get(format!("{}/v1/projects", server.url))
        .send()
        .await
        .expect("GET");
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["cache-control"], "no-store");
}

#[tokio::test]
async fn the_graph_route_returns_a_deployments_nodes_and_transitions_without_env_values() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    let (_, other) = server.account("globex").await;
    server.deploy_ok(&key, SHOP).await;

    let (status, graph) = server
        .request("GET", "/v1/projects/shop/graph", Some(&key), None)
        .await;
    assert_eq!(status, 200, "{graph}");
    assert_eq!(graph["deployment"], 1);
    assert_eq!(graph["live"], true);
    let kinds: Vec<(String, String)> = graph["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["name"].as_str().expect("name").to_string(),
                n["kind"].as_str().expect("kind").to_string(),
            )
        })
        .collect();
    for (name, kind) in [
        ("validate", "block"),
        ("place-order", "endpoint"),
        ("reply", "response"),
        ("placed", "topic"),
    ] {
        assert!(
            kinds.contains(&(name.to_string(), kind.to_string())),
            "{name} is a {kind}: {kinds:?}"
        );
    }
    let validate = graph["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == "validate")
        .expect("validate");
    assert_eq!(validate["settings"]["language"], "python");
    assert!(validate["code"]
        .as_str()
        .expect("code")
        .contains("validating"));
    assert!(validate["env"].get("API_TOKEN").is_some());
    assert!(
        !graph.to_string().contains("s3cr3t-value-never-shown"),
        "an env value was returned: {graph}"
    );
    let edge = graph["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .find(|e| e["type"] == "if")
        .expect("the if edge");
    assert_eq!(edge["from"], serde_json::json!(["validate"]));
    assert_eq!(edge["to"], "charge");
    assert_eq!(edge["expression"], "output.total > 0");
    assert_eq!(graph["edges"].as_array().expect("edges").len(), 9);

    // A named deployment; one that does not exist; another account's project.
    let (status, first) = server
        .request(
            "GET",
            "/v1/projects/shop/graph?deployment=1",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{first}");
    let (status, body) = server
        .request(
            "GET",
            "/v1/projects/shop/graph?deployment=7",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .expect("message")
        .contains("no deployment 7"));
    let (status, body) = server
        .request("GET", "/v1/projects/shop/graph", Some(&other), None)
        .await;
    assert_eq!(
        status, 404,
        "another account's project is not found: {body}"
    );
}

/// The repository's root (`target/` and `docs/` are there).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

/// A Python with Playwright: `REFINERY_PLAYWRIGHT_PYTHON`, or the venv scripts/test makes
/// (`target/playwright-venv`), made here if it is missing.
fn playwright_python() -> PathBuf {
    if let Ok(python) = std::env::var("REFINERY_PLAYWRIGHT_PYTHON") {
        return PathBuf::from(python);
    }
    let venv = workspace_root().join("target/playwright-venv");
    let python = venv.join("bin/python");
    let has_playwright = |python: &Path| {
        Command::new(python)
            .args(["-c", "import playwright.sync_api"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_playwright(&python) {
        return python;
    }
    let made = Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "playwright"])
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        made && has_playwright(&python),
        "the console test needs Playwright for Python and could not install it into {}: \
         run scripts/test (it installs it), or run `/usr/bin/python3 -m venv {0} && {0}/bin/pip \
         install playwright` (Debian: apt-get install python3-venv first), or point \
         REFINERY_PLAYWRIGHT_PYTHON at a python that has it",
        venv.display()
    );
    python
}

fn chromium() -> PathBuf {
    let path = PathBuf::from(
        std::env::var("REFINERY_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
    );
    assert!(
        path.exists(),
        "the console test runs the console in headless Chromium, and {} does not exist: \
         install Debian's package (`apt-get install chromium`; scripts/test does it), or set \
         REFINERY_CHROMIUM to a Chromium binary",
        path.display()
    );
    path
}

#[tokio::test]
async fn the_console_in_a_real_browser() {
    let chromium = chromium();
    let python = playwright_python();
    let server = Server::start().await;
    let (_, key_a) = server.account("acme").await;
    let (_, key_b) = server.account("globex").await;
    // Deployment 1 differs from 2 in one block's code, for the comparison.
    server
        .deploy_ok(
            &key_a,
            &SHOP.replace("\"refused\": True", "\"declined\": True"),
        )
        .await;
    server.deploy_ok(&key_a, SHOP).await;
    server.deploy_ok(&key_b, &other_project()).await;

    let started = Instant::now();
    let keys = Keys {
        a: &key_a,
        b: &key_b,
    };
    let stdout = browse(&python, &chromium, &server, &keys, "all").await;
    for check in [
        "a wrong key is refused",
        "account A signs in and sees its projects",
        "the graph has the deployed service's nodes and edges",
        "a node opens with the keyboard: settings, code, env masked",
        "invalid JSON input is refused before sending",
        "a run starts and its steps light up until it completes",
        "a step's input, output and logs",
        "an invocation's execution and logs",
        "usage shows the invocations just made",
        "the graph is readable at phone width",
        "two deployments compared; a rollback",
        "sign out clears everything; account B never sees A's projects; its 32-node graph",
        "the operator changes a quota, creates and disables an account",
        "a spending cap set by the operator: A's invocation is refused with 402, explained",
        "refusals are explained from the API's error JSON",
        "no CSP violations or script errors",
    ] {
        assert!(
            stdout.contains(&format!("CHECK {check}: ok")),
            "check `{check}` did not pass:\n{stdout}"
        );
    }

    // What the operator did in the browser, seen through the API.
    let (status, quota) = server
        .request(
            "GET",
            "/v1/accounts/acme/quota",
            Some(&server.operator_key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{quota}");
    assert_eq!(quota["quota"]["instances"], 42, "{quota}");
    assert_eq!(quota["overrides"]["instances"], 42, "{quota}");
    assert_eq!(
        quota["overrides"]["memory_mb"],
        Value::Null,
        "fields left empty stay default: {quota}"
    );
    let (_, accounts) = server
        .request("GET", "/v1/accounts", Some(&server.operator_key), None)
        .await;
    assert!(
        accounts["accounts"]
            .as_array()
            .expect("accounts")
            .iter()
            .any(|a| a["name"] == "initech" && a["state"] == "disabled"),
        "the account the operator created, then disabled: {accounts}"
    );
    // The rollback it made, and the run it started, through the API.
    let (status, projects) = server
        .request("GET", "/v1/projects", Some(&key_a), None)
        .await;
    assert_eq!(status, 200, "{projects}");
    assert_eq!(projects["projects"][0]["live_deployment"], 1, "{projects}");
    let (status, runs) = server
        .request("GET", "/v1/projects/shop/runs", Some(&key_a), None)
        .await;
    assert_eq!(status, 200, "{runs}");
    assert!(
        runs["runs"]
            .as_array()
            .expect("runs")
            .iter()
            .any(|r| r["status"] == "succeeded" && r["start"] == "validate"),
        "{runs}"
    );

    // The month closed (as the closer does once it is over): its bill in the console.
    let (_, usage) = server.request("GET", "/v1/usage", Some(&key_a), None).await;
    let period = usage["period"].as_str().expect("period").to_string();
    let mut server = server;
    let server = close_as_if_over(&mut server, &period).await;
    let stdout = browse(&python, &chromium, &server, &keys, "bills").await;
    assert!(
        stdout.contains("CHECK a closed bill with its lines and its CSV: ok"),
        "{stdout}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the browser test took {:?}",
        started.elapsed()
    );
}

struct Keys<'a> {
    a: &'a str,
    b: &'a str,
}

/// Runs the Playwright script (`phase`: `all`, or `bills`) against `server`; returns its
/// output, having asserted that it passed.
async fn browse(
    python: &Path,
    chromium: &Path,
    server: &Server,
    keys: &Keys<'_>,
    phase: &str,
) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/console_test.py");
    let mut command = Command::new(python);
    command
        .arg(&script)
        .env("REFINERY_URL", &server.url)
        .env("REFINERY_OPERATOR_KEY", &server.operator_key)
        .env("REFINERY_KEY_A", keys.a)
        .env("REFINERY_KEY_B", keys.b)
        .env("REFINERY_ACCOUNT_A", "acme")
        .env("REFINERY_OTHER_PROJECT", "hidden-plans")
        .env("REFINERY_CHROMIUM", chromium)
        .env("REFINERY_CONSOLE_PHASE", phase);
    // `REFINERY_CONSOLE_SCREENSHOTS=1` refreshes the README's screenshots (docs/console/).
    if std::env::var_os("REFINERY_CONSOLE_SCREENSHOTS").is_some() {
        command.env(
            "REFINERY_SCREENSHOTS",
            workspace_root().join("docs/console"),
        );
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run the Playwright script");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser test ({phase}) failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

/// Closes `period` as the automatic closer will once the month is over (as the billing
/// tests do): stops `server`, closes the month in its store at the month's end, and starts
/// a server on the same data dir again. The caller keeps `server` alive (it owns the dir).
async fn close_as_if_over(server: &mut Server, period: &str) -> Server {
    server.stop();
    let period: refinery_billing::Period = period.parse().expect("period");
    let store = refinery_store::Store::open(&server.data_dir)
        .await
        .expect("open store");
    store
        .close_period(period, period.end_ms())
        .await
        .expect("store")
        .expect("a month is closed at its end");
    store.close().await;
    Server::start_in(&server.data_dir.clone(), &[]).await
}
