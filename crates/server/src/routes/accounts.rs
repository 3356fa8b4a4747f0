//! `/v1/accounts`: the operator creates and lists customer accounts.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use refinery_domain::names::{is_valid_name, NAME_RULE};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::keys;
use crate::routes::rfc3339;
use crate::state::SharedState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    name: String,
}

/// Creates an account and returns its API key: the only time the key is ever shown.
pub async fn create(
    State(state): State<SharedState>,
    caller: Caller,
    body: Result<Json<CreateAccount>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require_operator()?;
    let Json(request) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "{}; expected {{\"name\": \"acme\"}}",
            e.body_text()
        ))
    })?;
    if !is_valid_name(&request.name) {
        return Err(ApiError::BadRequest(format!(
            "invalid account name `{}`: expected {NAME_RULE}",
            request.name
        )));
    }
    let key = keys::generate_key();
    let account = state
        .store
        .create_account(
            &request.name,
            &keys::hash_key(&key),
            &keys::display_prefix(&key),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": account.id,
            "name": account.name,
            "api_key": key,
            "created_at": rfc3339(account.created_at_ms),
        })),
    ))
}

pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require_operator()?;
    let accounts = state.store.list_accounts().await?;
    let list: Vec<Value> = accounts
        .into_iter()
        .map(|a| json!({ "id": a.id, "name": a.name, "created_at": rfc3339(a.created_at_ms) }))
        .collect();
    Ok(Json(json!({ "accounts": list })))
}
