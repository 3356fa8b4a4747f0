//! [`InvocationService`]: resolve a block of a live deployment, then admit, run, record and
//! meter one invocation of it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use refinery_domain::execution::truncate_utf8;
use refinery_domain::limits::{MAX_PAYLOAD_BYTES, RECORDED_PAYLOAD_BYTES};
use refinery_domain::{BlockSpec, ExecutionRecord, ExecutionStatus, LogLevel, UserError};
use refinery_pool::{BlockTarget, InstancePool, Invocation, PoolError, RunContext};
use refinery_store::{Account, Deployment, ExecutionUsage, Store, StoreError};
use serde::Serialize;
use serde_json::Value;

use crate::error::InvocationError;

/// The disk reserve as the service sees it: the server's free-space watcher implements it
/// (`server/src/disk.rs`), and its messages say what was refused or lost and how to fix it.
pub trait DiskReserve: Send + Sync {
    /// Before any code runs (one cheap check): `Err(message)` while the data dir's free
    /// space is below the reserve.
    fn admit(&self) -> Result<(), String>;
    /// The pool could not run the invocation: `Some(message)` if that is for lack of
    /// space (laying out code, starting a sandbox), `None` for any other cause.
    fn pool_failure(&self, error: &PoolError) -> Option<String>;
    /// The execution record could not be committed: `Some(message)` if the disk is full.
    fn record_failure(&self, error: &StoreError) -> Option<String>;
}

/// The live deployment of a project, indexed for invocation.
#[derive(Debug)]
pub struct LiveDeployment {
    pub id: i64,
    pub number: i64,
    pub blocks: HashMap<String, BlockSpec>,
}

impl LiveDeployment {
    fn from_deployment(deployment: Deployment) -> LiveDeployment {
        LiveDeployment {
            id: deployment.id,
            number: deployment.number,
            blocks: deployment
                .blocks
                .into_iter()
                .map(|b| (b.name.clone(), b))
                .collect(),
        }
    }
}

/// One invocation to run: the block (from [`InvocationService::resolve`]) and what it is
/// given.
#[derive(Debug)]
pub struct InvocationRequest {
    pub target: BlockTarget,
    /// The input, parsed.
    pub input: Value,
    /// The input as received, for the execution record (truncated there).
    pub input_text: String,
    /// The initial backpack (a JSON object).
    pub backpack: Value,
    /// What the execution record keeps of the payloads (input, output, logs): a service
    /// step follows its project's `log_level`; a plain invoke keeps everything.
    pub log_level: LogLevel,
    /// Set when the invocation is a step of a service run (the block sees its run id, step
    /// id and attempt); `None` for a plain invoke.
    pub context: Option<RunContext>,
}

/// A recorded execution: what the block did, as committed to the store. Serialised, it is
/// the invoke route's reply (the fields are in alphabetical order, the order of the JSON
/// object's keys).
#[derive(Debug, Serialize)]
pub struct Execution {
    /// The backpack as the block left it.
    pub backpack: Value,
    pub block: String,
    /// Whether a new instance was started for it.
    pub cold: bool,
    /// The deployment's number within its project.
    pub deployment: i64,
    /// The handler's run time.
    pub duration_ms: f64,
    pub error: Option<UserError>,
    /// `ex_` + a UUIDv7: the record's id.
    pub execution_id: String,
    /// Cold starts only: from asking for an instance to the block's code loaded.
    pub init_ms: Option<f64>,
    pub instance_id: String,
    pub logs: String,
    pub output: Option<Value>,
    pub project: String,
    pub status: ExecutionStatus,
}

/// The one path from "run this block" to a recorded, metered execution, shared by every
/// entry point (the invoke route today; the pipeline engine and triggers next). Cheap to
/// clone.
#[derive(Clone)]
pub struct InvocationService {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    pool: InstancePool,
    disk: Arc<dyn DiskReserve>,
    /// The live deployment of each (account id, project), invalidated on deploy/rollback.
    live: RwLock<HashMap<(String, String), Arc<LiveDeployment>>>,
    /// Bumped by every invalidation: a lookup that raced a deploy must not put the
    /// deployment it read (now replaced) back into the cache.
    live_generation: AtomicU64,
    /// Accounts known to have no spending cap: their invocations need no billing query.
    uncapped: RwLock<HashSet<String>>,
    /// Bumped by every change of billing terms, like `live_generation`.
    billing_generation: AtomicU64,
}

impl InvocationService {
    pub fn new(store: Store, pool: InstancePool, disk: Arc<dyn DiskReserve>) -> Self {
        InvocationService {
            inner: Arc::new(Inner {
                store,
                pool,
                disk,
                live: RwLock::new(HashMap::new()),
                live_generation: AtomicU64::new(0),
                uncapped: RwLock::new(HashSet::new()),
                billing_generation: AtomicU64::new(0),
            }),
        }
    }

    /// The live deployment of `project` owned by `account_id` (cached), or
    /// [`InvocationError::ProjectNotFound`].
    pub async fn live_deployment(
        &self,
        account_id: &str,
        project: &str,
    ) -> Result<Arc<LiveDeployment>, InvocationError> {
        let inner = &self.inner;
        let key = (account_id.to_string(), project.to_string());
        if let Some(live) = read(&inner.live).get(&key) {
            return Ok(live.clone());
        }
        let generation = inner.live_generation.load(Ordering::Acquire);
        let deployment = inner
            .store
            .live_deployment(account_id, project)
            .await?
            .ok_or_else(|| InvocationError::ProjectNotFound {
                project: project.to_string(),
            })?;
        let live = Arc::new(LiveDeployment::from_deployment(deployment));
        let mut cache = write(&inner.live);
        if inner.live_generation.load(Ordering::Acquire) == generation {
            cache.insert(key, live.clone());
        }
        Ok(live)
    }

    /// Forgets the cached live deployment after it changed (deploy, rollback, deletion).
    pub fn invalidate_live(&self, account_id: &str, project: &str) {
        let mut cache = write(&self.inner.live);
        self.inner.live_generation.fetch_add(1, Ordering::AcqRel);
        cache.remove(&(account_id.to_string(), project.to_string()));
    }

    /// The block `block` of the live deployment of `account`'s `project`, or a not-found
    /// error naming what exists.
    pub async fn resolve(
        &self,
        account: &Account,
        project: String,
        block: &str,
    ) -> Result<BlockTarget, InvocationError> {
        let live = self.live_deployment(&account.id, &project).await?;
        let Some(spec) = live.blocks.get(block).cloned() else {
            let mut blocks: Vec<String> = live.blocks.keys().cloned().collect();
            blocks.sort_unstable();
            return Err(InvocationError::BlockNotFound {
                project,
                deployment: live.number,
                block: block.to_string(),
                blocks,
            });
        };
        Ok(BlockTarget {
            account_id: account.id.clone(),
            account_name: account.name.clone(),
            project,
            deployment_id: live.id,
            deployment_number: live.number,
            block: spec,
        })
    }

    /// The account's quota of concurrent instances (the engine starts no more steps of
    /// the account at once).
    pub fn instance_quota(&self, account_id: &str) -> u32 {
        self.inner.pool.account_usage(account_id).quota.instances
    }

    /// Call after any account's billing terms changed: the next invocation of every
    /// account reads its spending cap again.
    pub fn billing_changed(&self) {
        let mut set = write(&self.inner.uncapped);
        self.inner.billing_generation.fetch_add(1, Ordering::AcqRel);
        set.clear();
    }

    /// Runs `request` for `account` (the account its target was resolved for), in this
    /// order: the spending cap (refused before anything runs), the disk reserve (likewise),
    /// the pool, the output-size check and the record, metering, and the durable insert
    /// of the record with its usage (answered after COMMIT). From the pool on, it runs in
    /// a task of its own: a caller that goes away cannot cancel an invocation half-way
    /// (its instance would be lost and its execution unrecorded).
    pub async fn invoke(
        &self,
        account: &Account,
        request: InvocationRequest,
    ) -> Result<Execution, InvocationError> {
        debug_assert_eq!(account.id, request.target.account_id);
        self.admit_spending(account).await?;
        self.inner
            .disk
            .admit()
            .map_err(|message| InvocationError::DiskFull { message })?;
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.run(request).await })
            .await
            .map_err(|e| InvocationError::Internal(format!("invocation task failed: {e}")))?
    }

    /// Refuses an invocation, before anything runs, when the account's usage this month
    /// at cost plus markup has reached its spending cap. Accounts without a cap cost one
    /// indexed read, once (then they are remembered until terms change).
    async fn admit_spending(&self, account: &Account) -> Result<(), InvocationError> {
        let inner = &self.inner;
        if read(&inner.uncapped).contains(&account.id) {
            return Ok(());
        }
        let generation = inner.billing_generation.load(Ordering::Acquire);
        let Some(spending) = inner.store.spending(account, now_ms()).await? else {
            let mut set = write(&inner.uncapped);
            // A concurrent `set-billing` must not be undone by this (stale) read.
            if inner.billing_generation.load(Ordering::Acquire) == generation {
                set.insert(account.id.clone());
            }
            return Ok(());
        };
        if !spending.reached {
            return Ok(());
        }
        Err(InvocationError::SpendingCapReached {
            account: account.name.clone(),
            cap: spending.cap,
            spent: spending.spent,
            currency: spending.currency,
            period: spending.period,
        })
    }
}

impl Inner {
    async fn run(&self, request: InvocationRequest) -> Result<Execution, InvocationError> {
        let InvocationRequest {
            target,
            input,
            input_text,
            backpack,
            log_level,
            context,
        } = request;
        let invocation = self
            .pool
            .invoke(&target, input, backpack, context.as_ref())
            .await
            .map_err(|e| match self.disk.pool_failure(&e) {
                Some(message) => InvocationError::DiskFull { message },
                None => e.into(),
            })?;
        let (mut record, execution, egress_bytes) = finish(&target, input_text, invocation);
        keep_per_log_level(&mut record, log_level);
        let usage = usage_of(target.block.memory_mb, egress_bytes);
        self.store
            .insert_execution(&record, &usage)
            .await
            .map_err(|e| match self.disk.record_failure(&e) {
                Some(message) => InvocationError::DiskFull { message },
                None => e.into(),
            })?;
        Ok(execution)
    }
}

/// Builds the execution record and the outcome from what the pool returned, and the
/// metered egress (the bytes of the output JSON of a successful run, before the record's
/// truncation). An output over [`MAX_PAYLOAD_BYTES`] turns the execution into an
/// `OutputTooLarge` error.
fn finish(
    target: &BlockTarget,
    input_text: String,
    mut invocation: Invocation,
) -> (ExecutionRecord, Execution, u64) {
    let mut output_text = invocation
        .output
        .as_ref()
        .map(|o| serde_json::to_string(o).unwrap_or_default());
    if output_text
        .as_ref()
        .is_some_and(|t| t.len() > MAX_PAYLOAD_BYTES)
    {
        let size = output_text.as_ref().map_or(0, String::len);
        invocation.status = ExecutionStatus::Error;
        invocation.output = None;
        output_text = None;
        invocation.error = Some(UserError::new(
            "OutputTooLarge",
            format!("the block returned {size} bytes of JSON; the limit is {MAX_PAYLOAD_BYTES} bytes (6 MB)"),
        ));
    }
    // What the reply carries as `output`: its JSON, or `null` without one.
    let egress_bytes = if invocation.status == ExecutionStatus::Ok {
        output_text.as_ref().map_or("null".len(), String::len) as u64
    } else {
        0
    };
    // Time-ordered (UUIDv7): consecutive executions land in the same index pages, so a
    // group-committed batch dirties a few pages instead of one per record.
    let execution_id = format!("ex_{}", uuid::Uuid::now_v7().simple());
    let mut input = input_text;
    let input_truncated = truncate_utf8(&mut input, RECORDED_PAYLOAD_BYTES);
    let output_truncated = output_text
        .as_mut()
        .is_some_and(|t| truncate_utf8(t, RECORDED_PAYLOAD_BYTES));
    let record = ExecutionRecord {
        id: execution_id.clone(),
        account_id: target.account_id.clone(),
        project: target.project.clone(),
        deployment: target.deployment_number,
        block: target.block.name.clone(),
        instance_id: invocation.instance_id.clone(),
        cold: invocation.cold,
        started_at_ms: invocation.started_at_ms,
        duration_ms: invocation.duration_ms,
        init_ms: invocation.init_ms,
        status: invocation.status,
        input,
        input_truncated,
        output: output_text,
        output_truncated,
        error: invocation.error.clone(),
        logs: invocation.logs.clone(),
        logs_truncated: invocation.logs_truncated,
    };
    let execution = Execution {
        backpack: invocation.backpack,
        block: target.block.name.clone(),
        cold: invocation.cold,
        deployment: target.deployment_number,
        duration_ms: invocation.duration_ms,
        error: invocation.error,
        execution_id,
        init_ms: invocation.init_ms,
        instance_id: invocation.instance_id,
        logs: invocation.logs,
        output: invocation.output,
        project: target.project.clone(),
        status: invocation.status,
    };
    (record, execution, egress_bytes)
}

/// Drops the record's payloads (input, output, logs) that `log_level` does not keep:
/// `errors` keeps them for failed executions only, `none` never.
fn keep_per_log_level(record: &mut ExecutionRecord, log_level: LogLevel) {
    let keep = match log_level {
        LogLevel::All => true,
        LogLevel::Errors => record.status != ExecutionStatus::Ok,
        LogLevel::None => false,
    };
    if !keep {
        record.input.clear();
        record.input_truncated = false;
        record.output = None;
        record.output_truncated = false;
        record.logs.clear();
        record.logs_truncated = false;
    }
}

/// Metering inputs of one finished execution: the block's memory, the end time (now),
/// and the egress [`finish`] measured.
fn usage_of(memory_mb: u32, egress_bytes: u64) -> ExecutionUsage {
    ExecutionUsage {
        memory_mb,
        ended_at_ms: now_ms(),
        egress_bytes,
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use refinery_domain::Language;
    use serde_json::json;

    use super::*;

    fn target() -> BlockTarget {
        BlockTarget {
            account_id: "acct_0123456789abcdef".into(),
            account_name: "acme".into(),
            project: "shop".into(),
            deployment_id: 7,
            deployment_number: 2,
            block: BlockSpec {
                files: Default::default(),
                binary_files: Default::default(),
                shared: Vec::new(),
                function: "main".into(),
                secret_env: Default::default(),
                name: "checkout".into(),
                language: Language::Python,
                source_name: "checkout.py".into(),
                code: "def main(i, b): return i".into(),
                memory_mb: 128,
                timeout_s: 5,
                max_concurrency: 4,
                keep_alive_s: None,
                min_warm: 0,
                tmp_mb: 16,
                env: BTreeMap::new(),
                network: false,
                deps_layer: None,
            },
        }
    }

    fn invocation(output: Option<Value>) -> Invocation {
        Invocation {
            status: ExecutionStatus::Ok,
            output,
            backpack: json!({"user": 1}),
            error: None,
            logs: "hello\n".into(),
            logs_truncated: false,
            cold: true,
            instance_id: "inst_1".into(),
            init_ms: Some(12.5),
            duration_ms: 0.25,
            started_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn the_outcome_serialises_as_the_invoke_reply_always_did() {
        let (record, execution, egress) = finish(
            &target(),
            r#"{"n": 1}"#.into(),
            invocation(Some(json!({"n": 1}))),
        );
        // The reply as the route built it before the service existed.
        let before = json!({
            "execution_id": record.id,
            "project": "shop",
            "block": "checkout",
            "deployment": 2,
            "status": ExecutionStatus::Ok,
            "output": Some(json!({"n": 1})),
            "error": Option::<UserError>::None,
            "backpack": json!({"user": 1}),
            "logs": "hello\n",
            "cold": true,
            "instance_id": "inst_1",
            "duration_ms": 0.25,
            "init_ms": Some(12.5),
        });
        assert_eq!(
            serde_json::to_string(&execution).expect("serialise"),
            serde_json::to_string(&before).expect("serialise")
        );
        assert_eq!(egress, r#"{"n":1}"#.len() as u64);
        assert_eq!(record.input, r#"{"n": 1}"#);
        assert_eq!(record.output.as_deref(), Some(r#"{"n":1}"#));
        assert_eq!(record.logs, "hello\n");
        assert!(execution.execution_id.starts_with("ex_"));
    }

    #[test]
    fn an_output_over_the_limit_is_an_error_and_not_billed_as_egress() {
        let big = Value::String("x".repeat(MAX_PAYLOAD_BYTES));
        let (record, execution, egress) = finish(&target(), "null".into(), invocation(Some(big)));
        assert_eq!(execution.status, ExecutionStatus::Error);
        assert_eq!(execution.output, None);
        let error = execution.error.expect("an OutputTooLarge error");
        assert_eq!(error.kind, "OutputTooLarge");
        assert!(error.message.contains("the limit is"), "{}", error.message);
        assert_eq!(record.output, None);
        assert_eq!(record.status, ExecutionStatus::Error);
        assert_eq!(egress, 0);
    }

    #[test]
    fn recorded_payloads_are_truncated_but_egress_counts_all_of_the_output() {
        let long = Value::String("y".repeat(RECORDED_PAYLOAD_BYTES * 2));
        let text = serde_json::to_string(&long).expect("serialise");
        let (record, execution, egress) =
            finish(&target(), text.clone(), invocation(Some(long.clone())));
        assert!(record.input_truncated && record.output_truncated);
        assert_eq!(record.input.len(), RECORDED_PAYLOAD_BYTES);
        assert_eq!(egress, text.len() as u64);
        assert_eq!(execution.output, Some(long));
    }

    #[test]
    fn a_successful_run_without_output_meters_the_null_it_replies() {
        let (_, _, egress) = finish(&target(), String::new(), invocation(None));
        assert_eq!(egress, 4);
    }
}
