//! Decimal amounts as they travel in JSON and TOML: written as strings (never floats),
//! read from strings or numbers (a number is taken as the digits it was written with).

use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Deserializer};

/// A decimal that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a decimal number; write it like \"0.20\" or \"37.5\"")]
pub struct MoneyError {
    pub text: String,
}

/// Parses a user-written amount (`"5"`, `"0.0000166667"`).
pub fn parse_amount(text: &str) -> Result<Decimal, MoneyError> {
    Decimal::from_str(text.trim()).map_err(|_| MoneyError {
        text: text.to_string(),
    })
}

/// Rounds half-up (away from zero, "commercial rounding") to `places` decimals.
pub fn round(value: Decimal, places: u32) -> Decimal {
    let mut rounded = value.round_dp_with_strategy(places, RoundingStrategy::MidpointAwayFromZero);
    rounded.rescale(places);
    rounded
}

/// Serde: a decimal given as a string, an integer or a float. A float is read through
/// its shortest decimal form (`0.2` → `0.2`, not `0.2000000000000000111`), so what the
/// operator typed is what is used.
pub fn de_decimal<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Int(i64),
        Float(f64),
    }
    let text = match Raw::deserialize(deserializer)? {
        Raw::Text(t) => t,
        Raw::Int(i) => i.to_string(),
        Raw::Float(f) => f.to_string(),
    };
    parse_amount(&text).map_err(serde::de::Error::custom)
}

/// Serde: an optional decimal (see [`de_decimal`]).
pub fn de_opt_decimal<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Decimal>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "de_decimal")] Decimal);
    Ok(Option::<Wrap>::deserialize(deserializer)?.map(|Wrap(d)| d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_half_up_away_from_zero() -> Result<(), MoneyError> {
        assert_eq!(round(parse_amount("0.005")?, 2).to_string(), "0.01");
        assert_eq!(round(parse_amount("0.0049999")?, 2).to_string(), "0.00");
        assert_eq!(round(parse_amount("2.675")?, 2).to_string(), "2.68");
        assert_eq!(round(parse_amount("-0.005")?, 2).to_string(), "-0.01");
        assert_eq!(round(parse_amount("3")?, 2).to_string(), "3.00");
        Ok(())
    }

    #[test]
    fn reads_numbers_as_written() -> Result<(), serde_json::Error> {
        #[derive(Deserialize)]
        struct T {
            #[serde(deserialize_with = "de_decimal")]
            a: Decimal,
            #[serde(deserialize_with = "de_decimal")]
            b: Decimal,
            #[serde(deserialize_with = "de_decimal")]
            c: Decimal,
        }
        let t: T = serde_json::from_str(r#"{"a": 0.2, "b": "0.0000166667", "c": 5}"#)?;
        assert_eq!(t.a.to_string(), "0.2");
        assert_eq!(t.b.to_string(), "0.0000166667");
        assert_eq!(t.c.to_string(), "5");
        assert!(serde_json::from_str::<T>(r#"{"a": "x", "b": 1, "c": 1}"#).is_err());
        Ok(())
    }
}
