//! Execution records: one row per invocation, written once, read by its account.
//!
//! Listing returns **full** records (input, output, error and logs included); payloads
//! are already capped by the recorder (see `refinery_domain::limits`), and
//! [`MAX_EXECUTION_LIST`] caps how many come back at once.
//!
//! An execution and its usage row (metering, see [`crate::usage`]) are written in one
//! transaction: a crash leaves either both or neither, so no execution is ever unbilled
//! or billed twice.

use refinery_domain::{ExecutionRecord, UserError};
use sqlx::FromRow;

use crate::usage::ExecutionUsage;
use crate::{parse_stored, Store, StoreError};

/// Most records [`Store::list_executions`] returns, whatever `limit` asks for.
pub const MAX_EXECUTION_LIST: u32 = 1000;

const COLUMNS: &str = "id, account_id, project, deployment, block, instance_id, cold, \
    started_at_ms, duration_ms, init_ms, status, input, input_truncated, output, \
    output_truncated, error_json, logs, logs_truncated";

#[derive(FromRow)]
struct ExecutionRow {
    id: String,
    account_id: String,
    project: String,
    deployment: i64,
    block: String,
    instance_id: String,
    cold: bool,
    started_at_ms: i64,
    duration_ms: f64,
    init_ms: Option<f64>,
    status: String,
    input: String,
    input_truncated: bool,
    output: Option<String>,
    output_truncated: bool,
    error_json: Option<String>,
    logs: String,
    logs_truncated: bool,
}

impl ExecutionRow {
    fn into_record(self) -> Result<ExecutionRecord, StoreError> {
        let error = self
            .error_json
            .map(|json| {
                serde_json::from_str::<UserError>(&json).map_err(|e| {
                    StoreError::Corrupt(format!("error of execution {}: {e}", self.id))
                })
            })
            .transpose()?;
        Ok(ExecutionRecord {
            status: parse_stored("execution status", &self.status)?,
            id: self.id,
            account_id: self.account_id,
            project: self.project,
            deployment: self.deployment,
            block: self.block,
            instance_id: self.instance_id,
            cold: self.cold,
            started_at_ms: self.started_at_ms,
            duration_ms: self.duration_ms,
            init_ms: self.init_ms,
            input: self.input,
            input_truncated: self.input_truncated,
            output: self.output,
            output_truncated: self.output_truncated,
            error,
            logs: self.logs,
            logs_truncated: self.logs_truncated,
        })
    }
}

impl Store {
    /// Records one execution, under `record.account_id`, with its usage (metered with
    /// the granularity in force), in one transaction.
    ///
    /// The account must exist ([`StoreError::AccountNotFound`] otherwise) and the id
    /// must be new; on any failure nothing is written.
    pub async fn insert_execution(
        &self,
        record: &ExecutionRecord,
        usage: &ExecutionUsage,
    ) -> Result<(), StoreError> {
        self.writer.write(record.clone(), *usage).await
    }

    /// The account's executions of `project` (only of `block` if given), newest first,
    /// at most `limit` (itself capped at [`MAX_EXECUTION_LIST`]). Full records.
    ///
    /// An unknown project yields an empty list: executions outlive nothing and are kept
    /// by project name.
    pub async fn list_executions(
        &self,
        account_id: &str,
        project: &str,
        block: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ExecutionRecord>, StoreError> {
        let limit = i64::from(limit.min(MAX_EXECUTION_LIST));
        let order = "ORDER BY started_at_ms DESC, id DESC LIMIT ?";
        let rows = match block {
            Some(block) => {
                sqlx::query_as::<_, ExecutionRow>(&format!(
                    "SELECT {COLUMNS} FROM executions \
                     WHERE account_id = ? AND project = ? AND block = ? {order}"
                ))
                .bind(account_id)
                .bind(project)
                .bind(block)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query_as::<_, ExecutionRow>(&format!(
                    "SELECT {COLUMNS} FROM executions \
                     WHERE account_id = ? AND project = ? {order}"
                ))
                .bind(account_id)
                .bind(project)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(StoreError::db(format!("listing executions of `{project}`")))?;
        rows.into_iter().map(ExecutionRow::into_record).collect()
    }

    /// The account's execution `execution_id`; `None` if it does not exist or belongs
    /// to another account.
    pub async fn execution(
        &self,
        account_id: &str,
        execution_id: &str,
    ) -> Result<Option<ExecutionRecord>, StoreError> {
        sqlx::query_as::<_, ExecutionRow>(&format!(
            "SELECT {COLUMNS} FROM executions WHERE account_id = ? AND id = ?"
        ))
        .bind(account_id)
        .bind(execution_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::db(format!("reading execution {execution_id}")))?
        .map(ExecutionRow::into_record)
        .transpose()
    }
}
