//! Authentication and account scoping over the API.

mod common;

use common::Server;
use serde_json::json;

const PROJECT: &str = r#"
name = "secret"
[[blocks]]
name = "b"
language = "python"
code = """
def main(block_input, backpack):
    return "a's data"
"""
"#;

#[tokio::test(flavor = "multi_thread")]
async fn requests_need_a_valid_key_and_see_only_their_account() {
    let server = Server::start().await;
    let (_, key_a) = server.account("alpha").await;
    let (_, key_b) = server.account("beta").await;
    server.deploy_ok(&key_a, PROJECT).await;
    let execution = server.invoke_ok(&key_a, "secret", "b", json!(null)).await;
    let execution_id = execution["execution_id"].as_str().expect("id");

    // No key, a wrong key, a malformed header: 401.
    let (status, _) = server
        .request(
            "POST",
            "/v1/projects/secret/blocks/b/invoke",
            None,
            Some(json!(1)),
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = server
        .request(
            "POST",
            "/v1/projects/secret/blocks/b/invoke",
            Some("rfk_wrong"),
            Some(json!(1)),
        )
        .await;
    assert_eq!(status, 401);
    let response = server
        .http
        .get(format!("{}/v1/projects", server.url))
        .header("authorization", format!("Basic {key_a}"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 401);

    // Account B sees nothing of A's: 404, never the data.
    for (method, path) in [
        ("POST", "/v1/projects/secret/blocks/b/invoke".to_string()),
        ("GET", "/v1/projects/secret/deployments".to_string()),
        ("GET", "/v1/projects/secret/executions".to_string()),
        ("GET", format!("/v1/executions/{execution_id}")),
    ] {
        let (status, body) = server
            .request(method, &path, Some(&key_b), Some(json!(null)))
            .await;
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert!(!body.to_string().contains("a's data"), "{body}");
    }
    let (status, body) = server
        .request(
            "POST",
            "/v1/projects/secret/rollback",
            Some(&key_b),
            Some(json!({ "deployment": 1 })),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let (_, projects) = server
        .request("GET", "/v1/projects", Some(&key_b), None)
        .await;
    assert_eq!(projects["projects"], json!([]));
    let (_, instances) = server
        .request("GET", "/v1/instances", Some(&key_b), None)
        .await;
    assert_eq!(instances["instances"], json!([]));

    // B may own a project of the same name, separate from A's.
    server
        .deploy_ok(&key_b, &PROJECT.replace("a's data", "b's data"))
        .await;
    let b = server.invoke_ok(&key_b, "secret", "b", json!(null)).await;
    assert_eq!(b["output"], "b's data");
    let a = server.invoke_ok(&key_a, "secret", "b", json!(null)).await;
    assert_eq!(a["output"], "a's data");

    // Operator-only endpoints refuse account keys; account endpoints refuse the operator.
    let (status, _) = server
        .request(
            "POST",
            "/v1/accounts",
            Some(&key_a),
            Some(json!({ "name": "evil" })),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = server
        .request("GET", "/v1/accounts", Some(&key_a), None)
        .await;
    assert_eq!(status, 403);
    let operator = server.operator_key.clone();
    let (status, _) = server
        .request("GET", "/v1/projects", Some(&operator), None)
        .await;
    assert_eq!(status, 403);

    // Keys are stored hashed: the database never holds them in clear.
    let db = std::fs::read(server.data_dir.join("refinery.db")).expect("db");
    let wal = std::fs::read(server.data_dir.join("refinery.db-wal")).unwrap_or_default();
    for key in [&key_a, &key_b] {
        let needle = key.as_bytes();
        assert!(
            !db.windows(needle.len()).any(|w| w == needle),
            "key stored in clear"
        );
        assert!(
            !wal.windows(needle.len()).any(|w| w == needle),
            "key stored in clear (wal)"
        );
    }
    let mode = std::fs::metadata(server.data_dir.join("operator.key")).expect("key file");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
}
