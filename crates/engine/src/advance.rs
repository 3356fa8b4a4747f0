//! What a finished step starts, decided ([`plan`]) and then committed in one transaction
//! ([`commit`]): the step's result, its successors, the frame counters, the joins, and
//! the run's end.
//!
//! # Frames, fan-outs and joins
//!
//! Every step lives in a *frame*: `''` for the run itself, `<frame>/<step>#<i>` for item
//! `i` of the fan-out that step made. A frame counts its live work (`run_frames.live`):
//! its unfinished steps plus one per fan-out it has not joined yet. A step finishing takes
//! one off and adds its successors; a frame at zero is *settled*:
//! - the run's frame settled: the run ends (`succeeded`, or `failed` if a merge waited in
//!   vain);
//! - an item's frame settled: the item counts as done in its fan-out; the last item done
//!   runs the fan-out's fan-ins once, each with the outputs that reached it, in item order
//!   (and an empty fan-out runs them with `[]`).
//!
//! A `merge` target runs once all its sources have arrived in the same frame, with their
//! outputs in the order the manifest lists them. Joins wait in `run_joins`.
//!
//! A step that fails with no retry left and no `exception` transition fails the run: it
//! starts nothing more (pending steps are cancelled), and ends when its running steps
//! have. Cancelling a run is the same without the failure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use refinery_domain::{ExecutionStatus, NodeKind, Transition, TransitionType, UserError};
use refinery_invocation::Execution;
use refinery_store::{
    GroupRecord, JoinEntry, NewStep, RunRecord, RunTx, StepRecord, StepResult, Store,
};
use serde_json::{json, Value};

use crate::engine::{now_ms, EngineConfig, ServiceDeployment};
use crate::error::EngineError;

/// The format version of an `exception` target's input (Refinery's).
const EXCEPTION_INPUT_VERSION: &str = "1.0.0";

/// A step id: `st_` + a UUIDv7 (time-ordered, unique across runs).
pub fn new_step_id() -> String {
    format!("st_{}", uuid::Uuid::now_v7().simple())
}

/// What one run of a step's block produced.
#[derive(Debug)]
pub enum Outcome {
    Succeeded {
        output: Value,
        backpack: Value,
        meta: Meta,
    },
    Failed {
        error: UserError,
        backpack: Value,
        meta: Meta,
    },
}

/// The execution behind a step, when there was one.
#[derive(Debug, Default, Clone)]
pub struct Meta {
    pub execution_id: Option<String>,
    pub started_at_ms: Option<i64>,
    pub duration_ms: Option<f64>,
}

impl Outcome {
    /// A failure before any code ran (the backpack stays as it came in).
    pub fn failed(error: UserError, backpack_in: Option<&str>, meta: Option<Meta>) -> Outcome {
        Outcome::Failed {
            error,
            backpack: backpack_in
                .and_then(|b| serde_json::from_str(b).ok())
                .unwrap_or_else(|| json!({})),
            meta: meta.unwrap_or_default(),
        }
    }

    pub fn from_execution(execution: Execution) -> Outcome {
        let meta = Meta {
            execution_id: Some(execution.execution_id),
            started_at_ms: None,
            duration_ms: Some(execution.duration_ms),
        };
        if execution.status == ExecutionStatus::Ok {
            return Outcome::Succeeded {
                output: execution.output.unwrap_or(Value::Null),
                backpack: execution.backpack,
                meta,
            };
        }
        let error = execution.error.unwrap_or_else(|| {
            UserError::new(
                status_kind(execution.status),
                format!(
                    "the block ended with status `{}`",
                    execution.status.as_str()
                ),
            )
        });
        Outcome::Failed {
            error,
            backpack: execution.backpack,
            meta,
        }
    }
}

fn status_kind(status: ExecutionStatus) -> &'static str {
    match status.as_str() {
        "timeout" => "Timeout",
        "oom" => "OutOfMemory",
        _ => "Error",
    }
}

/// What follows a finished step.
#[derive(Debug)]
pub enum Plan {
    /// It succeeded: these transitions fire (ids, manifest order).
    Fire {
        output: Value,
        backpack: Value,
        fired: Vec<usize>,
        meta: Meta,
    },
    /// It failed: `exception` transitions (ids; none fails the run), or a retry.
    Failed {
        error: UserError,
        backpack: Value,
        retry_in: Option<Duration>,
        exceptions: Vec<usize>,
        meta: Meta,
    },
}

/// Decides what follows `step`'s `outcome`: evaluates its `if`s (off the async workers,
/// bounded by the block's timeout), checks its fan-outs' lists, and for a failure picks
/// a retry or its `exception` transitions.
pub async fn plan(
    config: &EngineConfig,
    deployment: Arc<ServiceDeployment>,
    step: &StepRecord,
    outcome: Outcome,
) -> Plan {
    let (output, backpack, meta) = match outcome {
        Outcome::Failed {
            error,
            backpack,
            meta,
        } => return failed(&deployment, step, error, backpack, meta),
        Outcome::Succeeded {
            output,
            backpack,
            meta,
        } => (output, backpack, meta),
    };
    let input: Value = step
        .input
        .as_deref()
        .and_then(|i| serde_json::from_str(i).ok())
        .unwrap_or(Value::Null);
    let has_ifs = !deployment
        .graph
        .outgoing(&step.name, TransitionType::If)
        .is_empty();
    let fired = if has_ifs {
        let service = deployment.clone();
        let name = step.name.clone();
        let (o, b) = (output.clone(), backpack.clone());
        let timeout = Duration::from_secs(
            deployment
                .block(&step.name)
                .map_or(30, |s| u64::from(s.timeout_s)),
        );
        let task = tokio::task::spawn_blocking(move || {
            service
                .graph
                .after_success(&name, &o, &input, &b)
                .map(|ts| ts.iter().map(|t| t.id).collect::<Vec<_>>())
                .map_err(|e| e.to_string())
        });
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(format!("ExpressionError: evaluating the `if` expressions failed: {e}")),
            Err(_) => Err(format!(
                "ExpressionError: the `if` expressions of `{}` took longer than its timeout of {} s",
                step.name,
                timeout.as_secs()
            )),
        }
    } else {
        deployment
            .graph
            .after_success(&step.name, &output, &input, &backpack)
            .map(|ts| ts.iter().map(|t| t.id).collect())
            .map_err(|e| e.to_string())
    };
    let fired = match fired {
        Ok(fired) => fired,
        Err(message) => {
            let message = message
                .strip_prefix("ExpressionError: ")
                .unwrap_or(&message)
                .to_string();
            let error = UserError::new("ExpressionError", message);
            return failed(&deployment, step, error, backpack, meta);
        }
    };
    // A fan-out needs a list, of at most the configured length.
    for &id in &fired {
        let Some(t) = deployment.graph.transition(id) else {
            continue;
        };
        if t.kind != TransitionType::FanOut {
            continue;
        }
        let error = match &output {
            Value::Array(items) if items.len() > config.max_fan_out_items => UserError::new(
                "FanOutTooLarge",
                format!(
                    "the fan-out from `{}` to `{}` got a list of {} items; the limit is {} \
                     (the operator sets it: refinery serve --max-fan-out ITEMS)",
                    step.name,
                    t.to,
                    items.len(),
                    config.max_fan_out_items
                ),
            ),
            Value::Array(_) => continue,
            other => UserError::new(
                "FanOutNotList",
                format!(
                    "the fan-out from `{}` to `{}` needs a list (one step per item), but `{}` \
                     returned {}",
                    step.name,
                    t.to,
                    step.name,
                    json_kind(other)
                ),
            ),
        };
        return failed(&deployment, step, error, backpack, meta);
    }
    Plan::Fire {
        output,
        backpack,
        fired,
        meta,
    }
}

fn failed(
    deployment: &ServiceDeployment,
    step: &StepRecord,
    error: UserError,
    backpack: Value,
    meta: Meta,
) -> Plan {
    let next_attempt = u32::try_from(step.attempt + 1).unwrap_or(u32::MAX);
    let retry_in = deployment
        .retry
        .get(&step.name)
        .and_then(|policy| policy.delay_before(next_attempt));
    let exceptions = deployment
        .graph
        .on_exception(&step.name)
        .iter()
        .map(|t| t.id)
        .collect();
    Plan::Failed {
        error,
        backpack,
        retry_in,
        exceptions,
        meta,
    }
}

fn json_kind(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("a boolean ({b})"),
        Value::Number(n) => format!("a number ({n})"),
        Value::String(_) => "a string".into(),
        Value::Object(_) => "an object".into(),
        Value::Array(_) => "a list".into(),
    }
}

/// What a commit did.
#[derive(Debug, Default)]
pub struct Committed {
    /// The step's recorded status.
    pub step_status: &'static str,
    /// Steps it started (to queue), as stored.
    pub started: Vec<StepRecord>,
    /// The run's status if it ended.
    pub ended: Option<String>,
    /// The endpoint reply it reached.
    pub responded: Option<Value>,
    /// Whether the run now starts nothing new (it is failing).
    pub halted: bool,
    /// Runs it started by publishing to a topic (one per subscriber), with their first step.
    pub published: Vec<(RunRecord, NewStep)>,
}

/// Records the run and its first steps, in one transaction; gives the steps back. With
/// `claim`, the timer slot it fires for is claimed in the same transaction
/// ([`EngineError::SlotFired`] if it was already, and nothing is recorded).
pub async fn create_run(
    store: &Store,
    run: &RunRecord,
    steps: Vec<NewStep>,
    claim: Option<refinery_store::TimerClaim>,
) -> Result<Vec<NewStep>, EngineError> {
    let run = run.clone();
    store
        .run_tx(&run.id.clone(), move |tx| {
            write_run(tx, &run, &steps)?;
            if let Some(claim) = claim {
                if !tx.claim_timer_slot(&claim)? {
                    return Err(EngineError::SlotFired {
                        timer: claim.timer.clone(),
                        slot_ms: claim.slot_ms,
                    });
                }
            }
            Ok(steps)
        })
        .await
}

/// Writes a new run and its first steps in `tx` (pointed at the run).
fn write_run(tx: &mut RunTx<'_>, run: &RunRecord, steps: &[NewStep]) -> Result<(), EngineError> {
    tx.create_run(
        &run.account_id,
        &run.project,
        run.deployment_id,
        run.deployment,
        &run.start,
        run.started_at_ms,
    )?;
    for step in steps {
        tx.insert_step(step)?;
    }
    tx.add_live("", steps.len() as i64)?;
    Ok(())
}

/// The pending changes of one commit, before they are written.
struct Pending<'a, 'c> {
    tx: &'a mut RunTx<'c>,
    run: RunRecord,
    deployment: &'a ServiceDeployment,
    config: &'a EngineConfig,
    started: Vec<StepRecord>,
    /// The run's failure, if this commit fails it.
    failure: Option<Value>,
    /// The endpoint reply this commit reached (the run's first).
    responded: Option<Value>,
    /// The subscriber runs its publications created.
    published: Vec<(RunRecord, NewStep)>,
}

impl Pending<'_, '_> {
    /// Adds a step (checking the step limits first); `false` if the run failed instead.
    fn add(&mut self, step: NewStep) -> Result<bool, EngineError> {
        if self.failure.is_some() {
            return Ok(false);
        }
        if step.depth > self.config.max_steps_per_run {
            self.failure = Some(run_error(
                "StepLimit",
                format!(
                    "the run reached its step limit: `{}` would be step {} of one chain, and a \
                     run may chain at most {} steps (a loop that never ends?). The operator \
                     sets the limit: refinery serve --max-run-steps N",
                    step.name, step.depth, self.config.max_steps_per_run
                ),
            ));
            return Ok(false);
        }
        let total = self.run.steps + self.started.len() as i64 + 1;
        if total > self.config.max_total_steps {
            self.failure = Some(run_error(
                "StepLimit",
                format!(
                    "the run reached its limit of {} steps in all",
                    self.config.max_total_steps
                ),
            ));
            return Ok(false);
        }
        let seq = self.tx.insert_step(&step)?;
        self.started.push(pending_record(&self.run.id, step, seq));
        Ok(true)
    }

    fn transition(&self, id: usize) -> Result<&Transition, EngineError> {
        self.deployment.graph.transition(id).ok_or_else(|| {
            EngineError::Internal(format!("transition {id} is not in the deployment"))
        })
    }

    /// A frame's live work reached zero: settles it and the frames above it.
    fn settle(&mut self, mut frame: String) -> Result<(), EngineError> {
        loop {
            if self.failure.is_some() {
                return Ok(());
            }
            // A merge still waiting here can no longer complete.
            if let Some(&tid) = self.tx.join_transitions(&frame)?.first() {
                let t = self
                    .transition(usize::try_from(tid).unwrap_or(usize::MAX))?
                    .clone();
                let arrived: Vec<i64> =
                    self.tx.joins(&frame, tid)?.iter().map(|e| e.slot).collect();
                let missing: Vec<&str> = t
                    .from
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !arrived.contains(&(*i as i64)))
                    .map(|(_, s)| s.as_str())
                    .collect();
                self.failure = Some(run_error(
                    "MergeIncomplete",
                    format!(
                        "the merge into `{}` waited for `{}`, which did not finish in this run \
                         (a branch that was not taken never arrives at a merge)",
                        t.to,
                        missing.join("`, `")
                    ),
                ));
                return Ok(());
            }
            let Some((group, _item)) = split_frame(&frame) else {
                // The run's own frame: nothing is left to do.
                return Ok(());
            };
            let group = self.tx.settle_item(group)?;
            if group.settled < group.items {
                return Ok(());
            }
            let added = self.join_fan_out(&group)?;
            let live = self.tx.add_live(&group.parent_frame, added - 1)?;
            if live > 0 {
                return Ok(());
            }
            frame = group.parent_frame;
        }
    }

    /// All items of a fan-out are done: runs its fan-ins. Returns how many steps started.
    fn join_fan_out(&mut self, group: &GroupRecord) -> Result<i64, EngineError> {
        let mut tids = self.tx.join_transitions(&group.grp)?;
        if tids.is_empty() && group.items == 0 {
            let fan_out = usize::try_from(group.transition_id).unwrap_or(usize::MAX);
            tids = self
                .deployment
                .graph
                .fan_ins_closing(fan_out)
                .iter()
                .map(|t| t.id as i64)
                .collect();
        }
        let mut added = 0;
        for tid in tids {
            let entries = self.tx.joins(&group.grp, tid)?;
            let t = self
                .transition(usize::try_from(tid).unwrap_or(usize::MAX))?
                .clone();
            let outputs: Vec<Value> = entries.iter().map(|e| parse(&e.output)).collect();
            let backpack = merged(entries.iter().map(|e| parse(&e.backpack)));
            let parents: Vec<String> = if entries.is_empty() {
                vec![group.from_step.clone()]
            } else {
                entries.iter().map(|e| e.step_id.clone()).collect()
            };
            let step = NewStep {
                id: new_step_id(),
                name: t.to.clone(),
                transition: t.kind.as_str().into(),
                transition_id: Some(tid),
                parents: parents.clone(),
                item: frame_item(&group.parent_frame),
                frame: group.parent_frame.clone(),
                depth: group.depth + 1,
                attempt: 1,
                input: Value::Array(outputs).to_string(),
                backpack: backpack.to_string(),
                not_before_ms: 0,
            };
            self.tx.remove_joins(tid, &parents)?;
            if self.add(step)? {
                added += 1;
            }
        }
        Ok(added)
    }
}

/// Commits `plan` for `step` of `run`: its result, what it starts, and (if it was the
/// last) the run's end. A step whose result is already recorded changes nothing.
pub async fn commit(
    store: &Store,
    config: EngineConfig,
    run_id: &str,
    deployment: Arc<ServiceDeployment>,
    step: StepRecord,
    plan: Plan,
) -> Result<Committed, EngineError> {
    store
        .run_tx(run_id, move |tx| {
            commit_in(tx, &config, &deployment, &step, plan)
        })
        .await
}

/// [`commit`], inside its transaction.
fn commit_in(
    tx: &mut RunTx<'_>,
    config: &EngineConfig,
    deployment: &ServiceDeployment,
    step: &StepRecord,
    plan: Plan,
) -> Result<Committed, EngineError> {
    let Some(current) = tx.run()? else {
        return Ok(Committed::default());
    };
    let keep_all = deployment.log_level == refinery_domain::LogLevel::All;
    let keep_failed = deployment.log_level != refinery_domain::LogLevel::None;
    let (result, step_status) = match &plan {
        Plan::Fire {
            output,
            backpack,
            meta,
            ..
        } => (
            StepResult {
                status: "succeeded",
                output: keep_all.then(|| output.to_string()),
                backpack: keep_all.then(|| backpack.to_string()),
                error: None,
                execution_id: meta.execution_id.clone(),
                started_at_ms: meta.started_at_ms,
                duration_ms: meta.duration_ms,
                keep_input: keep_all,
            },
            "succeeded",
        ),
        Plan::Failed {
            error,
            backpack,
            meta,
            ..
        } => (
            StepResult {
                status: "failed",
                output: None,
                backpack: keep_failed.then(|| backpack.to_string()),
                error: keep_failed.then(|| json!(error).to_string()),
                execution_id: meta.execution_id.clone(),
                started_at_ms: meta.started_at_ms,
                duration_ms: meta.duration_ms,
                keep_input: keep_failed,
            },
            "failed",
        ),
    };
    if !tx.finish_step(&step.id, &result)? {
        return Ok(Committed::default());
    }
    crate::queues::settle(tx, &current, deployment, step, &plan)?;
    let halted = current.halted();
    let mut p = Pending {
        tx,
        run: current,
        deployment,
        config,
        started: Vec::new(),
        failure: None,
        responded: None,
        published: Vec::new(),
    };
    if halted {
        // Failing or cancelled: nothing new starts; a failure is named with the others.
        if let Plan::Failed {
            error,
            retry_in: None,
            exceptions,
            ..
        } = &plan
        {
            if exceptions.is_empty() {
                let mut e = p
                    .run
                    .error
                    .as_deref()
                    .map(parse)
                    .unwrap_or_else(|| json!({}));
                add_failed_step(&mut e, step, error);
                p.tx.set_run_error(&e)?;
            }
        }
        let ended = end_if_done(p.tx, &p.run)?;
        return Ok(Committed {
            step_status,
            started: Vec::new(),
            ended,
            responded: None,
            halted: true,
            published: Vec::new(),
        });
    }

    let frame = step.frame.clone();
    let mut in_frame: i64 = 0;
    match plan {
        Plan::Fire {
            output,
            backpack,
            fired,
            ..
        } => {
            for tid in fired {
                let t = p.transition(tid)?.clone();
                in_frame += fire(&mut p, step, &t, &output, &backpack)?;
            }
        }
        Plan::Failed {
            error,
            backpack,
            retry_in,
            exceptions,
            ..
        } => {
            if let Some(delay) = retry_in {
                let retry = NewStep {
                    id: new_step_id(),
                    name: step.name.clone(),
                    transition: "retry".into(),
                    transition_id: None,
                    parents: vec![step.id.clone()],
                    item: step.item,
                    frame: frame.clone(),
                    depth: step.depth + 1,
                    attempt: step.attempt + 1,
                    input: step.input.clone().unwrap_or_else(|| "null".into()),
                    backpack: step.backpack_in.clone().unwrap_or_else(|| "{}".into()),
                    not_before_ms: now_ms() + i64::try_from(delay.as_millis()).unwrap_or(0),
                };
                if p.add(retry)? {
                    in_frame += 1;
                }
            } else if exceptions.is_empty() {
                let mut e = run_error("StepFailed", String::new());
                add_failed_step(&mut e, step, &error);
                p.failure = Some(e);
            } else {
                let input: Value = step.input.as_deref().map(parse).unwrap_or(Value::Null);
                let exception_input = json!({
                    "input_data": input,
                    "version": EXCEPTION_INPUT_VERSION,
                    "exception_text": exception_text(&error),
                });
                for tid in exceptions {
                    let t = p.transition(tid)?.clone();
                    let next = successor(step, &t, exception_input.to_string(), &backpack);
                    if p.add(next)? {
                        in_frame += 1;
                    }
                }
            }
        }
    }
    if p.failure.is_none() {
        let live = p.tx.add_live(&frame, in_frame - 1)?;
        if live == 0 {
            p.settle(frame)?;
        }
    }
    let halted = p.failure.is_some();
    let ended = if let Some(failure) = p.failure.take() {
        p.tx.fail_run(&failure)?;
        p.started.clear();
        p.run.error = Some(failure.to_string());
        end_if_done(p.tx, &p.run)?
    } else if p.tx.live("")? == 0 {
        p.tx.end_run("succeeded")?;
        Some("succeeded".to_string())
    } else {
        None
    };
    let started = std::mem::take(&mut p.started);
    let responded = p.responded.take();
    // Publications stand even if another transition of this commit failed the run: the
    // publishing step succeeded, and its subscribers' runs are their own.
    let published = std::mem::take(&mut p.published);
    Ok(Committed {
        step_status,
        started,
        ended,
        responded,
        halted,
        published,
    })
}

/// Publishes `output` to `topic`: one run per subscriber block, each with this input and
/// `backpack`, created in the publishing step's transaction (so a crash either kept the
/// step's success and every subscriber run, or neither).
fn publish(
    p: &mut Pending<'_, '_>,
    topic: &str,
    output: &Value,
    backpack: &Value,
) -> Result<(), EngineError> {
    for (run, first) in subscriber_runs(p.deployment, &p.run, topic, output, backpack) {
        let saved = p.tx.retarget(&run.id);
        let written = write_run(p.tx, &run, std::slice::from_ref(&first));
        p.tx.restore(saved)?;
        written?;
        p.published.push((run, first));
    }
    Ok(())
}

/// The runs a publication to `topic` starts (one per subscriber, in manifest order), in the
/// account, project and deployment of `like`.
pub fn subscriber_runs(
    deployment: &ServiceDeployment,
    like: &RunRecord,
    topic: &str,
    input: &Value,
    backpack: &Value,
) -> Vec<(RunRecord, NewStep)> {
    let (input, backpack) = (input.to_string(), backpack.to_string());
    deployment
        .graph
        .outgoing(topic, TransitionType::Then)
        .into_iter()
        .filter(|t| deployment.blocks.contains_key(&t.to))
        .map(|t| {
            let run = RunRecord {
                id: new_run_id(),
                start: topic.to_string(),
                status: "running".into(),
                cancel_requested: false,
                error: None,
                steps: 1,
                started_at_ms: now_ms(),
                ended_at_ms: None,
                response: None,
                ..like.clone()
            };
            let first = first_step(&t.to, "then", Some(t.id as i64), &input, &backpack);
            (run, first)
        })
        .collect()
}

/// A new run id: `run_` + a UUIDv7.
pub fn new_run_id() -> String {
    format!("run_{}", uuid::Uuid::now_v7().simple())
}

/// A run's first step at `block`.
pub fn first_step(
    block: &str,
    transition: &str,
    transition_id: Option<i64>,
    input: &str,
    backpack: &str,
) -> NewStep {
    NewStep {
        id: new_step_id(),
        name: block.to_string(),
        transition: transition.to_string(),
        transition_id,
        parents: Vec::new(),
        item: None,
        frame: String::new(),
        depth: 1,
        attempt: 1,
        input: input.to_string(),
        backpack: backpack.to_string(),
        not_before_ms: 0,
    }
}

/// Fires one transition of a succeeded step; returns how many units of live work it added
/// to the step's frame.
fn fire(
    p: &mut Pending<'_, '_>,
    step: &StepRecord,
    t: &Transition,
    output: &Value,
    backpack: &Value,
) -> Result<i64, EngineError> {
    match t.kind {
        TransitionType::Then
        | TransitionType::If
        | TransitionType::Else
        | TransitionType::Exception => {
            match p.deployment.graph.kind(&t.to) {
                Some(NodeKind::Response) => {
                    // Into a response node: the run's reply (the first one reached wins).
                    if p.responded.is_none() && p.tx.set_response(output)? {
                        p.responded = Some(output.clone());
                    }
                    return Ok(0);
                }
                Some(NodeKind::Topic) => {
                    publish(p, &t.to, output, backpack)?;
                    return Ok(0);
                }
                Some(NodeKind::Queue) => {
                    // Enqueued with this commit; over a limit the run fails instead.
                    let failure = crate::queues::enqueue_output(
                        p.tx, p.config, &p.run, &step.name, &t.to, output,
                    )?;
                    if failure.is_some() && p.failure.is_none() {
                        p.failure = failure;
                    }
                    return Ok(0);
                }
                _ => {}
            }
            let next = successor(step, t, output.to_string(), backpack);
            Ok(i64::from(p.add(next)?))
        }
        TransitionType::FanOut => {
            let items = output.as_array().cloned().unwrap_or_default();
            let grp = format!("{}/{}", step.frame, step.id);
            p.tx.insert_group(&GroupRecord {
                grp: grp.clone(),
                parent_frame: step.frame.clone(),
                from_step: step.id.clone(),
                transition_id: t.id as i64,
                items: items.len() as i64,
                settled: 0,
                depth: step.depth,
            })?;
            if items.is_empty() {
                // Nothing to wait for: the fan-ins run now, with `[]`.
                let group = p.tx.group(&grp)?;
                return p.join_fan_out(&group);
            }
            for (i, item) in items.into_iter().enumerate() {
                let frame = format!("{grp}#{i}");
                let mut next = successor(step, t, item.to_string(), backpack);
                next.item = Some(i as i64);
                next.frame = frame.clone();
                if !p.add(next)? {
                    return Ok(0);
                }
                p.tx.add_live(&frame, 1)?;
            }
            // The fan-out counts as live work of this frame until its fan-ins ran.
            Ok(1)
        }
        TransitionType::FanIn => {
            let Some((grp, item)) = split_frame(&step.frame) else {
                // Started past the fan-out (a run started at an item block): one item.
                let next = successor(step, t, json!([output]).to_string(), backpack);
                return Ok(i64::from(p.add(next)?));
            };
            p.tx.add_join(grp, t.id as i64, &arrival(step, item, output, backpack))?;
            Ok(0)
        }
        TransitionType::Merge => {
            let slot = t.from.iter().position(|f| *f == step.name).unwrap_or(0) as i64;
            p.tx.add_join(
                &step.frame,
                t.id as i64,
                &arrival(step, slot, output, backpack),
            )?;
            // Complete when every source has an arrival: take the first of each.
            let entries = p.tx.joins(&step.frame, t.id as i64)?;
            let mut first: BTreeMap<i64, &JoinEntry> = BTreeMap::new();
            for e in &entries {
                first.entry(e.slot).or_insert(e);
            }
            if first.len() < t.from.len() {
                return Ok(0);
            }
            let outputs: Vec<Value> = first.values().map(|e| parse(&e.output)).collect();
            let merged_backpack = merged(first.values().map(|e| parse(&e.backpack)));
            let parents: Vec<String> = first.values().map(|e| e.step_id.clone()).collect();
            p.tx.remove_joins(t.id as i64, &parents)?;
            let mut next = successor(step, t, Value::Array(outputs).to_string(), &merged_backpack);
            next.parents = parents;
            Ok(i64::from(p.add(next)?))
        }
    }
}

/// A step just inserted, as the store now holds it.
pub fn pending_record(run_id: &str, step: NewStep, seq: i64) -> StepRecord {
    StepRecord {
        id: step.id,
        run_id: run_id.to_string(),
        seq,
        name: step.name,
        status: "pending".into(),
        transition: step.transition,
        transition_id: step.transition_id,
        parents: step.parents,
        item: step.item,
        frame: step.frame,
        depth: step.depth,
        attempt: step.attempt,
        input: Some(step.input),
        backpack_in: Some(step.backpack),
        output: None,
        backpack: None,
        error: None,
        execution_id: None,
        not_before_ms: step.not_before_ms,
        created_at_ms: now_ms(),
        started_at_ms: None,
        duration_ms: None,
    }
}

/// `step`'s output arriving at a join, in `slot`.
fn arrival(step: &StepRecord, slot: i64, output: &Value, backpack: &Value) -> JoinEntry {
    JoinEntry {
        slot,
        step_id: step.id.clone(),
        seq: step.seq,
        output: output.to_string(),
        backpack: backpack.to_string(),
    }
}

/// The step `t` starts after `step`, in the same frame.
fn successor(step: &StepRecord, t: &Transition, input: String, backpack: &Value) -> NewStep {
    NewStep {
        id: new_step_id(),
        name: t.to.clone(),
        transition: t.kind.as_str().into(),
        transition_id: Some(t.id as i64),
        parents: vec![step.id.clone()],
        item: step.item,
        frame: step.frame.clone(),
        depth: step.depth + 1,
        attempt: 1,
        input,
        backpack: backpack.to_string(),
        not_before_ms: 0,
    }
}

/// Ends a halted run if none of its steps is unfinished; its status then.
fn end_if_done(tx: &mut RunTx<'_>, run: &RunRecord) -> Result<Option<String>, EngineError> {
    if tx.unfinished_steps()? > 0 {
        return Ok(None);
    }
    let status = if run.error.is_some() {
        "failed"
    } else if run.cancel_requested {
        "cancelled"
    } else {
        "succeeded"
    };
    tx.end_run(status)?;
    Ok(Some(status.to_string()))
}

/// A queued step of a halted run: cancelled; the run ends if it was the last.
pub async fn skip(
    store: &Store,
    run_id: &str,
    step_id: &str,
) -> Result<Option<String>, EngineError> {
    let step_id = step_id.to_string();
    store
        .run_tx(run_id, move |tx| {
            let Some(current) = tx.run()? else {
                return Ok(None);
            };
            tx.finish_step(
                &step_id,
                &StepResult {
                    status: "cancelled",
                    output: None,
                    backpack: None,
                    error: None,
                    execution_id: None,
                    started_at_ms: None,
                    duration_ms: None,
                    keep_input: false,
                },
            )?;
            end_if_done(tx, &current)
        })
        .await
}

/// At start: a run that was failing or cancelled when the server stopped ends now (what
/// was running then is gone).
pub async fn end_halted(store: &Store, run_id: &str) -> Result<Option<String>, EngineError> {
    store
        .run_tx(run_id, |tx| {
            let Some(current) = tx.run()? else {
                return Ok(None);
            };
            tx.cancel_unfinished()?;
            end_if_done(tx, &current)
        })
        .await
}

/// The run cannot go on (its deployment was removed, or no longer reads): it fails now,
/// and what it had unfinished is cancelled.
pub async fn fail_unrunnable(
    store: &Store,
    run_id: &str,
    kind: &str,
    message: String,
) -> Result<(), EngineError> {
    let error = run_error(kind, message);
    store
        .run_tx(run_id, move |tx| {
            let Some(mut current) = tx.run()? else {
                return Ok(());
            };
            tx.fail_run(&error)?;
            tx.cancel_unfinished()?;
            current.error = Some(error.to_string());
            end_if_done(tx, &current)?;
            Ok(())
        })
        .await
}

/// Cancels a run: pending steps at once; it ends when its running steps have. Returns its
/// status if it ended.
pub async fn cancel(store: &Store, run_id: &str) -> Result<Option<String>, EngineError> {
    store
        .run_tx(run_id, |tx| {
            let Some(mut current) = tx.run()? else {
                return Ok(None);
            };
            if current.status != "running" {
                return Ok(Some(current.status));
            }
            tx.request_cancel()?;
            current.cancel_requested = true;
            end_if_done(tx, &current)
        })
        .await
}

fn run_error(kind: &str, message: String) -> Value {
    json!({"type": kind, "message": message})
}

/// Names a failed step in the run's error (`steps`), and words the message.
fn add_failed_step(run_error: &mut Value, step: &StepRecord, error: &UserError) {
    let entry = json!({
        "step_id": step.id,
        "name": step.name,
        "item": step.item,
        "error": {"type": error.kind, "message": error.message},
    });
    if !run_error.is_object() {
        *run_error = json!({});
    }
    let steps = run_error
        .as_object_mut()
        .map(|o| o.entry("steps").or_insert_with(|| json!([])));
    if let Some(Value::Array(list)) = steps {
        list.push(entry);
    }
    let list = run_error["steps"].as_array().cloned().unwrap_or_default();
    let first = &list[0];
    let describe = |s: &Value| match s["item"].as_i64() {
        Some(i) => format!("`{}` (item {i})", s["name"].as_str().unwrap_or("?")),
        None => format!("`{}`", s["name"].as_str().unwrap_or("?")),
    };
    let mut message = format!(
        "step {} failed with no `exception` transition to take: {}: {}",
        describe(first),
        first["error"]["type"].as_str().unwrap_or("Error"),
        first["error"]["message"].as_str().unwrap_or("")
    );
    if list.len() > 1 {
        let others: Vec<String> = list[1..].iter().map(describe).collect();
        message.push_str(&format!(
            "; {} more failed: {}",
            others.len(),
            others.join(", ")
        ));
    }
    run_error["type"] = json!("StepFailed");
    run_error["message"] = json!(message);
}

fn exception_text(error: &UserError) -> String {
    match &error.traceback {
        Some(tb) if !tb.is_empty() => tb.clone(),
        _ => format!("{}: {}", error.kind, error.message),
    }
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// Backpacks joined: their keys merged in order (later ones win).
fn merged(backpacks: impl Iterator<Item = Value>) -> Value {
    let mut out = serde_json::Map::new();
    for b in backpacks {
        if let Value::Object(map) = b {
            out.extend(map);
        }
    }
    Value::Object(out)
}

/// `<group>#<item>` → (group, item); `None` for the run's frame.
fn split_frame(frame: &str) -> Option<(&str, i64)> {
    let (group, item) = frame.rsplit_once('#')?;
    Some((group, item.parse().ok()?))
}

fn frame_item(frame: &str) -> Option<i64> {
    split_frame(frame).map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_name_their_fan_out_and_item() {
        assert_eq!(split_frame(""), None);
        assert_eq!(split_frame("/st_a#3"), Some(("/st_a", 3)));
        assert_eq!(split_frame("/st_a#3/st_b#0"), Some(("/st_a#3/st_b", 0)));
        assert_eq!(frame_item("/st_a#12"), Some(12));
    }

    #[test]
    fn backpacks_merge_later_keys_winning() {
        let m = merged([json!({"a": 1, "b": 1}), json!({"b": 2}), json!(null)].into_iter());
        assert_eq!(m, json!({"a": 1, "b": 2}));
    }
}
