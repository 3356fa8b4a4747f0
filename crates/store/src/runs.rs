//! Service runs: the runs, their steps, and the bookkeeping of fan-outs and joins that the
//! pipeline engine (`refinery_engine`) keeps here so that a run resumes after a crash.
//!
//! The engine decides; this module only stores. Every change of a run after its start is
//! made through one [`RunTx`] (a `BEGIN IMMEDIATE` transaction, run by [`Store::run_tx`] on
//! the run writer's thread, `run_writer.rs`): a step's result, the steps it starts, the
//! frame counters and joins it moves, and the run's end commit together or not at all.
//! Reads for the API (runs and their steps) go through the sqlx pool, beside it. Payloads (inputs, outputs, backpacks) are JSON text, as the engine wrote them.

use crate::{now_ms, Store, StoreError};
use rusqlite::{params, OptionalExtension};
use serde_json::Value;
use sqlx::Row;

/// The most runs one listing returns.
pub const MAX_RUN_LIST: u32 = 1000;

/// A run as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// `run_` + 32 hex characters.
    pub id: String,
    pub account_id: String,
    pub project: String,
    /// The deployment it runs (global id) and its number in the project.
    pub deployment_id: i64,
    pub deployment: i64,
    /// The block (or trigger) it started at.
    pub start: String,
    /// `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    pub cancel_requested: bool,
    /// Why it failed (`{"type","message"}` JSON), once a step failed it.
    pub error: Option<String>,
    /// Steps created so far.
    pub steps: i64,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    /// The endpoint reply it reached (JSON), if any.
    pub response: Option<String>,
}

impl RunRecord {
    /// Whether it takes no new steps: cancelled, failed, or ended.
    pub fn halted(&self) -> bool {
        self.status != "running" || self.cancel_requested || self.error.is_some()
    }
}

/// A step to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewStep {
    pub id: String,
    /// The block it runs.
    pub name: String,
    /// How it was reached: `start`, a transition type, or `retry`.
    pub transition: String,
    pub transition_id: Option<i64>,
    pub parents: Vec<String>,
    /// Its index in the fan-out that started it.
    pub item: Option<i64>,
    pub frame: String,
    pub depth: i64,
    /// 1 for the first try; a retry is a new step with the next attempt.
    pub attempt: i64,
    /// JSON texts.
    pub input: String,
    pub backpack: String,
    /// Not started before this time (a retry's wait).
    pub not_before_ms: i64,
}

/// A step as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub id: String,
    pub run_id: String,
    /// Creation order within the run (0-based).
    pub seq: i64,
    pub name: String,
    /// `pending`, `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    pub transition: String,
    pub transition_id: Option<i64>,
    pub parents: Vec<String>,
    pub item: Option<i64>,
    pub frame: String,
    pub depth: i64,
    pub attempt: i64,
    /// JSON texts; `None` once the log level cleared them (or before there is one).
    pub input: Option<String>,
    pub backpack_in: Option<String>,
    pub output: Option<String>,
    pub backpack: Option<String>,
    /// `{"type","message","traceback"}` JSON.
    pub error: Option<String>,
    pub execution_id: Option<String>,
    pub not_before_ms: i64,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub duration_ms: Option<f64>,
}

/// How a step ended, to record.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    /// `succeeded` or `failed` (or `cancelled`).
    pub status: &'static str,
    pub output: Option<String>,
    pub backpack: Option<String>,
    pub error: Option<String>,
    pub execution_id: Option<String>,
    pub started_at_ms: Option<i64>,
    pub duration_ms: Option<f64>,
    /// Whether to keep the step's input and backpack (the log level's choice).
    pub keep_input: bool,
}

/// One fan-out of a run: its items are the frames `<grp>#<i>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    pub grp: String,
    /// The frame of the step that fanned out (where its fan-in target runs).
    pub parent_frame: String,
    pub from_step: String,
    pub transition_id: i64,
    pub items: i64,
    pub settled: i64,
    /// The fanning-out step's depth.
    pub depth: i64,
}

/// An output waiting at a join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinEntry {
    pub slot: i64,
    pub step_id: String,
    pub seq: i64,
    pub output: String,
    pub backpack: String,
}

const RUN_COLUMNS: &str = "id, account_id, project, deployment_id, deployment, start, status, \
     cancel_requested, error, steps, started_at_ms, ended_at_ms, response";

const STEP_COLUMNS: &str = "id, run_id, seq, name, status, transition, transition_id, parents, \
     item, frame, depth, attempt, input, backpack_in, output, backpack, error, execution_id, \
     not_before_ms, created_at_ms, started_at_ms, duration_ms";

fn run_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<RunRecord, sqlx::Error> {
    Ok(RunRecord {
        id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        project: row.try_get("project")?,
        deployment_id: row.try_get("deployment_id")?,
        deployment: row.try_get("deployment")?,
        start: row.try_get("start")?,
        status: row.try_get("status")?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        error: row.try_get("error")?,
        steps: row.try_get("steps")?,
        started_at_ms: row.try_get("started_at_ms")?,
        ended_at_ms: row.try_get("ended_at_ms")?,
        response: row.try_get("response")?,
    })
}

fn step_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<StepRecord, StoreError> {
    let db = |e| StoreError::Corrupt(format!("reading a step: {e}"));
    let parents: String = row.try_get("parents").map_err(db)?;
    let parents: Vec<String> = serde_json::from_str(&parents)
        .map_err(|e| StoreError::Corrupt(format!("a step's parents `{parents}`: {e}")))?;
    Ok(StepRecord {
        id: row.try_get("id").map_err(db)?,
        run_id: row.try_get("run_id").map_err(db)?,
        seq: row.try_get("seq").map_err(db)?,
        name: row.try_get("name").map_err(db)?,
        status: row.try_get("status").map_err(db)?,
        transition: row.try_get("transition").map_err(db)?,
        transition_id: row.try_get("transition_id").map_err(db)?,
        parents,
        item: row.try_get("item").map_err(db)?,
        frame: row.try_get("frame").map_err(db)?,
        depth: row.try_get("depth").map_err(db)?,
        attempt: row.try_get("attempt").map_err(db)?,
        input: row.try_get("input").map_err(db)?,
        backpack_in: row.try_get("backpack_in").map_err(db)?,
        output: row.try_get("output").map_err(db)?,
        backpack: row.try_get("backpack").map_err(db)?,
        error: row.try_get("error").map_err(db)?,
        execution_id: row.try_get("execution_id").map_err(db)?,
        not_before_ms: row.try_get("not_before_ms").map_err(db)?,
        created_at_ms: row.try_get("created_at_ms").map_err(db)?,
        started_at_ms: row.try_get("started_at_ms").map_err(db)?,
        duration_ms: row.try_get("duration_ms").map_err(db)?,
    })
}

impl Store {
    /// Runs `f` on run `run_id` (which [`RunTx::create_run`] may create) in one IMMEDIATE
    /// transaction on the run writer's thread, and commits it if `f` returns `Ok`: nothing
    /// of it is written if `f` fails (or the commit does). Returns once it is committed.
    ///
    /// `f` runs on that thread, one transaction at a time in the order they were sent: it
    /// must not block on anything but the database (it holds SQLite's write lock).
    pub async fn run_tx<T, E, F>(&self, run_id: &str, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut RunTx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let run_id = run_id.to_string();
        self.runs
            .transact("a run transaction", move |conn| {
                let mut run = RunTx {
                    conn,
                    run_id,
                    next_seq: None,
                    inserted: false,
                };
                let value = f(&mut run)?;
                run.finish()?;
                Ok(value)
            })
            .await
    }

    /// The account's run `run_id` with its steps in creation order; `None` if the account
    /// has no such run.
    pub async fn run_with_steps(
        &self,
        account_id: &str,
        run_id: &str,
    ) -> Result<Option<(RunRecord, Vec<StepRecord>)>, StoreError> {
        let what = || format!("reading run {run_id}");
        let mut tx = self.pool.begin().await.map_err(StoreError::db(what()))?;
        let row = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE id = ? AND account_id = ?"
        ))
        .bind(run_id)
        .bind(account_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::db(what()))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let run = run_from_row(&row).map_err(StoreError::db(what()))?;
        let rows = sqlx::query(&format!(
            "SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ? ORDER BY seq"
        ))
        .bind(run_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::db(what()))?;
        let steps = rows.iter().map(step_from_row).collect::<Result<_, _>>()?;
        Ok(Some((run, steps)))
    }

    /// The run `run_id` (any account's: for the engine).
    pub async fn run_record(&self, run_id: &str) -> Result<Option<RunRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"))
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::db(format!("reading run {run_id}")))?;
        row.map(|r| run_from_row(&r))
            .transpose()
            .map_err(StoreError::db(format!("reading run {run_id}")))
    }

    /// The account's runs of `project`, newest first, at most `limit` (capped at
    /// [`MAX_RUN_LIST`]).
    pub async fn list_runs(
        &self,
        account_id: &str,
        project: &str,
        limit: u32,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let what = || format!("listing runs of `{project}`");
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE account_id = ? AND project = ? \
             ORDER BY started_at_ms DESC, id DESC LIMIT ?"
        ))
        .bind(account_id)
        .bind(project)
        .bind(i64::from(limit.min(MAX_RUN_LIST)))
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db(what()))?;
        rows.iter()
            .map(run_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::db(what()))
    }

    /// Every run still running (all accounts): what the engine resumes at start.
    pub async fn running_runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        let what = || "listing running runs".to_string();
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE status = 'running' ORDER BY started_at_ms"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db(what()))?;
        rows.iter()
            .map(run_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::db(what()))
    }

    /// The steps of `run_id` that have not ended (pending or running), in creation order.
    pub async fn active_steps(&self, run_id: &str) -> Result<Vec<StepRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ? AND status IN ('pending', 'running') \
             ORDER BY seq"
        ))
        .bind(run_id)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db(format!("reading the steps of run {run_id}")))?;
        rows.iter().map(step_from_row).collect()
    }

    /// One step (any account's: for the engine).
    pub async fn step(&self, step_id: &str) -> Result<Option<StepRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {STEP_COLUMNS} FROM steps WHERE id = ?"))
            .bind(step_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::db(format!("reading step {step_id}")))?;
        row.as_ref().map(step_from_row).transpose()
    }

    /// Marks a pending step running (for display; after a crash a running step is run
    /// again, exactly like a pending one). Written on the run writer's thread.
    pub async fn mark_step_running(&self, step_id: &str) -> Result<(), StoreError> {
        let step_id = step_id.to_string();
        self.runs
            .transact("marking a step running", move |conn| {
                conn.prepare_cached(
                    "UPDATE steps SET status = 'running', started_at_ms = ?1 \
                     WHERE id = ?2 AND status = 'pending'",
                )
                .and_then(|mut s| s.execute(params![now_ms(), step_id]))
                .map_err(StoreError::write(format!("starting step {step_id}")))?;
                Ok(())
            })
            .await
    }
}

/// One write transaction on one run, on the run writer's connection: see
/// [`Store::run_tx`], which commits it.
pub struct RunTx<'c> {
    conn: &'c rusqlite::Connection,
    run_id: String,
    next_seq: Option<i64>,
    /// Whether it inserted steps (so the run's step count moved).
    inserted: bool,
}

/// What [`RunTx::retarget`] set aside.
pub struct Retargeted {
    run_id: String,
    next_seq: Option<i64>,
    inserted: bool,
}

impl RunTx<'_> {
    pub(crate) fn what(&self) -> String {
        format!("updating run {}", self.run_id)
    }

    /// The transaction's connection (for statements of other store modules).
    pub(crate) fn conn(&self) -> &rusqlite::Connection {
        self.conn
    }

    /// Points the transaction at another run (one to create in it: a topic's subscriber
    /// run, written atomically with the step that published); returns what
    /// [`RunTx::restore`] needs to point it back.
    pub fn retarget(&mut self, run_id: &str) -> Retargeted {
        Retargeted {
            run_id: std::mem::replace(&mut self.run_id, run_id.to_string()),
            next_seq: self.next_seq.take(),
            inserted: std::mem::take(&mut self.inserted),
        }
    }

    /// Writes the other run's step count and points the transaction back at the run
    /// [`RunTx::retarget`] left.
    pub fn restore(&mut self, saved: Retargeted) -> Result<(), StoreError> {
        let finished = self.finish();
        self.run_id = saved.run_id;
        self.next_seq = saved.next_seq;
        self.inserted = saved.inserted;
        finished
    }

    fn err(&self) -> impl FnOnce(rusqlite::Error) -> StoreError {
        StoreError::write(self.what())
    }

    /// Runs one cached statement; returns the rows it changed.
    pub(crate) fn exec(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<usize, StoreError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(params))
            .map_err(self.err())
    }

    /// The run `id` of this transaction.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Creates the run (status `running`) and nothing else: add its first step with
    /// [`RunTx::insert_step`].
    pub fn create_run(
        &mut self,
        account_id: &str,
        project: &str,
        deployment_id: i64,
        deployment: i64,
        start: &str,
        started_at_ms: i64,
    ) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO runs (id, account_id, project, deployment_id, deployment, start, status, \
             started_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', ?7)",
            params![
                self.run_id,
                account_id,
                project,
                deployment_id,
                deployment,
                start,
                started_at_ms
            ],
        )?;
        self.next_seq = Some(0);
        Ok(())
    }

    /// The run, as this transaction sees it.
    pub fn run(&mut self) -> Result<Option<RunRecord>, StoreError> {
        let run = self
            .conn
            .prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"))
            .and_then(|mut s| s.query_row([&self.run_id], run_from_sql).optional())
            .map_err(self.err())?;
        if let Some(run) = &run {
            self.next_seq.get_or_insert(run.steps);
        }
        Ok(run)
    }

    /// Inserts a step (pending); returns its `seq`.
    pub fn insert_step(&mut self, step: &NewStep) -> Result<i64, StoreError> {
        let seq = match self.next_seq {
            Some(seq) => seq,
            None => self
                .conn
                .prepare_cached("SELECT steps FROM runs WHERE id = ?1")
                .and_then(|mut s| s.query_row([&self.run_id], |r| r.get(0)))
                .map_err(self.err())?,
        };
        let parents = serde_json::to_string(&step.parents).unwrap_or_else(|_| "[]".into());
        self.exec(
            "INSERT INTO steps (id, run_id, seq, name, status, transition, transition_id, parents, \
             item, frame, depth, attempt, input, backpack_in, not_before_ms, created_at_ms) \
             VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                step.id,
                self.run_id,
                seq,
                step.name,
                step.transition,
                step.transition_id,
                parents,
                step.item,
                step.frame,
                step.depth,
                step.attempt,
                step.input,
                step.backpack,
                step.not_before_ms,
                now_ms()
            ],
        )?;
        self.next_seq = Some(seq + 1);
        self.inserted = true;
        Ok(seq)
    }

    /// Records how a pending or running step ended. `false` (and nothing written) if it
    /// had already ended: a result is recorded once.
    pub fn finish_step(&mut self, step_id: &str, result: &StepResult) -> Result<bool, StoreError> {
        let done = self.exec(
            "UPDATE steps SET status = ?1, output = ?2, backpack = ?3, error = ?4, \
             execution_id = ?5, started_at_ms = COALESCE(?6, started_at_ms), duration_ms = ?7, \
             input = CASE WHEN ?8 THEN input ELSE NULL END, \
             backpack_in = CASE WHEN ?8 THEN backpack_in ELSE NULL END \
             WHERE id = ?9 AND run_id = ?10 AND status IN ('pending', 'running')",
            params![
                result.status,
                result.output,
                result.backpack,
                result.error,
                result.execution_id,
                result.started_at_ms,
                result.duration_ms,
                result.keep_input,
                step_id,
                self.run_id
            ],
        )?;
        Ok(done == 1)
    }

    /// Adds `delta` to the live count of `frame` (creating it at 0); returns the new count.
    pub fn add_live(&mut self, frame: &str, delta: i64) -> Result<i64, StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO run_frames (run_id, frame, live) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (run_id, frame) DO UPDATE SET live = live + excluded.live \
                 RETURNING live",
            )
            .and_then(|mut s| s.query_row(params![self.run_id, frame, delta], |r| r.get(0)))
            .map_err(self.err())
    }

    /// Records a fan-out.
    pub fn insert_group(&mut self, group: &GroupRecord) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO run_groups (run_id, grp, parent_frame, from_step, transition_id, items, \
             settled, depth) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                self.run_id,
                group.grp,
                group.parent_frame,
                group.from_step,
                group.transition_id,
                group.items,
                group.settled,
                group.depth
            ],
        )?;
        Ok(())
    }

    /// Counts one more item of fan-out `grp` as settled; returns the group as it is now.
    pub fn settle_item(&mut self, grp: &str) -> Result<GroupRecord, StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE run_groups SET settled = settled + 1 WHERE run_id = ?1 AND grp = ?2 \
                 RETURNING grp, parent_frame, from_step, transition_id, items, settled, depth",
            )
            .and_then(|mut s| s.query_row([&self.run_id, grp], group_from_sql).optional())
            .map_err(self.err())?
            .ok_or_else(|| self.no_group(grp))
    }

    /// Fan-out `grp` as recorded.
    pub fn group(&mut self, grp: &str) -> Result<GroupRecord, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT grp, parent_frame, from_step, transition_id, items, settled, depth \
                 FROM run_groups WHERE run_id = ?1 AND grp = ?2",
            )
            .and_then(|mut s| s.query_row([&self.run_id, grp], group_from_sql).optional())
            .map_err(self.err())?
            .ok_or_else(|| self.no_group(grp))
    }

    fn no_group(&self, grp: &str) -> StoreError {
        StoreError::Corrupt(format!("run {}: no fan-out `{grp}`", self.run_id))
    }

    /// Puts an output at a join (`place`, `transition_id`).
    pub fn add_join(
        &mut self,
        place: &str,
        transition_id: i64,
        entry: &JoinEntry,
    ) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO run_joins (run_id, place, transition_id, slot, step_id, seq, output, \
             backpack) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
            params![
                self.run_id,
                place,
                transition_id,
                entry.slot,
                entry.step_id,
                entry.seq,
                entry.output,
                entry.backpack
            ],
        )?;
        Ok(())
    }

    /// The outputs waiting at `place` for `transition_id`, by slot then arrival.
    pub fn joins(&mut self, place: &str, transition_id: i64) -> Result<Vec<JoinEntry>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT slot, step_id, seq, output, backpack FROM run_joins \
                 WHERE run_id = ?1 AND place = ?2 AND transition_id = ?3 ORDER BY slot, seq",
            )
            .and_then(|mut s| {
                s.query_map(params![self.run_id, place, transition_id], |r| {
                    Ok(JoinEntry {
                        slot: r.get(0)?,
                        step_id: r.get(1)?,
                        seq: r.get(2)?,
                        output: r.get(3)?,
                        backpack: r.get(4)?,
                    })
                })?
                .collect()
            })
            .map_err(self.err())
    }

    /// The transitions with outputs waiting at `place`.
    pub fn join_transitions(&mut self, place: &str) -> Result<Vec<i64>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT DISTINCT transition_id FROM run_joins WHERE run_id = ?1 AND place = ?2 \
                 ORDER BY transition_id",
            )
            .and_then(|mut s| s.query_map([&self.run_id, place], |r| r.get(0))?.collect())
            .map_err(self.err())
    }

    /// Removes consumed join entries.
    pub fn remove_joins(
        &mut self,
        transition_id: i64,
        step_ids: &[String],
    ) -> Result<(), StoreError> {
        for step_id in step_ids {
            self.exec(
                "DELETE FROM run_joins WHERE run_id = ?1 AND step_id = ?2 AND transition_id = ?3",
                params![self.run_id, step_id, transition_id],
            )?;
        }
        Ok(())
    }

    /// Sets the run's failure (the first one set stays) and cancels its pending steps.
    pub fn fail_run(&mut self, error: &Value) -> Result<(), StoreError> {
        self.exec(
            "UPDATE runs SET error = COALESCE(error, ?1) WHERE id = ?2",
            params![error.to_string(), self.run_id],
        )?;
        self.cancel_pending()
    }

    /// Marks the run cancelled-on-request and cancels its pending steps.
    pub fn request_cancel(&mut self) -> Result<(), StoreError> {
        self.exec(
            "UPDATE runs SET cancel_requested = 1 WHERE id = ?1",
            [&self.run_id],
        )?;
        self.cancel_pending()
    }

    fn cancel_pending(&mut self) -> Result<(), StoreError> {
        self.exec(
            "UPDATE steps SET status = 'cancelled', input = NULL, backpack_in = NULL \
             WHERE run_id = ?1 AND status = 'pending'",
            [&self.run_id],
        )?;
        Ok(())
    }

    /// Cancels every unfinished step, running ones too (at start, for a run that was
    /// halted when the server stopped: what was running then is gone).
    pub fn cancel_unfinished(&mut self) -> Result<(), StoreError> {
        self.exec(
            "UPDATE steps SET status = 'cancelled', input = NULL, backpack_in = NULL \
             WHERE run_id = ?1 AND status IN ('pending', 'running')",
            [&self.run_id],
        )?;
        Ok(())
    }

    /// Sets the run's response (an endpoint's reply) unless it has one; `true` if this
    /// one is it.
    pub fn set_response(&mut self, response: &Value) -> Result<bool, StoreError> {
        let done = self.exec(
            "UPDATE runs SET response = ?1 WHERE id = ?2 AND response IS NULL",
            params![response.to_string(), self.run_id],
        )?;
        Ok(done == 1)
    }

    /// Replaces the run's failure (to name more failed steps in it).
    pub fn set_run_error(&mut self, error: &Value) -> Result<(), StoreError> {
        self.exec(
            "UPDATE runs SET error = ?1 WHERE id = ?2",
            params![error.to_string(), self.run_id],
        )?;
        Ok(())
    }

    /// The live count of `frame` (0 if it has none).
    pub fn live(&mut self, frame: &str) -> Result<i64, StoreError> {
        let live: Option<i64> = self
            .conn
            .prepare_cached("SELECT live FROM run_frames WHERE run_id = ?1 AND frame = ?2")
            .and_then(|mut s| s.query_row([&self.run_id, frame], |r| r.get(0)).optional())
            .map_err(self.err())?;
        Ok(live.unwrap_or(0))
    }

    /// Steps of the run not yet ended (pending or running).
    pub fn unfinished_steps(&mut self) -> Result<i64, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT COUNT(*) FROM steps WHERE run_id = ?1 AND status IN ('pending', 'running')",
            )
            .and_then(|mut s| s.query_row([&self.run_id], |r| r.get(0)))
            .map_err(self.err())
    }

    /// Ends the run with `status`, dropping its bookkeeping (frames, fan-outs, joins).
    pub fn end_run(&mut self, status: &str) -> Result<(), StoreError> {
        self.exec(
            "UPDATE runs SET status = ?1, ended_at_ms = ?2 WHERE id = ?3 AND status = 'running'",
            params![status, now_ms(), self.run_id],
        )?;
        self.exec("DELETE FROM run_frames WHERE run_id = ?1", [&self.run_id])?;
        self.exec("DELETE FROM run_groups WHERE run_id = ?1", [&self.run_id])?;
        self.exec("DELETE FROM run_joins WHERE run_id = ?1", [&self.run_id])?;
        Ok(())
    }

    /// Writes the step count, last before the commit.
    fn finish(&self) -> Result<(), StoreError> {
        if let (true, Some(steps)) = (self.inserted, self.next_seq) {
            self.exec(
                "UPDATE runs SET steps = ?1 WHERE id = ?2 AND steps < ?1",
                params![steps, self.run_id],
            )?;
        }
        Ok(())
    }
}

fn group_from_sql(row: &rusqlite::Row<'_>) -> rusqlite::Result<GroupRecord> {
    Ok(GroupRecord {
        grp: row.get("grp")?,
        parent_frame: row.get("parent_frame")?,
        from_step: row.get("from_step")?,
        transition_id: row.get("transition_id")?,
        items: row.get("items")?,
        settled: row.get("settled")?,
        depth: row.get("depth")?,
    })
}

fn run_from_sql(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord {
        id: row.get("id")?,
        account_id: row.get("account_id")?,
        project: row.get("project")?,
        deployment_id: row.get("deployment_id")?,
        deployment: row.get("deployment")?,
        start: row.get("start")?,
        status: row.get("status")?,
        cancel_requested: row.get::<_, i64>("cancel_requested")? != 0,
        error: row.get("error")?,
        steps: row.get("steps")?,
        started_at_ms: row.get("started_at_ms")?,
        ended_at_ms: row.get("ended_at_ms")?,
        response: row.get("response")?,
    })
}
