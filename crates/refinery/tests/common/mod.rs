//! The tests' harness is the workspace's one harness, `refinery-harness` (shared with the
//! benchmarks): a real `refinery serve` on a loopback port with a private data dir, and
//! typed requests to its API and CLI.

#![allow(unused_imports, dead_code)]

pub use refinery_harness::*;

/// The binary under test (the harness finds the same one beside the test executable).
pub const BIN: &str = env!("CARGO_BIN_EXE_refinery");
