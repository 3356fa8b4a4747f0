//! Topics: `POST /v1/projects/{p}/topics/{t}/publish` (the body is the message) starts one
//! run per subscriber block, each with the message as its input → 202 `{"run_ids": [...]}`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use refinery_domain::limits::{MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::invoke::{check_depth, content_length};
use crate::state::SharedState;

pub async fn publish(
    State(state): State<SharedState>,
    caller: Caller,
    Path((project, topic)): Path<(String, String)>,
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
    if refinery_domain::json_depth::json_depth(&body) > MAX_JSON_DEPTH {
        check_depth(&body, "the message")?;
    }
    let message: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::BadRequest(format!(
                "the message is not valid JSON ({e}): the request body is the message itself, e.g. {{\"order\": 42}}"
            ))
        })?
    };
    let run_ids = state
        .engine
        .publish(account, &project, &topic, message, json!({}))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"run_ids": run_ids}))))
}
