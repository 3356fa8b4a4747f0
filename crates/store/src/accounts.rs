//! Accounts (tenants), whether the operator disabled them, and their API keys (created,
//! added, rotated). Keys are stored only as SHA-256 hex hashes.

use serde::{Deserialize, Serialize};
use sqlx::FromRow;

use crate::{is_unique_violation, now_ms, Store, StoreError};

/// One tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, FromRow)]
pub struct Account {
    /// `acct_` followed by 16 lowercase hex characters; URL- and path-safe.
    pub id: String,
    pub name: String,
    /// Creation time, milliseconds since the Unix epoch (UTC).
    pub created_at_ms: i64,
    /// When the operator disabled the account (`None`: active). A disabled account's keys
    /// are refused and none of its code runs.
    #[serde(default)]
    pub disabled_at_ms: Option<i64>,
}

impl Account {
    pub fn is_disabled(&self) -> bool {
        self.disabled_at_ms.is_some()
    }
}

/// The columns of [`Account`], for every query that reads one.
pub(crate) const ACCOUNT_COLUMNS: &str = "id, name, created_at_ms, disabled_at_ms";

/// A new account id: `acct_` + 16 random lowercase hex characters (64 bits).
fn new_account_id() -> String {
    format!("acct_{:016x}", rand::random::<u64>())
}

impl Store {
    /// Creates account `name` with one API key, given as the key's SHA-256 hex
    /// (`key_hash`) and a short display prefix (never the key itself).
    ///
    /// Fails with [`StoreError::AccountExists`] if the name is taken and
    /// [`StoreError::KeyExists`] if the key hash is already registered; in both cases
    /// nothing is written.
    pub async fn create_account(
        &self,
        name: &str,
        key_hash: &str,
        key_prefix: &str,
    ) -> Result<Account, StoreError> {
        let account = Account {
            id: new_account_id(),
            name: name.to_string(),
            created_at_ms: now_ms(),
            disabled_at_ms: None,
        };
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::db(format!("creating account `{name}`")))?;
        sqlx::query("INSERT INTO accounts (id, name, created_at_ms) VALUES (?, ?, ?)")
            .bind(&account.id)
            .bind(&account.name)
            .bind(account.created_at_ms)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::AccountExists(name.to_string())
                } else {
                    StoreError::db(format!("inserting account `{name}`"))(e)
                }
            })?;
        insert_key(
            &mut tx,
            &account.id,
            key_hash,
            key_prefix,
            account.created_at_ms,
        )
        .await?;
        tx.commit()
            .await
            .map_err(StoreError::db(format!("committing new account `{name}`")))?;
        Ok(account)
    }

    /// Registers another API key for an existing account (e.g. to rotate keys).
    pub async fn add_api_key(
        &self,
        account_id: &str,
        key_hash: &str,
        key_prefix: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(StoreError::db(format!(
            "adding API key to account {account_id}"
        )))?;
        insert_key(&mut conn, account_id, key_hash, key_prefix, now_ms()).await
    }

    /// Every account, oldest first. For operators only: not scoped to a tenant.
    pub async fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        sqlx::query_as::<_, Account>(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY created_at_ms, name"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db("listing accounts"))
    }

    /// The account owning the API key whose SHA-256 hex is `key_hash`, if any.
    pub async fn account_by_key_hash(&self, key_hash: &str) -> Result<Option<Account>, StoreError> {
        sqlx::query_as::<_, Account>(
            "SELECT a.id, a.name, a.created_at_ms, a.disabled_at_ms \
             FROM api_keys k JOIN accounts a ON a.id = k.account_id \
             WHERE k.key_hash = ?",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::db("looking up account by API key hash"))
    }

    /// The account named `name`, if any (names are unique). For operators and the CLI,
    /// which let an account be named by name or id.
    pub async fn account_by_name(&self, name: &str) -> Result<Option<Account>, StoreError> {
        sqlx::query_as::<_, Account>(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name = ?"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::db(format!("reading account `{name}`")))
    }

    /// The account with this id, if any.
    pub async fn account(&self, account_id: &str) -> Result<Option<Account>, StoreError> {
        sqlx::query_as::<_, Account>(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?"
        ))
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::db(format!("reading account {account_id}")))
    }
}

impl Store {
    /// Disables (`true`) or enables the account: stored, so it survives restarts.
    /// Disabling an already disabled account keeps its first `disabled_at_ms`. Returns the
    /// account as it is now; [`StoreError::AccountNotFound`] if there is none.
    pub async fn set_account_disabled(
        &self,
        account_id: &str,
        disabled: bool,
    ) -> Result<Account, StoreError> {
        let what = || {
            format!(
                "{} account {account_id}",
                if disabled { "disabling" } else { "enabling" }
            )
        };
        let at = disabled.then(now_ms);
        sqlx::query_as::<_, Account>(&format!(
            "UPDATE accounts SET disabled_at_ms = CASE WHEN ? IS NULL THEN NULL \
             ELSE COALESCE(disabled_at_ms, ?) END WHERE id = ? RETURNING {ACCOUNT_COLUMNS}"
        ))
        .bind(at)
        .bind(at)
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::db(what()))?
        .ok_or_else(|| StoreError::AccountNotFound(account_id.to_string()))
    }

    /// Replaces every API key of the account with one new key (its SHA-256 hex and display
    /// prefix), in one transaction: from its commit on, only the new key works.
    pub async fn rotate_api_key(
        &self,
        account_id: &str,
        key_hash: &str,
        key_prefix: &str,
    ) -> Result<(), StoreError> {
        let what = || format!("rotating the API key of account {account_id}");
        let mut tx = self.pool.begin().await.map_err(StoreError::db(what()))?;
        sqlx::query("DELETE FROM api_keys WHERE account_id = ?")
            .bind(account_id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(what()))?;
        insert_key(&mut tx, account_id, key_hash, key_prefix, now_ms()).await?;
        tx.commit().await.map_err(StoreError::db(what()))
    }
}

async fn insert_key(
    conn: &mut sqlx::SqliteConnection,
    account_id: &str,
    key_hash: &str,
    key_prefix: &str,
    created_at_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO api_keys (key_hash, account_id, key_prefix, created_at_ms) \
         VALUES (?, ?, ?, ?)",
    )
    .bind(key_hash)
    .bind(account_id)
    .bind(key_prefix)
    .bind(created_at_ms)
    .execute(conn)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::KeyExists
        } else if crate::is_foreign_key_violation(&e) {
            StoreError::AccountNotFound(account_id.to_string())
        } else {
            StoreError::db(format!("inserting API key for account {account_id}"))(e)
        }
    })?;
    Ok(())
}
