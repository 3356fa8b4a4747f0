//! Service runs: the runs, their steps, and the bookkeeping of fan-outs and joins that the
//! pipeline engine (`refinery_engine`) keeps here so that a run resumes after a crash.
//!
//! The engine decides; this module only stores. Every change of a run after its start is
//! made through one [`RunTx`] (a `BEGIN IMMEDIATE` transaction): a step's result, the steps
//! it starts, the frame counters and joins it moves, and the run's end commit together or
//! not at all. Payloads (inputs, outputs, backpacks) are JSON text, as the engine wrote them.

use serde_json::Value;
use sqlx::Row;

use crate::{now_ms, Store, StoreError};

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
    /// Starts a write transaction on run `run_id` (which [`RunTx::create_run`] may create).
    pub async fn begin_run(&self, run_id: &str) -> Result<RunTx, StoreError> {
        let tx = self.begin_write(format!("updating run {run_id}")).await?;
        Ok(RunTx {
            tx,
            run_id: run_id.to_string(),
            next_seq: None,
        })
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
    /// again, exactly like a pending one).
    pub async fn mark_step_running(&self, step_id: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE steps SET status = 'running', started_at_ms = ? \
             WHERE id = ? AND status = 'pending'",
        )
        .bind(now_ms())
        .bind(step_id)
        .execute(&self.pool)
        .await
        .map_err(StoreError::db(format!("starting step {step_id}")))?;
        Ok(())
    }
}

/// One write transaction on one run. Dropped without [`RunTx::commit`], it changes nothing.
pub struct RunTx {
    pub(crate) tx: sqlx::Transaction<'static, sqlx::Sqlite>,
    pub(crate) run_id: String,
    next_seq: Option<i64>,
}

impl RunTx {
    pub(crate) fn what(&self) -> String {
        format!("updating run {}", self.run_id)
    }

    /// Creates the run (status `running`) and nothing else: add its first step with
    /// [`RunTx::insert_step`].
    pub async fn create_run(
        &mut self,
        account_id: &str,
        project: &str,
        deployment_id: i64,
        deployment: i64,
        start: &str,
        started_at_ms: i64,
    ) -> Result<(), StoreError> {
        let what = self.what();
        sqlx::query(
            "INSERT INTO runs (id, account_id, project, deployment_id, deployment, start, status, \
             started_at_ms) VALUES (?, ?, ?, ?, ?, ?, 'running', ?)",
        )
        .bind(&self.run_id)
        .bind(account_id)
        .bind(project)
        .bind(deployment_id)
        .bind(deployment)
        .bind(start)
        .bind(started_at_ms)
        .execute(&mut *self.tx)
        .await
        .map_err(StoreError::db(what))?;
        self.next_seq = Some(0);
        Ok(())
    }

    /// The run, as this transaction sees it.
    pub async fn run(&mut self) -> Result<Option<RunRecord>, StoreError> {
        let what = self.what();
        let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"))
            .bind(&self.run_id)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(StoreError::db(what.clone()))?;
        let run = row
            .map(|r| run_from_row(&r))
            .transpose()
            .map_err(StoreError::db(what))?;
        if let Some(run) = &run {
            self.next_seq.get_or_insert(run.steps);
        }
        Ok(run)
    }

    /// Inserts a step (pending); returns its `seq`.
    pub async fn insert_step(&mut self, step: &NewStep) -> Result<i64, StoreError> {
        let what = self.what();
        let seq = match self.next_seq {
            Some(seq) => seq,
            None => {
                let (steps,): (i64,) = sqlx::query_as("SELECT steps FROM runs WHERE id = ?")
                    .bind(&self.run_id)
                    .fetch_one(&mut *self.tx)
                    .await
                    .map_err(StoreError::db(what.clone()))?;
                steps
            }
        };
        let parents = serde_json::to_string(&step.parents).unwrap_or_else(|_| "[]".into());
        sqlx::query(
            "INSERT INTO steps (id, run_id, seq, name, status, transition, transition_id, parents, \
             item, frame, depth, attempt, input, backpack_in, not_before_ms, created_at_ms) \
             VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&step.id)
        .bind(&self.run_id)
        .bind(seq)
        .bind(&step.name)
        .bind(&step.transition)
        .bind(step.transition_id)
        .bind(parents)
        .bind(step.item)
        .bind(&step.frame)
        .bind(step.depth)
        .bind(step.attempt)
        .bind(&step.input)
        .bind(&step.backpack)
        .bind(step.not_before_ms)
        .bind(now_ms())
        .execute(&mut *self.tx)
        .await
        .map_err(StoreError::db(what))?;
        self.next_seq = Some(seq + 1);
        Ok(seq)
    }

    /// Records how a pending or running step ended. `false` (and nothing written) if it
    /// had already ended: a result is recorded once.
    pub async fn finish_step(
        &mut self,
        step_id: &str,
        result: &StepResult,
    ) -> Result<bool, StoreError> {
        let what = self.what();
        let done = sqlx::query(
            "UPDATE steps SET status = ?, output = ?, backpack = ?, error = ?, execution_id = ?, \
             started_at_ms = COALESCE(?, started_at_ms), duration_ms = ?, \
             input = CASE WHEN ? THEN input ELSE NULL END, \
             backpack_in = CASE WHEN ? THEN backpack_in ELSE NULL END \
             WHERE id = ? AND run_id = ? AND status IN ('pending', 'running')",
        )
        .bind(result.status)
        .bind(&result.output)
        .bind(&result.backpack)
        .bind(&result.error)
        .bind(&result.execution_id)
        .bind(result.started_at_ms)
        .bind(result.duration_ms)
        .bind(result.keep_input)
        .bind(result.keep_input)
        .bind(step_id)
        .bind(&self.run_id)
        .execute(&mut *self.tx)
        .await
        .map_err(StoreError::db(what))?;
        Ok(done.rows_affected() == 1)
    }

    /// Adds `delta` to the live count of `frame` (creating it at 0); returns the new count.
    pub async fn add_live(&mut self, frame: &str, delta: i64) -> Result<i64, StoreError> {
        let what = self.what();
        let (live,): (i64,) = sqlx::query_as(
            "INSERT INTO run_frames (run_id, frame, live) VALUES (?, ?, ?) \
             ON CONFLICT (run_id, frame) DO UPDATE SET live = live + excluded.live \
             RETURNING live",
        )
        .bind(&self.run_id)
        .bind(frame)
        .bind(delta)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(StoreError::db(what))?;
        Ok(live)
    }

    /// Records a fan-out.
    pub async fn insert_group(&mut self, group: &GroupRecord) -> Result<(), StoreError> {
        let what = self.what();
        sqlx::query(
            "INSERT INTO run_groups (run_id, grp, parent_frame, from_step, transition_id, items, \
             settled, depth) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&self.run_id)
        .bind(&group.grp)
        .bind(&group.parent_frame)
        .bind(&group.from_step)
        .bind(group.transition_id)
        .bind(group.items)
        .bind(group.settled)
        .bind(group.depth)
        .execute(&mut *self.tx)
        .await
        .map_err(StoreError::db(what))?;
        Ok(())
    }

    /// Counts one more item of fan-out `grp` as settled; returns the group as it is now.
    pub async fn settle_item(&mut self, grp: &str) -> Result<GroupRecord, StoreError> {
        let what = self.what();
        let row = sqlx::query(
            "UPDATE run_groups SET settled = settled + 1 WHERE run_id = ? AND grp = ? \
             RETURNING grp, parent_frame, from_step, transition_id, items, settled, depth",
        )
        .bind(&self.run_id)
        .bind(grp)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(StoreError::db(what))?
        .ok_or_else(|| StoreError::Corrupt(format!("run {}: no fan-out `{grp}`", self.run_id)))?;
        group_from_row(&row)
    }

    /// Fan-out `grp` as recorded.
    pub async fn group(&mut self, grp: &str) -> Result<GroupRecord, StoreError> {
        let what = self.what();
        let row = sqlx::query(
            "SELECT grp, parent_frame, from_step, transition_id, items, settled, depth \
             FROM run_groups WHERE run_id = ? AND grp = ?",
        )
        .bind(&self.run_id)
        .bind(grp)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(StoreError::db(what))?
        .ok_or_else(|| StoreError::Corrupt(format!("run {}: no fan-out `{grp}`", self.run_id)))?;
        group_from_row(&row)
    }

    /// Puts an output at a join (`place`, `transition_id`).
    pub async fn add_join(
        &mut self,
        place: &str,
        transition_id: i64,
        entry: &JoinEntry,
    ) -> Result<(), StoreError> {
        let what = self.what();
        sqlx::query(
            "INSERT INTO run_joins (run_id, place, transition_id, slot, step_id, seq, output, \
             backpack) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(&self.run_id)
        .bind(place)
        .bind(transition_id)
        .bind(entry.slot)
        .bind(&entry.step_id)
        .bind(entry.seq)
        .bind(&entry.output)
        .bind(&entry.backpack)
        .execute(&mut *self.tx)
        .await
        .map_err(StoreError::db(what))?;
        Ok(())
    }

    /// The outputs waiting at `place` for `transition_id`, by slot then arrival.
    pub async fn joins(
        &mut self,
        place: &str,
        transition_id: i64,
    ) -> Result<Vec<JoinEntry>, StoreError> {
        let what = self.what();
        let rows: Vec<(i64, String, i64, String, String)> = sqlx::query_as(
            "SELECT slot, step_id, seq, output, backpack FROM run_joins \
             WHERE run_id = ? AND place = ? AND transition_id = ? ORDER BY slot, seq",
        )
        .bind(&self.run_id)
        .bind(place)
        .bind(transition_id)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(StoreError::db(what))?;
        Ok(rows
            .into_iter()
            .map(|(slot, step_id, seq, output, backpack)| JoinEntry {
                slot,
                step_id,
                seq,
                output,
                backpack,
            })
            .collect())
    }

    /// The transitions with outputs waiting at `place`.
    pub async fn join_transitions(&mut self, place: &str) -> Result<Vec<i64>, StoreError> {
        let what = self.what();
        let rows: Vec<(i64,)> = sqlx::query_as(
            "SELECT DISTINCT transition_id FROM run_joins WHERE run_id = ? AND place = ? \
             ORDER BY transition_id",
        )
        .bind(&self.run_id)
        .bind(place)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(StoreError::db(what))?;
        Ok(rows.into_iter().map(|(t,)| t).collect())
    }

    /// Removes consumed join entries.
    pub async fn remove_joins(
        &mut self,
        transition_id: i64,
        step_ids: &[String],
    ) -> Result<(), StoreError> {
        let what = self.what();
        for step_id in step_ids {
            sqlx::query(
                "DELETE FROM run_joins WHERE run_id = ? AND step_id = ? AND transition_id = ?",
            )
            .bind(&self.run_id)
            .bind(step_id)
            .bind(transition_id)
            .execute(&mut *self.tx)
            .await
            .map_err(StoreError::db(what.clone()))?;
        }
        Ok(())
    }

    /// Sets the run's failure (the first one set stays) and cancels its pending steps.
    pub async fn fail_run(&mut self, error: &Value) -> Result<(), StoreError> {
        let what = self.what();
        sqlx::query("UPDATE runs SET error = COALESCE(error, ?) WHERE id = ?")
            .bind(error.to_string())
            .bind(&self.run_id)
            .execute(&mut *self.tx)
            .await
            .map_err(StoreError::db(what))?;
        self.cancel_pending().await
    }

    /// Marks the run cancelled-on-request and cancels its pending steps.
    pub async fn request_cancel(&mut self) -> Result<(), StoreError> {
        let what = self.what();
        sqlx::query("UPDATE runs SET cancel_requested = 1 WHERE id = ?")
            .bind(&self.run_id)
            .execute(&mut *self.tx)
            .await
            .map_err(StoreError::db(what))?;
        self.cancel_pending().await
    }

    async fn cancel_pending(&mut self) -> Result<(), StoreError> {
        self.cancel_steps("status = 'pending'").await
    }

    /// Cancels every unfinished step, running ones too (at start, for a run that was
    /// halted when the server stopped: what was running then is gone).
    pub async fn cancel_unfinished(&mut self) -> Result<(), StoreError> {
        self.cancel_steps("status IN ('pending', 'running')").await
    }

    async fn cancel_steps(&mut self, which: &str) -> Result<(), StoreError> {
        let what = self.what();
        sqlx::query(&format!(
            "UPDATE steps SET status = 'cancelled', input = NULL, backpack_in = NULL \
             WHERE run_id = ? AND {which}"
        ))
        .bind(&self.run_id)
        .execute(&mut *self.tx)
        .await
        .map_err(StoreError::db(what))?;
        Ok(())
    }

    /// Sets the run's response (an endpoint's reply) unless it has one; `true` if this
    /// one is it.
    pub async fn set_response(&mut self, response: &Value) -> Result<bool, StoreError> {
        let what = self.what();
        let done = sqlx::query("UPDATE runs SET response = ? WHERE id = ? AND response IS NULL")
            .bind(response.to_string())
            .bind(&self.run_id)
            .execute(&mut *self.tx)
            .await
            .map_err(StoreError::db(what))?;
        Ok(done.rows_affected() == 1)
    }

    /// Replaces the run's failure (to name more failed steps in it).
    pub async fn set_run_error(&mut self, error: &Value) -> Result<(), StoreError> {
        let what = self.what();
        sqlx::query("UPDATE runs SET error = ? WHERE id = ?")
            .bind(error.to_string())
            .bind(&self.run_id)
            .execute(&mut *self.tx)
            .await
            .map_err(StoreError::db(what))?;
        Ok(())
    }

    /// The live count of `frame` (0 if it has none).
    pub async fn live(&mut self, frame: &str) -> Result<i64, StoreError> {
        let what = self.what();
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT live FROM run_frames WHERE run_id = ? AND frame = ?")
                .bind(&self.run_id)
                .bind(frame)
                .fetch_optional(&mut *self.tx)
                .await
                .map_err(StoreError::db(what))?;
        Ok(row.map_or(0, |(l,)| l))
    }

    /// Steps of the run not yet ended (pending or running).
    pub async fn unfinished_steps(&mut self) -> Result<i64, StoreError> {
        let what = self.what();
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM steps WHERE run_id = ? AND status IN ('pending', 'running')",
        )
        .bind(&self.run_id)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(StoreError::db(what))?;
        Ok(n)
    }

    /// Ends the run with `status`, dropping its bookkeeping (frames, fan-outs, joins).
    pub async fn end_run(&mut self, status: &str) -> Result<(), StoreError> {
        let what = self.what();
        sqlx::query(
            "UPDATE runs SET status = ?, ended_at_ms = ? WHERE id = ? AND status = 'running'",
        )
        .bind(status)
        .bind(now_ms())
        .bind(&self.run_id)
        .execute(&mut *self.tx)
        .await
        .map_err(StoreError::db(what.clone()))?;
        for table in ["run_frames", "run_groups", "run_joins"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE run_id = ?"))
                .bind(&self.run_id)
                .execute(&mut *self.tx)
                .await
                .map_err(StoreError::db(what.clone()))?;
        }
        Ok(())
    }

    /// Commits everything done in this transaction (and the step count).
    pub async fn commit(mut self) -> Result<(), StoreError> {
        let what = self.what();
        if let Some(steps) = self.next_seq {
            sqlx::query("UPDATE runs SET steps = ? WHERE id = ? AND steps < ?")
                .bind(steps)
                .bind(&self.run_id)
                .bind(steps)
                .execute(&mut *self.tx)
                .await
                .map_err(StoreError::db(what.clone()))?;
        }
        self.tx.commit().await.map_err(StoreError::db(what))
    }
}

fn group_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<GroupRecord, StoreError> {
    let db = |e| StoreError::Corrupt(format!("reading a fan-out: {e}"));
    Ok(GroupRecord {
        grp: row.try_get("grp").map_err(db)?,
        parent_frame: row.try_get("parent_frame").map_err(db)?,
        from_step: row.try_get("from_step").map_err(db)?,
        transition_id: row.try_get("transition_id").map_err(db)?,
        items: row.try_get("items").map_err(db)?,
        settled: row.try_get("settled").map_err(db)?,
        depth: row.try_get("depth").map_err(db)?,
    })
}
