//! The REST API's routes, one module per resource.

mod accounts;
mod audit;
mod billing;
mod console;
mod deployments;
mod endpoints;
mod executions;
mod graph;
mod health;
mod instances;
mod invoke;
mod metrics;
mod queues;
mod runs;
mod secrets;
mod timers;
mod topics;

use axum::extract::DefaultBodyLimit;
use axum::routing::{any, get, post};
use axum::Router;

use crate::state::SharedState;

pub use accounts::pool_override;
pub use billing::close_due_months;

pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/v1/health", get(health::health))
        .route("/v1/accounts", post(accounts::create).get(accounts::list))
        .route("/v1/accounts/{account}/disable", post(accounts::disable))
        .route("/v1/accounts/{account}/enable", post(accounts::enable))
        .route(
            "/v1/accounts/{account}/rotate-key",
            post(accounts::rotate_key),
        )
        .route(
            "/v1/accounts/{account}/quota",
            get(accounts::quota)
                .put(accounts::set_quota)
                .patch(accounts::set_quota),
        )
        // The deploy reads its own body, bounded (`deployments::read_deploy_request`).
        .route(
            "/v1/deployments",
            post(deployments::deploy).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/projects", get(deployments::list_projects))
        .route(
            "/v1/projects/{project}",
            axum::routing::delete(deployments::delete_project),
        )
        .route("/v1/projects/{project}/deployments", get(deployments::list))
        .route("/v1/projects/{project}/secrets", get(secrets::list))
        .route(
            "/v1/projects/{project}/secrets/{name}",
            axum::routing::put(secrets::set)
                .layer(DefaultBodyLimit::max(secrets::MAX_SECRET_REQUEST_BYTES))
                .delete(secrets::delete),
        )
        .route("/v1/projects/{project}/graph", get(graph::graph))
        .route(
            "/v1/projects/{project}/rollback",
            post(deployments::rollback),
        )
        .route(
            "/v1/projects/{project}/blocks/{block}/invoke",
            post(invoke::invoke).layer(DefaultBodyLimit::max(
                refinery_domain::limits::MAX_PAYLOAD_BYTES,
            )),
        )
        .route(
            "/v1/projects/{project}/runs",
            post(runs::start)
                .layer(DefaultBodyLimit::max(runs::MAX_RUN_REQUEST_BYTES))
                .get(runs::list),
        )
        .route(
            "/v1/projects/{project}/topics/{topic}/publish",
            post(topics::publish).layer(DefaultBodyLimit::max(
                refinery_domain::limits::MAX_PAYLOAD_BYTES,
            )),
        )
        .route("/v1/projects/{project}/timers", get(timers::list))
        .route(
            "/v1/projects/{project}/queues/{queue}/messages",
            post(queues::send).layer(DefaultBodyLimit::max(queues::MAX_SEND_REQUEST_BYTES)),
        )
        .route("/v1/projects/{project}/queues/{queue}", get(queues::show))
        .route(
            "/v1/projects/{project}/queues/{queue}/dead-letters",
            get(queues::dead_letters),
        )
        .route(
            "/v1/projects/{project}/queues/{queue}/dead-letters/redrive",
            post(queues::redrive),
        )
        .route(
            "/v1/projects/{project}/queues/{queue}/dead-letters/purge",
            post(queues::purge),
        )
        .route("/v1/runs/{run_id}", get(runs::show))
        .route("/v1/runs/{run_id}/cancel", post(runs::cancel))
        .route("/v1/projects/{project}/executions", get(executions::list))
        .route("/v1/executions/{id}", get(executions::show))
        .route("/v1/instances", get(instances::list))
        .route("/v1/audit", get(audit::list))
        .route("/metrics", get(metrics::metrics))
        .merge(endpoint_routes())
        .merge(billing_routes())
        .merge(console_routes())
        .layer(axum::middleware::from_fn(console::no_store))
        .with_state(state)
}

/// Public endpoints (`routes/endpoints.rs`): the project's root, with and without a
/// trailing `/`, and every path below it.
fn endpoint_routes() -> Router<SharedState> {
    let call = || {
        any(endpoints::call).layer(DefaultBodyLimit::max(
            refinery_domain::limits::MAX_PAYLOAD_BYTES,
        ))
    };
    Router::new()
        .route("/http/{account}/{project}", call())
        .route("/http/{account}/{project}/", call())
        .route("/http/{account}/{project}/{*path}", call())
}

/// The web console's page and assets (`routes/console.rs`).
fn console_routes() -> Router<SharedState> {
    Router::new()
        .route("/", get(console::root))
        .route("/console", get(console::root))
        .route("/console/", get(console::index))
        .route("/console/{file}", get(console::asset))
}

/// Pricing, per-account terms, usage and bills (`routes/billing.rs`).
fn billing_routes() -> Router<SharedState> {
    Router::new()
        .route(
            "/v1/pricing",
            get(billing::pricing).put(billing::set_pricing),
        )
        .route(
            "/v1/accounts/{account}/billing",
            get(billing::account_billing)
                .put(billing::set_account_billing)
                .patch(billing::set_account_billing),
        )
        .route("/v1/usage", get(billing::usage))
        .route("/v1/bills", get(billing::list_bills))
        .route("/v1/bills/{month}", get(billing::show_bill))
        .route("/v1/bills/{month}/close", post(billing::close))
}

/// RFC 3339 form of a Unix-epoch millisecond timestamp.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}
