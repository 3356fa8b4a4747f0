//! HTTP endpoints' two translations, kept pure (no I/O) so they are unit-tested:
//! a request into the first block's input, and a response node's output into the reply.
//!
//! The input has the fields of API Gateway's v1 proxy event — `resource`, `path`,
//! `httpMethod`, `headers`, `multiValueHeaders`, `queryStringParameters`,
//! `multiValueQueryStringParameters`, `pathParameters`, `requestContext`, `body`,
//! `isBase64Encoded` — plus `json` (the body parsed, when the request says it is JSON and it
//! parses) and `form` (the fields of an `application/x-www-form-urlencoded` body). A body
//! that is valid UTF-8 is passed as text; any other is base64 with `isBase64Encoded: true`.
//!
//! The reply: an output object with a `statusCode` is an HTTP response — `headers`
//! (strings, numbers or booleans), `multiValueHeaders`, `body` (a string, or any other
//! JSON, which is sent as JSON), `isBase64Encoded` (the body is base64 of the bytes to
//! send). Any other output is a `200` JSON reply of the output itself.

use std::collections::BTreeMap;

use axum::body::{Body, Bytes};
use axum::http::header::{HeaderName, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode};
use base64::Engine as _;
use serde_json::{json, Map, Value};

/// What the event is made from: the request, already routed.
pub struct Request<'a> {
    pub method: &'a str,
    /// The path below `/http/{account}/{project}` (`/` at least).
    pub path: &'a str,
    /// The endpoint's path template (`/orders/{id}`).
    pub resource: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub params: &'a BTreeMap<String, String>,
    pub body: &'a Bytes,
    pub request_id: &'a str,
    pub source_ip: &'a str,
    pub account: &'a str,
    pub project: &'a str,
    pub endpoint: &'a str,
    pub time_ms: i64,
}

/// The first block's input for `request`.
pub fn event(request: &Request<'_>) -> Value {
    let mut headers = Map::new();
    let mut multi_headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in request.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers.insert(name.as_str().to_string(), Value::String(value.clone()));
        multi_headers
            .entry(name.as_str().to_string())
            .or_default()
            .push(value);
    }
    let (query, multi_query) = query_parameters(request.query);
    let content_type = request
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let text = std::str::from_utf8(request.body).ok();
    let (body, base64) = match (request.body.is_empty(), text) {
        (true, _) => (Value::Null, false),
        (false, Some(text)) => (Value::String(text.to_string()), false),
        (false, None) => (
            Value::String(base64::engine::general_purpose::STANDARD.encode(request.body)),
            true,
        ),
    };
    let mut event = json!({
        "resource": request.resource,
        "path": request.path,
        "httpMethod": request.method,
        "headers": headers,
        "multiValueHeaders": multi_headers,
        "queryStringParameters": query,
        "multiValueQueryStringParameters": multi_query,
        "pathParameters": if request.params.is_empty() { Value::Null } else { json!(request.params) },
        "requestContext": {
            "requestId": request.request_id,
            "httpMethod": request.method,
            "path": format!("/http/{}/{}{}", request.account, request.project, request.path),
            "resourcePath": request.resource,
            "accountName": request.account,
            "project": request.project,
            "endpoint": request.endpoint,
            "requestTimeEpoch": request.time_ms,
            "identity": {"sourceIp": request.source_ip},
        },
        "body": body,
        "isBase64Encoded": base64,
    });
    if let (Some(text), Some(fields)) = (text, event.as_object_mut()) {
        let is_json = content_type == "application/json" || content_type.ends_with("+json");
        if is_json {
            if let Ok(parsed) = serde_json::from_str::<Value>(text) {
                fields.insert("json".into(), parsed);
            }
        } else if content_type == "application/x-www-form-urlencoded" {
            let mut form = Map::new();
            for (key, value) in form_urlencoded::parse(text.as_bytes()) {
                form.insert(key.into_owned(), Value::String(value.into_owned()));
            }
            fields.insert("form".into(), Value::Object(form));
        }
    }
    event
}

/// `queryStringParameters` (the last value of each) and the multi-value form; both `null`
/// without a query string, as API Gateway.
fn query_parameters(query: Option<&str>) -> (Value, Value) {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return (Value::Null, Value::Null);
    };
    let mut single = Map::new();
    let mut multi: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        single.insert(key.to_string(), Value::String(value.to_string()));
        multi
            .entry(key.into_owned())
            .or_default()
            .push(value.into_owned());
    }
    (Value::Object(single), json!(multi))
}

/// Headers a block may not set: the server frames the response itself.
const FRAMING_HEADERS: [&str; 5] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
];

/// The reply for a response node's `output`, or why it is not a valid HTTP response (the
/// caller answers 502 and the message is for the run's logs and the author).
pub fn reply(output: &Value) -> Result<Response<Body>, String> {
    let Some(fields) = output.as_object().filter(|o| o.contains_key("statusCode")) else {
        return Ok(json_response(StatusCode::OK, output));
    };
    let status = fields
        .get("statusCode")
        .and_then(Value::as_u64)
        .and_then(|code| u16::try_from(code).ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .filter(|code| (200..=599).contains(&code.as_u16()))
        .ok_or_else(|| {
            format!(
                "`statusCode` must be an integer from 200 to 599, got {}",
                fields["statusCode"]
            )
        })?;
    let mut headers = HeaderMap::new();
    let mut add = |name: &str, value: &Value| -> Result<(), String> {
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                return Err(format!(
                    "header `{name}` must be a string, a number or a boolean, got {other}"
                ))
            }
        };
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`{name}` is not a valid header name"))?;
        if FRAMING_HEADERS.contains(&header.as_str()) {
            return Ok(());
        }
        let value = HeaderValue::from_str(&text)
            .map_err(|_| format!("the value of header `{name}` is not a valid header value"))?;
        headers.append(header, value);
        Ok(())
    };
    match fields.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, value) in map {
                add(name, value)?;
            }
        }
        Some(other) => return Err(format!("`headers` must be an object, got {other}")),
    }
    match fields.get("multiValueHeaders") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, values) in map {
                let Value::Array(values) = values else {
                    return Err(format!(
                        "`multiValueHeaders.{name}` must be a list of values"
                    ));
                };
                for value in values {
                    add(name, value)?;
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "`multiValueHeaders` must be an object, got {other}"
            ))
        }
    }
    let base64 = match fields.get("isBase64Encoded") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(format!("`isBase64Encoded` must be a boolean, got {other}")),
    };
    let body: Vec<u8> = match fields.get("body") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(text)) if base64 => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| format!("`body` is not valid base64 (`isBase64Encoded` is true): {e}"))?,
        Some(Value::String(text)) => text.clone().into_bytes(),
        Some(_) if base64 => {
            return Err("`isBase64Encoded` is true but `body` is not a string".into())
        }
        Some(other) => {
            if !headers.contains_key(CONTENT_TYPE) {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            other.to_string().into_bytes()
        }
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// A JSON reply.
pub fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Body::from(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(
        headers: &'a HeaderMap,
        params: &'a BTreeMap<String, String>,
        body: &'a Bytes,
        query: Option<&'a str>,
    ) -> Request<'a> {
        Request {
            method: "POST",
            path: "/orders/42",
            resource: "/orders/{id}",
            query,
            headers,
            params,
            body,
            request_id: "req_1",
            source_ip: "127.0.0.1",
            account: "acme",
            project: "shop",
            endpoint: "api",
            time_ms: 1,
        }
    }

    #[test]
    fn a_json_request_becomes_a_proxy_event_with_json() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        headers.append("x-tag", HeaderValue::from_static("a"));
        headers.append("x-tag", HeaderValue::from_static("b"));
        let params = BTreeMap::from([("id".to_string(), "42".to_string())]);
        let body = Bytes::from_static(br#"{"total": 5}"#);
        let e = event(&request(&headers, &params, &body, Some("q=1&q=2&x=%20y")));
        assert_eq!(e["httpMethod"], "POST");
        assert_eq!(e["path"], "/orders/42");
        assert_eq!(e["pathParameters"], json!({"id": "42"}));
        assert_eq!(e["queryStringParameters"], json!({"q": "2", "x": " y"}));
        assert_eq!(e["multiValueQueryStringParameters"]["q"], json!(["1", "2"]));
        assert_eq!(e["headers"]["x-tag"], "b");
        assert_eq!(e["multiValueHeaders"]["x-tag"], json!(["a", "b"]));
        assert_eq!(e["body"], r#"{"total": 5}"#);
        assert_eq!(e["isBase64Encoded"], false);
        assert_eq!(e["json"], json!({"total": 5}));
        assert!(e.get("form").is_none());
        assert_eq!(e["requestContext"]["identity"]["sourceIp"], "127.0.0.1");
    }

    #[test]
    fn forms_binary_and_empty_bodies() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        let params = BTreeMap::new();
        let body = Bytes::from_static(b"name=Ada+L&x=%26");
        let e = event(&request(&headers, &params, &body, None));
        assert_eq!(e["form"], json!({"name": "Ada L", "x": "&"}));
        assert_eq!(e["queryStringParameters"], Value::Null);
        assert_eq!(e["pathParameters"], Value::Null);

        let binary = Bytes::from_static(&[0xff, 0x00, 0xfe]);
        let e = event(&request(&HeaderMap::new(), &params, &binary, None));
        assert_eq!(e["isBase64Encoded"], true);
        assert_eq!(e["body"], "/wD+");

        let empty = Bytes::new();
        let e = event(&request(&HeaderMap::new(), &params, &empty, None));
        assert_eq!(e["body"], Value::Null);
    }

    async fn body_of(response: Response<Body>) -> Vec<u8> {
        axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("a body")
            .to_vec()
    }

    #[tokio::test]
    async fn outputs_shape_the_reply() {
        let plain = reply(&json!({"ok": true})).expect("valid");
        assert_eq!(plain.status(), 200);
        assert_eq!(plain.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(body_of(plain).await, br#"{"ok":true}"#);

        let shaped = reply(&json!({
            "statusCode": 201,
            "headers": {"x-id": 7, "content-type": "text/plain", "content-length": "999"},
            "multiValueHeaders": {"set-cookie": ["a=1", "b=2"]},
            "body": "made"
        }))
        .expect("valid");
        assert_eq!(shaped.status(), 201);
        assert_eq!(shaped.headers()["x-id"], "7");
        assert!(shaped.headers().get("content-length").is_none());
        assert_eq!(shaped.headers().get_all("set-cookie").iter().count(), 2);
        assert_eq!(body_of(shaped).await, b"made");

        let binary = reply(&json!({"statusCode": 200, "body": "/wD+", "isBase64Encoded": true}))
            .expect("valid");
        assert_eq!(body_of(binary).await, [0xff, 0x00, 0xfe]);

        let object_body =
            reply(&json!({"statusCode": 404, "body": {"error": "no"}})).expect("valid");
        assert_eq!(object_body.headers()[CONTENT_TYPE], "application/json");

        for (bad, needle) in [
            (json!({"statusCode": 99}), "statusCode"),
            (json!({"statusCode": "200"}), "statusCode"),
            (
                json!({"statusCode": 200, "headers": {"x": [1]}}),
                "header `x`",
            ),
            (
                json!({"statusCode": 200, "headers": {"bad name": "1"}}),
                "not a valid header name",
            ),
            (
                json!({"statusCode": 200, "body": "%%", "isBase64Encoded": true}),
                "base64",
            ),
        ] {
            let error = reply(&bad).expect_err(&bad.to_string());
            assert!(error.contains(needle), "{bad}: {error}");
        }
    }
}
