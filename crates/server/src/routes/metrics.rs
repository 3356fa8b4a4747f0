//! `GET /metrics`: the pool's, the services engine's and the queues' Prometheus metrics (OpenMetrics text), for the operator only.
//!
//! Why the operator key and not an open endpoint: the series are labelled with account
//! ids, project and block names — what tenants run is tenant information — and the API
//! listener is the one the tenants reach. Prometheus sends the key as a bearer token
//! (`authorization: {credentials_file: .../operator.key}` in its scrape config).

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::SharedState;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The pool's exposition with the engine's series spliced in before its `# EOF`.
fn with_engine(pool: String, engine: &str) -> String {
    match pool.strip_suffix("# EOF\n") {
        Some(head) => format!("{head}{engine}# EOF\n"),
        None => pool,
    }
}

pub async fn metrics(
    State(state): State<SharedState>,
    caller: Caller,
) -> Result<impl IntoResponse, ApiError> {
    caller.require_operator()?;
    Ok((
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        with_engine(
            state.pool.render_metrics(),
            &format!(
                "{}{}",
                state.engine.render_metrics(),
                state.engine.render_queue_metrics().await
            ),
        ),
    ))
}
