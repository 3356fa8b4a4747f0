//! The security audit trail: syscalls an instance's seccomp filter refused, as read back
//! from the kernel's audit records by the server (`server/src/audit.rs`).
//!
//! Bounded: each account keeps its newest [`MAX_AUDIT_EVENTS_PER_ACCOUNT`] events (and the
//! unattributed ones, `account_id` NULL, the same number); older ones are deleted as new
//! ones arrive, so a block that hammers refused syscalls cannot grow the database.

use serde::{Deserialize, Serialize};
use sqlx::FromRow;

use crate::{Store, StoreError};

/// Events kept per account (and for unattributed events); the oldest go first.
pub const MAX_AUDIT_EVENTS_PER_ACCOUNT: i64 = 1000;

/// Most events one listing returns.
pub const MAX_AUDIT_LIST: u32 = 1000;

/// One refused syscall.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, FromRow)]
pub struct SecurityEvent {
    /// None: the uid belonged to no instance the server knew when the record arrived.
    pub account_id: Option<String>,
    /// When the kernel logged it, milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub project: Option<String>,
    pub block: Option<String>,
    pub instance: Option<String>,
    /// The instance's host uid, as the record names it.
    pub uid: i64,
    /// The syscall's name (`syscall 123` for a number without one).
    pub syscall: String,
    /// The process name the record gives (`comm=`), e.g. `python3`.
    pub comm: String,
    /// What the filter did: `errno EPERM`, `kill`, ...
    pub action: String,
}

impl Store {
    /// Appends `events` in one transaction and trims every account they name back to its
    /// newest [`MAX_AUDIT_EVENTS_PER_ACCOUNT`].
    pub async fn record_security_events(&self, events: &[SecurityEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let operation = "recording security events";
        let mut tx = self.pool.begin().await.map_err(StoreError::db(operation))?;
        for e in events {
            sqlx::query(
                "INSERT INTO security_events \
                 (account_id, at_ms, project, block, instance, uid, syscall, comm, action) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&e.account_id)
            .bind(e.at_ms)
            .bind(&e.project)
            .bind(&e.block)
            .bind(&e.instance)
            .bind(e.uid)
            .bind(&e.syscall)
            .bind(&e.comm)
            .bind(&e.action)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(operation))?;
        }
        let mut accounts: Vec<&Option<String>> = events.iter().map(|e| &e.account_id).collect();
        accounts.sort();
        accounts.dedup();
        for account in accounts {
            // `IS` matches NULL too (PostgreSQL: `IS NOT DISTINCT FROM`).
            sqlx::query(
                "DELETE FROM security_events WHERE account_id IS ? AND id <= \
                 (SELECT id FROM security_events WHERE account_id IS ? \
                  ORDER BY id DESC LIMIT 1 OFFSET ?)",
            )
            .bind(account)
            .bind(account)
            .bind(MAX_AUDIT_EVENTS_PER_ACCOUNT)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("trimming security events"))?;
        }
        tx.commit().await.map_err(StoreError::db(operation))
    }

    /// The newest `limit` events (at most [`MAX_AUDIT_LIST`]), newest first: account
    /// `Some(id)`'s only, or with `None` every account's and the unattributed ones (the
    /// operator's view).
    pub async fn list_security_events(
        &self,
        account_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SecurityEvent>, StoreError> {
        let limit = i64::from(limit.min(MAX_AUDIT_LIST));
        // `?1 IS NULL`: the operator's view, every row.
        let query = sqlx::query_as::<_, SecurityEvent>(
            "SELECT account_id, at_ms, project, block, instance, uid, syscall, comm, action \
             FROM security_events WHERE ?1 IS NULL OR account_id = ?1 \
             ORDER BY id DESC LIMIT ?2",
        )
        .bind(account_id)
        .bind(limit);
        query
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::db("listing security events"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(account: Option<&str>, n: i64) -> SecurityEvent {
        SecurityEvent {
            account_id: account.map(str::to_string),
            at_ms: n,
            project: Some("p".into()),
            block: Some("b".into()),
            instance: Some(format!("i{n}")),
            uid: 100_000 + n,
            syscall: "unshare".into(),
            comm: "python3".into(),
            action: "errno EPERM".into(),
        }
    }

    #[tokio::test]
    async fn scoped_newest_first_and_bounded() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path()).await?;
        let a = store.create_account("a", "hash-a", "pa").await?.id;
        let b = store.create_account("b", "hash-b", "pb").await?.id;
        let many: Vec<_> = (0..MAX_AUDIT_EVENTS_PER_ACCOUNT + 5)
            .map(|n| event(Some(&a), n))
            .collect();
        store.record_security_events(&many).await?;
        store
            .record_security_events(&[event(Some(&b), 1), event(None, 2)])
            .await?;

        let of_a = store.list_security_events(Some(&a), MAX_AUDIT_LIST).await?;
        assert_eq!(of_a.len() as i64, MAX_AUDIT_EVENTS_PER_ACCOUNT);
        assert_eq!(
            of_a[0].at_ms,
            MAX_AUDIT_EVENTS_PER_ACCOUNT + 4,
            "newest first"
        );
        assert!(of_a
            .iter()
            .all(|e| e.account_id.as_deref() == Some(a.as_str())));

        let of_b = store.list_security_events(Some(&b), 10).await?;
        assert_eq!(of_b, vec![event(Some(&b), 1)]);

        let all = store.list_security_events(None, 3).await?;
        assert_eq!(all.len(), 3);
        assert_eq!(
            all[0],
            event(None, 2),
            "the operator sees unattributed events"
        );
        Ok(())
    }
}
