//! Who is calling: the operator, or one account. Every handler takes a [`Caller`].

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use refinery_store::Account;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::keys::hash_key;
use crate::state::SharedState;

pub enum Caller {
    Operator,
    Account(Account),
}

impl Caller {
    /// The calling account; the operator key is not an account.
    pub fn account(&self) -> Result<&Account, ApiError> {
        match self {
            Caller::Account(account) => Ok(account),
            Caller::Operator => Err(ApiError::Forbidden(
                "this endpoint acts for an account; the operator key is not one. Create an account with `refinery accounts create NAME` and use its key".into(),
            )),
        }
    }

    pub fn require_operator(&self) -> Result<(), ApiError> {
        match self {
            Caller::Operator => Ok(()),
            Caller::Account(_) => Err(ApiError::Forbidden(
                "this endpoint is for the operator only: use the key in the server's operator.key"
                    .into(),
            )),
        }
    }
}

impl FromRequestParts<SharedState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        Caller::from_headers(&parts.headers, state).await
    }
}

impl Caller {
    /// The caller that `headers`' `Authorization: Bearer KEY` names.
    pub async fn from_headers(
        headers: &HeaderMap,
        state: &SharedState,
    ) -> Result<Caller, ApiError> {
        let header = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthorized)?;
        let key = header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(ApiError::Unauthorized)?;
        let key_hash = hash_key(key);
        // Constant time, so response timing says nothing about how much of a guess matched.
        if bool::from(
            key_hash
                .as_bytes()
                .ct_eq(state.operator_key_hash.as_bytes()),
        ) {
            return Ok(Caller::Operator);
        }
        match state.account_by_key_hash(&key_hash).await? {
            Some(account) if account.is_disabled() => Err(ApiError::AccountDisabled(account.name)),
            Some(account) => Ok(Caller::Account(account)),
            None => Err(ApiError::Unauthorized),
        }
    }
}
