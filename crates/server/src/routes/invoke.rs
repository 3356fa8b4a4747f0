//! `POST /v1/projects/{project}/blocks/{block}/invoke`: run a block once. The route only
//! reads the request (body limit, nesting depth, JSON, the backpack header); resolving,
//! admission, the run, the record and metering are the invocation service's.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use refinery_domain::json_depth::json_depth;
use refinery_domain::limits::{MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES};
use refinery_invocation::{Execution, InvocationRequest};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::SharedState;

/// Optional header carrying the initial backpack (a JSON object).
const BACKPACK_HEADER: &str = "refinery-backpack";

pub async fn invoke(
    State(state): State<SharedState>,
    caller: Caller,
    Path((project, block)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Execution>, ApiError> {
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
    check_depth(&body, "the request body (the block's input)")?;
    let input: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::BadRequest(format!(
                "the request body is not valid JSON ({e}); send the block's input as JSON, e.g. {{\"name\": \"world\"}}"
            ))
        })?
    };
    let backpack = match headers.get(BACKPACK_HEADER) {
        None => json!({}),
        Some(value) => {
            check_depth(value.as_bytes(), "the Refinery-Backpack header")?;
            let parsed: Value = value
                .to_str()
                .ok()
                .and_then(|s| serde_json::from_str(s).ok())
                .filter(Value::is_object)
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "the {BACKPACK_HEADER} header must hold a JSON object, e.g. {{\"user\": 1}}"
                    ))
                })?;
            parsed
        }
    };

    let target = state.invocations.resolve(account, project, &block).await?;
    let request = InvocationRequest {
        target,
        input,
        input_text: String::from_utf8_lossy(&body).into_owned(),
        backpack,
        log_level: refinery_domain::LogLevel::All,
        // A plain invoke is no step of a service run.
        context: None,
    };
    let execution = state.invocations.invoke(account, request).await?;
    Ok(Json(execution))
}

/// Refuses a payload nested deeper than [`MAX_JSON_DEPTH`] (checked on the raw bytes, so
/// the message is the same however deep it goes), before anything parses it.
pub(crate) fn check_depth(text: &[u8], what: &str) -> Result<(), ApiError> {
    let depth = json_depth(text);
    if depth > MAX_JSON_DEPTH {
        return Err(ApiError::BadRequest(format!(
            "{what} is nested {depth} levels deep; the limit is {MAX_JSON_DEPTH} levels of nested arrays and objects: send a flatter value"
        )));
    }
    Ok(())
}

pub(crate) fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
