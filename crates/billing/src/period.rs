//! Billing periods: calendar months in UTC, written `YYYY-MM`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One calendar month, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    year: i32,
    month: u32,
}

/// A period that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a month: write it as YYYY-MM, e.g. 2026-11")]
pub struct PeriodError(pub String);

impl Period {
    /// The month `(year, month)`; `None` if `month` is not 1–12 or the year is out of range.
    pub fn new(year: i32, month: u32) -> Option<Period> {
        NaiveDate::from_ymd_opt(year, month, 1).map(|_| Period { year, month })
    }

    /// The month holding the instant `ms` (milliseconds since the Unix epoch, UTC).
    pub fn containing(ms: i64) -> Period {
        let t = DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default();
        Period {
            year: t.year(),
            month: t.month(),
        }
    }

    pub fn year(self) -> i32 {
        self.year
    }

    pub fn month(self) -> u32 {
        self.month
    }

    /// The following month.
    pub fn next(self) -> Period {
        if self.month == 12 {
            Period {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Period {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// The month before.
    pub fn previous(self) -> Period {
        if self.month == 1 {
            Period {
                year: self.year - 1,
                month: 12,
            }
        } else {
            Period {
                year: self.year,
                month: self.month - 1,
            }
        }
    }

    /// First instant of the month (inclusive), ms since the epoch.
    pub fn start_ms(self) -> i64 {
        NaiveDate::from_ymd_opt(self.year, self.month, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc().timestamp_millis())
            .unwrap_or_default()
    }

    /// First instant of the next month (exclusive end), ms since the epoch.
    pub fn end_ms(self) -> i64 {
        self.next().start_ms()
    }

    /// Length of the month in milliseconds (28–31 days).
    pub fn length_ms(self) -> i64 {
        self.end_ms() - self.start_ms()
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl FromStr for Period {
    type Err = PeriodError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PeriodError(s.to_string());
        let (y, m) = s.split_once('-').ok_or_else(err)?;
        if y.len() != 4 || m.len() != 2 || !(y.bytes().chain(m.bytes())).all(|b| b.is_ascii_digit())
        {
            return Err(err());
        }
        let year = y.parse().map_err(|_| err())?;
        let month = m.parse().map_err(|_| err())?;
        Period::new(year, month).ok_or_else(err)
    }
}

impl Serialize for Period {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() -> Result<(), PeriodError> {
        let p: Period = "2026-11".parse()?;
        assert_eq!(p.to_string(), "2026-11");
        assert_eq!(p.next().to_string(), "2026-12");
        assert_eq!(p.next().next().to_string(), "2027-01");
        assert_eq!(
            "2027-01".parse::<Period>()?.previous().to_string(),
            "2026-12"
        );
        for bad in [
            "2026-13", "2026-1", "26-11", "2026/11", "abcd-ef", "2026-00", "",
        ] {
            assert!(bad.parse::<Period>().is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn bounds_are_utc_month_edges() -> Result<(), PeriodError> {
        let feb: Period = "2028-02".parse()?; // leap year
        assert_eq!(feb.start_ms(), 1_832_976_000_000); // 2028-02-01T00:00:00Z
        assert_eq!(feb.length_ms(), 29 * 86_400_000);
        assert_eq!(Period::containing(feb.start_ms()), feb);
        assert_eq!(Period::containing(feb.end_ms() - 1), feb);
        assert_eq!(Period::containing(feb.end_ms()), feb.next());
        Ok(())
    }
}
