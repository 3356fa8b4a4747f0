//! Refinery's domain model: the vocabulary every other crate speaks.
//!
//! This crate owns the plain data types (languages, block specs, execution statuses and
//! records, user-code errors), the platform-wide limits (and the JSON nesting measure that
//! enforces one of them), the `refinery.toml` manifest parser with its located error
//! messages, and the service definitions it yields (transitions, compiled `if`
//! expressions, retry policies, log level, the service graph). It does no I/O beyond
//! parsing strings: no files, no network, no processes (a CEL expression is parsed on a
//! short-lived thread with a large stack, as the parser recurses deeply), so the CLI and
//! the server validate manifests identically.

pub mod block;
pub mod execution;
pub mod json_depth;
pub mod language;
pub mod limits;
pub mod manifest;
pub mod names;
pub mod service;
pub mod shared;
pub mod source;
pub mod trigger;

pub use block::{BlockSpec, Language};
pub use execution::{ExecutionRecord, ExecutionStatus, UserError};
pub use manifest::{Manifest, ManifestError};
pub use service::{
    Expression, ExpressionError, LogLevel, RetryPolicy, ServiceGraph, Transition, TransitionType,
};
pub use shared::SharedDir;
pub use trigger::{
    Cors, Endpoint, EndpointAuth, HttpMethod, NodeKind, PathTemplate, Queue, Response, Schedule,
    Timer, Topic,
};
