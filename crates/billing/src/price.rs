//! The operator's price list: what each unit costs, what is free each month, how
//! finely duration is billed, and the default account terms.
//!
//! Written by the operator as TOML (`refinery pricing set FILE`) or JSON (the API);
//! amounts may be strings or numbers and are kept as exact decimals.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::de_decimal;

/// Most decimal places a currency may have (minor unit).
const MAX_DECIMAL_PLACES: u32 = 6;
/// Largest amount, price, allowance or percentage accepted anywhere (10¹²): far above any
/// real price, and far enough below `Decimal`'s 28 digits that no bill overflows.
pub const MAX_AMOUNT: Decimal = Decimal::from_parts(0xD4A5_1000, 0xE8, 0, false, 0);
/// Coarsest billing granularity: one minute.
pub const MAX_GRANULARITY_MS: u32 = 60_000;

/// Prices per unit, free tier and defaults; one currency for everything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceList {
    /// ISO 4217-style code, e.g. `USD`, `EUR`: three capital letters. Every amount in
    /// this list and in every bill is in this currency.
    pub currency: String,
    /// Digits after the decimal point of the currency's smallest unit (2 for cents).
    #[serde(default = "default_decimal_places")]
    pub decimal_places: u32,
    /// Run duration is rounded UP to a multiple of this many milliseconds (1–60000).
    #[serde(default = "default_granularity")]
    pub granularity_ms: u32,
    /// Whether a cold start's init time is billed as compute too.
    #[serde(default)]
    pub bill_init: bool,
    /// Price of one GB-second (1 GB = 1024 MB of configured memory for 1 s).
    #[serde(deserialize_with = "de_decimal")]
    pub per_gb_second: Decimal,
    /// Price of one million requests (invocations).
    #[serde(deserialize_with = "de_decimal")]
    pub per_million_requests: Decimal,
    /// Price of one GB (10⁹ bytes) of response bodies.
    #[serde(deserialize_with = "de_decimal")]
    pub per_gb_egress: Decimal,
    /// Price of one GB-month (10⁹ bytes of deployed code held for a whole month).
    #[serde(default, deserialize_with = "de_decimal")]
    pub per_gb_month_storage: Decimal,
    /// Free allowance per account per month.
    #[serde(default)]
    pub free_tier: FreeTier,
    /// Markup (percent of the subtotal at cost) for accounts without their own.
    #[serde(default = "default_markup", deserialize_with = "de_decimal")]
    pub default_markup_percent: Decimal,
    /// Monthly minimum fee (total after markup) for accounts without their own.
    #[serde(default, deserialize_with = "de_decimal")]
    pub default_minimum_fee: Decimal,
}

/// Free allowance per account and month, subtracted before pricing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreeTier {
    #[serde(default, deserialize_with = "de_decimal")]
    pub gb_seconds: Decimal,
    #[serde(default)]
    pub requests: u64,
    #[serde(default, deserialize_with = "de_decimal")]
    pub egress_gb: Decimal,
    #[serde(default, deserialize_with = "de_decimal")]
    pub storage_gb_months: Decimal,
}

fn default_decimal_places() -> u32 {
    2
}

fn default_granularity() -> u32 {
    1
}

fn default_markup() -> Decimal {
    Decimal::from(20)
}

/// A price list that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceListError {
    #[error("{0}")]
    Parse(String),
    #[error("price list field `{field}`: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

impl Default for PriceList {
    /// Used until the operator sets one: AWS Lambda's list prices in USD (x86, 2024),
    /// 1 ms granularity, init not billed, 20% markup, no minimum fee.
    fn default() -> Self {
        PriceList {
            currency: "USD".into(),
            decimal_places: 2,
            granularity_ms: 1,
            bill_init: false,
            per_gb_second: Decimal::new(166_667, 10),
            per_million_requests: Decimal::new(20, 2),
            per_gb_egress: Decimal::new(9, 2),
            per_gb_month_storage: Decimal::new(10, 2),
            free_tier: FreeTier {
                gb_seconds: Decimal::from(400_000),
                requests: 1_000_000,
                egress_gb: Decimal::from(100),
                storage_gb_months: Decimal::ZERO,
            },
            default_markup_percent: Decimal::from(20),
            default_minimum_fee: Decimal::ZERO,
        }
    }
}

impl PriceList {
    /// Reads a price list written as TOML; `file` names it in errors.
    pub fn from_toml(text: &str, file: &str) -> Result<PriceList, PriceListError> {
        let list: PriceList =
            toml::from_str(text).map_err(|e| PriceListError::Parse(format!("{file}: {e}")))?;
        list.validate()?;
        Ok(list)
    }

    /// Reads a price list written as JSON.
    pub fn from_json(value: serde_json::Value) -> Result<PriceList, PriceListError> {
        let list: PriceList = serde_json::from_value(value).map_err(|e| {
            PriceListError::Parse(format!(
                "invalid price list: {e}; see docs/BILLING.md for the fields"
            ))
        })?;
        list.validate()?;
        Ok(list)
    }

    /// Checks every field is usable.
    pub fn validate(&self) -> Result<(), PriceListError> {
        let invalid = |field, problem: &str| {
            Err(PriceListError::Invalid {
                field,
                problem: problem.to_string(),
            })
        };
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return invalid(
                "currency",
                &format!(
                    "`{}` is not a currency code: use three capital letters, e.g. \"USD\"",
                    self.currency
                ),
            );
        }
        if self.decimal_places > MAX_DECIMAL_PLACES {
            return invalid(
                "decimal_places",
                &format!("must be 0–{MAX_DECIMAL_PLACES} (2 for cents)"),
            );
        }
        if !(1..=MAX_GRANULARITY_MS).contains(&self.granularity_ms) {
            return invalid(
                "granularity_ms",
                &format!("must be 1–{MAX_GRANULARITY_MS} milliseconds"),
            );
        }
        for (field, value) in [
            ("per_gb_second", self.per_gb_second),
            ("per_million_requests", self.per_million_requests),
            ("per_gb_egress", self.per_gb_egress),
            ("per_gb_month_storage", self.per_gb_month_storage),
            ("free_tier.gb_seconds", self.free_tier.gb_seconds),
            ("free_tier.egress_gb", self.free_tier.egress_gb),
            (
                "free_tier.storage_gb_months",
                self.free_tier.storage_gb_months,
            ),
            ("default_markup_percent", self.default_markup_percent),
            ("default_minimum_fee", self.default_minimum_fee),
        ] {
            if value.is_sign_negative() && !value.is_zero() {
                return invalid(
                    field,
                    &format!("{value} is negative; prices and allowances are ≥ 0"),
                );
            }
        }
        Ok(())
    }
}

/// An amount (price, allowance, fee, cap, percentage) must be 0 ≤ value ≤ [`MAX_AMOUNT`].
pub fn check_amount(value: Decimal) -> Result<(), String> {
    if value.is_sign_negative() && !value.is_zero() {
        Err(format!("{value} is negative; amounts are ≥ 0"))
    } else if value > MAX_AMOUNT {
        Err(format!(
            "{value} is too large; amounts are at most {MAX_AMOUNT}"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_amount_is_ten_to_the_twelfth() {
        assert_eq!(MAX_AMOUNT, Decimal::from(1_000_000_000_000_i64));
        assert!(check_amount(MAX_AMOUNT).is_ok());
        assert!(check_amount(MAX_AMOUNT + Decimal::ONE).is_err());
        assert!(check_amount(Decimal::NEGATIVE_ONE).is_err());
    }

    #[test]
    fn reads_toml_with_strings_and_numbers() -> Result<(), PriceListError> {
        let list = PriceList::from_toml(
            r#"
currency = "EUR"
granularity_ms = 100
bill_init = true
per_gb_second = "0.0000166667"
per_million_requests = 0.2
per_gb_egress = 0.09
default_markup_percent = 37.5
[free_tier]
requests = 1000
gb_seconds = 10
"#,
            "prices.toml",
        )?;
        assert_eq!(list.currency, "EUR");
        assert_eq!(list.granularity_ms, 100);
        assert_eq!(list.per_gb_second.to_string(), "0.0000166667");
        assert_eq!(list.per_million_requests.to_string(), "0.2");
        assert_eq!(list.default_markup_percent.to_string(), "37.5");
        assert_eq!(list.free_tier.requests, 1000);
        assert_eq!(list.decimal_places, 2);
        assert!(list.default_minimum_fee.is_zero());
        Ok(())
    }

    #[test]
    fn rejects_bad_lists_with_the_field() {
        let base = "per_gb_second = 1\nper_million_requests = 1\nper_gb_egress = 1\n";
        let cases = [
            (format!("currency = \"usd\"\n{base}"), "currency"),
            (
                format!("currency = \"USD\"\ngranularity_ms = 0\n{base}"),
                "granularity_ms",
            ),
            (
                format!("currency = \"USD\"\n{base}default_minimum_fee = \"-5\"\n"),
                "default_minimum_fee",
            ),
            (format!("currency = \"USD\"\n{base}typo = 1\n"), "typo"),
            ("currency = \"USD\"\n".to_string(), "per_gb_second"),
        ];
        for (text, field) in cases {
            match PriceList::from_toml(&text, "p.toml") {
                Ok(_) => panic!("accepted: {text}"),
                Err(e) => assert!(e.to_string().contains(field), "{field}: {e}"),
            }
        }
    }

    #[test]
    fn default_is_valid_and_round_trips_through_json() -> Result<(), Box<dyn std::error::Error>> {
        let list = PriceList::default();
        list.validate()?;
        let json = serde_json::to_value(&list)?;
        assert_eq!(
            json["per_gb_second"], "0.0000166667",
            "decimals travel as strings"
        );
        assert_eq!(PriceList::from_json(json)?, list);
        Ok(())
    }
}
