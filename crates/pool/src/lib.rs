//! The instance pool: the scheduler between an invocation and a sandboxed instance.
//!
//! It owns the life of every instance: for each (deployment, block) it keeps warm frozen
//! instances, hands one to each invocation (thawing it), or starts a fresh one (a cold
//! start) when none is idle; it serves exactly one invocation per instance at a time,
//! freezes an instance when its invocation ends, discards it on timeout, crash or OOM,
//! reaps idle ones after their keep-alive, and drains instances of retired deployments.
//!
//! It also enforces per-account quotas (live instances, their total memory, invocation
//! rate; see [`Quota`]) so one account cannot starve the others.
//!
//! It never touches the database and never decides who may invoke what: the API layer
//! authorises and records; the pool only runs. It is independent of the isolation tier
//! behind [`refinery_sandbox::SandboxHost`] and of the languages behind
//! [`refinery_runtimes`].

mod block_pool;
mod code_dir;
mod error;
mod instance;
mod pool;
mod quota;

pub use error::PoolError;
pub use instance::{InstanceInfo, InstanceState};
pub use pool::{BlockTarget, InstancePool, Invocation, PoolConfig};
pub use quota::{AccountUsage, Quota, QuotaOverride};
