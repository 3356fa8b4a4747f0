//! Metering and billing over the API: the operator's price list, each account's terms
//! (markup, minimum fee, spending cap), usage month to date, monthly bills and their
//! closing, CSV export; plus the background task that closes each month once it is over.
//! (The spending-cap admission of invocations is the invocation service's; a change of
//! terms here invalidates its cache.)
//!
//! Tenancy: an account sees only its own usage, terms and bills (another account is
//! "not found", as everywhere); the operator sees every account's. Only the operator sets
//! prices, markups and minimum fees and closes months; an account may set its own
//! spending cap.

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use refinery_billing::csv::{to_csv, CsvRow};
use refinery_billing::money::de_decimal;
use refinery_billing::price::check_amount;
use refinery_billing::{Decimal, Period, PriceList};
use refinery_store::{Account, AccountBilling, BillRecord, Store};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::accounts::visible_account;
use crate::routes::rfc3339;
use crate::state::{AppState, SharedState};

/// How often the server looks for a month to close automatically.
const CLOSE_CHECK_INTERVAL: Duration = Duration::from_secs(60);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Closes every month that is over and still open, now and then every minute, until the
/// server stops (the task is aborted).
pub async fn close_due_months(store: Store) {
    let mut interval = tokio::time::interval(CLOSE_CHECK_INTERVAL);
    loop {
        interval.tick().await;
        let due = match store.periods_due(now_ms()).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "finding months to close");
                continue;
            }
        };
        for period in due {
            match store.close_period(period, now_ms()).await {
                Ok(Ok(bills)) => {
                    tracing::info!(%period, bills = bills.len(), "closed the month automatically")
                }
                Ok(Err(e)) => tracing::warn!(%period, error = %e, "closing the month"),
                Err(e) => tracing::warn!(%period, error = %e, "closing the month"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Price list.

/// `GET /v1/pricing`: the price list in force (any caller).
pub async fn pricing(
    State(state): State<SharedState>,
    _caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let (list, set_at) = state.store.price_list().await?;
    Ok(Json(pricing_json(&list, set_at)))
}

/// `PUT /v1/pricing` (operator): puts a new price list in force.
pub async fn set_pricing(
    State(state): State<SharedState>,
    caller: Caller,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require_operator()?;
    let Json(body) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "{}; send the price list as JSON (see docs/BILLING.md)",
            e.body_text()
        ))
    })?;
    let list = PriceList::from_json(body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    state.store.set_price_list(&list).await?;
    tracing::info!(currency = %list.currency, "price list set");
    let (list, set_at) = state.store.price_list().await?;
    Ok(Json(pricing_json(&list, set_at)))
}

fn pricing_json(list: &PriceList, set_at: Option<i64>) -> Value {
    json!({
        "price_list": list,
        "set_at": set_at.map(rfc3339),
        "default": set_at.is_none(),
    })
}

// ---------------------------------------------------------------------------------------
// Account terms.

/// A decimal in a request body, written as a string or a number.
#[derive(Deserialize)]
struct Amount(#[serde(deserialize_with = "de_decimal")] Decimal);

/// A change of terms: a field given sets it, `null` removes it (default / no cap), a
/// field left out stays.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetBilling {
    #[serde(default, deserialize_with = "present")]
    markup_percent: Option<Option<Amount>>,
    #[serde(default, deserialize_with = "present")]
    minimum_fee: Option<Option<Amount>>,
    #[serde(default, deserialize_with = "present")]
    spending_cap: Option<Option<Amount>>,
}

fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// `GET /v1/accounts/{account}/billing` (operator, or the account itself).
pub async fn account_billing(
    State(state): State<SharedState>,
    caller: Caller,
    Path(account): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = visible_account(&state, &caller, &account).await?;
    billing_json(&state, &account).await.map(Json)
}

/// `PUT /v1/accounts/{account}/billing`: the operator sets markup, minimum fee and cap;
/// an account may set only its own spending cap.
pub async fn set_account_billing(
    State(state): State<SharedState>,
    caller: Caller,
    Path(account): Path<String>,
    body: Result<Json<SetBilling>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(change) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "{}; expected e.g. {{\"markup_percent\": \"37.5\", \"minimum_fee\": \"5\", \"spending_cap\": \"10\"}} (null = the default / no cap)",
            e.body_text()
        ))
    })?;
    let account = visible_account(&state, &caller, &account).await?;
    if matches!(caller, Caller::Account(_))
        && (change.markup_percent.is_some() || change.minimum_fee.is_some())
    {
        return Err(ApiError::Forbidden(
            "only the operator sets an account's markup and minimum fee; an account may set its own spending_cap".into(),
        ));
    }
    let mut terms = state.store.account_billing(&account.id).await?;
    for (field, change, slot) in [
        (
            "markup_percent",
            change.markup_percent,
            &mut terms.markup_percent,
        ),
        ("minimum_fee", change.minimum_fee, &mut terms.minimum_fee),
        ("spending_cap", change.spending_cap, &mut terms.spending_cap),
    ] {
        if let Some(value) = change {
            let value = value.map(|Amount(d)| d);
            if let Some(Err(problem)) = value.map(check_amount) {
                return Err(ApiError::BadRequest(format!(
                    "{field}: {problem}; use null to return to the default (or, for spending_cap, to remove it)"
                )));
            }
            *slot = value;
        }
    }
    state.store.set_account_billing(&account.id, &terms).await?;
    state.billing_changed();
    tracing::info!(account = %account.id, ?terms, "billing terms set");
    billing_json(&state, &account).await.map(Json)
}

async fn billing_json(state: &AppState, account: &Account) -> Result<Value, ApiError> {
    let terms: AccountBilling = state.store.account_billing(&account.id).await?;
    let (prices, _) = state.store.price_list().await?;
    let effective = terms.terms(&prices);
    let spending = state.store.spending(account, now_ms()).await?;
    Ok(json!({
        "account_id": account.id,
        "account": account.name,
        "currency": prices.currency,
        "markup_percent": effective.markup_percent,
        "minimum_fee": effective.minimum_fee,
        "spending_cap": terms.spending_cap,
        "overrides": terms,
        "defaults": {
            "markup_percent": prices.default_markup_percent,
            "minimum_fee": prices.default_minimum_fee,
        },
        "spending": spending.map(|s| json!({
            "period": s.period,
            "spent": s.spent,
            "cap": s.cap,
            "reached": s.reached,
        })),
    }))
}

// ---------------------------------------------------------------------------------------
// Usage and bills.

#[derive(Deserialize)]
pub struct BillQuery {
    /// `YYYY-MM`; default: the open month.
    month: Option<String>,
    /// Name or id; accounts may only name themselves.
    account: Option<String>,
    /// `csv` for a CSV export instead of JSON.
    format: Option<String>,
}

fn parse_period(text: &str) -> Result<Period, ApiError> {
    text.parse()
        .map_err(|e: refinery_billing::PeriodError| ApiError::BadRequest(e.to_string()))
}

/// The accounts a request covers: the caller itself, the one named (operator), or all
/// (operator, none named).
async fn accounts_for(
    state: &SharedState,
    caller: &Caller,
    named: Option<&str>,
) -> Result<Vec<Account>, ApiError> {
    match (caller, named) {
        (Caller::Account(me), None) => Ok(vec![me.clone()]),
        (_, Some(name)) => Ok(vec![visible_account(state, caller, name).await?]),
        (Caller::Operator, None) => Ok(state.store.list_accounts().await?),
    }
}

/// `GET /v1/usage?month=&account=`: usage per project and block with the cost so far
/// (month to date for the open month; as closed for a closed one).
pub async fn usage(
    State(state): State<SharedState>,
    caller: Caller,
    Query(query): Query<BillQuery>,
) -> Result<Json<Value>, ApiError> {
    let now = now_ms();
    let period = match &query.month {
        Some(m) => parse_period(m)?,
        None => state.store.open_period(now).await?,
    };
    let mut list = Vec::new();
    for account in accounts_for(&state, &caller, query.account.as_deref()).await? {
        let record = state.store.bill(&account, period, now).await?;
        let mut usage = usage_json(&record);
        let days: Vec<Value> = state
            .store
            .usage_by_day(&account.id, period)
            .await?
            .into_iter()
            .map(|(day, requests, mb_ms)| {
                json!({
                    "day": day,
                    "requests": requests,
                    "gb_seconds": (Decimal::from(mb_ms) / Decimal::from(1024 * 1000)).normalize(),
                })
            })
            .collect();
        usage["days"] = json!(days);
        list.push(usage);
    }
    Ok(Json(one_or_all(
        &caller,
        query.account.as_deref(),
        period,
        "usage",
        list,
    )))
}

/// `GET /v1/bills?month=&account=&format=`: closed bills (of the caller, or all for the
/// operator).
pub async fn list_bills(
    State(state): State<SharedState>,
    caller: Caller,
    Query(query): Query<BillQuery>,
) -> Result<Response, ApiError> {
    let period = query.month.as_deref().map(parse_period).transpose()?;
    let account_id = match (&caller, query.account.as_deref()) {
        (Caller::Operator, None) => None,
        (_, named) => accounts_for(&state, &caller, named)
            .await?
            .into_iter()
            .next()
            .map(|a| a.id),
    };
    let bills = state.store.bills(account_id.as_deref(), period).await?;
    respond(
        query.format.as_deref(),
        &bills,
        |bills| json!({ "bills": bills.iter().map(bill_json).collect::<Vec<_>>() }),
    )
}

/// `GET /v1/bills/{month}?account=&format=`: the month's bill of the caller (or of every
/// account, for the operator): stored if the month is closed, month to date otherwise.
pub async fn show_bill(
    State(state): State<SharedState>,
    caller: Caller,
    Path(month): Path<String>,
    Query(query): Query<BillQuery>,
) -> Result<Response, ApiError> {
    let period = parse_period(&month)?;
    let now = now_ms();
    let mut bills = Vec::new();
    for account in accounts_for(&state, &caller, query.account.as_deref()).await? {
        bills.push(state.store.bill(&account, period, now).await?);
    }
    let single = !matches!(caller, Caller::Operator) || query.account.is_some();
    respond(query.format.as_deref(), &bills, |bills| {
        if single {
            bills.first().map(bill_json).unwrap_or(Value::Null)
        } else {
            json!({ "period": period, "bills": bills.iter().map(bill_json).collect::<Vec<_>>() })
        }
    })
}

/// `POST /v1/bills/{month}/close` (operator): closes a month that is over into immutable
/// bills; closing again returns the same bills. The current month (or a later one) is 409:
/// closed early, the rest of its usage would be billed in the following month.
pub async fn close(
    State(state): State<SharedState>,
    caller: Caller,
    Path(month): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_operator()?;
    let period = parse_period(&month)?;
    let bills = state
        .store
        .close_period(period, now_ms())
        .await?
        .map_err(|e| ApiError::Conflict(e.to_string()))?;
    let closed_at = state.store.period_closed_at(period).await?;
    Ok(Json(json!({
        "period": period,
        "closed_at": closed_at.map(rfc3339),
        "bills": bills.iter().map(bill_json).collect::<Vec<_>>(),
    })))
}

fn respond(
    format: Option<&str>,
    bills: &[BillRecord],
    as_json: impl FnOnce(&[BillRecord]) -> Value,
) -> Result<Response, ApiError> {
    match format {
        None | Some("json") => Ok(Json(as_json(bills)).into_response()),
        Some("csv") => {
            let periods: Vec<String> = bills.iter().map(|b| b.period.to_string()).collect();
            let rows: Vec<CsvRow<'_>> = bills
                .iter()
                .zip(&periods)
                .map(|(b, period)| CsvRow {
                    period,
                    account_id: &b.account_id,
                    account: &b.account,
                    status: &b.status,
                    bill: &b.bill,
                })
                .collect();
            Ok((
                [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
                to_csv(&rows),
            )
                .into_response())
        }
        Some(other) => Err(ApiError::BadRequest(format!(
            "unknown format `{other}`: use `json` (the default) or `csv`"
        ))),
    }
}

fn one_or_all(
    caller: &Caller,
    named: Option<&str>,
    period: Period,
    key: &str,
    mut list: Vec<Value>,
) -> Value {
    if matches!(caller, Caller::Account(_)) || named.is_some() {
        list.pop().unwrap_or(Value::Null)
    } else {
        json!({ "period": period, key: list })
    }
}

fn bill_json(record: &BillRecord) -> Value {
    let mut value = serde_json::to_value(record).unwrap_or(Value::Null);
    value["as_of"] = json!(rfc3339(record.as_of_ms));
    value["closed_at"] = json!(record.closed_at_ms.map(rfc3339));
    value
}

fn usage_json(record: &BillRecord) -> Value {
    let gb_seconds = |mb_ms: i64| Decimal::from(mb_ms) / Decimal::from(1024 * 1000);
    let blocks: Vec<Value> = record
        .blocks
        .iter()
        .map(|b| {
            json!({
                "project": b.project,
                "block": b.block,
                "requests": b.requests,
                "billed_ms": b.billed_ms,
                "init_billed_ms": b.init_billed_ms,
                "gb_seconds": gb_seconds(b.mb_ms).normalize(),
                "init_gb_seconds": gb_seconds(b.init_mb_ms).normalize(),
                "egress_bytes": b.egress_bytes,
            })
        })
        .collect();
    let usage = &record.usage;
    json!({
        "account_id": record.account_id,
        "account": record.account,
        "period": record.period,
        "status": record.status,
        "as_of": rfc3339(record.as_of_ms),
        "currency": record.bill.currency,
        "totals": {
            "requests": usage.requests,
            "gb_seconds": usage.gb_seconds().normalize(),
            "init_gb_seconds": usage.init_gb_seconds().normalize(),
            "egress_bytes": usage.egress_bytes,
            "storage_gb_months": usage.storage_gb_months.normalize(),
        },
        "blocks": blocks,
        "cost": {
            "subtotal": record.bill.subtotal,
            "markup_percent": record.bill.markup_percent,
            "markup": record.bill.markup,
            "spent": record.bill.spent,
            "total": record.bill.total,
        },
    })
}
