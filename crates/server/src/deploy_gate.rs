//! What a deploy must get past before its body is read: the account's deploy rate (a
//! token bucket) and the bounds on deploys received at once (per account and server-wide,
//! so the memory that request bodies take is bounded whatever clients send).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// `burst` deploys per account, refilled evenly over `per` (`--deploy-rate 10/1m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeployRate {
    pub burst: u32,
    pub per: Duration,
}

impl DeployRate {
    pub const DEFAULT: DeployRate = DeployRate {
        burst: 10,
        per: Duration::from_secs(60),
    };

    fn per_second(&self) -> f64 {
        f64::from(self.burst) / self.per.as_secs_f64()
    }
}

impl fmt::Display for DeployRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.burst, humantime::format_duration(self.per))
    }
}

impl FromStr for DeployRate {
    type Err = String;

    /// `N/DURATION`, e.g. `10/1m`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || {
            format!(
                "invalid deploy rate `{s}`: expected DEPLOYS/DURATION with both above zero, e.g. 10/1m"
            )
        };
        let (burst, per) = s.split_once('/').ok_or_else(usage)?;
        let burst: u32 = burst.trim().parse().map_err(|_| usage())?;
        let per = humantime::parse_duration(per.trim()).map_err(|_| usage())?;
        if burst == 0 || per.is_zero() {
            return Err(usage());
        }
        Ok(DeployRate { burst, per })
    }
}

/// The operator's deploy limits (`refinery serve --keep-deployments`, `--deploy-rate`,
/// `--deploys-at-once`, `--deploys-at-once-per-account`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeployLimits {
    /// Deployments kept per project (the live one is always kept).
    pub keep_deployments: usize,
    /// Deploys per account per window.
    pub rate: DeployRate,
    /// Deploys handled at once (body received to reply), server-wide.
    pub at_once: usize,
    /// Deploys handled at once, per account.
    pub at_once_per_account: usize,
    /// How long a deploy may wait for its turn before it is refused with 429.
    pub wait: Duration,
}

impl DeployLimits {
    pub const DEFAULT: DeployLimits = DeployLimits {
        keep_deployments: 10,
        rate: DeployRate::DEFAULT,
        at_once: 4,
        at_once_per_account: 1,
        wait: Duration::from_secs(5),
    };

    /// Why these limits are not acceptable, naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.keep_deployments == 0 {
            return Err("--keep-deployments 0: at least 1 (the live deployment) is kept".into());
        }
        if self.at_once == 0 || self.at_once_per_account == 0 {
            return Err(
                "--deploys-at-once and --deploys-at-once-per-account must be at least 1".into(),
            );
        }
        Ok(())
    }
}

impl Default for DeployLimits {
    fn default() -> Self {
        DeployLimits::DEFAULT
    }
}

/// One account's deploy bucket and concurrency bound.
struct AccountGate {
    tokens: f64,
    refilled_at: Instant,
    receiving: Arc<Semaphore>,
}

pub struct DeployGate {
    limits: DeployLimits,
    receiving: Arc<Semaphore>,
    accounts: Mutex<HashMap<String, AccountGate>>,
}

/// Held while a deploy is being received and handled.
pub struct DeployTurn {
    _account: OwnedSemaphorePermit,
    _server: OwnedSemaphorePermit,
}

impl DeployGate {
    pub fn new(limits: DeployLimits) -> DeployGate {
        DeployGate {
            limits,
            receiving: Arc::new(Semaphore::new(limits.at_once)),
            accounts: Mutex::new(HashMap::new()),
        }
    }

    pub fn limits(&self) -> &DeployLimits {
        &self.limits
    }

    /// Takes a deploy token of the account, then waits (up to the configured wait) for a
    /// turn to receive its body: the account's, then the server's. 429 otherwise.
    pub async fn admit(
        &self,
        account_id: &str,
        account_name: &str,
    ) -> Result<DeployTurn, ApiError> {
        let account_semaphore = {
            let mut accounts = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
            let gate = accounts
                .entry(account_id.to_string())
                .or_insert_with(|| AccountGate {
                    tokens: f64::from(self.limits.rate.burst),
                    refilled_at: Instant::now(),
                    receiving: Arc::new(Semaphore::new(self.limits.at_once_per_account)),
                });
            let now = Instant::now();
            let elapsed = now
                .saturating_duration_since(gate.refilled_at)
                .as_secs_f64();
            let rate = self.limits.rate.per_second();
            gate.tokens = (gate.tokens + elapsed * rate).min(f64::from(self.limits.rate.burst));
            gate.refilled_at = now;
            if gate.tokens < 1.0 {
                let retry_after = Duration::from_secs_f64((1.0 - gate.tokens) / rate);
                return Err(ApiError::Throttled {
                    message: format!(
                        "account {account_name} deploys too often: the limit is {} deploys per {} \
                         (`refinery serve --deploy-rate`); retry in {} s",
                        self.limits.rate.burst,
                        humantime::format_duration(self.limits.rate.per),
                        retry_after.as_secs() + 1
                    ),
                    retry_after,
                    limit: "deploy_rate",
                });
            }
            gate.tokens -= 1.0;
            gate.receiving.clone()
        };
        let busy = |whose: String, n: usize, flag: &str| ApiError::Throttled {
            message: format!(
                "{whose} already has {n} deploy(s) in progress (the limit at once; `refinery \
                 serve {flag}`); retry when it is done"
            ),
            retry_after: Duration::from_secs(1),
            limit: "deploys_at_once",
        };
        let account = tokio::time::timeout(self.limits.wait, account_semaphore.acquire_owned())
            .await
            .map_err(|_| {
                busy(
                    format!("account {account_name}"),
                    self.limits.at_once_per_account,
                    "--deploys-at-once-per-account",
                )
            })?
            .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?;
        let server = tokio::time::timeout(self.limits.wait, self.receiving.clone().acquire_owned())
            .await
            .map_err(|_| {
                busy(
                    "the server".into(),
                    self.limits.at_once,
                    "--deploys-at-once",
                )
            })?
            .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?;
        Ok(DeployTurn {
            _account: account,
            _server: server,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_deploys_per_duration() {
        assert_eq!("10/1m".parse::<DeployRate>(), Ok(DeployRate::DEFAULT));
        assert_eq!(
            "3/10s".parse::<DeployRate>(),
            Ok(DeployRate {
                burst: 3,
                per: Duration::from_secs(10)
            })
        );
        for bad in ["10", "0/1m", "5/0s", "x/1m", "5/soon"] {
            let err = bad.parse::<DeployRate>().expect_err(bad);
            assert!(err.contains("10/1m"), "{err}");
        }
    }
}
