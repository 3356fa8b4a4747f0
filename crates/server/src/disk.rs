//! Free space on the data dir's filesystem, and what a full disk does to requests.
//!
//! Every invocation ends by committing its execution record, and every deploy writes the
//! deployment and later its code, all under the data dir. When that filesystem is full,
//! running the user's code first and failing the commit afterwards would waste the run and
//! answer an opaque 500. Instead new work is refused up front, with 503 and a message naming
//! the data dir and its free space, while the free space is below the operator's reserve
//! (`--disk-reserve`): the reserve is left for the records of what is already running.
//!
//! The check is on the hot path of every invocation, so it reads one atomic: a background
//! task (`watch`) reads the filesystem's free space with `statvfs(2)` every
//! [`DISK_POLL_INTERVAL`], and every failure that looks like a full disk reads it again at
//! once. `/v1/health` reads it fresh and reports the degraded state; both recover by
//! themselves when space returns.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use refinery_invocation::DiskReserve;
use refinery_pool::PoolError;
use refinery_store::StoreError;
use serde_json::{json, Value};

use crate::error::ApiError;

/// How often the background task reads the free space.
pub const DISK_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The `Retry-After` of a refusal for lack of space: space comes back by an operator's
/// action, not within a second.
pub const DISK_RETRY_AFTER: Duration = Duration::from_secs(30);

/// The free space of the data dir's filesystem, as last read.
#[derive(Debug)]
pub struct DiskSpace {
    data_dir: PathBuf,
    reserve: u64,
    /// Bytes available to the server at the last reading (`u64::MAX` until one succeeded).
    free: AtomicU64,
}

/// What was refused or lost for lack of space, for the message.
#[derive(Debug, Clone, Copy)]
pub enum Refused {
    /// An invocation, before any of the block's code ran.
    Invocation,
    /// An invocation that ran, but whose record could not be committed.
    ExecutionRecord,
    /// A deploy or rollback, before anything was stored.
    Deploy,
}

impl DiskSpace {
    /// Reads the free space of `data_dir`'s filesystem once.
    pub fn new(data_dir: &Path, reserve: u64) -> DiskSpace {
        let disk = DiskSpace {
            data_dir: data_dir.to_path_buf(),
            reserve,
            free: AtomicU64::new(u64::MAX),
        };
        disk.refresh();
        disk
    }

    /// The free bytes at the last reading.
    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// Whether the last reading is below the reserve.
    pub fn low(&self) -> bool {
        self.free() < self.reserve
    }

    /// Reads the free space now; returns it (the previous reading if `statvfs` failed,
    /// which is logged).
    pub fn refresh(&self) -> u64 {
        match available_bytes(&self.data_dir) {
            Ok(free) => {
                self.free.store(free, Ordering::Relaxed);
                free
            }
            Err(error) => {
                tracing::warn!(data_dir = %self.data_dir.display(), %error, "reading the free space of the data directory");
                self.free()
            }
        }
    }

    /// The hot-path check: one atomic load. `Err` (503) while the free space is below the
    /// reserve; nothing has run or been written then.
    pub fn admit(&self, what: Refused) -> Result<(), ApiError> {
        if self.low() {
            return Err(self.full(what));
        }
        Ok(())
    }

    /// The 503 for `what`, with the free space read now.
    pub fn full(&self, what: Refused) -> ApiError {
        ApiError::DiskFull(self.full_message(what))
    }

    /// The message of [`DiskSpace::full`].
    fn full_message(&self, what: Refused) -> String {
        let free = self.refresh();
        let consequence = match what {
            Refused::Invocation => {
                "this invocation was refused before any of the block's code ran (nothing was run or billed)"
            }
            Refused::ExecutionRecord => {
                "the block ran, but its execution record could not be written, so the execution is not recorded or billed and its result is withheld"
            }
            Refused::Deploy => "nothing of this request was stored",
        };
        format!(
            "the server is out of disk space: its data directory {} has {} free (the \
             reserve kept for recording executions is {}); {consequence}. Retry later; the \
             operator must free space on that filesystem (or move the data directory to a \
             larger one); `refinery serve --disk-reserve` sets the reserve",
            self.data_dir.display(),
            human(free),
            human(self.reserve),
        )
    }

    /// A store failure: the 503 of [`DiskSpace::full`] if the disk is full (the store says
    /// so, or the space read now is below the reserve), the usual mapping otherwise.
    pub fn store_error(&self, error: StoreError, what: Refused) -> ApiError {
        match self.store_out_of_space(&error, what) {
            Some(message) => ApiError::DiskFull(message),
            None => error.into(),
        }
    }

    fn store_out_of_space(&self, error: &StoreError, what: Refused) -> Option<String> {
        if error.is_disk_full() || self.refresh() < self.reserve {
            tracing::warn!(%error, "write failed: the data directory is out of space");
            return Some(self.full_message(what));
        }
        None
    }

    /// The problem `/v1/health` reports, read fresh; `None` while space is above the reserve.
    pub fn problem(&self) -> Option<Value> {
        let free = self.refresh();
        (free < self.reserve).then(|| {
            json!({
                "code": "disk_full",
                "message": format!(
                    "the data directory {} has {} free, below the reserve of {}: invocations \
                     and deploys are refused with 503 until space is freed",
                    self.data_dir.display(),
                    human(free),
                    human(self.reserve)
                ),
                "data_dir": self.data_dir.display().to_string(),
                "free_bytes": free,
                "reserve_bytes": self.reserve,
            })
        })
    }
}

/// The invocation service's view of the reserve: the same checks and messages as deploys.
impl DiskReserve for DiskSpace {
    fn admit(&self) -> Result<(), String> {
        if self.low() {
            return Err(self.full_message(Refused::Invocation));
        }
        Ok(())
    }

    /// Laying out code or starting a sandbox writes under the data dir, so those fail on
    /// a full disk too.
    fn pool_failure(&self, error: &PoolError) -> Option<String> {
        let writes_to_disk = match error {
            PoolError::PrepareCode { source, .. } => {
                source.kind() == std::io::ErrorKind::StorageFull || self.refresh() < self.reserve
            }
            PoolError::StartInstance { .. } => self.refresh() < self.reserve,
            _ => false,
        };
        if writes_to_disk {
            tracing::warn!(%error, "the data directory is out of space");
            return Some(self.full_message(Refused::Invocation));
        }
        None
    }

    fn record_failure(&self, error: &StoreError) -> Option<String> {
        self.store_out_of_space(error, Refused::ExecutionRecord)
    }
}

/// Reads the free space every [`DISK_POLL_INTERVAL`]; logs each change between "below the
/// reserve" and "above it".
pub async fn watch(disk: Arc<DiskSpace>) {
    let mut ticks = tokio::time::interval(DISK_POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_low = disk.low();
    loop {
        ticks.tick().await;
        let free = disk.refresh();
        let low = free < disk.reserve;
        if low && !was_low {
            tracing::error!(data_dir = %disk.data_dir.display(), free = %human(free), reserve = %human(disk.reserve), "data directory below its disk reserve: refusing invocations and deploys with 503 until space is freed");
        } else if !low && was_low {
            tracing::info!(data_dir = %disk.data_dir.display(), free = %human(free), "disk space is back above the reserve: accepting invocations and deploys again");
        }
        was_low = low;
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `path` (root could
/// use a few more on ext4; this is the conservative reading).
fn available_bytes(path: &Path) -> nix::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(path)?;
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    let available = u64::from(stat.blocks_available()).saturating_mul(stat.fragment_size());
    Ok(available)
}

fn human(bytes: u64) -> String {
    if bytes == u64::MAX {
        return "an unknown amount".into();
    }
    format!("{} ({bytes} bytes)", ByteSize::b(bytes).display().si())
}
