//! The run writer: the engine's run transactions on a thread of their own.
//!
//! Advancing a run after a step is one transaction of a dozen small statements (the step's
//! result, its successors, the frame counters, the joins, maybe the run's end). Through
//! sqlx, each statement was a round trip to sqlx's connection thread — two context switches
//! each, most of a step's cost. Instead, as the execution writer does for execution records
//! (`execution_writer.rs`), one dedicated thread owns a synchronous `rusqlite` connection
//! with cached prepared statements, and the engine sends it the whole transaction as a
//! closure ([`crate::Store::run_tx`]): the thread runs it inside one IMMEDIATE transaction,
//! commits it (or rolls it back if the closure failed), and only then answers.
//!
//! The thread runs one transaction at a time, in the order they were sent: the engine's
//! writes need no lock of their own. Each closure gets a transaction of its own (no group
//! commit): a failing closure can never take another's writes with it, and SQLite rolls
//! back a whole transaction on some errors (a full disk among them), which savepoints
//! would not contain. Measured, batching gained nothing on a step's cost (see
//! docs/BENCHMARKS.md, "Services (issue 12)").
//!
//! The thread survives every failure of a transaction (and a panicking closure: its
//! transaction is rolled back and its caller told), so writing resumes by itself once,
//! say, disk space returns.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::oneshot;

use crate::{StoreError, BUSY_TIMEOUT};

/// Prepared statements kept per connection: every statement of [`crate::RunTx`] fits.
const STATEMENT_CACHE: usize = 48;

/// A unit of work for the thread: runs against its connection (outside any transaction)
/// and answers its caller itself.
pub(crate) type Job = Box<dyn FnOnce(&mut Connection) + Send>;

enum Msg {
    Job(Job),
    Close(oneshot::Sender<()>),
}

/// Handle to the run writer thread; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct RunWriter {
    queue: mpsc::Sender<Msg>,
}

pub(crate) fn gone() -> StoreError {
    StoreError::Closed("service runs")
}

impl RunWriter {
    /// Opens the writer's own connection to `path` (already migrated) and starts its thread.
    pub(crate) fn start(path: &Path) -> Result<Self, StoreError> {
        let open = |path: &Path| -> rusqlite::Result<Connection> {
            let conn = Connection::open(path)?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
            Ok(conn)
        };
        let conn = open(path).map_err(StoreError::write(format!(
            "opening {} for the run writer",
            path.display()
        )))?;
        let (queue, jobs) = mpsc::channel();
        std::thread::Builder::new()
            .name("refinery-run-writer".into())
            .spawn(move || run(conn, jobs))
            .map_err(|source| StoreError::Thread {
                what: "the run writer",
                source,
            })?;
        Ok(RunWriter { queue })
    }

    /// Queues `job`; `Err` if the thread is gone (the store was closed).
    pub(crate) fn send(&self, job: Job) -> Result<(), StoreError> {
        self.queue.send(Msg::Job(job)).map_err(|_| gone())
    }

    /// Runs what is queued, then closes the connection.
    pub(crate) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.queue.send(Msg::Close(done)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(30), closed).await;
        }
    }
}

fn run(mut conn: Connection, jobs: mpsc::Receiver<Msg>) {
    while let Ok(msg) = jobs.recv() {
        match msg {
            Msg::Job(job) => {
                // A panicking job drops its answer (its caller hears the job failed) and
                // its transaction (rolled back); the next job starts afresh.
                if catch_unwind(AssertUnwindSafe(|| job(&mut conn))).is_err() {
                    tracing::error!("a run transaction panicked; it was rolled back");
                    if !conn.is_autocommit() {
                        let _ = conn.execute_batch("ROLLBACK");
                    }
                }
            }
            Msg::Close(done) => {
                drop(jobs); // later transactions fail with "the store is closed"
                drop(conn);
                let _ = done.send(());
                return;
            }
        }
    }
}

/// Runs `f` inside one IMMEDIATE transaction on `conn`: commits if it returns `Ok`, rolls
/// back if it returns `Err`.
pub(crate) fn in_transaction<T, E>(
    conn: &mut Connection,
    what: impl Fn() -> String,
    f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<StoreError>,
{
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(StoreError::write(what()))?;
    let value = f(&tx)?; // an `Err` drops `tx`: rolled back
    tx.commit()
        .map_err(StoreError::write(format!("committing: {}", what())))?;
    Ok(value)
}
