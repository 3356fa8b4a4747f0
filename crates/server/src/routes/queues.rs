//! Queues (BRIEF §7b): send messages (`POST /v1/projects/{p}/queues/{q}/messages`), show a
//! queue's counts and settings, and its dead-letter list (list, redrive, purge). The
//! engine does the work (`refinery_engine` queues); these routes read requests and shape
//! replies.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use refinery_domain::limits::{MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::invoke::{check_depth, content_length};
use crate::state::SharedState;

/// The largest send request: 6 MB of messages, and the field names around them.
pub const MAX_SEND_REQUEST_BYTES: usize = MAX_PAYLOAD_BYTES + 64 * 1024;

/// The most messages one send request may carry.
pub const MAX_MESSAGES_PER_SEND: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendRequest {
    messages: Vec<Value>,
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<u32>,
}

pub async fn send(
    State(state): State<SharedState>,
    caller: Caller,
    Path((project, queue)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let account = caller.account()?;
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
    // Each message sits two levels inside the request (an object, its list).
    if refinery_domain::json_depth::json_depth(&body) > MAX_JSON_DEPTH + 2 {
        check_depth(&body, "the send request (one of its messages)")?;
    }
    let request: SendRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "the send request is not valid ({e}); send {{\"messages\": [JSON, ...]}}, e.g. \
             {{\"messages\": [{{\"url\": \"https://example.com\"}}]}}"
        ))
    })?;
    if request.messages.is_empty() {
        return Err(ApiError::BadRequest(
            "`messages` is empty: send at least one, e.g. {\"messages\": [{\"id\": 1}]}".into(),
        ));
    }
    if request.messages.len() > MAX_MESSAGES_PER_SEND {
        return Err(ApiError::BadRequest(format!(
            "`messages` holds {} messages; one request may send at most {MAX_MESSAGES_PER_SEND}: split it",
            request.messages.len()
        )));
    }
    let n = state
        .engine
        .send_messages(&account.id, &project, &queue, &request.messages)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"enqueued": n}))))
}

pub async fn show(
    State(state): State<SharedState>,
    caller: Caller,
    Path((project, queue)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    let view = state.engine.queue(&account.id, &project, &queue).await?;
    Ok(Json(json!(view)))
}

pub async fn dead_letters(
    State(state): State<SharedState>,
    caller: Caller,
    Path((project, queue)): Path<(String, String)>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > refinery_store::MAX_DEAD_LETTER_LIST {
        return Err(ApiError::BadRequest(format!(
            "`limit={limit}` is out of range: use 1 to {}",
            refinery_store::MAX_DEAD_LETTER_LIST
        )));
    }
    let messages = state
        .engine
        .dead_letters(&account.id, &project, &queue, limit)
        .await?;
    Ok(Json(json!({"messages": messages})))
}

pub async fn redrive(
    State(state): State<SharedState>,
    caller: Caller,
    Path((project, queue)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    let n = state.engine.redrive(&account.id, &project, &queue).await?;
    Ok(Json(json!({"redriven": n})))
}

pub async fn purge(
    State(state): State<SharedState>,
    caller: Caller,
    Path((project, queue)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    let n = state
        .engine
        .purge_dead_letters(&account.id, &project, &queue)
        .await?;
    Ok(Json(json!({"purged": n})))
}
