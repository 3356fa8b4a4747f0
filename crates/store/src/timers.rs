//! Timers' slots (BRIEF §7b `[[timers]]`): which slot of each timer fired last, and the
//! recent fires with their runs.
//!
//! A timer is known by its account, project and name, not by deployment, so a redeploy or
//! a rollback keeps its state. Firing slot S is [`RunTx::claim_timer_slot`], inside the
//! transaction that creates the run: it moves `last_slot_ms` up to S (only up) and records
//! the fire, or claims nothing when S (or a later slot) already fired. Either both the
//! claim and the run are committed or neither is, so after `kill -9` a slot has fired once
//! or not at all.

use rusqlite::params;
use sqlx::Row;

use crate::{RunTx, Store, StoreError};

/// How many fires are kept per timer (older ones are deleted as new ones are recorded).
pub const MAX_TIMER_FIRES_KEPT: i64 = 100;

/// A timer's state: the latest slot counted as fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerSlot {
    pub account_id: String,
    pub project: String,
    pub timer: String,
    /// The schedule as the manifest wrote it when the state was recorded.
    pub schedule: String,
    /// The latest slot fired (or counted as fired when the timer was first seen), in
    /// milliseconds since the Unix epoch.
    pub last_slot_ms: i64,
}

/// One slot that fired: the run it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerFire {
    pub slot_ms: i64,
    pub run_id: String,
    /// When the slot was claimed (in the transaction creating its run, before its commit),
    /// in milliseconds since the epoch.
    pub fired_at_ms: i64,
}

/// What firing one slot claims, inside the run's creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerClaim {
    pub account_id: String,
    pub project: String,
    pub timer: String,
    pub slot_ms: i64,
    pub fired_at_ms: i64,
}

impl Store {
    /// Records the timer as known (the first time: `first_slot_ms`, the latest slot at or
    /// before now, counts as fired) and returns its state. A timer whose schedule changed
    /// starts afresh the same way (its `last_slot_ms` never goes down).
    pub async fn know_timer(
        &self,
        account_id: &str,
        project: &str,
        timer: &str,
        schedule: &str,
        first_slot_ms: i64,
    ) -> Result<TimerSlot, StoreError> {
        let what = || format!("recording timer `{timer}` of project `{project}`");
        let mut tx = self.begin_write(what()).await?;
        sqlx::query(
            "INSERT INTO timer_slots (account_id, project, timer, schedule, last_slot_ms) \
             VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (account_id, project, timer) DO UPDATE SET \
             schedule = excluded.schedule, \
             last_slot_ms = MAX(timer_slots.last_slot_ms, excluded.last_slot_ms) \
             WHERE timer_slots.schedule <> excluded.schedule",
        )
        .bind(account_id)
        .bind(project)
        .bind(timer)
        .bind(schedule)
        .bind(first_slot_ms)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(what()))?;
        let (schedule, last_slot_ms): (String, i64) = sqlx::query_as(
            "SELECT schedule, last_slot_ms FROM timer_slots \
             WHERE account_id = ? AND project = ? AND timer = ?",
        )
        .bind(account_id)
        .bind(project)
        .bind(timer)
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::db(what()))?;
        tx.commit().await.map_err(StoreError::db(what()))?;
        Ok(TimerSlot {
            account_id: account_id.to_string(),
            project: project.to_string(),
            timer: timer.to_string(),
            schedule,
            last_slot_ms,
        })
    }

    /// The state of one timer, if it is known.
    pub async fn timer_slot(
        &self,
        account_id: &str,
        project: &str,
        timer: &str,
    ) -> Result<Option<TimerSlot>, StoreError> {
        let row: Option<(String, i64)> = sqlx::query_as(
            "SELECT schedule, last_slot_ms FROM timer_slots \
             WHERE account_id = ? AND project = ? AND timer = ?",
        )
        .bind(account_id)
        .bind(project)
        .bind(timer)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::db(format!(
            "reading timer `{timer}` of project `{project}`"
        )))?;
        Ok(row.map(|(schedule, last_slot_ms)| TimerSlot {
            account_id: account_id.to_string(),
            project: project.to_string(),
            timer: timer.to_string(),
            schedule,
            last_slot_ms,
        }))
    }

    /// Every known timer, all accounts (account, project, timer).
    pub async fn known_timers(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        sqlx::query_as("SELECT account_id, project, timer FROM timer_slots")
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::db("listing timers"))
    }

    /// Forgets a timer no longer in its project's live deployment: if it comes back, it is
    /// new again (it fires at its next slot). Its recent fires stay.
    pub async fn forget_timer(
        &self,
        account_id: &str,
        project: &str,
        timer: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM timer_slots WHERE account_id = ? AND project = ? AND timer = ?")
            .bind(account_id)
            .bind(project)
            .bind(timer)
            .execute(&self.pool)
            .await
            .map_err(StoreError::db(format!(
                "forgetting timer `{timer}` of project `{project}`"
            )))?;
        Ok(())
    }

    /// The timer's most recent fires (at most `limit`), newest first.
    pub async fn timer_fires(
        &self,
        account_id: &str,
        project: &str,
        timer: &str,
        limit: u32,
    ) -> Result<Vec<TimerFire>, StoreError> {
        let what = || format!("reading the fires of timer `{timer}` of project `{project}`");
        let rows = sqlx::query(
            "SELECT slot_ms, run_id, fired_at_ms FROM timer_fires \
             WHERE account_id = ? AND project = ? AND timer = ? \
             ORDER BY slot_ms DESC LIMIT ?",
        )
        .bind(account_id)
        .bind(project)
        .bind(timer)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db(what()))?;
        rows.iter()
            .map(|row| {
                let db = |e| StoreError::Corrupt(format!("{}: {e}", what()));
                Ok(TimerFire {
                    slot_ms: row.try_get("slot_ms").map_err(db)?,
                    run_id: row.try_get("run_id").map_err(db)?,
                    fired_at_ms: row.try_get("fired_at_ms").map_err(db)?,
                })
            })
            .collect()
    }

    /// Every live deployment whose manifest mentions timers (a cheap filter: a manifest
    /// with `[[timers]]` contains the word), as (account, project, deployment id, number).
    pub async fn live_deployments_with_timers(
        &self,
    ) -> Result<Vec<(String, String, i64, i64)>, StoreError> {
        sqlx::query_as(
            "SELECT p.account_id, p.name, d.id, d.number FROM projects p \
             JOIN deployments d ON d.id = p.live_deployment_id \
             WHERE instr(d.manifest, 'timers') > 0 ORDER BY d.id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db("listing live deployments with timers"))
    }
}

impl RunTx<'_> {
    /// Claims the timer's slot for the run this transaction creates: `true` if it did
    /// (`last_slot_ms` moved up to the slot and the fire is recorded), `false` if this slot
    /// or a later one already fired (the caller must then not commit).
    pub fn claim_timer_slot(&mut self, claim: &TimerClaim) -> Result<bool, StoreError> {
        let moved = self.exec(
            "UPDATE timer_slots SET last_slot_ms = ?1 \
             WHERE account_id = ?2 AND project = ?3 AND timer = ?4 AND last_slot_ms < ?1",
            params![claim.slot_ms, claim.account_id, claim.project, claim.timer],
        )?;
        if moved != 1 {
            return Ok(false);
        }
        let run_id = self.run_id().to_string();
        let recorded = self.exec(
            "INSERT INTO timer_fires (account_id, project, timer, slot_ms, run_id, fired_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
            params![
                claim.account_id,
                claim.project,
                claim.timer,
                claim.slot_ms,
                run_id,
                claim.fired_at_ms
            ],
        )?;
        if recorded != 1 {
            return Ok(false);
        }
        self.exec(
            "DELETE FROM timer_fires WHERE account_id = ?1 AND project = ?2 AND timer = ?3 \
             AND slot_ms < (SELECT slot_ms FROM timer_fires \
             WHERE account_id = ?1 AND project = ?2 AND timer = ?3 \
             ORDER BY slot_ms DESC LIMIT 1 OFFSET ?4)",
            params![
                claim.account_id,
                claim.project,
                claim.timer,
                MAX_TIMER_FIRES_KEPT - 1
            ],
        )?;
        Ok(true)
    }
}
