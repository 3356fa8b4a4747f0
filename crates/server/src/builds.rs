//! The dependency step of a deploy: for every block whose directory declares dependencies
//! (`requirements.txt`, `package.json`), find the account's layer of that key or build it in
//! a sandbox (`refinery-deps`), streaming the package manager's output to the client when it
//! asked for it (`Accept: application/x-ndjson`), and set the block's `deps_layer`. A failed
//! build fails the deploy (422 `build_failed`, the package manager's own message) before
//! anything is stored, so the live deployment stays as it was.

use std::sync::Arc;
use std::time::Instant;

use refinery_deps::{Builder, DepsError};
use refinery_domain::BlockSpec;
use refinery_store::layers::LayerRecord;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;

use crate::error::ApiError;
use crate::state::AppState;

/// Where a deploy's progress goes (the ndjson stream), if the client asked for it.
pub type Progress = Option<UnboundedSender<Value>>;

fn send(progress: &Progress, event: Value) {
    if let Some(tx) = progress {
        // A client that went away stops reading; the deploy goes on.
        let _ = tx.send(event);
    }
}

/// Builds (or finds) the layers of `blocks` for `account_id`, setting each block's
/// `deps_layer`; returns the `builds` of the deploy's answer.
pub async fn build_layers(
    state: &AppState,
    account: &refinery_store::Account,
    blocks: &mut [BlockSpec],
    progress: &Progress,
) -> Result<Vec<Value>, ApiError> {
    let account_id = account.id.as_str();
    let mut builds = Vec::new();
    for block in blocks.iter_mut() {
        let declared = refinery_deps::declared(block).map_err(|message| ApiError::BuildFailed {
            message,
            block: block.name.clone(),
            log_tail: Vec::new(),
            builds: builds.clone(),
        })?;
        let Some(declared) = declared else {
            continue;
        };
        let Some(builder) = state.builds.clone() else {
            return Err(ApiError::Unprocessable(format!(
                "block `{}` declares dependencies ({}), but this server does not build them",
                block.name, declared.descriptor.manifest
            )));
        };
        let failed = |e: DepsError, builds: &[Value], duration_ms: u64| {
            let mut builds = builds.to_vec();
            builds.push(json!({
                "block": block.name,
                "language": block.language.as_str(),
                "status": "failed",
                "cached": false,
                "duration_ms": duration_ms,
            }));
            if e.is_user_error() {
                ApiError::BuildFailed {
                    message: e.to_string(),
                    block: block.name.clone(),
                    log_tail: e.log_tail().to_vec(),
                    builds,
                }
            } else {
                ApiError::Internal(e.to_string())
            }
        };
        let key = builder
            .key(block, &declared)
            .map_err(|e| failed(e, &builds, 0))?;
        let recorded = state.store.layer(account_id, &key).await?;
        if recorded.is_some() && builder.existing(account_id, &key).is_some() {
            send(
                progress,
                json!({"type": "build", "block": block.name, "status": "cached", "layer": key}),
            );
            builds.push(json!({
                "block": block.name,
                "language": block.language.as_str(),
                "status": "cached",
                "cached": true,
                "duration_ms": 0,
                "layer": key,
                "bytes": recorded.as_ref().map(|r| r.bytes),
                "files": recorded.as_ref().map(|r| r.files),
            }));
            block.deps_layer = Some(key);
            continue;
        }
        send(
            progress,
            json!({"type": "build", "block": block.name, "status": "started", "layer": key,
                   "manager": manager(block)}),
        );
        // A build is one more instance of the account while it runs: within its instance
        // and memory quota (429 otherwise, nothing built), in its cgroup group.
        let _reservation = state.pool.reserve_build(
            account_id,
            &account.name,
            &block.name,
            u64::from(builder.limits().memory_mb),
        )?;
        let started = Instant::now();
        let built = run_build(&builder, account_id, block, &declared, &key, progress).await;
        let built = built.map_err(|e| {
            failed(
                e,
                &builds,
                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            )
        })?;
        let duration_ms = u64::try_from(built.duration.as_millis()).unwrap_or(u64::MAX);
        state
            .store
            .record_layer(
                account_id,
                &LayerRecord {
                    key: key.clone(),
                    language: block.language.as_str().to_string(),
                    bytes: built.bytes,
                    files: built.files,
                    build_ms: duration_ms,
                    memory_mb: built.memory_mb,
                    created_at_ms: 0,
                },
            )
            .await?;
        send(
            progress,
            json!({"type": "build", "block": block.name, "status": "built", "layer": key,
                   "duration_ms": duration_ms}),
        );
        tracing::info!(account = %account_id, block = %block.name, layer = %key, duration_ms, bytes = built.bytes, "dependency layer built");
        builds.push(json!({
            "block": block.name,
            "language": block.language.as_str(),
            "status": "built",
            "cached": false,
            "duration_ms": duration_ms,
            "layer": key,
            "bytes": built.bytes,
            "files": built.files,
            "memory_mb": built.memory_mb,
            "mb_ms": u64::from(built.memory_mb) * duration_ms,
        }));
        block.deps_layer = Some(key);
    }
    Ok(builds)
}

fn manager(block: &BlockSpec) -> &'static str {
    match block.language {
        refinery_domain::Language::Python => "pip",
        _ => "npm",
    }
}

/// One build on a blocking thread, its output lines sent as `log` events.
async fn run_build(
    builder: &Arc<Builder>,
    account_id: &str,
    block: &BlockSpec,
    declared: &refinery_deps::Declared,
    key: &str,
    progress: &Progress,
) -> Result<refinery_deps::Built, DepsError> {
    let builder = builder.clone();
    let (account_id, block_spec, declared, key, progress) = (
        account_id.to_string(),
        block.clone(),
        declared.clone(),
        key.to_string(),
        progress.clone(),
    );
    let name = block_spec.name.clone();
    tokio::task::spawn_blocking(move || {
        builder.build(&account_id, &block_spec, &declared, &key, |line| {
            send(
                &progress,
                json!({"type": "log", "block": block_spec.name, "line": line}),
            );
        })
    })
    .await
    .unwrap_or_else(|e| {
        Err(DepsError::Host {
            block: name,
            what: format!("the build task failed: {e}"),
        })
    })
}
