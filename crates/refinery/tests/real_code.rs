//! Real code (BRIEF §7c): blocks of several files with a handler, the limits and symlink
//! rules of a directory source, and project secrets — against the real server, its real
//! sandboxes and the CLI binary.

mod common;

use std::path::Path;

use common::{write_tree, Server};
use serde_json::{json, Value};

const MANIFEST: &str = r#"
name = "realcode"

[[blocks]]
name = "py"
language = "python"
source = "py/"
handler = "app.handle"

[[blocks]]
name = "nested"
language = "python"
source = "py"
handler = "pkg.entry.go"

[[blocks]]
name = "js"
language = "node"
source = "js/"
handler = "app.run"

[[blocks]]
name = "jsdefault"
language = "node"
source = "js/"
"#;

const FILES: &[(&str, &str)] = &[
    (
        "py/app.py",
        r#"import os
import helper
from lib import util

def handle(block_input, backpack):
    cmdline = open("/proc/self/cmdline", "rb").read().split(b"\0")
    try:
        with open(os.path.join(os.path.dirname(__file__), "new.txt"), "w") as f:
            f.write("x")
        writable = True
    except OSError:
        writable = False
    return {"greeting": helper.greet(block_input), "twice": util.twice(3),
            "standby": b"--standby" in cmdline, "pid": os.getpid(),
            "code_writable": writable, "file": __file__}
"#,
    ),
    ("py/helper.py", "def greet(n):\n    return f\"hello {n}\"\n"),
    ("py/lib/util.py", "def twice(x):\n    return 2 * x\n"),
    (
        "py/pkg/entry.py",
        "import helper\n\ndef go(block_input, backpack):\n    return helper.greet('nested')\n",
    ),
    (
        "js/app.js",
        r#"const helper = require('./helper');
const { triple } = require('./lib/math.js');
exports.run = (input) => ({
  greeting: helper.greet(input),
  triple: triple(3),
  standby: require('fs').readFileSync('/proc/self/cmdline', 'utf8').includes('--standby'),
});
"#,
    ),
    (
        "js/index.js",
        "const helper = require('./helper');\nexports.main = () => helper.greet('index');\n",
    ),
    ("js/helper.js", "exports.greet = (n) => `hi ${n}`;\n"),
    ("js/lib/math.js", "exports.triple = (x) => 3 * x;\n"),
];

fn project_dir(files: &[(&str, &str)], manifest: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_tree(dir.path(), files);
    std::fs::write(dir.path().join("refinery.toml"), manifest).expect("manifest");
    dir
}

fn deploy_cli(server: &Server, key: &str, dir: &Path) -> (i32, String, String) {
    server.cli(key, &["deploy", &dir.display().to_string()], None)
}

/// A Python and a Node block of several files, deployed with the CLI: neighbours import
/// (`import helper`, `from lib import util`, `require("./helper")`), custom handlers and the
/// defaults are called, a handler in a subdirectory imports the block's top-level modules,
/// the code is read-only inside the instance, and cold starts still adopt standby sandboxes
/// (Python and Node) or fork from the Python zygote (`--standby 0`), not exec.
#[tokio::test]
async fn multi_file_python_and_node_blocks_import_their_neighbours() {
    let server = Server::start().await;
    assert!(server.wait_for_standbys("python").await, "python standbys");
    assert!(server.wait_for_standbys("node").await, "node standbys");
    let (_, key) = server.account("multi").await;
    let project = project_dir(FILES, MANIFEST);
    let (code, stdout, stderr) = deploy_cli(&server, &key, project.path());
    assert_eq!(code, 0, "deploy: {stdout}{stderr}");

    let py = server.invoke_ok(&key, "realcode", "py", json!(7)).await;
    assert_eq!(py["status"], "ok", "{py}");
    let out = &py["output"];
    assert_eq!(out["greeting"], "hello 7", "{py}");
    assert_eq!(out["twice"], 6, "{py}");
    assert_eq!(out["file"], "/code/app.py", "{py}");
    assert_eq!(out["code_writable"], false, "/code is read-only: {py}");
    assert_eq!(out["standby"], true, "adopted a standby sandbox: {py}");

    let nested = server
        .invoke_ok(&key, "realcode", "nested", json!(null))
        .await;
    assert_eq!(nested["output"], "hello nested", "{nested}");

    let js = server.invoke_ok(&key, "realcode", "js", json!("x")).await;
    assert_eq!(js["status"], "ok", "{js}");
    assert_eq!(js["output"]["greeting"], "hi x", "{js}");
    assert_eq!(js["output"]["triple"], 9, "{js}");
    assert_eq!(
        js["output"]["standby"], true,
        "adopted a standby sandbox: {js}"
    );
    let default = server
        .invoke_ok(&key, "realcode", "jsdefault", json!(null))
        .await;
    assert_eq!(default["output"], "hi index", "{default}");

    // The deployment answer and listing hold no code and no file list.
    let (status, listing) = server
        .request("GET", "/v1/projects/realcode/deployments", Some(&key), None)
        .await;
    assert_eq!(status, 200, "{listing}");
    assert!(!listing.to_string().contains("helper"), "{listing}");

    // Without standbys a Python cold start of a multi-file block forks from the zygote
    // (pid 1 in its namespace); deployed through the API, files under `py/...`.
    let server = Server::start_with(&["--standby", "0"]).await;
    let (_, key) = server.account("zygote").await;
    let (status, body) = server.deploy(&key, MANIFEST, FILES).await;
    assert_eq!(status, 201, "{body}");
    let py = server.invoke_ok(&key, "realcode", "py", json!(1)).await;
    assert_eq!(py["output"]["greeting"], "hello 1", "{py}");
    assert_eq!(py["output"]["pid"], 1, "forked from the zygote: {py}");
}

/// A directory over the file-count limit is refused by the CLI before upload, and by the
/// server, each naming the limit; a handler naming a file the directory lacks is a
/// manifest error naming the handler and the files there are.
#[tokio::test]
async fn directory_sources_over_the_limits_or_without_their_handler_are_refused() {
    let server = Server::start().await;
    let (_, key) = server.account("limits").await;

    let names: Vec<String> = (0..257).map(|i| format!("big/f{i}.py")).collect();
    let mut files: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "x = 1\n")).collect();
    files.push(("big/main.py", "def main(i, b):\n    return i\n"));
    let manifest =
        "name = \"big\"\n[[blocks]]\nname = \"b\"\nlanguage = \"python\"\nsource = \"big/\"\n";
    let project = project_dir(&files, manifest);
    let (code, _, stderr) = deploy_cli(&server, &key, project.path());
    assert_ne!(code, 0);
    assert!(
        stderr.contains("more than 256 files") && stderr.contains("big/"),
        "{stderr}"
    );
    let (status, body) = server.deploy(&key, manifest, &files).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.to_string().contains("256 files"), "{body}");

    let manifest = "name = \"nohandler\"\n[[blocks]]\nname = \"b\"\nlanguage = \"python\"\nsource = \"src/\"\nhandler = \"app.run\"\n";
    let (status, body) = server
        .deploy(&key, manifest, &[("src/main.py", "def main(i, b): pass\n")])
        .await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("blocks[0].handler")
            && message.contains("`app.py`")
            && message.contains("main.py"),
        "{message}"
    );

    let manifest =
        "name = \"shdir\"\n[[blocks]]\nname = \"b\"\nlanguage = \"shell\"\nsource = \"src/\"\n";
    let (status, body) = server
        .deploy(&key, manifest, &[("src/run.sh", "echo hi\n")])
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("one file"), "{body}");
}

/// Symlinks: one to a file inside the project is followed (its target uploaded under the
/// link's name); one out of the project — in a directory source, or as a `source` itself —
/// is refused by the CLI, naming the link and where it points, and nothing is deployed.
#[tokio::test]
async fn symlinks_inside_the_project_are_followed_and_out_of_it_refused() {
    let server = Server::start().await;
    let (_, key) = server.account("links").await;
    let manifest =
        "name = \"links\"\n[[blocks]]\nname = \"b\"\nlanguage = \"python\"\nsource = \"src/\"\n";
    let project = project_dir(
        &[
            (
                "src/main.py",
                "import helper\ndef main(i, b):\n    return helper.VALUE\n",
            ),
            ("shared/helper.py", "VALUE = 'shared'\n"),
        ],
        manifest,
    );
    let root = project.path();
    std::os::unix::fs::symlink("../shared/helper.py", root.join("src/helper.py")).expect("link");
    let (code, stdout, stderr) = deploy_cli(&server, &key, root);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let reply = server.invoke_ok(&key, "links", "b", json!(null)).await;
    assert_eq!(reply["output"], "shared", "{reply}");

    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("secret.py"), "TOKEN = 'host file'\n").expect("write");
    std::os::unix::fs::symlink(outside.path().join("secret.py"), root.join("src/evil.py"))
        .expect("link");
    let (code, _, stderr) = deploy_cli(&server, &key, root);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("src/evil.py") && stderr.contains("outside the project directory"),
        "{stderr}"
    );
    std::fs::remove_file(root.join("src/evil.py")).expect("unlink");

    let single =
        "name = \"links\"\n[[blocks]]\nname = \"b\"\nlanguage = \"python\"\nsource = \"one.py\"\n";
    std::fs::write(root.join("refinery.toml"), single).expect("manifest");
    std::os::unix::fs::symlink(outside.path().join("secret.py"), root.join("one.py"))
        .expect("link");
    let (code, _, stderr) = deploy_cli(&server, &key, root);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("one.py") && stderr.contains("outside the project directory"),
        "{stderr}"
    );
    let (_, listing) = server
        .request("GET", "/v1/projects/links/deployments", Some(&key), None)
        .await;
    assert_eq!(
        listing["deployments"].as_array().map(Vec::len),
        Some(1),
        "{listing}"
    );
}

const SECRET_MANIFEST: &str = r#"
name = "vault"
[[blocks]]
name = "reader"
language = "python"
env = { TOKEN = { secret = "api-token" }, PLAIN = "visible" }
code = """
import hashlib, os
def main(block_input, backpack):
    token = os.environ.get("TOKEN", "")
    return {"sha256": hashlib.sha256(token.encode()).hexdigest(), "len": len(token),
            "plain": os.environ.get("PLAIN"), "pid": os.getpid()}
"""
"#;

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// Bytes of every file under `dir`.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            bytes.extend(all_bytes(&path));
        } else if let Ok(b) = std::fs::read(&path) {
            bytes.extend(b);
        }
    }
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// A secret set with the CLI (value on stdin) reaches the block's environment and nowhere
/// else: not the deploy answer, the project and deployment listings, the secrets list, the
/// execution records, the server's log (at debug level) or the data directory's files
/// (sealed at rest; the key file is 0600). A deploy naming a missing secret is a 422 naming
/// it; setting it again retires the instance holding the old value; another account can
/// neither see nor use it.
#[tokio::test]
async fn secrets_reach_the_block_and_nothing_else() {
    let root = tempfile::tempdir().expect("tempdir");
    let data_dir = root.path().join("data");
    let log_path = root.path().join("server.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let server = Server::start_logging_to(&data_dir, &[], log, "debug").await;
    let (_, key) = server.account("owner").await;
    let (_, other) = server.account("other").await;
    let first = "s3cr3t-value-ONE-7f9c2a";
    let second = "s3cr3t-value-TWO-1b8e4d";

    let (status, body) = server.deploy(&key, SECRET_MANIFEST, &[]).await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("`api-token`")
            && message.contains("block `reader`")
            && message.contains("refinery secrets set vault api-token"),
        "{message}"
    );

    let (code, stdout, stderr) = server.cli_with_stdin(
        &key,
        &["secrets", "set", "vault", "api-token"],
        None,
        &format!("{first}\n"),
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (status, deployed) = server.deploy(&key, SECRET_MANIFEST, &[]).await;
    assert_eq!(status, 201, "{deployed}");

    let reply = server.invoke_ok(&key, "vault", "reader", json!(null)).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["output"]["sha256"], sha256_hex(first), "{reply}");
    assert_eq!(
        reply["output"]["len"],
        first.len(),
        "trailing newline dropped"
    );
    assert_eq!(reply["output"]["plain"], "visible");
    let first_pid_reply = reply.clone();

    // Set again: the warm instance holding the old value is retired; the next one sees the
    // new value.
    let (code, stdout, stderr) = server.cli_with_stdin(
        &key,
        &["secrets", "set", "vault", "api-token"],
        None,
        second,
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let reply = server.invoke_ok(&key, "vault", "reader", json!(null)).await;
    assert_eq!(reply["output"]["sha256"], sha256_hex(second), "{reply}");
    assert_eq!(reply["cold"], true, "a new instance: {reply}");
    assert_ne!(reply["instance_id"], first_pid_reply["instance_id"]);

    let (code, list, stderr) = server.cli(&key, &["secrets", "list", "vault", "--json"], None);
    assert_eq!(code, 0, "{stderr}");
    let list: Value = serde_json::from_str(&list).expect("json list");
    assert_eq!(list["secrets"][0]["name"], "api-token", "{list}");

    // Another account: no such project or secret for it.
    let (status, body) = server
        .request("GET", "/v1/projects/vault/secrets", Some(&other), None)
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server
        .request(
            "DELETE",
            "/v1/projects/vault/secrets/api-token",
            Some(&other),
            None,
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server.deploy(&other, SECRET_MANIFEST, &[]).await;
    assert_eq!(status, 422, "{body}");

    // Nowhere but the block's environment.
    let mut answers = vec![deployed, list];
    for path in [
        "/v1/projects",
        "/v1/projects/vault/deployments",
        "/v1/projects/vault/secrets",
        "/v1/projects/vault/executions",
        "/v1/instances",
        "/v1/audit",
    ] {
        let (status, body) = server.request("GET", path, Some(&key), None).await;
        assert_eq!(status, 200, "{path}: {body}");
        answers.push(body);
    }
    // Execution records are written in batches: wait for both.
    let mut executions = Vec::new();
    for _ in 0..100 {
        let (_, body) = server
            .request("GET", "/v1/projects/vault/executions", Some(&key), None)
            .await;
        executions = body["executions"].as_array().cloned().unwrap_or_default();
        if executions.len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(executions.len(), 2, "{executions:?}");
    for execution in &executions {
        let id = execution["execution_id"].as_str().expect("id");
        let (_, record) = server
            .request("GET", &format!("/v1/executions/{id}"), Some(&key), None)
            .await;
        answers.push(record);
    }
    for answer in &answers {
        let text = answer.to_string();
        assert!(
            !text.contains(first) && !text.contains(second),
            "a secret in an API answer: {text}"
        );
    }
    let log = std::fs::read(&log_path).expect("log");
    assert!(!log.is_empty(), "the debug log was captured");
    assert!(
        !contains(&log, first) && !contains(&log, second),
        "a secret in the server log"
    );
    let stored = all_bytes(&data_dir);
    assert!(
        !contains(&stored, first) && !contains(&stored, second),
        "a secret in plain text in the data directory"
    );
    let key_file = data_dir.join("secrets.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file)
            .expect("key file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "secrets.key mode");

    // Deleted: the block no longer starts, and says which secret to set.
    let (code, _, stderr) = server.cli(&key, &["secrets", "delete", "vault", "api-token"], None);
    assert_eq!(code, 0, "{stderr}");
    let (status, body) = server.invoke(&key, "vault", "reader", json!(null)).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("secret `api-token`"), "{body}");
}
