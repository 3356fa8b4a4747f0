//! The instances of one block of one deployment: a concurrency gate, a scale-up token
//! bucket, the block's keep-alive history, and a stack of warm, frozen instances (most
//! recently used on top, so the hottest one is reused first and the coldest ones age out).
//! The `min_warm` most recent idle instances are the block's provisioned floor: never
//! reaped, never evicted.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};

use crate::instance::Instance;
use crate::keep_alive::{BlockHistory, KeepAlivePolicy, Prewarm, Prewarms, Window};
use crate::metrics::BlockLabels;
use crate::pool::{lock, BlockTarget};
use crate::scale_up::{ScaleUpBucket, ScaleUpLimit};

pub struct BlockPool {
    pub target: BlockTarget,
    pub code_dir: PathBuf,
    /// The view of the project shared directories the block lists (bound read-only at
    /// `/shared`), if it lists any.
    pub shared_dir: Option<PathBuf>,
    /// One permit per instance the block may run at once (`max_concurrency`).
    pub permits: Semaphore,
    pub policy: KeepAlivePolicy,
    /// The block's series in the metrics.
    pub labels: BlockLabels,
    /// Signalled whenever an instance goes idle: invocations held back by the scale-up
    /// limit wait for it.
    pub idle_ready: Notify,
    /// Live instances of the block (held by each instance until it is dropped).
    live: Arc<AtomicU32>,
    /// Instances being started ahead of traffic (provisioned or pre-warmed).
    starting_ahead: AtomicU32,
    scale_up: Mutex<ScaleUpBucket>,
    history: Mutex<BlockHistory>,
    /// Where the adaptive policy let an instance go: the pre-warms pending, per level.
    prewarms: Mutex<Prewarms<Instant>>,
    /// After a failed start ahead of traffic: no provisioning until `.0`; the next failure
    /// waits `.1` (doubling, up to [`MAX_PROVISION_BACKOFF`]), so a block whose code does
    /// not load, or an account at its quota, is not retried on every reaper round.
    provision_backoff: Mutex<(Option<Instant>, Duration)>,
    /// The pool's time origin (the keep-alive policy works on durations since it).
    origin: Instant,
    idle: Mutex<Vec<IdleInstance>>,
    /// Set when the deployment stops being live: instances are discarded, not kept warm.
    retired: AtomicBool,
}

struct IdleInstance {
    instance: Instance,
    since: Instant,
    expires: Instant,
}

const MIN_PROVISION_BACKOFF: Duration = Duration::from_secs(5);
const MAX_PROVISION_BACKOFF: Duration = Duration::from_secs(300);

/// Counts one live instance of a block until dropped.
pub struct LiveGuard(Arc<AtomicU32>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One invocation in flight, for the keep-alive history; its end is recorded when it is
/// finished or dropped (whatever path the invocation took).
pub struct InFlight<'a> {
    pool: &'a BlockPool,
    done: bool,
}

impl InFlight<'_> {
    /// Records the end now and returns the concurrency level of the instance that just
    /// went idle and its window.
    pub fn finish(mut self) -> (u32, Window) {
        self.done = true;
        let mut history = lock(&self.pool.history);
        let level = history.end(self.pool.origin.elapsed());
        (level, history.window(&self.pool.policy, level))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            lock(&self.pool.history).end(self.pool.origin.elapsed());
        }
    }
}

/// What the reaper should do for a block now.
pub struct Upkeep {
    pub expired: Vec<Instance>,
    /// Start one instance now for each (adaptive pre-warms).
    pub prewarms: Vec<Prewarm<Instant>>,
    /// Start this many instances to get back to `min_warm`.
    pub provision: u32,
}

impl BlockPool {
    /// The pool with `dir` as its shared-directory view ([`BlockPool::shared_dir`]).
    pub fn with_shared_dir(mut self, dir: Option<PathBuf>) -> BlockPool {
        self.shared_dir = dir;
        self
    }

    pub fn new(
        target: BlockTarget,
        code_dir: PathBuf,
        policy: KeepAlivePolicy,
        scale_up: ScaleUpLimit,
        labels: BlockLabels,
        origin: Instant,
    ) -> BlockPool {
        let permits = usize::try_from(target.block.max_concurrency).unwrap_or(1);
        BlockPool {
            target,
            code_dir,
            shared_dir: None,
            permits: Semaphore::new(permits),
            history: Mutex::new(BlockHistory::new(&policy)),
            policy,
            labels,
            idle_ready: Notify::new(),
            live: Arc::new(AtomicU32::new(0)),
            starting_ahead: AtomicU32::new(0),
            scale_up: Mutex::new(ScaleUpBucket::new(scale_up, Instant::now())),
            prewarms: Mutex::new(Prewarms::default()),
            provision_backoff: Mutex::new((None, MIN_PROVISION_BACKOFF)),
            origin,
            idle: Mutex::new(Vec::new()),
            retired: AtomicBool::new(false),
        }
    }

    pub fn min_warm(&self) -> u32 {
        self.target.block.min_warm
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// An invocation arrived: recorded in the history; pending pre-warms of the level it
    /// reaches and below are moot (their instances' next releases plan again).
    pub fn arrive(&self) -> InFlight<'_> {
        let level = lock(&self.history).arrival(self.origin.elapsed());
        lock(&self.prewarms).arrival(level);
        InFlight {
            pool: self,
            done: false,
        }
    }

    /// The keep-alive window the block's history gives now for its first instance.
    pub fn history_window(&self) -> Window {
        lock(&self.history).window(&self.policy, 1)
    }

    /// One cold start's token, or how long until there is one.
    pub fn take_scale_up_token(&self) -> Result<(), (ScaleUpLimit, Duration)> {
        let mut bucket = lock(&self.scale_up);
        bucket
            .take(Instant::now())
            .map_err(|wait| (bucket.limit(), wait))
    }

    /// Counts a new live instance of this block until the guard is dropped.
    pub fn live_guard(&self) -> LiveGuard {
        self.live.fetch_add(1, Ordering::AcqRel);
        LiveGuard(self.live.clone())
    }

    /// Marks one start ahead of traffic as begun; [`BlockPool::started_ahead`] ends it.
    pub fn starting_ahead(&self) {
        self.starting_ahead.fetch_add(1, Ordering::AcqRel);
    }

    pub fn started_ahead(&self) {
        self.starting_ahead.fetch_sub(1, Ordering::AcqRel);
    }

    /// Instances needed to reach `min_warm`, counting those already being started.
    pub fn provision_deficit(&self) -> u32 {
        let have = self.live.load(Ordering::Acquire) + self.starting_ahead.load(Ordering::Acquire);
        self.min_warm().saturating_sub(have)
    }

    /// A start ahead of traffic failed: hold provisioning back for a while.
    pub fn provision_failed(&self, now: Instant) {
        let mut backoff = lock(&self.provision_backoff);
        let delay = backoff.1;
        *backoff = (Some(now + delay), (delay * 2).min(MAX_PROVISION_BACKOFF));
    }

    /// A start ahead of traffic succeeded: the next failure starts the backoff afresh.
    pub fn provision_succeeded(&self) {
        *lock(&self.provision_backoff) = (None, MIN_PROVISION_BACKOFF);
    }

    fn provision_held_back(&self, now: Instant) -> bool {
        lock(&self.provision_backoff)
            .0
            .is_some_and(|until| now < until)
    }

    /// The adaptive policy let an instance go: pre-warm one as `prewarm` says.
    pub fn schedule_prewarm(&self, prewarm: Prewarm<Instant>) {
        lock(&self.prewarms).schedule(prewarm);
    }

    /// Whether the instance that just went idle may be let go for a pre-warm: only when
    /// it is the block's last idle one (an idle instance under it would serve its level
    /// first; see [`Prewarms`]) and the block keeps its `min_warm` floor without it.
    pub fn may_let_go(&self) -> bool {
        let live = self.live.load(Ordering::Acquire);
        self.lock_idle().is_empty() && live.saturating_sub(1) >= self.min_warm()
    }

    /// Marks the pool retired and hands back its idle instances for destruction.
    pub fn retire(&self) -> Vec<Instance> {
        // Under the idle lock, so no `push_idle` can slip an instance in after the drain.
        let mut idle = self.lock_idle();
        self.retired.store(true, Ordering::Release);
        idle.drain(..).map(|i| i.instance).collect()
    }

    /// The most recently frozen idle instance, if any.
    pub fn pop_idle(&self) -> Option<Instance> {
        self.lock_idle().pop().map(|i| i.instance)
    }

    /// Keeps an instance warm until `expires`, idle since `since` (for least-recently-used
    /// eviction); hands it back (to be destroyed) if the pool was retired meanwhile.
    #[must_use]
    pub fn push_idle(
        &self,
        instance: Instance,
        since: Instant,
        expires: Instant,
    ) -> Option<Instance> {
        {
            let mut idle = self.lock_idle();
            if self.is_retired() {
                return Some(instance);
            }
            idle.push(IdleInstance {
                instance,
                since,
                expires,
            });
        }
        self.idle_ready.notify_one();
        None
    }

    /// The idle instances' ids and when each went idle (eviction candidates): all but the
    /// `min_warm` most recent, which are the provisioned floor.
    pub fn idle_snapshot(&self) -> Vec<(String, Instant)> {
        let idle = self.lock_idle();
        let floor = usize::try_from(self.min_warm()).unwrap_or(usize::MAX);
        let evictable = idle.len().saturating_sub(floor);
        idle.iter()
            .take(evictable)
            .map(|i| (i.instance.id().to_string(), i.since))
            .collect()
    }

    /// Removes one idle instance by id, if it is still idle.
    pub fn take_idle(&self, id: &str) -> Option<Instance> {
        let mut idle = self.lock_idle();
        let position = idle.iter().position(|i| i.instance.id() == id)?;
        Some(idle.remove(position).instance)
    }

    /// The reaper's work for this block at `now`: idle instances past their keep-alive
    /// (never the `min_warm` floor), the due pre-warms of levels the block does not cover
    /// (in flight, idle or being started), and the provisioning deficit.
    pub fn upkeep(&self, now: Instant) -> Upkeep {
        let expired = {
            let mut idle = self.lock_idle();
            let floor = usize::try_from(self.min_warm()).unwrap_or(usize::MAX);
            let evictable = idle.len().saturating_sub(floor);
            let protected = idle.split_off(evictable);
            let (expired, kept): (Vec<_>, Vec<_>) = idle.drain(..).partition(|i| now >= i.expires);
            *idle = kept;
            idle.extend(protected);
            expired.into_iter().map(|i| i.instance).collect()
        };
        let prewarms = self.due_prewarms(now);
        let provision = if self.is_retired() || self.provision_held_back(now) {
            0
        } else {
            self.provision_deficit()
        };
        Upkeep {
            expired,
            prewarms,
            provision,
        }
    }

    /// The pre-warms due at `now` for levels the block does not cover (in flight, idle or
    /// being started); taken off the pending list. The pool starts them at their time
    /// (a timer per pre-warm), the reaper's round catching any it missed.
    pub fn due_prewarms(&self, now: Instant) -> Vec<Prewarm<Instant>> {
        let in_flight = lock(&self.history).in_flight();
        let mut prewarms = lock(&self.prewarms);
        if prewarms.is_empty() {
            return Vec::new();
        }
        let idle = u32::try_from(self.lock_idle().len()).unwrap_or(u32::MAX);
        let covered = in_flight
            .saturating_add(idle)
            .saturating_add(self.starting_ahead.load(Ordering::Acquire));
        let due = prewarms.due(now, covered);
        if self.is_retired() {
            Vec::new()
        } else {
            due
        }
    }

    fn lock_idle(&self) -> MutexGuard<'_, Vec<IdleInstance>> {
        lock(&self.idle)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use refinery_domain::{BlockSpec, Language};

    use super::*;

    fn block_pool(min_warm: u32, scale_up: &str) -> BlockPool {
        let target = BlockTarget {
            account_id: "acct".into(),
            account_name: "acct".into(),
            project: "p".into(),
            deployment_id: 1,
            deployment_number: 1,
            block: BlockSpec {
                files: Default::default(),
                binary_files: Default::default(),
                shared: Vec::new(),
                function: "main".into(),
                secret_env: Default::default(),
                name: "b".into(),
                language: Language::Python,
                source_name: "b.py".into(),
                code: String::new(),
                memory_mb: 128,
                timeout_s: 10,
                max_concurrency: 4,
                keep_alive_s: None,
                min_warm,
                tmp_mb: 16,
                env: BTreeMap::new(),
                network: false,
                deps_layer: None,
            },
        };
        let labels = BlockLabels {
            account: "acct".into(),
            project: "p".into(),
            block: "b".into(),
        };
        BlockPool::new(
            target,
            PathBuf::from("/nonexistent"),
            KeepAlivePolicy::Fixed(Duration::from_secs(300)),
            scale_up.parse().expect("limit"),
            labels,
            Instant::now(),
        )
    }

    #[test]
    fn the_provisioning_deficit_counts_live_instances_and_starts_under_way() {
        let pool = block_pool(3, "10/1s");
        assert_eq!(pool.provision_deficit(), 3);
        let first = pool.live_guard();
        pool.starting_ahead();
        assert_eq!(pool.provision_deficit(), 1);
        pool.started_ahead();
        assert_eq!(pool.provision_deficit(), 2);
        drop(first);
        assert_eq!(pool.provision_deficit(), 3);
        assert_eq!(pool.upkeep(Instant::now()).provision, 3);
        // A retired pool provisions nothing.
        // A failure holds provisioning back, a success lifts that.
        pool.provision_failed(Instant::now());
        assert_eq!(pool.upkeep(Instant::now()).provision, 0);
        assert_eq!(
            pool.upkeep(Instant::now() + Duration::from_secs(6))
                .provision,
            3
        );
        pool.provision_succeeded();
        assert_eq!(pool.upkeep(Instant::now()).provision, 3);
        assert!(pool.retire().is_empty());
        assert_eq!(pool.upkeep(Instant::now()).provision, 0);
    }

    #[test]
    fn each_block_has_its_own_scale_up_bucket() {
        let a = block_pool(0, "2/1h");
        let b = block_pool(0, "2/1h");
        assert!(a.take_scale_up_token().is_ok());
        assert!(a.take_scale_up_token().is_ok());
        let (limit, wait) = a.take_scale_up_token().expect_err("empty");
        assert_eq!(limit.burst, 2);
        assert!(wait > Duration::from_secs(60), "{wait:?}");
        assert!(b.take_scale_up_token().is_ok());
    }

    fn prewarm(level: u32, at: Instant, until: Instant) -> Prewarm<Instant> {
        Prewarm {
            level,
            let_go: at,
            at,
            until,
        }
    }

    #[test]
    fn a_prewarm_is_started_when_due_and_cancelled_by_an_arrival() {
        let pool = block_pool(0, "10/1s");
        let now = Instant::now();
        let (at, until) = (now + Duration::from_secs(60), now + Duration::from_secs(90));
        let due = |pool: &BlockPool, t: Instant| -> Vec<Instant> {
            pool.upkeep(t).prewarms.iter().map(|p| p.until).collect()
        };
        pool.schedule_prewarm(prewarm(1, at, until));
        assert!(due(&pool, now).is_empty(), "not due yet");
        assert_eq!(due(&pool, at), vec![until]);
        assert!(due(&pool, at).is_empty(), "started once");

        pool.schedule_prewarm(prewarm(1, at, until));
        drop(pool.arrive());
        assert!(due(&pool, at).is_empty(), "the arrival cancelled it");

        // Past its window it is pointless.
        pool.schedule_prewarm(prewarm(1, at, until));
        assert!(due(&pool, until).is_empty());

        // A level-2 pre-warm while one invocation is in flight: the block has one instance,
        // level 2 has none, so it is started; with two in flight it is not needed.
        let first = pool.arrive();
        pool.schedule_prewarm(prewarm(2, at, until));
        assert_eq!(due(&pool, at), vec![until]);
        let second = pool.arrive();
        pool.schedule_prewarm(prewarm(3, at, until));
        let third = pool.arrive();
        assert!(due(&pool, at).is_empty(), "level 3 reached");
        drop((first, second, third));
    }

    #[test]
    fn an_instance_is_let_go_only_when_it_is_the_last_idle_one_above_the_floor() {
        let pool = block_pool(0, "10/1s");
        let guard = pool.live_guard();
        assert!(pool.may_let_go());
        let floor = block_pool(1, "10/1s");
        let floor_guard = floor.live_guard();
        assert!(!floor.may_let_go(), "it is the min_warm floor");
        drop((guard, floor_guard));
    }
}
