//! `/v1/accounts`: the operator creates, lists, disables and enables customer accounts,
//! rotates their keys and sets their quotas; an account may read its own quota and rotate
//! its own key.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use refinery_domain::names::{is_valid_name, NAME_RULE};
use refinery_pool::{Quota, QuotaOverride};
use refinery_store::{Account, QuotaOverrides};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::keys;
use crate::routes::rfc3339;
use crate::state::SharedState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    name: String,
}

/// Creates an account and returns its API key: the only time the key is ever shown.
pub async fn create(
    State(state): State<SharedState>,
    caller: Caller,
    body: Result<Json<CreateAccount>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require_operator()?;
    let Json(request) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "{}; expected {{\"name\": \"acme\"}}",
            e.body_text()
        ))
    })?;
    if !is_valid_name(&request.name) {
        return Err(ApiError::BadRequest(format!(
            "invalid account name `{}`: expected {NAME_RULE}",
            request.name
        )));
    }
    let key = keys::generate_key();
    let account = state
        .store
        .create_account(
            &request.name,
            &keys::hash_key(&key),
            &keys::display_prefix(&key),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": account.id,
            "name": account.name,
            "api_key": key,
            "created_at": rfc3339(account.created_at_ms),
        })),
    ))
}

pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require_operator()?;
    let accounts = state.store.list_accounts().await?;
    let list: Vec<Value> = accounts.iter().map(account_json).collect();
    Ok(Json(json!({ "accounts": list })))
}

/// An account as the API shows it (never its key).
fn account_json(a: &Account) -> Value {
    json!({
        "id": a.id,
        "name": a.name,
        "created_at": rfc3339(a.created_at_ms),
        "state": if a.is_disabled() { "disabled" } else { "active" },
        "disabled_at": a.disabled_at_ms.map(rfc3339),
    })
}

/// `POST /v1/accounts/{account}/disable` (operator): the account's keys are refused with
/// 403 `account_disabled` from now on, its idle instances (provisioned ones included) are
/// destroyed at once and busy ones when their invocation ends; nothing of it runs or is
/// provisioned (also after a restart) until it is enabled. Its data stays. Idempotent.
pub async fn disable(
    State(state): State<SharedState>,
    caller: Caller,
    Path(account): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = set_disabled(&state, &caller, &account, true).await?;
    // Store first (a restart keeps it disabled), then the cache (its keys now read the
    // disabled state), then the pool (nothing of it starts; its instances go).
    state.forget_account_keys(&account.id);
    state.pool.disable_account(&account.id).await;
    tracing::info!(account = %account.id, name = %account.name, "account disabled");
    Ok(Json(account_json(&account)))
}

/// `POST /v1/accounts/{account}/enable` (operator): its keys work again and its live
/// deployments' provisioned (`min_warm`) instances are started before the reply.
pub async fn enable(
    State(state): State<SharedState>,
    caller: Caller,
    Path(account): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = set_disabled(&state, &caller, &account, false).await?;
    state.pool.enable_account(&account.id);
    state.forget_account_keys(&account.id);
    for project in state.store.list_projects(&account.id).await? {
        if let Some(live) = state
            .store
            .live_deployment(&account.id, &project.name)
            .await?
        {
            super::deployments::provision(&state, &account, &live).await;
        }
    }
    tracing::info!(account = %account.id, name = %account.name, "account enabled");
    Ok(Json(account_json(&account)))
}

/// The operator's disabling (`disabled`) or enabling of `account` (id or name), in the
/// store; returns the account as it now is.
async fn set_disabled(
    state: &SharedState,
    caller: &Caller,
    account: &str,
    disabled: bool,
) -> Result<Account, ApiError> {
    caller.require_operator()?;
    let account = visible_account(state, caller, account).await?;
    Ok(state
        .store
        .set_account_disabled(&account.id, disabled)
        .await?)
}

/// `POST /v1/accounts/{account}/rotate-key` (the operator, or the account itself): a new
/// API key replaces every key the account had; the old one is refused from this reply on.
/// The new key is in the reply only, as with `create`.
pub async fn rotate_key(
    State(state): State<SharedState>,
    caller: Caller,
    Path(account): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = visible_account(&state, &caller, &account).await?;
    let key = keys::generate_key();
    state
        .store
        .rotate_api_key(
            &account.id,
            &keys::hash_key(&key),
            &keys::display_prefix(&key),
        )
        .await?;
    state.forget_account_keys(&account.id);
    tracing::info!(account = %account.id, name = %account.name, "API key rotated");
    Ok(Json(json!({
        "id": account.id,
        "name": account.name,
        "api_key": key,
    })))
}

/// A quota change: a field given sets that limit, `null` returns it to the server's
/// default, a field left out stays as it is.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetQuota {
    #[serde(default, deserialize_with = "present")]
    instances: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    memory_mb: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    rate: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    burst: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    storage_mb: Option<Option<u64>>,
}

/// Tells a field given as `null` (`Some(None)`) from a field left out (`None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// `GET /v1/accounts/{account}/quota` (`account` = id or name): the effective quota,
/// the account's own settings and the server's defaults, and current usage. For the
/// operator, or the account itself (any other account is "not found").
pub async fn quota(
    State(state): State<SharedState>,
    caller: Caller,
    Path(account): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = visible_account(&state, &caller, &account).await?;
    let overrides = state.store.quota(&account.id).await?;
    Ok(Json(quota_json(&state, &account, &overrides).await?))
}

/// `PUT /v1/accounts/{account}/quota` (operator only): changes an account's quota; takes
/// effect at once for new invocations (running instances are not stopped).
pub async fn set_quota(
    State(state): State<SharedState>,
    caller: Caller,
    Path(account): Path<String>,
    body: Result<Json<SetQuota>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require_operator()?;
    let Json(change) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "{}; expected e.g. {{\"instances\": 10, \"memory_mb\": 2048, \"rate\": 50, \"burst\": 100, \"storage_mb\": 1024}} (null = the server's default)",
            e.body_text()
        ))
    })?;
    let account = visible_account(&state, &caller, &account).await?;
    // One change at a time, so the store and the pool never disagree.
    let _serialised = state.quota_updates.lock().await;
    let mut overrides = state.store.quota(&account.id).await?;
    if let Some(v) = change.instances {
        overrides.instances = v;
    }
    if let Some(v) = change.memory_mb {
        overrides.memory_mb = v;
    }
    if let Some(v) = change.rate {
        overrides.rate = v;
    }
    if let Some(v) = change.burst {
        overrides.burst = v;
    }
    if let Some(v) = change.storage_mb {
        overrides.storage_mb = v;
    }
    pool_override(&overrides)
        .validate()
        .map_err(|e| ApiError::BadRequest(format!("invalid quota: {e}")))?;
    state.store.set_quota(&account.id, &overrides).await?;
    state.pool.set_account_quota(
        &account.id,
        pool_override(&overrides).over(&state.pool.default_quota()),
    );
    tracing::info!(account = %account.id, ?overrides, "quota set");
    Ok(Json(quota_json(&state, &account, &overrides).await?))
}

/// The store's record of an account's settings, as the pool's policy type.
pub fn pool_override(o: &QuotaOverrides) -> QuotaOverride {
    QuotaOverride {
        instances: o.instances,
        memory_mb: o.memory_mb,
        rate: o.rate,
        burst: o.burst,
        storage_mb: o.storage_mb,
    }
}

/// The account `name_or_id` names, if the caller may see it: the operator sees every
/// account, an account only itself. Anything else is 404, as if it did not exist.
pub(super) async fn visible_account(
    state: &SharedState,
    caller: &Caller,
    name_or_id: &str,
) -> Result<Account, ApiError> {
    let not_found = || {
        ApiError::NotFound(format!(
            "no account `{name_or_id}`; list accounts with `refinery accounts list` (operator key)"
        ))
    };
    match caller {
        Caller::Account(me) => {
            if me.id == name_or_id || me.name == name_or_id {
                Ok(me.clone())
            } else {
                Err(not_found())
            }
        }
        Caller::Operator => {
            if let Some(account) = state.store.account(name_or_id).await? {
                return Ok(account);
            }
            state
                .store
                .account_by_name(name_or_id)
                .await?
                .ok_or_else(not_found)
        }
    }
}

fn quota_fields(q: &Quota) -> Value {
    json!({ "instances": q.instances, "memory_mb": q.memory_mb, "rate": q.rate, "burst": q.burst, "storage_mb": q.storage_mb })
}

/// The quota reply; its `storage_bytes` are what the account's kept deployments hold
/// (`refinery_store::storage`).
async fn quota_json(
    state: &SharedState,
    account: &Account,
    overrides: &QuotaOverrides,
) -> Result<Value, ApiError> {
    let storage_bytes = state.store.storage_used(&account.id).await?;
    let usage = state.pool.account_usage(&account.id);
    Ok(json!({
        "account_id": account.id,
        "account": account.name,
        "quota": quota_fields(&usage.quota),
        "overrides": {
            "instances": overrides.instances,
            "memory_mb": overrides.memory_mb,
            "rate": overrides.rate,
            "burst": overrides.burst,
            "storage_mb": overrides.storage_mb,
        },
        "defaults": quota_fields(&state.pool.default_quota()),
        "usage": {
            "instances": usage.instances,
            "memory_mb": usage.memory_mb,
            "tokens": usage.tokens,
            "storage_bytes": storage_bytes,
            "storage_mb": (storage_bytes as f64 / 1_048_576.0 * 100.0).ceil() / 100.0,
        },
    }))
}
