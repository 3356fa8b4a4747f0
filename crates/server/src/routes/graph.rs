//! `GET /v1/projects/{p}/graph[?deployment=N]`: a deployment's manifest as a graph, for the
//! console: every node (blocks with their settings and code, triggers, responses) and every
//! transition as an edge. Read-only; environment values are never returned (only their
//! names), since they commonly hold secrets.

use axum::extract::{Path, Query, State};
use axum::Json;
use refinery_domain::{Manifest, NodeKind};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::rfc3339;
use crate::state::{project_not_found, SharedState};

/// What the console shows instead of an environment value.
pub const MASK: &str = "••••••";

#[derive(Deserialize)]
pub struct GraphQuery {
    deployment: Option<i64>,
}

pub async fn graph(
    State(state): State<SharedState>,
    caller: Caller,
    Path(project): Path<String>,
    Query(query): Query<GraphQuery>,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    let deployment = match query.deployment {
        Some(number) => state
            .store
            .deployment(&account.id, &project, number)
            .await?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "project `{project}` has no deployment {number}; list them with \
                     GET /v1/projects/{project}/deployments"
                ))
            })?,
        None => state
            .store
            .live_deployment(&account.id, &project)
            .await?
            .ok_or_else(|| project_not_found(&project))?,
    };
    // Valid when it was deployed; the blocks' code (directory sources and shared
    // directories included) is stored with them and read from `deployment.blocks`, so the
    // sources are not resolved again.
    let resolve = refinery_domain::source::Deployed;
    let manifest =
        Manifest::parse(&deployment.manifest, "refinery.toml", &resolve).map_err(|e| {
            ApiError::Internal(format!(
                "deployment {} of `{project}` no longer parses ({e}); deploy the project again",
                deployment.number
            ))
        })?;
    let nodes: Vec<Value> = manifest
        .nodes()
        .into_iter()
        .map(|(name, kind)| node_json(&manifest, &deployment.blocks, &name, kind))
        .collect();
    let edges: Vec<Value> = manifest
        .transitions
        .iter()
        .map(|t| {
            json!({
                "id": t.id,
                "from": t.from,
                "to": t.to,
                "type": t.kind.as_str(),
                "expression": t.expression.as_ref().map(|e| e.source()),
            })
        })
        .collect();
    Ok(Json(json!({
        "project": project,
        "deployment": deployment.number,
        "live": deployment.live,
        "created_at": rfc3339(deployment.created_at_ms),
        "log_level": manifest.log_level.as_str(),
        "nodes": nodes,
        "edges": edges,
    })))
}

fn node_json(
    manifest: &Manifest,
    blocks: &[refinery_domain::BlockSpec],
    name: &str,
    kind: NodeKind,
) -> Value {
    let mut node = json!({ "name": name, "kind": kind.as_str() });
    match kind {
        NodeKind::Block => {
            if let Some(b) = blocks.iter().find(|b| b.name == name) {
                let env: serde_json::Map<String, Value> = b
                    .env
                    .keys()
                    .map(|k| (k.clone(), Value::String(MASK.into())))
                    .collect();
                node["settings"] = json!({
                    "language": b.language.as_str(),
                    "memory_mb": b.memory_mb,
                    "timeout_s": b.timeout_s,
                    "max_concurrency": b.max_concurrency,
                    "keep_alive_s": b.keep_alive_s,
                    "min_warm": b.min_warm,
                    "tmp_mb": b.tmp_mb,
                    "network": b.network,
                    "retry": manifest.retry.get(name).map(|r| json!({
                        "attempts": r.attempts,
                        "interval_s": r.interval_s,
                        "backoff": r.backoff,
                    })),
                });
                node["source_name"] = json!(b.source_name);
                node["code"] = json!(b.code);
                node["env"] = Value::Object(env);
            }
        }
        NodeKind::Endpoint => {
            if let Some(e) = manifest.endpoints.iter().find(|e| e.name == name) {
                node["settings"] = json!({
                    "method": e.method.as_str(),
                    "path": e.path.as_str(),
                    "auth": e.auth.as_str(),
                    "timeout_s": e.timeout_s,
                    "cors": e.cors.as_ref().map(|c| json!({
                        "allow_origins": c.allow_origins,
                        "allow_headers": c.allow_headers,
                        "max_age_s": c.max_age_s,
                    })),
                });
            }
        }
        NodeKind::Timer => {
            if let Some(t) = manifest.timers.iter().find(|t| t.name == name) {
                node["settings"] = json!({ "schedule": t.schedule.as_str(), "input": t.input });
            }
        }
        NodeKind::Queue => {
            if let Some(q) = manifest.queue(name) {
                node["settings"] = json!({
                    "batch_size": q.batch_size,
                    "visibility_timeout_s": q.visibility_timeout_s,
                    "max_receive_count": q.max_receive_count,
                });
            }
        }
        NodeKind::Response | NodeKind::Topic => {
            node["settings"] = json!({});
        }
    }
    node
}
