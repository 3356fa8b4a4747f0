//! The instance pool: the scheduler between an invocation and a sandboxed instance.
//!
//! It owns the life of every instance: for each (deployment, block) it keeps warm frozen
//! instances, hands one to each invocation (thawing it), or starts a fresh one (a cold
//! start) when none is idle; it serves exactly one invocation per instance at a time,
//! freezes an instance when its invocation ends, discards it on timeout, crash or OOM,
//! reaps idle ones after their keep-alive, and drains instances of retired deployments.
//!
//! It keeps each block's provisioned instances (`min_warm`) warm from deploy to
//! retirement, limits how fast a block scales up (a token bucket on cold starts, see
//! [`ScaleUpLimit`]), decides keep-alive and pre-warming per block ([`keep_alive`]: fixed,
//! or adaptive from the block's idle-time histogram), and counts everything it does as
//! Prometheus metrics ([`InstancePool::render_metrics`]).
//!
//! It also enforces per-account quotas (live instances, their total memory, invocation
//! rate; see [`Quota`]) so one account cannot starve the others, and runs nothing of an
//! account the operator disabled ([`InstancePool::disable_account`]: its instances are
//! destroyed, none starts until it is enabled).
//!
//! It never touches the database and never decides who may invoke what: the API layer
//! authorises and records; the pool only runs. It is independent of the isolation tier
//! behind [`refinery_sandbox::SandboxHost`] and of the languages behind
//! [`refinery_runtimes`].

mod block_pool;
mod code_dir;
mod error;
mod instance;
pub mod keep_alive;
mod metrics;
mod pool;
mod quota;
mod scale_up;

pub use error::PoolError;
pub use instance::{InstanceInfo, InstanceState};
pub use keep_alive::{AdaptiveConfig, KeepAlivePolicy};
pub use metrics::{DEFAULT_MAX_LABEL_SETS, OVERFLOW_LABEL};
pub use pool::{
    sandbox_entry, BlockTarget, BuildReservation, InstancePool, Invocation, KeepAliveMode,
    PoolConfig, SecretSource, SecretValues,
};
pub use quota::{AccountUsage, Quota, QuotaOverride};
pub use refinery_runtimes::RunContext;
pub use scale_up::ScaleUpLimit;
