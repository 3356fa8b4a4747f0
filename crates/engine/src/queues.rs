//! Durable queues (BRIEF §7b `[[queues]]`): sending, consuming in batches, settling, dead
//! letters. The messages are the store's ([`refinery_store::queues`]).
//!
//! # Delivery
//!
//! At least once. A *pump* per queue with messages claims up to `batch_size` visible
//! messages (each received once more, invisible for `visibility_timeout_s`) and starts a
//! run at the queue: its consumer block gets the batch as its input, a list of
//! `{"messageId": "msg_...", "body": JSON, "receiveCount": N, "enqueuedAt": RFC 3339}`.
//! The runs in flight per queue are held to the consumer block's `max_concurrency`
//! (back-pressure: the rest waits in the queue).
//!
//! The batch is settled in the commit of the consumer's step (atomic with its result):
//! - the block succeeded: its messages are deleted, except those it names in
//!   `{"batchItemFailures": [{"itemIdentifier": "msg_..."}]}` (as AWS Lambda), which failed
//!   (a `batchItemFailures` that is not such a list, or names a message not in the batch,
//!   fails the whole batch, as Lambda does);
//! - it failed with no retry left (its `retry` policy): every message failed.
//!
//! A failed message is visible again at once, or moves to the queue's dead-letter list if
//! it was received `max_receive_count` times. A consumer that crashed or hung (or a server
//! killed mid-batch) settles nothing: its messages become visible again when their
//! visibility timeout passes, and a message received `max_receive_count` times is
//! dead-lettered at its next receipt instead of delivered. A resumed run settles only the
//! messages it still holds.
//!
//! A `then` from a block into a queue enqueues its output (a list: one message per item)
//! in the step's own commit; over a limit, the run fails (`QueueFull`, `MessageTooLarge`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use refinery_domain::{NodeKind, TransitionType};
use refinery_store::{
    Enqueued, QueueMessage, QueueRef, QueueStats, RunRecord, RunTx, Settlement, StepRecord,
};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::advance::Plan;
use crate::engine::{lock, now_ms, Engine, EngineConfig, Inner, ServiceDeployment};
use crate::error::EngineError;

/// How often an idle pump looks again even if nothing woke it (visibility timeouts that
/// passed, a deployment that changed).
const POLL: Duration = Duration::from_secs(1);

/// A queue's settings as the live deployment declares them.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct QueueSettings {
    pub batch_size: u32,
    pub visibility_timeout_s: u32,
    pub max_receive_count: u32,
    /// Its consumer block.
    pub consumer: String,
    /// Runs of it in flight at once (the consumer's `max_concurrency`).
    pub max_in_flight: u32,
}

/// A queue as `GET /v1/projects/{p}/queues/{q}` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueueView {
    pub project: String,
    pub queue: String,
    pub visible: u64,
    pub in_flight: u64,
    pub dead_letter: u64,
    /// Age of the oldest message not dead-lettered, in seconds (`null`: none).
    pub oldest_age_s: Option<f64>,
    pub settings: QueueSettings,
}

/// A dead letter as listed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MessageView {
    pub message_id: String,
    pub body: Value,
    pub receive_count: i64,
    pub enqueued_at: String,
    pub dead_lettered_at: Option<String>,
}

/// The pumps, one per queue with work.
pub(crate) struct Queues {
    inner: Weak<Inner>,
    pumps: Mutex<HashMap<QueueRef, PumpState>>,
    /// The queue each consumer run (in flight) belongs to.
    runs: Mutex<HashMap<String, QueueRef>>,
}

#[derive(Default)]
struct PumpState {
    /// A pump task is running for this queue.
    running: bool,
    /// Woken since the pump last looked.
    dirty: bool,
    notify: Arc<Notify>,
    in_flight: HashSet<String>,
}

impl Queues {
    pub fn new(inner: Weak<Inner>) -> Queues {
        Queues {
            inner,
            pumps: Mutex::new(HashMap::new()),
            runs: Mutex::new(HashMap::new()),
        }
    }

    /// Something changed in `queue` (messages sent, released, redriven, a run ended):
    /// its pump looks again (started if there is none).
    pub fn wake(&self, queue: &QueueRef) {
        let mut pumps = lock(&self.pumps);
        let state = pumps.entry(queue.clone()).or_default();
        state.dirty = true;
        if state.running {
            state.notify.notify_one();
            return;
        }
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        state.running = true;
        let notify = state.notify.clone();
        drop(pumps);
        tokio::spawn(pump(inner, queue.clone(), notify));
    }

    /// A run left at start (resumed) counts in flight for the queue it started at.
    pub fn adopt(&self, run: &RunRecord, deployment: &ServiceDeployment) {
        if !deployment.queues.contains_key(&run.start) {
            return;
        }
        let queue = queue_ref(&run.account_id, &run.project, &run.start);
        lock(&self.pumps)
            .entry(queue.clone())
            .or_default()
            .in_flight
            .insert(run.id.clone());
        lock(&self.runs).insert(run.id.clone(), queue);
    }

    /// Run `run_id` ended: if it consumed a queue, its place frees up.
    pub fn run_ended(&self, run_id: &str) {
        let Some(queue) = lock(&self.runs).remove(run_id) else {
            return;
        };
        if let Some(state) = lock(&self.pumps).get_mut(&queue) {
            state.in_flight.remove(run_id);
        }
        self.wake(&queue);
    }

    fn in_flight(&self, queue: &QueueRef) -> usize {
        lock(&self.pumps)
            .get(queue)
            .map_or(0, |s| s.in_flight.len())
    }

    fn track(&self, queue: &QueueRef, run_id: &str) {
        lock(&self.pumps)
            .entry(queue.clone())
            .or_default()
            .in_flight
            .insert(run_id.to_string());
        lock(&self.runs).insert(run_id.to_string(), queue.clone());
    }

    fn untrack(&self, queue: &QueueRef, run_id: &str) {
        lock(&self.runs).remove(run_id);
        if let Some(state) = lock(&self.pumps).get_mut(queue) {
            state.in_flight.remove(run_id);
        }
    }

    /// The pump of `queue` stops unless it was woken meanwhile or has runs in flight;
    /// `true` if it stopped.
    fn retire(&self, queue: &QueueRef, force: bool) -> bool {
        let mut pumps = lock(&self.pumps);
        let Some(state) = pumps.get_mut(queue) else {
            return true;
        };
        if !force && (state.dirty || !state.in_flight.is_empty()) {
            return false;
        }
        state.running = false;
        if state.in_flight.is_empty() && !state.dirty {
            pumps.remove(queue);
        }
        true
    }

    fn clear_dirty(&self, queue: &QueueRef) {
        if let Some(state) = lock(&self.pumps).get_mut(queue) {
            state.dirty = false;
        }
    }
}

fn queue_ref(account_id: &str, project: &str, queue: &str) -> QueueRef {
    QueueRef {
        account_id: account_id.to_string(),
        project: project.to_string(),
        queue: queue.to_string(),
    }
}

/// What the pump should do next.
enum Next {
    /// Look again at this time (or when woken).
    At(Option<i64>),
    /// The queue has nothing left to deliver and nothing in flight.
    Idle,
}

/// One queue's pump: claims batches and starts their runs while places are free.
async fn pump(inner: Arc<Inner>, queue: QueueRef, notify: Arc<Notify>) {
    loop {
        if inner.is_stopping() {
            inner.queues.retire(&queue, true);
            return;
        }
        inner.queues.clear_dirty(&queue);
        let next = match fill(&inner, &queue).await {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(queue = %queue.queue, project = %queue.project, error = %e, "a queue could not be served; trying again");
                Next::At(Some(now_ms() + 1000))
            }
        };
        let wait = match next {
            Next::Idle => {
                if inner.queues.retire(&queue, false) {
                    return;
                }
                POLL
            }
            Next::At(None) => POLL,
            Next::At(Some(at)) => {
                Duration::from_millis(u64::try_from((at - now_ms()).max(5)).unwrap_or(5)).min(POLL)
            }
        };
        let _ = tokio::time::timeout(wait, notify.notified()).await;
    }
}

/// Starts runs for `queue` while it has visible messages and free places.
async fn fill(inner: &Arc<Inner>, queue: &QueueRef) -> Result<Next, EngineError> {
    let Some(settings) = inner.queue_settings(queue).await? else {
        // No live deployment declares it (removed, or redeployed without it): its
        // messages wait; the pump sleeps until woken or the next poll.
        return Ok(if inner.queues.in_flight(queue) == 0 {
            Next::Idle
        } else {
            Next::At(None)
        });
    };
    let Some(account) = inner.account_of(&queue.account_id).await? else {
        return Ok(Next::Idle);
    };
    let engine = Engine {
        inner: inner.clone(),
    };
    loop {
        if inner.queues.in_flight(queue) >= settings.max_in_flight as usize {
            return Ok(Next::At(None));
        }
        let run_id = crate::advance::new_run_id();
        let claimed = {
            inner
                .store
                .claim_messages(
                    queue,
                    &run_id,
                    settings.batch_size,
                    i64::from(settings.visibility_timeout_s) * 1000,
                    i64::from(settings.max_receive_count),
                )
                .await?
        };
        if claimed.dead_lettered > 0 {
            inner
                .metrics
                .queue_dead_lettered
                .inc_by(claimed.dead_lettered);
        }
        if claimed.messages.is_empty() {
            return Ok(match claimed.next_visible_at_ms {
                None if inner.queues.in_flight(queue) == 0 => Next::Idle,
                next => Next::At(next),
            });
        }
        let input = Value::Array(claimed.messages.iter().map(delivery).collect());
        let count = claimed.messages.len() as u64;
        inner.queues.track(queue, &run_id);
        let started = engine
            .start_queue_run(
                &account,
                &queue.project,
                &queue.queue,
                input,
                run_id.clone(),
            )
            .await;
        match started {
            Ok(_) => {
                inner.metrics.queue_delivered.inc_by(count);
            }
            Err(e) => {
                inner.queues.untrack(queue, &run_id);
                {
                    inner.store.unclaim_messages(&run_id).await?;
                }
                return match e {
                    EngineError::TooManyRuns { .. } => Ok(Next::At(Some(now_ms() + 200))),
                    EngineError::ShuttingDown => Ok(Next::At(None)),
                    other => Err(other),
                };
            }
        }
    }
}

/// One message as its consumer gets it.
fn delivery(m: &QueueMessage) -> Value {
    json!({
        "messageId": m.id,
        "body": serde_json::from_str::<Value>(&m.body).unwrap_or(Value::Null),
        "receiveCount": m.receive_count,
        "enqueuedAt": rfc3339(m.enqueued_at_ms),
    })
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The settings of queue `name` in `deployment`, if it declares it.
pub(crate) fn settings_in(deployment: &ServiceDeployment, name: &str) -> Option<QueueSettings> {
    let q = deployment.queues.get(name)?;
    let consumer = deployment
        .graph
        .outgoing(name, TransitionType::Then)
        .iter()
        .find(|t| deployment.blocks.contains_key(&t.to))
        .map(|t| t.to.clone())?;
    let max_in_flight = deployment
        .block(&consumer)
        .map_or(1, |b| b.max_concurrency.max(1));
    Some(QueueSettings {
        batch_size: q.batch_size.max(1),
        visibility_timeout_s: q.visibility_timeout_s.max(1),
        max_receive_count: q.max_receive_count.max(1),
        consumer,
        max_in_flight,
    })
}

/// Checks one message against the size limit; its JSON text.
fn message_text(value: &Value, index: usize, config: &EngineConfig) -> Result<String, EngineError> {
    let text = value.to_string();
    if text.len() > config.max_message_bytes {
        return Err(EngineError::MessageTooLarge {
            index,
            size: text.len(),
            limit: config.max_message_bytes,
        });
    }
    Ok(text)
}

/// In a step's commit: `output` goes into queue `name` (a list: one message per item).
/// `Some(error)` (the run's failure) when a limit refuses it; nothing is enqueued then.
pub(crate) fn enqueue_output(
    tx: &mut RunTx<'_>,
    config: &EngineConfig,
    run: &RunRecord,
    from: &str,
    name: &str,
    output: &Value,
) -> Result<Option<Value>, EngineError> {
    let items: Vec<&Value> = match output {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let mut bodies = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        match message_text(item, i, config) {
            Ok(text) => bodies.push(text),
            Err(e) => {
                return Ok(Some(json!({
                    "type": "MessageTooLarge",
                    "message": format!("`{from}` sent queue `{name}` a message too large: {e}"),
                })))
            }
        }
    }
    let queue = queue_ref(&run.account_id, &run.project, name);
    match tx.enqueue_messages(&queue, &bodies, config.max_queued_messages)? {
        Enqueued::Stored(_) => Ok(None),
        Enqueued::Full { stored, limit } => Ok(Some(json!({
            "type": "QueueFull",
            "message": format!(
                "`{from}` could not enqueue {} message(s) into queue `{name}`: {}",
                bodies.len(),
                EngineError::QueueFull { stored, adding: bodies.len() as u64, limit }
            ),
        }))),
    }
}

/// In the commit of a step of `run`: if it is the consumer step of a queue run (its first
/// attempt or a retry of it) and its result is final, settles the batch the run holds.
pub(crate) fn settle(
    tx: &mut RunTx<'_>,
    run: &RunRecord,
    deployment: &ServiceDeployment,
    step: &StepRecord,
    plan: &Plan,
) -> Result<(), EngineError> {
    let Some(settings) = settings_in(deployment, &run.start) else {
        return Ok(());
    };
    if step.name != settings.consumer || !step.frame.is_empty() || step.depth != step.attempt {
        return Ok(());
    }
    let settlement = match plan {
        Plan::Fire { output, .. } => Settlement::Succeeded {
            failed: match item_failures(output) {
                Some(failed) => failed,
                None => return settle_with(tx, &Settlement::Failed, &settings),
            },
        },
        Plan::Failed { retry_in: None, .. } => Settlement::Failed,
        // Retried: the batch stays held.
        Plan::Failed { .. } => return Ok(()),
    };
    settle_with(tx, &settlement, &settings)
}

fn settle_with(
    tx: &mut RunTx<'_>,
    settlement: &Settlement,
    settings: &QueueSettings,
) -> Result<(), EngineError> {
    // A failure naming a message not in the batch fails the whole batch (as Lambda).
    let settlement = match settlement {
        Settlement::Succeeded { failed } if !failed.is_empty() => {
            let batch_ids = tx.held_message_ids()?;
            if failed.iter().any(|id| !batch_ids.contains(id)) {
                &Settlement::Failed
            } else {
                settlement
            }
        }
        other => other,
    };
    tx.settle_messages(settlement, i64::from(settings.max_receive_count))?;
    Ok(())
}

/// The message ids a consumer's output reports failed: `Some([])` for none, `None` when
/// `batchItemFailures` is there but malformed (the whole batch failed).
fn item_failures(output: &Value) -> Option<Vec<String>> {
    let Some(failures) = output.get("batchItemFailures") else {
        return Some(Vec::new());
    };
    match failures {
        Value::Null => Some(Vec::new()),
        Value::Array(list) => list
            .iter()
            .map(|f| f.get("itemIdentifier")?.as_str().map(str::to_string))
            .collect(),
        _ => None,
    }
}

impl Inner {
    /// The settings of `queue` in its project's live deployment; `None` if it has none.
    pub(crate) async fn queue_settings(
        &self,
        queue: &QueueRef,
    ) -> Result<Option<QueueSettings>, EngineError> {
        let Some(deployment) = self.live_service(&queue.account_id, &queue.project).await? else {
            return Ok(None);
        };
        Ok(settings_in(&deployment, &queue.queue))
    }

    async fn live_service(
        &self,
        account_id: &str,
        project: &str,
    ) -> Result<Option<Arc<ServiceDeployment>>, EngineError> {
        let live = match self.invocations.live_deployment(account_id, project).await {
            Ok(live) => live,
            Err(refinery_invocation::InvocationError::ProjectNotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        self.deployment_of(account_id, project, live.id, live.number)
            .await
    }

    /// After a step of `run` committed: wakes the queues it may have changed (the run's
    /// own, if it consumes one; those the step's transitions lead to).
    pub(crate) fn after_step(&self, run: &RunRecord, deployment: &ServiceDeployment, name: &str) {
        if deployment.queues.is_empty() {
            return;
        }
        if deployment.queues.contains_key(&run.start) {
            self.queues
                .wake(&queue_ref(&run.account_id, &run.project, &run.start));
        }
        for t in deployment.graph.transitions() {
            if t.from.iter().any(|f| f == name)
                && deployment.graph.kind(&t.to) == Some(NodeKind::Queue)
            {
                self.queues
                    .wake(&queue_ref(&run.account_id, &run.project, &t.to));
            }
        }
    }

    /// At start: every queue with messages gets its pump.
    pub(crate) async fn start_queues(&self) -> Result<(), EngineError> {
        for (queue, stats) in self.store.all_queue_stats().await? {
            if stats.visible + stats.in_flight > 0 {
                self.queues.wake(&queue);
            }
        }
        Ok(())
    }
}

impl Engine {
    /// The account's queue `queue` of `project`'s live deployment (its settings), or 404.
    async fn live_queue(
        &self,
        account_id: &str,
        project: &str,
        queue: &str,
    ) -> Result<(QueueRef, QueueSettings), EngineError> {
        let deployment = self
            .inner
            .live_service(account_id, project)
            .await?
            .ok_or_else(|| EngineError::ProjectNotFound {
                project: project.to_string(),
            })?;
        let settings =
            settings_in(&deployment, queue).ok_or_else(|| EngineError::QueueNotFound {
                project: project.to_string(),
                queue: queue.to_string(),
                queues: {
                    let mut names: Vec<String> = deployment.queues.keys().cloned().collect();
                    names.sort_unstable();
                    names
                },
            })?;
        Ok((queue_ref(account_id, project, queue), settings))
    }

    /// Sends `messages` to the account's queue: all are stored (durably) or none.
    pub async fn send_messages(
        &self,
        account_id: &str,
        project: &str,
        queue: &str,
        messages: &[Value],
    ) -> Result<usize, EngineError> {
        let (queue, _) = self.live_queue(account_id, project, queue).await?;
        let config = &self.inner.config;
        let bodies = messages
            .iter()
            .enumerate()
            .map(|(i, m)| message_text(m, i, config))
            .collect::<Result<Vec<_>, _>>()?;
        let enqueued = {
            self.inner
                .store
                .enqueue_messages(&queue, &bodies, config.max_queued_messages)
                .await?
        };
        match enqueued {
            Enqueued::Stored(n) => {
                self.inner.metrics.queue_sent.inc_by(n as u64);
                self.inner.queues.wake(&queue);
                Ok(n)
            }
            Enqueued::Full { stored, limit } => Err(EngineError::QueueFull {
                stored,
                adding: bodies.len() as u64,
                limit,
            }),
        }
    }

    /// The account's queue: its counts and settings.
    pub async fn queue(
        &self,
        account_id: &str,
        project: &str,
        queue: &str,
    ) -> Result<QueueView, EngineError> {
        let (queue, settings) = self.live_queue(account_id, project, queue).await?;
        let stats: QueueStats = self.inner.store.queue_stats(&queue).await?;
        Ok(QueueView {
            project: queue.project,
            queue: queue.queue,
            visible: stats.visible,
            in_flight: stats.in_flight,
            dead_letter: stats.dead_letter,
            oldest_age_s: stats
                .oldest_enqueued_at_ms
                .map(|t| ((now_ms() - t).max(0) as f64) / 1000.0),
            settings,
        })
    }

    /// The queue's dead letters, oldest first (at most `limit`).
    pub async fn dead_letters(
        &self,
        account_id: &str,
        project: &str,
        queue: &str,
        limit: u32,
    ) -> Result<Vec<MessageView>, EngineError> {
        let (queue, _) = self.live_queue(account_id, project, queue).await?;
        let messages = self.inner.store.dead_letters(&queue, limit).await?;
        Ok(messages
            .into_iter()
            .map(|m| MessageView {
                body: serde_json::from_str(&m.body).unwrap_or(Value::Null),
                message_id: m.id,
                receive_count: m.receive_count,
                enqueued_at: rfc3339(m.enqueued_at_ms),
                dead_lettered_at: m.dead_at_ms.map(rfc3339),
            })
            .collect())
    }

    /// Moves the queue's dead letters back into it; how many.
    pub async fn redrive(
        &self,
        account_id: &str,
        project: &str,
        queue: &str,
    ) -> Result<u64, EngineError> {
        let (queue, _) = self.live_queue(account_id, project, queue).await?;
        let n = { self.inner.store.redrive_dead_letters(&queue).await? };
        if n > 0 {
            self.inner.queues.wake(&queue);
        }
        Ok(n)
    }

    /// Deletes the queue's dead letters; how many.
    pub async fn purge_dead_letters(
        &self,
        account_id: &str,
        project: &str,
        queue: &str,
    ) -> Result<u64, EngineError> {
        let (queue, _) = self.live_queue(account_id, project, queue).await?;
        Ok(self.inner.store.purge_dead_letters(&queue).await?)
    }

    /// Every queue's gauges (OpenMetrics text, no `# EOF`): visible, in flight, dead
    /// letters and the oldest message's age, labelled by account, project and queue.
    pub async fn render_queue_metrics(&self) -> String {
        let stats = match self.inner.store.all_queue_stats().await {
            Ok(stats) => stats,
            Err(e) => {
                tracing::warn!(error = %e, "could not count the queues for /metrics");
                return String::new();
            }
        };
        crate::metrics::render_queues(&stats, now_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_item_failures_are_read_as_lambda_writes_them() {
        assert_eq!(item_failures(&json!(null)), Some(vec![]));
        assert_eq!(item_failures(&json!({"ok": 1})), Some(vec![]));
        assert_eq!(
            item_failures(&json!({"batchItemFailures": []})),
            Some(vec![])
        );
        assert_eq!(
            item_failures(&json!({"batchItemFailures": [{"itemIdentifier": "msg_a"}]})),
            Some(vec!["msg_a".to_string()])
        );
        // Malformed: the whole batch failed.
        assert_eq!(item_failures(&json!({"batchItemFailures": "msg_a"})), None);
        assert_eq!(
            item_failures(&json!({"batchItemFailures": [{"id": "msg_a"}]})),
            None
        );
    }
}
