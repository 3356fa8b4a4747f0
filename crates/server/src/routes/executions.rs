//! Reading executions: a project's recent ones, and one in full with its logs.

use axum::extract::{Path, Query, State};
use axum::Json;
use refinery_domain::ExecutionRecord;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::rfc3339;
use crate::state::SharedState;

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 1000;

#[derive(Deserialize)]
pub struct ListQuery {
    block: Option<String>,
    limit: Option<u32>,
}

pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    Path(project): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    // 404 for a project this account does not have, rather than an empty list.
    state.live_deployment(&account.id, &project).await?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let records = state
        .store
        .list_executions(&account.id, &project, query.block.as_deref(), limit)
        .await?;
    let list: Vec<Value> = records.iter().map(|r| record_json(r, false)).collect();
    Ok(Json(json!({ "project": project, "executions": list })))
}

pub async fn show(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    let record = state
        .store
        .execution(&account.id, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no execution `{id}` in this account")))?;
    Ok(Json(record_json(&record, true)))
}

/// An execution as the API shows it; payloads parsed back to JSON when they were stored
/// whole, kept as text when cut.
fn record_json(record: &ExecutionRecord, full: bool) -> Value {
    let payload = |text: &str, truncated: bool| {
        if truncated {
            Value::String(text.to_string())
        } else {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
        }
    };
    let mut value = json!({
        "execution_id": record.id,
        "project": record.project,
        "deployment": record.deployment,
        "block": record.block,
        "instance_id": record.instance_id,
        "cold": record.cold,
        "started_at": rfc3339(record.started_at_ms),
        "duration_ms": record.duration_ms,
        "init_ms": record.init_ms,
        "status": record.status,
        "error": record.error,
    });
    if full {
        value["input"] = payload(&record.input, record.input_truncated);
        value["input_truncated"] = json!(record.input_truncated);
        value["output"] = record
            .output
            .as_deref()
            .map_or(Value::Null, |o| payload(o, record.output_truncated));
        value["output_truncated"] = json!(record.output_truncated);
        value["logs"] = json!(record.logs);
        value["logs_truncated"] = json!(record.logs_truncated);
    }
    value
}
