//! The same scenarios through the `refinery` CLI, as an author would type them.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{Server, BIN};

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
    // A header row, then the two executions.
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert!(
        stdout
            .lines()
            .next()
            .is_some_and(|h| h.starts_with("EXECUTION")
                && h.contains("STATUS")
                && h.contains("BLOCK")),
        "{stdout}"
    );
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
    assert!(stdout.starts_with("DEPLOYMENT"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.trim_end().ends_with("live")),
        "{stdout}"
    );

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

const ECHO: &str = r#"
name = "echo"

[[blocks]]
name = "back"
language = "python"
code = """
def main(block_input, backpack):
    return block_input
"""

[[blocks]]
name = "fail"
language = "python"
code = """
def main(block_input, backpack):
    raise ValueError("no " + str(block_input))
"""
"#;

/// Runs the CLI with `stdin` fed to it; returns (exit code, stdout, stderr).
fn cli_with_stdin(server: &Server, key: &str, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("REFINERY_URL", &server.url)
        .env("REFINERY_API_KEY", key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cli");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let output = child.wait_with_output().expect("wait");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_reads_input_from_stdin_and_files_and_prints_errors_and_lists_well() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, ECHO).await;

    // --input - reads stdin; --input @FILE a file.
    let (code, out, err) = cli_with_stdin(
        &server,
        &key,
        &["invoke", "echo", "back", "--input", "-"],
        r#"{"piped": [1, 2]}"#,
    );
    assert_eq!(code, 0, "{err}");
    let output: serde_json::Value = serde_json::from_str(&out).expect("json output");
    assert_eq!(output, serde_json::json!({ "piped": [1, 2] }));
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("input.json");
    std::fs::write(&file, "[\"from a file\"]\n").expect("write");
    let at_file = format!("@{}", file.display());
    let (code, out, err) = server.cli(&key, &["invoke", "echo", "back", "--input", &at_file], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).expect("json"),
        serde_json::json!(["from a file"])
    );
    // Bad input is refused locally, naming its source.
    let (code, _, err) = cli_with_stdin(
        &server,
        &key,
        &["invoke", "echo", "back", "--input", "-"],
        "{not json",
    );
    assert_ne!(code, 0);
    assert!(err.contains("stdin (--input -) is not valid JSON"), "{err}");
    let missing = format!("@{}", dir.path().join("nope.json").display());
    let (code, _, err) = server.cli(&key, &["invoke", "echo", "back", "--input", &missing], None);
    assert_ne!(code, 0);
    assert!(
        err.contains("reading the input file") && err.contains("nope.json"),
        "{err}"
    );

    // A block's error: `invoke` and `logs` print it the same way, not as escaped JSON.
    let (code, out, err) = server.cli(&key, &["invoke", "echo", "fail", "--input", "7"], None);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("ValueError: no 7"), "{err}");
    let (_, executions) = server
        .request(
            "GET",
            "/v1/projects/echo/executions?block=fail",
            Some(&key),
            None,
        )
        .await;
    let id = executions["executions"][0]["execution_id"]
        .as_str()
        .expect("execution id");
    let (code, out, err) = server.cli(&key, &["logs", id], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("error:  ValueError: no 7"), "{out}");
    assert!(out.contains("Traceback"), "{out}");
    assert!(
        !out.contains("\\n") && !out.contains("{\"message\""),
        "no escaped JSON: {out}"
    );

    // Lists have a header row and right plurals.
    let (code, out, err) = server.cli(&key, &["instances"], None);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert!(
        rows[0].starts_with("INSTANCE") && rows[0].contains("STATE"),
        "{out}"
    );
    assert!(rows.iter().any(|r| r.ends_with(" 1 invocation")), "{out}");
    assert!(!out.contains("1 invocations"), "{out}");
    let (code, out, _) = server.cli(&key, &["projects"], None);
    assert_eq!(code, 0);
    assert!(out.starts_with("PROJECT"), "{out}");
    assert!(
        out.lines().nth(1).is_some_and(|l| l.starts_with("echo")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_survives_a_closed_pipe_and_explains_url_and_key_problems_once() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, ECHO).await;
    for i in 0..5 {
        server
            .invoke_ok(&key, "echo", "back", serde_json::json!(i))
            .await;
    }

    // `refinery ... --json | head`: the reader is gone before anything is written.
    let mut child = Command::new(BIN)
        .args(["executions", "echo", "--json"])
        .env("REFINERY_URL", &server.url)
        .env("REFINERY_API_KEY", &key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cli");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "quietly: {stderr}");

    // REFINERY_URL without a scheme means http://.
    let bare = server.url.trim_start_matches("http://").to_string();
    let output = Command::new(BIN)
        .args(["projects"])
        .env("REFINERY_URL", &bare)
        .env("REFINERY_API_KEY", &key)
        .output()
        .expect("run cli");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("echo"), "{stdout}");
    // A URL that cannot be one is named as such, not as an unreachable server.
    let output = Command::new(BIN)
        .args(["projects"])
        .env("REFINERY_URL", format!("ftp://{bare}"))
        .env("REFINERY_API_KEY", &key)
        .output()
        .expect("run cli");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("not http or https") && !stderr.contains("cannot reach"),
        "{stderr}"
    );

    // No key: said once, with the fix.
    let output = Command::new(BIN)
        .args(["projects"])
        .env("REFINERY_URL", &server.url)
        .env_remove("REFINERY_API_KEY")
        .output()
        .expect("run cli");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(stderr.matches("REFINERY_API_KEY").count(), 1, "{stderr}");

    // `serve --help` lists only the server's flags; client commands keep theirs.
    let output = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("--listen"), "{help}");
    for client_flag in ["--url", "--api-key", "--json"] {
        assert!(
            !help.contains(client_flag),
            "serve --help lists {client_flag}: {help}"
        );
    }
    let output = Command::new(BIN)
        .args(["accounts", "create", "--help"])
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("--json") && help.contains("--url"), "{help}");
}
