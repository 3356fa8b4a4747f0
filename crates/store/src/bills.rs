//! Monthly bills: rating an account's month (draft, to date) and closing a month into
//! immutable, stored bills. Closing is idempotent: a closed month returns the bills it
//! was closed with.

use refinery_billing::rate::storage_gb_months;
use refinery_billing::{cap_reached, rate, Bill, Decimal, Period, PriceList, Quantities, Terms};
use serde::{Deserialize, Serialize};
use sqlx::SqliteConnection;

use crate::pricing::{account_terms, current_price_list, stored_decimal};
use crate::usage::{block_totals, open_period_from, sum, BlockUsage};
use crate::{Account, Store, StoreError};

/// One account's bill for one month: closed (stored, immutable) or open (month to date).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BillRecord {
    pub account_id: String,
    pub account: String,
    pub period: Period,
    /// `closed` or `open`.
    pub status: String,
    /// When the month was closed (closed bills only).
    pub closed_at_ms: Option<i64>,
    /// Usage is counted up to this instant (the close, or now for an open month).
    pub as_of_ms: i64,
    /// What was metered, per project and block.
    pub blocks: Vec<BlockUsage>,
    pub usage: Quantities,
    pub terms: Terms,
    pub price_list: PriceList,
    pub bill: Bill,
}

/// Where an account stands against its spending cap this month.
#[derive(Debug, Clone, PartialEq)]
pub struct Spending {
    pub period: Period,
    pub cap: Decimal,
    /// Usage at cost plus markup so far.
    pub spent: Decimal,
    pub currency: String,
    pub reached: bool,
}

/// A month that cannot be closed yet: it has not ended (the current month, or a future
/// one). Closing it early would bill the rest of its usage in the following month.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{period} has not ended yet: it can be closed from {} UTC on (the server also closes it by itself then); closing it early would bill the rest of its usage in the following month",
    chrono::DateTime::from_timestamp_millis(period.end_ms()).map(|t| t.format("%Y-%m-%d %H:%M").to_string()).unwrap_or_default()
)]
pub struct NotEnded {
    pub period: Period,
}

/// Deployed code of `account_id` held during `period` up to `as_of_ms`, in GB-months:
/// each deployment's code bytes × the time it was kept within the month (from its
/// deploy to its pruning or its project's deletion) / the month's length.
async fn storage(
    conn: &mut SqliteConnection,
    account_id: &str,
    period: Period,
    as_of_ms: i64,
) -> Result<Decimal, StoreError> {
    let until = period.end_ms().min(as_of_ms);
    let rows: Vec<(i64, Option<i64>, i64)> = sqlx::query_as(
        "SELECT created_at_ms, removed_at_ms, code_bytes FROM deployment_storage \
         WHERE account_id = ? AND created_at_ms < ? \
         AND (removed_at_ms IS NULL OR removed_at_ms > ?)",
    )
    .bind(account_id)
    .bind(until)
    .bind(period.start_ms())
    .fetch_all(&mut *conn)
    .await
    .map_err(StoreError::db(format!(
        "measuring the code stored by account {account_id}"
    )))?;
    Ok(rows
        .into_iter()
        .map(|(created, removed, bytes)| {
            let end = removed.map_or(until, |r| r.min(until));
            storage_gb_months(
                bytes,
                (end - created.max(period.start_ms())).max(0),
                period.length_ms(),
            )
        })
        .sum())
}

/// Rates `account`'s `period` as of `as_of_ms` with the current price list.
async fn draft(
    conn: &mut SqliteConnection,
    account: &Account,
    period: Period,
    as_of_ms: i64,
) -> Result<BillRecord, StoreError> {
    let (prices, _) = current_price_list(conn).await?;
    let terms = account_terms(conn, &account.id).await?.terms(&prices);
    let blocks = block_totals(conn, &account.id, period).await?;
    let total = sum(&blocks);
    let usage = Quantities {
        requests: total.requests,
        mb_ms: total.mb_ms,
        init_mb_ms: total.init_mb_ms,
        egress_bytes: total.egress_bytes,
        storage_gb_months: storage(conn, &account.id, period, as_of_ms).await?,
    };
    let bill = rate(&prices, &usage, &terms);
    Ok(BillRecord {
        account_id: account.id.clone(),
        account: account.name.clone(),
        period,
        status: "open".into(),
        closed_at_ms: None,
        as_of_ms,
        blocks,
        usage,
        terms,
        price_list: prices,
        bill,
    })
}

async fn closed_at(conn: &mut SqliteConnection, period: Period) -> Result<Option<i64>, StoreError> {
    let row: Option<(i64,)> =
        sqlx::query_as("SELECT closed_at_ms FROM closed_periods WHERE period = ?")
            .bind(period.to_string())
            .fetch_optional(&mut *conn)
            .await
            .map_err(StoreError::db(format!(
                "reading whether {period} is closed"
            )))?;
    Ok(row.map(|(at,)| at))
}

async fn stored_bills(
    conn: &mut SqliteConnection,
    account_id: Option<&str>,
    period: Option<Period>,
) -> Result<Vec<BillRecord>, StoreError> {
    let period_text = period.map(|p| p.to_string());
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT body, total FROM bills WHERE (?1 IS NULL OR account_id = ?1) \
         AND (?2 IS NULL OR period = ?2) ORDER BY period, account_id",
    )
    .bind(account_id)
    .bind(period_text)
    .fetch_all(&mut *conn)
    .await
    .map_err(StoreError::db("reading bills"))?;
    rows.into_iter()
        .map(|(body, total)| {
            let record: BillRecord = serde_json::from_str(&body)
                .map_err(|e| StoreError::Corrupt(format!("stored bill: {e}")))?;
            // The indexed total column and the body must agree.
            if record.bill.total != stored_decimal("bill total", &total)? {
                return Err(StoreError::Corrupt(format!(
                    "bill of {} for {}: total column {total} differs from its body",
                    record.account_id, record.period
                )));
            }
            Ok(record)
        })
        .collect()
}

impl Store {
    /// Account `account`'s bill for `period`: the stored one if the month is closed,
    /// else a draft rated now (month to date).
    pub async fn bill(
        &self,
        account: &Account,
        period: Period,
        now_ms: i64,
    ) -> Result<BillRecord, StoreError> {
        let mut conn = self.conn("reading a bill").await?;
        if closed_at(&mut conn, period).await?.is_some() {
            if let Some(bill) = stored_bills(&mut conn, Some(&account.id), Some(period))
                .await?
                .pop()
            {
                return Ok(bill);
            }
        }
        draft(&mut conn, account, period, now_ms).await
    }

    /// Stored (closed) bills, of one account or all, of one month or all; oldest first.
    pub async fn bills(
        &self,
        account_id: Option<&str>,
        period: Option<Period>,
    ) -> Result<Vec<BillRecord>, StoreError> {
        let mut conn = self.conn("reading bills").await?;
        stored_bills(&mut conn, account_id, period).await
    }

    /// When `period` was closed, if it was.
    pub async fn period_closed_at(&self, period: Period) -> Result<Option<i64>, StoreError> {
        let mut conn = self.conn("reading closed months").await?;
        closed_at(&mut conn, period).await
    }

    /// Closes `period` at `now_ms`: one immutable bill per account that existed before
    /// the month's end. Idempotent: a closed month returns its stored bills unchanged.
    /// Usage that ends in a closed month is counted in the next open one.
    ///
    /// `Ok(Err(NotEnded))` for a month that is not over at `now_ms` (the current month or
    /// a later one) and not closed yet: nothing is written.
    pub async fn close_period(
        &self,
        period: Period,
        now_ms: i64,
    ) -> Result<Result<Vec<BillRecord>, NotEnded>, StoreError> {
        let what = || format!("closing {period}");
        // IMMEDIATE: no execution can be metered into this month between the totals
        // read below and the close being recorded.
        let mut tx = self.begin_write(what()).await?;
        if closed_at(&mut tx, period).await?.is_some() {
            let bills = stored_bills(&mut tx, None, Some(period)).await?;
            tx.commit().await.map_err(StoreError::db(what()))?;
            return Ok(Ok(bills));
        }
        if period.end_ms() > now_ms {
            tx.commit().await.map_err(StoreError::db(what()))?;
            return Ok(Err(NotEnded { period }));
        }
        let as_of = period.end_ms();
        let accounts: Vec<Account> = sqlx::query_as(&format!(
            "SELECT {} FROM accounts WHERE created_at_ms < ? ORDER BY id",
            crate::accounts::ACCOUNT_COLUMNS
        ))
        .bind(as_of)
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::db(what()))?;
        sqlx::query("INSERT INTO closed_periods (period, closed_at_ms) VALUES (?, ?)")
            .bind(period.to_string())
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(what()))?;
        let mut bills = Vec::with_capacity(accounts.len());
        for account in &accounts {
            let mut record = draft(&mut tx, account, period, as_of).await?;
            record.status = "closed".into();
            record.closed_at_ms = Some(now_ms);
            let body = serde_json::to_string(&record)
                .map_err(|e| StoreError::Corrupt(format!("serialising a bill: {e}")))?;
            sqlx::query(
                "INSERT INTO bills (account_id, period, currency, total, body, closed_at_ms) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(&account.id)
            .bind(period.to_string())
            .bind(&record.bill.currency)
            .bind(record.bill.total.to_string())
            .bind(body)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(what()))?;
            bills.push(record);
        }
        tx.commit().await.map_err(StoreError::db(what()))?;
        tracing::info!(%period, bills = bills.len(), "month closed");
        Ok(Ok(bills))
    }

    /// Months that should be closed automatically at `now_ms`: every month before the
    /// current one that is still open and has usage, plus the previous month if any
    /// account existed before it ended.
    pub async fn periods_due(&self, now_ms: i64) -> Result<Vec<Period>, StoreError> {
        let current = Period::containing(now_ms);
        let mut conn = self.conn("finding months to close").await?;
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT period FROM usage_totals \
             WHERE period < ? AND period NOT IN (SELECT period FROM closed_periods) ORDER BY period",
        )
        .bind(current.to_string())
        .fetch_all(&mut *conn)
        .await
        .map_err(StoreError::db("finding months to close"))?;
        let mut due = rows
            .into_iter()
            .map(|(p,)| {
                p.parse::<Period>()
                    .map_err(|e| StoreError::Corrupt(format!("usage period: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let previous = current.previous();
        if !due.contains(&previous) && closed_at(&mut conn, previous).await?.is_none() {
            let (older,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM accounts WHERE created_at_ms < ?")
                    .bind(previous.end_ms())
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(StoreError::db("finding months to close"))?;
            if older > 0 {
                due.push(previous);
            }
        }
        due.sort();
        Ok(due)
    }

    /// Where `account` stands against its spending cap in the open month at `now_ms`;
    /// `None` when it has no cap (the common case: one indexed read).
    pub async fn spending(
        &self,
        account: &Account,
        now_ms: i64,
    ) -> Result<Option<Spending>, StoreError> {
        let mut conn = self.conn("checking the spending cap").await?;
        let Some(cap) = account_terms(&mut conn, &account.id).await?.spending_cap else {
            return Ok(None);
        };
        let period = open_period_from(&mut conn, Period::containing(now_ms)).await?;
        let record = draft(&mut conn, account, period, now_ms).await?;
        Ok(Some(Spending {
            period,
            cap,
            spent: record.bill.spent,
            currency: record.bill.currency.clone(),
            reached: cap_reached(&record.bill, cap),
        }))
    }
}
