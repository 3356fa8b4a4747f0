//! Allocation of one unprivileged uid (and the equal gid) per live instance.
//!
//! The allocator is process-global so that several [`crate::SandboxHost`]s in one process
//! (tests) never hand out the same uid twice. Uids are handed out round-robin so a freed uid is
//! not reused immediately.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

use crate::SandboxError;

/// First uid of the range reserved for sandbox instances.
pub const FIRST_UID: u32 = 100_000;
/// Last uid (inclusive) of the range reserved for sandbox instances.
pub const LAST_UID: u32 = 165_535;

struct Allocator {
    in_use: BTreeSet<u32>,
    next: u32,
}

/// `next == 0`: not started yet; the first allocation picks a random start.
static ALLOCATOR: Mutex<Allocator> = Mutex::new(Allocator {
    in_use: BTreeSet::new(),
    next: 0,
});

/// A random point of the range, from the standard library's per-process random hasher keys.
fn random_start() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let span = u64::from(LAST_UID - FIRST_UID) + 1;
    // The remainder is below `span`, which fits in u32.
    FIRST_UID + (hasher.finish() % span) as u32
}

/// A uid owned by one instance; returned to the pool on drop.
#[derive(Debug)]
pub(crate) struct UidLease(u32);

impl UidLease {
    pub(crate) fn allocate() -> Result<UidLease, SandboxError> {
        let mut a = ALLOCATOR.lock().unwrap_or_else(PoisonError::into_inner);
        if a.next == 0 {
            a.next = random_start();
        }
        // Live instances are far fewer than the range: this ends long before wrapping.
        let span = LAST_UID - FIRST_UID + 1;
        for _ in 0..span {
            let candidate = a.next;
            a.next = if candidate >= LAST_UID {
                FIRST_UID
            } else {
                candidate + 1
            };
            if a.in_use.insert(candidate) {
                return Ok(UidLease(candidate));
            }
        }
        Err(SandboxError::UidExhausted {
            first: FIRST_UID,
            last: LAST_UID,
        })
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
    fn leases_are_unique_and_freed() {
        let a = UidLease::allocate().expect("uid");
        let b = UidLease::allocate().expect("uid");
        assert_ne!(a.uid(), b.uid());
        assert!((FIRST_UID..=LAST_UID).contains(&a.uid()));
        let freed = a.uid();
        drop(a);
        let in_use = ALLOCATOR
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .in_use
            .contains(&freed);
        assert!(!in_use);
    }
}
