//! A project's secrets (BRIEF §7c): `PUT /v1/projects/{p}/secrets/{name}` with
//! `{"value": "..."}` sets one (201 when created, 200 when replaced), `GET
//! /v1/projects/{p}/secrets` lists their names, `DELETE /v1/projects/{p}/secrets/{name}`
//! deletes one. No answer ever holds a value, and no log line names one.
//!
//! Setting or deleting a secret retires the warm instances of the project whose blocks
//! read it (they hold the old value in their environment): the next invocation starts an
//! instance with the new value, and the live deployment's `min_warm` instances are started
//! again. An invocation already running finishes with the value it started with.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use refinery_domain::names::{is_valid_name, NAME_RULE};
use refinery_store::MAX_SECRET_BYTES;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::rfc3339;
use crate::state::SharedState;

/// Largest `PUT` body: a value at its limit, as JSON (escaping may double it).
pub const MAX_SECRET_REQUEST_BYTES: usize = 4 * MAX_SECRET_BYTES;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetSecret {
    value: String,
}

fn check_names(project: &str, name: Option<&str>) -> Result<(), ApiError> {
    if !is_valid_name(project) {
        return Err(ApiError::BadRequest(format!(
            "invalid project name `{}`: expected {NAME_RULE}",
            project.escape_debug()
        )));
    }
    if let Some(name) = name.filter(|n| !is_valid_name(n)) {
        return Err(ApiError::BadRequest(format!(
            "invalid secret name `{}`: expected {NAME_RULE}",
            name.escape_debug()
        )));
    }
    Ok(())
}

pub async fn set(
    State(state): State<SharedState>,
    caller: Caller,
    Path((project, name)): Path<(String, String)>,
    body: Result<Json<SetSecret>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let account = caller.account()?;
    check_names(&project, Some(&name))?;
    // The rejection's text names fields and positions, never the body's contents.
    let Json(request) = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BadRequest(format!(
                "the request body is over {MAX_SECRET_REQUEST_BYTES} bytes: a secret's value is at most {MAX_SECRET_BYTES} bytes"
            ))
        } else {
            ApiError::BadRequest(format!(
                "{}; expected {{\"value\": \"the secret's value\"}}",
                e.body_text()
            ))
        }
    })?;
    let value = request.value;
    if value.len() > MAX_SECRET_BYTES {
        return Err(ApiError::Unprocessable(format!(
            "the value of secret `{name}` is {} bytes; the limit is {MAX_SECRET_BYTES} bytes (it becomes an environment variable): keep large data elsewhere and put a key to it in the secret",
            value.len()
        )));
    }
    if value.contains('\0') {
        return Err(ApiError::Unprocessable(format!(
            "the value of secret `{name}` holds a NUL byte: an environment variable cannot contain one; remove it"
        )));
    }
    let created = state
        .store
        .set_secret(&account.id, &project, &name, &value)
        .await?;
    drop(value);
    refresh_readers(&state, account, &project, &name).await;
    tracing::info!(account = %account.id, %project, secret = %name, created, "secret set");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({ "project": project, "name": name, "created": created })),
    ))
}

pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    Path(project): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    check_names(&project, None)?;
    let secrets = state
        .store
        .list_secrets(&account.id, &project)
        .await
        .map_err(|e| match e {
            refinery_store::StoreError::ProjectNotFound(_) => ApiError::NotFound(format!(
                "project `{project}` not found in this account (no deployment and no secrets): check the name, or set a secret with `refinery secrets set {project} NAME`"
            )),
            e => e.into(),
        })?;
    let list: Vec<Value> = secrets
        .into_iter()
        .map(|s| {
            json!({
                "name": s.name,
                "created_at": rfc3339(s.created_at_ms),
                "updated_at": rfc3339(s.updated_at_ms),
            })
        })
        .collect();
    Ok(Json(json!({ "project": project, "secrets": list })))
}

pub async fn delete(
    State(state): State<SharedState>,
    caller: Caller,
    Path((project, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    check_names(&project, Some(&name))?;
    state
        .store
        .delete_secret(&account.id, &project, &name)
        .await?;
    refresh_readers(&state, account, &project, &name).await;
    tracing::info!(account = %account.id, %project, secret = %name, "secret deleted");
    Ok(Json(
        json!({ "project": project, "name": name, "deleted": true }),
    ))
}

/// Retires the project's instances that read `name` and starts the live deployment's
/// provisioned instances again (with the new value, or failing to start if it was deleted).
async fn refresh_readers(
    state: &SharedState,
    account: &refinery_store::Account,
    project: &str,
    name: &str,
) {
    state
        .pool
        .retire_secret_readers(&account.id, project, name)
        .await;
    match state.store.live_deployment(&account.id, project).await {
        Ok(Some(deployment)) => {
            super::deployments::provision(state, account, &deployment).await;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(account = %account.id, %project, error = %e, "cannot read the live deployment to start its provisioned instances again");
        }
    }
}
