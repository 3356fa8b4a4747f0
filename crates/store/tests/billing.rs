//! Metering and bills against a real SQLite file: usage written with its execution,
//! idempotent and immutable closes, the next-month rule, spending caps.

use std::str::FromStr;

use refinery_billing::{Decimal, Period, PriceList};
use refinery_domain::{ExecutionRecord, ExecutionStatus};
use refinery_store::{AccountBilling, ExecutionUsage, Store};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn now() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn d(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn execution(
    account_id: &str,
    id: &str,
    duration_ms: f64,
    init_ms: Option<f64>,
) -> ExecutionRecord {
    ExecutionRecord {
        id: id.to_string(),
        account_id: account_id.to_string(),
        project: "shop".to_string(),
        deployment: 1,
        block: "b".to_string(),
        instance_id: "i-1".to_string(),
        cold: init_ms.is_some(),
        started_at_ms: now(),
        duration_ms,
        init_ms,
        status: ExecutionStatus::Ok,
        input: "null".to_string(),
        input_truncated: false,
        output: Some("\"hi\"".to_string()),
        output_truncated: false,
        error: None,
        logs: String::new(),
        logs_truncated: false,
    }
}

/// $1 per request, nothing free, everything else at no cost.
fn dollar_per_request() -> PriceList {
    let mut free_tier = PriceList::default().free_tier;
    free_tier.requests = 0;
    PriceList {
        per_million_requests: d("1000000"),
        per_gb_second: d("0"),
        per_gb_egress: d("0"),
        per_gb_month_storage: d("0"),
        free_tier,
        ..PriceList::default()
    }
}

fn usage(memory_mb: u32, ended_at_ms: i64, egress_bytes: u64) -> ExecutionUsage {
    ExecutionUsage {
        memory_mb,
        ended_at_ms,
        egress_bytes,
    }
}

#[tokio::test]
async fn usage_is_written_with_its_execution_exactly_once() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let a = store.create_account("alpha", "ha", "pa").await?;
    let t = now();
    let period = Period::containing(t);

    // 12.5 ms run + 3.25 ms init at 256 MB, 1 ms granularity: 13 ms and 4 ms billed.
    store
        .insert_execution(&execution(&a.id, "e1", 12.5, Some(3.25)), &usage(256, t, 4))
        .await?;
    // The same id again fails, and leaves no second usage row.
    assert!(store
        .insert_execution(&execution(&a.id, "e1", 12.5, None), &usage(256, t, 4))
        .await
        .is_err());
    // An unknown account: neither execution nor usage.
    assert!(store
        .insert_execution(
            &execution("acct_missing", "e2", 1.0, None),
            &usage(128, t, 1)
        )
        .await
        .is_err());

    let rows = store.usage_from_rows(&a.id, period).await?;
    assert_eq!(rows.requests, 1);
    assert_eq!(rows.billed_ms, 13);
    assert_eq!(rows.init_billed_ms, 4);
    assert_eq!(rows.mb_ms, 13 * 256);
    assert_eq!(rows.init_mb_ms, 4 * 256);
    assert_eq!(rows.egress_bytes, 4);
    let blocks = store.usage_by_block(&a.id, period).await?;
    assert_eq!(blocks.len(), 1);
    assert_eq!(
        (blocks[0].project.as_str(), blocks[0].block.as_str()),
        ("shop", "b")
    );
    assert_eq!(blocks[0].requests, rows.requests);
    assert_eq!(blocks[0].mb_ms, rows.mb_ms);
    assert_eq!(store.execution_period(&a.id, "e1").await?, Some(period));

    // A coarser granularity applies to executions metered after it is set.
    let prices = PriceList {
        granularity_ms: 100,
        ..PriceList::default()
    };
    store.set_price_list(&prices).await?;
    store
        .insert_execution(&execution(&a.id, "e3", 100.001, None), &usage(128, t, 0))
        .await?;
    let rows = store.usage_from_rows(&a.id, period).await?;
    assert_eq!(rows.billed_ms, 13 + 200);
    assert_eq!(rows.mb_ms, 13 * 256 + 200 * 128);
    Ok(())
}

#[tokio::test]
async fn closing_is_idempotent_immutable_and_later_usage_goes_to_the_next_month() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let a = store.create_account("alpha", "ha", "pa").await?;
    let b = store.create_account("beta", "hb", "pb").await?;
    // $1 per request, nothing free, no markup for alpha, 37.5% for beta.
    store.set_price_list(&dollar_per_request()).await?;
    store
        .set_account_billing(
            &a.id,
            &AccountBilling {
                markup_percent: Some(d("0")),
                ..AccountBilling::default()
            },
        )
        .await?;
    store
        .set_account_billing(
            &b.id,
            &AccountBilling {
                markup_percent: Some(d("37.5")),
                minimum_fee: Some(d("5")),
                ..AccountBilling::default()
            },
        )
        .await?;
    let t = now();
    let period = Period::containing(t);
    for i in 0..3 {
        store
            .insert_execution(
                &execution(&a.id, &format!("a{i}"), 1.0, None),
                &usage(128, t, 0),
            )
            .await?;
    }
    store
        .insert_execution(&execution(&b.id, "b0", 1.0, None), &usage(128, t, 0))
        .await?;

    // A month that has not begun, or has not ended, cannot be closed.
    assert!(store.close_period(period.next(), t + 1).await?.is_err());
    let early = store.close_period(period, t + 1).await?;
    let message = early.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("has not ended yet"), "{message}");
    assert_eq!(
        store.period_closed_at(period).await?,
        None,
        "nothing written"
    );

    // Closed once it is over (here: at its first instant after).
    let closed_at = period.end_ms();
    let first = store
        .close_period(period, closed_at)
        .await?
        .map_err(|e| e.to_string())?;
    assert_eq!(first.len(), 2);
    let bill_a = first
        .iter()
        .find(|r| r.account_id == a.id)
        .ok_or("no bill for a")?;
    assert_eq!(bill_a.status, "closed");
    assert_eq!(bill_a.bill.subtotal.to_string(), "3.00");
    assert_eq!(bill_a.bill.total.to_string(), "3.00");
    let bill_b = first
        .iter()
        .find(|r| r.account_id == b.id)
        .ok_or("no bill for b")?;
    // 1.00 + 37.5% = 1.375 → markup 0.38, spent 1.38; minimum 5 → adjustment 3.62.
    assert_eq!(bill_b.bill.markup.to_string(), "0.38");
    assert_eq!(bill_b.bill.minimum_fee_adjustment.to_string(), "3.62");
    assert_eq!(bill_b.bill.total.to_string(), "5.00");

    // Usage ending in the closed month now counts in the next one.
    store
        .insert_execution(&execution(&a.id, "late", 1.0, None), &usage(128, t, 0))
        .await?;
    assert_eq!(
        store.execution_period(&a.id, "late").await?,
        Some(period.next())
    );
    assert_eq!(store.open_period(t).await?, period.next());

    // Closing again returns the same bills, untouched by the later execution.
    let second = store
        .close_period(period, closed_at + 10_000)
        .await?
        .map_err(|e| e.to_string())?;
    assert_eq!(first, second);
    assert_eq!(store.bills(Some(&a.id), None).await?, vec![bill_a.clone()]);
    assert_eq!(store.bill(&a, period, t + 99).await?, bill_a.clone());
    assert_eq!(store.period_closed_at(period).await?, Some(closed_at));

    // The database itself refuses to change a bill.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", store.path().display())).await?;
    let update = sqlx::query("UPDATE bills SET total = '0.00'")
        .execute(&pool)
        .await;
    let message = update.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("immutable"), "{message}");
    pool.close().await;

    // The next month is open: its draft holds the late execution.
    let next = store.bill(&a, period.next(), t + 2).await?;
    assert_eq!(next.status, "open");
    assert_eq!(next.usage.requests, 1);
    Ok(())
}

#[tokio::test]
async fn months_due_for_closing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let t = now();
    let period = Period::containing(t);
    let later = period.next().start_ms() + 1;
    // No account existed before this month ended: nothing to close yet.
    assert_eq!(store.periods_due(t).await?, vec![]);
    let a = store.create_account("alpha", "ha", "pa").await?;
    store
        .insert_execution(&execution(&a.id, "e", 1.0, None), &usage(128, t, 0))
        .await?;
    assert_eq!(
        store.periods_due(t).await?,
        vec![],
        "the current month is not due"
    );
    assert_eq!(store.periods_due(later).await?, vec![period]);
    store
        .close_period(period, later)
        .await?
        .map_err(|e| e.to_string())?;
    assert_eq!(store.periods_due(later).await?, vec![]);
    Ok(())
}

#[tokio::test]
async fn spending_against_the_cap() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let a = store.create_account("alpha", "ha", "pa").await?;
    assert_eq!(
        store.spending(&a, now()).await?,
        None,
        "no cap, nothing to check"
    );
    store.set_price_list(&dollar_per_request()).await?;
    store
        .set_account_billing(
            &a.id,
            &AccountBilling {
                markup_percent: Some(d("50")),
                spending_cap: Some(d("3")),
                ..AccountBilling::default()
            },
        )
        .await?;
    let t = now();
    store
        .insert_execution(&execution(&a.id, "e1", 1.0, None), &usage(128, t, 0))
        .await?;
    let s = store.spending(&a, t).await?.ok_or("cap set")?;
    assert_eq!(s.spent.to_string(), "1.50");
    assert!(!s.reached);
    store
        .insert_execution(&execution(&a.id, "e2", 1.0, None), &usage(128, t, 0))
        .await?;
    let s = store.spending(&a, t).await?.ok_or("cap set")?;
    assert_eq!(s.spent.to_string(), "3.00");
    assert!(s.reached, "1.00 + 50% twice reaches 3.00");
    assert_eq!(s.currency, "USD");
    Ok(())
}

#[tokio::test]
async fn storage_is_code_bytes_held_pro_rata_over_the_month() -> TestResult {
    use refinery_domain::{BlockSpec, Language};
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let a = store.create_account("alpha", "ha", "pa").await?;
    let block = |name: &str, code: &str| BlockSpec {
        files: Default::default(),
        binary_files: Default::default(),
        shared: Vec::new(),
        function: "main".into(),
        secret_env: Default::default(),
        name: name.to_string(),
        language: Language::Python,
        source_name: format!("{name}.py"),
        code: code.to_string(),
        memory_mb: 128,
        timeout_s: 10,
        max_concurrency: 1,
        keep_alive_s: None,
        min_warm: 0,
        tmp_mb: 16,
        env: Default::default(),
        network: false,
        deps_layer: None,
    };
    // 1000 bytes of code ("é" is two bytes: bytes count, not characters).
    let code = format!("{}{}", "é".repeat(100), "x".repeat(800));
    assert_eq!(code.len(), 1000);
    let deployment = store
        .create_deployment(&a.id, "p", "# m", &[block("b", &code)])
        .await?;
    let period = Period::containing(deployment.created_at_ms);
    let held_ms = 3_600_000;
    let bill = store
        .bill(&a, period, deployment.created_at_ms + held_ms)
        .await?;
    // 1000 B × 1 h / (10⁹ B/GB × the month's length).
    let expected = Decimal::from(1000) * Decimal::from(held_ms)
        / Decimal::from(1_000_000_000)
        / Decimal::from(period.length_ms());
    assert_eq!(bill.usage.storage_gb_months, expected);
    assert!(bill.usage.storage_gb_months > Decimal::ZERO);
    Ok(())
}
