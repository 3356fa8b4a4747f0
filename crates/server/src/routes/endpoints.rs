//! Public HTTP endpoints: `{METHOD} /http/{account}/{project}{path}` starts a run of the
//! project's live deployment at the endpoint that answers it, and replies with the first
//! response the run reaches (`endpoint_http.rs` makes the event and shapes the reply).
//!
//! - The account is named in the path; an `auth = "none"` endpoint needs no key, an
//!   `auth = "key"` one a key of that account (the `Authorization` header is then not passed
//!   to the block).
//! - `OPTIONS` with `Access-Control-Request-Method` is a CORS preflight, answered here for
//!   an endpoint with `cors`; other replies of such an endpoint carry its CORS headers.
//! - Past the endpoint's `timeout_s`: 504 with the run id (the run goes on). A run that
//!   fails before responding: 500 with the run id, never the error's text (it is in the
//!   run's steps). A run that succeeds without responding, or a response that is not a valid
//!   HTTP response: 502 saying so. Every reply has a `refinery-run-id` header.
//! - Errors of the route itself (no such account, project, endpoint or method; a key
//!   missing) are the API's JSON errors: 404, 405 with `Allow`, 401, 403, 413, 429.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_MAX_AGE, AUTHORIZATION, ORIGIN, VARY,
};
use axum::http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Extension;
use refinery_domain::limits::MAX_PAYLOAD_BYTES;
use refinery_domain::{Cors, EndpointAuth};
use refinery_engine::EndpointRoute;
use serde_json::json;

use crate::auth::Caller;
use crate::endpoint_http::{self, json_response};
use crate::error::ApiError;
use crate::routes::invoke::content_length;
use crate::state::SharedState;

/// The header naming the run an endpoint call started.
pub const RUN_ID_HEADER: &str = "refinery-run-id";

#[derive(serde::Deserialize)]
pub struct EndpointPath {
    account: String,
    project: String,
}

#[allow(clippy::too_many_arguments)]
pub async fn call(
    State(state): State<SharedState>,
    Path(at): Path<EndpointPath>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Result<Bytes, BytesRejection>,
) -> Response<Body> {
    let origin = headers
        .get(ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match serve(&state, &at, &method, &uri, &headers, peer, body).await {
        Ok((response, cors)) => with_cors(response, cors.as_ref(), origin.as_deref()),
        Err((error, cors)) => with_cors(error.into_response(), cors.as_ref(), origin.as_deref()),
    }
}

type Served = (Response<Body>, Option<Cors>);
type Failed = (ApiError, Option<Cors>);

async fn serve(
    state: &SharedState,
    at: &EndpointPath,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Served, Failed> {
    let plain = |e: ApiError| (e, None);
    let account = state
        .account_by_name(&at.account)
        .await
        .map_err(plain)?
        .ok_or_else(|| {
            plain(ApiError::NotFound(format!(
                "no account `{}`: an endpoint's URL is /http/ACCOUNT/PROJECT/PATH, with the account's name",
                at.account
            )))
        })?;
    if account.is_disabled() {
        return Err(plain(ApiError::AccountDisabled(account.name)));
    }
    let path = below_project(uri.path());
    let preflight = method == Method::OPTIONS
        && headers.contains_key(axum::http::header::ACCESS_CONTROL_REQUEST_METHOD);
    let routed_method = if preflight {
        headers
            .get(axum::http::header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_uppercase()
    } else {
        method.as_str().to_string()
    };
    let EndpointRoute { endpoint, params } = state
        .engine
        .endpoint(&account.id, &at.project, &routed_method, path)
        .await
        .map_err(|e| plain(e.into()))?;
    let params = params
        .into_iter()
        .map(|(name, value)| {
            let decoded = percent_encoding::percent_decode_str(&value).decode_utf8_lossy();
            (name, decoded.into_owned())
        })
        .collect();
    let cors = endpoint.cors.clone();
    let fail = |e: ApiError| (e, cors.clone());
    if preflight {
        return match &endpoint.cors {
            Some(cors) => Ok((preflight_response(cors), Some(cors.clone()))),
            None => Err(fail(ApiError::MethodNotAllowed {
                message: format!(
                    "endpoint `{}` has no `cors` setting, so it answers no CORS preflight: add `cors = {{ allow_origins = [\"https://your.site\"] }}` to it in the manifest",
                    endpoint.name
                ),
                allowed: vec![routed_method],
            })),
        };
    }
    let mut headers = headers.clone();
    if endpoint.auth == EndpointAuth::Key {
        let caller = Caller::from_headers(&headers, state).await.map_err(fail)?;
        match caller {
            Caller::Account(a) if a.id == account.id => {}
            _ => {
                return Err(fail(ApiError::Forbidden(format!(
                    "endpoint `{}` of `{}` needs an API key of account `{}` (`Authorization: Bearer KEY`)",
                    endpoint.name, at.project, account.name
                ))))
            }
        }
        // The key is not the block's to see (nor its logs').
        headers.remove(AUTHORIZATION);
    }
    let body = body.map_err(|rejection| {
        fail(if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                size: content_length(&headers),
                limit: MAX_PAYLOAD_BYTES,
            }
        } else {
            ApiError::BadRequest(format!(
                "reading the request body: {}",
                rejection.body_text()
            ))
        })
    })?;
    let source_ip = peer
        .map(|Extension(ConnectInfo(p))| p.ip().to_string())
        .unwrap_or_default();
    let request_id = format!("req_{}", uuid::Uuid::now_v7().simple());
    let event = endpoint_http::event(&endpoint_http::Request {
        method: method.as_str(),
        path,
        resource: endpoint.path.as_str(),
        query: uri.query(),
        headers: &headers,
        params: &params,
        body: &body,
        request_id: &request_id,
        source_ip: &source_ip,
        account: &account.name,
        project: &at.project,
        endpoint: &endpoint.name,
        time_ms: chrono::Utc::now().timestamp_millis(),
    });
    let size = event.to_string().len();
    if size > MAX_PAYLOAD_BYTES {
        return Err(fail(ApiError::PayloadTooLarge {
            size: Some(size),
            limit: MAX_PAYLOAD_BYTES,
        }));
    }
    let (started, response) = state
        .engine
        .start_run_for_response(&account, &at.project, &endpoint.name, event)
        .await
        .map_err(|e| fail(e.into()))?;
    let run_id = started.run_id;
    let timeout = Duration::from_secs(endpoint.timeout_s.into());
    let reply = match tokio::time::timeout(timeout, response).await {
        Ok(Ok(output)) => endpoint_http::reply(&output).unwrap_or_else(|problem| {
            gateway_error(
                StatusCode::BAD_GATEWAY,
                "invalid_response",
                &format!("the run's response is not a valid HTTP response: {problem}; see `refinery runs show {run_id}`"),
                &run_id,
            )
        }),
        // The run ended without responding.
        Ok(Err(_)) => match state.engine.run(&account.id, &run_id).await {
            Ok(run) if run.status == "succeeded" => gateway_error(
                StatusCode::BAD_GATEWAY,
                "no_response",
                &format!(
                    "run {run_id} ended without reaching a response: connect the block whose output is the reply to a `[[responses]]` node with a `then` transition"
                ),
                &run_id,
            ),
            _ => gateway_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "run_failed",
                &format!("run {run_id} failed before it responded; its steps and logs: `refinery runs show {run_id}`"),
                &run_id,
            ),
        },
        Err(_) => gateway_error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            &format!(
                "run {run_id} did not respond within the endpoint's timeout_s ({}s); it goes on: `refinery runs show {run_id}`",
                endpoint.timeout_s
            ),
            &run_id,
        ),
    };
    let mut reply = reply;
    if let Ok(value) = HeaderValue::from_str(&run_id) {
        reply.headers_mut().insert(RUN_ID_HEADER, value);
    }
    Ok((reply, cors))
}

/// The request's path below `/http/{account}/{project}` (`/` at least), still
/// percent-encoded as sent.
fn below_project(path: &str) -> &str {
    let mut slashes = path.match_indices('/').skip(3);
    match slashes.next() {
        Some((index, _)) => &path[index..],
        None => "/",
    }
}

fn gateway_error(status: StatusCode, code: &str, message: &str, run_id: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message}, "run_id": run_id}),
    )
}

fn preflight_response(cors: &Cors) -> Response<Body> {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(
        ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
    );
    if let Ok(value) = HeaderValue::from_str(&cors.allow_headers.join(", ")) {
        headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, value);
    }
    headers.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from(cors.max_age_s));
    response
}

/// Adds the endpoint's CORS headers for a request from `origin` (none without `cors`, or
/// for an origin it does not allow: the browser then refuses the reply).
fn with_cors(
    mut response: Response<Body>,
    cors: Option<&Cors>,
    origin: Option<&str>,
) -> Response<Body> {
    let (Some(cors), Some(origin)) = (cors, origin) else {
        return response;
    };
    if let Some(allowed) = cors.allow_origin(origin) {
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&allowed) {
            headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, value);
        }
        if allowed != "*" {
            headers.append(VARY, HeaderValue::from_static("origin"));
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_below_the_project() {
        assert_eq!(below_project("/http/acme/shop"), "/");
        assert_eq!(below_project("/http/acme/shop/"), "/");
        assert_eq!(
            below_project("/http/acme/shop/orders/4%202"),
            "/orders/4%202"
        );
    }

    #[test]
    fn cors_headers_only_for_allowed_origins() {
        let cors = Cors {
            allow_origins: vec!["https://app.example.com".into()],
            allow_headers: vec!["content-type".into()],
            max_age_s: 60,
        };
        let allowed = with_cors(
            Response::new(Body::empty()),
            Some(&cors),
            Some("https://app.example.com"),
        );
        assert_eq!(
            allowed.headers()[ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example.com"
        );
        assert_eq!(allowed.headers()[VARY], "origin");
        let other = with_cors(
            Response::new(Body::empty()),
            Some(&cors),
            Some("https://evil.example"),
        );
        assert!(other.headers().get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    }
}
