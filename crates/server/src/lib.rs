//! Refinery's HTTP API server: `refinery serve`.
//!
//! It owns the REST/JSON API (routes, authentication, tenancy checks, the mapping from
//! errors to HTTP statuses), the operator key, the server's lifecycle (start-up
//! checks, graceful shutdown) and its front door (the accept loop: connection caps,
//! timeouts, header size). Every request is authenticated and every lookup is scoped
//! to the caller's account before anything reaches the store or the pool; this crate never
//! runs user code itself (the pool does) and never writes SQL (the store does).

mod audit;
mod auth;
mod error;
mod front_door;
mod keys;
mod routes;
mod serve;
mod state;

pub use error::ApiError;
pub use front_door::{
    FrontDoorConfig, DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
};
pub use refinery_pool::{KeepAliveMode, Quota, ScaleUpLimit, DEFAULT_MAX_LABEL_SETS};
pub use serve::{serve, ServeConfig, ServeError};
