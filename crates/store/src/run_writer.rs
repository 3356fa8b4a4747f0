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
//! The thread runs the closures one at a time, in the order they were sent: the engine's
//! writes need no lock of their own. Closures that queued up while the thread was busy
//! share one transaction (at most [`MAX_BATCH`]), each inside a savepoint of its own: a
//! closure that fails is rolled back to its savepoint, so it never takes another's writes
//! with it; every caller is answered only once the shared transaction committed. Should
//! SQLite roll back the whole transaction on a closure's failure (it does on some
//! errors, a full disk among them), the closures before it in the transaction fail too,
//! saying so (nothing of theirs was written, nothing was acknowledged), and the ones after
//! it start a new transaction. Measured against one transaction per closure, sharing made
//! a warm 1000-item fan-out about twice as fast (docs/BENCHMARKS.md, "Services (issue 12)").
//!
//! The thread survives every failure of a transaction (and a panicking closure: its
//! writes are rolled back and its caller told), so writing resumes by itself once, say,
//! disk space returns.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::{StoreError, BUSY_TIMEOUT};

/// Prepared statements kept per connection: every statement of [`crate::RunTx`] fits.
const STATEMENT_CACHE: usize = 48;

/// Answers a job's caller, given how the transaction holding its writes ended.
type Answer = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// A unit of work for the thread: given the connection inside a transaction (or why there
/// is none), does its writes and says whether they stand (`true`) or must be rolled back,
/// with how to answer its caller once the transaction ended.
type Job = Box<dyn FnOnce(Result<&Connection, StoreError>) -> (bool, Answer) + Send>;

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

    /// Runs `work` inside an IMMEDIATE transaction on the thread's connection; returns its
    /// value once that transaction committed. If `work` fails, nothing of it is written.
    pub(crate) async fn transact<T, E>(
        &self,
        what: &'static str,
        work: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (done, answer) = oneshot::channel::<Result<T, E>>();
        let job: Job = Box::new(move |conn| match conn.map_err(E::from).and_then(work) {
            Ok(value) => (
                true,
                Box::new(move |ended: Result<(), StoreError>| {
                    let _ = done.send(ended.map(|()| value).map_err(E::from));
                }),
            ),
            Err(e) => (
                false,
                Box::new(move |_| {
                    let _ = done.send(Err(e));
                }),
            ),
        });
        self.queue
            .send(Msg::Job(job))
            .map_err(|_| E::from(gone()))?;
        answer
            .await
            .map_err(|_| E::from(StoreError::Interrupted(what)))?
    }

    /// Runs what is queued, then closes the connection.
    pub(crate) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.queue.send(Msg::Close(done)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(30), closed).await;
        }
    }
}

fn run(conn: Connection, jobs: mpsc::Receiver<Msg>) {
    while let Ok(msg) = jobs.recv() {
        let mut batch = Vec::new();
        let mut close = None;
        match msg {
            Msg::Job(job) => batch.push(job),
            Msg::Close(done) => close = Some(done),
        }
        while close.is_none() && batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(Msg::Job(job)) => batch.push(job),
                Ok(Msg::Close(done)) => close = Some(done),
                Err(_) => break,
            }
        }
        run_batch(&conn, batch);
        if let Some(done) = close {
            drop(jobs); // later transactions fail with "the store is closed"
            drop(conn);
            let _ = done.send(());
            return;
        }
    }
}

/// Most jobs in one transaction: bounds the time it holds the write lock.
const MAX_BATCH: usize = 64;

/// Runs `batch` in as few transactions as it can: one, unless a job's failure made SQLite
/// roll back the whole transaction (a full disk, say), in which case the jobs before it
/// fail with it (nothing of theirs was written) and the ones after start afresh.
fn run_batch(conn: &Connection, batch: Vec<Job>) {
    let shared = batch.len() > 1;
    let mut done: Vec<Answer> = Vec::new();
    let mut open = false;
    for job in batch {
        if !open {
            if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
                let e = StoreError::write("starting a run transaction")(e);
                let (_, answer) = job(Err(e));
                answer(Ok(()));
                continue;
            }
            open = true;
        }
        if shared {
            if let Err(e) = conn.execute_batch("SAVEPOINT job") {
                let e = StoreError::write("starting a run transaction")(e);
                let (_, answer) = job(Err(e));
                answer(Ok(()));
                continue;
            }
        }
        // A panicking job drops its answer (its caller hears it was given up) and is
        // rolled back like a failing one.
        let (ok, answer) = match catch_unwind(AssertUnwindSafe(|| job(Ok(conn)))) {
            Ok((ok, answer)) => (ok, Some(answer)),
            Err(_) => {
                tracing::error!("a run transaction panicked; it was rolled back");
                (false, None)
            }
        };
        if ok {
            if shared {
                if let Err(e) = conn.execute_batch("RELEASE job") {
                    // Cannot happen for a savepoint just made; treat like a failed commit.
                    let error = StoreError::write("committing run transactions")(e);
                    abandon(conn, &mut done, &error);
                    open = false;
                    if let Some(answer) = answer {
                        answer(Err(copy(&error)));
                    }
                    continue;
                }
            }
            done.extend(answer);
            continue;
        }
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back: the jobs before this one with it.
            let error = StoreError::Write {
                operation: "updating a run: nothing was written, because another run \
                            transaction sharing its SQLite transaction failed and SQLite \
                            rolled back the whole of it; retry"
                    .into(),
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                    Some("rolled back".into()),
                ),
            };
            for a in done.drain(..) {
                a(Err(copy(&error)));
            }
            open = false;
        } else if shared {
            let rolled = conn.execute_batch("ROLLBACK TO job; RELEASE job");
            if let Err(e) = rolled {
                let error = StoreError::write("rolling back a run transaction")(e);
                abandon(conn, &mut done, &error);
                open = false;
            }
        } else {
            let _ = conn.execute_batch("ROLLBACK");
            open = false;
        }
        if let Some(answer) = answer {
            answer(Ok(())); // it answers with its own error
        }
    }
    if open {
        match conn.execute_batch("COMMIT") {
            Ok(()) => {
                for a in done {
                    a(Ok(()));
                }
            }
            Err(e) => {
                let error = StoreError::write("committing run transactions")(e);
                abandon(conn, &mut done, &error);
            }
        }
    }
}

/// Rolls back the open transaction and fails every job in it with `error`.
fn abandon(conn: &Connection, done: &mut Vec<Answer>, error: &StoreError) {
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    for a in done.drain(..) {
        a(Err(copy(error)));
    }
}

/// `error` again, for each caller of a batch it failed ([`StoreError::DiskFull`] for a full
/// disk, so that each recognises it).
fn copy(error: &StoreError) -> StoreError {
    if error.is_disk_full() {
        return StoreError::DiskFull {
            operation: error.to_string(),
        };
    }
    match error {
        StoreError::Write { operation, source } => StoreError::Write {
            operation: operation.clone(),
            source: match source {
                rusqlite::Error::SqliteFailure(code, message) => {
                    rusqlite::Error::SqliteFailure(*code, message.clone())
                }
                other => rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                    Some(other.to_string()),
                ),
            },
        },
        other => StoreError::Corrupt(other.to_string()),
    }
}
