//! One running instance: its sandbox, its protocol channel, and the tail of its stray
//! output (kept to explain a crash).

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use refinery_runtimes::InstanceChannel;
use refinery_sandbox::SandboxedInstance;
use serde::Serialize;
use tokio::io::AsyncReadExt;

use crate::block_pool::LiveGuard;
use crate::quota::Reservation;

/// Bytes of an instance's stray stdout/stderr kept to explain why it died.
const LOG_TAIL_BYTES: usize = 4096;

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Being created and loading the block's code (a cold start).
    Starting,
    /// Serving an invocation.
    Busy,
    /// Idle, warm, frozen by the cgroup freezer.
    Frozen,
}

/// What an operator (or the owning account) can see of an instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub account_id: String,
    pub project: String,
    pub deployment: i64,
    pub block: String,
    pub state: InstanceState,
    /// Host pid of the instance's init (pid 1 in its namespace).
    pub pid: i32,
    /// The instance's host uid: what kernel audit records (e.g. refused syscalls) name.
    pub uid: Option<u32>,
    pub cgroups: Vec<PathBuf>,
    pub started_at_ms: i64,
    pub last_used_at_ms: i64,
    pub invocations: u64,
}

pub struct Instance {
    pub sandbox: Arc<SandboxedInstance>,
    pub channel: InstanceChannel,
    pub invocations: u64,
    /// Its share of the account's quota, held until the instance is dropped (after it
    /// is destroyed).
    pub reservation: Reservation,
    /// Counts it among its block's live instances (for `min_warm`) until dropped.
    pub live: Option<LiveGuard>,
    log_tail: Arc<Mutex<VecDeque<u8>>>,
}

impl Instance {
    pub fn new(
        sandbox: SandboxedInstance,
        channel: InstanceChannel,
        logs: OwnedFd,
        reservation: Reservation,
    ) -> Instance {
        let log_tail = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL_BYTES)));
        spawn_log_drain(sandbox.id().to_string(), logs, log_tail.clone());
        Instance {
            sandbox: Arc::new(sandbox),
            channel,
            invocations: 0,
            reservation,
            live: None,
            log_tail,
        }
    }

    pub fn id(&self) -> &str {
        self.sandbox.id()
    }

    /// The last bytes the instance wrote outside any invocation's capture, as text.
    pub fn log_tail(&self) -> String {
        let tail = match self.log_tail.lock() {
            Ok(tail) => tail.iter().copied().collect::<Vec<u8>>(),
            Err(poisoned) => poisoned.into_inner().iter().copied().collect(),
        };
        String::from_utf8_lossy(&tail).trim().to_string()
    }
}

/// Reads the instance's stray output until it exits, so a chatty instance never blocks on
/// a full pipe; keeps only a bounded tail.
fn spawn_log_drain(instance_id: String, logs: OwnedFd, tail: Arc<Mutex<VecDeque<u8>>>) {
    let mut receiver = match tokio::net::unix::pipe::Receiver::from_owned_fd(logs) {
        Ok(receiver) => receiver,
        Err(e) => {
            tracing::warn!(instance = %instance_id, error = %e, "cannot read instance log pipe");
            return;
        }
    };
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            match receiver.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    tracing::debug!(instance = %instance_id, output = %String::from_utf8_lossy(&buf[..n]).trim_end(), "instance output");
                    let mut tail = match tail.lock() {
                        Ok(tail) => tail,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                    tail.extend(&buf[..n]);
                    let excess = tail.len().saturating_sub(LOG_TAIL_BYTES);
                    tail.drain(..excess);
                }
            }
        }
    });
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
