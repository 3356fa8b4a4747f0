//! The same scenarios through the `refinery` CLI, as an author would type them.

mod common;

use common::Server;

#[tokio::test(flavor = "multi_thread")]
async fn cli_deploys_invokes_lists_and_shows_logs() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("refinery.toml"),
        "name = \"hello\"\n\n[[blocks]]\nname = \"greet\"\nlanguage = \"python\"\nsource = \"greet.py\"\nenv = { GREETING = \"hi\" }\n",
    )
    .expect("write manifest");
    std::fs::write(
        dir.path().join("greet.py"),
        "import os\ndef main(block_input, backpack):\n    print('greeting', block_input['name'])\n    return os.environ['GREETING'] + ' ' + block_input['name']\n",
    )
    .expect("write source");

    let (code, stdout, stderr) = server.cli(&key, &["deploy", "--json"], Some(dir.path()));
    assert_eq!(code, 0, "{stderr}");
    let deployed: serde_json::Value = serde_json::from_str(&stdout).expect("deploy --json");
    assert_eq!(deployed["project"], "hello");
    assert_eq!(deployed["deployment"], 1);

    let (code, stdout, stderr) = server.cli(
        &key,
        &["invoke", "hello", "greet", "--input", r#"{"name":"ada"}"#],
        None,
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "\"hi ada\"");
    assert!(
        stderr.contains("greeting ada"),
        "logs go to stderr: {stderr}"
    );

    let (code, stdout, _) = server.cli(
        &key,
        &[
            "invoke",
            "hello",
            "greet",
            "--input",
            r#"{"name":"bob"}"#,
            "--json",
        ],
        None,
    );
    assert_eq!(code, 0);
    let execution: serde_json::Value = serde_json::from_str(&stdout).expect("invoke --json");
    assert_eq!(execution["status"], "ok");
    assert_eq!(execution["cold"], false);
    let execution_id = execution["execution_id"].as_str().expect("id");

    let (code, stdout, _) = server.cli(&key, &["executions", "hello", "--block", "greet"], None);
    assert_eq!(code, 0);
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stdout.contains(execution_id));

    let (code, stdout, _) = server.cli(&key, &["logs", execution_id], None);
    assert_eq!(code, 0);
    assert!(stdout.contains("greeting bob"), "{stdout}");

    // A failing block: non-zero exit, the error on stderr.
    let (code, _, stderr) = server.cli(&key, &["invoke", "hello", "greet", "--input", "{}"], None);
    assert_ne!(code, 0);
    assert!(stderr.contains("KeyError"), "{stderr}");

    // An invalid manifest is refused locally with its path and line.
    std::fs::write(dir.path().join("refinery.toml"), "name = \"hello\"\n[[blocks]]\nname = \"greet\"\nlanguage = \"python\"\nsource = \"greet.py\"\nmemory_mb = 1\n")
        .expect("write");
    let (code, _, stderr) = server.cli(&key, &["deploy"], Some(dir.path()));
    assert_ne!(code, 0);
    assert!(stderr.contains("refinery.toml:6"), "{stderr}");
    assert!(stderr.contains("memory_mb"), "{stderr}");

    let (code, stdout, _) = server.cli(&key, &["deployments", "hello"], None);
    assert_eq!(code, 0);
    assert!(stdout.contains("(live)"), "{stdout}");

    // Operator commands through the CLI.
    let operator = server.operator_key.clone();
    let (code, stdout, stderr) =
        server.cli(&operator, &["accounts", "create", "zeta", "--json"], None);
    assert_eq!(code, 0, "{stderr}");
    let account: serde_json::Value = serde_json::from_str(&stdout).expect("accounts create --json");
    assert_eq!(account["name"], "zeta");
    assert!(account["api_key"]
        .as_str()
        .is_some_and(|k| k.starts_with("rfk_")));
    assert!(account["id"].as_str().is_some());
}
