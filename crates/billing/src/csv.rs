//! CSV export of bills for the operator's accounting: one row per bill.

use rust_decimal::Decimal;

use crate::rate::Bill;

/// Column names, in order.
pub const HEADER: &str = "period,account_id,account,status,currency,compute_gb_seconds,compute_amount,requests,requests_amount,egress_gb,egress_amount,storage_gb_months,storage_amount,subtotal,markup_percent,markup,minimum_fee_adjustment,total";

/// One bill to export, with whom and when it is for.
pub struct CsvRow<'a> {
    pub period: &'a str,
    pub account_id: &'a str,
    pub account: &'a str,
    /// `closed` or `open` (month to date).
    pub status: &'a str,
    pub bill: &'a Bill,
}

/// The rows as CSV text (RFC 4180 quoting), header first, `\n` line ends.
pub fn to_csv(rows: &[CsvRow<'_>]) -> String {
    let mut out = String::from(HEADER);
    out.push('\n');
    for row in rows {
        let line = |item: &str| row.bill.lines.iter().find(|l| l.item == item);
        let qty = |item: &str| line(item).map_or(Decimal::ZERO, |l| l.quantity).to_string();
        let amt = |item: &str| line(item).map_or(Decimal::ZERO, |l| l.amount).to_string();
        let fields = [
            row.period.to_string(),
            row.account_id.to_string(),
            row.account.to_string(),
            row.status.to_string(),
            row.bill.currency.clone(),
            qty("compute"),
            amt("compute"),
            qty("requests"),
            amt("requests"),
            qty("egress"),
            amt("egress"),
            qty("storage"),
            amt("storage"),
            row.bill.subtotal.to_string(),
            row.bill.markup_percent.to_string(),
            row.bill.markup.to_string(),
            row.bill.minimum_fee_adjustment.to_string(),
            row.bill.total.to_string(),
        ];
        let quoted: Vec<String> = fields.iter().map(|f| quote(f)).collect();
        out.push_str(&quoted.join(","));
        out.push('\n');
    }
    out
}

fn quote(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::price::PriceList;
    use crate::rate::{rate, Quantities, Terms};

    #[test]
    fn one_row_per_bill_with_quoting() {
        let bill = rate(
            &PriceList::default(),
            &Quantities {
                requests: 2_000_000,
                ..Quantities::default()
            },
            &Terms {
                markup_percent: Decimal::from(20),
                minimum_fee: Decimal::ZERO,
            },
        );
        let csv = to_csv(&[CsvRow {
            period: "2026-11",
            account_id: "acct_1",
            account: "a,\"b\"",
            status: "closed",
            bill: &bill,
        }]);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], HEADER);
        // 1 000 000 free, 1 000 000 × 0.20/10⁶ = 0.20, +20% = 0.04.
        assert_eq!(
            lines[1],
            "2026-11,acct_1,\"a,\"\"b\"\"\",closed,USD,0,0.00,2000000,0.20,0,0.00,0,0.00,0.20,20,0.04,0.00,0.24"
        );
    }
}
