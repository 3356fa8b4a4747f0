//! Projects, their numbered deployments, and the blocks of each deployment.
//!
//! A project belongs to one account and is named uniquely within it. A deployment is an
//! immutable snapshot (manifest text plus fully resolved blocks) numbered 1, 2, 3...
//! within its project; exactly one deployment per project is live. Rolling back is
//! [`Store::set_live`] on an older number; a deployment is never rewritten.
//!
//! What deployments hold is bounded: [`Store::deploy`] keeps the last
//! [`Retention::keep`] deployments of the project (pruning older ones, never the live one)
//! and refuses a deployment that would take the account over its storage quota;
//! [`Store::delete_project`] removes a project with all its deployments. Each deployment's
//! size is recorded in `deployment_storage` (see `storage.rs`), kept after removal for the
//! bill.

use std::collections::HashMap;
use std::sync::Arc;

use refinery_domain::{BlockSpec, SharedDir};
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, SqliteConnection};

use crate::{is_foreign_key_violation, is_unique_violation, now_ms, parse_stored, stored_u32};
use crate::{Store, StoreError};

/// How many times a deploy is retried when a concurrent deploy took its number. With
/// SQLite's `BEGIN IMMEDIATE` deploys are serialised and this never triggers; it keeps
/// the contract for backends whose transactions are not.
const DEPLOY_ATTEMPTS: u32 = 5;

/// One deployment, with its blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// Global row id, unique across all projects and accounts (instances are keyed on it).
    pub id: i64,
    pub account_id: String,
    pub project: String,
    /// 1, 2, 3... within the project.
    pub number: i64,
    /// Creation time, milliseconds since the Unix epoch (UTC).
    pub created_at_ms: i64,
    /// Whether this is the project's live deployment.
    pub live: bool,
    /// The `refinery.toml` text as deployed.
    pub manifest: String,
    /// The blocks, in manifest order.
    pub blocks: Vec<BlockSpec>,
}

/// A deployment as listed: no manifest or code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentSummary {
    pub id: i64,
    pub number: i64,
    pub created_at_ms: i64,
    pub live: bool,
    /// Block names, in manifest order.
    pub blocks: Vec<String>,
}

/// A project as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, FromRow)]
pub struct ProjectSummary {
    pub name: String,
    /// Number of the live deployment.
    pub live_deployment: Option<i64>,
    pub created_at_ms: i64,
}

#[derive(FromRow)]
struct DeploymentRow {
    id: i64,
    account_id: String,
    project: String,
    number: i64,
    created_at_ms: i64,
    live: bool,
    manifest: String,
}

#[derive(FromRow)]
struct BlockRow {
    name: String,
    language: String,
    source_name: String,
    code: String,
    memory_mb: i64,
    timeout_s: i64,
    max_concurrency: i64,
    keep_alive_s: Option<i64>,
    min_warm: i64,
    tmp_mb: i64,
    env_json: String,
    network: bool,
    function: String,
    secret_env_json: String,
    shared_json: String,
}

impl BlockRow {
    /// The block, and the names of the shared directories it lists (attached by the
    /// caller, which loads the deployment's shared files).
    fn into_spec(self) -> Result<(BlockSpec, Vec<String>), StoreError> {
        let shared: Vec<String> = serde_json::from_str(&self.shared_json).map_err(|e| {
            StoreError::Corrupt(format!(
                "shared directories of block `{}` are not a JSON array of strings: {e}",
                self.name
            ))
        })?;
        let env = serde_json::from_str(&self.env_json).map_err(|e| {
            StoreError::Corrupt(format!(
                "env of block `{}` is not a JSON object of strings: {e}",
                self.name
            ))
        })?;
        let secret_env = serde_json::from_str(&self.secret_env_json).map_err(|e| {
            StoreError::Corrupt(format!(
                "secret variables of block `{}` are not a JSON object of strings: {e}",
                self.name
            ))
        })?;
        let spec = BlockSpec {
            files: Default::default(),
            binary_files: Default::default(),
            shared: Vec::new(),
            function: self.function,
            secret_env,
            language: parse_stored("block language", &self.language)?,
            memory_mb: stored_u32("memory_mb", self.memory_mb)?,
            timeout_s: stored_u32("timeout_s", self.timeout_s)?,
            max_concurrency: stored_u32("max_concurrency", self.max_concurrency)?,
            keep_alive_s: self
                .keep_alive_s
                .map(|v| stored_u32("keep_alive_s", v))
                .transpose()?,
            min_warm: stored_u32("min_warm", self.min_warm)?,
            tmp_mb: stored_u32("tmp_mb", self.tmp_mb)?,
            env,
            network: self.network,
            deps_layer: None,
            name: self.name,
            source_name: self.source_name,
            code: self.code,
        };
        Ok((spec, shared))
    }
}

#[derive(FromRow)]
pub(crate) struct ProjectRow {
    pub(crate) id: i64,
    live_deployment_id: Option<i64>,
}

/// Which deployment of a project to load.
#[derive(Clone, Copy)]
enum Which {
    Live,
    Number(i64),
}

/// How much a deploy may keep: the project's last `keep` deployments, and the account's
/// storage quota in bytes ([`crate::storage`] says what counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Deployments kept per project, the new one included (at least 1).
    pub keep: usize,
    /// The account's storage quota, bytes.
    pub storage_limit_bytes: u64,
}

impl Retention {
    /// Keeps everything (for tools and tests that need no limits).
    pub const UNLIMITED: Retention = Retention {
        keep: usize::MAX,
        storage_limit_bytes: u64::MAX,
    };
}

/// A deployment just made, and the ids of the deployments its retention pruned (their
/// instances and code dirs are the caller's to remove).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployed {
    pub deployment: Deployment,
    pub pruned: Vec<i64>,
}

impl Store {
    /// Records a new deployment of `project` (creating the project on its first deploy)
    /// and makes it live, all in one transaction, keeping everything (no retention, no
    /// storage quota): see [`Store::deploy`].
    pub async fn create_deployment(
        &self,
        account_id: &str,
        project: &str,
        manifest_toml: &str,
        blocks: &[BlockSpec],
    ) -> Result<Deployment, StoreError> {
        self.deploy(
            account_id,
            project,
            manifest_toml,
            blocks,
            Retention::UNLIMITED,
        )
        .await
        .map(|d| d.deployment)
    }

    /// Records a new deployment of `project` (creating the project on its first deploy),
    /// makes it live, and prunes the project's deployments beyond the last
    /// `retention.keep` (the new one, which is live, counts among them), all in one
    /// transaction.
    ///
    /// Fails with [`StoreError::StorageQuota`], storing nothing, if the account's
    /// deployments would then hold more than `retention.storage_limit_bytes`.
    ///
    /// The number is one more than the project's highest so far (1 for the first);
    /// concurrent deploys of one project always get distinct numbers.
    pub async fn deploy(
        &self,
        account_id: &str,
        project: &str,
        manifest_toml: &str,
        blocks: &[BlockSpec],
        retention: Retention,
    ) -> Result<Deployed, StoreError> {
        for attempt in 1..=DEPLOY_ATTEMPTS {
            match self
                .try_create_deployment(account_id, project, manifest_toml, blocks, retention)
                .await
            {
                Err(StoreError::DeployContention(_)) => {
                    tracing::debug!(project, attempt, "deployment number taken; retrying");
                }
                other => return other,
            }
        }
        Err(StoreError::DeployContention(project.to_string()))
    }

    async fn try_create_deployment(
        &self,
        account_id: &str,
        project: &str,
        manifest_toml: &str,
        blocks: &[BlockSpec],
        retention: Retention,
    ) -> Result<Deployed, StoreError> {
        let what = || format!("deploying project `{project}`");
        // IMMEDIATE takes the write lock up front, so the number read below cannot be
        // taken by another writer before this transaction commits.
        let mut tx = self.begin_write(what()).await?;
        let now = now_ms();

        sqlx::query(
            "INSERT INTO projects (account_id, name, created_at_ms) VALUES (?, ?, ?) \
             ON CONFLICT (account_id, name) DO NOTHING",
        )
        .bind(account_id)
        .bind(project)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_foreign_key_violation(&e) {
                StoreError::AccountNotFound(account_id.to_string())
            } else {
                StoreError::db(format!("creating project `{project}`"))(e)
            }
        })?;

        let project_row = find_project(&mut tx, account_id, project).await?;

        let (number,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(MAX(number), 0) + 1 FROM deployments WHERE project_id = ?",
        )
        .bind(project_row.id)
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::db(format!(
            "numbering new deployment of `{project}`"
        )))?;

        let size = crate::storage::Footprint::of(manifest_toml, blocks);
        let pruned = crate::storage::check_and_choose_pruned(
            &mut tx,
            account_id,
            project_row.id,
            size,
            retention,
        )
        .await?;
        let id = crate::storage::next_deployment_id(&mut tx).await?;

        sqlx::query(
            "INSERT INTO deployments (id, project_id, number, manifest, created_at_ms) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(project_row.id)
        .bind(number)
        .bind(manifest_toml)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::DeployContention(project.to_string())
            } else {
                StoreError::db(format!("inserting deployment {number} of `{project}`"))(e)
            }
        })?;

        for (position, block) in blocks.iter().enumerate() {
            insert_block(&mut tx, id, position, block, project, number).await?;
        }
        for dir in crate::storage::shared_dirs(blocks) {
            for (path, contents) in &dir.files {
                sqlx::query(
                    "INSERT INTO shared_files (deployment_id, name, path, contents) \
                     VALUES (?, ?, ?, ?)",
                )
                .bind(id)
                .bind(&dir.name)
                .bind(path)
                .bind(contents)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(format!(
                    "storing shared file `{}/{path}` of deployment {number} of `{project}`",
                    dir.name
                )))?;
            }
        }

        sqlx::query("UPDATE projects SET live_deployment_id = ? WHERE id = ? AND account_id = ?")
            .bind(id)
            .bind(project_row.id)
            .bind(account_id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(format!(
                "making deployment {number} of `{project}` live"
            )))?;

        crate::storage::record(&mut tx, id, account_id, project, number, size, now).await?;
        crate::storage::remove(&mut tx, &pruned, now, crate::storage::Removal::Pruned).await?;

        tx.commit().await.map_err(StoreError::db(what()))?;
        Ok(Deployed {
            deployment: Deployment {
                id,
                account_id: account_id.to_string(),
                project: project.to_string(),
                number,
                created_at_ms: now,
                live: true,
                manifest: manifest_toml.to_string(),
                blocks: blocks.to_vec(),
            },
            pruned,
        })
    }

    /// The live deployment of the account's `project`, with its blocks; `None` if the
    /// account has no such project.
    pub async fn live_deployment(
        &self,
        account_id: &str,
        project: &str,
    ) -> Result<Option<Deployment>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(StoreError::db(format!(
            "reading live deployment of `{project}`"
        )))?;
        load_deployment(&mut conn, account_id, project, Which::Live).await
    }

    /// Deployment `number` of the account's `project`, with its blocks; `None` if the
    /// account has no such project or the project no such deployment.
    pub async fn deployment(
        &self,
        account_id: &str,
        project: &str,
        number: i64,
    ) -> Result<Option<Deployment>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(StoreError::db(format!(
            "reading deployment {number} of `{project}`"
        )))?;
        load_deployment(&mut conn, account_id, project, Which::Number(number)).await
    }

    /// The deployments of the account's `project`, oldest (number 1) first.
    ///
    /// Fails with [`StoreError::ProjectNotFound`] if the account has no such project.
    pub async fn list_deployments(
        &self,
        account_id: &str,
        project: &str,
    ) -> Result<Vec<DeploymentSummary>, StoreError> {
        let what = || format!("listing deployments of `{project}`");
        let mut conn = self.pool.acquire().await.map_err(StoreError::db(what()))?;
        let project_row = find_project(&mut conn, account_id, project).await?;

        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT id, number, created_at_ms FROM deployments \
             WHERE project_id = ? ORDER BY number",
        )
        .bind(project_row.id)
        .fetch_all(&mut *conn)
        .await
        .map_err(StoreError::db(what()))?;

        let names: Vec<(i64, String)> = sqlx::query_as(
            "SELECT b.deployment_id, b.name FROM blocks b \
             JOIN deployments d ON d.id = b.deployment_id \
             WHERE d.project_id = ? ORDER BY b.deployment_id, b.position",
        )
        .bind(project_row.id)
        .fetch_all(&mut *conn)
        .await
        .map_err(StoreError::db(what()))?;
        let mut by_deployment: HashMap<i64, Vec<String>> = HashMap::new();
        for (deployment_id, name) in names {
            by_deployment.entry(deployment_id).or_default().push(name);
        }

        Ok(rows
            .into_iter()
            .map(|(id, number, created_at_ms)| DeploymentSummary {
                id,
                number,
                created_at_ms,
                live: project_row.live_deployment_id == Some(id),
                blocks: by_deployment.remove(&id).unwrap_or_default(),
            })
            .collect())
    }

    /// Makes deployment `number` of the account's `project` live (deploy or roll back)
    /// and returns it.
    ///
    /// Fails with [`StoreError::ProjectNotFound`] or [`StoreError::DeploymentNotFound`].
    pub async fn set_live(
        &self,
        account_id: &str,
        project: &str,
        number: i64,
    ) -> Result<Deployment, StoreError> {
        let what = || format!("making deployment {number} of `{project}` live");
        let mut tx = self.begin_write(what()).await?;
        let project_row = find_project(&mut tx, account_id, project).await?;
        let deployment_id: Option<(i64,)> =
            sqlx::query_as("SELECT id FROM deployments WHERE project_id = ? AND number = ?")
                .bind(project_row.id)
                .bind(number)
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::db(what()))?;
        let Some((deployment_id,)) = deployment_id else {
            if crate::storage::was_pruned(&mut tx, account_id, project, number).await? {
                return Err(StoreError::DeploymentPruned {
                    project: project.to_string(),
                    number,
                });
            }
            return Err(StoreError::DeploymentNotFound {
                project: project.to_string(),
                number,
            });
        };
        sqlx::query("UPDATE projects SET live_deployment_id = ? WHERE id = ? AND account_id = ?")
            .bind(deployment_id)
            .bind(project_row.id)
            .bind(account_id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(what()))?;
        let deployment = load_deployment(&mut tx, account_id, project, Which::Number(number))
            .await?
            .ok_or_else(|| StoreError::DeploymentNotFound {
                project: project.to_string(),
                number,
            })?;
        tx.commit().await.map_err(StoreError::db(what()))?;
        Ok(deployment)
    }

    /// The account's projects, by name.
    pub async fn list_projects(&self, account_id: &str) -> Result<Vec<ProjectSummary>, StoreError> {
        sqlx::query_as::<_, ProjectSummary>(
            "SELECT p.name, d.number AS live_deployment, p.created_at_ms \
             FROM projects p LEFT JOIN deployments d ON d.id = p.live_deployment_id \
             WHERE p.account_id = ? ORDER BY p.name",
        )
        .bind(account_id)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db(format!(
            "listing projects of account {account_id}"
        )))
    }
}

/// The account's `project`; fails with [`StoreError::ProjectNotFound`] if it has none.
pub(crate) async fn find_project(
    conn: &mut SqliteConnection,
    account_id: &str,
    project: &str,
) -> Result<ProjectRow, StoreError> {
    sqlx::query_as::<_, ProjectRow>(
        "SELECT id, live_deployment_id FROM projects WHERE account_id = ? AND name = ?",
    )
    .bind(account_id)
    .bind(project)
    .fetch_optional(conn)
    .await
    .map_err(StoreError::db(format!("looking up project `{project}`")))?
    .ok_or_else(|| StoreError::ProjectNotFound(project.to_string()))
}

async fn insert_block(
    conn: &mut SqliteConnection,
    deployment_id: i64,
    position: usize,
    block: &BlockSpec,
    project: &str,
    number: i64,
) -> Result<(), StoreError> {
    let what = || {
        format!(
            "storing block `{}` of deployment {number} of `{project}`",
            block.name
        )
    };
    let env_json = serde_json::to_string(&block.env)
        .map_err(|e| StoreError::Corrupt(format!("{}: {e}", what())))?;
    let secret_env_json = serde_json::to_string(&block.secret_env)
        .map_err(|e| StoreError::Corrupt(format!("{}: {e}", what())))?;
    let shared_names: Vec<&str> = block.shared.iter().map(|d| d.name.as_str()).collect();
    let shared_json = serde_json::to_string(&shared_names)
        .map_err(|e| StoreError::Corrupt(format!("{}: {e}", what())))?;
    let position = i64::try_from(position)
        .map_err(|_| StoreError::Corrupt(format!("{}: too many blocks", what())))?;
    sqlx::query(
        "INSERT INTO blocks (deployment_id, position, name, language, source_name, code, \
         memory_mb, timeout_s, max_concurrency, keep_alive_s, tmp_mb, env_json, min_warm, network, \
         function, secret_env_json, shared_json) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(deployment_id)
    .bind(position)
    .bind(&block.name)
    .bind(block.language.as_str())
    .bind(&block.source_name)
    .bind(&block.code)
    .bind(i64::from(block.memory_mb))
    .bind(i64::from(block.timeout_s))
    .bind(i64::from(block.max_concurrency))
    .bind(block.keep_alive_s.map(i64::from))
    .bind(i64::from(block.tmp_mb))
    .bind(env_json)
    .bind(i64::from(block.min_warm))
    .bind(block.network)
    .bind(&block.function)
    .bind(secret_env_json)
    .bind(shared_json)
    .execute(&mut *conn)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::db(format!("{} (two blocks share this name)", what()))(e)
        } else {
            StoreError::db(what())(e)
        }
    })?;
    for (path, contents) in &block.files {
        sqlx::query(
            "INSERT INTO block_files (deployment_id, position, path, contents) VALUES (?, ?, ?, ?)",
        )
        .bind(deployment_id)
        .bind(position)
        .bind(path)
        .bind(contents)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::db(format!("{} (file `{path}`)", what())))?;
    }
    for (path, contents) in &block.binary_files {
        sqlx::query(
            "INSERT INTO block_binary_files (deployment_id, position, path, contents) \
             VALUES (?, ?, ?, ?)",
        )
        .bind(deployment_id)
        .bind(position)
        .bind(path)
        .bind(contents)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::db(format!("{} (file `{path}`)", what())))?;
    }
    if let Some(key) = &block.deps_layer {
        sqlx::query(
            "INSERT INTO block_layers (deployment_id, position, layer_key) VALUES (?, ?, ?)",
        )
        .bind(deployment_id)
        .bind(position)
        .bind(key)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::db(format!("{} (its dependency layer)", what())))?;
    }
    Ok(())
}

/// The shared directories of deployment `deployment_id`, by name.
async fn load_shared(
    conn: &mut SqliteConnection,
    deployment_id: i64,
    what: &str,
) -> Result<HashMap<String, Arc<SharedDir>>, StoreError> {
    let rows: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT name, path, contents FROM shared_files WHERE deployment_id = ? ORDER BY name, path",
    )
    .bind(deployment_id)
    .fetch_all(conn)
    .await
    .map_err(StoreError::db(format!("{what} (its shared files)")))?;
    let mut dirs: HashMap<String, SharedDir> = HashMap::new();
    for (name, path, contents) in rows {
        dirs.entry(name.clone())
            .or_insert_with(|| SharedDir {
                name,
                files: Default::default(),
            })
            .files
            .insert(path, contents);
    }
    Ok(dirs
        .into_iter()
        .map(|(name, dir)| (name, Arc::new(dir)))
        .collect())
}

async fn load_deployment(
    conn: &mut SqliteConnection,
    account_id: &str,
    project: &str,
    which: Which,
) -> Result<Option<Deployment>, StoreError> {
    const SELECT: &str = "SELECT d.id, p.account_id, p.name AS project, d.number, \
        d.created_at_ms, CASE WHEN p.live_deployment_id = d.id THEN TRUE ELSE FALSE END AS live, \
        d.manifest \
        FROM deployments d JOIN projects p ON p.id = d.project_id \
        WHERE p.account_id = ? AND p.name = ?";
    let (sql, what) = match which {
        Which::Live => (
            format!("{SELECT} AND d.id = p.live_deployment_id"),
            format!("reading live deployment of `{project}`"),
        ),
        Which::Number(n) => (
            format!("{SELECT} AND d.number = ?"),
            format!("reading deployment {n} of `{project}`"),
        ),
    };
    let mut query = sqlx::query_as::<_, DeploymentRow>(&sql)
        .bind(account_id)
        .bind(project);
    if let Which::Number(n) = which {
        query = query.bind(n);
    }
    let Some(row) = query
        .fetch_optional(&mut *conn)
        .await
        .map_err(StoreError::db(what.clone()))?
    else {
        return Ok(None);
    };

    let blocks = sqlx::query_as::<_, BlockRow>(
        "SELECT name, language, source_name, code, memory_mb, timeout_s, max_concurrency, \
         keep_alive_s, min_warm, tmp_mb, env_json, network, function, secret_env_json, \
         shared_json FROM blocks WHERE deployment_id = ? ORDER BY position",
    )
    .bind(row.id)
    .fetch_all(&mut *conn)
    .await
    .map_err(StoreError::db(what.clone()))?
    .into_iter()
    .map(BlockRow::into_spec)
    .collect::<Result<Vec<_>, _>>()?;
    let shared = load_shared(&mut *conn, row.id, &what).await?;
    let mut blocks = blocks
        .into_iter()
        .map(|(mut block, names)| {
            for name in names {
                let dir = shared.get(&name).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "block `{}` of deployment {} lists the shared directory `{name}`, which it has no files of",
                        block.name, row.number
                    ))
                })?;
                block.shared.push(dir.clone());
            }
            Ok(block)
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let files: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT position, path, contents FROM block_files WHERE deployment_id = ? \
         ORDER BY position, path",
    )
    .bind(row.id)
    .fetch_all(&mut *conn)
    .await
    .map_err(StoreError::db(what.clone()))?;
    let binary: Vec<(i64, String, Vec<u8>)> = sqlx::query_as(
        "SELECT position, path, contents FROM block_binary_files WHERE deployment_id = ? \
         ORDER BY position, path",
    )
    .bind(row.id)
    .fetch_all(&mut *conn)
    .await
    .map_err(StoreError::db(what))?;
    for (position, path, contents) in binary {
        let block = usize::try_from(position)
            .ok()
            .and_then(|p| blocks.get_mut(p))
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "file `{path}` of deployment {} belongs to block position {position}, which it does not have",
                    row.number
                ))
            })?;
        block.binary_files.insert(path, contents);
    }
    for (position, path, contents) in files {
        let block = usize::try_from(position)
            .ok()
            .and_then(|p| blocks.get_mut(p))
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "file `{path}` of deployment {} belongs to block position {position}, which it does not have",
                    row.number
                ))
            })?;
        block.files.insert(path, contents);
    }
    let layers: Vec<(i64, String)> = sqlx::query_as(
        "SELECT position, layer_key FROM block_layers WHERE deployment_id = ? ORDER BY position",
    )
    .bind(row.id)
    .fetch_all(&mut *conn)
    .await
    .map_err(StoreError::db(format!(
        "reading the dependency layers of deployment {}",
        row.number
    )))?;
    for (position, key) in layers {
        if let Some(block) = usize::try_from(position)
            .ok()
            .and_then(|p| blocks.get_mut(p))
        {
            block.deps_layer = Some(key);
        }
    }

    Ok(Some(Deployment {
        id: row.id,
        account_id: row.account_id,
        project: row.project,
        number: row.number,
        created_at_ms: row.created_at_ms,
        live: row.live,
        manifest: row.manifest,
        blocks,
    }))
}
