//! `GET /v1/health` (no key): 200 `{"status": "ok"}` while the server can take work, 503
//! `{"status": "degraded", "problems": [...]}` while it cannot (the data dir below its disk
//! reserve); it recovers by itself once the cause is gone. Either carries
//! `log_lines_dropped` once a log line could not be written to stderr.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::state::SharedState;

pub async fn health(State(state): State<SharedState>) -> (StatusCode, Json<Value>) {
    let problems: Vec<Value> = state.disk.problem().into_iter().collect();
    let mut body = json!({
        "status": if problems.is_empty() { "ok" } else { "degraded" },
        "version": env!("CARGO_PKG_VERSION"),
    });
    // Not a problem for the API (requests are still answered), but the operator's logs
    // are incomplete: stderr could not be written.
    let dropped = crate::log::dropped_log_lines();
    if dropped > 0 {
        body["log_lines_dropped"] = json!(dropped);
    }
    if problems.is_empty() {
        return (StatusCode::OK, Json(body));
    }
    body["problems"] = Value::Array(problems);
    (StatusCode::SERVICE_UNAVAILABLE, Json(body))
}
