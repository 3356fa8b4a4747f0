//! A project's secrets (BRIEF §7c): named values that blocks read as environment
//! variables (`env = { TOKEN = { secret = "api-token" } }`), so a manifest can be committed
//! without them.
//!
//! Sealed at rest with ChaCha20-Poly1305 under one 32-byte key kept in
//! `<data_dir>/secrets.key` (mode 0600, created at the first start, written and synced
//! before the store opens). Each value has its own random nonce; the account, project and
//! name are the associated data, so a sealed value copied to another row does not open.
//! The store hands a value out only to [`Store::secret_values`] (for the pool starting an
//! instance); listing returns names and times only.
//!
//! Secrets are keyed by the project's name within the account, not by the project row: they
//! can be set before the project's first deploy, and a deploy naming one that is not set is
//! refused. Deleting the project deletes them.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::{now_ms, Store, StoreError};

/// File name of the secrets key inside the data directory.
pub const SECRET_KEY_FILE: &str = "secrets.key";

/// Largest value of one secret (an environment variable; a block's variables together are
/// bounded by the sandbox too).
pub const MAX_SECRET_BYTES: usize = refinery_domain::limits::MAX_ENV_BYTES;

/// Most secrets per project.
pub const MAX_SECRETS_PER_PROJECT: usize = 100;

const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 12;

/// The key that seals secrets. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub(crate) struct SecretKey(Zeroizing<[u8; KEY_BYTES]>);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// Reads `data_dir/secrets.key`, creating it (32 random bytes, 0600, synced, its
    /// directory synced) if it does not exist. A key readable by others is made 0600.
    pub(crate) fn load_or_create(data_dir: &Path) -> Result<SecretKey, StoreError> {
        let path = data_dir.join(SECRET_KEY_FILE);
        let fail = |message: String| StoreError::SecretKey {
            path: path.clone(),
            message,
        };
        match fs::symlink_metadata(&path) {
            Ok(meta) => {
                if !meta.is_file() {
                    return Err(fail("it is not a regular file".into()));
                }
                if meta.permissions().mode() & 0o077 != 0 {
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                        .map_err(|e| fail(format!("cannot make it 0600: {e}")))?;
                    tracing::warn!(path = %path.display(), "the secrets key was readable by others; made it 0600");
                }
                let bytes = Zeroizing::new(fs::read(&path).map_err(|e| fail(e.to_string()))?);
                let key: [u8; KEY_BYTES] = bytes.as_slice().try_into().map_err(|_| {
                    fail(format!(
                        "it holds {} bytes, not {KEY_BYTES}: it is damaged",
                        bytes.len()
                    ))
                })?;
                Ok(SecretKey(Zeroizing::new(key)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = Zeroizing::new([0u8; KEY_BYTES]);
                rand::rngs::OsRng.fill_bytes(key.as_mut_slice());
                write_new_key(data_dir, &path, key.as_slice()).map_err(|e| fail(e.to_string()))?;
                tracing::info!(path = %path.display(), "secrets key created");
                Ok(SecretKey(key))
            }
            Err(e) => Err(fail(e.to_string())),
        }
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(Key::from_slice(self.0.as_slice()))
    }
}

/// Writes the key to a temporary sibling (0600 from its creation), syncs it, renames it into
/// place and syncs the directory: a crash leaves either no key or the whole key.
fn write_new_key(data_dir: &Path, path: &PathBuf, key: &[u8]) -> std::io::Result<()> {
    let staging = data_dir.join(format!(".{SECRET_KEY_FILE}.{}", std::process::id()));
    let _ = fs::remove_file(&staging);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)?;
    file.write_all(key)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&staging, path)?;
    fs::File::open(data_dir)?.sync_all()
}

/// The associated data binding a sealed value to its row.
fn associated(account_id: &str, project: &str, name: &str) -> Vec<u8> {
    format!("refinery-secret\0{account_id}\0{project}\0{name}").into_bytes()
}

/// One secret as listed: never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretSummary {
    pub name: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl Store {
    /// Sets secret `name` of the account's `project` to `value` (sealed), creating or
    /// replacing it; true if it was created. The caller checks the name and the value.
    pub async fn set_secret(
        &self,
        account_id: &str,
        project: &str,
        name: &str,
        value: &str,
    ) -> Result<bool, StoreError> {
        let what = || format!("setting secret `{name}` of project `{project}`");
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = associated(account_id, project, name);
        let sealed = self
            .secret_key
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| StoreError::Corrupt(format!("{}: sealing failed", what())))?;
        let now = now_ms();
        let mut tx = self.begin_write(what()).await?;
        let (count,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM secrets WHERE account_id = ? AND project = ? AND name != ?",
        )
        .bind(account_id)
        .bind(project)
        .bind(name)
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::db(what()))?;
        if usize::try_from(count).unwrap_or(usize::MAX) >= MAX_SECRETS_PER_PROJECT {
            return Err(StoreError::TooManySecrets {
                project: project.to_string(),
                limit: MAX_SECRETS_PER_PROJECT,
            });
        }
        let existed: Option<(i64,)> = sqlx::query_as(
            "SELECT created_at_ms FROM secrets WHERE account_id = ? AND project = ? AND name = ?",
        )
        .bind(account_id)
        .bind(project)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::db(what()))?;
        sqlx::query(
            "INSERT INTO secrets (account_id, project, name, nonce, ciphertext, created_at_ms, \
             updated_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (account_id, project, name) DO UPDATE SET nonce = excluded.nonce, \
             ciphertext = excluded.ciphertext, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(account_id)
        .bind(project)
        .bind(name)
        .bind(nonce.as_slice())
        .bind(sealed)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if crate::is_foreign_key_violation(&e) {
                StoreError::AccountNotFound(account_id.to_string())
            } else {
                StoreError::db(what())(e)
            }
        })?;
        tx.commit().await.map_err(StoreError::db(what()))?;
        Ok(existed.is_none())
    }

    /// The names of the account's `project`'s secrets, by name. Fails with
    /// [`StoreError::ProjectNotFound`] when the account has neither a project nor secrets
    /// of that name.
    pub async fn list_secrets(
        &self,
        account_id: &str,
        project: &str,
    ) -> Result<Vec<SecretSummary>, StoreError> {
        let what = || format!("listing secrets of project `{project}`");
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT name, created_at_ms, updated_at_ms FROM secrets \
             WHERE account_id = ? AND project = ? ORDER BY name",
        )
        .bind(account_id)
        .bind(project)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db(what()))?;
        if rows.is_empty() {
            let mut conn = self.pool.acquire().await.map_err(StoreError::db(what()))?;
            crate::deployments::find_project(&mut conn, account_id, project).await?;
        }
        Ok(rows
            .into_iter()
            .map(|(name, created_at_ms, updated_at_ms)| SecretSummary {
                name,
                created_at_ms,
                updated_at_ms,
            })
            .collect())
    }

    /// Deletes secret `name` of the account's `project`. Fails with
    /// [`StoreError::SecretNotFound`] if there is none.
    pub async fn delete_secret(
        &self,
        account_id: &str,
        project: &str,
        name: &str,
    ) -> Result<(), StoreError> {
        let done =
            sqlx::query("DELETE FROM secrets WHERE account_id = ? AND project = ? AND name = ?")
                .bind(account_id)
                .bind(project)
                .bind(name)
                .execute(&self.pool)
                .await
                .map_err(StoreError::db(format!(
                    "deleting secret `{name}` of project `{project}`"
                )))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::SecretNotFound {
                project: project.to_string(),
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// Of `names`, those the account's `project` has no secret for (for a deploy to refuse).
    pub async fn missing_secrets(
        &self,
        account_id: &str,
        project: &str,
        names: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let have: Vec<String> = self
            .list_secrets(account_id, project)
            .await
            .or_else(|e| match e {
                StoreError::ProjectNotFound(_) => Ok(Vec::new()),
                e => Err(e),
            })?
            .into_iter()
            .map(|s| s.name)
            .collect();
        Ok(names
            .iter()
            .filter(|n| !have.contains(n))
            .cloned()
            .collect())
    }

    /// The values of those of `names` the account's `project` has, opened: for starting an
    /// instance whose block reads them, and nothing else.
    pub async fn secret_values(
        &self,
        account_id: &str,
        project: &str,
        names: &[String],
    ) -> Result<HashMap<String, String>, StoreError> {
        let what = || format!("reading secrets of project `{project}`");
        let rows: Vec<(String, Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT name, nonce, ciphertext FROM secrets WHERE account_id = ? AND project = ?",
        )
        .bind(account_id)
        .bind(project)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db(what()))?;
        let cipher = self.secret_key.cipher();
        let mut values = HashMap::new();
        for (name, nonce, sealed) in rows.into_iter().filter(|(n, _, _)| names.contains(n)) {
            let corrupt = || {
                StoreError::Corrupt(format!(
                    "secret `{name}` of project `{project}` does not open with the key in {}/{SECRET_KEY_FILE} (a different or damaged key, or a damaged row): set it again with `refinery secrets set {project} {name}`",
                    self.path.parent().map_or_else(|| ".".into(), |p| p.display().to_string())
                ))
            };
            if nonce.len() != NONCE_BYTES {
                return Err(corrupt());
            }
            let aad = associated(account_id, project, &name);
            let opened = Zeroizing::new(
                cipher
                    .decrypt(
                        Nonce::from_slice(&nonce),
                        Payload {
                            msg: &sealed,
                            aad: &aad,
                        },
                    )
                    .map_err(|_| corrupt())?,
            );
            let value = String::from_utf8(opened.to_vec()).map_err(|_| corrupt())?;
            values.insert(name, value);
        }
        Ok(values)
    }
}
