//! The invocation service: the one path by which anything runs a Code Block.
//!
//! It owns what happens to one invocation below the transport: resolving a block of a
//! project's live deployment (cached per account and project, invalidated on deploy and
//! rollback), then, in this order, the spending-cap admission (cached for accounts without
//! a cap), the disk-reserve admission (behind [`DiskReserve`], implemented by the server),
//! the run in the pool (in a task of its own, so a caller that goes away cannot cancel it),
//! the output-size check and the execution record, metering, and the durable insert of
//! record and usage (answered after COMMIT). Every entry point calls it: the HTTP invoke
//! route today; the pipeline engine and triggers next.
//!
//! It knows nothing of HTTP (its [`InvocationError`]s carry no transport or driver types;
//! each caller maps them) and never decides who the caller is: it is given the account,
//! already authenticated. The pool runs the code; the store writes the record.

mod error;
mod service;

pub use error::{InvocationError, Limit};
pub use service::{DiskReserve, Execution, InvocationRequest, InvocationService, LiveDeployment};
