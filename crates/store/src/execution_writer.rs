//! Group commit of execution records.
//!
//! Every invocation writes one execution and its usage before its reply is sent. Written one
//! transaction each, concurrent invocations contend for SQLite's single write lock (busy waits)
//! and each transaction costs a BEGIN and a COMMIT. Instead, one task owns a dedicated
//! connection and writes whatever records are waiting in **one** IMMEDIATE transaction, then
//! answers each caller once the commit is done. Alone, a record is written exactly as before
//! (a batch of one); under load, batches form by themselves while the previous one commits.
//!
//! The guarantees are unchanged: each record's execution and usage rows are in the same
//! transaction, a caller is answered only after that transaction committed, and a failure of
//! one record never loses or fails another: a batch that fails is retried record by record.

use refinery_domain::ExecutionRecord;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use crate::executions::insert_one;
use crate::usage::{ExecutionUsage, MeteringReads};
use crate::StoreError;

/// Most records in one transaction: bounds the time a batch holds the write lock.
const MAX_BATCH: usize = 128;
/// Records waiting for the writer before callers wait to enqueue.
const QUEUE: usize = 4096;

struct Pending {
    record: ExecutionRecord,
    usage: ExecutionUsage,
    done: oneshot::Sender<Result<(), StoreError>>,
}

enum Job {
    Write(Box<Pending>),
    Close(oneshot::Sender<()>),
}

/// Handle to the writer task; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct ExecutionWriter {
    queue: mpsc::Sender<Job>,
}

fn gone() -> StoreError {
    StoreError::Corrupt("the store is closed: execution records can no longer be written".into())
}

impl ExecutionWriter {
    /// Opens the writer's own connection and starts its task.
    pub(crate) async fn start(options: &SqliteConnectOptions) -> Result<Self, sqlx::Error> {
        let conn = options.connect().await?;
        let (queue, jobs) = mpsc::channel(QUEUE);
        tokio::spawn(run(conn, jobs));
        Ok(ExecutionWriter { queue })
    }

    /// Writes one execution with its usage; returns once it is committed.
    pub(crate) async fn write(
        &self,
        record: ExecutionRecord,
        usage: ExecutionUsage,
    ) -> Result<(), StoreError> {
        let (done, committed) = oneshot::channel();
        let job = Job::Write(Box::new(Pending {
            record,
            usage,
            done,
        }));
        self.queue.send(job).await.map_err(|_| gone())?;
        committed.await.map_err(|_| gone())?
    }

    /// Writes what is queued, then closes the connection.
    pub(crate) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.queue.send(Job::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }
}

async fn run(mut conn: SqliteConnection, mut jobs: mpsc::Receiver<Job>) {
    while let Some(job) = jobs.recv().await {
        let mut batch = Vec::new();
        let mut close = None;
        match job {
            Job::Write(p) => batch.push(*p),
            Job::Close(done) => close = Some(done),
        }
        while close.is_none() && batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(Job::Write(p)) => batch.push(*p),
                Ok(Job::Close(done)) => close = Some(done),
                Err(_) => break,
            }
        }
        write_batch(&mut conn, batch).await;
        if let Some(done) = close {
            jobs.close();
            while let Ok(Job::Write(p)) = jobs.try_recv() {
                let _ = p.done.send(Err(gone()));
            }
            let _ = conn.close().await;
            let _ = done.send(());
            return;
        }
    }
}

async fn write_batch(conn: &mut SqliteConnection, batch: Vec<Pending>) {
    if batch.is_empty() {
        return;
    }
    let all: Vec<&Pending> = batch.iter().collect();
    match commit(conn, &all).await {
        Ok(()) => {
            for p in batch {
                let _ = p.done.send(Ok(()));
            }
        }
        // One bad record (e.g. its account was just deleted) must not fail the others.
        Err(_) if batch.len() > 1 => {
            for p in batch {
                let result = commit(conn, &[&p]).await;
                let _ = p.done.send(result);
            }
        }
        Err(e) => {
            if let Some(p) = batch.into_iter().next() {
                let _ = p.done.send(Err(e));
            }
        }
    }
}

/// One IMMEDIATE transaction holding every record of `batch`, or none of them.
async fn commit(conn: &mut SqliteConnection, batch: &[&Pending]) -> Result<(), StoreError> {
    // IMMEDIATE: the write lock is held from the start, so the reads metering makes
    // (granularity, closed months) cannot go stale before the commit.
    let mut tx = conn
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(StoreError::db("recording executions"))?;
    let mut reads = MeteringReads::default();
    for p in batch {
        insert_one(&mut tx, &p.record, &p.usage, &mut reads).await?;
    }
    tx.commit()
        .await
        .map_err(StoreError::db("committing executions"))
}
