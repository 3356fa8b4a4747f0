//! The pool itself: admission (account rate, block concurrency, account instance and
//! memory quotas), warm-or-cold instance choice, one invocation, release (freeze) or
//! discard, reaping, retirement, disabled accounts and shutdown.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use refinery_domain::{BlockSpec, ExecutionStatus, UserError};
use refinery_runtimes::{ChannelError, InstanceChannel, RunContext, RuntimeEntry};
use refinery_sandbox::{Entry, ExtraMount, InstanceSpec, SandboxHost, SandboxedInstance};
use serde_json::Value;
use tokio::time::timeout;

use crate::block_pool::BlockPool;
use crate::code_dir;
use crate::error::PoolError;
use crate::instance::{now_ms, Instance, InstanceInfo, InstanceState};
use crate::keep_alive::{AdaptiveConfig, KeepAlivePolicy, Prewarm, Window};
use crate::metrics::{AheadReason, BlockLabels, PoolMetrics, ThrottleReason};
use crate::quota::{AccountState, AccountUsage, Accounts, Ledger, Quota, Reservation};
use crate::scale_up::ScaleUpLimit;

/// The values of a project's secrets, read when an instance of a block whose `env` names
/// some starts (BRIEF §7c). Never cached by the pool: a rotated secret takes effect for the
/// next instance started.
pub trait SecretSource: Send + Sync + 'static {
    /// The values of `names`, secrets of the account's `project`, by name; a reason (which
    /// secret is missing, and how to set it) if one is not there.
    fn values<'a>(
        &'a self,
        account_id: &'a str,
        project: &'a str,
        names: &'a [String],
    ) -> SecretValues<'a>;
}

/// What [`SecretSource::values`] returns: secret name → value, or why not.
pub type SecretValues<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<HashMap<String, String>, String>> + Send + 'a>,
>;

/// Operator settings of the pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Where blocks' code is laid out for instances (`<code_root>/<deployment>/<block>`).
    pub code_root: PathBuf,
    /// Where dependency layers live (`<layers_root>/<account>/<hash>`, built at deploy); a
    /// block with a `deps_layer` gets its layer mounted read-only.
    pub layers_root: PathBuf,
    /// The installed language shims, mounted at `/runtime` in every instance.
    pub runtime_dir: PathBuf,
    /// Idle time before a warm instance is reaped, unless the block sets its own.
    pub default_keep_alive: Duration,
    /// How long an invocation may wait for a free slot under `max_concurrency`.
    pub queue_timeout: Duration,
    /// How often the reaper looks for expired idle instances.
    pub reap_interval: Duration,
    /// Every account's quota unless it has its own (see [`InstancePool::set_account_quota`]).
    pub default_quota: Quota,
    /// Fixed or adaptive keep-alive for blocks without their own `keep_alive_s`.
    pub keep_alive_mode: KeepAliveMode,
    /// Width of one bin of the adaptive policy's idle-time histogram (240 bins); the
    /// paper's is one minute.
    pub adaptive_bin: Duration,
    /// Cold starts per block: a token bucket (warm reuse never takes a token).
    pub scale_up: ScaleUpLimit,
    /// Distinct (account, project, block) label sets in the metrics before overflow.
    pub metrics_max_label_sets: usize,
}

/// The operator's keep-alive policy (`serve --keep-alive-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeepAliveMode {
    /// Every idle instance kept for `default_keep_alive`.
    #[default]
    Fixed,
    /// Per block from its idle-time histogram; `default_keep_alive` until it is representative.
    Adaptive,
}

impl std::str::FromStr for KeepAliveMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fixed" => Ok(KeepAliveMode::Fixed),
            "adaptive" => Ok(KeepAliveMode::Adaptive),
            other => Err(format!(
                "unknown keep-alive policy `{other}`: expected fixed or adaptive"
            )),
        }
    }
}

/// What to invoke: one block of one deployment, and whose it is.
#[derive(Debug, Clone)]
pub struct BlockTarget {
    pub account_id: String,
    /// The account's name, for messages (quota refusals name the account).
    pub account_name: String,
    pub project: String,
    /// Globally unique deployment id (the pool keys instances on it).
    pub deployment_id: i64,
    /// The deployment's number within its project, for display.
    pub deployment_number: i64,
    pub block: BlockSpec,
}

/// The outcome of one invocation, whatever the user code did.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub status: ExecutionStatus,
    pub output: Option<Value>,
    pub backpack: Value,
    pub error: Option<UserError>,
    pub logs: String,
    pub logs_truncated: bool,
    pub cold: bool,
    pub instance_id: String,
    /// Cold starts only: from asking the sandbox for an instance to the block's code loaded.
    pub init_ms: Option<f64>,
    /// The handler's run time (request sent to reply received).
    pub duration_ms: f64,
    pub started_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    deployment_id: i64,
    block: String,
}

/// Shared handle to the pool; cheap to clone.
#[derive(Clone)]
pub struct InstancePool {
    inner: Arc<Inner>,
}

struct Inner {
    host: Arc<SandboxHost>,
    config: PoolConfig,
    blocks: Mutex<HashMap<BlockKey, Arc<BlockPool>>>,
    /// Every live instance, for listing and for killing stragglers at shutdown.
    registry: Mutex<HashMap<String, Registered>>,
    /// Every account's quota and usage ledger.
    accounts: Accounts,
    /// Accounts the operator disabled: no instance of theirs is started or kept. Locked
    /// after `blocks` when both are held.
    disabled: Mutex<HashSet<String>>,
    shutting_down: AtomicBool,
    metrics: PoolMetrics,
    /// Time origin for the keep-alive histories.
    origin: Instant,
    /// Where secret values come from ([`InstancePool::set_secret_source`]).
    secrets: std::sync::OnceLock<Arc<dyn SecretSource>>,
}

struct Registered {
    info: InstanceInfo,
    sandbox: Arc<SandboxedInstance>,
}

/// Why a cold start produced no usable instance.
enum StartFailure {
    /// The block's own code failed to load (or the instance died or hung loading it).
    Init {
        status: ExecutionStatus,
        error: UserError,
        elapsed: Duration,
    },
    /// The platform could not start the instance.
    Host(PoolError),
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent; a poisoned lock is still usable.
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Removes from `blocks` the block pools `pick` chooses and retires them (no instance of
/// theirs is kept from now on); returns their idle instances, for the caller to destroy.
fn retire_blocks(
    blocks: &mut HashMap<BlockKey, Arc<BlockPool>>,
    pick: impl Fn(&BlockKey, &BlockPool) -> bool,
) -> Vec<Instance> {
    let keys: Vec<BlockKey> = blocks
        .iter()
        .filter(|(key, block_pool)| pick(key, block_pool))
        .map(|(key, _)| key.clone())
        .collect();
    keys.iter()
        .filter_map(|key| blocks.remove(key))
        .flat_map(|block_pool| block_pool.retire())
        .collect()
}

impl InstancePool {
    /// Creates the pool and starts its reaper (must run inside a tokio runtime).
    pub fn new(host: Arc<SandboxHost>, config: PoolConfig) -> InstancePool {
        let pool = InstancePool {
            inner: Arc::new(Inner {
                host,
                accounts: Accounts::new(config.default_quota),
                metrics: PoolMetrics::new(config.metrics_max_label_sets),
                origin: Instant::now(),
                config,
                blocks: Mutex::new(HashMap::new()),
                disabled: Mutex::new(HashSet::new()),
                registry: Mutex::new(HashMap::new()),
                shutting_down: AtomicBool::new(false),
                secrets: std::sync::OnceLock::new(),
            }),
        };
        let weak = Arc::downgrade(&pool.inner);
        let interval = pool.inner.config.reap_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { break };
                if inner.shutting_down.load(Ordering::Acquire) {
                    break;
                }
                InstancePool { inner }.upkeep();
            }
        });
        pool
    }

    /// Runs one invocation of `target` in an instance of its own.
    ///
    /// Admission, in order, all before any instance is started or any user code runs:
    /// the account's invocation rate (one token), the block's `max_concurrency` (a bounded
    /// wait), then — only for a cold start — the account's instance and memory quotas
    /// (evicting its least-recently-used idle instances first if that makes room).
    ///
    /// `context` is set when the invocation is a step of a service run: the handler sees it
    /// (its variables, for this invocation only; see [`RunContext`]).
    pub async fn invoke(
        &self,
        target: &BlockTarget,
        input: Value,
        backpack: Value,
        context: Option<&RunContext>,
    ) -> Result<Invocation, PoolError> {
        let result = self.run_invocation(target, input, backpack, context).await;
        let labels =
            self.inner
                .metrics
                .labels(&target.account_id, &target.project, &target.block.name);
        self.count(&labels, &result);
        result
    }

    /// Counts one invocation's outcome in the metrics.
    fn count(&self, labels: &BlockLabels, result: &Result<Invocation, PoolError>) {
        let metrics = &self.inner.metrics;
        match result {
            Ok(invocation) => {
                metrics.invocation(labels, invocation.status.as_str());
                metrics.start(
                    labels,
                    invocation.cold,
                    invocation
                        .init_ms
                        .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0)),
                );
                if !invocation.instance_id.is_empty() {
                    metrics.run(
                        labels,
                        Duration::from_secs_f64(invocation.duration_ms.max(0.0) / 1000.0),
                    );
                }
                match invocation.status {
                    ExecutionStatus::Oom => metrics.oom_kill(labels),
                    ExecutionStatus::Timeout => metrics.timeout(labels),
                    _ => {}
                }
            }
            Err(error) => {
                let reason = match error {
                    PoolError::RateQuota { .. } => Some(ThrottleReason::rate),
                    PoolError::ConcurrencyLimit { .. } => Some(ThrottleReason::concurrency),
                    PoolError::InstanceQuota { .. } => Some(ThrottleReason::instances),
                    PoolError::MemoryQuota { .. } => Some(ThrottleReason::memory),
                    PoolError::ScaleUpLimit { .. } => Some(ThrottleReason::scale_up),
                    _ => None,
                };
                let status = match (reason, error) {
                    (Some(reason), _) => {
                        metrics.throttle(labels, reason);
                        "throttled"
                    }
                    (None, PoolError::ShuttingDown) => "unavailable",
                    (None, _) => "failed",
                };
                metrics.invocation(labels, status);
            }
        }
    }

    /// The uids of the sandbox host's standby sandboxes (adopted by no account yet).
    pub fn standby_uids(&self) -> Vec<u32> {
        self.inner.host.standby_uids()
    }

    /// Counts one syscall refused by an instance of (account, project, block), or with
    /// `None` one whose instance is unknown (the server's audit watcher reports both).
    pub fn count_refused_syscall(&self, block: Option<(&str, &str, &str)>) {
        let metrics = &self.inner.metrics;
        match block {
            Some((account, project, block)) => {
                metrics.refused_syscall(&metrics.labels(account, project, block))
            }
            None => metrics.refused_syscall_unattributed(),
        }
    }

    /// Counts kernel audit records the kernel's rate limit dropped.
    pub fn count_suppressed_audit_records(&self, count: u64) {
        self.inner.metrics.audit_records_suppressed(count);
    }

    /// The Prometheus text exposition of the pool's metrics.
    pub fn render_metrics(&self) -> String {
        let instances = self.instances();
        let standby = self.inner.host.standby_counts();
        self.inner.metrics.render(&instances, &standby)
    }

    async fn run_invocation(
        &self,
        target: &BlockTarget,
        input: Value,
        backpack: Value,
        context: Option<&RunContext>,
    ) -> Result<Invocation, PoolError> {
        let arrived = Instant::now();
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(PoolError::ShuttingDown);
        }
        let account = self.inner.accounts.get(&target.account_id);
        if let Err((quota, retry_after)) = account.take_token() {
            return Err(PoolError::RateQuota {
                account: target.account_name.clone(),
                rate: quota.rate,
                burst: quota.burst,
                retry_after,
            });
        }
        let block_pool = self.block_pool(target).await?;
        let in_flight = block_pool.arrive();
        let queue_timeout = self.inner.config.queue_timeout;
        let _permit = match timeout(queue_timeout, block_pool.permits.acquire()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(PoolError::ShuttingDown),
            Err(_) => {
                return Err(PoolError::ConcurrencyLimit {
                    block: target.block.name.clone(),
                    limit: target.block.max_concurrency,
                    waited: queue_timeout,
                })
            }
        };
        let started_at_ms = now_ms();

        let warm = self
            .warm_or_scale_up(&block_pool, arrived + queue_timeout)
            .await?;
        // The account may have been disabled while this invocation waited for its turn: then
        // nothing of it starts (`block_pool` refused only those that came after).
        if self.is_account_disabled(&target.account_id) {
            if let Some(instance) = warm {
                self.discard(instance).await;
            }
            return Err(PoolError::AccountDisabled {
                account: target.account_name.clone(),
            });
        }
        let (mut instance, cold, init_ms) = match warm {
            Some(instance) => (instance, false, None),
            None => match self.start_instance(&block_pool, &account, false).await {
                Ok((instance, init)) => (instance, true, Some(millis(init))),
                Err(StartFailure::Host(e)) => return Err(e),
                Err(StartFailure::Init {
                    status,
                    error,
                    elapsed,
                }) => {
                    return Ok(Invocation {
                        status,
                        output: None,
                        backpack,
                        error: Some(error),
                        logs: String::new(),
                        logs_truncated: false,
                        cold: true,
                        instance_id: String::new(),
                        init_ms: Some(millis(elapsed)),
                        duration_ms: 0.0,
                        started_at_ms,
                    })
                }
            },
        };
        let instance_id = instance.id().to_string();
        self.set_state(&instance_id, InstanceState::Busy);

        let run_limit = Duration::from_secs(u64::from(target.block.timeout_s));
        let run_started = Instant::now();
        let result = timeout(
            run_limit,
            instance.channel.invoke_in(&input, &backpack, context),
        )
        .await;
        let duration_ms = millis(run_started.elapsed());

        let mut invocation = Invocation {
            status: ExecutionStatus::Ok,
            output: None,
            backpack,
            error: None,
            logs: String::new(),
            logs_truncated: false,
            cold,
            instance_id,
            init_ms,
            duration_ms,
            started_at_ms,
        };
        match result {
            Ok(Ok(reply)) => {
                instance.invocations += 1;
                invocation.logs = reply.logs;
                invocation.logs_truncated = reply.logs_truncated;
                match reply.outcome {
                    Ok(output) => {
                        invocation.output = Some(output.output);
                        invocation.backpack = output.backpack;
                    }
                    Err(error) => {
                        invocation.status = ExecutionStatus::Error;
                        invocation.error = Some(error);
                    }
                }
                let (level, window) = in_flight.finish();
                self.release(&block_pool, instance, level, window).await;
            }
            Ok(Err(channel_error)) => {
                let (oom, tail) = self.discard(instance).await;
                invocation.status = if oom {
                    ExecutionStatus::Oom
                } else {
                    ExecutionStatus::Crashed
                };
                invocation.error = Some(if oom {
                    UserError::new(
                        "OutOfMemory",
                        format!(
                            "the instance used more than its memory_mb of {} MB and was killed; raise memory_mb in refinery.toml or use less memory",
                            target.block.memory_mb
                        ),
                    )
                } else {
                    crash_error(&channel_error, &tail)
                });
            }
            Err(_elapsed) => {
                self.discard(instance).await;
                invocation.status = ExecutionStatus::Timeout;
                invocation.error = Some(UserError::new(
                    "Timeout",
                    format!(
                        "the block ran longer than its timeout_s of {} s and its instance was killed",
                        target.block.timeout_s
                    ),
                ));
            }
        }
        if matches!(
            invocation.status,
            ExecutionStatus::Oom | ExecutionStatus::Timeout | ExecutionStatus::Crashed
        ) {
            // Discarded instances are what resource attacks look like: keep a trail per account.
            tracing::warn!(
                account = %target.account_id,
                project = %target.project,
                block = %target.block.name,
                instance = %invocation.instance_id,
                status = %invocation.status,
                "instance discarded"
            );
        }
        Ok(invocation)
    }

    /// Sets where the values of blocks' `{ secret = "..." }` variables come from (once;
    /// later calls are ignored). Without one, an instance of a block that names a secret
    /// does not start.
    pub fn set_secret_source(&self, source: Arc<dyn SecretSource>) {
        let _ = self.inner.secrets.set(source);
    }

    /// Stops keeping warm every instance of the account's `project` whose block reads one
    /// of `secrets` (idle ones destroyed now, busy ones when their invocation ends): after
    /// a secret is set again or deleted, the next invocation starts an instance with the new
    /// value. Provisioned (`min_warm`) instances are started again by the next
    /// [`InstancePool::provision`].
    pub async fn retire_secret_readers(&self, account_id: &str, project: &str, secret: &str) {
        let idle = retire_blocks(&mut lock(&self.inner.blocks), |_, block_pool| {
            let target = &block_pool.target;
            target.account_id == account_id
                && target.project == project
                && target.block.secret_env.values().any(|s| s == secret)
        });
        self.discard_detached(idle).await;
    }

    /// The block's environment: its plain variables and the values of the secrets it names.
    async fn instance_env(
        &self,
        target: &BlockTarget,
    ) -> Result<std::collections::BTreeMap<String, String>, PoolError> {
        let block = &target.block;
        let mut env = block.env.clone();
        if block.secret_env.is_empty() {
            return Ok(env);
        }
        let refused = |message: String| PoolError::Secret {
            block: block.name.clone(),
            message,
        };
        let Some(source) = self.inner.secrets.get() else {
            return Err(refused(
                "this server reads no secrets (no secret source is configured)".into(),
            ));
        };
        let mut names: Vec<String> = block.secret_env.values().cloned().collect();
        names.sort();
        names.dedup();
        let values = source
            .values(&target.account_id, &target.project, &names)
            .await
            .map_err(refused)?;
        for (variable, secret) in &block.secret_env {
            let Some(value) = values.get(secret) else {
                return Err(refused(format!(
                    "secret `{secret}` (variable {variable}) of project `{}` is not set: set it with `refinery secrets set {} {secret}` (the value on stdin)",
                    target.project, target.project
                )));
            };
            env.insert(variable.clone(), value.clone());
        }
        Ok(env)
    }

    /// Stops keeping a deployment's instances warm: idle ones are destroyed now, busy
    /// ones when their invocation ends.
    ///
    /// Every block pool is marked retired before anything is awaited, and the idle ones are
    /// destroyed in a task of their own: the caller (an HTTP handler) may be cancelled at any
    /// await, and a half-done retirement would leave instances no reaper can reach.
    pub async fn retire_deployments(&self, deployment_ids: &[i64]) {
        let idle = retire_blocks(&mut lock(&self.inner.blocks), |key, _| {
            deployment_ids.contains(&key.deployment_id)
        });
        self.discard_detached(idle).await;
    }

    /// Stops running anything of the account: from now on no instance of it starts
    /// (invocations, those already waiting for their turn included, and provisioning are
    /// refused with [`PoolError::AccountDisabled`]), its idle instances (`min_warm` ones
    /// included) are destroyed now and busy ones when their invocation ends. Cancelling the
    /// caller does not stop the destruction.
    pub async fn disable_account(&self, account_id: &str) {
        let idle = {
            let mut blocks = lock(&self.inner.blocks);
            lock(&self.inner.disabled).insert(account_id.to_string());
            retire_blocks(&mut blocks, |_, block_pool| {
                block_pool.target.account_id == account_id
            })
        };
        self.discard_detached(idle).await;
    }

    /// Destroys `idle` in a task of its own and waits for it. Waiting is a courtesy (the
    /// reply comes after the instances are gone); cancelling the wait does not stop the
    /// destruction.
    async fn discard_detached(&self, idle: Vec<Instance>) {
        let pool = self.clone();
        let destroying = tokio::spawn(async move {
            for instance in idle {
                pool.discard(instance).await;
            }
        });
        let _ = destroying.await;
    }

    /// Lets the account's instances start again (its provisioned instances are started by
    /// the next [`InstancePool::provision`] of its live deployments).
    pub fn enable_account(&self, account_id: &str) {
        lock(&self.inner.disabled).remove(account_id);
    }

    /// Whether the account is disabled in this pool.
    pub fn is_account_disabled(&self, account_id: &str) -> bool {
        lock(&self.inner.disabled).contains(account_id)
    }

    /// Removes the code laid out for these deployments (`<code_root>/<id>`), after they
    /// were pruned or deleted and retired. Failures are logged: the directory is removed
    /// again at the next start ([`InstancePool::remove_code_except`]).
    pub async fn remove_code(&self, deployment_ids: &[i64]) {
        let root = self.inner.config.code_root.clone();
        let ids = deployment_ids.to_vec();
        let removing = tokio::task::spawn_blocking(move || {
            for id in ids {
                if let Err(error) = code_dir::remove(&root, id) {
                    tracing::warn!(deployment = id, %error, path = %root.display(), "removing the code of a removed deployment");
                }
            }
        });
        let _ = removing.await;
    }

    /// Removes the code laid out for every deployment not in `kept` (left by a removal that
    /// failed, or raced by an invocation); for the server's start.
    pub async fn remove_code_except(&self, kept: &[i64]) {
        let root = self.inner.config.code_root.clone();
        let stale = match code_dir::laid_out(&root) {
            Ok(ids) => ids
                .into_iter()
                .filter(|id| !kept.contains(id))
                .collect::<Vec<_>>(),
            Err(error) => {
                tracing::warn!(%error, path = %root.display(), "listing laid-out code");
                return;
            }
        };
        if !stale.is_empty() {
            tracing::info!(
                count = stale.len(),
                "removing code of deployments no longer kept"
            );
            self.remove_code(&stale).await;
        }
    }

    /// Every live instance, for operators (and, filtered, for their owners).
    pub fn instances(&self) -> Vec<InstanceInfo> {
        let mut list: Vec<InstanceInfo> = lock(&self.inner.registry)
            .values()
            .map(|r| r.info.clone())
            .collect();
        list.sort_by(|a, b| a.started_at_ms.cmp(&b.started_at_ms).then(a.id.cmp(&b.id)));
        list
    }

    /// The quota every account has unless it has its own.
    /// Whether this host can run `network = true` blocks (pasta and nft found at start).
    pub fn network_enabled(&self) -> bool {
        self.inner.host.network_enabled()
    }

    pub fn default_quota(&self) -> Quota {
        self.inner.accounts.defaults()
    }

    /// Sets an account's effective quota (its overrides applied over the defaults).
    /// Running instances stay; a lowered quota refuses new cold starts until usage is
    /// under it. The kernel's account-wide memory limit follows at once if it was set
    /// already in this run, else with the account's first instance.
    pub fn set_account_quota(&self, account_id: &str, quota: Quota) {
        let account = self.inner.accounts.set_quota(account_id, quota);
        let started = account.lock().group_limit_mb.is_some();
        if started {
            self.ensure_group_limits(&account);
        }
    }

    /// An account's effective quota and what it holds now.
    pub fn account_usage(&self, account_id: &str) -> AccountUsage {
        self.inner.accounts.get(account_id).usage()
    }

    /// Refuses new invocations, lets running ones finish for up to `grace`, then kills
    /// every instance and removes its cgroups.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.shutting_down.store(true, Ordering::Release);
        let block_pools: Vec<Arc<BlockPool>> =
            lock(&self.inner.blocks).drain().map(|(_, v)| v).collect();
        for block_pool in block_pools {
            for instance in block_pool.retire() {
                self.discard(instance).await;
            }
        }
        let deadline = Instant::now() + grace;
        while !lock(&self.inner.registry).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stragglers: Vec<Arc<SandboxedInstance>> = lock(&self.inner.registry)
            .drain()
            .map(|(_, r)| r.sandbox)
            .collect();
        for sandbox in stragglers {
            destroy(sandbox).await;
        }
    }

    async fn block_pool(&self, target: &BlockTarget) -> Result<Arc<BlockPool>, PoolError> {
        let key = BlockKey {
            deployment_id: target.deployment_id,
            block: target.block.name.clone(),
        };
        if let Some(existing) = lock(&self.inner.blocks).get(&key) {
            return Ok(existing.clone());
        }
        let code_root = self.inner.config.code_root.clone();
        let (deployment_id, block) = (target.deployment_id, target.block.clone());
        let (code_dir, shared_dir) = tokio::task::spawn_blocking(move || {
            let code = code_dir::materialize(&code_root, deployment_id, &block)?;
            let shared = code_dir::materialize_shared(&code_root, deployment_id, &block)?;
            Ok::<_, std::io::Error>((code, shared))
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r)
        .map_err(|source| PoolError::PrepareCode {
            block: target.block.name.clone(),
            path: self.inner.config.code_root.display().to_string(),
            source,
        })?;
        let config = &self.inner.config;
        let operator_policy = match config.keep_alive_mode {
            KeepAliveMode::Fixed => KeepAlivePolicy::Fixed(config.default_keep_alive),
            KeepAliveMode::Adaptive => KeepAlivePolicy::Adaptive(AdaptiveConfig {
                bin: config.adaptive_bin,
                ..AdaptiveConfig::paper(config.default_keep_alive)
            }),
        };
        let policy = KeepAlivePolicy::for_block(&operator_policy, target.block.keep_alive_s);
        let labels =
            self.inner
                .metrics
                .labels(&target.account_id, &target.project, &target.block.name);
        let mut blocks = lock(&self.inner.blocks);
        if lock(&self.inner.disabled).contains(&target.account_id) {
            return Err(PoolError::AccountDisabled {
                account: target.account_name.clone(),
            });
        }
        let entry = blocks.entry(key).or_insert_with(|| {
            Arc::new(
                BlockPool::new(
                    target.clone(),
                    code_dir,
                    policy,
                    config.scale_up,
                    labels,
                    self.inner.origin,
                )
                .with_shared_dir(shared_dir),
            )
        });
        Ok(entry.clone())
    }

    /// A warm instance, thawed, if the block has one.
    async fn take_warm(&self, block_pool: &BlockPool) -> Option<Instance> {
        while let Some(instance) = block_pool.pop_idle() {
            // An idle instance can have died without the pool knowing (its zygote was
            // killed, an operator killed it): never hand a dead one an invocation.
            if instance.sandbox.has_exited() {
                tracing::warn!(
                    instance = instance.id(),
                    "idle instance found dead; discarding it"
                );
                self.discard(instance).await;
                continue;
            }
            match instance.sandbox.thaw() {
                Ok(()) => return Some(instance),
                Err(e) => {
                    tracing::warn!(instance = instance.id(), error = %e, "cannot thaw instance; discarding it");
                    self.discard(instance).await;
                }
            }
        }
        None
    }

    /// A warm instance, or `None` when a cold start may go ahead (a scale-up token was
    /// taken). Without either, waits until `deadline` for an instance to go idle or a token
    /// to come, then refuses with [`PoolError::ScaleUpLimit`].
    async fn warm_or_scale_up(
        &self,
        block_pool: &BlockPool,
        deadline: Instant,
    ) -> Result<Option<Instance>, PoolError> {
        let started = Instant::now();
        loop {
            // Registered before looking, so an instance freed in between still wakes us.
            let idle_ready = block_pool.idle_ready.notified();
            if let Some(instance) = self.take_warm(block_pool).await {
                return Ok(Some(instance));
            }
            let (limit, wait) = match block_pool.take_scale_up_token() {
                Ok(()) => return Ok(None),
                Err(refused) => refused,
            };
            let now = Instant::now();
            if now >= deadline || self.inner.shutting_down.load(Ordering::Acquire) {
                return Err(PoolError::ScaleUpLimit {
                    block: block_pool.target.block.name.clone(),
                    limit,
                    waited: now.duration_since(started),
                    retry_after: wait,
                });
            }
            let nap = wait.min(deadline - now);
            tokio::select! {
                () = idle_ready => {}
                () = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// Admits a cold start against the account's instance and memory quotas and takes
    /// its reservation; evicts the account's least-recently-used idle instances (of any
    /// of its blocks) first when that makes room. Returns the instances evicted (their
    /// share already handed over; the caller destroys them before spawning) beside the
    /// verdict.
    ///
    /// A `speculative` start (a pre-warm) evicts nothing and is admitted only if it leaves
    /// the account at least as much room free as it takes ([`Ledger::fits_speculative`]).
    fn admit_cold(
        &self,
        target: &BlockTarget,
        account: &Arc<AccountState>,
        speculative: bool,
    ) -> (Result<Reservation, PoolError>, Vec<Instance>) {
        let memory_mb = u64::from(target.block.memory_mb);
        // Collected before the account lock (lock order: account, then blocks, then idle;
        // and these Arcs are dropped after the ledger guard, never under it).
        let pools: Vec<Arc<BlockPool>> = lock(&self.inner.blocks)
            .values()
            .filter(|p| p.target.account_id == account.id)
            .cloned()
            .collect();
        let mut ledger = account.lock();
        if speculative {
            return if ledger.fits_speculative(memory_mb) {
                (
                    Ok(Reservation::take(account, &mut ledger, memory_mb)),
                    Vec::new(),
                )
            } else {
                (Err(quota_error(target, &ledger, 0, 0)), Vec::new())
            };
        }
        if ledger.fits(memory_mb) {
            return (
                Ok(Reservation::take(account, &mut ledger, memory_mb)),
                Vec::new(),
            );
        }
        // Idle instances of the account, least recently used first.
        let mut candidates: Vec<(Instant, usize, String, u64)> = pools
            .iter()
            .enumerate()
            .flat_map(|(index, p)| {
                let mb = u64::from(p.target.block.memory_mb);
                p.idle_snapshot()
                    .into_iter()
                    .map(move |(id, since)| (since, index, id, mb))
            })
            .collect();
        candidates.sort_by_key(|c| c.0);
        let idle_count = u32::try_from(candidates.len()).unwrap_or(u32::MAX);
        let idle_mb: u64 = candidates.iter().map(|c| c.3).sum();
        if !ledger.fits_after(memory_mb, idle_count, idle_mb) {
            return (
                Err(quota_error(target, &ledger, idle_count, idle_mb)),
                Vec::new(),
            );
        }
        let mut victims = Vec::new();
        for (_, index, id, _) in candidates {
            if ledger.fits(memory_mb) {
                break;
            }
            // Gone already if a warm invocation or the reaper took it meanwhile.
            if let Some(mut victim) = pools[index].take_idle(&id) {
                victim.reservation.release_locked(&mut ledger);
                victims.push(victim);
            }
        }
        let verdict = if ledger.fits(memory_mb) {
            tracing::debug!(account = %account.id, evicted = victims.len(), "evicted idle instances to admit a cold start");
            Ok(Reservation::take(account, &mut ledger, memory_mb))
        } else {
            Err(quota_error(target, &ledger, 0, 0))
        };
        (verdict, victims)
    }

    /// Keeps the kernel's account-wide memory limit (the group cgroup holding all the
    /// account's instances) at the account's memory quota: a backstop under the pool's
    /// own accounting. Set with the account's first instance in this run and again
    /// whenever the quota changed; never below what the account already holds.
    fn ensure_group_limits(&self, account: &AccountState) {
        let wanted = {
            let ledger = account.lock();
            let wanted = ledger.wanted_group_limit_mb();
            if ledger.group_limit_mb == Some(wanted) {
                return;
            }
            wanted
        };
        match self
            .inner
            .host
            .set_group_limits(&cgroup_safe(&account.id), Some(wanted))
        {
            Ok(()) => account.lock().group_limit_mb = Some(wanted),
            // Retried with the next cold start; the pool's accounting still holds.
            Err(e) => {
                tracing::warn!(account = %account.id, memory_mb = wanted, error = %e, "cannot set the account's cgroup memory limit");
            }
        }
    }

    /// Admits a dependency build of `account_id` as one instance of `memory_mb` (its share
    /// of the account's instance and memory quota, held until the reservation is dropped).
    /// Refused like a cold start that finds no room (idle instances are not evicted for it):
    /// [`PoolError::InstanceQuota`] or [`PoolError::MemoryQuota`].
    pub fn reserve_build(
        &self,
        account_id: &str,
        account_name: &str,
        block: &str,
        memory_mb: u64,
    ) -> Result<BuildReservation, PoolError> {
        let account = self.inner.accounts.get(account_id);
        let mut ledger = account.lock();
        if ledger.fits(memory_mb) {
            let reservation = Reservation::take(&account, &mut ledger, memory_mb);
            drop(ledger);
            self.ensure_group_limits(&account);
            return Ok(BuildReservation(reservation));
        }
        let quota = ledger.quota;
        Err(if ledger.instances >= quota.instances {
            PoolError::InstanceQuota {
                account: account_name.to_string(),
                limit: quota.instances,
            }
        } else {
            PoolError::MemoryQuota {
                account: account_name.to_string(),
                limit_mb: quota.memory_mb,
                used_mb: ledger.memory_mb,
                needed_mb: memory_mb,
                block: format!("{block} (its dependency build)"),
            }
        })
    }

    /// The read-only mount of the block's dependency layer, if it has one.
    fn deps_mounts(&self, target: &BlockTarget) -> Result<Vec<ExtraMount>, PoolError> {
        let block = &target.block;
        let (Some(hash), Some(deps)) = (
            &block.deps_layer,
            refinery_runtimes::deps::descriptor(block.language),
        ) else {
            return Ok(Vec::new());
        };
        let missing = |why: &str| PoolError::StartInstance {
            block: block.name.clone(),
            message: format!(
                "its dependency layer {hash} {why}; deploy the project again to rebuild it"
            ),
        };
        let dir = refinery_runtimes::deps::layer_path(
            &self.inner.config.layers_root,
            &target.account_id,
            hash,
        )
        .ok_or_else(|| missing("has an invalid name"))?;
        if !dir.is_dir() {
            return Err(missing("is missing from the data dir"));
        }
        Ok(vec![ExtraMount {
            src: dir,
            dst: deps.mount_at.to_string(),
            writable: false,
            standby_at: Some(deps.standby_at.to_string()),
        }])
    }

    async fn start_instance(
        &self,
        block_pool: &BlockPool,
        account: &Arc<AccountState>,
        speculative: bool,
    ) -> Result<(Instance, Duration), StartFailure> {
        let started = Instant::now();
        let target = &block_pool.target;
        let block = &target.block;
        let env = self
            .instance_env(target)
            .await
            .map_err(StartFailure::Host)?;
        let extra_mounts = self.deps_mounts(target).map_err(StartFailure::Host)?;
        let (verdict, victims) = self.admit_cold(target, account, speculative);
        // Evicted instances go before the new one starts, so the account never holds
        // more than its quota at once.
        for victim in victims {
            self.discard(victim).await;
        }
        let reservation = verdict.map_err(StartFailure::Host)?;
        self.ensure_group_limits(account);
        let spec = InstanceSpec {
            instance_id: new_instance_id(),
            group: cgroup_safe(&target.account_id),
            code_dir: block_pool.code_dir.clone(),
            shared_dir: block_pool.shared_dir.clone(),
            runtime_dir: self.inner.config.runtime_dir.clone(),
            entry: sandbox_entry(refinery_runtimes::entry_with_deps(
                block.language,
                &block.source_name,
                &block.function,
                &env,
                !extra_mounts.is_empty(),
            )),
            env,
            memory_mb: block.memory_mb,
            tmp_mb: block.tmp_mb,
            pids_max: refinery_domain::limits::INSTANCE_PIDS_MAX,
            cpu_percent: 100,
            network: block.network,
            extra_mounts,
        };
        let host_error = |message: String| {
            StartFailure::Host(PoolError::StartInstance {
                block: block.name.clone(),
                message,
            })
        };
        let host = self.inner.host.clone();
        let spawned = tokio::task::spawn_blocking(move || host.spawn(&spec))
            .await
            .map_err(|e| host_error(e.to_string()))?
            .map_err(|e| host_error(e.to_string()))?;
        let channels = spawned.channels;
        let sandbox = spawned.instance;
        let channel = match InstanceChannel::new(channels.requests, channels.responses) {
            Ok(channel) => channel,
            Err(e) => {
                // Destroyed off the async workers (dropping it here would block one).
                destroy(Arc::new(sandbox)).await;
                return Err(host_error(e.to_string()));
            }
        };
        let mut instance = Instance::new(sandbox, channel, channels.logs, reservation);
        instance.live = Some(block_pool.live_guard());
        self.register(&instance, target, InstanceState::Starting);
        // A shutdown that began while this instance was being created has already swept the
        // registry: don't let it slip past.
        if self.inner.shutting_down.load(Ordering::Acquire) {
            self.discard(instance).await;
            return Err(StartFailure::Host(PoolError::ShuttingDown));
        }

        let init_limit = Duration::from_secs(u64::from(block.timeout_s));
        let ready = timeout(init_limit, instance.channel.ready()).await;
        let failure = |status, error| StartFailure::Init {
            status,
            error,
            elapsed: started.elapsed(),
        };
        match ready {
            Ok(Ok(_ready)) => Ok((instance, started.elapsed())),
            Ok(Err(ChannelError::InitFailed(error))) => {
                self.discard(instance).await;
                Err(failure(ExecutionStatus::InitError, error))
            }
            Ok(Err(other)) => {
                let (oom, tail) = self.discard(instance).await;
                if oom {
                    return Err(failure(
                        ExecutionStatus::Oom,
                        UserError::new(
                            "OutOfMemory",
                            format!(
                                "loading the block used more than its memory_mb of {} MB",
                                block.memory_mb
                            ),
                        ),
                    ));
                }
                let mut error = crash_error(&other, &tail);
                error.message = format!(
                    "the instance died while loading the block: {}",
                    error.message
                );
                Err(failure(ExecutionStatus::InitError, error))
            }
            Err(_elapsed) => {
                self.discard(instance).await;
                Err(failure(
                    ExecutionStatus::Timeout,
                    UserError::new(
                        "InitTimeout",
                        format!(
                            "loading the block took longer than its timeout_s of {} s",
                            block.timeout_s
                        ),
                    ),
                ))
            }
        }
    }

    /// After an invocation: keeps the instance (of concurrency level `level`) warm for its
    /// window, or — when the adaptive policy pre-warms this level and the instance is the
    /// block's last idle one, not part of its `min_warm` floor — lets it go now and
    /// schedules a fresh one for the pre-warm time. An instance that may not be let go is
    /// kept to the end of the window (pre-warm plus keep-alive).
    async fn release(
        &self,
        block_pool: &Arc<BlockPool>,
        instance: Instance,
        level: u32,
        window: Window,
    ) {
        let now = Instant::now();
        if !window.prewarm.is_zero() && block_pool.may_let_go() && !block_pool.is_retired() {
            let at = now + window.prewarm;
            block_pool.schedule_prewarm(Prewarm {
                level,
                let_go: now,
                at,
                until: at + window.keep_alive,
            });
            // On time, not at the reaper's next round (which may be a good part of the
            // pre-warm's margin away); an arrival meanwhile leaves this nothing to start.
            let (pool, timed) = (Arc::downgrade(&self.inner), block_pool.clone());
            tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                if let Some(inner) = pool.upgrade() {
                    let pool = InstancePool { inner };
                    for prewarm in timed.due_prewarms(Instant::now()) {
                        pool.start_ahead(
                            &timed,
                            prewarm.let_go,
                            prewarm.until,
                            AheadReason::prewarm,
                        );
                    }
                }
            });
            self.inner.metrics.reap(&block_pool.labels);
            self.discard(instance).await;
            return;
        }
        self.park(
            block_pool,
            instance,
            now,
            now + window.prewarm + window.keep_alive,
        )
        .await;
    }

    /// Freezes the instance and keeps it warm until `expires` (idle since `since`, for
    /// least-recently-used eviction), or discards it if it may not be kept.
    async fn park(
        &self,
        block_pool: &BlockPool,
        instance: Instance,
        since: Instant,
        expires: Instant,
    ) {
        if block_pool.is_retired() || self.inner.shutting_down.load(Ordering::Acquire) {
            self.discard(instance).await;
            return;
        }
        // At once when nothing is left to wait for; otherwise off the async workers, since
        // freezing then first waits (bounded) for killed stragglers.
        let frozen = match instance.sandbox.freeze_if_settled() {
            Some(frozen) => frozen,
            None => {
                let sandbox = instance.sandbox.clone();
                tokio::task::spawn_blocking(move || sandbox.freeze())
                    .await
                    .unwrap_or_else(|e| {
                        Err(refinery_sandbox::SandboxError::Freeze {
                            instance: instance.id().to_string(),
                            path: Default::default(),
                            source: std::io::Error::other(e.to_string()),
                        })
                    })
            }
        };
        if let Err(e) = frozen {
            tracing::warn!(instance = instance.id(), error = %e, "cannot freeze instance; discarding it");
            self.discard(instance).await;
            return;
        }
        {
            let mut registry = lock(&self.inner.registry);
            if let Some(entry) = registry.get_mut(instance.id()) {
                entry.info.state = InstanceState::Frozen;
                entry.info.last_used_at_ms = now_ms();
                entry.info.invocations = instance.invocations;
            }
        }
        if let Some(instance) = block_pool.push_idle(instance, since, expires) {
            // Retired while it was being frozen.
            self.discard(instance).await;
        }
    }

    /// Destroys an instance; returns whether the kernel OOM-killed it and its last output.
    async fn discard(&self, instance: Instance) -> (bool, String) {
        lock(&self.inner.registry).remove(instance.id());
        let sandbox = instance.sandbox.clone();
        let oom = destroy(sandbox).await;
        // Let the log drain read what the instance wrote before it died.
        tokio::time::sleep(Duration::from_millis(5)).await;
        (oom, instance.log_tail())
    }

    /// The reaper's round: destroys idle instances past their keep-alive (never a block's
    /// `min_warm` floor), starts due adaptive pre-warms, and tops blocks back up to
    /// `min_warm` after discards.
    fn upkeep(&self) {
        let now = Instant::now();
        let block_pools: Vec<Arc<BlockPool>> = lock(&self.inner.blocks).values().cloned().collect();
        for block_pool in block_pools {
            let upkeep = block_pool.upkeep(now);
            for instance in upkeep.expired {
                tracing::debug!(instance = instance.id(), "reaping idle instance");
                self.inner.metrics.reap(&block_pool.labels);
                let pool = self.clone();
                tokio::spawn(async move {
                    pool.discard(instance).await;
                });
            }
            for prewarm in upkeep.prewarms {
                self.start_ahead(
                    &block_pool,
                    prewarm.let_go,
                    prewarm.until,
                    AheadReason::prewarm,
                );
            }
            if upkeep.provision > 0 {
                let keep = now + block_pool.history_window().keep_alive;
                for _ in 0..upkeep.provision {
                    self.start_ahead(&block_pool, now, keep, AheadReason::provisioned);
                }
            }
        }
    }

    /// Starts one instance of the block ahead of traffic (a pre-warm or a provisioned
    /// instance) in a task of its own and parks it frozen until `expires`, counted as idle
    /// since `since`.
    fn start_ahead(
        &self,
        block_pool: &Arc<BlockPool>,
        since: Instant,
        expires: Instant,
        reason: AheadReason,
    ) {
        block_pool.starting_ahead();
        let pool = self.clone();
        let block_pool = block_pool.clone();
        tokio::spawn(async move {
            pool.start_and_park(&block_pool, since, expires, reason)
                .await;
            block_pool.started_ahead();
        });
    }

    /// A pre-warm is speculative: it takes no more than half of what the account has free
    /// and evicts nothing (see [`Ledger::fits_speculative`]); when it does not fit it is
    /// skipped, quietly, and the block's provisioning is not held back. A provisioned
    /// (`min_warm`) instance is admitted like a cold start.
    async fn start_and_park(
        &self,
        block_pool: &BlockPool,
        since: Instant,
        expires: Instant,
        reason: AheadReason,
    ) -> bool {
        if self.inner.shutting_down.load(Ordering::Acquire) || block_pool.is_retired() {
            return false;
        }
        let target = &block_pool.target;
        let account = self.inner.accounts.get(&target.account_id);
        let speculative = matches!(reason, AheadReason::prewarm);
        match self.start_instance(block_pool, &account, speculative).await {
            Ok((instance, _init)) => {
                if !speculative {
                    block_pool.provision_succeeded();
                }
                self.inner.metrics.started_ahead(&block_pool.labels, reason);
                self.park(block_pool, instance, since, expires).await;
                true
            }
            Err(StartFailure::Host(
                e @ (PoolError::InstanceQuota { .. } | PoolError::MemoryQuota { .. }),
            )) if speculative => {
                tracing::debug!(account = %target.account_id, project = %target.project, block = %target.block.name, error = %e, "pre-warm skipped: the account has too little room free");
                false
            }
            Err(StartFailure::Host(e)) if speculative => {
                tracing::warn!(account = %target.account_id, project = %target.project, block = %target.block.name, error = %e, "cannot pre-warm an instance");
                false
            }
            Err(StartFailure::Init { error, .. }) if speculative => {
                tracing::warn!(account = %target.account_id, project = %target.project, block = %target.block.name, error = %error.message, "a pre-warmed instance failed to load the block");
                false
            }
            Err(StartFailure::Host(e)) => {
                block_pool.provision_failed(Instant::now());
                tracing::warn!(account = %target.account_id, project = %target.project, block = %target.block.name, error = %e, "cannot start an instance ahead of traffic; retrying later");
                false
            }
            Err(StartFailure::Init { error, .. }) => {
                block_pool.provision_failed(Instant::now());
                tracing::warn!(account = %target.account_id, project = %target.project, block = %target.block.name, error = %error.message, "an instance started ahead of traffic failed to load the block; retrying later");
                false
            }
        }
    }

    /// Provisioned concurrency: starts each block's `min_warm` instances now (a deploy or
    /// rollback made its deployment live, or the server started), before any traffic.
    /// What does not fit the account's quota (or fails to load) is logged and retried by
    /// the reaper, backing off from 5 s to 5 min.
    pub async fn provision(&self, targets: Vec<BlockTarget>) {
        let pool = self.clone();
        // In a task of its own: a cancelled caller (an HTTP handler) must not leave
        // half-started instances behind.
        let provisioning = tokio::spawn(async move {
            for target in targets.into_iter().filter(|t| t.block.min_warm > 0) {
                let block_pool = match pool.block_pool(&target).await {
                    Ok(block_pool) => block_pool,
                    // Provisioned again when the operator enables it.
                    Err(PoolError::AccountDisabled { .. }) => continue,
                    Err(e) => {
                        tracing::warn!(block = %target.block.name, error = %e, "cannot provision block");
                        continue;
                    }
                };
                let now = Instant::now();
                let keep = now + block_pool.history_window().keep_alive;
                // Every start of the deficit is counted as under way before the first
                // begins, so the reaper's own top-up (which counts them) starts none twice.
                let deficit = block_pool.provision_deficit();
                for _ in 0..deficit {
                    block_pool.starting_ahead();
                }
                let mut pending = deficit;
                while pending > 0 {
                    let started = pool
                        .start_and_park(&block_pool, now, keep, AheadReason::provisioned)
                        .await;
                    block_pool.started_ahead();
                    pending -= 1;
                    if !started {
                        break;
                    }
                }
                for _ in 0..pending {
                    block_pool.started_ahead();
                }
            }
        });
        let _ = provisioning.await;
    }

    fn register(&self, instance: &Instance, target: &BlockTarget, state: InstanceState) {
        let now = now_ms();
        let info = InstanceInfo {
            id: instance.id().to_string(),
            account_id: target.account_id.clone(),
            project: target.project.clone(),
            deployment: target.deployment_number,
            block: target.block.name.clone(),
            state,
            pid: instance.sandbox.pid(),
            uid: instance.sandbox.uid(),
            cgroups: instance.sandbox.cgroup_paths(),
            started_at_ms: now,
            last_used_at_ms: now,
            invocations: 0,
        };
        lock(&self.inner.registry).insert(
            info.id.clone(),
            Registered {
                info,
                sandbox: instance.sandbox.clone(),
            },
        );
    }

    fn set_state(&self, instance_id: &str, state: InstanceState) {
        if let Some(entry) = lock(&self.inner.registry).get_mut(instance_id) {
            entry.info.state = state;
        }
    }
}

/// The refusal for a cold start that does not fit even after evicting `evictable`
/// idle instances holding `evictable_mb`: names the limit that binds.
fn quota_error(
    target: &BlockTarget,
    ledger: &Ledger,
    evictable: u32,
    evictable_mb: u64,
) -> PoolError {
    let quota = ledger.quota;
    let needed_mb = u64::from(target.block.memory_mb);
    if ledger.instances.saturating_sub(evictable) >= quota.instances {
        PoolError::InstanceQuota {
            account: target.account_name.clone(),
            limit: quota.instances,
        }
    } else {
        PoolError::MemoryQuota {
            account: target.account_name.clone(),
            limit_mb: quota.memory_mb,
            used_mb: ledger.memory_mb.saturating_sub(evictable_mb),
            needed_mb,
            block: target.block.name.clone(),
        }
    }
}

/// A dependency build's share of its account's quota ([`InstancePool::reserve_build`]),
/// released when dropped.
pub struct BuildReservation(#[allow(dead_code)] Reservation);

/// Kills and cleans up a sandbox off the async threads; returns whether it was OOM-killed.
async fn destroy(sandbox: Arc<SandboxedInstance>) -> bool {
    let id = sandbox.id().to_string();
    match tokio::task::spawn_blocking(move || sandbox.destroy()).await {
        Ok(Ok(report)) => report.oom_killed,
        Ok(Err(e)) => {
            tracing::warn!(instance = %id, error = %e, "destroying instance");
            false
        }
        Err(e) => {
            tracing::warn!(instance = %id, error = %e, "destroy task failed");
            false
        }
    }
}

fn crash_error(error: &ChannelError, log_tail: &str) -> UserError {
    let mut user_error = UserError::new(
        "InstanceCrashed",
        match error {
            ChannelError::Closed => "the instance exited unexpectedly".to_string(),
            other => format!("the instance broke the runtime protocol: {other}"),
        },
    );
    if !log_tail.is_empty() {
        user_error.traceback = Some(log_tail.to_string());
    }
    user_error
}

/// The runtimes' entry in the sandbox's terms (the two crates do not depend on each other).
pub fn sandbox_entry(entry: RuntimeEntry) -> Entry {
    match entry {
        RuntimeEntry::Exec { argv } => Entry::Exec { argv },
        RuntimeEntry::Builtin { name, args } => Entry::Builtin { name, args },
        RuntimeEntry::Fork {
            zygote,
            args,
            fallback,
        } => Entry::Fork {
            zygote,
            args,
            fallback: Some(fallback),
        },
        RuntimeEntry::Standby {
            runtime,
            args,
            fallback,
        } => Entry::Standby {
            runtime,
            args,
            fallback: Some(Box::new(sandbox_entry(*fallback))),
        },
    }
}

fn new_instance_id() -> String {
    let uuid = uuid::Uuid::new_v4().simple().to_string();
    format!("i-{}", &uuid[..20])
}

/// Cgroup names allow only `[a-z0-9-]` here.
fn cgroup_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect()
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
