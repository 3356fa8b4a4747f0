//! [`Engine`]: starting, resuming, running, cancelling and waiting for runs.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use refinery_domain::{
    BlockSpec, Endpoint, LogLevel, Manifest, Queue, RetryPolicy, ServiceGraph, Timer, UserError,
};
use refinery_invocation::{InvocationError, InvocationRequest, InvocationService, Limit};
use refinery_pool::{BlockTarget, RunContext};
use refinery_store::{Account, NewStep, RunRecord, StepRecord, Store, TimerClaim};
use serde_json::{json, Value};
use tokio::sync::{oneshot, Notify};

use crate::advance::{self, Outcome};
use crate::error::EngineError;
use crate::metrics::EngineMetrics;
use crate::scheduler::{QueueKey, Ready, Scheduler};
use crate::view::{RunSummaryView, RunView};

/// The engine's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// The most items one fan-out may start; a longer list fails the step (`FanOutTooLarge`).
    pub max_fan_out_items: usize,
    /// The longest chain of steps in a run (each step is one further than the step that
    /// started it): a loop that runs away fails the run (`StepLimit`) at this depth.
    pub max_steps_per_run: i64,
    /// The most steps one run may create in all (fan-outs included).
    pub max_total_steps: i64,
    /// The most steps running at once, server-wide.
    pub max_in_flight: usize,
    /// The most runs one account may have running at once; starting one more is refused
    /// (429) until some end.
    pub max_runs_per_account: usize,
    /// The largest queue message (its JSON text), in bytes.
    pub max_message_bytes: usize,
    /// The most messages one account's queues may hold (visible, in flight, dead letters).
    pub max_queued_messages: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_fan_out_items: 10_000,
            max_steps_per_run: 1_000,
            max_total_steps: 100_000,
            max_in_flight: 512,
            max_runs_per_account: 1_000,
            max_message_bytes: 256 * 1024,
            max_queued_messages: 100_000,
        }
    }
}

/// A run just started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStarted {
    pub run_id: String,
}

/// One deployment as the engine runs it: its blocks and the service definition.
pub(crate) struct ServiceDeployment {
    pub id: i64,
    pub account_id: String,
    pub number: i64,
    pub project: String,
    pub blocks: HashMap<String, BlockSpec>,
    pub graph: ServiceGraph,
    pub log_level: LogLevel,
    pub retry: HashMap<String, RetryPolicy>,
    /// Its HTTP endpoints (from its manifest).
    pub endpoints: Vec<Endpoint>,
    /// Its timers (from its manifest).
    pub timers: Vec<Timer>,
    /// Its queues, by name.
    pub queues: HashMap<String, Queue>,
}

impl ServiceDeployment {
    pub fn block(&self, name: &str) -> Option<&BlockSpec> {
        self.blocks.get(name)
    }
}

/// How a run begins, beyond its start and input.
#[derive(Default)]
pub(crate) struct Begin {
    /// A caller waiting for the run's response (an endpoint).
    pub responder: Option<oneshot::Sender<Value>>,
    /// The run's id, when it was chosen beforehand (a queue's batch is claimed by it).
    pub run_id: Option<String>,
    /// The timer slot (ms since the epoch) the run fires for, claimed in its creation
    /// (`start` is then the timer).
    pub slot: Option<i64>,
}

/// Runs services. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub store: Store,
    pub invocations: InvocationService,
    pub config: EngineConfig,
    pub metrics: EngineMetrics,
    deployments: Mutex<HashMap<i64, Arc<ServiceDeployment>>>,
    accounts: Mutex<HashMap<String, Account>>,
    scheduler: Mutex<Scheduler>,
    wake: Notify,
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<()>>>>,
    pub(crate) stopping: AtomicBool,
    /// Steps queued by this process, with their run: read from here, not the store.
    prefetched: Mutex<HashMap<String, (Arc<RunRecord>, StepRecord)>>,
    /// Runs failing or cancelled (by this process): their queued steps do not run.
    halted: Mutex<HashSet<String>>,
    /// The timers' loop: the live timers and what wakes it (`timers.rs`).
    pub timers: crate::timers::TimerLoop,
    /// Callers waiting for a run's response (endpoints), by run id.
    responders: Mutex<HashMap<String, oneshot::Sender<Value>>>,
    /// The runs running per account (bounded by `max_runs_per_account`).
    running_runs: Mutex<HashMap<String, HashSet<String>>>,
    /// The queues' pumps (`queues.rs`).
    pub queues: crate::queues::Queues,
}

impl Engine {
    /// Starts the engine: its dispatcher, then every run the store says is still running
    /// (after a crash or a restart) is resumed: its unfinished steps run (again).
    pub async fn start(
        store: Store,
        invocations: InvocationService,
        config: EngineConfig,
    ) -> Result<Engine, EngineError> {
        let inner = Arc::new_cyclic(|weak| Inner {
            queues: crate::queues::Queues::new(weak.clone()),
            store,
            invocations,
            config,
            metrics: EngineMetrics::new(),
            deployments: Mutex::new(HashMap::new()),
            accounts: Mutex::new(HashMap::new()),
            scheduler: Mutex::new(Scheduler::default()),
            wake: Notify::new(),
            waiters: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            running_runs: Mutex::new(HashMap::new()),
            responders: Mutex::new(HashMap::new()),
            prefetched: Mutex::new(HashMap::new()),
            halted: Mutex::new(HashSet::new()),
            timers: crate::timers::TimerLoop::default(),
        });
        let engine = Engine { inner };
        let resumed = engine.resume().await?;
        if resumed > 0 {
            tracing::info!(runs = resumed, "resumed service runs");
        }
        tokio::spawn(engine.inner.clone().dispatch());
        tokio::spawn(engine.clone().run_timers());
        engine.inner.start_queues().await?;
        Ok(engine)
    }

    /// Resumes every running run; returns how many.
    async fn resume(&self) -> Result<usize, EngineError> {
        let inner = &self.inner;
        let runs = inner.store.running_runs().await?;
        for run in &runs {
            lock(&inner.running_runs)
                .entry(run.account_id.clone())
                .or_default()
                .insert(run.id.clone());
            if run.halted() {
                // Failing or cancelled when the server stopped: what was running then is
                // gone; the run ends now.
                if let Some(status) = advance::end_halted(&inner.store, &run.id).await? {
                    inner.run_ended(run, &status);
                }
                continue;
            }
            let Some(deployment) = inner.runnable_deployment(run).await? else {
                continue;
            };
            inner.queues.adopt(run, &deployment);
            for step in inner.store.active_steps(&run.id).await? {
                inner.enqueue(run, &deployment, &step.id, &step.name, step.not_before_ms);
            }
        }
        Ok(runs.len())
    }

    /// Starts a run of `account`'s `project` (its live deployment) at `start`: a block, or
    /// a trigger (the run starts at the blocks its `then` transitions lead to).
    pub async fn start_run(
        &self,
        account: &Account,
        project: &str,
        start: &str,
        input: Value,
        backpack: Value,
    ) -> Result<RunStarted, EngineError> {
        self.begin(account, project, start, input, backpack, Begin::default())
            .await
    }

    /// A run of a queue's consumer with its batch (`input`), under the id its messages
    /// are claimed by.
    pub(crate) async fn start_queue_run(
        &self,
        account: &Account,
        project: &str,
        queue: &str,
        input: Value,
        run_id: String,
    ) -> Result<RunStarted, EngineError> {
        let how = Begin {
            run_id: Some(run_id),
            ..Begin::default()
        };
        self.begin(account, project, queue, input, json!({}), how)
            .await
    }

    /// [`Engine::start_run`] for a caller that waits for the run's response (an HTTP
    /// endpoint): the receiver gets the output of the first `then` into a response node
    /// (dropped unanswered if the run ends without one).
    pub async fn start_run_for_response(
        &self,
        account: &Account,
        project: &str,
        start: &str,
        input: Value,
    ) -> Result<(RunStarted, oneshot::Receiver<Value>), EngineError> {
        let (tx, rx) = oneshot::channel();
        let started = self
            .begin(
                account,
                project,
                start,
                input,
                json!({}),
                Begin {
                    responder: Some(tx),
                    ..Begin::default()
                },
            )
            .await?;
        Ok((started, rx))
    }

    /// Starts a run (`how`: who waits for its response, its id if chosen beforehand, the
    /// timer slot it fires for).
    pub(crate) async fn begin(
        &self,
        account: &Account,
        project: &str,
        start: &str,
        input: Value,
        backpack: Value,
        how: Begin,
    ) -> Result<RunStarted, EngineError> {
        let Begin {
            responder,
            run_id,
            slot,
        } = how;
        let inner = &self.inner;
        if inner.stopping.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        if !backpack.is_object() {
            return Err(EngineError::Invalid(
                "`backpack` must be a JSON object, e.g. {\"user\": 1}".into(),
            ));
        }
        let live = inner
            .invocations
            .live_deployment(&account.id, project)
            .await?;
        inner.remember_account(account);
        let run = RunRecord {
            id: run_id.unwrap_or_else(advance::new_run_id),
            account_id: account.id.clone(),
            project: project.to_string(),
            deployment_id: live.id,
            deployment: live.number,
            start: start.to_string(),
            status: "running".into(),
            cancel_requested: false,
            error: None,
            steps: 0,
            started_at_ms: now_ms(),
            ended_at_ms: None,
            response: None,
        };
        let deployment =
            inner
                .deployment(&run)
                .await?
                .ok_or_else(|| EngineError::ProjectNotFound {
                    project: project.to_string(),
                })?;
        // A block, or a trigger's `then` targets.
        let (input, backpack) = (input.to_string(), backpack.to_string());
        let steps: Vec<NewStep> = if deployment.blocks.contains_key(start) {
            vec![advance::first_step(start, "start", None, &input, &backpack)]
        } else {
            deployment
                .graph
                .outgoing(start, refinery_domain::TransitionType::Then)
                .iter()
                .filter(|t| deployment.blocks.contains_key(&t.to))
                .map(|t| advance::first_step(&t.to, "then", Some(t.id as i64), &input, &backpack))
                .collect()
        };
        if steps.is_empty() {
            let mut blocks: Vec<String> = deployment.blocks.keys().cloned().collect();
            blocks.sort_unstable();
            return Err(EngineError::StartNotFound {
                project: project.to_string(),
                deployment: live.number,
                start: start.to_string(),
                blocks,
            });
        }
        let claim = slot.map(|slot_ms| TimerClaim {
            account_id: run.account_id.clone(),
            project: run.project.clone(),
            timer: run.start.clone(),
            slot_ms,
            fired_at_ms: now_ms(),
        });
        inner
            .create(account, run, steps, &deployment, responder, claim)
            .await
    }

    /// Publishes `input` to `account`'s `project`'s topic `topic` (its live deployment):
    /// one run per subscriber block, each with this input and `backpack`. Returns their ids
    /// (none for a topic without subscribers).
    pub async fn publish(
        &self,
        account: &Account,
        project: &str,
        topic: &str,
        input: Value,
        backpack: Value,
    ) -> Result<Vec<String>, EngineError> {
        let inner = &self.inner;
        if inner.stopping.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        if !backpack.is_object() {
            return Err(EngineError::Invalid(
                "`backpack` must be a JSON object, e.g. {\"user\": 1}".into(),
            ));
        }
        let deployment = self.live_service(&account.id, project).await?;
        if deployment.graph.kind(topic) != Some(refinery_domain::NodeKind::Topic) {
            return Err(EngineError::NoTopic {
                project: project.to_string(),
                topic: topic.to_string(),
            });
        }
        inner.remember_account(account);
        let like = RunRecord {
            id: String::new(),
            account_id: account.id.clone(),
            project: project.to_string(),
            deployment_id: deployment.id,
            deployment: deployment.number,
            start: topic.to_string(),
            status: "running".into(),
            cancel_requested: false,
            error: None,
            steps: 0,
            started_at_ms: now_ms(),
            ended_at_ms: None,
            response: None,
        };
        let mut run_ids = Vec::new();
        for (run, first) in advance::subscriber_runs(&deployment, &like, topic, &input, &backpack) {
            let started = inner
                .create(account, run, vec![first], &deployment, None, None)
                .await?;
            run_ids.push(started.run_id);
        }
        Ok(run_ids)
    }

    /// Waits up to `timeout` for run `run_id` to end; `true` if it has.
    pub async fn wait(&self, run_id: &str, timeout: Duration) -> Result<bool, EngineError> {
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.waiters)
            .entry(run_id.to_string())
            .or_default()
            .push(tx);
        let ended = match self.inner.store.run_record(run_id).await? {
            Some(run) => run.status != "running",
            None => true,
        };
        if ended {
            // Ended before anyone could be told: dropping the senders wakes any other
            // waiter of this run too (a dropped sender reads as "ended").
            lock(&self.inner.waiters).remove(run_id);
            return Ok(true);
        }
        Ok(tokio::time::timeout(timeout, rx).await.is_ok())
    }

    /// The account's run `run_id` with its steps.
    pub async fn run(&self, account_id: &str, run_id: &str) -> Result<RunView, EngineError> {
        let (run, steps) = self
            .inner
            .store
            .run_with_steps(account_id, run_id)
            .await?
            .ok_or_else(|| EngineError::RunNotFound(run_id.to_string()))?;
        Ok(RunView::new(run, steps))
    }

    /// The account's runs of `project`, newest first.
    pub async fn list(
        &self,
        account_id: &str,
        project: &str,
        limit: u32,
    ) -> Result<Vec<RunSummaryView>, EngineError> {
        let runs = self
            .inner
            .store
            .list_runs(account_id, project, limit)
            .await?;
        Ok(runs.into_iter().map(RunSummaryView::new).collect())
    }

    /// Cancels the account's run `run_id`: its pending steps are cancelled at once, its
    /// running steps finish (their results are kept, nothing new starts), then it ends
    /// `cancelled`. Returns the run's status now.
    pub async fn cancel(&self, account_id: &str, run_id: &str) -> Result<String, EngineError> {
        let inner = &self.inner;
        let run = inner
            .store
            .run_record(run_id)
            .await?
            .filter(|r| r.account_id == account_id)
            .ok_or_else(|| EngineError::RunNotFound(run_id.to_string()))?;
        if run.status != "running" {
            return Ok(run.status);
        }
        let status = advance::cancel(&inner.store, run_id).await?;
        match &status {
            Some(status) => inner.run_ended(&run, status),
            None => {
                lock(&inner.halted).insert(run.id.clone());
            }
        }
        Ok(status.unwrap_or_else(|| "running".into()))
    }

    /// Starts no new runs or steps (the server is stopping). Unfinished steps resume at
    /// the next start.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.wake.notify_one();
        self.inner.timers.wake();
    }

    /// The engine's metrics as OpenMetrics text (without `# EOF`).
    pub fn render_metrics(&self) -> String {
        self.inner.metrics.render()
    }

    /// Forgets the cached definitions of a deleted project's deployments.
    pub fn forget_project(&self, account_id: &str, project: &str) {
        lock(&self.inner.deployments)
            .retain(|_, d| d.project != project || d.account_id != account_id);
        self.deployments_changed();
    }
}

impl Inner {
    /// Records a new run with its first steps (within the account's running-runs limit),
    /// then runs them.
    async fn create(
        &self,
        account: &Account,
        mut run: RunRecord,
        steps: Vec<NewStep>,
        deployment: &Arc<ServiceDeployment>,
        responder: Option<oneshot::Sender<Value>>,
        claim: Option<TimerClaim>,
    ) -> Result<RunStarted, EngineError> {
        // A place among the account's running runs, held from here: released by the
        // run's end, or below if it cannot be recorded.
        {
            let mut running = lock(&self.running_runs);
            let runs = running.entry(account.id.clone()).or_default();
            if runs.len() >= self.config.max_runs_per_account {
                return Err(EngineError::TooManyRuns {
                    account: account.name.clone(),
                    limit: self.config.max_runs_per_account,
                });
            }
            runs.insert(run.id.clone());
        }
        let steps = match advance::create_run(&self.store, &run, steps, claim).await {
            Ok(steps) => steps,
            Err(e) => {
                self.release_run_slot(&run);
                return Err(e);
            }
        };
        run.steps = steps.len() as i64;
        if let Some(responder) = responder {
            lock(&self.responders).insert(run.id.clone(), responder);
        }
        let run_id = run.id.clone();
        self.launch(run, steps, deployment);
        Ok(RunStarted { run_id })
    }

    /// Queues the first steps of a run just recorded (its place among the account's
    /// running runs taken).
    fn launch(&self, run: RunRecord, steps: Vec<NewStep>, deployment: &Arc<ServiceDeployment>) {
        self.metrics.runs_started.inc();
        let run = Arc::new(run);
        for (seq, step) in steps.into_iter().enumerate() {
            self.enqueue(&run, deployment, &step.id, &step.name, 0);
            let record = advance::pending_record(&run.id, step, seq as i64);
            lock(&self.prefetched).insert(record.id.clone(), (run.clone(), record));
        }
    }

    /// The deployment `run` runs, parsed (cached); `None` if it no longer exists.
    pub async fn deployment(
        &self,
        run: &RunRecord,
    ) -> Result<Option<Arc<ServiceDeployment>>, EngineError> {
        self.deployment_of(
            &run.account_id,
            &run.project,
            run.deployment_id,
            run.deployment,
        )
        .await
    }

    /// Deployment `id` (number `number` of the account's `project`), parsed (cached);
    /// `None` if it no longer exists.
    pub async fn deployment_of(
        &self,
        account_id: &str,
        project: &str,
        id: i64,
        number: i64,
    ) -> Result<Option<Arc<ServiceDeployment>>, EngineError> {
        if let Some(d) = lock(&self.deployments).get(&id) {
            return Ok(Some(d.clone()));
        }
        let Some(deployment) = self
            .store
            .deployment(account_id, project, number)
            .await?
            .filter(|d| d.id == id)
        else {
            return Ok(None);
        };
        // The manifest was valid when it was deployed; its blocks' code is stored with them,
        // so the sources are not read again (only the graph and the triggers are needed).
        let resolve = refinery_domain::source::Deployed;
        let manifest =
            Manifest::parse(&deployment.manifest, "refinery.toml", &resolve).map_err(|e| {
                EngineError::Internal(format!(
                    "deployment {} of `{}` no longer parses: {e}",
                    deployment.number, deployment.project
                ))
            })?;
        let parsed = Arc::new(ServiceDeployment {
            id: deployment.id,
            account_id: deployment.account_id.clone(),
            number: deployment.number,
            project: deployment.project.clone(),
            graph: manifest.graph(),
            log_level: manifest.log_level,
            retry: manifest.retry.into_iter().collect(),
            endpoints: manifest.endpoints,
            timers: manifest.timers,
            queues: manifest
                .queues
                .into_iter()
                .map(|q| (q.name.clone(), q))
                .collect(),
            blocks: deployment
                .blocks
                .into_iter()
                .map(|b| (b.name.clone(), b))
                .collect(),
        });
        lock(&self.deployments).insert(parsed.id, parsed.clone());
        Ok(Some(parsed))
    }

    /// [`Inner::deployment`] for a run that goes on; `None` when there is none to run (it
    /// was removed, or its manifest no longer parses): the run has then failed, saying so.
    async fn runnable_deployment(
        &self,
        run: &RunRecord,
    ) -> Result<Option<Arc<ServiceDeployment>>, EngineError> {
        let (kind, message) = match self.deployment(run).await {
            Ok(Some(deployment)) => return Ok(Some(deployment)),
            Ok(None) => (
                "DeploymentGone",
                format!(
                    "deployment {} of `{}`, which this run runs, was removed while it ran",
                    run.deployment, run.project
                ),
            ),
            Err(EngineError::Internal(message)) => ("DeploymentUnreadable", message),
            Err(e) => return Err(e),
        };
        advance::fail_unrunnable(&self.store, &run.id, kind, message).await?;
        self.run_ended(run, "failed");
        Ok(None)
    }

    fn remember_account(&self, account: &Account) {
        lock(&self.accounts)
            .entry(account.id.clone())
            .or_insert_with(|| account.clone());
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub(crate) async fn account_of(
        &self,
        account_id: &str,
    ) -> Result<Option<Account>, EngineError> {
        self.account(account_id).await
    }

    async fn account(&self, account_id: &str) -> Result<Option<Account>, EngineError> {
        if let Some(a) = lock(&self.accounts).get(account_id) {
            return Ok(Some(a.clone()));
        }
        let account = self.store.account(account_id).await?;
        if let Some(a) = &account {
            self.remember_account(a);
        }
        Ok(account)
    }

    /// Queues step `step_id` of `run` (block `name`), ready at `not_before_ms`.
    pub fn enqueue(
        &self,
        run: &RunRecord,
        deployment: &ServiceDeployment,
        step_id: &str,
        name: &str,
        not_before_ms: i64,
    ) {
        let ready = Ready {
            run_id: run.id.clone(),
            step_id: step_id.to_string(),
            key: QueueKey {
                account_id: run.account_id.clone(),
                deployment_id: deployment.id,
                block: name.to_string(),
            },
            max_concurrency: deployment.block(name).map_or(1, |b| b.max_concurrency),
            queued_at: Instant::now(),
        };
        let wait_ms = not_before_ms - now_ms();
        let mut scheduler = lock(&self.scheduler);
        if wait_ms > 0 {
            let due = Instant::now() + Duration::from_millis(wait_ms.unsigned_abs());
            scheduler.push_at(ready, due);
        } else {
            scheduler.push(ready);
        }
        self.metrics.steps_waiting.set(scheduler.waiting() as i64);
        drop(scheduler);
        self.wake.notify_one();
    }

    /// The dispatcher: starts every step that may run, then sleeps until woken (a step
    /// queued or finished) or the next delayed step is due.
    async fn dispatch(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let next_due = {
                let mut scheduler = lock(&self.scheduler);
                let next_due = scheduler.promote(Instant::now());
                let limit = |account: &str| self.invocations.instance_quota(account);
                while let Some(ready) = scheduler.next(self.config.max_in_flight, &limit) {
                    let inner = self.clone();
                    tokio::spawn(async move { inner.run_step(ready).await });
                }
                self.metrics.steps_waiting.set(scheduler.waiting() as i64);
                next_due
            };
            match next_due {
                Some(due) => {
                    let due = tokio::time::Instant::from_std(due);
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep_until(due) => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    /// Runs one step and advances its run; then frees its place in the scheduler.
    async fn run_step(self: Arc<Self>, ready: Ready) {
        let key = ready.key.clone();
        let requeue = match self.execute(&ready).await {
            Ok(requeue) => requeue,
            Err(e) => {
                tracing::error!(run = %ready.run_id, step = %ready.step_id, error = %e, "a step could not be advanced; it is retried");
                Some(Duration::from_secs(1))
            }
        };
        let mut scheduler = lock(&self.scheduler);
        scheduler.done(&key);
        if let Some(delay) = requeue {
            if !self.stopping.load(Ordering::Acquire) {
                scheduler.push_at(ready, Instant::now() + delay);
            }
        }
        drop(scheduler);
        self.wake.notify_one();
    }

    /// Runs the step and commits what follows; `Some(delay)` to try it again later
    /// (back-pressure), `None` when it is done with.
    async fn execute(&self, ready: &Ready) -> Result<Option<Duration>, EngineError> {
        // A step this process created comes with its records (the commit that created it
        // wrote them); a resumed or requeued one is read back.
        let prefetched = lock(&self.prefetched).remove(&ready.step_id);
        let halted = lock(&self.halted).contains(&ready.run_id);
        let (run, step) = match prefetched {
            Some((run, step)) if !halted => (run, step),
            _ => {
                let Some(step) = self.store.step(&ready.step_id).await? else {
                    // Deleted with its project.
                    self.release(&ready.key.account_id, &ready.run_id);
                    return Ok(None);
                };
                if step.status != "pending" && step.status != "running" {
                    return Ok(None);
                }
                let Some(run) = self.store.run_record(&ready.run_id).await? else {
                    // Deleted with its project.
                    self.release(&ready.key.account_id, &ready.run_id);
                    return Ok(None);
                };
                (Arc::new(run), step)
            }
        };
        if halted || run.halted() {
            // Cancelled or failed after it was queued: it never runs.
            let ended = advance::skip(&self.store, &run.id, &step.id).await?;
            if let Some(status) = ended {
                self.run_ended(&run, &status);
            }
            return Ok(None);
        }
        let Some(deployment) = self.runnable_deployment(&run).await? else {
            return Ok(None);
        };
        let outcome = match self.invoke(&run, &deployment, &step, ready).await {
            Invoked::Outcome(outcome) => outcome,
            Invoked::Later(delay) => {
                lock(&self.prefetched).insert(step.id.clone(), (run, step));
                return Ok(Some(delay));
            }
            Invoked::Stopping => return Ok(None),
        };
        let plan = advance::plan(&self.config, deployment.clone(), &step, outcome).await;
        self.reply_early(&run.id, &deployment, &plan);
        let step_name = step.name.clone();
        let committed = advance::commit(
            &self.store,
            self.config,
            &run.id,
            deployment.clone(),
            step,
            plan,
        )
        .await?;
        self.metrics
            .steps_ended
            .get_or_create(&crate::metrics::StatusLabels {
                status: committed.step_status.to_string(),
            })
            .inc();
        if let Some(response) = committed.responded {
            if let Some(responder) = lock(&self.responders).remove(&run.id) {
                let _ = responder.send(response);
            }
        }
        if let Some(status) = &committed.ended {
            self.run_ended(&run, status);
        }
        if committed.halted {
            lock(&self.halted).insert(run.id.clone());
        }
        for new in committed.started {
            self.enqueue(&run, &deployment, &new.id, &new.name, new.not_before_ms);
            lock(&self.prefetched).insert(new.id.clone(), (run.clone(), new));
        }
        for (published, first) in committed.published {
            // Recorded with the step, so not refused for the limit: counted from here.
            lock(&self.running_runs)
                .entry(published.account_id.clone())
                .or_default()
                .insert(published.id.clone());
            self.launch(published, vec![first], &deployment);
        }
        self.after_step(&run, &deployment, &step_name);
        Ok(None)
    }

    /// An endpoint's caller gets its reply as soon as a step's plan reaches a response,
    /// before the commit that records it (the commit's hand-off is not on the reply's
    /// path). Should the commit not happen (a crash), the step runs again and the run's
    /// recorded response is that run's; the caller was answered once.
    fn reply_early(&self, run_id: &str, deployment: &ServiceDeployment, plan: &advance::Plan) {
        let advance::Plan::Fire { output, fired, .. } = plan else {
            return;
        };
        let responds = fired.iter().any(|&id| {
            deployment.graph.transition(id).is_some_and(|t| {
                t.kind != refinery_domain::TransitionType::Exception
                    && deployment.graph.kind(&t.to) == Some(refinery_domain::NodeKind::Response)
            })
        });
        if !responds {
            return;
        }
        let responder = lock(&self.responders).remove(run_id);
        if let Some(responder) = responder {
            let _ = responder.send(output.clone());
        }
    }

    /// Invokes the step's block through the invocation service.
    async fn invoke(
        &self,
        run: &RunRecord,
        deployment: &ServiceDeployment,
        step: &StepRecord,
        ready: &Ready,
    ) -> Invoked {
        let fail = |kind: &str, message: String| {
            Invoked::Outcome(Outcome::failed(
                UserError::new(kind, message),
                step.backpack_in.as_deref(),
                None,
            ))
        };
        let Some(spec) = deployment.block(&step.name).cloned() else {
            return fail(
                "BlockNotFound",
                format!(
                    "deployment {} of `{}` has no block `{}`",
                    deployment.number, deployment.project, step.name
                ),
            );
        };
        let account = match self.account(&run.account_id).await {
            Ok(Some(a)) => a,
            Ok(None) => {
                return fail(
                    "AccountNotFound",
                    "the run's account no longer exists".into(),
                )
            }
            Err(e) => return fail("Internal", e.to_string()),
        };
        let input_text = step.input.clone().unwrap_or_else(|| "null".into());
        let input: Value = serde_json::from_str(&input_text).unwrap_or(Value::Null);
        let backpack: Value = step
            .backpack_in
            .as_deref()
            .and_then(|b| serde_json::from_str(b).ok())
            .unwrap_or_else(|| json!({}));
        self.metrics
            .transition_seconds
            .observe(ready.queued_at.elapsed().as_secs_f64());
        let request = InvocationRequest {
            target: BlockTarget {
                account_id: account.id.clone(),
                account_name: account.name.clone(),
                project: run.project.clone(),
                deployment_id: deployment.id,
                deployment_number: deployment.number,
                block: spec,
            },
            input,
            input_text,
            backpack: backpack.clone(),
            log_level: deployment.log_level,
            context: Some(RunContext {
                run_id: run.id.clone(),
                step_id: step.id.clone(),
                attempt: u32::try_from(step.attempt).unwrap_or(u32::MAX),
            }),
        };
        // The step is marked running while its block runs (the write overlaps the
        // invocation; both are done before its result is committed).
        let mark = self.store.mark_step_running(&step.id);
        let (marked, invoked) = tokio::join!(mark, self.invocations.invoke(&account, request));
        if let Err(e) = marked {
            tracing::warn!(step = %step.id, error = %e, "could not mark a step running");
        }
        match invoked {
            Ok(execution) => Invoked::Outcome(Outcome::from_execution(execution)),
            Err(InvocationError::Throttled {
                retry_after, limit, ..
            }) => {
                // Back-pressure: the step waits its turn. Instances and concurrency free up
                // as other invocations end, so look again soon.
                let delay = match limit {
                    Limit::Rate | Limit::ScaleUp => retry_after,
                    _ => Duration::from_millis(20),
                };
                Invoked::Later(delay.min(Duration::from_secs(5)))
            }
            Err(InvocationError::Unavailable(_)) => Invoked::Stopping,
            Err(e) => {
                let kind = match &e {
                    InvocationError::SpendingCapReached { .. } => "SpendingCapReached",
                    InvocationError::AccountDisabled { .. } => "AccountDisabled",
                    InvocationError::DiskFull { .. } => "DiskFull",
                    _ => "InvocationFailed",
                };
                fail(kind, e.to_string())
            }
        }
    }

    /// `run` no longer counts among its account's running runs (it ended, never started,
    /// or was deleted with its project).
    fn release_run_slot(&self, run: &RunRecord) {
        self.release(&run.account_id, &run.id);
    }

    fn release(&self, account_id: &str, run_id: &str) {
        let mut running = lock(&self.running_runs);
        if let Some(runs) = running.get_mut(account_id) {
            runs.remove(run_id);
            if runs.is_empty() {
                running.remove(account_id);
            }
        }
    }

    /// Tells the waiters of `run` that it ended, and counts it.
    pub fn run_ended(&self, run: &RunRecord, status: &str) {
        EngineMetrics::ended(&self.metrics.runs_ended, status);
        self.release_run_slot(run);
        self.queues.run_ended(&run.id);
        // Ended without a response: its caller hears so (the sender dropped).
        lock(&self.responders).remove(&run.id);
        lock(&self.halted).remove(&run.id);
        if let Some(waiters) = lock(&self.waiters).remove(&run.id) {
            for w in waiters {
                let _ = w.send(());
            }
        }
    }
}

enum Invoked {
    Outcome(Outcome),
    /// Throttled: try again after this long.
    Later(Duration),
    /// The server is stopping: leave the step for the next start.
    Stopping,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
