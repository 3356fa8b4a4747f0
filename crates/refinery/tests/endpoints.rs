//! HTTP endpoints over real HTTP against the real server (real sandboxes): a public
//! endpoint called without a key (GET with a query string, POST with JSON, a form, a binary
//! body), path parameters, shaped replies, CORS preflight, `auth = "key"`, the 504 path, a
//! failing run's 500, unknown routes and methods, and tenancy.

mod common;

use std::time::Duration;

use common::Server;
use serde_json::{json, Value};

const API: &str = r#"
name = "api"

[[blocks]]
name = "echo"
language = "python"
code = """
def main(event, backpack):
    return {"method": event["httpMethod"], "path": event["path"], "query": event["queryStringParameters"],
            "params": event["pathParameters"], "json": event.get("json"), "form": event.get("form"),
            "body": event["body"], "b64": event["isBase64Encoded"],
            "auth": event["headers"].get("authorization"), "tag": event["headers"].get("x-tag")}
"""

[[blocks]]
name = "shape"
language = "python"
code = """
def main(echo, backpack):
    return {"statusCode": 201, "headers": {"x-made": "yes"}, "body": echo}
"""

[[blocks]]
name = "binary"
language = "python"
code = """
import base64
def main(event, backpack):
    data = base64.b64decode(event["body"]) if event["isBase64Encoded"] else event["body"].encode()
    return {"statusCode": 200, "headers": {"content-type": "application/octet-stream"},
            "body": base64.b64encode(bytes(reversed(data))).decode(), "isBase64Encoded": True}
"""

[[blocks]]
name = "slow"
language = "python"
timeout_s = 30
code = """
import time
def main(event, backpack):
    time.sleep(3)
    return "late"
"""

[[blocks]]
name = "boom"
language = "python"
code = """
def main(event, backpack):
    raise RuntimeError("secret internals: db password is hunter2")
"""

[[endpoints]]
name = "get-order"
method = "GET"
path = "/orders/{id}"
cors = { allow_origins = ["https://app.example.com"], allow_headers = ["content-type", "x-tag"], max_age_s = 120 }

[[endpoints]]
name = "new-order"
method = "GET"
path = "/orders/new"

[[endpoints]]
name = "post-order"
method = "POST"
path = "/orders"

[[endpoints]]
name = "upload"
method = "PUT"
path = "/files/{name}"

[[endpoints]]
name = "private"
method = "ANY"
path = "/private"
auth = "key"

[[endpoints]]
name = "wait"
method = "GET"
path = "/slow"
timeout_s = 1

[[endpoints]]
name = "fail"
method = "GET"
path = "/fail"

[[endpoints]]
name = "raw"
method = "GET"
path = "/raw"

[[responses]]
name = "reply"

[[transitions]]
from = "get-order"
to = "echo"
type = "then"

[[transitions]]
from = "new-order"
to = "shape"
type = "then"

[[transitions]]
from = "post-order"
to = "echo"
type = "then"

[[transitions]]
from = "private"
to = "echo"
type = "then"

[[transitions]]
from = "echo"
to = "reply"
type = "then"

[[transitions]]
from = "upload"
to = "binary"
type = "then"

[[transitions]]
from = "binary"
to = "reply"
type = "then"

[[transitions]]
from = "shape"
to = "reply"
type = "then"

[[transitions]]
from = "wait"
to = "slow"
type = "then"

[[transitions]]
from = "slow"
to = "reply"
type = "then"

[[transitions]]
from = "fail"
to = "boom"
type = "then"

[[transitions]]
from = "boom"
to = "reply"
type = "then"

[[transitions]]
from = "raw"
to = "shape"
type = "then"
"#;

async fn setup() -> (Server, String, String) {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    let deployed = server.deploy_ok(&key, API).await;
    let first = &deployed["endpoints"][0];
    assert_eq!(
        (&first["name"], &first["method"], &first["url_path"]),
        (
            &json!("get-order"),
            &json!("GET"),
            &json!("/http/acme/api/orders/{id}")
        ),
        "the deploy answer lists the endpoints: {deployed}"
    );
    let base = format!("{}/http/acme/api", server.url);
    (server, key, base)
}

async fn json_of(response: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, value)
}

#[tokio::test]
async fn public_endpoints_take_requests_and_reply() {
    let (server, key, base) = setup().await;
    let http = &server.http;

    // GET with a query string and a path parameter, no key.
    let (status, headers, body) = json_of(
        http.get(format!("{base}/orders/42?expand=items&expand=notes&x=%20y"))
            .header("x-tag", "t1")
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["method"], "GET");
    assert_eq!(body["path"], "/orders/42");
    assert_eq!(body["params"], json!({"id": "42"}));
    assert_eq!(body["query"], json!({"expand": "notes", "x": " y"}));
    assert_eq!(body["tag"], "t1");
    let run_id = headers["refinery-run-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    // The reply is sent at the step's plan, before its commit: the run ends a moment later.
    let run = server
        .await_run(&key, &run_id, Duration::from_secs(30))
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");

    // A literal segment wins over a parameter; a shaped reply.
    let (status, headers, body) = json_of(
        http.get(format!("{base}/orders/new"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(headers["x-made"], "yes");
    assert_eq!(
        body["path"], "/orders/new",
        "shape's body is the event itself: {body}"
    );

    // POST with JSON.
    let (status, _, body) = json_of(
        http.post(format!("{base}/orders"))
            .json(&json!({"total": 5, "items": ["a"]}))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["json"], json!({"total": 5, "items": ["a"]}));
    assert_eq!(body["b64"], false);

    // A form.
    let (status, _, body) = json_of(
        http.post(format!("{base}/orders"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("name=Ada+Lovelace&note=%26more")
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["form"],
        json!({"name": "Ada Lovelace", "note": "&more"})
    );
    assert_eq!(body["json"], Value::Null);

    // A binary body in, a binary body out.
    let bytes: Vec<u8> = vec![0xff, 0x00, 0x10, 0xfe, 0x80];
    let response = http
        .put(format!("{base}/files/blob.bin"))
        .header("content-type", "application/octet-stream")
        .body(bytes.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    let reversed: Vec<u8> = bytes.iter().rev().copied().collect();
    assert_eq!(response.bytes().await.expect("bytes").to_vec(), reversed);

    // Unknown path: 404; known path, other method: 405 with Allow.
    let (status, _, body) = json_of(
        http.get(format!("{base}/nowhere"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no endpoint for `GET /nowhere`"),
        "{body}"
    );
    let response = http
        .delete(format!("{base}/orders"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    // An unknown account or project: 404 saying which.
    let (status, _, body) = json_of(
        http.get(format!("{}/http/nobody/api/orders/1", server.url))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no account `nobody`"),
        "{body}"
    );
    let (status, _, _) = json_of(
        http.get(format!("{}/http/acme/nope/orders/1", server.url))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn cors_preflight_and_origin_headers() {
    let (server, _key, base) = setup().await;
    let http = &server.http;
    let response = http
        .request(reqwest::Method::OPTIONS, format!("{base}/orders/7"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "x-tag")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 204);
    let h = response.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert!(h["access-control-allow-methods"]
        .to_str()
        .expect("ascii")
        .contains("GET"));
    assert_eq!(h["access-control-allow-headers"], "content-type, x-tag");
    assert_eq!(h["access-control-max-age"], "120");

    // The actual request carries the origin header back; another origin gets none.
    let response = http
        .get(format!("{base}/orders/7"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let response = http
        .get(format!("{base}/orders/7"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("send");
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());

    // An endpoint without `cors` answers no preflight.
    let response = http
        .request(reqwest::Method::OPTIONS, format!("{base}/orders"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 405);
}

#[tokio::test]
async fn key_endpoints_need_the_accounts_key() {
    let (server, key, base) = setup().await;
    let (_, other_key) = server.account("other").await;
    let http = &server.http;
    let (status, _, body) = json_of(
        http.get(format!("{base}/private"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = json_of(
        http.get(format!("{base}/private"))
            .bearer_auth(&other_key)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 403, "another account's key: {body}");
    // Tenancy: the other account's name does not reach this account's project.
    let (status, _, body) = json_of(
        http.get(format!("{}/http/other/api/orders/1", server.url))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, _, body) = json_of(
        http.patch(format!("{base}/private"))
            .bearer_auth(&key)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["method"], "PATCH", "ANY takes every method");
    assert_eq!(
        body["auth"],
        Value::Null,
        "the key is not passed to the block: {body}"
    );
}

#[tokio::test]
async fn timeouts_failures_and_bad_responses() {
    let (server, key, base) = setup().await;
    let http = &server.http;

    // Past timeout_s: 504 with the run id; the run goes on and succeeds.
    let started = std::time::Instant::now();
    let (status, headers, body) =
        json_of(http.get(format!("{base}/slow")).send().await.expect("send")).await;
    assert_eq!(status, 504, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(body["error"]["code"], "timeout");
    let run_id = body["run_id"].as_str().expect("run id").to_string();
    assert_eq!(headers["refinery-run-id"], run_id.as_str());
    let run = server
        .await_run(&key, &run_id, Duration::from_secs(60))
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");

    // A failing run: 500 with the run id, never the traceback.
    let (status, _, body) =
        json_of(http.get(format!("{base}/fail")).send().await.expect("send")).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "run_failed");
    assert!(!body.to_string().contains("hunter2"), "{body}");
    let run = server
        .await_run(
            &key,
            body["run_id"].as_str().expect("run id"),
            Duration::from_secs(30),
        )
        .await;
    assert!(
        run.to_string().contains("hunter2"),
        "the error is in the run: {run}"
    );

    // A shaped reply whose body is the event (a JSON object): sent as JSON.
    let (status, _, body) =
        json_of(http.get(format!("{base}/raw")).send().await.expect("send")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["httpMethod"], "GET");
}

#[tokio::test]
async fn endpoints_without_a_response_and_oversized_bodies() {
    let server = Server::start().await;
    let (_, key) = server.account("solo").await;
    server
        .deploy_ok(
            &key,
            r#"
name = "noreply"
[[blocks]]
name = "a"
language = "python"
code = "def main(e, b):\n    return 1\n"
[[endpoints]]
name = "go"
method = "POST"
path = "/"
[[transitions]]
from = "go"
to = "a"
type = "then"
"#,
        )
        .await;
    let base = format!("{}/http/solo/noreply", server.url);
    let (status, _, body) = json_of(server.http.post(&base).send().await.expect("send")).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "no_response");
    // 5 MiB of binary fits the body limit, but not as the event's base64 (6.7 MB): 413.
    let big = vec![0xffu8; 5 * 1024 * 1024];
    let (status, _, body) = json_of(
        server
            .http
            .post(format!("{base}/"))
            .body(big)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
}

/// A flood on one account's public endpoint is that account's: past its running-runs limit
/// it gets 429 with `Retry-After`, while another account's endpoint answers every call.
#[tokio::test]
async fn a_flood_on_one_accounts_endpoint_leaves_another_unaffected() {
    let server = Server::start_with(&["--max-runs-per-account", "4"]).await;
    let manifest = |name: &str| {
        format!(
            r#"
name = "{name}"
[[blocks]]
name = "work"
language = "python"
code = "import time\ndef main(e, b):\n    time.sleep(0.3)\n    return 'done'\n"
[[endpoints]]
name = "go"
method = "GET"
path = "/go"
[[responses]]
name = "reply"
[[transitions]]
from = "go"
to = "work"
type = "then"
[[transitions]]
from = "work"
to = "reply"
type = "then"
"#
        )
    };
    let (_, flooder) = server.account("flooder").await;
    let (_, quiet) = server.account("quiet").await;
    server.deploy_ok(&flooder, &manifest("flood")).await;
    server.deploy_ok(&quiet, &manifest("calm")).await;

    let flood_url = format!("{}/http/flooder/flood/go", server.url);
    let calls: Vec<_> = (0..24)
        .map(|_| {
            let http = server.http.clone();
            let url = flood_url.clone();
            tokio::spawn(async move {
                let response = http.get(url).send().await.expect("send");
                let retry_after = response.headers().get("retry-after").is_some();
                (response.status().as_u16(), retry_after)
            })
        })
        .collect();
    // Meanwhile, the quiet account's calls all succeed.
    for _ in 0..3 {
        let response = server
            .http
            .get(format!("{}/http/quiet/calm/go", server.url))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.expect("body"), "\"done\"");
    }
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(call.await.expect("join"));
    }
    assert!(statuses.iter().any(|(s, _)| *s == 200), "{statuses:?}");
    assert!(
        statuses.iter().any(|(s, retry)| *s == 429 && *retry),
        "past 4 running runs the flooder gets 429 with Retry-After: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|(s, _)| *s == 200 || *s == 429),
        "{statuses:?}"
    );
}
