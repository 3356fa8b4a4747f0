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

/// Every route of `crates/server/src/routes/mod.rs`, called with another account's key: 404
/// (or 403 for operator-only routes), and never a byte of the other account's data. The 404
/// for another account's resource is indistinguishable from the one for a resource that does
/// not exist at all (no existence oracle).
#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_refuses_another_accounts_key() {
    let server = Server::start().await;
    let (id_a, key_a) = server.account("alpha").await;
    let (id_b, key_b) = server.account("beta").await;
    server.deploy_ok(&key_a, PROJECT).await;
    server.deploy_ok(&key_a, PROJECT).await; // deployment 2, so rollback to 1 is meaningful
    let execution = server.invoke_ok(&key_a, "secret", "b", json!(null)).await;
    let execution_id = execution["execution_id"].as_str().expect("id").to_string();
    let instance_id = execution["instance_id"].as_str().expect("id").to_string();
    let operator = server.operator_key.clone();
    let leaks = |body: &serde_json::Value| {
        let text = body.to_string();
        // (The execution id is what B asks for, so a 404 may echo it; lists are checked below.)
        text.contains("a's data")
            || text.contains(&instance_id)
            || text.contains(&id_a)
            || text.contains(&key_a)
    };

    // (method, path for A's resource, path for a resource that exists nowhere, body)
    let scoped: Vec<(&str, String, String, Option<serde_json::Value>)> = vec![
        (
            "GET",
            "/v1/projects/secret/deployments".into(),
            "/v1/projects/nothing/deployments".into(),
            None,
        ),
        (
            "POST",
            "/v1/projects/secret/rollback".into(),
            "/v1/projects/nothing/rollback".into(),
            Some(json!({ "deployment": 1 })),
        ),
        (
            "POST",
            "/v1/projects/secret/blocks/b/invoke".into(),
            "/v1/projects/nothing/blocks/b/invoke".into(),
            Some(json!("x")),
        ),
        (
            "GET",
            "/v1/projects/secret/executions".into(),
            "/v1/projects/nothing/executions".into(),
            None,
        ),
        (
            "GET",
            "/v1/projects/secret/executions?block=b&limit=100".into(),
            "/v1/projects/nothing/executions?block=b&limit=100".into(),
            None,
        ),
        (
            "GET",
            format!("/v1/executions/{execution_id}"),
            "/v1/executions/ex_00000000000000000000000000000000".into(),
            None,
        ),
        (
            "DELETE",
            "/v1/projects/secret".into(),
            "/v1/projects/nothing".into(),
            None,
        ),
    ];
    for (method, path, nowhere, body) in &scoped {
        let (status, got) = server
            .request(method, path, Some(&key_b), body.clone())
            .await;
        assert_eq!(status, 404, "{method} {path} with B's key: {got}");
        assert!(!leaks(&got), "{method} {path} leaked A's data: {got}");
        let (status_nowhere, got_nowhere) = server
            .request(method, nowhere, Some(&key_b), body.clone())
            .await;
        assert_eq!(status_nowhere, 404, "{method} {nowhere}: {got_nowhere}");
        let normalise = |v: &serde_json::Value| {
            v.to_string()
                .replace("secret", "P")
                .replace("nothing", "P")
                .replace(&execution_id, "ID")
                .replace("ex_00000000000000000000000000000000", "ID")
        };
        assert_eq!(
            normalise(&got),
            normalise(&got_nowhere),
            "{method} {path}: another account's resource answers differently from a missing one"
        );
    }
    // A's project was not rolled back or invoked by B's attempts.
    let (_, deployments) = server
        .request("GET", "/v1/projects/secret/deployments", Some(&key_a), None)
        .await;
    let live: Vec<i64> = deployments["deployments"]
        .as_array()
        .expect("deployments")
        .iter()
        .filter(|d| d["live"] == true)
        .filter_map(|d| d["deployment"].as_i64())
        .collect();
    assert_eq!(live, vec![2], "{deployments}");
    let (_, executions) = server
        .request("GET", "/v1/projects/secret/executions", Some(&key_a), None)
        .await;
    assert_eq!(
        executions["executions"].as_array().map_or(0, Vec::len),
        1,
        "{executions}"
    );

    // Account-wide lists show B only B's own (nothing).
    for path in ["/v1/projects", "/v1/instances", "/v1/audit"] {
        let (status, got) = server.request("GET", path, Some(&key_b), None).await;
        assert_eq!(status, 200, "{path}: {got}");
        assert!(
            !leaks(&got) && !got.to_string().contains(&execution_id),
            "{path} leaked A's data: {got}"
        );
    }
    // A's own view of instances never shows host details (pids, cgroups).
    let (_, mine) = server
        .request("GET", "/v1/instances", Some(&key_a), None)
        .await;
    for instance in mine["instances"].as_array().expect("instances") {
        assert!(instance.get("pid").is_none(), "{mine}");
        assert!(instance.get("cgroups").is_none(), "{mine}");
        assert!(instance.get("account_id").is_none(), "{mine}");
    }

    // Deploying under A's project name creates B's own project; A's is untouched.
    server
        .deploy_ok(&key_b, &PROJECT.replace("a's data", "b's data"))
        .await;
    let a = server.invoke_ok(&key_a, "secret", "b", json!(null)).await;
    assert_eq!(a["output"], "a's data");

    // Quotas: B can neither read nor change A's (404 or 403), and may not change its own.
    for (method, body) in [
        ("GET", None),
        ("PUT", Some(json!({ "instances": 1000 }))),
        ("PATCH", Some(json!({ "instances": 1000 }))),
    ] {
        let path = format!("/v1/accounts/{id_a}/quota");
        let (status, got) = server.request(method, &path, Some(&key_b), body).await;
        assert!(
            status == 404 || status == 403,
            "{method} {path} with B's key: {status} {got}"
        );
        // Only an error comes back (the 404 may echo the id B asked for, nothing else).
        let keys: Vec<&String> = got
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        assert_eq!(keys, vec!["error"], "{method} {path}: {got}");
    }
    // B can neither rotate A's key nor disable or enable A (404 or 403, only an error).
    for action in ["rotate-key", "disable", "enable"] {
        let path = format!("/v1/accounts/{id_a}/{action}");
        let (status, got) = server.request("POST", &path, Some(&key_b), None).await;
        assert!(
            status == 404 || status == 403,
            "POST {path} with B's key: {status} {got}"
        );
        // (The 404 may echo the id B asked for; never a key or anything else of A's.)
        assert!(
            !got.to_string().contains(&key_a) && got.get("api_key").is_none(),
            "POST {path} leaked a key: {got}"
        );
    }
    let a = server.invoke_ok(&key_a, "secret", "b", json!(null)).await;
    assert_eq!(a["output"], "a's data", "A's key still works");
    let (status, got) = server
        .request(
            "PUT",
            &format!("/v1/accounts/{id_b}/quota"),
            Some(&key_b),
            Some(json!({ "instances": 1000 })),
        )
        .await;
    assert_eq!(status, 403, "an account raised its own quota: {got}");

    // Operator-only endpoints refuse every account key.
    for key in [&key_a, &key_b] {
        for (method, path, body) in [
            ("POST", "/v1/accounts", Some(json!({ "name": "evil" }))),
            ("GET", "/v1/accounts", None),
        ] {
            let (status, got) = server.request(method, path, Some(key), body).await;
            assert_eq!(status, 403, "{method} {path}: {got}");
            assert!(!leaks(&got), "{got}");
        }
    }
    // The operator key is not an account key: account endpoints refuse it.
    for (method, path, body) in [
        (
            "POST",
            "/v1/deployments".to_string(),
            Some(json!({ "manifest": PROJECT, "files": {} })),
        ),
        ("GET", "/v1/projects".to_string(), None),
        ("GET", "/v1/projects/secret/deployments".to_string(), None),
        (
            "POST",
            "/v1/projects/secret/rollback".to_string(),
            Some(json!({ "deployment": 1 })),
        ),
        (
            "POST",
            "/v1/projects/secret/blocks/b/invoke".to_string(),
            Some(json!(null)),
        ),
        ("GET", "/v1/projects/secret/executions".to_string(), None),
        ("GET", format!("/v1/executions/{execution_id}"), None),
    ] {
        let (status, got) = server.request(method, &path, Some(&operator), body).await;
        assert_eq!(status, 403, "{method} {path} with the operator key: {got}");
    }
    // No key at all: 401 everywhere but health.
    for (method, path) in [
        ("GET", "/v1/accounts"),
        ("POST", "/v1/deployments"),
        ("GET", "/v1/projects"),
        ("GET", "/v1/instances"),
        ("GET", "/v1/projects/secret/executions"),
    ] {
        let (status, got) = server.request(method, path, None, None).await;
        assert_eq!(status, 401, "{method} {path}: {got}");
    }
    let (status, _) = server.request("GET", "/v1/health", None, None).await;
    assert_eq!(status, 200);
}
