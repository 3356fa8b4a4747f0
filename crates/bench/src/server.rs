//! The bench's servers: the shared harness's [`Server`] (`refinery-harness`, the one the
//! integration tests use), started with quotas raised so that the figures measure the
//! platform, not the default quotas, and its [`Api`] client.

use std::path::Path;
use std::process::Stdio;

use anyhow::Result;

pub use refinery_harness::{Client as Api, Server};

/// Starts `binary serve` on a fresh data dir with quotas and the deploy rate raised; `extra` flags are
/// appended (e.g. `--no-zygotes`).
pub fn start(binary: &Path, extra: &[&str]) -> Result<Server> {
    let mut args = vec![
        "--keep-alive",
        "10m",
        "--quota-rate",
        "1000000",
        "--quota-burst",
        "1000000",
        "--quota-instances",
        "2000",
        "--quota-memory-mb",
        "1000000",
        "--scale-up-limit",
        "1000/10s",
        "--queue-timeout",
        "60s",
        "--deploy-rate",
        "1000/1m",
    ];
    args.extend_from_slice(extra);
    Server::launch_fresh(binary, &args, Stdio::inherit(), "warn")
}
