//! Project shared files (`[[shared]]`, issue 14) and binary files in directory sources —
//! against the real server, its real sandboxes (every way an instance starts: a standby
//! sandbox adopted, a fork of the Python zygote, an exec) and the CLI binary.

mod common;

use std::path::Path;

use common::{write_bytes, write_tree, Server};
use serde_json::{json, Value};

const MANIFEST: &str = r#"
name = "shared"

[[shared]]
name = "common"
source = "common/"

[[shared]]
name = "models"
source = "assets/models"

[[blocks]]
name = "py"
language = "python"
source = "py/"
shared = ["common", "models"]

[[blocks]]
name = "js"
language = "node"
source = "js/"
shared = ["common"]

[[blocks]]
name = "loner"
language = "python"
source = "loner.py"
"#;

const FILES: &[(&str, &str)] = &[
    (
        "common/common_util.py",
        "def greet(n):\n    return f\"shared hello {n}\"\n",
    ),
    ("common/util.js", "exports.triple = (x) => 3 * x;\n"),
    (
        "py/main.py",
        r#"import hashlib, os
import common_util

def attempt(action):
    try:
        action()
        return True
    except OSError:
        return False

def main(block_input, backpack):
    blob = open("/shared/models/blob.bin", "rb").read()
    own = open(os.path.join(os.path.dirname(__file__), "data", "own.bin"), "rb").read()
    cmdline = open("/proc/self/cmdline", "rb").read().split(b"\0")
    return {
        "greeting": common_util.greet(block_input),
        "module": common_util.__file__,
        "blob_sha256": hashlib.sha256(blob).hexdigest(),
        "blob_len": len(blob),
        "own_sha256": hashlib.sha256(own).hexdigest(),
        "create": attempt(lambda: open("/shared/common/new.txt", "w").write("x")),
        "append": attempt(lambda: open("/shared/common/common_util.py", "a").write("x")),
        "remove": attempt(lambda: os.remove("/shared/common/common_util.py")),
        "listing": sorted(os.listdir("/shared")),
        "standby": b"--standby" in cmdline,
        "pid": os.getpid(),
    }
"#,
    ),
    (
        "js/index.js",
        r#"const fs = require('fs');
const { triple } = require('common/util');
exports.main = () => {
  let writable;
  try {
    fs.writeFileSync('/shared/common/new.txt', 'x');
    writable = true;
  } catch {
    writable = false;
  }
  return {
    triple: triple(3),
    writable,
    listing: fs.readdirSync('/shared').sort(),
    standby: fs.readFileSync('/proc/self/cmdline', 'utf8').includes('--standby'),
  };
};
"#,
    ),
    (
        "loner.py",
        r#"import os
def main(block_input, backpack):
    try:
        open("/shared/common/common_util.py").read()
        readable = True
    except OSError:
        readable = False
    try:
        import common_util
        imported = True
    except ImportError:
        imported = False
    listing = sorted(os.listdir("/shared")) if os.path.isdir("/shared") else []
    return {"readable": readable, "imported": imported, "listing": listing}
"#,
    ),
];

/// Every byte value once, in order.
fn all_256() -> Vec<u8> {
    (0..=255).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A project on disk: `FILES`, the manifest, and two binary files (a shared one and one
/// in the Python block's own directory).
fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_tree(dir.path(), FILES);
    write_bytes(dir.path(), "assets/models/blob.bin", &all_256());
    let reversed: Vec<u8> = (0..=255).rev().collect();
    write_bytes(dir.path(), "py/data/own.bin", &reversed);
    std::fs::write(dir.path().join("refinery.toml"), MANIFEST).expect("manifest");
    dir
}

fn deploy_cli(server: &Server, key: &str, dir: &Path) -> (i32, String, String) {
    server.cli(key, &["deploy", &dir.display().to_string()], None)
}

/// What every start path must give: imports from the shared directories (Python's
/// `sys.path`, Node's `require("common/util")`), the binary files byte for byte, shared
/// files read-only, and nothing of them for the block that lists none.
async fn check_blocks(server: &Server, key: &str, mode: &str) -> (Value, Value) {
    let py = server.invoke_ok(key, "shared", "py", json!(7)).await;
    assert_eq!(py["status"], "ok", "{mode}: {py}");
    let out = &py["output"];
    assert_eq!(out["greeting"], "shared hello 7", "{mode}: {py}");
    assert_eq!(
        out["module"], "/shared/common/common_util.py",
        "{mode}: {py}"
    );
    assert_eq!(out["blob_len"], 256, "{mode}: {py}");
    assert_eq!(out["blob_sha256"], sha256_hex(&all_256()), "{mode}: {py}");
    let reversed: Vec<u8> = (0..=255).rev().collect();
    assert_eq!(out["own_sha256"], sha256_hex(&reversed), "{mode}: {py}");
    for write in ["create", "append", "remove"] {
        assert_eq!(
            out[write], false,
            "{mode}: /shared is read-only ({write}): {py}"
        );
    }
    assert_eq!(out["listing"], json!(["common", "models"]), "{mode}: {py}");

    let js = server.invoke_ok(key, "shared", "js", json!(null)).await;
    assert_eq!(js["status"], "ok", "{mode}: {js}");
    assert_eq!(js["output"]["triple"], 9, "{mode}: {js}");
    assert_eq!(js["output"]["writable"], false, "{mode}: {js}");
    assert_eq!(
        js["output"]["listing"],
        json!(["common"]),
        "{mode}: a block sees only the shared directories it lists: {js}"
    );

    let loner = server.invoke_ok(key, "shared", "loner", json!(null)).await;
    assert_eq!(loner["status"], "ok", "{mode}: {loner}");
    assert_eq!(
        loner["output"],
        json!({"readable": false, "imported": false, "listing": []}),
        "{mode}: a block that lists no shared directory sees none: {loner}"
    );
    (py, js)
}

/// Deployed with the CLI (binary files sent base64), a Python and a Node block import
/// from the shared directories they list, read binary files byte for byte, cannot write
/// them, and a block that lists none cannot see them — with cold starts adopting standby
/// sandboxes (default), forking from the Python zygote (`--standby 0`), or by exec
/// (`--no-zygotes`).
#[tokio::test]
async fn shared_directories_on_every_start_path() {
    let project = project();
    for (mode, args) in [
        ("standby", &[][..]),
        ("zygote", &["--standby", "0"][..]),
        ("exec", &["--no-zygotes", "--standby", "0"][..]),
    ] {
        let server = Server::start_with(args).await;
        if mode == "standby" {
            assert!(server.wait_for_standbys("python").await, "python standbys");
            assert!(server.wait_for_standbys("node").await, "node standbys");
        }
        let (_, key) = server.account("team").await;
        let (code, stdout, stderr) = deploy_cli(&server, &key, project.path());
        assert_eq!(code, 0, "{mode}: deploy: {stdout}{stderr}");
        let (py, js) = check_blocks(&server, &key, mode).await;
        match mode {
            "standby" => {
                assert_eq!(py["output"]["standby"], true, "adopted: {py}");
                assert_eq!(js["output"]["standby"], true, "adopted: {js}");
            }
            "zygote" => {
                assert_eq!(py["output"]["pid"], 1, "forked from the zygote: {py}");
                assert_eq!(js["output"]["standby"], false, "{js}");
            }
            _ => {
                assert_eq!(py["output"]["standby"], false, "{py}");
                assert_ne!(py["output"]["pid"], 1, "exec: pid 1 is the reaper: {py}");
            }
        }
    }
}

fn versioned(version: &str) -> (String, Vec<(String, String)>) {
    let manifest = "name = \"roll\"\n[[shared]]\nname = \"lib\"\nsource = \"lib/\"\n\
                    [[blocks]]\nname = \"b\"\nlanguage = \"python\"\nsource = \"b.py\"\nshared = [\"lib\"]\n"
        .to_string();
    let files = vec![
        (
            "b.py".to_string(),
            "import version\ndef main(i, b):\n    return version.VALUE\n".to_string(),
        ),
        (
            "lib/version.py".to_string(),
            format!("VALUE = '{version}'\n"),
        ),
    ];
    (manifest, files)
}

/// A rollback brings back the shared files of the deployment rolled back to; the shared
/// files count in the account's storage (once each, with the code, stored and laid out).
#[tokio::test]
async fn rollback_restores_shared_files_and_storage_counts_them() {
    let server = Server::start().await;
    let (_, key) = server.account("roller").await;
    for version in ["one", "two"] {
        let (manifest, files) = versioned(version);
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(p, c)| (p.as_str(), c.as_str()))
            .collect();
        let (status, body) = server.deploy(&key, &manifest, &files).await;
        assert_eq!(status, 201, "{body}");
        let reply = server.invoke_ok(&key, "roll", "b", json!(null)).await;
        assert_eq!(reply["output"], version, "{reply}");
    }
    let (status, body) = server.rollback(&key, "roll", 1).await;
    assert_eq!(status, 200, "{body}");
    let reply = server.invoke_ok(&key, "roll", "b", json!(null)).await;
    assert_eq!(
        reply["output"], "one",
        "the rolled-back deployment's shared file: {reply}"
    );

    // The console's graph of a deployment with shared directories (read from the stored
    // blocks, not from sources read again).
    let (status, graph) = server
        .request("GET", "/v1/projects/roll/graph", Some(&key), None)
        .await;
    assert_eq!(status, 200, "{graph}");
    assert_eq!(graph["nodes"][0]["name"], "b", "{graph}");

    // Storage: for each deployment, the manifest + 2 × (code + shared files).
    let expected: usize = ["one", "two"]
        .iter()
        .map(|v| {
            let (manifest, files) = versioned(v);
            manifest.len() + 2 * files.iter().map(|(_, c)| c.len()).sum::<usize>()
        })
        .sum();
    let (status, quota) = server
        .request(
            "GET",
            "/v1/accounts/roller/quota",
            Some(&server.operator_key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{quota}");
    assert_eq!(quota["usage"]["storage_bytes"], expected, "{quota}");
}

const SMALL: &str = "name = \"bad\"\n[[shared]]\nname = \"common\"\nsource = \"common/\"\n\
                     [[blocks]]\nname = \"b\"\nlanguage = \"python\"\nsource = \"b.py\"\nshared = [\"common\"]\n";
const B_PY: (&str, &str) = ("b.py", "def main(i, b):\n    return 1\n");

fn error_message(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Bad shared directories and binary uploads are refused, each with what was wrong and
/// where, and nothing is deployed: an unknown name, a name declared twice, a missing
/// directory, a directory over the file-count limit (CLI and server), a binary file over
/// the per-file limit (its bytes counted, not its base64), a value that is not base64.
#[tokio::test]
async fn bad_shared_directories_and_binary_uploads_are_refused_clearly() {
    let server = Server::start().await;
    let (_, key) = server.account("strict").await;

    let unknown = SMALL.replace("shared = [\"common\"]", "shared = [\"comon\"]");
    let (status, body) = server
        .deploy(&key, &unknown, &[B_PY, ("common/x.py", "X = 1\n")])
        .await;
    assert_eq!(status, 422, "{body}");
    let message = error_message(&body);
    assert!(
        message.contains("blocks[0].shared[0]")
            && message.contains("unknown shared directory `comon`")
            && message.contains("`common`"),
        "{message}"
    );

    let twice = SMALL.replace(
        "[[blocks]]",
        "[[shared]]\nname = \"common\"\nsource = \"other/\"\n[[blocks]]",
    );
    let (status, body) = server
        .deploy(
            &key,
            &twice,
            &[B_PY, ("common/x.py", "X = 1\n"), ("other/y.py", "Y = 1\n")],
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let message = error_message(&body);
    assert!(
        message.contains("shared[1].name") && message.contains("duplicate shared directory"),
        "{message}"
    );

    let (status, body) = server.deploy(&key, SMALL, &[B_PY]).await;
    assert_eq!(status, 422, "{body}");
    let message = error_message(&body);
    assert!(
        message.contains("shared[0].source") && message.contains("cannot read `common/`"),
        "{message}"
    );

    // Over the file-count limit: the CLI refuses before upload, the server on its own.
    let dir = tempfile::tempdir().expect("tempdir");
    write_tree(dir.path(), &[B_PY]);
    for i in 0..257 {
        write_bytes(dir.path(), &format!("common/f{i}.bin"), &[0xff, i as u8]);
    }
    std::fs::write(dir.path().join("refinery.toml"), SMALL).expect("manifest");
    let (code, _, stderr) = deploy_cli(&server, &key, dir.path());
    assert_ne!(code, 0);
    assert!(
        stderr.contains("common/") && stderr.contains("more than 256 files"),
        "{stderr}"
    );
    let names: Vec<String> = (0..257).map(|i| format!("common/f{i}.bin")).collect();
    let blobs: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &[0xffu8][..])).collect();
    let (status, body) = server.deploy_binary(&key, SMALL, &[B_PY], &blobs).await;
    assert_eq!(status, 413, "{body}");
    assert!(error_message(&body).contains("258 files"), "{body}");

    // One binary file just over 5 MiB: its base64 is larger still, but its bytes are what
    // the limit counts, and the refusal names the file.
    let big = vec![0xfeu8; 5 * 1024 * 1024 + 1];
    let (status, body) = server
        .deploy_binary(&key, SMALL, &[B_PY], &[("common/model.bin", &big)])
        .await;
    assert_eq!(status, 413, "{body}");
    let message = error_message(&body);
    assert!(
        message.contains("common/model.bin") && message.contains(&format!("{} bytes", big.len())),
        "{message}"
    );

    let (status, body) = server
        .request(
            "POST",
            "/v1/deployments",
            Some(&key),
            Some(json!({
                "manifest": SMALL,
                "files": { "b.py": B_PY.1 },
                "binary_files": { "common/x.bin": "not base64!" },
            })),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        error_message(&body).contains("common/x.bin") && error_message(&body).contains("base64"),
        "{body}"
    );

    let (status, body) = server
        .request("GET", "/v1/projects/bad/deployments", Some(&key), None)
        .await;
    assert_eq!(status, 404, "nothing was deployed: {body}");
}

/// A shared directory follows the same symlink rule as a block's directory: a link to a
/// file inside the project is uploaded as that file; one pointing outside the project is
/// refused by the CLI, naming the link and its target, and nothing is deployed.
#[tokio::test]
async fn symlinks_in_shared_directories_follow_the_directory_rule() {
    let server = Server::start().await;
    let (_, key) = server.account("linker").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    write_tree(
        root,
        &[
            (
                "b.py",
                "import helper\ndef main(i, b):\n    return helper.VALUE\n",
            ),
            ("elsewhere/helper.py", "VALUE = 'linked'\n"),
            ("common/keep.txt", "kept\n"),
        ],
    );
    std::fs::write(root.join("refinery.toml"), SMALL).expect("manifest");
    std::os::unix::fs::symlink("../elsewhere/helper.py", root.join("common/helper.py"))
        .expect("link");
    let (code, stdout, stderr) = deploy_cli(&server, &key, root);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let reply = server.invoke_ok(&key, "bad", "b", json!(null)).await;
    assert_eq!(reply["output"], "linked", "{reply}");

    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("secret.py"), "TOKEN = 'host file'\n").expect("write");
    std::os::unix::fs::symlink(
        outside.path().join("secret.py"),
        root.join("common/evil.py"),
    )
    .expect("link");
    let (code, _, stderr) = deploy_cli(&server, &key, root);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("common/evil.py") && stderr.contains("outside the project directory"),
        "{stderr}"
    );
    let (_, listing) = server
        .request("GET", "/v1/projects/bad/deployments", Some(&key), None)
        .await;
    assert_eq!(
        listing["deployments"].as_array().map(Vec::len),
        Some(1),
        "the refused deploy stored nothing: {listing}"
    );
}
