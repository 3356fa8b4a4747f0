//! What every request handler shares: the store, the pool, and small caches that keep
//! the store off the invocation hot path.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use refinery_domain::BlockSpec;
use refinery_pool::InstancePool;
use refinery_store::{Account, Deployment, Store};

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
    /// The live deployment of each (account id, project), invalidated on deploy/rollback.
    live: RwLock<HashMap<(String, String), Arc<LiveDeployment>>>,
    /// Bumped by every invalidation: a lookup that raced a deploy must not put the
    /// deployment it read (now replaced) back into the cache.
    live_generation: AtomicU64,
    /// Serialises quota changes (store, then pool) so the two never disagree.
    pub quota_updates: tokio::sync::Mutex<()>,
    /// Accounts known to have no spending cap: their invocations need no billing query.
    uncapped: RwLock<HashSet<String>>,
    /// Bumped by every change of billing terms, like `live_generation`.
    billing_generation: AtomicU64,
    /// Deploy rate, deploys received at once, deployments kept (`deploy_gate.rs`).
    pub deploy_gate: DeployGate,
    /// Free space of the data dir's filesystem and the reserve below which new work is
    /// refused (`disk.rs`; set by [`AppState::with_disk`], no reserve otherwise).
    pub disk: Arc<DiskSpace>,
}

/// The live deployment of a project, indexed for invocation.
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

impl AppState {
    pub fn new(store: Store, pool: InstancePool, operator_key_hash: String) -> AppState {
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
            live: RwLock::new(HashMap::new()),
            live_generation: AtomicU64::new(0),
            quota_updates: tokio::sync::Mutex::new(()),
            uncapped: RwLock::new(HashSet::new()),
            billing_generation: AtomicU64::new(0),
            deploy_gate: DeployGate::new(DeployLimits::DEFAULT),
        }
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

    /// Forgets every cached key of the account, after its keys or its state changed in
    /// the store: the next request with any of them reads the store again.
    pub fn forget_account_keys(&self, account_id: &str) {
        let mut cache = write(&self.accounts_by_key);
        self.keys_generation.fetch_add(1, Ordering::AcqRel);
        cache.retain(|_, account| account.id != account_id);
    }

    /// The live deployment of `project` owned by `account_id`, or 404.
    pub async fn live_deployment(
        &self,
        account_id: &str,
        project: &str,
    ) -> Result<Arc<LiveDeployment>, ApiError> {
        let key = (account_id.to_string(), project.to_string());
        if let Some(live) = read(&self.live).get(&key) {
            return Ok(live.clone());
        }
        let generation = self.live_generation.load(Ordering::Acquire);
        let deployment = self
            .store
            .live_deployment(account_id, project)
            .await?
            .ok_or_else(|| project_not_found(project))?;
        let live = Arc::new(LiveDeployment::from_deployment(deployment));
        let mut cache = write(&self.live);
        if self.live_generation.load(Ordering::Acquire) == generation {
            cache.insert(key, live.clone());
        }
        Ok(live)
    }

    /// Forgets the cached live deployment after it changed.
    pub fn invalidate_live(&self, account_id: &str, project: &str) {
        let mut cache = write(&self.live);
        self.live_generation.fetch_add(1, Ordering::AcqRel);
        cache.remove(&(account_id.to_string(), project.to_string()));
    }
}

pub fn project_not_found(project: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no project `{project}` in this account: deploy it first with `refinery deploy`"
    ))
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

/// The spending-cap cache (see `routes::billing::admit`).
impl AppState {
    pub fn known_uncapped(&self, account_id: &str) -> bool {
        self.uncapped
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(account_id)
    }

    /// The generation to pass to [`AppState::note_uncapped`] after reading the terms.
    pub fn billing_generation(&self) -> u64 {
        self.billing_generation.load(Ordering::Acquire)
    }

    /// Remembers that the account had no cap when read at `generation`, unless terms changed
    /// since (a concurrent `set-billing` must not be undone by a stale read).
    pub fn note_uncapped(&self, account_id: &str, generation: u64) {
        let mut set = self
            .uncapped
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if self.billing_generation.load(Ordering::Acquire) == generation {
            set.insert(account_id.to_string());
        }
    }

    /// Call after any account's billing terms changed.
    pub fn billing_changed(&self) {
        let mut set = self
            .uncapped
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.billing_generation.fetch_add(1, Ordering::AcqRel);
        set.clear();
    }
}
