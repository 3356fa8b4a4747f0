//! What every request handler shares: the store, the pool, the invocation service (which
//! caches live deployments and spending caps), and the key cache that keeps the store off
//! the invocation hot path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use refinery_engine::Engine;
use refinery_invocation::{InvocationError, InvocationService, LiveDeployment};
use refinery_pool::InstancePool;
use refinery_store::{Account, Store};

use crate::deploy_gate::{DeployGate, DeployLimits};
use crate::disk::DiskSpace;
use crate::error::ApiError;

pub struct AppState {
    pub store: Store,
    pub pool: InstancePool,
    /// SHA-256 of the operator key (the key itself is only in `operator.key`).
    pub operator_key_hash: String,
    /// Accounts by key hash; an account's entries are dropped when its key is rotated or
    /// it is disabled or enabled ([`AppState::forget_account_keys`]).
    accounts_by_key: RwLock<HashMap<String, Account>>,
    /// Bumped by every such invalidation, like `live_generation`: a lookup that raced a
    /// rotation must not put the old key back.
    keys_generation: AtomicU64,
    /// Accounts by name (for endpoints, whose URLs name the account), dropped with the keys.
    accounts_by_name: RwLock<HashMap<String, Account>>,
    /// Resolves and runs invocations (admission, pool, record, metering); holds the
    /// live-deployment and spending-cap caches.
    pub invocations: InvocationService,
    /// Runs services (the runs API).
    pub engine: Engine,
    /// Serialises quota changes (store, then pool) so the two never disagree.
    pub quota_updates: tokio::sync::Mutex<()>,
    /// Deploy rate, deploys received at once, deployments kept (`deploy_gate.rs`).
    pub deploy_gate: DeployGate,
    /// Free space of the data dir's filesystem and the reserve below which new work is
    /// refused (`disk.rs`; set by [`AppState::with_disk`], no reserve otherwise).
    pub disk: Arc<DiskSpace>,
    /// Builds blocks' dependency layers at deploy (`builds.rs`); None: deploys of blocks
    /// that declare dependencies are refused.
    pub builds: Option<Arc<refinery_deps::Builder>>,
}

impl AppState {
    pub fn new(
        store: Store,
        pool: InstancePool,
        operator_key_hash: String,
        invocations: InvocationService,
        engine: Engine,
    ) -> AppState {
        let data_dir = store
            .path()
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .to_path_buf();
        AppState {
            disk: Arc::new(DiskSpace::new(&data_dir, 0)),
            store,
            pool,
            operator_key_hash,
            accounts_by_key: RwLock::new(HashMap::new()),
            keys_generation: AtomicU64::new(0),
            accounts_by_name: RwLock::new(HashMap::new()),
            invocations,
            engine,
            quota_updates: tokio::sync::Mutex::new(()),
            deploy_gate: DeployGate::new(DeployLimits::DEFAULT),
            builds: None,
        }
    }

    /// Builds dependency layers with `builder`.
    pub fn with_builder(mut self, builder: Arc<refinery_deps::Builder>) -> AppState {
        self.builds = Some(builder);
        self
    }

    /// The operator's deploy limits instead of the defaults.
    pub fn with_deploy_limits(mut self, limits: DeployLimits) -> AppState {
        self.deploy_gate = DeployGate::new(limits);
        self
    }

    /// Watches `disk` (its reserve applies to invocations and deploys).
    pub fn with_disk(mut self, disk: Arc<DiskSpace>) -> AppState {
        self.disk = disk;
        self
    }

    pub async fn account_by_key_hash(&self, key_hash: &str) -> Result<Option<Account>, ApiError> {
        if let Some(account) = read(&self.accounts_by_key).get(key_hash) {
            return Ok(Some(account.clone()));
        }
        let generation = self.keys_generation.load(Ordering::Acquire);
        let found = self.store.account_by_key_hash(key_hash).await?;
        if let Some(account) = &found {
            let mut cache = write(&self.accounts_by_key);
            if self.keys_generation.load(Ordering::Acquire) == generation {
                cache.insert(key_hash.to_string(), account.clone());
            }
        }
        Ok(found)
    }

    /// The account named `name` (cached like keys, and forgotten with them).
    pub async fn account_by_name(&self, name: &str) -> Result<Option<Account>, ApiError> {
        if let Some(account) = read(&self.accounts_by_name).get(name) {
            return Ok(Some(account.clone()));
        }
        let generation = self.keys_generation.load(Ordering::Acquire);
        let found = self.store.account_by_name(name).await?;
        if let Some(account) = &found {
            let mut cache = write(&self.accounts_by_name);
            if self.keys_generation.load(Ordering::Acquire) == generation {
                cache.insert(name.to_string(), account.clone());
            }
        }
        Ok(found)
    }

    /// Forgets every cached key of the account, after its keys or its state changed in
    /// the store: the next request with any of them reads the store again.
    pub fn forget_account_keys(&self, account_id: &str) {
        let mut cache = write(&self.accounts_by_key);
        self.keys_generation.fetch_add(1, Ordering::AcqRel);
        cache.retain(|_, account| account.id != account_id);
        write(&self.accounts_by_name).retain(|_, account| account.id != account_id);
    }

    /// The live deployment of `project` owned by `account_id` (the invocation service's
    /// cache), or 404.
    pub async fn live_deployment(
        &self,
        account_id: &str,
        project: &str,
    ) -> Result<Arc<LiveDeployment>, ApiError> {
        Ok(self
            .invocations
            .live_deployment(account_id, project)
            .await?)
    }

    /// Forgets the cached live deployment after it changed.
    pub fn invalidate_live(&self, account_id: &str, project: &str) {
        self.invocations.invalidate_live(account_id, project);
    }

    /// Call after any account's billing terms changed (the spending-cap cache).
    pub fn billing_changed(&self) {
        self.invocations.billing_changed();
    }
}

pub fn project_not_found(project: &str) -> ApiError {
    InvocationError::ProjectNotFound {
        project: project.to_string(),
    }
    .into()
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    match lock.read() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    match lock.write() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

pub type SharedState = Arc<AppState>;
