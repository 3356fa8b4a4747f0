//! Service runs (BRIEF §7b): start one (`POST /v1/projects/{p}/runs`, optionally waiting),
//! show one with its steps, list a project's, cancel one. The engine does the work; these
//! routes read requests and shape replies.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use refinery_domain::limits::{MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES};
use refinery_engine::EngineError;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::invoke::{check_depth, content_length};
use crate::state::SharedState;

/// The body of a run request: its input and backpack, and the field names around them.
pub const MAX_RUN_REQUEST_BYTES: usize = MAX_PAYLOAD_BYTES + 64 * 1024;

/// The longest `?wait=` honoured.
const MAX_WAIT_S: f64 = 300.0;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    start: String,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    backpack: Option<Value>,
}

#[derive(Deserialize)]
pub struct WaitQuery {
    wait: Option<String>,
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<u32>,
}

pub async fn start(
    State(state): State<SharedState>,
    caller: Caller,
    Path(project): Path<String>,
    Query(query): Query<WaitQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let account = caller.account()?;
    let wait = match query.wait.as_deref() {
        None => None,
        Some(text) => Some(parse_wait(text)?),
    };
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                size: content_length(&headers),
                limit: MAX_PAYLOAD_BYTES,
            }
        } else {
            ApiError::BadRequest(format!(
                "reading the request body: {}",
                rejection.body_text()
            ))
        }
    })?;
    // The input and backpack sit one level inside the request object.
    if refinery_domain::json_depth::json_depth(&body) > MAX_JSON_DEPTH + 1 {
        check_depth(&body, "the run request (its input or backpack)")?;
    }
    let request: StartRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "the run request is not valid ({e}); send {{\"start\": \"BLOCK\", \"input\": JSON, \
             \"backpack\": {{...}}}} (input and backpack optional)"
        ))
    })?;
    let started = state
        .engine
        .start_run(
            account,
            &project,
            &request.start,
            request.input,
            request.backpack.unwrap_or_else(|| json!({})),
        )
        .await?;
    if let Some(wait) = wait {
        if state.engine.wait(&started.run_id, wait).await? {
            let run = state.engine.run(&account.id, &started.run_id).await?;
            return Ok((StatusCode::OK, Json(json!(run))));
        }
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"run_id": started.run_id, "status": "running"})),
    ))
}

fn parse_wait(text: &str) -> Result<Duration, ApiError> {
    let seconds: f64 = text
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s >= 0.0)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
            "`wait={text}` is not a number of seconds: use e.g. `?wait=30` (at most {MAX_WAIT_S})"
        ))
        })?;
    Ok(Duration::from_secs_f64(seconds.min(MAX_WAIT_S)))
}

pub async fn show(
    State(state): State<SharedState>,
    caller: Caller,
    Path(run_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    let run = state.engine.run(&account.id, &run_id).await?;
    Ok(Json(json!(run)))
}

pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    Path(project): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    let limit = query.limit.unwrap_or(20);
    if limit == 0 || limit > refinery_store::MAX_RUN_LIST {
        return Err(ApiError::BadRequest(format!(
            "`limit={limit}` is out of range: use 1 to {}",
            refinery_store::MAX_RUN_LIST
        )));
    }
    let runs = state.engine.list(&account.id, &project, limit).await?;
    Ok(Json(json!({"runs": runs})))
}

pub async fn cancel(
    State(state): State<SharedState>,
    caller: Caller,
    Path(run_id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let account = caller.account()?;
    let status = state.engine.cancel(&account.id, &run_id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"run_id": run_id, "status": status})),
    ))
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::ProjectNotFound { .. }
            | EngineError::StartNotFound { .. }
            | EngineError::RunNotFound(_)
            | EngineError::NoEndpoint { .. }
            | EngineError::NoTopic { .. } => ApiError::NotFound(e.to_string()),
            EngineError::QueueNotFound { .. } => ApiError::NotFound(e.to_string()),
            EngineError::MessageTooLarge { limit, .. } => ApiError::UploadTooLarge {
                message: e.to_string(),
                limit: "max_message_bytes",
                limit_value: limit,
                unread: false,
            },
            EngineError::QueueFull { .. } => ApiError::Throttled {
                message: e.to_string(),
                retry_after: Duration::from_secs(1),
                limit: "queued_messages",
            },
            EngineError::EndpointMethod { ref allow, .. } => ApiError::MethodNotAllowed {
                allowed: allow.clone(),
                message: e.to_string(),
            },
            EngineError::Invalid(_) => ApiError::BadRequest(e.to_string()),
            EngineError::TooManyRuns { .. } => ApiError::Throttled {
                message: e.to_string(),
                retry_after: Duration::from_secs(1),
                limit: "runs",
            },
            EngineError::ShuttingDown => ApiError::Unavailable(e.to_string()),
            EngineError::Store(e) => e.into(),
            EngineError::Internal(_) | EngineError::SlotFired { .. } => {
                ApiError::Internal(e.to_string())
            }
        }
    }
}
