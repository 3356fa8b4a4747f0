//! Deploying projects (within the upload limits, the deploy gate and the storage quota,
//! pruning beyond the deployments kept), listing them and their deployments, rolling
//! back, and deleting projects.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use refinery_domain::{limits, Manifest};
use refinery_pool::BlockTarget;
use refinery_store::{Deployment, Retention, StoreError};
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
    /// Files of directory sources and shared directories that are not UTF-8 text: path →
    /// standard base64 of the bytes (decoded by [`decode_binary_files`]).
    #[serde(default)]
    binary_files: BTreeMap<String, String>,
}

/// The request's `binary_files`, decoded; a value that is not base64 is a 400 naming it.
fn decode_binary_files(request: &DeployRequest) -> Result<BTreeMap<String, Vec<u8>>, ApiError> {
    use base64::Engine as _;
    request
        .binary_files
        .iter()
        .map(|(path, encoded)| {
            if request.files.contains_key(path) {
                return Err(ApiError::BadRequest(format!(
                    "`{path}` is in both `files` and `binary_files`: send each file once (text in `files`, other bytes base64 in `binary_files`)"
                )));
            }
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map(|bytes| (path.clone(), bytes))
                .map_err(|e| {
                    ApiError::BadRequest(format!(
                        "binary_files[`{path}`] is not standard base64 ({e}): encode the file's bytes with base64 (RFC 4648, with padding)"
                    ))
                })
        })
        .collect()
}

/// The deploy route. With `Accept: application/x-ndjson` the answer is a stream of JSON
/// lines once the request is read and checked: `{"type":"build",...}` and
/// `{"type":"log","block":...,"line":...}` while dependency layers build, then one
/// `{"type":"result","status":201,"body":{...}}` (the same answer as without the stream) or
/// `{"type":"error","status":422,"body":{"error":{...}}}`. Otherwise plain JSON.
pub async fn deploy(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let account = caller.account()?.clone();
    // Before a byte of the body is read: the deploy rate, then a turn to receive it.
    let turn = state.deploy_gate.admit(&account.id, &account.name).await?;
    let request = read_deploy_request(&headers, body).await?;
    let binary = decode_binary_files(&request)?;
    check_upload_limits(&request, &binary)?;
    if !wants_ndjson(&headers) {
        let answer = deploy_request(&state, &account, &request, &binary, &None).await;
        drop(turn);
        return answer.map(|(status, json)| (status, Json(json)).into_response());
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    // Its own task: a client that goes away mid-build cannot cancel the deploy half-way.
    tokio::spawn(async move {
        let _turn = turn;
        let progress = Some(tx.clone());
        let last = match deploy_request(&state, &account, &request, &binary, &progress).await {
            Ok((status, body)) => {
                json!({"type": "result", "status": status.as_u16(), "body": body})
            }
            Err(e) => {
                let response = e.into_response();
                let status = response.status().as_u16();
                let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .unwrap_or(Value::Null);
                json!({"type": "error", "status": status, "body": body})
            }
        };
        let _ = tx.send(last);
    });
    let stream = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|event| {
            event.map(|v| {
                let mut line = serde_json::to_vec(&v).unwrap_or_default();
                line.push(b'\n');
                Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(line))
            })
        })
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, NDJSON)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

const NDJSON: &str = "application/x-ndjson";

fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().starts_with(NDJSON)))
}

/// Everything of a deploy after the body is read: parse, check, build dependency layers,
/// store, make live, provision; the answer.
async fn deploy_request(
    state: &SharedState,
    account: &refinery_store::Account,
    request: &DeployRequest,
    binary: &BTreeMap<String, Vec<u8>>,
    progress: &crate::builds::Progress,
) -> Result<(StatusCode, Value), ApiError> {
    let manifest_path = request.manifest_path.as_deref().unwrap_or("refinery.toml");
    let manifest = Manifest::parse(
        &request.manifest,
        manifest_path,
        &refinery_domain::source::UploadedFiles {
            text: &request.files,
            binary,
        },
    )?;
    refuse_missing_secrets(state, account, &manifest).await?;
    check_min_warm_fits(state, account, &manifest)?;
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

    let keep = state.deploy_gate.limits().keep_deployments;
    let storage_mb = state.pool.account_usage(&account.id).quota.storage_mb;
    let retention = Retention {
        keep,
        storage_limit_bytes: storage_mb.saturating_mul(MIB),
    };
    // Dependency layers first: a failed build stores nothing, the live deployment stays.
    let mut blocks = manifest.blocks.clone();
    let builds = crate::builds::build_layers(state, account, &mut blocks, progress).await?;
    let deployed = state
        .store
        .deploy(
            &account.id,
            &manifest.name,
            &request.manifest,
            &blocks,
            retention,
        )
        .await
        .map_err(|e| match e {
            StoreError::StorageQuota { .. } => {
                storage_refusal(e, account, &manifest.name, storage_mb, keep)
            }
            e => state.disk.store_error(e, Refused::Deploy),
        })?;
    let deployment = deployed.deployment;
    state.invalidate_live(&account.id, &manifest.name);
    state.engine.deployments_changed();
    retire_all_but_live(state, &account.id, &manifest.name).await?;
    if !deployed.pruned.is_empty() {
        state.pool.retire_deployments(&deployed.pruned).await;
        state.pool.remove_code(&deployed.pruned).await;
        tracing::info!(account = %account.id, project = %deployment.project, pruned = ?deployed.pruned, "old deployments pruned");
    }
    provision(state, account, &deployment).await;
    tracing::info!(account = %account.id, project = %deployment.project, deployment = deployment.number, "deployed");
    let mut reply = deployment_json(&deployment);
    reply["endpoints"] = manifest
        .endpoints
        .iter()
        .map(|e| {
            json!({
                "name": e.name,
                "method": e.method.as_str(),
                "path": e.path.as_str(),
                "auth": e.auth.as_str(),
                "url_path": format!("/http/{}/{}{}", account.name, manifest.name, e.path.as_str()),
            })
        })
        .collect();
    reply["builds"] = Value::Array(builds);
    Ok((StatusCode::CREATED, reply))
}

const MIB: u64 = 1024 * 1024;

/// Reads and parses a deploy body of at most `MAX_DEPLOY_BODY_BYTES`.
async fn read_deploy_request(headers: &HeaderMap, body: Body) -> Result<DeployRequest, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(size) = declared {
        if size > limits::MAX_DEPLOY_BODY_BYTES as u64 {
            return Err(deploy_body_too_large(Some(size)));
        }
    }
    let bytes = Limited::new(body, limits::MAX_DEPLOY_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                deploy_body_too_large(None)
            } else {
                ApiError::BadRequest(format!("reading the deploy request body: {e}"))
            }
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::BadRequest(format!(
            "invalid deploy request body: {e}; expected {{\"manifest\": \"<refinery.toml text>\", \"files\": {{\"path\": \"contents\"}}}}"
        ))
    })
}

/// The refusal of a deploy body over `MAX_DEPLOY_BODY_BYTES` (`size`: its declared length,
/// if it declared one).
fn deploy_body_too_large(size: Option<u64>) -> ApiError {
    ApiError::UploadTooLarge {
        message: format!(
            "the deploy request body is {}; the limit is {} bytes ({} MiB: a manifest of at most \
             {} bytes and files of at most {} bytes in total, as JSON); deploy less code, or \
             split the project",
            size.map_or("larger than the limit".to_string(), |s| format!(
                "{s} bytes"
            )),
            limits::MAX_DEPLOY_BODY_BYTES,
            limits::MAX_DEPLOY_BODY_BYTES / 1024 / 1024,
            limits::MAX_MANIFEST_BYTES,
            limits::MAX_DEPLOY_FILES_BYTES,
        ),
        limit: "deploy_body_bytes",
        limit_value: limits::MAX_DEPLOY_BODY_BYTES,
        unread: true,
    }
}

/// The upload limits sized for code (`domain/src/limits.rs`), each refusal naming its limit.
fn check_upload_limits(
    request: &DeployRequest,
    binary: &BTreeMap<String, Vec<u8>>,
) -> Result<(), ApiError> {
    let refuse = |message: String, limit: &'static str, limit_value: usize| {
        Err(ApiError::UploadTooLarge {
            message,
            limit,
            limit_value,
            unread: false,
        })
    };
    if request.manifest.len() > limits::MAX_MANIFEST_BYTES {
        return refuse(
            format!(
                "the manifest is {} bytes; the limit is {} bytes (1 MiB): a manifest is \
                 configuration; move large inline `code = \"...\"` into `source = \"...\"` files",
                request.manifest.len(),
                limits::MAX_MANIFEST_BYTES
            ),
            "manifest_bytes",
            limits::MAX_MANIFEST_BYTES,
        );
    }
    let count = request.files.len() + binary.len();
    if count > limits::MAX_DEPLOY_FILES {
        return refuse(
            format!(
                "{count} files were uploaded; the limit is {} files per deploy; upload only the \
                 files the blocks' `source = \"...\"` and the `[[shared]]` directories name",
                limits::MAX_DEPLOY_FILES
            ),
            "files",
            limits::MAX_DEPLOY_FILES,
        );
    }
    let sizes = || {
        request
            .files
            .iter()
            .map(|(p, c)| (p, c.len()))
            .chain(binary.iter().map(|(p, b)| (p, b.len())))
    };
    if let Some((path, len)) = sizes().find(|(_, len)| *len > limits::MAX_SOURCE_BYTES) {
        return refuse(
            format!(
                "file `{path}` is {len} bytes; the limit is {} bytes (5 MiB) per file",
                limits::MAX_SOURCE_BYTES
            ),
            "file_bytes",
            limits::MAX_SOURCE_BYTES,
        );
    }
    let total: usize = sizes().map(|(_, len)| len).sum();
    if total > limits::MAX_DEPLOY_FILES_BYTES {
        return refuse(
            format!(
                "the uploaded files total {total} bytes; the limit is {} bytes (16 MiB) per deploy",
                limits::MAX_DEPLOY_FILES_BYTES
            ),
            "files_bytes",
            limits::MAX_DEPLOY_FILES_BYTES,
        );
    }
    Ok(())
}

/// A storage-quota refusal, worded with the account, its quota and how to free space.
fn storage_refusal(
    error: StoreError,
    account: &refinery_store::Account,
    project: &str,
    storage_mb: u64,
    keep: usize,
) -> ApiError {
    let StoreError::StorageQuota {
        used_bytes,
        needed_bytes,
        freed_bytes,
        limit_bytes,
    } = error
    else {
        return error.into();
    };
    let mb = |b: u64| format!("{:.2} MiB", b as f64 / MIB as f64);
    ApiError::StorageQuota {
        message: format!(
            "deploying `{project}` needs {} of storage (the manifest, the code, and the code \
             laid out for instances), but account {} holds {} of its {storage_mb} MiB storage \
             quota (storage_mb){}; nothing was stored. Free space by deleting a project \
             (`refinery projects delete PROJECT`), or ask the operator to keep fewer deployments \
             per project (`refinery serve --keep-deployments`, now {keep}) or to raise the quota \
             (`refinery accounts set-quota {} --storage-mb MB`)",
            mb(needed_bytes),
            account.name,
            mb(used_bytes),
            if freed_bytes > 0 {
                format!(
                    ", {} of it in deployments this deploy would prune",
                    mb(freed_bytes)
                )
            } else {
                String::new()
            },
            account.name
        ),
        usage_bytes: used_bytes,
        limit_bytes,
        needed_bytes,
    }
}

/// `DELETE /v1/projects/{project}`: the project, its deployments, their stored code and
/// code dirs, and their instances. Executions and usage stay (the bill needs them).
pub async fn delete_project(
    State(state): State<SharedState>,
    caller: Caller,
    Path(project): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    let removed = state
        .store
        .delete_project(&account.id, &project)
        .await
        .map_err(|e| match e {
            StoreError::ProjectNotFound(_) => crate::state::project_not_found(&project),
            other => other.into(),
        })?;
    state.invalidate_live(&account.id, &project);
    state.engine.forget_project(&account.id, &project);
    state.pool.retire_deployments(&removed).await;
    state.pool.remove_code(&removed).await;
    tracing::info!(account = %account.id, %project, deployments = removed.len(), "project deleted");
    Ok(Json(json!({
        "project": project,
        "deleted": true,
        "deployments_deleted": removed.len(),
    })))
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
pub(super) async fn provision(
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
    let keep = state.deploy_gate.limits().keep_deployments;
    let deployment = state
        .store
        .set_live(&account.id, &project, request.deployment)
        .await
        .map_err(|e| match e {
            StoreError::DeploymentPruned { number, .. } => ApiError::Gone(format!(
                "deployment {number} of project `{project}` was pruned: this server keeps the \
                 last {keep} deployments of each project (`refinery serve --keep-deployments`); \
                 roll back to a kept one (`refinery deployments {project}`) or deploy that \
                 version again"
            )),
            other => other.into(),
        })?;
    state.invalidate_live(&account.id, &project);
    state.engine.deployments_changed();
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

/// A deploy whose blocks name a secret the project does not have is refused (422), naming
/// the block, the variable and the secret, and how to set it.
async fn refuse_missing_secrets(
    state: &SharedState,
    account: &refinery_store::Account,
    manifest: &Manifest,
) -> Result<(), ApiError> {
    let mut names: Vec<String> = manifest
        .blocks
        .iter()
        .flat_map(|b| b.secret_env.values().cloned())
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    names.dedup();
    let missing = state
        .store
        .missing_secrets(&account.id, &manifest.name, &names)
        .await?;
    let Some(first) = missing.first() else {
        return Ok(());
    };
    let (block, variable) = manifest
        .blocks
        .iter()
        .find_map(|b| {
            b.secret_env
                .iter()
                .find(|(_, s)| *s == first)
                .map(|(v, _)| (b.name.as_str(), v.as_str()))
        })
        .unwrap_or_default();
    let project = &manifest.name;
    Err(ApiError::Unprocessable(format!(
        "block `{block}` reads secret `{first}` (env {variable}), which project `{project}` does not have{}; nothing was deployed: set it with `refinery secrets set {project} {first}` (the value on stdin), then deploy again",
        if missing.len() > 1 {
            format!(" (nor {})", missing[1..].iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", "))
        } else {
            String::new()
        }
    )))
}
