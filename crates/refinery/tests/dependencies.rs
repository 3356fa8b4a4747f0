//! Dependencies of blocks (issue 14, BRIEF §7c): a directory source's `requirements.txt` or
//! `package.json` built at deploy inside a sandbox into a read-only layer the block's
//! instances mount — against the real server, real pip and npm, the real package indexes
//! (PyPI and the npm registry must be reachable, directly or through the host's configured
//! proxy and CA), and the CLI binary.

mod common;

use std::path::Path;

use common::{write_tree, Server};
use serde_json::{json, Value};

const PY_MANIFEST: &str = r#"
name = "pydeps"

[[blocks]]
name = "camel"
language = "python"
source = "camel/"
handler = "app.main"
"#;

const PY_APP: &str = r#"import os, sys
import inflection

def main(block_input, backpack):
    try:
        with open(os.path.join(os.path.dirname(inflection.__file__), "planted.txt"), "w") as f:
            f.write("x")
        layer_writable = True
    except OSError as e:
        layer_writable = False
    return {
        "camel": inflection.camelize(block_input),
        "module": inflection.__file__,
        "layer_writable": layer_writable,
        "cmdline": open("/proc/self/cmdline", "rb").read().decode().split("\0"),
    }
"#;

fn py_files(requirements: &str) -> Vec<(&'static str, String)> {
    vec![
        ("camel/app.py", PY_APP.to_string()),
        ("camel/requirements.txt", requirements.to_string()),
    ]
}

fn as_refs<'a>(files: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    files.iter().map(|(p, c)| (*p, c.as_str())).collect()
}

fn only_build(reply: &Value) -> &Value {
    let builds = reply["builds"].as_array().expect("builds array");
    assert_eq!(builds.len(), 1, "one build: {reply}");
    &builds[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_block_imports_a_package_from_pypi_from_a_cached_per_account_read_only_layer() {
    let server = Server::start().await;
    let (_, key) = server.account("pyalice").await;
    let files = py_files("inflection==0.5.1\n");

    let first = server
        .deploy_files_ok(&key, PY_MANIFEST, &as_refs(&files))
        .await;
    let build = only_build(&first);
    assert_eq!(build["block"], "camel");
    assert_eq!(build["status"], "built", "{first}");
    assert_eq!(build["cached"], false);
    assert!(build["duration_ms"].as_u64().is_some(), "{build}");
    let layer = build["layer"].as_str().expect("layer key").to_string();
    assert_eq!(layer.len(), 64);

    let out = server
        .invoke_ok(&key, "pydeps", "camel", json!("device_type"))
        .await;
    assert_eq!(out["status"], "ok", "{out}");
    assert_eq!(out["output"]["camel"], "DeviceType", "{out}");
    // From the layer: mounted at /deps (a zygote fork), or linked into an adopted standby
    // sandbox's code dir.
    assert!(
        out["output"]["module"]
            .as_str()
            .is_some_and(|m| m.starts_with("/deps/") || m.starts_with("/code/.deps/")),
        "inflection comes from the layer: {out}"
    );
    assert_eq!(out["output"]["layer_writable"], false, "{out}");
    // An adopted standby sandbox or a zygote fork (their command lines), not an exec.
    let cmdline = out["output"]["cmdline"].to_string();
    assert!(
        cmdline.contains("--standby") || cmdline.contains("zygote_python.py"),
        "{cmdline}"
    );

    // On the host: root-owned, read-only, under the account's own layer dir.
    let layers = server.data_dir.join("layers");
    let account_dirs: Vec<_> = std::fs::read_dir(&layers)
        .expect("layers dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(account_dirs.len(), 1, "{account_dirs:?}");
    let layer_dir = account_dirs[0].join(&layer);
    assert!(
        layer_dir.join("inflection").is_dir(),
        "{}",
        layer_dir.display()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&layer_dir)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o555);

    // The same dependencies again (other code): the layer is reused at once.
    let mut changed = files.clone();
    changed[0].1 = PY_APP.replace("camelize(block_input)", "camelize(block_input, False)");
    let second = server
        .deploy_files_ok(&key, PY_MANIFEST, &as_refs(&changed))
        .await;
    let build = only_build(&second);
    assert_eq!(build["status"], "cached", "{second}");
    assert_eq!(build["cached"], true);
    assert_eq!(build["layer"], layer.as_str());
    let out = server
        .invoke_ok(&key, "pydeps", "camel", json!("device_type"))
        .await;
    assert_eq!(out["output"]["camel"], "deviceType", "{out}");

    // Rollback to deployment 1 mounts its layer again.
    let (status, body) = server.rollback(&key, "pydeps", 1).await;
    assert!(status == 200 || status == 201, "rollback: {status} {body}");
    let out = server
        .invoke_ok(&key, "pydeps", "camel", json!("device_type"))
        .await;
    assert_eq!(out["output"]["camel"], "DeviceType", "{out}");

    // Another account deploying the very same files gets a layer of its own, built anew.
    let (_, other) = server.account("pybob").await;
    let theirs = server
        .deploy_files_ok(&other, PY_MANIFEST, &as_refs(&files))
        .await;
    let build = only_build(&theirs);
    assert_eq!(
        build["status"], "built",
        "never another account's layer: {theirs}"
    );
    assert_eq!(build["cached"], false);
    let account_dirs = std::fs::read_dir(&layers).expect("layers dir").count();
    assert_eq!(account_dirs, 2, "one layer dir per account");
    let out = server
        .invoke_ok(&other, "pydeps", "camel", json!("a_b"))
        .await;
    assert_eq!(out["output"]["camel"], "AB", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_python_builds_fail_the_deploy_with_pips_message_and_keep_the_live_deployment() {
    let server = Server::start().await;
    let (_, key) = server.account("pyfail").await;
    let good = py_files("inflection==0.5.1\n");
    server
        .deploy_files_ok(&key, PY_MANIFEST, &as_refs(&good))
        .await;

    // A package that does not exist.
    let missing = py_files("refinery-no-such-package-4f1c9a==1.0\n");
    let (status, body) = server.deploy(&key, PY_MANIFEST, &as_refs(&missing)).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "build_failed", "{body}");
    assert_eq!(body["error"]["block"], "camel");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("refinery-no-such-package-4f1c9a"),
        "pip's own message names the package: {message}"
    );
    assert_eq!(body["builds"][0]["status"], "failed", "{body}");

    // A version that does not exist (a conflict pip cannot resolve).
    let conflict = py_files("inflection==0.5.1\ninflection==0.3.0\n");
    let (status, body) = server.deploy(&key, PY_MANIFEST, &as_refs(&conflict)).await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("inflection") && message.contains("0.3.0"),
        "pip's message names the package and the version: {message}"
    );

    // Nothing was deployed: deployment 1 is still live and serves.
    let out = server
        .invoke_ok(&key, "pydeps", "camel", json!("x_y"))
        .await;
    assert_eq!(out["output"]["camel"], "XY", "{out}");
    let (_, list) = server
        .request("GET", "/v1/projects/pydeps/deployments", Some(&key), None)
        .await;
    assert_eq!(
        list["deployments"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );

    // The CLI shows the same error.
    let dir = tempfile::tempdir().expect("tempdir");
    write_project(dir.path(), PY_MANIFEST, &missing);
    let (code, stdout, stderr) = server.cli(&key, &["deploy"], Some(dir.path()));
    assert_ne!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains("refinery-no-such-package-4f1c9a"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
}

fn write_project(root: &Path, manifest: &str, files: &[(&'static str, String)]) {
    let mut all = vec![("refinery.toml", manifest.to_string())];
    all.extend(files.iter().cloned());
    let refs: Vec<(&str, &str)> = all.iter().map(|(p, c)| (*p, c.as_str())).collect();
    write_tree(root, &refs);
}

/// What a hostile build step tries, in Python (`setup.py` of a local package; the same
/// probes run from npm's `postinstall` through `python3`): read the server's data dir,
/// connect to the API on the host's loopback and to a listener on the host's own address,
/// write outside the build dir. Each probe's result goes into `findings` (the errno name,
/// or "ok" if it worked).
const PROBES: &str = r#"
import errno, json, os, socket

def attempt(f):
    try:
        r = f()
        return "ok" if r is None else r
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
    except Exception as e:
        return type(e).__name__

def connect(host, port):
    def go():
        with socket.create_connection((host, port), timeout=3) as s:
            return "connected"
    return attempt(go)

def write(path):
    def go():
        with open(path, "w") as f:
            f.write("planted")
    return attempt(go)

findings = {
    "read_data_dir": attempt(lambda: os.listdir("@DATA_DIR@") and "listed"),
    "read_db": attempt(lambda: open("@DATA_DIR@/refinery.db", "rb").read(16) and "read"),
    "read_operator_key": attempt(lambda: open("@DATA_DIR@/operator.key").read() and "read"),
    "connect_api_loopback": connect("127.0.0.1", @API_PORT@),
    "connect_host": connect("@HOST_ADDR@", @HOST_PORT@),
    "write_code": write("/code/planted.txt"),
    "write_usr": write("/usr/planted.txt"),
    "write_etc": write("/etc/planted.txt"),
    "write_root": write("/planted.txt"),
    "write_data_dir": write("@DATA_DIR@/planted.txt"),
    "uid": os.getuid(),
    "build_dir_writable": write("/build/probe.txt"),
}
"#;

fn probes(server: &Server, host_addr: &str, host_port: u16) -> String {
    let api_port = server
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
        .expect("API port");
    PROBES
        .replace("@DATA_DIR@", &server.data_dir.display().to_string())
        .replace("@API_PORT@", &api_port.to_string())
        .replace("@HOST_ADDR@", host_addr)
        .replace("@HOST_PORT@", &host_port.to_string())
}

/// Every probe failed (the build could do none of it) and the build ran unprivileged.
fn assert_contained(findings: &Value, server: &Server) {
    eprintln!("the hostile build found: {findings}");
    for probe in [
        "read_data_dir",
        "read_db",
        "read_operator_key",
        "connect_api_loopback",
        "connect_host",
        "write_code",
        "write_usr",
        "write_etc",
        "write_root",
        "write_data_dir",
    ] {
        let got = findings[probe].as_str().unwrap_or("?");
        assert!(
            !["ok", "listed", "read", "connected"].contains(&got),
            "the hostile build could {probe}: {findings}"
        );
    }
    assert_ne!(findings["uid"], 0, "{findings}");
    assert_eq!(findings["build_dir_writable"], "ok", "{findings}");
    assert!(!server.data_dir.join("planted.txt").exists());
}

/// A listener on the host's own (non-loopback) address, accepting in the background.
fn host_listener() -> (String, u16, std::net::TcpListener) {
    let addr = common::host_addresses()
        .into_iter()
        .find(|a| !a.contains(':'))
        .expect("this host has an IPv4 address");
    let listener = std::net::TcpListener::bind((addr.as_str(), 0)).expect("bind host address");
    let port = listener.local_addr().expect("addr").port();
    (addr, port, listener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_setup_py_cannot_reach_the_data_dir_the_api_or_the_host_nor_write_outside_its_build_dir(
) {
    let server = Server::start().await;
    let (_, key) = server.account("pyevil").await;
    let (addr, port, _listener) = host_listener();
    let setup = format!(
        "{}\nimport pathlib\nhere = pathlib.Path(__file__).resolve().parent\n\
         (here / 'evil_findings.py').write_text('FINDINGS = ' + repr(json.dumps(findings)) + '\\n')\n\
         from setuptools import setup\nsetup(name='evil', version='1.0', py_modules=['evil_findings'])\n",
        probes(&server, &addr, port)
    );
    let manifest = r#"
name = "evil"

[[blocks]]
name = "report"
language = "python"
source = "report/"
"#;
    let files = [
        (
            "report/main.py",
            "import json, evil_findings\n\ndef main(i, b):\n    return json.loads(evil_findings.FINDINGS)\n",
        ),
        ("report/requirements.txt", "./evil\n"),
        ("report/evil/setup.py", setup.as_str()),
    ];
    let reply = server.deploy_files_ok(&key, manifest, &files).await;
    assert_eq!(only_build(&reply)["status"], "built", "{reply}");
    let out = server.invoke_ok(&key, "evil", "report", json!({})).await;
    assert_eq!(out["status"], "ok", "{out}");
    assert_contained(&out["output"], &server);
}

const JS_MANIFEST: &str = r#"
name = "jsdeps"

[[blocks]]
name = "dur"
language = "node"
source = "dur/"
handler = "app.main"
"#;

const JS_APP: &str = r#"const fs = require('fs');
const ms = require('ms');
exports.main = (input) => {
  let layerWritable = true;
  const dir = require('path').dirname(require.resolve('ms'));
  try { fs.writeFileSync(dir + '/planted.txt', 'x'); } catch (e) { layerWritable = false; }
  const standby = fs.readFileSync('/proc/self/cmdline', 'utf8').includes('--standby');
  return { ms: ms(input), resolved: require.resolve('ms'), layerWritable, standby };
};
"#;

const MS_LOCK: &str = r#"{
  "name": "dur",
  "lockfileVersion": 3,
  "requires": true,
  "packages": {
    "": { "name": "dur", "dependencies": { "ms": "2.1.3" } },
    "node_modules/ms": {
      "version": "2.1.3",
      "resolved": "https://registry.npmjs.org/ms/-/ms-2.1.3.tgz",
      "integrity": "sha512-6FlzubTLZG3J2a/NVCAleEhjzq5oxgHyaCU9yYXvcLsvoVaHJq/s5xXI6/XXP6tz7R9xAOtHnSO/tXtF3WRTlA=="
    }
  }
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_block_requires_a_package_from_npm_from_a_read_only_layer() {
    let server = Server::start().await;
    let (_, key) = server.account("jsalice").await;
    let package = r#"{"name": "dur", "dependencies": {"ms": "2.1.3"}}"#;
    // With a lockfile: `npm ci`.
    let files = [
        ("dur/app.js", JS_APP),
        ("dur/package.json", package),
        ("dur/package-lock.json", MS_LOCK),
    ];
    let reply = server.deploy_files_ok(&key, JS_MANIFEST, &files).await;
    assert_eq!(only_build(&reply)["status"], "built", "{reply}");
    let out = server
        .invoke_ok(&key, "jsdeps", "dur", json!("2 days"))
        .await;
    assert_eq!(out["status"], "ok", "{out}");
    assert_eq!(out["output"]["ms"], 172_800_000, "{out}");
    // Adopted standby sandbox: the layer linked into /code; exec: mounted at /node_modules.
    let expected = if out["output"]["standby"] == true {
        "/code/node_modules/ms/index.js"
    } else {
        "/node_modules/ms/index.js"
    };
    assert_eq!(out["output"]["resolved"], expected, "{out}");
    assert_eq!(out["output"]["layerWritable"], false, "{out}");

    // Without one: `npm install`; a package that does not exist fails the deploy with npm's
    // own message.
    let missing =
        r#"{"name": "dur", "dependencies": {"refinery-no-such-package-4f1c9a": "1.0.0"}}"#;
    let (status, body) = server
        .deploy(
            &key,
            JS_MANIFEST,
            &[("dur/app.js", JS_APP), ("dur/package.json", missing)],
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "build_failed", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("refinery-no-such-package-4f1c9a"),
        "npm's own message names the package: {message}"
    );
    let out = server.invoke_ok(&key, "jsdeps", "dur", json!("1s")).await;
    assert_eq!(
        out["output"]["ms"], 1000,
        "the live deployment still serves: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_npm_postinstall_cannot_reach_the_data_dir_the_api_or_the_host_nor_write_outside_its_build_dir(
) {
    let server = Server::start().await;
    let (_, key) = server.account("jsevil").await;
    let (addr, port, _listener) = host_listener();
    // The probes (Python, run by the postinstall script) leave their findings in a module of
    // the layer, which the block then requires.
    let probe = format!(
        "{}\nos.makedirs('node_modules/findings', exist_ok=True)\n\
         open('node_modules/findings/index.js', 'w').write('module.exports = ' + json.dumps(findings) + ';\\n')\n",
        probes(&server, &addr, port)
    );
    let package = r#"{"name": "evil", "dependencies": {"ms": "2.1.3"},
        "scripts": {"postinstall": "python3 probe.py"}}"#;
    let manifest = r#"
name = "jsevil"

[[blocks]]
name = "report"
language = "node"
source = "report/"
"#;
    let files = [
        (
            "report/index.js",
            "exports.main = () => require('findings');\n",
        ),
        ("report/package.json", package),
        ("report/probe.py", probe.as_str()),
    ];
    let reply = server.deploy_files_ok(&key, manifest, &files).await;
    assert_eq!(only_build(&reply)["status"], "built", "{reply}");
    let out = server.invoke_ok(&key, "jsevil", "report", json!({})).await;
    assert_eq!(out["status"], "ok", "{out}");
    assert_contained(&out["output"], &server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deploy_streams_the_build_log_as_ndjson_and_the_cli_shows_it() {
    let server = Server::start().await;
    let (_, key) = server.account("streamer").await;
    let files = py_files("inflection==0.5.1\n");

    // The CLI: the build's progress and pip's own output on stderr, then the answer.
    let dir = tempfile::tempdir().expect("tempdir");
    write_project(dir.path(), PY_MANIFEST, &files);
    let (code, stdout, stderr) = server.cli(&key, &["deploy"], Some(dir.path()));
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.contains("Building the dependencies of block camel (pip)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("camel | Successfully installed inflection-0.5.1"),
        "pip's log streamed: {stderr}"
    );
    assert!(
        stdout.contains("dependencies of camel: built in"),
        "{stdout}"
    );

    // `--json`: the final answer only, with the build's status.
    let (code, stdout, stderr) = server.cli(&key, &["deploy", "--json"], Some(dir.path()));
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let reply: Value = serde_json::from_str(&stdout).expect("one JSON answer");
    assert_eq!(reply["deployment"], 2, "{reply}");
    assert_eq!(reply["builds"][0]["status"], "cached", "{reply}");
    assert_eq!(reply["builds"][0]["cached"], true, "{reply}");

    // The API: with Accept: application/x-ndjson, events then the answer as the last line.
    let mut changed = files.clone();
    changed[1].1 = "inflection==0.5.0\n".into();
    let body = json!({
        "manifest": PY_MANIFEST,
        "files": changed.iter().map(|(p, c)| (p.to_string(), Value::String(c.clone()))).collect::<serde_json::Map<_, _>>(),
    });
    let response = server
        .http
        .post(format!("{}/v1/deployments", server.url))
        .bearer_auth(&key)
        .header("accept", "application/x-ndjson")
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let text = response.text().await.expect("body");
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(events[0]["type"], "build", "{text}");
    assert_eq!(events[0]["status"], "started", "{text}");
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "log"
                && e["line"].as_str().is_some_and(|l| l.contains("inflection"))),
        "{text}"
    );
    let last = events.last().expect("events");
    assert_eq!(last["type"], "result", "{text}");
    assert_eq!(last["status"], 201);
    assert_eq!(last["body"]["deployment"], 3);
    assert_eq!(last["body"]["builds"][0]["status"], "built");

    // A failing build over the stream: the error is the last line, with pip's message.
    changed[1].1 = "inflection==0.0.0.404\n".into();
    let body = json!({
        "manifest": PY_MANIFEST,
        "files": changed.iter().map(|(p, c)| (p.to_string(), Value::String(c.clone()))).collect::<serde_json::Map<_, _>>(),
    });
    let text = server
        .http
        .post(format!("{}/v1/deployments", server.url))
        .bearer_auth(&key)
        .header("accept", "application/x-ndjson")
        .json(&body)
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("body");
    let last: Value = serde_json::from_str(text.lines().last().expect("a line")).expect("JSON");
    assert_eq!(last["type"], "error", "{text}");
    assert_eq!(last["status"], 422);
    assert_eq!(last["body"]["error"]["code"], "build_failed");
    assert!(
        last["body"]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("0.0.0.404")),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_build_counts_against_the_accounts_memory_quota_and_its_usage_is_reported() {
    let server = Server::start().await;
    let (_, key) = server.account("tight").await;
    // Builds run under 1024 MB: an account allowed 512 MB in all cannot start one.
    let (status, body) = server
        .request(
            "PUT",
            "/v1/accounts/tight/quota",
            Some(&server.operator_key),
            Some(json!({"memory_mb": 512})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let files = py_files("inflection==0.5.1\n");
    let (status, body) = server.deploy(&key, PY_MANIFEST, &as_refs(&files)).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["limit"], "memory_mb", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("dependency build"), "{message}");

    // With room, it builds; its usage (memory × time) is in the answer.
    let (status, body) = server
        .request(
            "PUT",
            "/v1/accounts/tight/quota",
            Some(&server.operator_key),
            Some(json!({"memory_mb": 4096})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let reply = server
        .deploy_files_ok(&key, PY_MANIFEST, &as_refs(&files))
        .await;
    let build = only_build(&reply);
    assert_eq!(build["memory_mb"], 1024, "{build}");
    assert_eq!(
        build["mb_ms"].as_u64(),
        build["duration_ms"].as_u64().map(|d| d * 1024),
        "{build}"
    );
}
