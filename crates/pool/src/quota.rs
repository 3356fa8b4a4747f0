//! Per-account quotas: how much of the host one account may hold at once, so one noisy
//! account cannot starve the others.
//!
//! # Policy (data, defaults in one place: [`Quota::DEFAULT`])
//!
//! - **Concurrent instances** (`instances`): an account's live instances — starting,
//!   busy, and frozen warm ones — across all its projects and blocks.
//! - **Total instance memory** (`memory_mb`): the sum of the `memory_mb` of the blocks of
//!   those same live instances.
//! - **Invocation rate** (`rate` per second, `burst`): a token bucket per account, one
//!   token per invocation, warm or cold, taken before anything else happens.
//! - **Storage** (`storage_mb`, MiB): what the account's kept deployments hold (manifests
//!   and code, see `refinery_store::storage`). Not the pool's to enforce: the server refuses
//!   a deploy over it. It is here so that every per-account limit has one policy type,
//!   one set of defaults and one override mechanism.
//!
//! A cold start that would exceed the instance or memory quota first evicts the
//! account's least-recently-used idle (frozen) instances, of any of its blocks, until it
//! fits; only if evicting every idle one would not be enough is it refused. Refusals are
//! decided before an instance is started or any user code runs.
//!
//! # Accounting
//!
//! Every instance holds a [`Reservation`] taken (under the account's lock, after the
//! admission check) before its sandbox is spawned. The reservation is released when the
//! instance is dropped, which happens after it is destroyed — whatever destroyed it: a
//! failed start, a timeout, a crash, retirement, reaping, eviction or shutdown. So the
//! usage figures are exact under any concurrency: they count reservations, not guesses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

/// An account's effective limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Quota {
    /// Live instances (starting + busy + frozen) at once.
    pub instances: u32,
    /// Sum of the `memory_mb` of the blocks of those instances.
    pub memory_mb: u64,
    /// Invocations per second, sustained (token bucket refill rate).
    pub rate: f64,
    /// Invocations allowed in a burst (token bucket size).
    pub burst: u32,
    /// Bytes of deployments kept, in MiB (enforced at deploy by the server).
    pub storage_mb: u64,
}

impl Quota {
    /// The operator's defaults unless `refinery serve --quota-*` says otherwise. Generous
    /// enough never to bother a single user on a development machine (a hundred 128 MB
    /// blocks at once, a thousand invocations a second), tight enough that one account
    /// cannot take a shared host whole.
    pub const DEFAULT: Quota = Quota {
        instances: 100,
        memory_mb: 16 * 1024,
        rate: 1000.0,
        burst: 2000,
        storage_mb: 1024,
    };

    /// Bounds an operator's settings must stay within (checked by the API and `serve`).
    pub const MAX_INSTANCES: u32 = 100_000;
    pub const MIN_MEMORY_MB: u64 = refinery_domain::limits::MIN_MEMORY_MB as u64;
    pub const MAX_MEMORY_MB: u64 = 64 * 1024 * 1024;
    pub const MAX_RATE: f64 = 1_000_000.0;
    pub const MAX_BURST: u32 = 1_000_000;
    pub const MAX_STORAGE_MB: u64 = 1024 * 1024 * 1024;

    /// Why this quota is not acceptable, if it is not.
    pub fn validate(&self) -> Result<(), String> {
        QuotaOverride {
            instances: Some(self.instances),
            memory_mb: Some(self.memory_mb),
            rate: Some(self.rate),
            burst: Some(self.burst),
            storage_mb: Some(self.storage_mb),
        }
        .validate()
    }
}

impl Default for Quota {
    fn default() -> Quota {
        Quota::DEFAULT
    }
}

/// An account's own settings; `None` means "the operator's default".
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct QuotaOverride {
    pub instances: Option<u32>,
    pub memory_mb: Option<u64>,
    pub rate: Option<f64>,
    pub burst: Option<u32>,
    pub storage_mb: Option<u64>,
}

impl QuotaOverride {
    /// The effective quota: these settings over `defaults`.
    pub fn over(&self, defaults: &Quota) -> Quota {
        Quota {
            instances: self.instances.unwrap_or(defaults.instances),
            memory_mb: self.memory_mb.unwrap_or(defaults.memory_mb),
            rate: self.rate.unwrap_or(defaults.rate),
            burst: self.burst.unwrap_or(defaults.burst),
            storage_mb: self.storage_mb.unwrap_or(defaults.storage_mb),
        }
    }

    /// Why these settings are not acceptable, naming the field and its bounds.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(n) = self.instances {
            if n == 0 || n > Quota::MAX_INSTANCES {
                return Err(format!(
                    "instances = {n}: expected 1 to {}",
                    Quota::MAX_INSTANCES
                ));
            }
        }
        if let Some(mb) = self.memory_mb {
            if !(Quota::MIN_MEMORY_MB..=Quota::MAX_MEMORY_MB).contains(&mb) {
                return Err(format!(
                    "memory_mb = {mb}: expected {} to {} (one block needs at least {} MB)",
                    Quota::MIN_MEMORY_MB,
                    Quota::MAX_MEMORY_MB,
                    Quota::MIN_MEMORY_MB
                ));
            }
        }
        if let Some(rate) = self.rate {
            if !rate.is_finite() || rate <= 0.0 || rate > Quota::MAX_RATE {
                return Err(format!(
                    "rate = {rate}: expected more than 0 and at most {} invocations per second",
                    Quota::MAX_RATE
                ));
            }
        }
        if let Some(burst) = self.burst {
            if burst == 0 || burst > Quota::MAX_BURST {
                return Err(format!(
                    "burst = {burst}: expected 1 to {}",
                    Quota::MAX_BURST
                ));
            }
        }
        if let Some(mb) = self.storage_mb {
            if mb == 0 || mb > Quota::MAX_STORAGE_MB {
                return Err(format!(
                    "storage_mb = {mb}: expected 1 to {}",
                    Quota::MAX_STORAGE_MB
                ));
            }
        }
        Ok(())
    }
}

/// An account's effective quota and what it holds now.
#[derive(Debug, Clone, Serialize)]
pub struct AccountUsage {
    pub quota: Quota,
    /// Live instances (starting + busy + frozen).
    pub instances: u32,
    /// The sum of those instances' blocks' `memory_mb`.
    pub memory_mb: u64,
    /// Invocations the account could make right now without waiting (whole tokens).
    pub tokens: u32,
}

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    fn full(quota: &Quota) -> TokenBucket {
        TokenBucket {
            tokens: f64::from(quota.burst),
            refilled_at: Instant::now(),
        }
    }

    fn refill(&mut self, quota: &Quota, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * quota.rate).min(f64::from(quota.burst));
        self.refilled_at = now;
    }

    /// Takes one token, or says how long until one is available.
    fn take(&mut self, quota: &Quota, now: Instant) -> Result<(), Duration> {
        self.refill(quota, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / quota.rate))
        }
    }
}

/// One account's ledger. Lock order: an account's lock is taken before the pool's block
/// map and before any block's idle list; nothing takes it while holding those.
pub(crate) struct AccountState {
    pub(crate) id: String,
    state: Mutex<Ledger>,
}

pub(crate) struct Ledger {
    pub(crate) quota: Quota,
    /// Reserved instances (= live instances, see the module docs).
    pub(crate) instances: u32,
    /// Reserved memory, MB.
    pub(crate) memory_mb: u64,
    bucket: TokenBucket,
    /// The kernel's account-wide memory limit as last set, MB (`None`: not set yet in
    /// this run).
    pub(crate) group_limit_mb: Option<u64>,
}

impl Ledger {
    /// What the kernel's account-wide memory limit should be: the quota, or what the
    /// account already holds if more (a lowered quota must not get running instances
    /// killed; it takes hold as they go).
    pub(crate) fn wanted_group_limit_mb(&self) -> u64 {
        self.quota.memory_mb.max(self.memory_mb)
    }

    /// Whether one more instance of `memory_mb` fits.
    pub(crate) fn fits(&self, memory_mb: u64) -> bool {
        self.instances < self.quota.instances && self.memory_mb + memory_mb <= self.quota.memory_mb
    }

    /// Whether a start ahead of traffic (an adaptive pre-warm) of `memory_mb` may go
    /// ahead: it takes at most half of what the account has free, in instances and in
    /// memory, so that speculation never fills an account and what it takes is idle (and
    /// so evictable) before a cold start could need the room.
    pub(crate) fn fits_speculative(&self, memory_mb: u64) -> bool {
        let free_instances = self.quota.instances.saturating_sub(self.instances);
        let free_mb = self.quota.memory_mb.saturating_sub(self.memory_mb);
        free_instances >= 2 && memory_mb.saturating_mul(2) <= free_mb
    }

    /// Whether one more instance of `memory_mb` would fit once `instances` instances
    /// holding `freed_mb` are gone.
    pub(crate) fn fits_after(&self, memory_mb: u64, instances: u32, freed_mb: u64) -> bool {
        self.instances.saturating_sub(instances) < self.quota.instances
            && self.memory_mb.saturating_sub(freed_mb) + memory_mb <= self.quota.memory_mb
    }
}

impl AccountState {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Ledger> {
        match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Takes one invocation token, or says how long until one is available.
    pub(crate) fn take_token(&self) -> Result<(), (Quota, Duration)> {
        let mut ledger = self.lock();
        let quota = ledger.quota;
        ledger
            .bucket
            .take(&quota, Instant::now())
            .map_err(|wait| (quota, wait))
    }

    pub(crate) fn usage(&self) -> AccountUsage {
        let mut ledger = self.lock();
        let quota = ledger.quota;
        ledger.bucket.refill(&quota, Instant::now());
        AccountUsage {
            quota,
            instances: ledger.instances,
            memory_mb: ledger.memory_mb,
            // Truncation intended: whole tokens; the bucket never exceeds `burst` (u32).
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            tokens: ledger.bucket.tokens.floor().max(0.0) as u32,
        }
    }
}

/// Every account the pool has seen, with its ledger.
pub(crate) struct Accounts {
    defaults: Quota,
    map: Mutex<HashMap<String, Arc<AccountState>>>,
}

impl Accounts {
    pub(crate) fn new(defaults: Quota) -> Accounts {
        Accounts {
            defaults,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn defaults(&self) -> Quota {
        self.defaults
    }

    /// The account's ledger, created (with the default quota and a full bucket) on first use.
    pub(crate) fn get(&self, account_id: &str) -> Arc<AccountState> {
        let mut map = match self.map.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(account_id.to_string())
            .or_insert_with(|| {
                Arc::new(AccountState {
                    id: account_id.to_string(),
                    state: Mutex::new(Ledger {
                        quota: self.defaults,
                        instances: 0,
                        memory_mb: 0,
                        bucket: TokenBucket::full(&self.defaults),
                        group_limit_mb: None,
                    }),
                })
            })
            .clone()
    }

    /// Changes an account's effective quota. Instances already running stay (a lowered
    /// quota only refuses new cold starts); the token bucket keeps its level, capped at
    /// the new burst (or raised by as much as the burst was).
    pub(crate) fn set_quota(&self, account_id: &str, quota: Quota) -> Arc<AccountState> {
        let account = self.get(account_id);
        {
            let mut ledger = account.lock();
            let old = ledger.quota;
            ledger.bucket.refill(&old, Instant::now());
            ledger.bucket.tokens = ledger.bucket.tokens.min(f64::from(quota.burst));
            if quota.burst > old.burst {
                // A raised burst is available at once (the operator just granted it).
                ledger.bucket.tokens += f64::from(quota.burst - old.burst);
            }
            ledger.quota = quota;
        }
        account
    }
}

/// One live instance's share of its account's quota; released when dropped.
pub(crate) struct Reservation {
    account: Arc<AccountState>,
    memory_mb: u64,
    held: bool,
}

impl Reservation {
    /// Reserves one instance of `memory_mb` in a ledger the caller holds locked (after
    /// checking [`Ledger::fits`]).
    pub(crate) fn take(account: &Arc<AccountState>, ledger: &mut Ledger, memory_mb: u64) -> Self {
        ledger.instances += 1;
        ledger.memory_mb += memory_mb;
        Reservation {
            account: account.clone(),
            memory_mb,
            held: true,
        }
    }

    /// Releases now, in a ledger the caller holds locked (an evicted instance hands its
    /// share to the cold start that evicted it; it is destroyed before that one spawns).
    pub(crate) fn release_locked(&mut self, ledger: &mut Ledger) {
        if std::mem::take(&mut self.held) {
            ledger.instances = ledger.instances.saturating_sub(1);
            ledger.memory_mb = ledger.memory_mb.saturating_sub(self.memory_mb);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.held {
            let account = self.account.clone();
            let mut ledger = account.lock();
            self.release_locked(&mut ledger);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(rate: f64, burst: u32) -> Quota {
        Quota {
            rate,
            burst,
            ..Quota::DEFAULT
        }
    }

    #[test]
    fn bucket_allows_a_burst_then_refills_at_the_rate() {
        let q = quota(2.0, 2);
        let mut bucket = TokenBucket::full(&q);
        let t0 = bucket.refilled_at;
        assert!(bucket.take(&q, t0).is_ok());
        assert!(bucket.take(&q, t0).is_ok());
        let wait = bucket.take(&q, t0).expect_err("empty");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        assert!(bucket.take(&q, t0 + Duration::from_millis(500)).is_ok());
        // Never more than the burst, however long it waited.
        bucket.refill(&q, t0 + Duration::from_secs(3600));
        assert!((bucket.tokens - 2.0).abs() < 1e-9);
    }

    #[test]
    fn a_speculative_start_takes_at_most_half_of_what_is_free() {
        let accounts = Accounts::new(Quota {
            instances: 4,
            memory_mb: 1024,
            ..Quota::DEFAULT
        });
        let account = accounts.get("a");
        let mut ledger = account.lock();
        assert!(ledger.fits_speculative(512));
        assert!(
            !ledger.fits_speculative(513),
            "more than half the free memory"
        );
        let _held = Reservation::take(&account, &mut ledger, 256);
        let _held2 = Reservation::take(&account, &mut ledger, 256);
        // 2 instances and 512 MB free: a 256 MB pre-warm leaves as much again.
        assert!(ledger.fits_speculative(256));
        assert!(!ledger.fits_speculative(257));
        let _held3 = Reservation::take(&account, &mut ledger, 128);
        // One instance free: a cold start fits, a pre-warm does not.
        assert!(ledger.fits(128));
        assert!(!ledger.fits_speculative(128));
        // Reservations release under the account's lock: let it go first.
        drop(ledger);
    }

    #[test]
    fn reservations_are_released_once() {
        let accounts = Accounts::new(Quota {
            instances: 2,
            memory_mb: 256,
            ..Quota::DEFAULT
        });
        let account = accounts.get("a");
        let r1 = {
            let mut ledger = account.lock();
            assert!(ledger.fits(128));
            Reservation::take(&account, &mut ledger, 128)
        };
        let mut r2 = {
            let mut ledger = account.lock();
            assert!(ledger.fits(128));
            Reservation::take(&account, &mut ledger, 128)
        };
        {
            let ledger = account.lock();
            assert!(!ledger.fits(128));
            assert!(ledger.fits_after(128, 1, 128));
        }
        {
            let mut ledger = account.lock();
            r2.release_locked(&mut ledger);
            assert_eq!((ledger.instances, ledger.memory_mb), (1, 128));
        }
        drop(r2);
        drop(r1);
        let usage = account.usage();
        assert_eq!((usage.instances, usage.memory_mb), (0, 0));
    }

    #[test]
    fn overrides_apply_over_defaults_and_are_validated() {
        let o = QuotaOverride {
            instances: Some(3),
            rate: Some(0.5),
            ..QuotaOverride::default()
        };
        let q = o.over(&Quota::DEFAULT);
        assert_eq!(q.instances, 3);
        assert_eq!(q.memory_mb, Quota::DEFAULT.memory_mb);
        assert!((q.rate - 0.5).abs() < 1e-12);
        assert!(Quota::DEFAULT.validate().is_ok());
        for bad in [
            QuotaOverride {
                instances: Some(0),
                ..QuotaOverride::default()
            },
            QuotaOverride {
                memory_mb: Some(64),
                ..QuotaOverride::default()
            },
            QuotaOverride {
                rate: Some(f64::NAN),
                ..QuotaOverride::default()
            },
            QuotaOverride {
                burst: Some(0),
                ..QuotaOverride::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
