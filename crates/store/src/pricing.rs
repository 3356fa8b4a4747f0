//! The operator's price list (versions kept, newest in force) and each account's
//! commercial terms: markup, minimum fee, spending cap. Amounts are stored as decimal text.

use refinery_billing::{Decimal, PriceList, Terms};
use serde::{Deserialize, Serialize};
use sqlx::SqliteConnection;

use crate::{is_foreign_key_violation, now_ms, Store, StoreError};

/// An account's own terms; `None` = the price list's default (markup, minimum fee) or
/// no spending cap.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccountBilling {
    pub markup_percent: Option<Decimal>,
    pub minimum_fee: Option<Decimal>,
    pub spending_cap: Option<Decimal>,
}

impl AccountBilling {
    /// The terms a bill uses: the account's own, else the price list's defaults.
    pub fn terms(&self, prices: &PriceList) -> Terms {
        Terms {
            markup_percent: self.markup_percent.unwrap_or(prices.default_markup_percent),
            minimum_fee: self.minimum_fee.unwrap_or(prices.default_minimum_fee),
        }
    }
}

pub(crate) fn stored_decimal(what: &str, text: &str) -> Result<Decimal, StoreError> {
    refinery_billing::parse_amount(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn opt_decimal(what: &str, text: Option<String>) -> Result<Option<Decimal>, StoreError> {
    text.map(|t| stored_decimal(what, &t)).transpose()
}

/// The price list in force, and when it was set (`None`: never, the default applies).
pub(crate) async fn current_price_list(
    conn: &mut SqliteConnection,
) -> Result<(PriceList, Option<i64>), StoreError> {
    let row: Option<(String, i64)> =
        sqlx::query_as("SELECT body, created_at_ms FROM price_lists ORDER BY id DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await
            .map_err(StoreError::db("reading the price list"))?;
    match row {
        None => Ok((PriceList::default(), None)),
        Some((body, at)) => {
            let list: PriceList = serde_json::from_str(&body)
                .map_err(|e| StoreError::Corrupt(format!("stored price list: {e}")))?;
            Ok((list, Some(at)))
        }
    }
}

pub(crate) async fn account_terms(
    conn: &mut SqliteConnection,
    account_id: &str,
) -> Result<AccountBilling, StoreError> {
    let row: Option<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT markup_percent, minimum_fee, spending_cap FROM account_billing WHERE account_id = ?",
    )
    .bind(account_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(StoreError::db(format!(
        "reading the billing terms of account {account_id}"
    )))?;
    match row {
        None => Ok(AccountBilling::default()),
        Some((markup, minimum, cap)) => Ok(AccountBilling {
            markup_percent: opt_decimal("markup_percent", markup)?,
            minimum_fee: opt_decimal("minimum_fee", minimum)?,
            spending_cap: opt_decimal("spending_cap", cap)?,
        }),
    }
}

impl Store {
    /// Puts `list` in force from now on (earlier lists are kept). Usage already metered
    /// keeps the granularity it was metered with; open months are rated with `list`.
    pub async fn set_price_list(&self, list: &PriceList) -> Result<(), StoreError> {
        let body = serde_json::to_string(list)
            .map_err(|e| StoreError::Corrupt(format!("serialising the price list: {e}")))?;
        sqlx::query(
            "INSERT INTO price_lists (body, granularity_ms, created_at_ms) VALUES (?, ?, ?)",
        )
        .bind(body)
        .bind(i64::from(list.granularity_ms))
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(StoreError::db("setting the price list"))?;
        Ok(())
    }

    /// The price list in force and when it was set (`None`: the built-in default).
    pub async fn price_list(&self) -> Result<(PriceList, Option<i64>), StoreError> {
        let mut conn = self.conn("reading the price list").await?;
        current_price_list(&mut conn).await
    }

    /// Account `account_id`'s own terms (all `None` when it has none).
    pub async fn account_billing(&self, account_id: &str) -> Result<AccountBilling, StoreError> {
        let mut conn = self.conn("reading billing terms").await?;
        account_terms(&mut conn, account_id).await
    }

    /// Replaces account `account_id`'s terms. [`StoreError::AccountNotFound`] for an
    /// unknown account.
    pub async fn set_account_billing(
        &self,
        account_id: &str,
        terms: &AccountBilling,
    ) -> Result<(), StoreError> {
        let text = |d: Option<Decimal>| d.map(|d| d.normalize().to_string());
        sqlx::query(
            "INSERT INTO account_billing (account_id, markup_percent, minimum_fee, spending_cap, \
             updated_at_ms) VALUES (?, ?, ?, ?, ?) ON CONFLICT (account_id) DO UPDATE SET \
             markup_percent = excluded.markup_percent, minimum_fee = excluded.minimum_fee, \
             spending_cap = excluded.spending_cap, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(account_id)
        .bind(text(terms.markup_percent))
        .bind(text(terms.minimum_fee))
        .bind(text(terms.spending_cap))
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_foreign_key_violation(&e) {
                StoreError::AccountNotFound(account_id.to_string())
            } else {
                StoreError::db(format!("setting the billing terms of account {account_id}"))(e)
            }
        })?;
        Ok(())
    }
}
