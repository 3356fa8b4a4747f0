//! The execution writer: group commit of execution records on a thread of its own.
//!
//! Every invocation writes one execution and its usage before its reply is sent, so this is
//! the store's hot path. Written one sqlx transaction each, concurrent invocations contended for
//! SQLite's single write lock (busy waits), and each of the seven statements of a record was a
//! round trip to sqlx's connection thread (two context switches each) — most of the server's
//! CPU per warm invocation. Instead, one dedicated thread owns a synchronous `rusqlite`
//! connection with cached prepared statements, and writes whatever records are waiting in
//! **one** IMMEDIATE transaction, then answers each caller once the commit is done. Alone, a
//! record is written as before (a batch of one); under load, batches form by themselves while
//! the previous one commits.
//!
//! The guarantees are unchanged: each record's execution and usage rows are in the same
//! transaction, a caller is answered only after that transaction committed, and a failure of
//! one record never loses or fails another: a batch that fails is retried record by record —
//! except on a full disk ([`StoreError::DiskFull`]), which fails every record of the batch
//! at once (none was written). The thread survives every failure and writes the next
//! batch afresh, so recording resumes by itself when space returns.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use refinery_billing::{meter, Period, PriceList};
use refinery_domain::ExecutionRecord;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;

use crate::usage::ExecutionUsage;
use crate::{StoreError, BUSY_TIMEOUT};

/// WAL pages between automatic checkpoints (SQLite's default is 1000).
const WAL_AUTOCHECKPOINT_PAGES: i64 = 10_000;
/// Most records in one transaction: bounds the time a batch holds the write lock.
const MAX_BATCH: usize = 128;

struct Pending {
    record: ExecutionRecord,
    usage: ExecutionUsage,
    done: oneshot::Sender<Result<(), StoreError>>,
}

enum Job {
    Write(Box<Pending>),
    Close(oneshot::Sender<()>),
}

/// Handle to the writer thread; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct ExecutionWriter {
    queue: mpsc::Sender<Job>,
}

fn gone() -> StoreError {
    StoreError::Closed("execution records")
}

impl ExecutionWriter {
    /// Opens the writer's own connection to `path` (already migrated) and starts its thread.
    pub(crate) fn start(path: &Path) -> Result<Self, StoreError> {
        let open = |path: &Path| -> rusqlite::Result<Connection> {
            let conn = Connection::open(path)?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            // Checkpoint every ~40 MB of WAL rather than ~4 MB: the pages every record
            // touches (the month's totals, the tables' last leaves) are copied back to the
            // database once per checkpoint, not once per few hundred records.
            conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
            Ok(conn)
        };
        let conn = open(path).map_err(StoreError::write(format!(
            "opening {} for the execution writer",
            path.display()
        )))?;
        let (queue, jobs) = mpsc::channel();
        std::thread::Builder::new()
            .name("refinery-execution-writer".into())
            .spawn(move || run(conn, jobs))
            .map_err(|source| StoreError::Thread {
                what: "the execution writer",
                source,
            })?;
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
        self.queue.send(job).map_err(|_| gone())?;
        committed.await.map_err(|_| gone())?
    }

    /// Writes what is queued, then closes the connection.
    pub(crate) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.queue.send(Job::Close(done)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(30), closed).await;
        }
    }
}

fn run(mut conn: Connection, jobs: mpsc::Receiver<Job>) {
    conn.set_prepared_statement_cache_capacity(16);
    while let Ok(job) = jobs.recv() {
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
        write_batch(&mut conn, batch);
        if let Some(done) = close {
            drop(jobs); // later writes fail with "the store is closed"
            drop(conn);
            let _ = done.send(());
            return;
        }
    }
}

fn write_batch(conn: &mut Connection, batch: Vec<Pending>) {
    if batch.is_empty() {
        return;
    }
    let all: Vec<&Pending> = batch.iter().collect();
    match commit(conn, &all) {
        Ok(()) => {
            for p in batch {
                let _ = p.done.send(Ok(()));
            }
        }
        // A full disk fails every record alike: answer them all at once (retrying each
        // would only fail again, and hold the callers longer). The thread goes on: the
        // next batch is tried afresh, so writing resumes by itself once space returns.
        Err(e) if e.is_disk_full() => {
            let operation = e.to_string();
            for p in batch {
                let _ = p.done.send(Err(StoreError::DiskFull {
                    operation: operation.clone(),
                }));
            }
        }
        // One bad record (e.g. its account was just deleted) must not fail the others.
        Err(_) if batch.len() > 1 => {
            for p in batch {
                let result = commit(conn, &[&p]);
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
fn commit(conn: &mut Connection, batch: &[&Pending]) -> Result<(), StoreError> {
    // IMMEDIATE: the write lock is held from the start, so the reads metering makes
    // (granularity, closed months) cannot go stale before the commit.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(StoreError::write("recording executions"))?;
    let mut reads = MeteringReads::default();
    for p in batch {
        insert_one(&tx, &p.record, &p.usage, &mut reads)?;
    }
    tx.commit()
        .map_err(StoreError::write("committing executions"))
}

/// What metering reads (the price list's granularity, which months are closed), read once
/// per transaction: the transaction holds the write lock, so neither can change under it.
#[derive(Debug, Default)]
struct MeteringReads {
    granularity_ms: Option<u32>,
    open_period: HashMap<Period, Period>,
}

impl MeteringReads {
    fn granularity_ms(&mut self, conn: &Connection) -> Result<u32, StoreError> {
        if let Some(g) = self.granularity_ms {
            return Ok(g);
        }
        let stored: Option<i64> = conn
            .prepare_cached("SELECT granularity_ms FROM price_lists ORDER BY id DESC LIMIT 1")
            .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
            .map_err(StoreError::write("reading the billing granularity"))?;
        let g = match stored {
            Some(g) => crate::stored_u32("price list granularity_ms", g)?,
            None => PriceList::default().granularity_ms,
        };
        self.granularity_ms = Some(g);
        Ok(g)
    }

    /// The first month at or after `period` that is not closed (same rule as
    /// `usage::open_period_from`).
    fn open_period_from(
        &mut self,
        conn: &Connection,
        period: Period,
    ) -> Result<Period, StoreError> {
        if let Some(open) = self.open_period.get(&period) {
            return Ok(*open);
        }
        let mut open = period;
        loop {
            let closed: Option<i64> = conn
                .prepare_cached("SELECT closed_at_ms FROM closed_periods WHERE period = ?1")
                .and_then(|mut s| s.query_row([open.to_string()], |r| r.get(0)).optional())
                .map_err(StoreError::write("reading closed months"))?;
            if closed.is_none() {
                break;
            }
            open = open.next();
        }
        self.open_period.insert(period, open);
        Ok(open)
    }
}

/// Inserts one execution, its usage row, and adds it to the month's totals.
fn insert_one(
    conn: &Connection,
    record: &ExecutionRecord,
    usage: &ExecutionUsage,
    reads: &mut MeteringReads,
) -> Result<(), StoreError> {
    let error_json = record
        .error
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| {
            StoreError::Corrupt(format!("serialising error of execution {}: {e}", record.id))
        })?;
    conn.prepare_cached(
        "INSERT INTO executions (id, account_id, project, deployment, block, instance_id, cold, \
         started_at_ms, duration_ms, init_ms, status, input, input_truncated, output, \
         output_truncated, error_json, logs, logs_truncated) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
    )
    .and_then(|mut s| {
        s.execute(params![
            record.id,
            record.account_id,
            record.project,
            record.deployment,
            record.block,
            record.instance_id,
            record.cold,
            record.started_at_ms,
            record.duration_ms,
            record.init_ms,
            record.status.as_str(),
            record.input,
            record.input_truncated,
            record.output,
            record.output_truncated,
            error_json,
            record.logs,
            record.logs_truncated,
        ])
    })
    .map_err(|e| match constraint(&e) {
        Some(ConstraintKind::ForeignKey) => StoreError::AccountNotFound(record.account_id.clone()),
        Some(ConstraintKind::Unique) => StoreError::write(format!(
            "inserting execution {} (an execution with this id already exists)",
            record.id
        ))(e),
        None => StoreError::write(format!("inserting execution {}", record.id))(e),
    })?;

    let what = || format!("metering execution {}", record.id);
    let granularity = reads.granularity_ms(conn)?;
    let period = reads.open_period_from(conn, Period::containing(usage.ended_at_ms))?;
    let m = meter(
        record.duration_ms,
        record.init_ms,
        usage.memory_mb,
        granularity,
    );
    let egress = i64::try_from(usage.egress_bytes).unwrap_or(i64::MAX);
    let period = period.to_string();
    conn.prepare_cached(
        "INSERT INTO usage (execution_id, account_id, period, project, block, ended_at_ms, \
         memory_mb, billed_ms, init_billed_ms, mb_ms, init_mb_ms, egress_bytes) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )
    .and_then(|mut s| {
        s.execute(params![
            record.id,
            record.account_id,
            period,
            record.project,
            record.block,
            usage.ended_at_ms,
            i64::from(usage.memory_mb),
            m.billed_ms,
            m.init_billed_ms,
            m.mb_ms,
            m.init_mb_ms,
            egress,
        ])
    })
    .map_err(StoreError::write(what()))?;
    conn.prepare_cached(
        "INSERT INTO usage_totals (account_id, period, project, block, requests, billed_ms, \
         init_billed_ms, mb_ms, init_mb_ms, egress_bytes) \
         VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?7, ?8, ?9) \
         ON CONFLICT (account_id, period, project, block) DO UPDATE SET \
         requests = requests + 1, billed_ms = billed_ms + excluded.billed_ms, \
         init_billed_ms = init_billed_ms + excluded.init_billed_ms, \
         mb_ms = mb_ms + excluded.mb_ms, init_mb_ms = init_mb_ms + excluded.init_mb_ms, \
         egress_bytes = egress_bytes + excluded.egress_bytes",
    )
    .and_then(|mut s| {
        s.execute(params![
            record.account_id,
            period,
            record.project,
            record.block,
            m.billed_ms,
            m.init_billed_ms,
            m.mb_ms,
            m.init_mb_ms,
            egress,
        ])
    })
    .map_err(StoreError::write(what()))?;
    Ok(())
}

enum ConstraintKind {
    ForeignKey,
    Unique,
}

fn constraint(e: &rusqlite::Error) -> Option<ConstraintKind> {
    const SQLITE_CONSTRAINT_FOREIGNKEY: i32 = 787;
    const SQLITE_CONSTRAINT_PRIMARYKEY: i32 = 1555;
    const SQLITE_CONSTRAINT_UNIQUE: i32 = 2067;
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation => match f
            .extended_code
        {
            SQLITE_CONSTRAINT_FOREIGNKEY => Some(ConstraintKind::ForeignKey),
            SQLITE_CONSTRAINT_PRIMARYKEY | SQLITE_CONSTRAINT_UNIQUE => Some(ConstraintKind::Unique),
            _ => None,
        },
        _ => None,
    }
}
