//! Refinery's HTTP API server: `refinery serve`.
//!
//! It owns the REST/JSON API (routes, authentication, tenancy checks, the mapping from
//! errors to HTTP statuses), the operator key, the server's lifecycle (start-up
//! checks, graceful shutdown), its front door (`front_door.rs`, the accept loop:
//! connection caps, timeouts, header size), the deploy gate (`deploy_gate.rs`: the deploy
//! rate and the deploys received at once), the disk reserve (`disk.rs`: refusing new work
//! with 503 while the data dir is nearly full) and the log sink (`log.rs`: a log line that
//! cannot be written is dropped, never failing a request). Every request is authenticated
//! and every lookup is scoped to the caller's account before anything reaches the store or
//! the pool. It also serves the web console (`routes/console.rs`: HTML, CSS and JavaScript
//! modules under `console/`, embedded in the binary, sent with a strict Content Security
//! Policy), which is only a client of the same API. This crate never runs user code itself
//! (the pool does, through the invocation service of `refinery_invocation`, which the
//! invoke route calls) and never writes SQL (the store does).

mod audit;
mod auth;
mod builds;
mod deploy_gate;
mod disk;
mod endpoint_http;
mod error;
mod front_door;
mod keys;
mod log;
mod routes;
mod serve;
mod state;

pub use deploy_gate::{DeployLimits, DeployRate};
pub use error::ApiError;
pub use front_door::{
    FrontDoorConfig, DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
};
pub use log::{dropped_log_lines, LossyStderr};
pub use refinery_engine::EngineConfig;
pub use refinery_pool::{KeepAliveMode, Quota, ScaleUpLimit, DEFAULT_MAX_LABEL_SETS};
pub use serve::{serve, ServeConfig, ServeError};
