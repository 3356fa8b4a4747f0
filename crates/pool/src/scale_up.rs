//! The per-block scale-up limit: a token bucket on *cold starts* (Lambda allows each
//! function 1,000 new instances per 10 s). Warm reuse never takes a token, so a block that
//! already has enough instances is never throttled by it; a burst beyond it waits (bounded
//! by the queue timeout) for a warm instance or a token.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// `burst` cold starts per block, refilled evenly over `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleUpLimit {
    pub burst: u32,
    pub per: Duration,
}

impl ScaleUpLimit {
    /// Lambda's: 1,000 new instances per 10 seconds.
    pub const DEFAULT: ScaleUpLimit = ScaleUpLimit {
        burst: 1000,
        per: Duration::from_secs(10),
    };

    fn rate_per_s(&self) -> f64 {
        f64::from(self.burst) / self.per.as_secs_f64()
    }
}

impl Default for ScaleUpLimit {
    fn default() -> Self {
        ScaleUpLimit::DEFAULT
    }
}

impl fmt::Display for ScaleUpLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} new instances per {:?}", self.burst, self.per)
    }
}

impl FromStr for ScaleUpLimit {
    type Err = String;

    /// `N/DURATION`, e.g. `1000/10s`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || {
            format!("invalid scale-up limit `{s}`: expected COLD_STARTS/DURATION with both above zero, e.g. 1000/10s")
        };
        let (burst, per) = s.split_once('/').ok_or_else(usage)?;
        let burst: u32 = burst.trim().parse().map_err(|_| usage())?;
        let per = parse_duration(per.trim()).ok_or_else(usage)?;
        if burst == 0 || per.is_zero() {
            return Err(usage());
        }
        Ok(ScaleUpLimit { burst, per })
    }
}

/// `10s`, `500ms`, `2m`, `1h`.
fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

/// The bucket itself: starts full.
#[derive(Debug)]
pub struct ScaleUpBucket {
    limit: ScaleUpLimit,
    tokens: f64,
    last: Instant,
}

impl ScaleUpBucket {
    pub fn new(limit: ScaleUpLimit, now: Instant) -> ScaleUpBucket {
        ScaleUpBucket {
            limit,
            tokens: f64::from(limit.burst),
            last: now,
        }
    }

    pub fn limit(&self) -> ScaleUpLimit {
        self.limit
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        let rate = self.limit.rate_per_s();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(self.limit.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_count_per_duration() {
        let limit: ScaleUpLimit = "1000/10s".parse().expect("valid");
        assert_eq!(limit, ScaleUpLimit::DEFAULT);
        let limit: ScaleUpLimit = "2/1h".parse().expect("valid");
        assert_eq!(limit.per, Duration::from_secs(3600));
        for bad in ["1000", "0/10s", "5/0s", "x/10s", "5/10", "5/10y"] {
            let err = bad.parse::<ScaleUpLimit>().expect_err(bad);
            assert!(err.contains("1000/10s"), "{err}");
        }
    }

    #[test]
    fn a_burst_drains_the_bucket_then_it_refills_evenly() {
        let start = Instant::now();
        let mut bucket = ScaleUpBucket::new("3/3s".parse().expect("valid"), start);
        for _ in 0..3 {
            assert_eq!(bucket.take(start), Ok(()));
        }
        let wait = bucket.take(start).expect_err("empty");
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        assert_eq!(bucket.take(start + Duration::from_secs(1)), Ok(()));
        assert!(bucket.take(start + Duration::from_secs(1)).is_err());
        // Never more than the burst, however long it rested.
        let later = start + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(bucket.take(later), Ok(()));
        }
        assert!(bucket.take(later).is_err());
    }
}
