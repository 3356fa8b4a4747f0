//! Rating: a month of one account's usage, the price list and the account's terms →
//! a bill with line items, subtotal at cost, markup, minimum-fee adjustment and total.
//!
//! Rounding rule (one place): each line's amount is computed exactly and rounded
//! half-up to the currency's minor unit; the subtotal is the sum of the rounded lines;
//! the markup is `subtotal × percent / 100` rounded the same way; a minimum-fee
//! adjustment tops `subtotal + markup` up to the minimum. So the printed lines always add
//! up to the printed total, to the cent.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::round;
use crate::price::PriceList;

/// MB·ms in one GB-second (1 GB = 1024 MB, 1 s = 1000 ms).
const MB_MS_PER_GB_SECOND: i64 = 1024 * 1000;
/// Bytes in one GB of egress or storage (decimal gigabyte).
const BYTES_PER_GB: i64 = 1_000_000_000;

/// One account's metered usage over one month.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Quantities {
    pub requests: i64,
    /// Σ billed run ms × memory MB.
    pub mb_ms: i64,
    /// Σ billed init ms × memory MB (cold starts).
    pub init_mb_ms: i64,
    /// Σ bytes of response bodies.
    pub egress_bytes: i64,
    /// Deployed code held, pro-rata over the month (see docs/BILLING.md).
    pub storage_gb_months: Decimal,
}

impl Quantities {
    /// Run GB-seconds (exact: 1 / 1 024 000 is a terminating decimal).
    pub fn gb_seconds(&self) -> Decimal {
        Decimal::from(self.mb_ms) / Decimal::from(MB_MS_PER_GB_SECOND)
    }

    /// Cold-start init GB-seconds.
    pub fn init_gb_seconds(&self) -> Decimal {
        Decimal::from(self.init_mb_ms) / Decimal::from(MB_MS_PER_GB_SECOND)
    }

    /// Egress in GB (10⁹ bytes).
    pub fn egress_gb(&self) -> Decimal {
        Decimal::from(self.egress_bytes) / Decimal::from(BYTES_PER_GB)
    }
}

/// Storage held: `bytes` for `held_ms` of a month `month_ms` long, in GB-months.
pub fn storage_gb_months(bytes: i64, held_ms: i64, month_ms: i64) -> Decimal {
    if bytes <= 0 || held_ms <= 0 || month_ms <= 0 {
        return Decimal::ZERO;
    }
    Decimal::from(bytes) * Decimal::from(held_ms)
        / Decimal::from(BYTES_PER_GB)
        / Decimal::from(month_ms)
}

/// An account's commercial terms for one bill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Terms {
    pub markup_percent: Decimal,
    pub minimum_fee: Decimal,
}

/// One line of a bill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineItem {
    /// `compute`, `requests`, `egress` or `storage`.
    pub item: String,
    /// Unit of `quantity`: `GB-second`, `request`, `GB`, `GB-month`.
    pub unit: String,
    pub quantity: Decimal,
    /// Free-tier allowance applied (at most `quantity`).
    pub free: Decimal,
    /// `quantity − free`.
    pub billable: Decimal,
    /// Price of one `unit` at cost.
    pub unit_price: Decimal,
    /// `billable × unit_price`, rounded half-up to the currency's minor unit.
    pub amount: Decimal,
}

/// A rated month.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bill {
    pub currency: String,
    pub lines: Vec<LineItem>,
    /// Σ line amounts: the cost.
    pub subtotal: Decimal,
    pub markup_percent: Decimal,
    pub markup: Decimal,
    pub minimum_fee: Decimal,
    /// What tops `subtotal + markup` up to `minimum_fee` (0 when already above).
    pub minimum_fee_adjustment: Decimal,
    /// `subtotal + markup + minimum_fee_adjustment`.
    pub total: Decimal,
    /// What the account has run up (`subtotal + markup`): compared to a spending cap.
    pub spent: Decimal,
}

fn line(
    item: &str,
    unit: &str,
    quantity: Decimal,
    free: Decimal,
    unit_price: Decimal,
    places: u32,
) -> LineItem {
    let free = free.min(quantity).max(Decimal::ZERO);
    let billable = quantity - free;
    LineItem {
        item: item.into(),
        unit: unit.into(),
        quantity: quantity.normalize(),
        free: free.normalize(),
        billable: billable.normalize(),
        unit_price: unit_price.normalize(),
        // Saturates instead of overflowing (28 digits): only absurd prices get near it.
        amount: round(
            billable.checked_mul(unit_price).unwrap_or(Decimal::MAX),
            places,
        ),
    }
}

/// Rates one month of `usage` with `prices` and `terms`.
pub fn rate(prices: &PriceList, usage: &Quantities, terms: &Terms) -> Bill {
    let places = prices.decimal_places;
    let mut compute = usage.gb_seconds();
    if prices.bill_init {
        compute += usage.init_gb_seconds();
    }
    let lines = vec![
        line(
            "compute",
            "GB-second",
            compute,
            prices.free_tier.gb_seconds,
            prices.per_gb_second,
            places,
        ),
        line(
            "requests",
            "request",
            Decimal::from(usage.requests),
            Decimal::from(prices.free_tier.requests),
            prices.per_million_requests / Decimal::from(1_000_000),
            places,
        ),
        line(
            "egress",
            "GB",
            usage.egress_gb(),
            prices.free_tier.egress_gb,
            prices.per_gb_egress,
            places,
        ),
        line(
            "storage",
            "GB-month",
            usage.storage_gb_months,
            prices.free_tier.storage_gb_months,
            prices.per_gb_month_storage,
            places,
        ),
    ];
    let subtotal = round(
        lines
            .iter()
            .try_fold(Decimal::ZERO, |sum, l| sum.checked_add(l.amount))
            .unwrap_or(Decimal::MAX),
        places,
    );
    let markup = round(
        subtotal
            .checked_mul(terms.markup_percent)
            .map_or(Decimal::MAX, |m| m / Decimal::from(100)),
        places,
    );
    let spent = subtotal.saturating_add(markup);
    let minimum_fee = round(terms.minimum_fee, places);
    let minimum_fee_adjustment = (minimum_fee - spent).max(round(Decimal::ZERO, places));
    Bill {
        currency: prices.currency.clone(),
        lines,
        subtotal,
        markup_percent: terms.markup_percent.normalize(),
        markup,
        minimum_fee,
        minimum_fee_adjustment,
        total: spent.saturating_add(minimum_fee_adjustment),
        spent,
    }
}

/// Whether an account that has run up `bill` has reached a spending `cap` (usage at
/// cost plus markup; the minimum fee does not count).
pub fn cap_reached(bill: &Bill, cap: Decimal) -> bool {
    bill.spent >= cap
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::parse_amount;
    use crate::price::FreeTier;

    fn d(text: &str) -> Decimal {
        parse_amount(text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Round numbers to compute by hand: $0.00001 per GB-s, $0.20 per million
    /// requests, $0.09 per GB egress, $0.10 per GB-month.
    fn prices(free: FreeTier) -> PriceList {
        PriceList {
            currency: "USD".into(),
            decimal_places: 2,
            granularity_ms: 1,
            bill_init: false,
            per_gb_second: d("0.00001"),
            per_million_requests: d("0.20"),
            per_gb_egress: d("0.09"),
            per_gb_month_storage: d("0.10"),
            free_tier: free,
            default_markup_percent: d("20"),
            default_minimum_fee: d("0"),
        }
    }

    fn terms(markup: &str, minimum: &str) -> Terms {
        Terms {
            markup_percent: d(markup),
            minimum_fee: d(minimum),
        }
    }

    fn amount(bill: &Bill, item: &str) -> String {
        bill.lines
            .iter()
            .find(|l| l.item == item)
            .map(|l| l.amount.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn free_tier_crossing() {
        // 3 000 000 requests of 1 s at 1024 MB = 3 000 000 GB-s; free 400 000 GB-s and
        // 1 000 000 requests.
        let usage = Quantities {
            requests: 3_000_000,
            mb_ms: 3_000_000 * 1000 * 1024,
            ..Quantities::default()
        };
        let free = FreeTier {
            gb_seconds: d("400000"),
            requests: 1_000_000,
            ..FreeTier::default()
        };
        let bill = rate(&prices(free), &usage, &terms("0", "0"));
        let compute = &bill.lines[0];
        assert_eq!(compute.quantity, d("3000000"));
        assert_eq!(compute.free, d("400000"));
        assert_eq!(compute.billable, d("2600000"));
        // 2 600 000 × 0.00001 = 26.00
        assert_eq!(amount(&bill, "compute"), "26.00");
        // 2 000 000 billable requests × 0.20 / 10⁶ = 0.40
        assert_eq!(amount(&bill, "requests"), "0.40");
        assert_eq!(bill.subtotal.to_string(), "26.40");
        assert_eq!(bill.total.to_string(), "26.40");

        // Under the free tier: nothing billable, never negative.
        let small = Quantities {
            requests: 999_999,
            mb_ms: 1024 * 1000,
            ..Quantities::default()
        };
        let free = FreeTier {
            gb_seconds: d("400000"),
            requests: 1_000_000,
            ..FreeTier::default()
        };
        let bill = rate(&prices(free), &small, &terms("20", "0"));
        assert_eq!(bill.lines[0].billable, Decimal::ZERO);
        assert_eq!(bill.lines[1].free, d("999999"));
        assert_eq!(bill.total.to_string(), "0.00");
    }

    #[test]
    fn rounding_half_up_per_line() {
        // 1 250 000 requests × $0.20/10⁶ = 0.25 exactly; 625 GB-s × 0.00001 = 0.00625 → 0.01;
        // 0.05 GB egress (50 000 000 B) × 0.09 = 0.0045 → 0.00.
        let usage = Quantities {
            requests: 1_250_000,
            mb_ms: 625 * 1024 * 1000,
            egress_bytes: 50_000_000,
            ..Quantities::default()
        };
        let bill = rate(&prices(FreeTier::default()), &usage, &terms("0", "0"));
        assert_eq!(amount(&bill, "requests"), "0.25");
        assert_eq!(amount(&bill, "compute"), "0.01");
        assert_eq!(amount(&bill, "egress"), "0.00");
        assert_eq!(bill.subtotal.to_string(), "0.26");
        // Exactly half a cent rounds up: 500 GB-s × 0.00001 = 0.005 → 0.01.
        let half = Quantities {
            mb_ms: 500 * 1024 * 1000,
            ..Quantities::default()
        };
        assert_eq!(
            amount(
                &rate(&prices(FreeTier::default()), &half, &terms("0", "0")),
                "compute"
            ),
            "0.01"
        );
    }

    #[test]
    fn markup_zero_and_thirty_seven_and_a_half() {
        // 10 000 000 requests → 2.00; 1 100 000 GB-s → 11.00; subtotal 13.00.
        let usage = Quantities {
            requests: 10_000_000,
            mb_ms: 1_100_000 * 1024 * 1000,
            ..Quantities::default()
        };
        let zero = rate(&prices(FreeTier::default()), &usage, &terms("0", "0"));
        assert_eq!(zero.subtotal.to_string(), "13.00");
        assert_eq!(zero.markup.to_string(), "0.00");
        assert_eq!(zero.total.to_string(), "13.00");
        // 13.00 × 37.5% = 4.875 → 4.88; total 17.88.
        let marked = rate(&prices(FreeTier::default()), &usage, &terms("37.5", "0"));
        assert_eq!(marked.markup.to_string(), "4.88");
        assert_eq!(marked.total.to_string(), "17.88");
        assert_eq!(marked.spent.to_string(), "17.88");
    }

    #[test]
    fn minimum_fee_tops_up() {
        // 1.00 at cost + 20% = 1.20; minimum 5 → adjustment 3.80, total 5.00.
        let usage = Quantities {
            requests: 5_000_000,
            ..Quantities::default()
        };
        let bill = rate(&prices(FreeTier::default()), &usage, &terms("20", "5"));
        assert_eq!(bill.subtotal.to_string(), "1.00");
        assert_eq!(bill.markup.to_string(), "0.20");
        assert_eq!(bill.minimum_fee_adjustment.to_string(), "3.80");
        assert_eq!(bill.total.to_string(), "5.00");
        assert_eq!(
            bill.spent.to_string(),
            "1.20",
            "the minimum fee is not usage"
        );
        // Above the minimum: no adjustment.
        let big = Quantities {
            requests: 50_000_000,
            ..Quantities::default()
        };
        let bill = rate(&prices(FreeTier::default()), &big, &terms("20", "5"));
        assert_eq!(bill.minimum_fee_adjustment.to_string(), "0.00");
        assert_eq!(bill.total.to_string(), "12.00");
    }

    #[test]
    fn init_is_billed_only_when_the_price_list_says_so() {
        let usage = Quantities {
            mb_ms: 1000 * 1024 * 1000,
            init_mb_ms: 1000 * 1024 * 1000,
            ..Quantities::default()
        };
        let mut list = prices(FreeTier::default());
        assert_eq!(
            amount(&rate(&list, &usage, &terms("0", "0")), "compute"),
            "0.01"
        );
        list.bill_init = true;
        assert_eq!(
            amount(&rate(&list, &usage, &terms("0", "0")), "compute"),
            "0.02"
        );
    }

    #[test]
    fn storage_pro_rata_and_egress() {
        // 2 GB held for half of a 30-day month = 1 GB-month → 0.10.
        let month = 30 * 86_400_000;
        let gbm = storage_gb_months(2_000_000_000, month / 2, month);
        assert_eq!(gbm, d("1"));
        let usage = Quantities {
            storage_gb_months: gbm,
            egress_bytes: 10_000_000_000,
            ..Quantities::default()
        };
        let bill = rate(&prices(FreeTier::default()), &usage, &terms("0", "0"));
        assert_eq!(amount(&bill, "storage"), "0.10");
        assert_eq!(amount(&bill, "egress"), "0.90");
    }

    #[test]
    fn lines_always_add_up_to_the_total() {
        for (requests, mb_ms, markup) in [
            (1, 1, "37.5"),
            (123_456_789, 987_654_321, "12.345"),
            (7, 0, "0"),
        ] {
            let usage = Quantities {
                requests,
                mb_ms,
                egress_bytes: requests * 3,
                ..Quantities::default()
            };
            let bill = rate(&prices(FreeTier::default()), &usage, &terms(markup, "0"));
            let lines: Decimal = bill.lines.iter().map(|l| l.amount).sum();
            assert_eq!(lines, bill.subtotal);
            assert_eq!(
                bill.subtotal + bill.markup + bill.minimum_fee_adjustment,
                bill.total
            );
            assert_eq!(bill.total.scale(), 2);
        }
    }

    #[test]
    fn cap_compares_usage_plus_markup() {
        let usage = Quantities {
            requests: 10_000_000,
            ..Quantities::default()
        };
        let bill = rate(&prices(FreeTier::default()), &usage, &terms("50", "100"));
        // 2.00 + 1.00 = 3.00 spent (minimum fee ignored).
        assert!(cap_reached(&bill, d("3")));
        assert!(cap_reached(&bill, d("2.99")));
        assert!(!cap_reached(&bill, d("3.01")));
    }
}
