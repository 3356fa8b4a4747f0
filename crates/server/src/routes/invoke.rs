//! `POST /v1/projects/{project}/blocks/{block}/invoke`: run a block once.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use refinery_domain::execution::truncate_utf8;
use refinery_domain::json_depth::json_depth;
use refinery_domain::limits::{MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES, RECORDED_PAYLOAD_BYTES};
use refinery_domain::{ExecutionRecord, ExecutionStatus, UserError};
use refinery_pool::{BlockTarget, Invocation};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::disk::Refused;
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
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?.clone();
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

    let live = state.live_deployment(&account.id, &project).await?;
    let spec = live.blocks.get(&block).cloned().ok_or_else(|| {
        let mut names: Vec<&str> = live.blocks.keys().map(String::as_str).collect();
        names.sort_unstable();
        ApiError::NotFound(format!(
            "project `{project}` (live deployment {}) has no block `{block}`; its blocks are: {}",
            live.number,
            names.join(", ")
        ))
    })?;
    let target = BlockTarget {
        account_id: account.id.clone(),
        account_name: account.name.clone(),
        project,
        deployment_id: live.id,
        deployment_number: live.number,
        block: spec,
    };

    // Spending cap: refused (402) before anything runs.
    super::billing::admit(&state, &account).await?;
    // Disk below the reserve: refused (503) before anything runs (one atomic load).
    state.disk.admit(Refused::Invocation)?;

    // Run and record in a task of its own: a client that disconnects must not cancel an
    // invocation half-way (its instance would be lost and its execution unrecorded).
    let input_text = String::from_utf8_lossy(&body).into_owned();
    let task = tokio::spawn(async move {
        let invocation = state
            .pool
            .invoke(&target, input, backpack)
            .await
            .map_err(|e| state.disk.pool_error(e))?;
        let (record, reply) = finish(&target, input_text, invocation);
        let usage = super::billing::usage_of(target.block.memory_mb, &reply);
        state
            .store
            .insert_execution(&record, &usage)
            .await
            .map_err(|e| state.disk.store_error(e, Refused::ExecutionRecord))?;
        Ok::<Value, ApiError>(reply)
    });
    let reply = task
        .await
        .map_err(|e| ApiError::Internal(format!("invocation task failed: {e}")))??;
    Ok(Json(reply))
}

/// Builds the execution record and the reply from what the pool returned.
fn finish(
    target: &BlockTarget,
    input_text: String,
    mut invocation: Invocation,
) -> (ExecutionRecord, Value) {
    let mut output_text = invocation
        .output
        .as_ref()
        .map(|o| serde_json::to_string(o).unwrap_or_default());
    if output_text
        .as_ref()
        .is_some_and(|t| t.len() > MAX_PAYLOAD_BYTES)
    {
        let size = output_text.as_ref().map_or(0, String::len);
        invocation.status = ExecutionStatus::Error;
        invocation.output = None;
        output_text = None;
        invocation.error = Some(UserError::new(
            "OutputTooLarge",
            format!("the block returned {size} bytes of JSON; the limit is {MAX_PAYLOAD_BYTES} bytes (6 MB)"),
        ));
    }
    // Time-ordered (UUIDv7): consecutive executions land in the same index pages, so a
    // group-committed batch dirties a few pages instead of one per record.
    let execution_id = format!("ex_{}", uuid::Uuid::now_v7().simple());
    let reply = json!({
        "execution_id": execution_id,
        "project": target.project,
        "block": target.block.name,
        "deployment": target.deployment_number,
        "status": invocation.status,
        "output": invocation.output,
        "error": invocation.error,
        "backpack": invocation.backpack,
        "logs": invocation.logs,
        "cold": invocation.cold,
        "instance_id": invocation.instance_id,
        "duration_ms": invocation.duration_ms,
        "init_ms": invocation.init_ms,
    });
    let mut input = input_text;
    let input_truncated = truncate_utf8(&mut input, RECORDED_PAYLOAD_BYTES);
    let output_truncated = output_text
        .as_mut()
        .is_some_and(|t| truncate_utf8(t, RECORDED_PAYLOAD_BYTES));
    let record = ExecutionRecord {
        id: execution_id,
        account_id: target.account_id.clone(),
        project: target.project.clone(),
        deployment: target.deployment_number,
        block: target.block.name.clone(),
        instance_id: invocation.instance_id,
        cold: invocation.cold,
        started_at_ms: invocation.started_at_ms,
        duration_ms: invocation.duration_ms,
        init_ms: invocation.init_ms,
        status: invocation.status,
        input,
        input_truncated,
        output: output_text,
        output_truncated,
        error: invocation.error,
        logs: invocation.logs,
        logs_truncated: invocation.logs_truncated,
    };
    (record, reply)
}

/// Refuses a payload nested deeper than [`MAX_JSON_DEPTH`] (checked on the raw bytes, so
/// the message is the same however deep it goes), before anything parses it.
fn check_depth(text: &[u8], what: &str) -> Result<(), ApiError> {
    let depth = json_depth(text);
    if depth > MAX_JSON_DEPTH {
        return Err(ApiError::BadRequest(format!(
            "{what} is nested {depth} levels deep; the limit is {MAX_JSON_DEPTH} levels of nested arrays and objects: send a flatter value"
        )));
    }
    Ok(())
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
