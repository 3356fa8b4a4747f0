//! Why an invocation was refused or could not be run and recorded. A block failing is NOT
//! an error here: it is an [`crate::Execution`] with `status: "error"` (or timeout, oom...).
//!
//! The variants carry no driver or transport types (no SQL, no HTTP): each caller maps
//! them to its own answer (the HTTP API: one status and body per variant, see
//! `server/src/error.rs`; the pipeline engine: a throttled step waits and retries).

use std::time::Duration;

use refinery_billing::{Decimal, Period};
use refinery_pool::PoolError;
use refinery_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum InvocationError {
    /// The account has no project of that name, or it has no live deployment.
    #[error("no project `{project}` in this account: deploy it first with `refinery deploy`")]
    ProjectNotFound { project: String },
    /// The project's live deployment has no block of that name.
    #[error("project `{project}` (live deployment {deployment}) has no block `{block}`; its blocks are: {}", blocks.join(", "))]
    BlockNotFound {
        project: String,
        deployment: i64,
        block: String,
        /// The blocks it has, sorted by name.
        blocks: Vec<String>,
    },
    /// The account's usage this month at cost plus markup has reached its spending cap:
    /// refused before anything ran.
    #[error(
        "account `{account}` has reached its spending cap of {cap} {currency} for {period} (usage at cost plus markup: {spent} {currency}); \
         invocations are refused until the cap is raised (`refinery accounts set-billing {account} --spending-cap AMOUNT`) \
         or the month ends"
    )]
    SpendingCapReached {
        /// The account's name.
        account: String,
        cap: Decimal,
        spent: Decimal,
        currency: String,
        period: Period,
    },
    /// The data dir's filesystem is below its reserve, or full: refused before any code
    /// ran, or (the record could not be committed) the result is withheld. The message
    /// comes from the [`crate::DiskReserve`] and says which.
    #[error("{message}")]
    DiskFull { message: String },
    /// Over one of the account's quotas or the block's limits (the pool's refusal):
    /// nothing ran; worth retrying after `retry_after`.
    #[error("{message}")]
    Throttled {
        message: String,
        retry_after: Duration,
        limit: Limit,
    },
    /// The operator disabled the account (named here by its id or name, as the pool
    /// knows it): none of its code runs.
    #[error("account {account} is disabled: none of its code runs; ask the operator to enable it (refinery accounts enable {account})")]
    AccountDisabled { account: String },
    /// The server is stopping (the pool or the store takes no new work).
    #[error("{0}")]
    Unavailable(String),
    /// A secret the block's `env` names is not set (deleted since the deploy).
    #[error("{0}")]
    SecretUnavailable(String),
    /// Anything else: a host or store problem, not the caller's fault.
    #[error("{0}")]
    Internal(String),
}

/// Which limit refused a [`InvocationError::Throttled`] invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The block's `max_concurrency` (every instance busy, none came free in time).
    MaxConcurrency,
    /// The account's concurrent instances.
    Instances,
    /// The account's total instance memory.
    MemoryMb,
    /// The account's invocation rate (token bucket).
    Rate,
    /// The block's cold starts per window.
    ScaleUp,
}

impl Limit {
    /// The name the API reports (`error.limit`).
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::MaxConcurrency => "max_concurrency",
            Limit::Instances => "instances",
            Limit::MemoryMb => "memory_mb",
            Limit::Rate => "rate",
            Limit::ScaleUp => "scale_up",
        }
    }
}

impl From<PoolError> for InvocationError {
    fn from(e: PoolError) -> Self {
        let (limit, retry_after) = match &e {
            PoolError::ConcurrencyLimit { .. } => (Limit::MaxConcurrency, Duration::from_secs(1)),
            // Instances free up as invocations end: worth a retry soon.
            PoolError::InstanceQuota { .. } => (Limit::Instances, Duration::from_secs(1)),
            PoolError::MemoryQuota { .. } => (Limit::MemoryMb, Duration::from_secs(1)),
            // The time until the bucket holds a token again.
            PoolError::RateQuota { retry_after, .. } => (Limit::Rate, *retry_after),
            // The time until the block's scale-up bucket holds a token again.
            PoolError::ScaleUpLimit { retry_after, .. } => (Limit::ScaleUp, *retry_after),
            PoolError::AccountDisabled { account } => {
                return InvocationError::AccountDisabled {
                    account: account.clone(),
                }
            }
            PoolError::ShuttingDown => return InvocationError::Unavailable(e.to_string()),
            PoolError::PrepareCode { .. } | PoolError::StartInstance { .. } => {
                return InvocationError::Internal(e.to_string())
            }
            PoolError::Secret { .. } => return InvocationError::SecretUnavailable(e.to_string()),
        };
        InvocationError::Throttled {
            message: e.to_string(),
            retry_after,
            limit,
        }
    }
}

impl From<StoreError> for InvocationError {
    /// A failed read or write on the invocation path (the live deployment, the spending
    /// cap, the execution record: none of them can be "not found" or a conflict).
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Closed(_) => InvocationError::Unavailable(e.to_string()),
            _ if e.is_disk_full() => InvocationError::DiskFull {
                message: format!(
                    "{e}: the server's data directory is out of disk space and nothing was \
                     written; retry later (the operator must free space on its filesystem)"
                ),
            },
            other => InvocationError::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_refusals_keep_their_limit_and_wait() {
        let e = InvocationError::from(PoolError::RateQuota {
            account: "acme".into(),
            rate: 2.0,
            burst: 4,
            retry_after: Duration::from_millis(1500),
        });
        let InvocationError::Throttled {
            message,
            retry_after,
            limit,
        } = e
        else {
            panic!("expected Throttled, got {e:?}");
        };
        assert_eq!(limit.as_str(), "rate");
        assert_eq!(retry_after, Duration::from_millis(1500));
        assert!(message.contains("rate limit of 2 per second"), "{message}");

        let e = InvocationError::from(PoolError::InstanceQuota {
            account: "acme".into(),
            limit: 3,
        });
        assert!(
            matches!(e, InvocationError::Throttled { limit: Limit::Instances, retry_after, .. } if retry_after == Duration::from_secs(1)),
            "{e:?}"
        );
    }

    #[test]
    fn pool_failures_that_are_not_refusals() {
        let e = InvocationError::from(PoolError::AccountDisabled {
            account: "acme".into(),
        });
        assert!(matches!(&e, InvocationError::AccountDisabled { account } if account == "acme"));
        let e = InvocationError::from(PoolError::ShuttingDown);
        assert!(matches!(e, InvocationError::Unavailable(_)), "{e:?}");
        let e = InvocationError::from(PoolError::StartInstance {
            block: "b".into(),
            message: "no pids".into(),
        });
        assert_eq!(
            e.to_string(),
            "starting an instance of block `b`: no pids",
            "{e:?}"
        );
        assert!(matches!(e, InvocationError::Internal(_)));
    }

    #[test]
    fn not_found_messages_name_what_exists() {
        let e = InvocationError::BlockNotFound {
            project: "shop".into(),
            deployment: 3,
            block: "nope".into(),
            blocks: vec!["a".into(), "b".into()],
        };
        assert_eq!(
            e.to_string(),
            "project `shop` (live deployment 3) has no block `nope`; its blocks are: a, b"
        );
        let e = InvocationError::ProjectNotFound {
            project: "shop".into(),
        };
        assert_eq!(
            e.to_string(),
            "no project `shop` in this account: deploy it first with `refinery deploy`"
        );
    }

    #[test]
    fn spending_cap_message() {
        let e = InvocationError::SpendingCapReached {
            account: "acme".into(),
            cap: Decimal::new(1000, 2),
            spent: Decimal::new(1042, 2),
            currency: "EUR".into(),
            period: "2026-12".parse().expect("period"),
        };
        assert_eq!(
            e.to_string(),
            "account `acme` has reached its spending cap of 10.00 EUR for 2026-12 (usage at cost plus markup: 10.42 EUR); \
             invocations are refused until the cap is raised (`refinery accounts set-billing acme --spending-cap AMOUNT`) \
             or the month ends"
        );
    }
}
