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
}
