//! Metering: one usage row per execution, written in the execution's own transaction,
//! and running totals per (account, month, project, block) for reports, caps and bills.

use refinery_billing::Period;
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, SqliteConnection};

use crate::{Store, StoreError};

/// What the invocation service knows about an execution beyond its record: the inputs to
/// metering that the record does not carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecutionUsage {
    /// The block's configured memory.
    pub memory_mb: u32,
    /// When the execution ended (its result was in hand), ms since the epoch, UTC.
    pub ended_at_ms: i64,
    /// Bytes of the response body the block produced (its output as serialised JSON,
    /// before any truncation of the stored record).
    pub egress_bytes: u64,
}

/// Usage of one block in one month (or the sum over several blocks).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, FromRow)]
pub struct BlockUsage {
    pub project: String,
    pub block: String,
    pub requests: i64,
    pub billed_ms: i64,
    pub init_billed_ms: i64,
    pub mb_ms: i64,
    pub init_mb_ms: i64,
    pub egress_bytes: i64,
}

impl BlockUsage {
    fn add(&mut self, other: &BlockUsage) {
        self.requests += other.requests;
        self.billed_ms += other.billed_ms;
        self.init_billed_ms += other.init_billed_ms;
        self.mb_ms += other.mb_ms;
        self.init_mb_ms += other.init_mb_ms;
        self.egress_bytes += other.egress_bytes;
    }
}

/// The first month at or after `period` that is not closed: where usage ending in
/// `period` is counted.
pub(crate) async fn open_period_from(
    conn: &mut SqliteConnection,
    mut period: Period,
) -> Result<Period, StoreError> {
    loop {
        let closed: Option<(i64,)> =
            sqlx::query_as("SELECT closed_at_ms FROM closed_periods WHERE period = ?")
                .bind(period.to_string())
                .fetch_optional(&mut *conn)
                .await
                .map_err(StoreError::db("reading closed months"))?;
        if closed.is_none() {
            return Ok(period);
        }
        period = period.next();
    }
}

/// The month's totals of one account, per project and block.
pub(crate) async fn block_totals(
    conn: &mut SqliteConnection,
    account_id: &str,
    period: Period,
) -> Result<Vec<BlockUsage>, StoreError> {
    sqlx::query_as::<_, BlockUsage>(
        "SELECT project, block, requests, billed_ms, init_billed_ms, mb_ms, init_mb_ms, \
         egress_bytes FROM usage_totals WHERE account_id = ? AND period = ? \
         ORDER BY project, block",
    )
    .bind(account_id)
    .bind(period.to_string())
    .fetch_all(&mut *conn)
    .await
    .map_err(StoreError::db(format!(
        "reading the usage of account {account_id} in {period}"
    )))
}

/// Sum of a list of block usages (project and block left empty).
pub fn sum(blocks: &[BlockUsage]) -> BlockUsage {
    let mut total = BlockUsage::default();
    for b in blocks {
        total.add(b);
    }
    total
}

impl Store {
    /// Account `account_id`'s usage in `period`, per project and block.
    pub async fn usage_by_block(
        &self,
        account_id: &str,
        period: Period,
    ) -> Result<Vec<BlockUsage>, StoreError> {
        let mut conn = self.conn("reading usage").await?;
        block_totals(&mut conn, account_id, period).await
    }

    /// Account `account_id`'s usage in `period` per UTC day (by when each execution
    /// ended), oldest first: (`YYYY-MM-DD`, requests, MB·ms run and init).
    pub async fn usage_by_day(
        &self,
        account_id: &str,
        period: Period,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        sqlx::query_as(
            "SELECT date(ended_at_ms / 1000, 'unixepoch') AS day, COUNT(*), \
             COALESCE(SUM(mb_ms + init_mb_ms), 0) FROM usage \
             WHERE account_id = ? AND period = ? GROUP BY day ORDER BY day",
        )
        .bind(account_id)
        .bind(period.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db("reading usage per day"))
    }

    /// Account `account_id`'s usage in `period` summed straight from the per-execution
    /// rows (not the running totals): for audits and reconciliation.
    pub async fn usage_from_rows(
        &self,
        account_id: &str,
        period: Period,
    ) -> Result<BlockUsage, StoreError> {
        let (requests, billed_ms, init_billed_ms, mb_ms, init_mb_ms, egress_bytes): (
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
        ) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(billed_ms), 0), COALESCE(SUM(init_billed_ms), 0), \
             COALESCE(SUM(mb_ms), 0), COALESCE(SUM(init_mb_ms), 0), \
             COALESCE(SUM(egress_bytes), 0) FROM usage WHERE account_id = ? AND period = ?",
        )
        .bind(account_id)
        .bind(period.to_string())
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::db(format!(
            "summing the usage rows of account {account_id} in {period}"
        )))?;
        Ok(BlockUsage {
            project: String::new(),
            block: String::new(),
            requests,
            billed_ms,
            init_billed_ms,
            mb_ms,
            init_mb_ms,
            egress_bytes,
        })
    }

    /// The billing period usage ending at `now_ms` falls in: the month of `now_ms`, or the
    /// first month after it that is still open.
    pub async fn open_period(&self, now_ms: i64) -> Result<Period, StoreError> {
        let mut conn = self.conn("reading closed months").await?;
        open_period_from(&mut conn, Period::containing(now_ms)).await
    }

    /// The period execution `execution_id` of the account was billed in, if metered.
    pub async fn execution_period(
        &self,
        account_id: &str,
        execution_id: &str,
    ) -> Result<Option<Period>, StoreError> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT period FROM usage WHERE account_id = ? AND execution_id = ?")
                .bind(account_id)
                .bind(execution_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(StoreError::db(format!(
                    "reading the usage of {execution_id}"
                )))?;
        row.map(|(p,)| {
            p.parse()
                .map_err(|e| StoreError::Corrupt(format!("usage period: {e}")))
        })
        .transpose()
    }

    pub(crate) async fn conn(
        &self,
        what: &str,
    ) -> Result<sqlx::pool::PoolConnection<sqlx::Sqlite>, StoreError> {
        self.pool.acquire().await.map_err(StoreError::db(what))
    }
}
