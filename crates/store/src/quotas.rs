//! Per-account quota overrides. The limits themselves and their defaults are the pool's
//! policy (`refinery_pool::Quota`); the store only remembers what the operator set for
//! each account, `None` meaning "the default".

use serde::{Deserialize, Serialize};
use sqlx::FromRow;

use crate::{is_foreign_key_violation, now_ms, Store, StoreError};

/// What the operator set for one account; `None` = the server's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct QuotaOverrides {
    pub instances: Option<u32>,
    pub memory_mb: Option<u64>,
    pub rate: Option<f64>,
    pub burst: Option<u32>,
    pub storage_mb: Option<u64>,
}

impl QuotaOverrides {
    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        *self == QuotaOverrides::default()
    }
}

#[derive(FromRow)]
struct QuotaRow {
    account_id: String,
    instances: Option<i64>,
    memory_mb: Option<i64>,
    rate: Option<f64>,
    burst: Option<i64>,
    storage_mb: Option<i64>,
}

impl QuotaRow {
    fn into_overrides(self) -> Result<(String, QuotaOverrides), StoreError> {
        let corrupt = |what: &str, v: i64| {
            StoreError::Corrupt(format!(
                "quota {what} = {v} of account {} is out of range",
                self.account_id
            ))
        };
        let overrides = QuotaOverrides {
            instances: self
                .instances
                .map(|v| u32::try_from(v).map_err(|_| corrupt("instances", v)))
                .transpose()?,
            memory_mb: self
                .memory_mb
                .map(|v| u64::try_from(v).map_err(|_| corrupt("memory_mb", v)))
                .transpose()?,
            rate: self.rate,
            burst: self
                .burst
                .map(|v| u32::try_from(v).map_err(|_| corrupt("burst", v)))
                .transpose()?,
            storage_mb: self
                .storage_mb
                .map(|v| u64::try_from(v).map_err(|_| corrupt("storage_mb", v)))
                .transpose()?,
        };
        Ok((self.account_id, overrides))
    }
}

impl Store {
    /// Replaces account `account_id`'s overrides (all of them; an all-`None` value
    /// removes its row). Fails with [`StoreError::AccountNotFound`] for an unknown account.
    pub async fn set_quota(
        &self,
        account_id: &str,
        overrides: &QuotaOverrides,
    ) -> Result<(), StoreError> {
        let operation = || format!("setting the quota of account {account_id}");
        if overrides.is_empty() {
            sqlx::query("DELETE FROM quotas WHERE account_id = ?")
                .bind(account_id)
                .execute(&self.pool)
                .await
                .map_err(StoreError::db(operation()))?;
            return match self.account(account_id).await? {
                Some(_) => Ok(()),
                None => Err(StoreError::AccountNotFound(account_id.to_string())),
            };
        }
        let memory_mb = overrides
            .memory_mb
            .map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        sqlx::query(
            "INSERT INTO quotas (account_id, instances, memory_mb, rate, burst, storage_mb, \
             updated_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (account_id) DO UPDATE SET instances = excluded.instances, \
             memory_mb = excluded.memory_mb, rate = excluded.rate, burst = excluded.burst, \
             storage_mb = excluded.storage_mb, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(account_id)
        .bind(overrides.instances.map(i64::from))
        .bind(memory_mb)
        .bind(overrides.rate)
        .bind(overrides.burst.map(i64::from))
        .bind(
            overrides
                .storage_mb
                .map(|v| i64::try_from(v).unwrap_or(i64::MAX)),
        )
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_foreign_key_violation(&e) {
                StoreError::AccountNotFound(account_id.to_string())
            } else {
                StoreError::db(operation())(e)
            }
        })?;
        Ok(())
    }

    /// Account `account_id`'s overrides (all `None` when it has none).
    pub async fn quota(&self, account_id: &str) -> Result<QuotaOverrides, StoreError> {
        let row = sqlx::query_as::<_, QuotaRow>(
            "SELECT account_id, instances, memory_mb, rate, burst, storage_mb FROM quotas WHERE account_id = ?",
        )
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::db(format!(
            "reading the quota of account {account_id}"
        )))?;
        match row {
            Some(row) => Ok(row.into_overrides()?.1),
            None => Ok(QuotaOverrides::default()),
        }
    }

    /// Every account with overrides, with them. For the server's start: not scoped to a
    /// tenant.
    pub async fn list_quotas(&self) -> Result<Vec<(String, QuotaOverrides)>, StoreError> {
        sqlx::query_as::<_, QuotaRow>(
            "SELECT account_id, instances, memory_mb, rate, burst, storage_mb FROM quotas ORDER BY account_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db("listing quotas"))?
        .into_iter()
        .map(QuotaRow::into_overrides)
        .collect()
    }
}
