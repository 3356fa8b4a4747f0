//! `refinery serve`: start-up checks, the listener, and graceful shutdown.

use std::fs;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use refinery_engine::Engine;
use refinery_invocation::InvocationService;
use refinery_pool::{
    sandbox_entry, BlockTarget, InstancePool, KeepAliveMode, PoolConfig, Quota, ScaleUpLimit,
};
use refinery_sandbox::{Entry, HostConfig, SandboxHost, StandbySpec, ZygoteSpec};
use refinery_store::Store;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::disk::DiskSpace;
use crate::front_door::{self, FrontDoorConfig};
use crate::keys;
use crate::routes;
use crate::state::AppState;

/// The operator's settings for one server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Default idle time before a warm instance is reaped.
    pub keep_alive: Duration,
    /// How long running invocations may take to finish after SIGTERM before their
    /// instances are killed.
    pub shutdown_grace: Duration,
    /// The `refinery` executable, re-executed as each sandbox's init.
    pub init_exe: PathBuf,
    /// Pre-initialised runtimes: standby sandboxes, and the Python zygote (`--no-zygotes`
    /// turns both off).
    pub zygotes: bool,
    /// How many standby sandboxes to keep waiting per standby runtime (Python, Node, shell)
    /// (`--standby`; 0 = none).
    pub standby: usize,
    /// Every account's quota unless the operator set its own (`refinery accounts
    /// set-quota`).
    pub default_quota: Quota,
    /// Fixed keep-alive, or adaptive per block from its idle-time histogram.
    pub keep_alive_policy: KeepAliveMode,
    /// Cold starts per block per window (a token bucket).
    pub scale_up: ScaleUpLimit,
    /// How long an invocation may wait for a free instance (max_concurrency or scale-up
    /// limit) before it is refused with 429.
    pub queue_timeout: Duration,
    /// Distinct (account, project, block) label sets in `/metrics` before overflow.
    pub metrics_max_label_sets: usize,
    /// Bin width of the adaptive keep-alive histogram.
    pub adaptive_bin: Duration,
    /// The operator's exceptions to the egress deny list of `network = true` blocks
    /// (`--network-allow`, CIDRs).
    pub network_allow: Vec<String>,
    /// Deployments kept per project, deploy rate, deploys received at once
    /// (`--keep-deployments`, `--deploy-rate`, `--deploys-at-once[-per-account]`).
    pub deploy_limits: crate::DeployLimits,
    /// Free bytes kept on the data dir's filesystem: below this, invocations and deploys
    /// are refused with 503 (`--disk-reserve`, see `disk.rs`).
    pub disk_reserve: u64,
    /// Connection caps and timeouts (`front_door.rs`).
    pub front_door: FrontDoorConfig,
    /// The services engine's limits (`--max-fan-out`, `--max-run-steps`).
    pub engine: refinery_engine::EngineConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("starting the services engine (resuming runs): {0}")]
    Engine(String),
    #[error("creating the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading or creating the operator key {path}: {source}")]
    OperatorKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid default quota: {0}; fix the --quota-* flags")]
    Quota(String),
    #[error("invalid deploy limits: {0}")]
    DeployLimits(String),
    #[error("invalid connection settings: {0}")]
    FrontDoor(String),
    #[error("opening the store: {0}")]
    Store(#[from] refinery_store::StoreError),
    #[error("this host cannot run sandboxes: {0}")]
    Sandbox(#[from] refinery_sandbox::SandboxError),
    #[error("installing the language runtimes into {path}: {source}")]
    Runtimes {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("preparing the dependency layer and build dirs under {path}: {source}")]
    Layers {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("listening on {addr}: {source}; is another server running there? choose another with --listen")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving HTTP: {0}")]
    Http(std::io::Error),
}

/// Runs the server until `shutdown` resolves, then drains: running invocations get
/// `shutdown_grace` to finish, after which every instance is killed and its cgroups removed.
/// `on_ready` receives the bound address (useful with port 0). The listener is bound
/// before anything is created on the host, and a start that fails later releases the host
/// again.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    config.default_quota.validate().map_err(ServeError::Quota)?;
    config
        .deploy_limits
        .validate()
        .map_err(ServeError::DeployLimits)?;
    let open_files = front_door::raise_open_files();
    let front_door_limits = config
        .front_door
        .resolve(open_files)
        .map_err(ServeError::FrontDoor)?;
    create_private_dir(&config.data_dir)?;
    // Absolute from here on: sandboxes bind-mount paths under it.
    let data_dir = &fs::canonicalize(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;

    let key_path = data_dir.join("operator.key");
    let (operator_key, created) =
        keys::load_or_generate_operator_key(&key_path).map_err(|source| {
            ServeError::OperatorKey {
                path: key_path.clone(),
                source,
            }
        })?;

    // Before anything is created on the host (cgroups, standby sandboxes): a port in use
    // fails here, leaving nothing behind.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Http)?;

    let store = Store::open(data_dir).await?;

    let mut host = SandboxHost::detect(HostConfig {
        init_exe: config.init_exe.clone(),
        init_args: vec!["__sandbox-init".into()],
        state_dir: data_dir.join("sandbox"),
        cgroup_root_name: cgroup_root_name(data_dir),
    })?;
    // Without pasta or nft the server still starts (the quick start needs nothing but the
    // binary), and refuses `network = true` deployments with a message naming the packages.
    // An operator who asked for `--network-allow` wants network: then it is an error.
    match host.enable_network(&config.network_allow) {
        Err(refinery_sandbox::SandboxError::Detect { what, fix })
            if config.network_allow.is_empty() =>
        {
            tracing::warn!(%what, %fix, "outbound network for blocks is unavailable; `network = true` deployments will be refused");
        }
        Err(e) => {
            release_host(&host);
            return Err(e.into());
        }
        Ok(()) => {}
    }
    let host = Arc::new(host);
    // From here on a failed start releases what it made on the host.
    let started = ReleaseUnlessStarted(Some(host.clone()));
    let stale = host.cleanup_stale()?;
    if stale > 0 {
        tracing::warn!(count = stale, "removed instances left by a previous run");
    }
    tracing::info!(cgroups = %host.cgroup_layout(), "sandbox host ready");

    let runtime_dir = data_dir.join("runtime");
    refinery_runtimes::install(&runtime_dir).map_err(|source| ServeError::Runtimes {
        path: runtime_dir.clone(),
        source,
    })?;
    if config.zygotes {
        start_zygotes(&host, &runtime_dir);
        start_standbys(&host, &runtime_dir, config.standby);
    }
    // Dependency layers (`<data>/layers/<account>/<key>`) and the builds' scratch mounts.
    let builder = refinery_deps::Builder::new(
        host.clone(),
        runtime_dir.clone(),
        data_dir.join("layers"),
        data_dir.join("builds"),
        refinery_deps::BuildLimits::default(),
    )
    .map_err(|source| ServeError::Layers {
        path: data_dir.clone(),
        source,
    })?;

    let pool = InstancePool::new(
        host.clone(),
        PoolConfig {
            code_root: data_dir.join("code"),
            layers_root: data_dir.join("layers"),
            runtime_dir,
            default_keep_alive: config.keep_alive,
            queue_timeout: config.queue_timeout,
            reap_interval: reap_interval(config.keep_alive, config.adaptive_bin),
            default_quota: config.default_quota,
            keep_alive_mode: config.keep_alive_policy,
            scale_up: config.scale_up,
            metrics_max_label_sets: config.metrics_max_label_sets,
            adaptive_bin: config.adaptive_bin,
        },
    );
    pool.set_secret_source(Arc::new(StoreSecrets(store.clone())));
    for (account_id, overrides) in store.list_quotas().await? {
        pool.set_account_quota(
            &account_id,
            routes::pool_override(&overrides).over(&config.default_quota),
        );
    }
    pool.remove_code_except(&store.kept_deployment_ids().await?)
        .await;
    provision_live_deployments(&store, &pool).await?;
    let disk = Arc::new(DiskSpace::new(data_dir, config.disk_reserve));
    let invocations = InvocationService::new(store.clone(), pool.clone(), disk.clone());
    // Resumes every run that was running when the server last stopped.
    let engine = Engine::start(store.clone(), invocations.clone(), config.engine)
        .await
        .map_err(|e| ServeError::Engine(e.to_string()))?;
    let state = Arc::new(
        AppState::new(
            store.clone(),
            pool.clone(),
            keys::hash_key(&operator_key),
            invocations,
            engine.clone(),
        )
        .with_deploy_limits(config.deploy_limits)
        .with_disk(disk.clone())
        .with_builder(Arc::new(builder)),
    );

    tracing::info!(%addr, "listening");
    if created {
        // Saved and printed once, by the first start that comes up; afterwards only the
        // file (mode 0600) holds it. A start that failed earlier has shown no key.
        keys::save_operator_key(&key_path, &operator_key).map_err(|source| {
            ServeError::OperatorKey {
                path: key_path.clone(),
                source,
            }
        })?;
        // (Not `println!`: it panics when stdout cannot be written, e.g. a full disk.)
        let _ = writeln!(
            std::io::stdout(),
            "Operator key (shown once; also saved in {}): {operator_key}",
            key_path.display()
        );
    }
    started.disarm();
    on_ready(addr);

    // Bills: each month is closed automatically once it is over.
    let month_closer = tokio::spawn(routes::close_due_months(store.clone()));
    // Refused syscalls, read back from the kernel log (`audit.rs`).
    let audit_watcher = tokio::spawn(crate::audit::watch(pool.clone(), store.clone()));
    // Free space of the data dir, read every second for the invocations' check.
    let disk_watcher = tokio::spawn(crate::disk::watch(disk));

    let stopping = Arc::new(Notify::new());
    let signal_stopping = stopping.clone();
    tracing::info!(
        max_connections = front_door_limits.max_connections,
        max_connections_per_ip = front_door_limits.max_connections_per_ip,
        open_files,
        "connection limits"
    );
    let server = front_door::serve(
        listener,
        routes::router(state),
        front_door_limits,
        async move {
            shutdown.await;
            tracing::info!("shutting down: finishing running invocations");
            signal_stopping.notify_one();
        },
    );
    let drain = async {
        stopping.notified().await;
        // No new steps; running ones finish (or resume at the next start).
        engine.stop();
        pool.shutdown(config.shutdown_grace).await;
    };
    tokio::join!(server, drain);
    month_closer.abort();
    audit_watcher.abort();
    disk_watcher.abort();
    // Anything started by a request that raced the shutdown.
    pool.shutdown(Duration::ZERO).await;
    let release_host = host.clone();
    match tokio::task::spawn_blocking(move || release_host.release()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "removing the sandbox cgroups"),
        Err(e) => tracing::warn!(error = %e, "removing the sandbox cgroups"),
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Releases the sandbox host (its cgroups, zygotes and standby sandboxes) when dropped
/// armed: a start that fails after the host was set up leaves nothing behind.
struct ReleaseUnlessStarted(Option<Arc<SandboxHost>>);

impl ReleaseUnlessStarted {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for ReleaseUnlessStarted {
    fn drop(&mut self) {
        if let Some(host) = self.0.take() {
            release_host(&host);
        }
    }
}

fn release_host(host: &SandboxHost) {
    if let Err(e) = host.release() {
        tracing::warn!(error = %e, "removing the sandbox cgroups after a failed start");
    }
}

/// Provisioned concurrency survives restarts: every live deployment's `min_warm`
/// instances are started before the server answers. Disabled accounts stay disabled:
/// nothing of theirs is provisioned.
async fn provision_live_deployments(store: &Store, pool: &InstancePool) -> Result<(), ServeError> {
    let mut targets = Vec::new();
    for account in store.list_accounts().await? {
        if account.is_disabled() {
            pool.disable_account(&account.id).await;
            continue;
        }
        for project in store.list_projects(&account.id).await? {
            let Some(live) = store.live_deployment(&account.id, &project.name).await? else {
                continue;
            };
            targets.extend(
                live.blocks
                    .into_iter()
                    .filter(|b| b.min_warm > 0)
                    .map(|block| BlockTarget {
                        account_id: account.id.clone(),
                        account_name: account.name.clone(),
                        project: live.project.clone(),
                        deployment_id: live.id,
                        deployment_number: live.number,
                        block,
                    }),
            );
        }
    }
    if !targets.is_empty() {
        tracing::info!(
            blocks = targets.len(),
            "starting provisioned instances (min_warm)"
        );
        pool.provision(targets).await;
    }
    Ok(())
}

/// The data dir holds the database and keys: root only.
fn create_private_dir(path: &Path) -> Result<(), ServeError> {
    let err = |source| ServeError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    fs::create_dir_all(path).map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(err)
}

/// One cgroup subtree per data dir, so two servers on one host (or a test suite running
/// several) never reap each other's instances, and a restarted server finds its own.
fn cgroup_root_name(data_dir: &Path) -> String {
    let digest = Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
    format!("refinery-{}", &hex::encode(digest)[..12])
}

/// Starts the pre-initialised runtimes. One that fails to start is logged, and its language's
/// instances start by exec instead: slower, never broken.
fn start_zygotes(host: &SandboxHost, runtime_dir: &std::path::Path) {
    for zygote in refinery_runtimes::zygotes(runtime_dir) {
        let name = zygote.name.clone();
        let spec = ZygoteSpec {
            name: zygote.name,
            interpreter: zygote.interpreter,
            preload: zygote.preload,
        };
        if let Err(error) = host.add_zygote(spec) {
            tracing::warn!(zygote = %name, %error, "pre-initialised runtime unavailable; its instances start by exec");
        }
    }
}

/// Keeps standby sandboxes of the standby runtimes (Python, Node, shell) waiting, `count`
/// each, started in the background. Until they are up (or if they cannot start, which is
/// logged), those instances start from the zygote (Python) or by exec.
fn start_standbys(host: &Arc<SandboxHost>, runtime_dir: &std::path::Path, count: usize) {
    if count == 0 {
        return;
    }
    for runtime in refinery_runtimes::standby_runtimes() {
        let name = runtime.name.clone();
        let entry = sandbox_entry(runtime.entry);
        // Instances see the host's /usr: a missing interpreter is missing inside too.
        if let Entry::Exec { argv } = &entry {
            let interpreter = argv.first().map(String::as_str).unwrap_or_default();
            if !std::path::Path::new(interpreter).exists() {
                tracing::warn!(runtime = %name, %interpreter, "not installed: no standby sandboxes for it");
                continue;
            }
        }
        let spec = StandbySpec {
            name: runtime.name,
            entry,
            runtime_dir: runtime_dir.to_path_buf(),
            count,
            memory_mb: refinery_domain::limits::MIN_MEMORY_MB,
            pids_max: refinery_domain::limits::INSTANCE_PIDS_MAX,
            tmp_mb: refinery_domain::limits::MAX_TMP_MB,
        };
        if let Err(error) = host.add_standby(spec) {
            tracing::warn!(runtime = %name, %error, "standby sandboxes unavailable; its instances start by exec");
        }
    }
}

/// Often enough for the keep-alive to be honoured within 5 % of it, and the adaptive
/// policy's windows within a tenth of a histogram bin (its pre-warms have timers of their
/// own). Both policies get the same rounds when given the same `--keep-alive` and
/// `--adaptive-bin`, so that neither's figures gain from a coarser reaper.
fn reap_interval(keep_alive: Duration, adaptive_bin: Duration) -> Duration {
    (keep_alive / 20)
        .min(adaptive_bin / 10)
        .clamp(Duration::from_millis(50), Duration::from_secs(5))
}

/// The pool reads secret values from the store (sealed at rest) when it starts an instance.
struct StoreSecrets(Store);

impl refinery_pool::SecretSource for StoreSecrets {
    fn values<'a>(
        &'a self,
        account_id: &'a str,
        project: &'a str,
        names: &'a [String],
    ) -> refinery_pool::SecretValues<'a> {
        Box::pin(async move {
            self.0
                .secret_values(account_id, project, names)
                .await
                .map_err(|e| e.to_string())
        })
    }
}
