//! `GET /v1/instances`: what is running. The operator sees every instance with its host
//! pid and cgroups; an account sees only its own, without host details.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::rfc3339;
use crate::state::SharedState;

pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let instances = state.pool.instances();
    let list: Vec<Value> = match &caller {
        Caller::Operator => instances
            .iter()
            .map(|i| {
                let mut v = json!({
                    "id": i.id, "account_id": i.account_id, "project": i.project,
                    "deployment": i.deployment, "block": i.block, "state": i.state,
                    "pid": i.pid, "uid": i.uid, "cgroups": i.cgroups, "invocations": i.invocations,
                });
                v["started_at"] = json!(rfc3339(i.started_at_ms));
                v["last_used_at"] = json!(rfc3339(i.last_used_at_ms));
                v
            })
            .collect(),
        Caller::Account(account) => instances
            .iter()
            .filter(|i| i.account_id == account.id)
            .map(|i| {
                json!({
                    "id": i.id, "project": i.project, "deployment": i.deployment,
                    "block": i.block, "state": i.state, "invocations": i.invocations,
                    "started_at": rfc3339(i.started_at_ms),
                    "last_used_at": rfc3339(i.last_used_at_ms),
                })
            })
            .collect(),
    };
    Ok(Json(json!({ "instances": list })))
}
