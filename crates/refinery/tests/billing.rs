//! Metering and monthly bills over HTTP against a real server: usage reconciling with
//! executions under concurrent load, a restart between usage and the close, idempotent
//! close, the next-month rule, spending caps (402), tenancy, and the CLI. A month can be
//! closed only once it is over (409 before): the tests close the current month as the
//! server would at its end, in the store of a stopped server, then start it again.
//!
//! Expected amounts are computed here by hand from the executions the server recorded,
//! with integer arithmetic and exact decimals (no floats past the measured durations).

mod common;

use std::str::FromStr;

use common::Server;
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{json, Value};

/// `pad` returns a string of 10 + input characters: its output JSON is 12 + input bytes.
const PROJECT: &str = r#"
name = "metered"

[[blocks]]
name = "pad"
language = "python"
memory_mb = 256
max_concurrency = 100
code = """
def main(block_input, backpack):
    return "x" * (10 + (block_input or 0))
"""
"#;

fn d(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// A decimal in a reply (written as a string).
fn dv(value: &Value) -> Decimal {
    d(value
        .as_str()
        .unwrap_or_else(|| panic!("not a decimal string: {value}")))
}

fn cents(value: Decimal) -> Decimal {
    let mut r = value.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
    r.rescale(2);
    r
}

fn this_month() -> String {
    chrono::Utc::now().format("%Y-%m").to_string()
}

fn next_month(period: &str) -> String {
    let (y, m) = period.split_once('-').expect("YYYY-MM");
    let (y, m): (i32, u32) = (y.parse().expect("year"), m.parse().expect("month"));
    if m == 12 {
        format!("{:04}-01", y + 1)
    } else {
        format!("{y:04}-{:02}", m + 1)
    }
}

/// Billed ms of a measured duration: nearest microsecond, then up to `granularity_ms`.
fn billed_ms(duration_ms: f64, granularity_ms: i64) -> i64 {
    let micros = (duration_ms * 1000.0).round() as i64;
    let granule = granularity_ms * 1000;
    (micros + granule - 1) / granule * granularity_ms
}

/// Closes `period` as the automatic closer will once the month is over: stops `server`,
/// closes the month in its store at the month's end, and starts a server on the same data
/// dir again. The caller keeps `server` alive (it owns the data dir).
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

async fn put(server: &Server, path: &str, key: &str, body: Value) -> Value {
    let (status, reply) = server.request("PUT", path, Some(key), Some(body)).await;
    assert_eq!(status, 200, "PUT {path}: {reply}");
    reply
}

async fn get(server: &Server, path: &str, key: &str) -> Value {
    let (status, reply) = server.request("GET", path, Some(key), None).await;
    assert_eq!(status, 200, "GET {path}: {reply}");
    reply
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_usage_reconciles_to_the_cent_across_a_restart_and_an_idempotent_close() {
    const N: i64 = 40;
    const GRANULARITY_MS: i64 = 10;
    let mut server = Server::start().await;
    let op = server.operator_key.clone();
    let (account_id, key) = server.account("acme").await;
    put(
        &server,
        "/v1/pricing",
        &op,
        json!({
            "currency": "EUR",
            "granularity_ms": GRANULARITY_MS,
            "per_gb_second": "10",
            "per_million_requests": "1000",
            "per_gb_egress": "100000",
            "free_tier": { "requests": 10 },
        }),
    )
    .await;
    put(
        &server,
        "/v1/accounts/acme/billing",
        &op,
        json!({ "markup_percent": "37.5" }),
    )
    .await;
    server.deploy_ok(&key, PROJECT).await;

    // N invocations at once.
    let calls = (0..N).map(|i| server.invoke(&key, "metered", "pad", json!(i)));
    let replies = futures::future::join_all(calls).await;
    for (status, reply) in &replies {
        assert_eq!(*status, 200, "{reply}");
        assert_eq!(reply["status"], "ok", "{reply}");
    }

    // Expected usage, from the executions as the server recorded them.
    let executions = get(&server, "/v1/projects/metered/executions?limit=1000", &key).await;
    let executions = executions["executions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(executions.len() as i64, N);
    let mut mb_ms = 0i64;
    for e in &executions {
        let duration = e["duration_ms"].as_f64().expect("duration_ms");
        mb_ms += billed_ms(duration, GRANULARITY_MS) * 256;
    }
    let egress: i64 = (0..N).map(|i| 12 + i).sum(); // "xxx…" with its quotes
    let gb_seconds = Decimal::from(mb_ms) / Decimal::from(1024 * 1000);
    let check_usage = |usage: &Value| {
        assert_eq!(usage["totals"]["requests"], N, "{usage}");
        assert_eq!(dv(&usage["totals"]["gb_seconds"]), gb_seconds, "{usage}");
        assert_eq!(usage["totals"]["egress_bytes"], egress, "{usage}");
        let blocks = usage["blocks"].as_array().expect("blocks");
        assert_eq!(blocks.len(), 1, "{usage}");
        assert_eq!(blocks[0]["project"], "metered");
        assert_eq!(blocks[0]["block"], "pad");
        assert_eq!(blocks[0]["requests"], N);
        assert_eq!(blocks[0]["billed_ms"], mb_ms / 256);
    };
    let period = this_month();
    let usage = get(&server, "/v1/usage", &key).await;
    assert_eq!(usage["period"], period);
    assert_eq!(usage["status"], "open");
    check_usage(&usage);

    // Restart on the same data dir: nothing metered is lost. While the server is down,
    // the per-execution usage rows themselves sum to the same as the executions.
    server.stop();
    {
        let store = refinery_store::Store::open(&server.data_dir)
            .await
            .expect("open store");
        let rows = store
            .usage_from_rows(&account_id, period.parse().expect("period"))
            .await
            .expect("usage rows");
        assert_eq!(rows.requests, N);
        assert_eq!(rows.mb_ms, mb_ms);
        assert_eq!(rows.egress_bytes, egress);
        store.close().await;
    }
    let mut server = Server::start_in(&server.data_dir.clone(), &[]).await;
    let usage = get(&server, &format!("/v1/usage?month={period}"), &key).await;
    check_usage(&usage);

    // The month is not over: it cannot be closed yet, and nothing is stored.
    let (status, early) = server
        .request(
            "POST",
            &format!("/v1/bills/{period}/close"),
            Some(&op),
            None,
        )
        .await;
    assert_eq!(status, 409, "{early}");
    assert_eq!(early["error"]["code"], "conflict", "{early}");
    let message = early["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("has not ended yet"), "{message}");
    let from = format!("{}-01 00:00 UTC", next_month(&period));
    assert!(
        message.contains(&from),
        "says when it can be closed: {message}"
    );
    assert_eq!(get(&server, "/v1/bills", &op).await["bills"], json!([]));
    assert_eq!(get(&server, "/v1/usage", &key).await["period"], period);

    // Closed at its end: the bill, computed by hand.
    let server = close_as_if_over(&mut server, &period).await;
    let (status, closed) = server
        .request(
            "POST",
            &format!("/v1/bills/{period}/close"),
            Some(&op),
            None,
        )
        .await;
    assert_eq!(status, 200, "{closed}");
    let bills = closed["bills"].as_array().cloned().unwrap_or_default();
    assert_eq!(bills.len(), 1, "{closed}");
    let bill = &bills[0];
    assert_eq!(bill["account"], "acme");
    assert_eq!(bill["status"], "closed");
    let compute = cents(gb_seconds * d("10"));
    assert!(compute > Decimal::ZERO, "every 10 ms granule costs 0.025");
    let requests = cents(Decimal::from(N - 10) * d("1000") / Decimal::from(1_000_000));
    let egress_amount = cents(Decimal::from(egress) / Decimal::from(1_000_000_000) * d("100000"));
    let subtotal = compute + requests + egress_amount;
    let markup = cents(subtotal * d("0.375"));
    let lines = bill["bill"]["lines"].as_array().expect("lines");
    let amount =
        |item: &str| dv(&lines.iter().find(|l| l["item"] == item).expect("line")["amount"]);
    assert_eq!(amount("compute"), compute, "{bill}");
    assert_eq!(amount("requests"), requests, "{bill}");
    assert_eq!(requests, d("0.03"));
    assert_eq!(amount("egress"), egress_amount, "{bill}");
    assert_eq!(
        egress_amount,
        d("0.13"),
        "1 260 bytes × 100 000 EUR/GB = 0.126 → 0.13"
    );
    assert_eq!(dv(&bill["bill"]["subtotal"]), subtotal);
    assert_eq!(dv(&bill["bill"]["markup"]), markup);
    assert_eq!(dv(&bill["bill"]["total"]), subtotal + markup);
    assert_eq!(bill["bill"]["currency"], "EUR");

    // Closing again: the same bills.
    let (status, again) = server
        .request(
            "POST",
            &format!("/v1/bills/{period}/close"),
            Some(&op),
            None,
        )
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["bills"], closed["bills"]);

    // An execution after the close falls into the next month; the bill does not move.
    server.invoke_ok(&key, "metered", "pad", json!(0)).await;
    let shown = get(&server, &format!("/v1/bills/{period}"), &key).await;
    assert_eq!(shown, bills[0]);
    let open = get(&server, "/v1/usage", &key).await;
    assert_eq!(open["period"], next_month(&period));
    assert_eq!(open["totals"]["requests"], 1);
    let listed = get(&server, "/v1/bills", &key).await;
    assert_eq!(listed["bills"], closed["bills"]);
}

/// $1 per request, everything else free: caps are easy to reach and count.
fn dollar_per_request() -> Value {
    json!({
        "currency": "USD",
        "per_gb_second": "0",
        "per_million_requests": "1000000",
        "per_gb_egress": "0",
        "free_tier": { "requests": 0 },
        "default_markup_percent": "0",
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reached_spending_cap_refuses_invocations_with_402_until_raised() {
    let server = Server::start().await;
    let op = server.operator_key.clone();
    let (_, key) = server.account("trial").await;
    put(&server, "/v1/pricing", &op, dollar_per_request()).await;
    server.deploy_ok(&key, PROJECT).await;

    // The account sets its own cap; it may not touch its markup.
    let terms = put(
        &server,
        "/v1/accounts/trial/billing",
        &key,
        json!({ "spending_cap": "2" }),
    )
    .await;
    assert_eq!(terms["spending_cap"], "2", "{terms}");
    let (status, body) = server
        .request(
            "PUT",
            "/v1/accounts/trial/billing",
            Some(&key),
            Some(json!({ "markup_percent": 0 })),
        )
        .await;
    assert_eq!(status, 403, "{body}");

    let (status, body) = server
        .request(
            "PUT",
            "/v1/accounts/trial/billing",
            Some(&key),
            Some(json!({ "spending_cap": "-1" })),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("negative"), "{body}");

    server.invoke_ok(&key, "metered", "pad", json!(1)).await;
    server.invoke_ok(&key, "metered", "pad", json!(2)).await;
    // 2 × $1 reached the $2 cap: refused, nothing run, nothing recorded.
    let (status, body) = server.invoke(&key, "metered", "pad", json!(3)).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["error"]["code"], "spending_cap_reached", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("spending cap of 2 USD"), "{message}");
    assert!(message.contains("--spending-cap"), "{message}");
    let executions = get(&server, "/v1/projects/metered/executions", &key).await;
    assert_eq!(executions["executions"].as_array().map(Vec::len), Some(2));
    let billing = get(&server, "/v1/accounts/trial/billing", &key).await;
    assert_eq!(billing["spending"]["reached"], true, "{billing}");
    assert_eq!(billing["spending"]["spent"], "2.00", "{billing}");

    // Raised by the operator: one more fits, then refused again.
    put(
        &server,
        "/v1/accounts/trial/billing",
        &op,
        json!({ "spending_cap": 3 }),
    )
    .await;
    server.invoke_ok(&key, "metered", "pad", json!(4)).await;
    let (status, _) = server.invoke(&key, "metered", "pad", json!(5)).await;
    assert_eq!(status, 402);
    // Removed: no limit.
    put(
        &server,
        "/v1/accounts/trial/billing",
        &key,
        json!({ "spending_cap": null }),
    )
    .await;
    server.invoke_ok(&key, "metered", "pad", json!(6)).await;
    let usage = get(&server, "/v1/usage", &key).await;
    assert_eq!(usage["totals"]["requests"], 4, "{usage}");
    assert_eq!(usage["cost"]["total"], "4.00", "{usage}");
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_see_only_their_own_usage_and_bills_and_the_cli_drives_it_all() {
    let mut server = Server::start().await;
    let op = server.operator_key.clone();
    let (alpha_id, alpha) = server.account("alpha").await;
    let (_, beta) = server.account("beta").await;
    server.deploy_ok(&alpha, PROJECT).await;
    server.invoke_ok(&alpha, "metered", "pad", json!(1)).await;
    server.invoke_ok(&alpha, "metered", "pad", json!(2)).await;
    let period = this_month();

    // The operator's price list from a TOML file, through the CLI.
    let dir = tempfile::tempdir().expect("tempdir");
    let prices = dir.path().join("prices.toml");
    std::fs::write(
        &prices,
        "currency = \"USD\"\nper_gb_second = \"0\"\nper_million_requests = 1000000\nper_gb_egress = 0\ndefault_markup_percent = 20\n[free_tier]\nrequests = 0\n",
    )
    .expect("write prices");
    let (code, out, err) = server.cli(
        &op,
        &["pricing", "set", prices.to_str().expect("path"), "--json"],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = server.cli(&beta, &["pricing", "show", "--json"], None);
    assert_eq!(code, 0, "{out}{err}");
    let shown: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(shown["price_list"]["per_million_requests"], "1000000");
    // A bad price list names the field and the file.
    std::fs::write(
        &prices,
        "currency = \"dollars\"\nper_gb_second = 0\nper_million_requests = 0\nper_gb_egress = 0\n",
    )
    .expect("write");
    let (code, _, err) = server.cli(
        &op,
        &["pricing", "set", prices.to_str().expect("path")],
        None,
    );
    assert_ne!(code, 0);
    assert!(err.contains("currency"), "{err}");
    // Only the operator sets prices.
    let (status, _) = server
        .request(
            "PUT",
            "/v1/pricing",
            Some(&beta),
            Some(dollar_per_request()),
        )
        .await;
    assert_eq!(status, 403);

    // Markup set by the operator through the CLI.
    let (code, out, err) = server.cli(
        &op,
        &[
            "accounts",
            "set-billing",
            "alpha",
            "--markup-percent",
            "37.5",
            "--minimum-fee",
            "5",
            "--json",
        ],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    let terms: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(terms["markup_percent"], "37.5");

    // Beta sees nothing of alpha's: 404 as for anything that does not exist.
    for path in [
        format!("/v1/usage?account=alpha&month={period}"),
        format!("/v1/usage?account={alpha_id}"),
        format!("/v1/bills/{period}?account=alpha"),
        "/v1/bills?account=alpha".to_string(),
        "/v1/accounts/alpha/billing".to_string(),
    ] {
        let (status, body) = server.request("GET", &path, Some(&beta), None).await;
        assert_eq!(status, 404, "GET {path}: {body}");
        assert!(!body.to_string().contains("metered"), "{body}");
    }
    let (status, _) = server
        .request(
            "PUT",
            "/v1/accounts/alpha/billing",
            Some(&beta),
            Some(json!({ "spending_cap": 0 })),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = server
        .request(
            "POST",
            &format!("/v1/bills/{period}/close"),
            Some(&beta),
            None,
        )
        .await;
    assert_eq!(status, 403);
    let own = get(&server, "/v1/usage", &beta).await;
    assert_eq!(own["account"], "beta");
    assert_eq!(own["totals"]["requests"], 0);
    assert!(!own.to_string().contains("metered"), "{own}");

    // Alpha's usage through the CLI: 2 requests, $2 + 37.5% = 2.75.
    let (code, out, err) = server.cli(&alpha, &["usage", "--json"], None);
    assert_eq!(code, 0, "{out}{err}");
    let usage: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(usage["totals"]["requests"], 2, "{usage}");
    assert_eq!(usage["cost"]["spent"], "2.75", "{usage}");
    let (code, out, _) = server.cli(&alpha, &["usage"], None);
    assert_eq!(code, 0);
    assert!(out.contains("metered/pad  2 requests"), "{out}");

    // The operator sees every account.
    let all = get(&server, "/v1/usage", &op).await;
    let accounts: Vec<&str> = all["usage"]
        .as_array()
        .expect("usage list")
        .iter()
        .filter_map(|u| u["account"].as_str())
        .collect();
    assert_eq!(accounts, ["alpha", "beta"]);

    // Months that have not begun, or are not months, cannot be closed.
    let (status, body) = server
        .request("POST", "/v1/bills/2999-01/close", Some(&op), None)
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = server
        .request("POST", "/v1/bills/2026-13/close", Some(&op), None)
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("YYYY-MM"), "{body}");

    // The current month cannot be closed yet (CLI); once over, closing (operator, CLI)
    // twice gives the same bills; bills and CSV.
    let (code, out, err) = server.cli(&op, &["bills", "close", &period], None);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("has not ended yet") && err.contains("HTTP 409"),
        "{err}"
    );
    let server = close_as_if_over(&mut server, &period).await;
    let (code, first, err) = server.cli(&op, &["bills", "close", &period, "--json"], None);
    assert_eq!(code, 0, "{first}{err}");
    let (code, second, err) = server.cli(&op, &["bills", "close", &period, "--json"], None);
    assert_eq!(code, 0, "{second}{err}");
    let first: Value = serde_json::from_str(&first).expect("json");
    let second: Value = serde_json::from_str(&second).expect("json");
    assert_eq!(first["bills"], second["bills"]);
    let (code, out, err) = server.cli(&alpha, &["bills", "show", &period, "--json"], None);
    assert_eq!(code, 0, "{out}{err}");
    let bill: Value = serde_json::from_str(&out).expect("json");
    // 2.00 + 0.75 markup = 2.75; minimum 5 → adjustment 2.25, total 5.00.
    assert_eq!(bill["bill"]["markup"], "0.75", "{bill}");
    assert_eq!(bill["bill"]["minimum_fee_adjustment"], "2.25", "{bill}");
    assert_eq!(bill["bill"]["total"], "5.00", "{bill}");
    let (code, out, _) = server.cli(&alpha, &["bills", "show", &period], None);
    assert_eq!(code, 0);
    assert!(out.contains("total     5.00 USD"), "{out}");
    let (code, csv, err) = server.cli(&op, &["bills", "list", "--month", &period, "--csv"], None);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows[0].starts_with("period,account_id,account,"), "{csv}");
    assert!(
        rows.iter()
            .any(|r| r.contains(",alpha,closed,USD,") && r.ends_with(",5.00")),
        "{csv}"
    );
    assert!(
        rows.iter()
            .any(|r| r.contains(",beta,closed,USD,") && r.ends_with(",0.00")),
        "{csv}"
    );
    let (code, csv, _) = server.cli(&alpha, &["bills", "list", "--csv"], None);
    assert_eq!(code, 0);
    assert_eq!(csv.lines().count(), 2, "alpha's own bill only: {csv}");
    assert!(!csv.contains("beta"), "{csv}");
    let (code, _, err) = server.cli(
        &beta,
        &["bills", "show", &period, "--account", "alpha"],
        None,
    );
    assert_ne!(code, 0);
    assert!(err.contains("HTTP 404"), "{err}");
}

/// `GET /v1/usage` has the month's usage per UTC day (for the console's chart).
#[tokio::test]
async fn usage_is_given_per_day_too() {
    let server = Server::start().await;
    let (_, key) = server.account("daily").await;
    server
        .deploy_ok(
            &key,
            "name = \"d\"\n[[blocks]]\nname = \"b\"\nlanguage = \"python\"\ncode = \"def main(x, b):\\n    return x\\n\"\n",
        )
        .await;
    let day = || chrono::Utc::now().format("%Y-%m-%d").to_string();
    let before = day();
    for i in 0..3 {
        server.invoke_ok(&key, "d", "b", serde_json::json!(i)).await;
    }
    let after = day();
    let mut days = serde_json::Value::Null;
    for _ in 0..40 {
        days = get(&server, "/v1/usage", &key).await["days"].clone();
        if days[0]["requests"] == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(days.as_array().map(Vec::len), Some(1), "{days}");
    assert!(
        days[0]["day"] == before.as_str() || days[0]["day"] == after.as_str(),
        "{days}"
    );
    assert_eq!(days[0]["requests"], 3, "{days}");
}
