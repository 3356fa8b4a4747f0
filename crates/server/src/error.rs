//! The one mapping from failures to HTTP statuses and JSON error bodies.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use refinery_domain::ManifestError;
use refinery_invocation::InvocationError;
use refinery_pool::PoolError;
use refinery_store::StoreError;
use serde_json::json;

/// An API request that could not be served. User code failing is NOT an `ApiError`: it
/// is a normal execution with `status: "error"`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid API key: send `Authorization: Bearer <key>` (set REFINERY_API_KEY for the CLI)")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    /// The key is an account's, but the operator disabled that account: 403.
    #[error("account {0} is disabled by the operator: its keys are refused and none of its code runs; ask the operator to enable it (refinery accounts enable {0})")]
    AccountDisabled(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    /// A well-formed request this server cannot honour as asked: 422.
    #[error("{0}")]
    Unprocessable(String),
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("{}the limit is {limit} bytes (6 MB); send a smaller payload, or a reference to the data (e.g. a URL) instead", size.map(|s| format!("the request body is {s} bytes; ")).unwrap_or_default())]
    PayloadTooLarge { size: Option<usize>, limit: usize },
    /// A deploy over one of the upload limits (`limit` names it, `limit_value` is its
    /// value: bytes, or a number of files): 413.
    #[error("{message}")]
    UploadTooLarge {
        message: String,
        limit: &'static str,
        limit_value: usize,
        /// The rest of the body may still be on the wire: close the connection.
        unread: bool,
    },
    /// A deploy that would take the account over its storage quota: 422, nothing stored.
    #[error("{message}")]
    StorageQuota {
        message: String,
        usage_bytes: u64,
        limit_bytes: u64,
        needed_bytes: u64,
    },
    /// The path exists, not with this method (an endpoint trigger): 405 with `Allow`.
    #[error("{message}")]
    MethodNotAllowed {
        message: String,
        allowed: Vec<String>,
    },
    /// Something that existed and was removed on purpose (a pruned deployment): 410.
    #[error("{0}")]
    Gone(String),
    /// Over a limit: 429 with `Retry-After` (whole seconds, rounded up, at least 1).
    #[error("{message}")]
    Throttled {
        message: String,
        retry_after: Duration,
        /// Which limit: `max_concurrency`, `instances`, `memory_mb`, `rate`, `scale_up`,
        /// `deploy_rate` or `deploys_at_once`.
        limit: &'static str,
    },
    /// The account's spending cap is reached (billing): 402, nothing ran.
    #[error("{0}")]
    PaymentRequired(String),
    #[error("{0}")]
    Unavailable(String),
    /// The data dir's filesystem is full (`disk.rs`): 503 with `Retry-After`.
    #[error("{0}")]
    DiskFull(String),
    /// A block's dependency build failed (the package manager's own message): 422
    /// `build_failed`, nothing deployed.
    #[error("{message}")]
    BuildFailed {
        message: String,
        block: String,
        /// The build's last output lines.
        log_tail: Vec<String>,
        /// The deploy's builds so far, the failed one last.
        builds: Vec<serde_json::Value>,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::AccountDisabled(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Manifest(_) | ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge { .. } | ApiError::UploadTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::StorageQuota { .. } | ApiError::BuildFailed { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PaymentRequired(_) => StatusCode::PAYMENT_REQUIRED,
            ApiError::Unavailable(_) | ApiError::DiskFull(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::AccountDisabled(_) => "account_disabled",
            ApiError::NotFound(_) => "not_found",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Conflict(_) => "conflict",
            ApiError::Manifest(_) => "invalid_manifest",
            ApiError::Unprocessable(_) => "unsupported_here",
            ApiError::PayloadTooLarge { .. } | ApiError::UploadTooLarge { .. } => {
                "payload_too_large"
            }
            ApiError::StorageQuota { .. } => "storage_quota",
            ApiError::BuildFailed { .. } => "build_failed",
            ApiError::Gone(_) => "gone",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Throttled { .. } => "throttled",
            ApiError::PaymentRequired(_) => "spending_cap_reached",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::DiskFull(_) => "disk_full",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "internal error");
        }
        let mut body = json!({ "error": { "code": self.code(), "message": self.to_string() } });
        if let ApiError::Manifest(e) = &self {
            body["error"]["file"] = json!(e.file);
            body["error"]["line"] = json!(e.line);
            body["error"]["column"] = json!(e.column);
            body["error"]["field"] = json!(e.field);
        }
        if let ApiError::BuildFailed {
            block,
            log_tail,
            builds,
            ..
        } = &self
        {
            body["error"]["block"] = json!(block);
            body["error"]["log_tail"] = json!(log_tail);
            body["builds"] = json!(builds);
        }
        if let ApiError::PayloadTooLarge { limit, .. } = &self {
            body["error"]["limit_bytes"] = json!(limit);
        }
        if let ApiError::UploadTooLarge {
            limit, limit_value, ..
        } = &self
        {
            body["error"]["limit"] = json!(limit);
            body["error"]["limit_value"] = json!(limit_value);
        }
        if let ApiError::StorageQuota {
            usage_bytes,
            limit_bytes,
            needed_bytes,
            ..
        } = &self
        {
            body["error"]["limit"] = json!("storage_mb");
            body["error"]["usage_bytes"] = json!(usage_bytes);
            body["error"]["limit_bytes"] = json!(limit_bytes);
            body["error"]["needed_bytes"] = json!(needed_bytes);
        }
        if let ApiError::Throttled {
            limit, retry_after, ..
        } = &self
        {
            body["error"]["limit"] = json!(limit);
            body["error"]["retry_after_s"] = json!(retry_after_secs(*retry_after));
        }
        if let ApiError::DiskFull(_) = &self {
            body["error"]["retry_after_s"] = json!(retry_after_secs(crate::disk::DISK_RETRY_AFTER));
        }
        let mut response = (status, Json(body)).into_response();
        if matches!(
            self,
            ApiError::PayloadTooLarge { .. } | ApiError::UploadTooLarge { unread: true, .. }
        ) {
            // The unread rest of the body is still on the wire: this connection is done.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let ApiError::Throttled { retry_after, .. } = &self {
            let secs = retry_after_secs(*retry_after).to_string();
            if let Ok(value) = HeaderValue::from_str(&secs) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        if let ApiError::MethodNotAllowed { allowed, .. } = &self {
            if let Ok(value) = HeaderValue::from_str(&allowed.join(", ")) {
                response.headers_mut().insert(header::ALLOW, value);
            }
        }
        if let ApiError::DiskFull(_) = &self {
            let secs = retry_after_secs(crate::disk::DISK_RETRY_AFTER);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// `Retry-After` in whole seconds: rounded up (never "retry now" when it is too early),
/// at least 1.
fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AccountExists(_) => ApiError::Conflict(e.to_string()),
            StoreError::ProjectNotFound(_)
            | StoreError::SecretNotFound { .. }
            | StoreError::DeploymentNotFound { .. }
            | StoreError::AccountNotFound(_) => ApiError::NotFound(e.to_string()),
            StoreError::DeploymentPruned { .. } => ApiError::Gone(e.to_string()),
            StoreError::TooManySecrets { .. } => ApiError::Unprocessable(e.to_string()),
            StoreError::StorageQuota {
                used_bytes,
                needed_bytes,
                limit_bytes,
                ..
            } => ApiError::StorageQuota {
                message: e.to_string(),
                usage_bytes: used_bytes,
                limit_bytes,
                needed_bytes,
            },
            StoreError::Closed(_) => ApiError::Unavailable(e.to_string()),
            // Routes that write on the hot path say more (`DiskSpace::store_error`).
            _ if e.is_disk_full() => ApiError::DiskFull(format!(
                "{e}: the server's data directory is out of disk space and nothing was \
                 written; retry later (the operator must free space on its filesystem)"
            )),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        InvocationError::from(e).into()
    }
}

/// One variant, one status and body (the same as the invoke route answered before the
/// invocation service existed).
impl From<InvocationError> for ApiError {
    fn from(e: InvocationError) -> Self {
        match e {
            InvocationError::ProjectNotFound { .. } | InvocationError::BlockNotFound { .. } => {
                ApiError::NotFound(e.to_string())
            }
            InvocationError::SpendingCapReached { .. } => ApiError::PaymentRequired(e.to_string()),
            InvocationError::DiskFull { message } => ApiError::DiskFull(message),
            InvocationError::Throttled {
                message,
                retry_after,
                limit,
            } => ApiError::Throttled {
                message,
                retry_after,
                limit: limit.as_str(),
            },
            InvocationError::AccountDisabled { account } => ApiError::AccountDisabled(account),
            InvocationError::Unavailable(message) => ApiError::Unavailable(message),
            InvocationError::SecretUnavailable(message) => ApiError::Unprocessable(message),
            InvocationError::Internal(message) => ApiError::Internal(message),
        }
    }
}
