//! What each account's deployments hold on disk: the storage quota's usage, retention
//! (which deployments a deploy prunes), project deletion, and the record bills read.
//!
//! A deployment counts `stored_bytes` = its manifest text + its blocks' code (binary files
//! and shared directories included, each shared directory once) as stored +
//! the same code again as laid out for instances under `<data>/code/<deployment id>`
//! (counted from the deploy on, whether laid out yet or not, so a deploy that fits stays
//! within the quota). Bills count `code_bytes` (the code once) as GB-months, up to the
//! deployment's removal. Rows of `deployment_storage` outlive their deployment.

use refinery_domain::{BlockSpec, SharedDir};
use sqlx::SqliteConnection;

use crate::deployments::{find_project, Retention};
use crate::{now_ms, Store, StoreError};

/// The size of one deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// The blocks' code, once (billed).
    pub code_bytes: u64,
    /// What the storage quota counts: manifest + code stored + code laid out.
    pub stored_bytes: u64,
}

impl Footprint {
    /// The footprint of a deployment of `manifest` with `blocks` (their shared directories
    /// counted once each, whichever blocks list them).
    pub fn of(manifest: &str, blocks: &[BlockSpec]) -> Footprint {
        let code_bytes: u64 = blocks.iter().map(|b| b.code_bytes() as u64).sum::<u64>()
            + shared_dirs(blocks).map(|d| d.bytes() as u64).sum::<u64>();
        Footprint {
            code_bytes,
            stored_bytes: manifest.len() as u64 + 2 * code_bytes,
        }
    }
}

/// The shared directories the blocks list, each once (by name), in first-listed order.
pub(crate) fn shared_dirs(blocks: &[BlockSpec]) -> impl Iterator<Item = &SharedDir> {
    let mut seen = std::collections::BTreeSet::new();
    blocks
        .iter()
        .flat_map(|b| b.shared.iter())
        .filter(move |d| seen.insert(d.name.as_str()))
        .map(|d| d.as_ref())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Bytes held by the account's kept deployments.
async fn used_bytes(conn: &mut SqliteConnection, account_id: &str) -> Result<u64, StoreError> {
    let (used,): (i64,) = sqlx::query_as(
        "SELECT COALESCE(SUM(stored_bytes), 0) FROM deployment_storage \
         WHERE account_id = ? AND removed_at_ms IS NULL",
    )
    .bind(account_id)
    .fetch_one(conn)
    .await
    .map_err(StoreError::db(format!(
        "measuring the storage of account {account_id}"
    )))?;
    Ok(to_u64(used))
}

/// Within a deploy's transaction: the deployments of project `project_id` that a new one
/// pushes out of the last `retention.keep`, after checking that the account's storage,
/// less what they free, has room for `size`.
pub(crate) async fn check_and_choose_pruned(
    conn: &mut SqliteConnection,
    account_id: &str,
    project_id: i64,
    size: Footprint,
    retention: Retention,
) -> Result<Vec<i64>, StoreError> {
    // A deployment with a service run still running is not pruned (the run needs its
    // blocks to the end); a later deploy prunes it once its runs have ended.
    let existing: Vec<(i64, i64, bool)> = sqlx::query_as(
        "SELECT d.id, COALESCE(s.stored_bytes, 0), \
         EXISTS (SELECT 1 FROM runs r WHERE r.deployment_id = d.id AND r.status = 'running') \
         FROM deployments d \
         LEFT JOIN deployment_storage s ON s.deployment_id = d.id \
         WHERE d.project_id = ? ORDER BY d.number DESC",
    )
    .bind(project_id)
    .fetch_all(&mut *conn)
    .await
    .map_err(StoreError::db(
        "listing the deployments a deploy would prune",
    ))?;
    let kept_before = retention.keep.max(1) - 1;
    let pruned: Vec<(i64, i64)> = existing
        .into_iter()
        .skip(kept_before)
        .filter(|(_, _, running)| !running)
        .map(|(id, bytes, _)| (id, bytes))
        .collect();
    let freed: u64 = pruned.iter().map(|(_, bytes)| to_u64(*bytes)).sum();
    let used = used_bytes(conn, account_id).await?;
    let after = used.saturating_sub(freed).saturating_add(size.stored_bytes);
    if after > retention.storage_limit_bytes {
        return Err(StoreError::StorageQuota {
            used_bytes: used,
            needed_bytes: size.stored_bytes,
            freed_bytes: freed,
            limit_bytes: retention.storage_limit_bytes,
        });
    }
    Ok(pruned.into_iter().map(|(id, _)| id).collect())
}

/// The id for a new deployment: after every id ever handed out, removed ones included.
pub(crate) async fn next_deployment_id(conn: &mut SqliteConnection) -> Result<i64, StoreError> {
    let (id,): (i64,) = sqlx::query_as(
        "SELECT MAX(COALESCE((SELECT MAX(deployment_id) FROM deployment_storage), 0), \
                    COALESCE((SELECT MAX(id) FROM deployments), 0)) + 1",
    )
    .fetch_one(conn)
    .await
    .map_err(StoreError::db("choosing the id of a new deployment"))?;
    Ok(id)
}

/// Records a new deployment's size.
pub(crate) async fn record(
    conn: &mut SqliteConnection,
    deployment_id: i64,
    account_id: &str,
    project: &str,
    number: i64,
    size: Footprint,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO deployment_storage (deployment_id, account_id, project, number, \
         code_bytes, stored_bytes, created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(deployment_id)
    .bind(account_id)
    .bind(project)
    .bind(number)
    .bind(to_i64(size.code_bytes))
    .bind(to_i64(size.stored_bytes))
    .bind(now)
    .execute(conn)
    .await
    .map_err(StoreError::db(format!(
        "recording the size of deployment {number} of `{project}`"
    )))?;
    Ok(())
}

/// Why a deployment was removed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Removal {
    Pruned,
    Deleted,
}

/// Deletes deployments (their blocks go with them) and marks them removed.
pub(crate) async fn remove(
    conn: &mut SqliteConnection,
    deployment_ids: &[i64],
    now: i64,
    why: Removal,
) -> Result<(), StoreError> {
    let why = match why {
        Removal::Pruned => "pruned",
        Removal::Deleted => "deleted",
    };
    for id in deployment_ids {
        sqlx::query("DELETE FROM deployments WHERE id = ?")
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(StoreError::db(format!("pruning deployment {id}")))?;
        sqlx::query(
            "UPDATE deployment_storage SET removed_at_ms = ?, removed_by = ? \
             WHERE deployment_id = ? AND removed_at_ms IS NULL",
        )
        .bind(now)
        .bind(why)
        .bind(id)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::db(format!(
            "recording the pruning of deployment {id}"
        )))?;
    }
    Ok(())
}

/// Whether deployment `number` of the account's (current) `project` existed and was pruned.
pub(crate) async fn was_pruned(
    conn: &mut SqliteConnection,
    account_id: &str,
    project: &str,
    number: i64,
) -> Result<bool, StoreError> {
    let row: Option<(i64,)> = sqlx::query_as(
        "SELECT s.deployment_id FROM deployment_storage s \
         JOIN projects p ON p.account_id = s.account_id AND p.name = s.project \
         WHERE s.account_id = ? AND s.project = ? AND s.number = ? \
         AND s.removed_by = 'pruned' AND s.created_at_ms >= p.created_at_ms",
    )
    .bind(account_id)
    .bind(project)
    .bind(number)
    .fetch_optional(conn)
    .await
    .map_err(StoreError::db(format!(
        "looking up deployment {number} of `{project}`"
    )))?;
    Ok(row.is_some())
}

impl Store {
    /// Bytes the account's kept deployments hold (what its storage quota counts).
    pub async fn storage_used(&self, account_id: &str) -> Result<u64, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(StoreError::db(format!(
            "measuring the storage of account {account_id}"
        )))?;
        used_bytes(&mut conn, account_id).await
    }

    /// Deletes the account's `project` with every deployment of it, and returns their ids
    /// (their instances and code dirs are the caller's to remove). Executions and usage
    /// stay (they name the project by value); a later deploy of the same name starts a new
    /// project at deployment 1.
    ///
    /// Fails with [`StoreError::ProjectNotFound`] if the account has no such project.
    pub async fn delete_project(
        &self,
        account_id: &str,
        project: &str,
    ) -> Result<Vec<i64>, StoreError> {
        let what = || format!("deleting project `{project}`");
        let mut tx = self.begin_write(what()).await?;
        let project_row = find_project(&mut tx, account_id, project).await?;
        let ids: Vec<(i64,)> = sqlx::query_as("SELECT id FROM deployments WHERE project_id = ?")
            .bind(project_row.id)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::db(what()))?;
        let ids: Vec<i64> = ids.into_iter().map(|(id,)| id).collect();
        sqlx::query("UPDATE projects SET live_deployment_id = NULL WHERE id = ?")
            .bind(project_row.id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(what()))?;
        remove(&mut tx, &ids, now_ms(), Removal::Deleted).await?;
        // Its runs go with it (their steps, by cascade); the engine drops any still running.
        sqlx::query("DELETE FROM runs WHERE account_id = ? AND project = ?")
            .bind(account_id)
            .bind(project)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(what()))?;
        // Its timers too (their fires went with the runs): a new project of that name
        // starts them afresh; its queues' messages; and its secrets: nothing of a deleted
        // project's is kept that could be read back.
        for table in ["timer_slots", "queue_messages", "secrets"] {
            sqlx::query(&format!(
                "DELETE FROM {table} WHERE account_id = ? AND project = ?"
            ))
            .bind(account_id)
            .bind(project)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(what()))?;
        }
        sqlx::query("DELETE FROM projects WHERE id = ? AND account_id = ?")
            .bind(project_row.id)
            .bind(account_id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(what()))?;
        tx.commit().await.map_err(StoreError::db(what()))?;
        Ok(ids)
    }

    /// Ids of every deployment kept, all accounts (for the server's start: code dirs of
    /// any other deployment are left-overs).
    pub async fn kept_deployment_ids(&self) -> Result<Vec<i64>, StoreError> {
        let ids: Vec<(i64,)> = sqlx::query_as("SELECT id FROM deployments ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::db("listing deployments"))?;
        Ok(ids.into_iter().map(|(id,)| id).collect())
    }
}
