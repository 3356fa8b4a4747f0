//! Deploying projects, listing them and their deployments, and rolling back.

use std::collections::BTreeMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use refinery_domain::Manifest;
use refinery_pool::BlockTarget;
use refinery_store::Deployment;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::disk::Refused;
use crate::error::ApiError;
use crate::routes::rfc3339;
use crate::state::SharedState;

/// A deploy request: the manifest text and the files its blocks reference.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    manifest: String,
    /// Name shown in manifest errors (the client's path to the file).
    #[serde(default)]
    manifest_path: Option<String>,
    /// `source = "..."` path → file contents.
    #[serde(default)]
    files: BTreeMap<String, String>,
}

pub async fn deploy(
    State(state): State<SharedState>,
    caller: Caller,
    body: Result<Json<DeployRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let account = caller.account()?;
    let Json(request) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "{}; expected {{\"manifest\": \"<refinery.toml text>\", \"files\": {{\"path\": \"contents\"}}}}",
            e.body_text()
        ))
    })?;
    let manifest_path = request.manifest_path.as_deref().unwrap_or("refinery.toml");
    let files = &request.files;
    let resolve = |path: &str| {
        files
            .get(path)
            .cloned()
            .ok_or_else(|| "the file was not uploaded with the manifest".to_string())
    };
    let manifest = Manifest::parse(&request.manifest, manifest_path, &resolve)?;
    check_min_warm_fits(&state, account, &manifest)?;
    state.disk.admit(Refused::Deploy)?;
    if let Some(block) = manifest.blocks.iter().find(|b| b.network) {
        if !state.pool.network_enabled() {
            return Err(ApiError::Unprocessable(format!(
                "block `{}` sets `network = true`, but this server has no outbound network \
                 support: the operator must install Debian's `passt` and `nftables` packages and \
                 restart `refinery serve` (or remove `network = true`)",
                block.name
            )));
        }
    }

    let deployment = state
        .store
        .create_deployment(
            &account.id,
            &manifest.name,
            &request.manifest,
            &manifest.blocks,
        )
        .await
        .map_err(|e| state.disk.store_error(e, Refused::Deploy))?;
    state.invalidate_live(&account.id, &manifest.name);
    retire_all_but_live(&state, &account.id, &manifest.name).await?;
    provision(&state, account, &deployment).await;
    tracing::info!(account = %account.id, project = %deployment.project, deployment = deployment.number, "deployed");
    Ok((StatusCode::CREATED, Json(deployment_json(&deployment))))
}

/// Stops keeping warm every deployment of the project but the live one. All of them, not
/// just "the previous one": two deploys racing would each retire only what they saw.
async fn retire_all_but_live(
    state: &SharedState,
    account_id: &str,
    project: &str,
) -> Result<(), ApiError> {
    let replaced: Vec<i64> = state
        .store
        .list_deployments(account_id, project)
        .await?
        .into_iter()
        .filter(|d| !d.live)
        .map(|d| d.id)
        .collect();
    state.pool.retire_deployments(&replaced).await;
    Ok(())
}

/// Provisioned concurrency counts against the account's quota: a deployment whose
/// `min_warm` instances alone exceed the account's instance or memory quota is refused.
fn check_min_warm_fits(
    state: &SharedState,
    account: &refinery_store::Account,
    manifest: &Manifest,
) -> Result<(), ApiError> {
    let quota = state.pool.account_usage(&account.id).quota;
    let instances: u64 = manifest.blocks.iter().map(|b| u64::from(b.min_warm)).sum();
    let memory_mb: u64 = manifest
        .blocks
        .iter()
        .map(|b| u64::from(b.min_warm) * u64::from(b.memory_mb))
        .sum();
    if instances > u64::from(quota.instances) || memory_mb > quota.memory_mb {
        return Err(ApiError::BadRequest(format!(
            "the blocks' min_warm keep {instances} instances ({memory_mb} MB) warm, more than account {}'s quota of {} instances and {} MB; lower min_warm in refinery.toml or ask the operator to raise the quota (refinery accounts set-quota {} --instances N --memory-mb M)",
            account.name, quota.instances, quota.memory_mb, account.name
        )));
    }
    Ok(())
}

/// Starts the live deployment's provisioned (`min_warm`) instances before its first
/// invocation; the reply comes once they are warm.
async fn provision(
    state: &SharedState,
    account: &refinery_store::Account,
    deployment: &Deployment,
) {
    let targets: Vec<BlockTarget> = deployment
        .blocks
        .iter()
        .filter(|b| b.min_warm > 0)
        .map(|block| BlockTarget {
            account_id: account.id.clone(),
            account_name: account.name.clone(),
            project: deployment.project.clone(),
            deployment_id: deployment.id,
            deployment_number: deployment.number,
            block: block.clone(),
        })
        .collect();
    if !targets.is_empty() {
        state.pool.provision(targets).await;
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    deployment: i64,
}

pub async fn rollback(
    State(state): State<SharedState>,
    caller: Caller,
    Path(project): Path<String>,
    body: Result<Json<RollbackRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    let Json(request) = body.map_err(|e| {
        ApiError::BadRequest(format!("{}; expected {{\"deployment\": 2}}", e.body_text()))
    })?;
    let deployment = state
        .store
        .set_live(&account.id, &project, request.deployment)
        .await?;
    state.invalidate_live(&account.id, &project);
    retire_all_but_live(&state, &account.id, &project).await?;
    provision(&state, account, &deployment).await;
    tracing::info!(account = %account.id, project = %project, deployment = deployment.number, "rolled back");
    Ok(Json(deployment_json(&deployment)))
}

pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    Path(project): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    let deployments = state.store.list_deployments(&account.id, &project).await?;
    let list: Vec<Value> = deployments
        .into_iter()
        .map(|d| {
            json!({
                "deployment": d.number,
                "created_at": rfc3339(d.created_at_ms),
                "live": d.live,
                "blocks": d.blocks,
            })
        })
        .collect();
    Ok(Json(json!({ "project": project, "deployments": list })))
}

pub async fn list_projects(
    State(state): State<SharedState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    let projects = state.store.list_projects(&account.id).await?;
    let list: Vec<Value> = projects
        .into_iter()
        .map(|p| {
            json!({
                "project": p.name,
                "live_deployment": p.live_deployment,
                "created_at": rfc3339(p.created_at_ms),
            })
        })
        .collect();
    Ok(Json(json!({ "projects": list })))
}

fn deployment_json(deployment: &Deployment) -> Value {
    let blocks: Vec<Value> = deployment
        .blocks
        .iter()
        .map(|b| {
            json!({
                "name": b.name,
                "language": b.language,
                "memory_mb": b.memory_mb,
                "timeout_s": b.timeout_s,
                "max_concurrency": b.max_concurrency,
                "keep_alive_s": b.keep_alive_s,
                "min_warm": b.min_warm,
                "network": b.network,
            })
        })
        .collect();
    json!({
        "project": deployment.project,
        "deployment": deployment.number,
        "live": deployment.live,
        "created_at": rfc3339(deployment.created_at_ms),
        "blocks": blocks,
    })
}
