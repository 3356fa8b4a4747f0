//! The instances of one block of one deployment: a concurrency gate and a stack of warm,
//! frozen instances (most recently used on top, so the hottest one is reused first and
//! the coldest ones age out).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::instance::Instance;
use crate::pool::BlockTarget;

pub struct BlockPool {
    pub target: BlockTarget,
    pub code_dir: PathBuf,
    /// One permit per instance the block may run at once (`max_concurrency`).
    pub permits: Semaphore,
    pub keep_alive: Duration,
    idle: Mutex<Vec<IdleInstance>>,
    /// Set when the deployment stops being live: instances are discarded, not kept warm.
    retired: AtomicBool,
}

struct IdleInstance {
    instance: Instance,
    since: Instant,
}

impl BlockPool {
    pub fn new(target: BlockTarget, code_dir: PathBuf, keep_alive: Duration) -> BlockPool {
        let permits = usize::try_from(target.block.max_concurrency).unwrap_or(1);
        BlockPool {
            target,
            code_dir,
            permits: Semaphore::new(permits),
            keep_alive,
            idle: Mutex::new(Vec::new()),
            retired: AtomicBool::new(false),
        }
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
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

    /// Keeps an instance warm; hands it back (to be destroyed) if the pool was retired
    /// meanwhile.
    #[must_use]
    pub fn push_idle(&self, instance: Instance) -> Option<Instance> {
        let mut idle = self.lock_idle();
        if self.is_retired() {
            return Some(instance);
        }
        idle.push(IdleInstance {
            instance,
            since: Instant::now(),
        });
        None
    }

    /// The idle instances' ids and when each went idle (eviction candidates).
    pub fn idle_snapshot(&self) -> Vec<(String, Instant)> {
        self.lock_idle()
            .iter()
            .map(|i| (i.instance.id().to_string(), i.since))
            .collect()
    }

    /// Removes one idle instance by id, if it is still idle.
    pub fn take_idle(&self, id: &str) -> Option<Instance> {
        let mut idle = self.lock_idle();
        let position = idle.iter().position(|i| i.instance.id() == id)?;
        Some(idle.remove(position).instance)
    }

    /// Removes and returns the instances idle for longer than the keep-alive.
    pub fn take_expired(&self, now: Instant) -> Vec<Instance> {
        let mut idle = self.lock_idle();
        let (expired, kept): (Vec<_>, Vec<_>) = idle
            .drain(..)
            .partition(|i| now.duration_since(i.since) >= self.keep_alive);
        *idle = kept;
        expired.into_iter().map(|i| i.instance).collect()
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<IdleInstance>> {
        // A panic elsewhere while holding the lock leaves a valid Vec; keep serving.
        match self.idle.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}
