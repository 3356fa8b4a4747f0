//! Timers (BRIEF §7b `[[timers]]`): each slot of each live timer starts one run, exactly
//! once — across restarts, redeploys and rollbacks.
//!
//! One loop ([`Engine::run_timers`]) holds the timers of every live deployment (read from
//! the store at start and again whenever a deploy, rollback or project deletion says so:
//! [`Engine::deployments_changed`]) and sleeps until the earliest next slot. Firing slot S
//! is one store transaction: the run with its first steps, and the claim of S
//! ([`refinery_store::RunTx::claim_timer_slot`], which moves the timer's last slot up to
//! S only if it is below S). So after `kill -9` at any moment S has fired with its run or
//! not at all, and a second claim of S (or of an earlier slot) claims nothing.
//!
//! - **A new timer** (or one whose schedule changed, or one that comes back after being
//!   removed) counts the latest slot at or before now as fired: it fires at its next slot.
//! - **After downtime** only the most recent missed slot fires, once, as soon as the
//!   server is up; earlier missed slots are skipped (`refinery_timer_catch_up_fires`).
//! - **A fire that cannot start** (the account's run limit, a store error) is tried again
//!   every second until the timer's next slot comes; then that slot is due instead.
//! - **A disabled account's** slots are skipped (none of its code runs).
//!
//! The run starts at the timer (its `then` blocks) with the timer's `input` exactly and
//! an empty backpack; its slot and run are listed by `GET /v1/projects/{p}/timers`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use refinery_domain::Timer;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Notify;

use crate::engine::{lock, now_ms, Engine};
use crate::error::EngineError;
use crate::view::rfc3339;

/// The longest the loop sleeps without looking again (a wall clock that jumped is seen
/// within this long).
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// How soon a fire that could not start is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// The most recent fires `GET /v1/projects/{p}/timers` may list per timer.
pub const MAX_FIRES_LISTED: u32 = 100;

type TimerKey = (String, String, String);

/// What wakes the timers' loop, and what it reports.
pub(crate) struct TimerLoop {
    notify: Notify,
    /// The live deployments changed: read the timers again.
    dirty: AtomicBool,
    /// The last error of a timer whose fire could not start (cleared by its next fire).
    errors: Mutex<HashMap<TimerKey, String>>,
}

impl Default for TimerLoop {
    fn default() -> Self {
        TimerLoop {
            notify: Notify::new(),
            dirty: AtomicBool::new(true),
            errors: Mutex::new(HashMap::new()),
        }
    }
}

impl TimerLoop {
    pub fn wake(&self) {
        self.notify.notify_one();
    }
}

/// One live timer as the loop holds it.
struct LiveTimer {
    account_id: String,
    project: String,
    timer: Timer,
    /// The latest slot fired (or counted as fired).
    last_slot_ms: i64,
    /// A fire that could not start is not tried again before this.
    retry_at_ms: i64,
}

impl LiveTimer {
    fn key(&self) -> TimerKey {
        (
            self.account_id.clone(),
            self.project.clone(),
            self.timer.name.clone(),
        )
    }
}

/// A timer as `GET /v1/projects/{p}/timers` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TimerView {
    pub name: String,
    pub schedule: String,
    /// The next slot that fires (a missed slot about to fire, or the next one), RFC 3339
    /// UTC; `null` if the schedule has no further slot.
    pub next_fire_at: Option<String>,
    /// The slot that fired last; `null` if none has.
    pub last_fired_at: Option<String>,
    /// The run the last fire started.
    pub last_run_id: Option<String>,
    /// Why the due slot could not start a run, while it is being tried again.
    pub last_error: Option<String>,
    /// The most recent fires, newest first.
    pub fires: Vec<TimerFireView>,
}

/// One fire of a timer.
#[derive(Debug, Clone, Serialize)]
pub struct TimerFireView {
    pub slot: String,
    pub run_id: String,
    pub fired_at: String,
    /// How long after its slot the run was created, in milliseconds.
    pub late_ms: i64,
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

impl Engine {
    /// The live deployments changed (a deploy, a rollback, a project deleted): the timers'
    /// loop reads its timers again.
    pub fn deployments_changed(&self) {
        self.inner.timers.dirty.store(true, Ordering::Release);
        self.inner.timers.wake();
    }

    /// The timers of the account's `project` (its live deployment), with their next slot
    /// and their last `fires` fires (at most [`MAX_FIRES_LISTED`]).
    pub async fn timers(
        &self,
        account_id: &str,
        project: &str,
        fires: u32,
    ) -> Result<Vec<TimerView>, EngineError> {
        let deployment = self.live_service(account_id, project).await?;
        let now = now_ms();
        let mut views = Vec::with_capacity(deployment.timers.len());
        for timer in &deployment.timers {
            let store = &self.inner.store;
            let state = store.timer_slot(account_id, project, &timer.name).await?;
            let schedule = &timer.schedule;
            let latest = schedule.latest_at_or_before(at(now));
            let due = match (&state, latest) {
                (Some(s), Some(latest))
                    if s.schedule == schedule.as_str()
                        && latest.timestamp_millis() > s.last_slot_ms =>
                {
                    Some(latest)
                }
                _ => schedule.next_after(at(now)),
            };
            let recent = store
                .timer_fires(
                    account_id,
                    project,
                    &timer.name,
                    fires.clamp(1, MAX_FIRES_LISTED),
                )
                .await?;
            let key = (
                account_id.to_string(),
                project.to_string(),
                timer.name.clone(),
            );
            views.push(TimerView {
                name: timer.name.clone(),
                schedule: schedule.as_str().to_string(),
                next_fire_at: due.map(|t| rfc3339(t.timestamp_millis())),
                last_fired_at: recent.first().map(|f| rfc3339(f.slot_ms)),
                last_run_id: recent.first().map(|f| f.run_id.clone()),
                last_error: lock(&self.inner.timers.errors).get(&key).cloned(),
                fires: recent
                    .iter()
                    .take(fires as usize)
                    .map(|f| TimerFireView {
                        slot: rfc3339(f.slot_ms),
                        run_id: f.run_id.clone(),
                        fired_at: rfc3339(f.fired_at_ms),
                        late_ms: f.fired_at_ms - f.slot_ms,
                    })
                    .collect(),
            });
        }
        Ok(views)
    }

    /// The timers' loop: fires every due slot, then sleeps until the next one (or a
    /// change of the live deployments, or the engine stopping).
    pub(crate) async fn run_timers(self) {
        let started_ms = now_ms();
        let mut live: Vec<LiveTimer> = Vec::new();
        loop {
            let inner = &self.inner;
            if inner.stopping.load(Ordering::Acquire) {
                return;
            }
            let mut wake_at = now_ms() + MAX_SLEEP.as_millis() as i64;
            if inner.timers.dirty.swap(false, Ordering::AcqRel) {
                match self.load_timers().await {
                    Ok(timers) => live = timers,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read the live timers; trying again in a second");
                        inner.timers.dirty.store(true, Ordering::Release);
                        wake_at = now_ms() + RETRY.as_millis() as i64;
                    }
                }
            }
            for timer in &mut live {
                let now = now_ms();
                let due = timer
                    .timer
                    .schedule
                    .latest_at_or_before(at(now))
                    .map(|t| t.timestamp_millis())
                    .filter(|slot| *slot > timer.last_slot_ms && timer.retry_at_ms <= now);
                if let Some(slot) = due {
                    if !self.fire(timer, slot, started_ms).await {
                        return;
                    }
                }
                if timer.retry_at_ms > now {
                    wake_at = wake_at.min(timer.retry_at_ms);
                }
                let from = at(now.max(timer.last_slot_ms));
                if let Some(next) = timer.timer.schedule.next_after(from) {
                    wake_at = wake_at.min(next.timestamp_millis());
                }
            }
            let sleep = Duration::from_millis(u64::try_from(wake_at - now_ms()).unwrap_or(0));
            tokio::select! {
                _ = inner.timers.notify.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Fires `slot` of `timer`; `false` when the engine is stopping.
    async fn fire(&self, timer: &mut LiveTimer, slot: i64, started_ms: i64) -> bool {
        let inner = &self.inner;
        let key = timer.key();
        // Read afresh: an account disabled since is seen at once.
        let started = match inner.store.account(&timer.account_id).await {
            Ok(Some(account)) if account.is_disabled() => {
                // None of a disabled account's code runs: its slots are skipped.
                timer.last_slot_ms = slot;
                return true;
            }
            Ok(Some(account)) => {
                self.begin(
                    &account,
                    &timer.project,
                    &timer.timer.name,
                    timer.timer.input.clone(),
                    json!({}),
                    crate::engine::Begin {
                        slot: Some(slot),
                        ..crate::engine::Begin::default()
                    },
                )
                .await
            }
            Ok(None) => Err(EngineError::Internal(format!(
                "account {} no longer exists",
                timer.account_id
            ))),
            Err(e) => Err(e.into()),
        };
        match started {
            Ok(run) => {
                let late_s = (now_ms() - slot).max(0) as f64 / 1000.0;
                timer.last_slot_ms = slot;
                timer.retry_at_ms = 0;
                lock(&inner.timers.errors).remove(&key);
                inner.metrics.timer_fires.inc();
                if slot >= started_ms {
                    inner.metrics.timer_lateness_seconds.observe(late_s);
                } else {
                    inner.metrics.timer_catch_up_fires.inc();
                }
                tracing::debug!(project = %timer.project, timer = %timer.timer.name, slot = %rfc3339(slot), run = %run.run_id, late_s, "timer fired");
            }
            Err(EngineError::ShuttingDown) => return false,
            Err(EngineError::SlotFired { .. }) => {
                // Fired already (this slot or a later one): take the store's word.
                match inner
                    .store
                    .timer_slot(&timer.account_id, &timer.project, &timer.timer.name)
                    .await
                {
                    Ok(Some(state)) => timer.last_slot_ms = state.last_slot_ms.max(slot),
                    _ => timer.last_slot_ms = slot,
                }
            }
            Err(e) => {
                let message = format!(
                    "slot {} could not start a run: {e}; it is tried again every second until the next slot",
                    rfc3339(slot)
                );
                let repeated = lock(&inner.timers.errors).insert(key, message.clone())
                    == Some(message.clone());
                if repeated {
                    tracing::debug!(project = %timer.project, timer = %timer.timer.name, "{message}");
                } else {
                    tracing::warn!(project = %timer.project, timer = %timer.timer.name, "{message}");
                }
                timer.retry_at_ms = now_ms() + RETRY.as_millis() as i64;
            }
        }
        true
    }

    /// The timers of every live deployment, with their state (a timer first seen is
    /// recorded); forgets the state of timers no longer live.
    async fn load_timers(&self) -> Result<Vec<LiveTimer>, EngineError> {
        let inner = &self.inner;
        let store = &inner.store;
        let now = now_ms();
        let mut live = Vec::new();
        let mut present: HashSet<TimerKey> = HashSet::new();
        let mut unreadable: HashSet<(String, String)> = HashSet::new();
        for (account_id, project, id, number) in store.live_deployments_with_timers().await? {
            let deployment = match inner.deployment_of(&account_id, &project, id, number).await {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(account = %account_id, %project, error = %e, "the live deployment's timers cannot be read; they do not fire");
                    unreadable.insert((account_id, project));
                    continue;
                }
            };
            for timer in &deployment.timers {
                let first = timer
                    .schedule
                    .latest_at_or_before(at(now))
                    .map_or(now, |t| t.timestamp_millis());
                let state = store
                    .know_timer(
                        &account_id,
                        &project,
                        &timer.name,
                        timer.schedule.as_str(),
                        first,
                    )
                    .await?;
                present.insert((account_id.clone(), project.clone(), timer.name.clone()));
                live.push(LiveTimer {
                    account_id: account_id.clone(),
                    project: project.clone(),
                    timer: timer.clone(),
                    last_slot_ms: state.last_slot_ms,
                    retry_at_ms: 0,
                });
            }
        }
        for key in store.known_timers().await? {
            let project = (key.0.clone(), key.1.clone());
            if !present.contains(&key) && !unreadable.contains(&project) {
                store.forget_timer(&key.0, &key.1, &key.2).await?;
                lock(&inner.timers.errors).remove(&key);
            }
        }
        Ok(live)
    }
}
