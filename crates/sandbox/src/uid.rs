//! Allocation of one unprivileged uid (and the equal gid) per live instance, unique host-wide.
//!
//! The sandbox range [`FIRST_UID`]..=[`LAST_UID`] is cut into blocks of [`UID_BLOCK_SIZE`]
//! uids. A process claims a block by holding an exclusive `flock(2)` on its file under
//! [`UID_LOCK_DIR`] (`100000-101023`, holding the claimant's pid for operators), and hands out
//! uids only from the blocks it holds, until it exits. The kernel drops the lock when the
//! process dies, however it dies, so a killed server's block can be claimed again (its instances
//! died with it: `PR_SET_PDEATHSIG`). So two Refinery processes on one host (servers, the sandbox
//! crate's own tests) never hand out the same uid, and a uid names the process whose instance it
//! is: the audit watcher ignores kernel records of uids outside this process's blocks
//! ([`owns_uid`]).
//!
//! Within its blocks a process hands uids out round-robin, so a freed uid is not reused at
//! once; it claims another block when it reaches the end of its blocks while it holds fewer than
//! [`RECYCLE_AFTER_BLOCKS`] (a uid is then reused only after that many thousand others), and
//! whenever every uid it holds is in use. The allocator is process-global so that several
//! [`crate::SandboxHost`]s in one process (tests) never hand out the same uid twice.

use std::collections::BTreeSet;
use std::fs::{DirBuilder, File, OpenOptions, TryLockError};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::SandboxError;

/// First uid of the range reserved for sandbox instances.
pub const FIRST_UID: u32 = 100_000;
/// Last uid (inclusive) of the range reserved for sandbox instances.
pub const LAST_UID: u32 = 165_535;
/// Uids per block: a process claims them together (64 blocks in the range).
pub const UID_BLOCK_SIZE: u32 = 1024;
/// Where the block lock files live (one per block, created on first use).
pub const UID_LOCK_DIR: &str = "/run/refinery/uids";
/// A process claims more blocks instead of reusing uids until it holds this many.
pub const RECYCLE_AFTER_BLOCKS: usize = 4;

const BLOCKS: u32 = (LAST_UID - FIRST_UID + 1) / UID_BLOCK_SIZE;
const BLOCK: usize = UID_BLOCK_SIZE as usize;

/// A block this process holds: its first uid and the locked file (closing it releases it).
struct Block {
    first: u32,
    _lock: File,
}

struct Allocator {
    /// In the order claimed; never shrinks while the process lives.
    blocks: Vec<Block>,
    in_use: BTreeSet<u32>,
    /// Index of the next candidate in the concatenation of `blocks`.
    next: usize,
}

static ALLOCATOR: Mutex<Allocator> = Mutex::new(Allocator::new());

impl Allocator {
    const fn new() -> Self {
        Allocator {
            blocks: Vec::new(),
            in_use: BTreeSet::new(),
            next: 0,
        }
    }

    fn uid_at(&self, index: usize) -> Option<u32> {
        let block = self.blocks.get(index / BLOCK)?;
        // `index % BLOCK` < UID_BLOCK_SIZE, a u32.
        Some(block.first + (index % BLOCK) as u32)
    }

    /// Takes the first free uid of `range` (indices into the held blocks).
    fn take_first_free(&mut self, range: Range<usize>) -> Option<u32> {
        for index in range {
            let uid = self.uid_at(index)?;
            if self.in_use.insert(uid) {
                self.next = index + 1;
                return Some(uid);
            }
        }
        None
    }

    fn allocate(&mut self, dir: &Path) -> Result<u32, SandboxError> {
        let held = self.blocks.len() * BLOCK;
        if let Some(uid) = self.take_first_free(self.next..held) {
            return Ok(uid);
        }
        // At the end of the held blocks: a fresh block rather than reusing a uid, while few
        // are held.
        if self.blocks.len() < RECYCLE_AFTER_BLOCKS && self.claim(dir)? {
            if let Some(uid) = self.take_first_free(held..held + BLOCK) {
                return Ok(uid);
            }
        }
        let held = self.blocks.len() * BLOCK;
        if let Some(uid) = self.take_first_free(0..held) {
            return Ok(uid);
        }
        // Every held uid is live: one more block, however many are held.
        if self.claim(dir)? {
            if let Some(uid) = self.take_first_free(held..held + BLOCK) {
                return Ok(uid);
            }
        }
        Err(SandboxError::UidExhausted {
            first: FIRST_UID,
            last: LAST_UID,
            dir: dir.to_path_buf(),
        })
    }

    /// Claims a block no process holds (starting at a random one); false if all are held.
    fn claim(&mut self, dir: &Path) -> Result<bool, SandboxError> {
        let lock_error = |path: &Path, source| SandboxError::UidLock {
            path: path.to_path_buf(),
            source,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| lock_error(dir, e))?;
        let start = random_block();
        for k in 0..BLOCKS {
            let first = FIRST_UID + ((start + k) % BLOCKS) * UID_BLOCK_SIZE;
            if self.blocks.iter().any(|b| b.first == first) {
                continue;
            }
            let path = block_path(dir, first);
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(|e| lock_error(&path, e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => continue,
                Err(TryLockError::Error(e)) => return Err(lock_error(&path, e)),
            }
            // For operators (`cat /run/refinery/uids/*`); the lock, not this, is the claim.
            let noted = file
                .set_len(0)
                .and_then(|()| writeln!(file, "{}", std::process::id()));
            if let Err(error) = noted {
                tracing::debug!(path = %path.display(), %error, "could not note the pid in a uid block file");
            }
            tracing::info!(first, last = first + UID_BLOCK_SIZE - 1, lock = %path.display(),
                "claimed a block of sandbox uids");
            self.blocks.push(Block { first, _lock: file });
            return Ok(true);
        }
        Ok(false)
    }

    fn owns(&self, uid: u32) -> bool {
        self.blocks
            .iter()
            .any(|b| (b.first..b.first + UID_BLOCK_SIZE).contains(&uid))
    }
}

fn block_path(dir: &Path, first: u32) -> PathBuf {
    dir.join(format!("{first}-{}", first + UID_BLOCK_SIZE - 1))
}

/// A random block index, from the standard library's per-process random hasher keys.
fn random_block() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    // The remainder is below BLOCKS, a u32.
    (hasher.finish() % u64::from(BLOCKS)) as u32
}

/// Whether `uid` lies in a block this process holds: true for every uid it ever handed out
/// (blocks are held until the process exits), false for another Refinery process's.
pub fn owns_uid(uid: u32) -> bool {
    ALLOCATOR
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .owns(uid)
}

/// A uid owned by one instance; returned to the pool on drop.
#[derive(Debug)]
pub(crate) struct UidLease(u32);

impl UidLease {
    pub(crate) fn allocate() -> Result<UidLease, SandboxError> {
        let mut a = ALLOCATOR.lock().unwrap_or_else(PoisonError::into_inner);
        a.allocate(Path::new(UID_LOCK_DIR)).map(UidLease)
    }

    pub(crate) fn uid(&self) -> u32 {
        self.0
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        let mut a = ALLOCATOR.lock().unwrap_or_else(PoisonError::into_inner);
        a.in_use.remove(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_unique_owned_and_freed() {
        let a = UidLease::allocate().expect("uid");
        let b = UidLease::allocate().expect("uid");
        assert_ne!(a.uid(), b.uid());
        assert!((FIRST_UID..=LAST_UID).contains(&a.uid()));
        assert!(owns_uid(a.uid()) && owns_uid(b.uid()));
        let freed = a.uid();
        drop(a);
        let in_use = ALLOCATOR
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .in_use
            .contains(&freed);
        assert!(!in_use);
        // Still this process's block: a late kernel record of it is still ours.
        assert!(owns_uid(freed));
    }

    fn block_of(uid: u32) -> u32 {
        FIRST_UID + (uid - FIRST_UID) / UID_BLOCK_SIZE * UID_BLOCK_SIZE
    }

    // Two allocators on one lock dir stand for two processes: flock(2) locks belong to open
    // file descriptions, so they exclude each other within one process too.
    #[test]
    fn allocators_sharing_a_lock_dir_never_share_a_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut a, mut b) = (Allocator::new(), Allocator::new());
        let ua = a.allocate(dir.path()).expect("a");
        let ub = b.allocate(dir.path()).expect("b");
        assert_ne!(block_of(ua), block_of(ub));
        assert!(a.owns(ua) && !a.owns(ub) && b.owns(ub) && !b.owns(ua));
        let file = block_path(dir.path(), block_of(ua));
        let noted = std::fs::read_to_string(&file).expect("block file");
        assert_eq!(noted.trim(), std::process::id().to_string());
        // The block is free again once its holder is gone (a process's files close when it
        // dies): another allocator can claim it.
        drop(a);
        let mut c = Allocator::new();
        let mut claimed = BTreeSet::new();
        for _ in 0..BLOCKS - 1 {
            assert!(c.claim(dir.path()).expect("claim"));
        }
        for block in &c.blocks {
            claimed.insert(block.first);
        }
        assert!(claimed.contains(&block_of(ua)), "{claimed:?}");
        assert!(!claimed.contains(&block_of(ub)), "b still holds its block");
        // Now every block is held (b's one, c's the rest).
        assert!(!c.claim(dir.path()).expect("claim"));
        let mut d = Allocator::new();
        let err = d.allocate(dir.path()).expect_err("all blocks held");
        let message = err.to_string();
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        assert!(message.contains("other Refinery processes"), "{message}");
    }

    #[test]
    fn uids_are_not_reused_at_once_and_blocks_grow_when_all_are_live() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Allocator::new();
        // Allocate and free one at a time: a fresh uid each time, over the recycling span.
        let span = RECYCLE_AFTER_BLOCKS * BLOCK;
        let mut seen = BTreeSet::new();
        for _ in 0..span {
            let uid = a.allocate(dir.path()).expect("uid");
            assert!(seen.insert(uid), "{uid} reused after {} others", seen.len());
            a.in_use.remove(&uid);
        }
        assert_eq!(a.blocks.len(), RECYCLE_AFTER_BLOCKS);
        // Then uids are reused, in the same blocks.
        let again = a.allocate(dir.path()).expect("uid");
        assert!(seen.contains(&again));
        assert_eq!(a.blocks.len(), RECYCLE_AFTER_BLOCKS);
        // All live: one more block.
        for _ in 0..span {
            let _ = a.allocate(dir.path()).expect("uid");
        }
        assert_eq!(a.blocks.len(), RECYCLE_AFTER_BLOCKS + 1);
        assert_eq!(a.in_use.len(), span + 1);
    }
}
