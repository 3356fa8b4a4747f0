//! Refinery's persistence: accounts, API keys, projects, deployments and executions,
//! kept in one embedded SQLite database (`<data_dir>/refinery.db`) through sqlx — except the
//! hot paths, each written by a thread of its own through a synchronous `rusqlite`
//! connection with cached statements: execution records with their usage, in
//! group-committed batches (`execution_writer.rs`), and the engine's run transactions
//! ([`Store::run_tx`], `run_writer.rs`).
//!
//! # What this crate owns
//!
//! - **The schema.** It lives in `migrations/` (embedded at compile time and applied by
//!   [`Store::open`]); no other crate creates or alters tables.
//! - **Every SQL statement.** Other crates call typed methods on [`Store`]; none of them
//!   writes SQL. Statements are grouped by concern: [`accounts`] (accounts and API key
//!   hashes), [`deployments`] (projects, their numbered deployments and blocks) and
//!   [`executions`] (invocation records), [`storage`] (what each deployment holds: the
//!   storage quota's usage, retention, project deletion), [`quotas`] (per-account quota overrides),
//!   [`usage`] (metering, written with each execution), [`pricing`] (price lists and
//!   per-account terms), [`bills`] (monthly bills; rating is `refinery_billing`'s) and
//!   [`audit`] (the security audit trail of refused syscalls, bounded per account) and
//!   [`runs`] (service runs, their steps and the engine's join bookkeeping), [`timers`]
//!   (which slot of each timer fired, exactly once) and [`queues`] (durable queues:
//!   messages, claims, dead letters).
//!
//! # What it must never do
//!
//! - **Return or change another account's rows.** Every method that touches an
//!   account's data takes the caller's `account_id` and filters on it in SQL, so a
//!   project named `x` of account A is invisible to account B, who may own its own `x`.
//!   Asking for someone else's row answers exactly as for a row that does not exist
//!   (`None`, [`StoreError::ProjectNotFound`], ...), so existence does not leak either.
//! - **Store API keys in clear.** Callers pass the key's SHA-256 hex (`key_hash`) and a
//!   short, non-secret display prefix; the key itself never reaches this crate.
//!
//! # Durability
//!
//! The database runs in WAL mode with `synchronous = NORMAL`: a committed transaction
//! survives the process crashing or being killed at any point. Only an operating-system
//! crash or power loss can lose the last few commits, and never corrupts the file.
//! Foreign keys are enforced and writers wait (`busy_timeout`) rather than fail when
//! another connection holds the write lock.
//!
//! # Portability
//!
//! SQL is kept to what PostgreSQL also accepts (`ON CONFLICT ... DO NOTHING`,
//! `RETURNING`, `COALESCE`, `CASE`), so a PostgreSQL backend can be added beside this one
//! with a mirrored migration. The SQLite-specific parts are the pragmas set in
//! [`Store::open`] and `BEGIN IMMEDIATE` for write transactions that read before they
//! write (PostgreSQL would lock the project row with `SELECT ... FOR UPDATE` instead).

pub mod accounts;
pub mod audit;
pub mod bills;
pub mod deployments;
pub mod error;
mod execution_writer;
pub mod executions;
pub mod layers;
pub mod pricing;
pub mod queues;
pub mod quotas;
mod run_writer;
pub mod runs;
pub mod secrets;
pub mod storage;
pub mod timers;
pub mod usage;

use execution_writer::ExecutionWriter;
use run_writer::RunWriter;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

pub use accounts::Account;
pub use audit::{SecurityEvent, MAX_AUDIT_EVENTS_PER_ACCOUNT, MAX_AUDIT_LIST};
pub use bills::{BillRecord, NotEnded, Spending};
pub use deployments::{Deployed, Deployment, DeploymentSummary, ProjectSummary, Retention};
pub use error::StoreError;
pub use executions::MAX_EXECUTION_LIST;
pub use pricing::AccountBilling;
pub use queues::{
    Claimed, Enqueued, QueueMessage, QueueRef, QueueStats, Settled, Settlement,
    MAX_DEAD_LETTER_LIST,
};
pub use quotas::QuotaOverrides;
pub use runs::{
    GroupRecord, JoinEntry, NewStep, RunRecord, RunTx, StepRecord, StepResult, MAX_RUN_LIST,
};
pub use secrets::{SecretSummary, MAX_SECRETS_PER_PROJECT, MAX_SECRET_BYTES, SECRET_KEY_FILE};
pub use timers::{TimerClaim, TimerFire, TimerSlot, MAX_TIMER_FIRES_KEPT};
pub use usage::{BlockUsage, ExecutionUsage};

/// File name of the database inside the data directory.
pub const DB_FILE_NAME: &str = "refinery.db";

/// How long a statement waits for another connection's write lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections in the pool. WAL lets readers run beside the single writer.
const MAX_CONNECTIONS: u32 = 8;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Handle to the database. Cheap to clone: clones share one connection pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    /// Writes execution records (with their usage) in group-committed batches.
    writer: ExecutionWriter,
    /// Runs the engine's run transactions ([`Store::run_tx`]).
    runs: RunWriter,
    path: PathBuf,
    /// Seals and opens secrets (`<data_dir>/secrets.key`).
    secret_key: secrets::SecretKey,
}

impl Store {
    /// Opens (creating if needed) `data_dir/refinery.db` and brings its schema up to date.
    ///
    /// Creates `data_dir` if it is missing. Opening an existing database keeps all its
    /// data; migrations already applied are skipped.
    pub async fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let secret_key = secrets::SecretKey::load_or_create(data_dir)?;
        let path = data_dir.join(DB_FILE_NAME);
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options.clone())
            .await
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migrate {
                path: path.clone(),
                source,
            })?;
        let writer = ExecutionWriter::start(&path)?;
        let runs = RunWriter::start(&path)?;
        tracing::debug!(path = %path.display(), "store opened");
        Ok(Store {
            pool,
            writer,
            runs,
            path,
            secret_key,
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts a write transaction that takes SQLite's write lock at once (`BEGIN IMMEDIATE`),
    /// for transactions that read before they write: no other writer can change what they read.
    /// `what` names the operation in the error.
    pub(crate) async fn begin_write(
        &self,
        what: String,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::db(what))
    }

    /// Closes every connection, checkpointing the WAL. Later calls on this store (or
    /// its clones) fail; open the directory again to continue.
    pub async fn close(&self) {
        self.writer.close().await;
        self.runs.close().await;
        self.pool.close().await;
    }
}

/// Now, in milliseconds since the Unix epoch (UTC).
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Whether `err` is a UNIQUE / PRIMARY KEY constraint violation.
pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Whether `err` is a FOREIGN KEY constraint violation.
pub(crate) fn is_foreign_key_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_foreign_key_violation())
}

/// Parses a value stored as text (language, status), or reports the row as corrupt.
pub(crate) fn parse_stored<T: FromStr<Err = String>>(
    what: &str,
    text: &str,
) -> Result<T, StoreError> {
    text.parse()
        .map_err(|e: String| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Converts a stored integer to `u32`, or reports the row as corrupt.
pub(crate) fn stored_u32(what: &str, value: i64) -> Result<u32, StoreError> {
    u32::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("{what} = {value} does not fit in u32")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_sets_durability_pragmas() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path()).await?;
        let mut conn = store.pool.acquire().await?;
        let (journal,): (String,) = sqlx::query_as("PRAGMA journal_mode")
            .fetch_one(&mut *conn)
            .await?;
        let (synchronous,): (i64,) = sqlx::query_as("PRAGMA synchronous")
            .fetch_one(&mut *conn)
            .await?;
        let (foreign_keys,): (i64,) = sqlx::query_as("PRAGMA foreign_keys")
            .fetch_one(&mut *conn)
            .await?;
        let (busy,): (i64,) = sqlx::query_as("PRAGMA busy_timeout")
            .fetch_one(&mut *conn)
            .await?;
        assert_eq!(journal, "wal");
        assert_eq!(synchronous, 1, "NORMAL");
        assert_eq!(foreign_keys, 1);
        assert_eq!(busy, 10_000);
        Ok(())
    }
}
