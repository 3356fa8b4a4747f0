//! Why the pool could not run an invocation at all (user-code failures are not errors
//! here: they are ordinary [`crate::Invocation`] outcomes).

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Every instance the block may have is busy and none came free in time.
    #[error("block `{block}` is at its max_concurrency of {limit} running instances and none came free within {waited:?}; retry later or raise max_concurrency in refinery.toml")]
    ConcurrencyLimit {
        block: String,
        limit: u32,
        waited: Duration,
    },
    /// The account holds as many live instances as its quota allows and none of them is
    /// idle (evictable). Decided before any instance starts.
    #[error("account {account} is at its limit of {limit} concurrent instances (none of them idle); retry later or ask the operator to raise it (refinery accounts set-quota {account} --instances N)")]
    InstanceQuota { account: String, limit: u32 },
    /// Starting one more instance would take the account past its total instance memory,
    /// even after evicting its idle instances.
    #[error("account {account} is at its limit of {limit_mb} MB of total instance memory ({used_mb} MB held by running instances; block `{block}` needs {needed_mb} MB more); retry later or ask the operator to raise it (refinery accounts set-quota {account} --memory-mb M)")]
    MemoryQuota {
        account: String,
        limit_mb: u64,
        used_mb: u64,
        needed_mb: u64,
        block: String,
    },
    /// The account invokes faster than its rate quota (token bucket) allows.
    #[error("account {account} is over its invocation rate limit of {rate} per second (burst {burst}); retry in {:.1} s or ask the operator to raise it (refinery accounts set-quota {account} --rate R --burst B)", retry_after.as_secs_f64())]
    RateQuota {
        account: String,
        rate: f64,
        burst: u32,
        retry_after: Duration,
    },
    /// The block may start no more new instances right now (its scale-up token bucket is
    /// empty) and no warm instance came free within the queue timeout.
    #[error("block `{block}` is at its scale-up limit of {limit} (cold starts) and no warm instance came free within {waited:?}; retry in {:.1} s, or ask the operator to raise it (refinery serve --scale-up-limit COLD_STARTS/DURATION)", retry_after.as_secs_f64())]
    ScaleUpLimit {
        block: String,
        limit: crate::ScaleUpLimit,
        waited: Duration,
        retry_after: Duration,
    },
    /// The operator disabled the account: none of its code runs.
    #[error("account {account} is disabled: none of its code runs; ask the operator to enable it (refinery accounts enable {account})")]
    AccountDisabled { account: String },
    /// The server is stopping; it takes no new invocations.
    #[error("the server is shutting down and takes no new invocations")]
    ShuttingDown,
    /// The block's code could not be laid out for its instances.
    #[error("preparing the code directory {path} for block `{block}`: {source}")]
    PrepareCode {
        block: String,
        path: String,
        source: std::io::Error,
    },
    /// The sandbox could not start an instance (a host problem, not the block's fault).
    #[error("starting an instance of block `{block}`: {message}")]
    StartInstance { block: String, message: String },
    /// A secret the block's `env` names could not be read (deleted since the deploy, or
    /// the store failed): the message says which and how to set it.
    #[error("starting an instance of block `{block}`: {message}")]
    Secret { block: String, message: String },
}
