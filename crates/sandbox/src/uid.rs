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

static ALLOCATOR: Mutex<Allocator> = Mutex::new(Allocator {
    in_use: BTreeSet::new(),
    next: FIRST_UID,
});

/// A uid owned by one instance; returned to the pool on drop.
#[derive(Debug)]
pub(crate) struct UidLease(u32);

impl UidLease {
    pub(crate) fn allocate() -> Result<UidLease, SandboxError> {
        let mut a = ALLOCATOR.lock().unwrap_or_else(PoisonError::into_inner);
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
