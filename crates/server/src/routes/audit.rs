//! `GET /v1/audit`: the security audit trail (syscalls the sandbox refused), newest first.
//! An account sees only its own instances' events; the operator sees every event,
//! including those no instance could be found for, optionally of one `?account=`.

use axum::extract::{Query, State};
use axum::Json;
use refinery_store::MAX_AUDIT_LIST;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::rfc3339;
use crate::state::SharedState;

const DEFAULT_LIMIT: u32 = 100;

#[derive(Deserialize)]
pub struct AuditQuery {
    account: Option<String>,
    limit: Option<u32>,
}

pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    Query(query): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query
        .limit
        .unwrap_or(DEFAULT_LIMIT)
        .clamp(1, MAX_AUDIT_LIST);
    let (account, operator) = match &caller {
        Caller::Operator => (query.account.clone(), true),
        Caller::Account(own) => {
            if query.account.as_ref().is_some_and(|a| *a != own.id) {
                return Err(ApiError::Forbidden(
                    "an account sees only its own audit trail: leave out `account` (it is for the operator)"
                        .into(),
                ));
            }
            (Some(own.id.clone()), false)
        }
    };
    let events = state
        .store
        .list_security_events(account.as_deref(), limit)
        .await?;
    let list: Vec<Value> = events
        .iter()
        .map(|e| {
            let mut v = json!({
                "at": rfc3339(e.at_ms), "at_ms": e.at_ms, "project": e.project,
                "block": e.block, "instance_id": e.instance, "syscall": e.syscall,
                "comm": e.comm, "action": e.action,
            });
            if operator {
                // Host details, as in `GET /v1/instances`.
                v["account_id"] = json!(e.account_id);
                v["uid"] = json!(e.uid);
            }
            v
        })
        .collect();
    Ok(Json(json!({
        "watching": crate::audit::watching(),
        "events": list,
    })))
}
