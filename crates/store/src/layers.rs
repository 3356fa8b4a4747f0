//! Dependency layers: which layers an account has built (the files live under the data
//! dir, see the `refinery-deps` crate), and which layer each block of a deployment mounts
//! (written with the deployment, in `deployments.rs`). Every query is scoped by account.

use crate::{now_ms, Store, StoreError};

/// A layer an account has built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRecord {
    pub key: String,
    pub language: String,
    pub bytes: u64,
    pub files: u64,
    pub build_ms: u64,
    /// The memory limit the build ran under: with `build_ms`, its metered usage
    /// (`memory_mb × build_ms`, as an invocation's).
    pub memory_mb: u32,
    pub created_at_ms: i64,
}

impl Store {
    /// Records a layer `account_id` built (once per key: a second record of one key keeps
    /// the first).
    pub async fn record_layer(
        &self,
        account_id: &str,
        layer: &LayerRecord,
    ) -> Result<(), StoreError> {
        let what = || format!("recording dependency layer {}", layer.key);
        let mut tx = self.begin_write(what()).await?;
        sqlx::query(
            "INSERT INTO dependency_layers (account_id, key, language, bytes, files, build_ms, \
             memory_mb, created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (account_id, key) DO NOTHING",
        )
        .bind(account_id)
        .bind(&layer.key)
        .bind(&layer.language)
        .bind(i64::try_from(layer.bytes).unwrap_or(i64::MAX))
        .bind(i64::try_from(layer.files).unwrap_or(i64::MAX))
        .bind(i64::try_from(layer.build_ms).unwrap_or(i64::MAX))
        .bind(i64::from(layer.memory_mb))
        .bind(if layer.created_at_ms > 0 {
            layer.created_at_ms
        } else {
            now_ms()
        })
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(what()))?;
        tx.commit().await.map_err(StoreError::db(what()))?;
        Ok(())
    }

    /// The account's layer `key`, if it built one.
    pub async fn layer(
        &self,
        account_id: &str,
        key: &str,
    ) -> Result<Option<LayerRecord>, StoreError> {
        let row: Option<(String, String, i64, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT key, language, bytes, files, build_ms, memory_mb, created_at_ms \
             FROM dependency_layers \
             WHERE account_id = ? AND key = ?",
        )
        .bind(account_id)
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::db(format!("reading dependency layer {key}")))?;
        Ok(row.map(
            |(key, language, bytes, files, build_ms, memory_mb, created_at_ms)| LayerRecord {
                key,
                language,
                bytes: u64::try_from(bytes).unwrap_or(0),
                files: u64::try_from(files).unwrap_or(0),
                build_ms: u64::try_from(build_ms).unwrap_or(0),
                memory_mb: u32::try_from(memory_mb).unwrap_or(0),
                created_at_ms,
            },
        ))
    }
}
