//! Refinery's billing arithmetic: the operator's price list, metering one execution,
//! and rating a month of usage into a bill. Pure functions over exact decimals
//! (`rust_decimal`): no I/O, no clock, no floating point past [`meter::micros`].
//!
//! # What this crate owns
//!
//! - **The price list** ([`PriceList`]): currency, unit prices, free tier, billing
//!   granularity, whether cold-start time is billed, the default markup and minimum fee.
//! - **Metering** ([`meter`]): a measured run → billed milliseconds and MB·ms.
//! - **Periods** ([`Period`]): calendar months in UTC, `YYYY-MM`.
//! - **Rating** ([`rate`]): a month's usage + an account's terms → a [`Bill`] with line
//!   items, subtotal at cost, markup, minimum-fee adjustment and total.
//! - **CSV export** ([`csv`]).
//!
//! # Units and rounding (see docs/BILLING.md)
//!
//! Memory GB = 1024 MB (GB-seconds as in AWS Lambda); egress and storage GB = 10⁹ bytes.
//! Every line amount is computed exactly, then rounded half-up (away from zero) to the
//! currency's minor unit; the subtotal is the sum of the rounded lines, the markup is
//! rounded the same way, so the lines of a bill always add up to its total.
//!
//! The store persists what this crate computes; the server decides who may see it.

pub mod csv;
pub mod meter;
pub mod money;
pub mod period;
pub mod price;
pub mod rate;

pub use meter::{meter, Metered};
pub use money::{parse_amount, MoneyError};
pub use period::{Period, PeriodError};
pub use price::{FreeTier, PriceList, PriceListError};
pub use rate::{cap_reached, rate, Bill, LineItem, Quantities, Terms};
pub use rust_decimal::Decimal;
