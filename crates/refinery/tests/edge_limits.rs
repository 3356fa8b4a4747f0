//! Limits at the edge and what the runtimes carry, over HTTP against the real server: JSON
//! nesting (one limit, `MAX_JSON_DEPTH` = 64, for input, output and backpack in every
//! language), environment variables checked at deploy, and error output that shows the
//! user's code only (with a hint when a third-party package is missing).

mod common;

use common::Server;
use serde_json::{json, Value};

/// The platform's nesting limit (`refinery_domain::limits::MAX_JSON_DEPTH`).
const LIMIT: usize = 64;

/// `depth` nested arrays around 0, built without a parser (serde_json would refuse to
/// parse more than 128 levels).
fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(0), |inner, _| Value::Array(vec![inner]))
}

fn nested_text(depth: usize) -> String {
    format!("{}0{}", "[".repeat(depth), "]".repeat(depth))
}

/// POSTs `body` as the raw request body (and `backpack` as the header); (status, reply).
async fn invoke_raw(
    server: &Server,
    key: &str,
    block: &str,
    body: String,
    backpack: Option<String>,
) -> (u16, Value) {
    let mut request = server
        .http
        .post(format!(
            "{}/v1/projects/nesting/blocks/{block}/invoke",
            server.url
        ))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body);
    if let Some(backpack) = backpack {
        request = request.header("refinery-backpack", backpack);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Echo blocks (input → output, backpack unchanged) and blocks that return, or put in the
/// backpack, a value nested as deep as their input `n` asks.
const NESTING: &str = r#"
name = "nesting"

[[blocks]]
name = "py_echo"
language = "python"
code = """
def main(block_input, backpack):
    return block_input
"""

[[blocks]]
name = "js_echo"
language = "node"
code = "exports.main = (input) => input;"

[[blocks]]
name = "sh_echo"
language = "shell"
code = "cat"

[[blocks]]
name = "py_deep"
language = "python"
code = """
def main(block_input, backpack):
    value = 0
    for _ in range(block_input["n"]):
        value = [value]
    if block_input.get("backpack"):
        backpack["deep"] = value
        return "ok"
    return value
"""

[[blocks]]
name = "js_deep"
language = "node"
code = """
exports.main = (input, backpack) => {
  let value = 0;
  for (let i = 0; i < input.n; i++) value = [value];
  if (input.backpack) {
    backpack.deep = value;
    return 'ok';
  }
  return value;
};
"""

[[blocks]]
name = "sh_deep"
language = "shell"
code = """
n=$(cat | tr -cd 0-9)
open=""
close=""
i=0
while [ "$i" -lt "$n" ]; do open="$open["; close="$close]"; i=$((i + 1)); done
printf '%s0%s' "$open" "$close"
"""
"#;

#[tokio::test(flavor = "multi_thread")]
async fn input_and_backpack_nested_to_the_limit_reach_every_runtime_and_deeper_get_a_400() {
    let server = Server::start().await;
    let (_, key) = server.account("nest-in").await;
    server.deploy_ok(&key, NESTING).await;

    for block in ["py_echo", "js_echo", "sh_echo"] {
        // At the limit: carried to the block and back, and recorded.
        let (status, reply) = invoke_raw(&server, &key, block, nested_text(LIMIT), None).await;
        assert_eq!(status, 200, "{block}: {reply}");
        assert_eq!(reply["status"], "ok", "{block}: {reply}");
        assert_eq!(reply["output"], nested(LIMIT), "{block}");
        let id = reply["execution_id"].as_str().expect("id");
        let (status, record) = server
            .request("GET", &format!("/v1/executions/{id}"), Some(&key), None)
            .await;
        assert_eq!(status, 200, "{record}");
        assert_eq!(record["input"], nested(LIMIT), "{block}");
        assert_eq!(record["output"], nested(LIMIT), "{block}");

        // Deeper: refused before anything runs, saying which value, how deep, the limit.
        for depth in [LIMIT + 1, 127, 128, 200] {
            let (status, reply) = invoke_raw(&server, &key, block, nested_text(depth), None).await;
            assert_eq!(status, 400, "{block} at {depth}: {reply}");
            let message = reply["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("request body"), "{message}");
            assert!(
                message.contains(&format!("nested {depth} levels")),
                "{message}"
            );
            assert!(message.contains("limit is 64 levels"), "{message}");
        }
    }

    // The backpack header: at the limit it reaches the block and comes back unchanged.
    let backpack_at_limit = json!({ "b": nested(LIMIT - 1) });
    for block in ["py_echo", "js_echo", "sh_echo"] {
        let (status, reply) = invoke_raw(
            &server,
            &key,
            block,
            "1".into(),
            Some(backpack_at_limit.to_string()),
        )
        .await;
        assert_eq!(status, 200, "{block}: {reply}");
        assert_eq!(reply["backpack"], backpack_at_limit, "{block}");
    }
    for depth in [LIMIT + 1, 128, 200] {
        let header = format!("{{\"b\": {}}}", nested_text(depth - 1));
        let (status, reply) = invoke_raw(&server, &key, "py_echo", "1".into(), Some(header)).await;
        assert_eq!(status, 400, "{depth}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("Refinery-Backpack"), "{message}");
        assert!(
            message.contains(&format!("nested {depth} levels")),
            "{message}"
        );
    }
    // Nothing refused was recorded.
    let (_, list) = server
        .request(
            "GET",
            "/v1/projects/nesting/executions?limit=100",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(
        list["executions"].as_array().map_or(0, Vec::len),
        6,
        "{list}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn output_deeper_than_the_limit_is_an_error_of_that_execution_and_the_instance_stays_warm() {
    let server = Server::start().await;
    let (_, key) = server.account("nest-out").await;
    server.deploy_ok(&key, NESTING).await;

    for block in ["py_deep", "js_deep", "sh_deep"] {
        let first = server
            .invoke_ok(&key, "nesting", block, json!({ "n": LIMIT }))
            .await;
        assert_eq!(first["status"], "ok", "{block}: {first}");
        assert_eq!(first["output"], nested(LIMIT), "{block}");
        let instance = first["instance_id"].clone();

        for depth in [LIMIT + 1, 127, 128, 200] {
            let reply = server
                .invoke_ok(&key, "nesting", block, json!({ "n": depth }))
                .await;
            assert_eq!(reply["status"], "error", "{block} at {depth}: {reply}");
            assert_eq!(reply["error"]["type"], "OutputTooDeep", "{block}: {reply}");
            let message = reply["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(&format!("nested {depth} levels")),
                "{message}"
            );
            assert!(message.contains("limit is 64 levels"), "{message}");
            // An ordinary user error: the same warm instance answered, and stays.
            assert_eq!(reply["cold"], false, "{block} at {depth}: {reply}");
            assert_eq!(reply["instance_id"], instance, "{block} at {depth}");
        }
        let after = server
            .invoke_ok(&key, "nesting", block, json!({ "n": 2 }))
            .await;
        assert_eq!(after["status"], "ok", "{after}");
        assert_eq!(after["output"], json!([[0]]));
        assert_eq!(
            after["instance_id"], instance,
            "{block}: still the same instance"
        );
    }

    // A backpack the block made too deep: the same error, naming the backpack.
    for block in ["py_deep", "js_deep"] {
        for depth in [LIMIT, LIMIT + 1, 200] {
            // The backpack object adds one level around the value.
            let reply = server
                .invoke_ok(
                    &key,
                    "nesting",
                    block,
                    json!({ "n": depth - 1, "backpack": true }),
                )
                .await;
            if depth == LIMIT {
                assert_eq!(reply["status"], "ok", "{block}: {reply}");
                assert_eq!(reply["backpack"]["deep"], nested(LIMIT - 1));
                continue;
            }
            assert_eq!(reply["status"], "error", "{block}: {reply}");
            assert_eq!(reply["error"]["type"], "OutputTooDeep", "{reply}");
            let message = reply["error"]["message"].as_str().unwrap_or_default();
            assert!(message.starts_with("the backpack is nested"), "{message}");
            assert!(
                message.contains(&format!("nested {depth} levels")),
                "{message}"
            );
            assert_eq!(reply["cold"], false, "{reply}");
        }
    }
    let instances = server.instances_of("nesting", "py_deep").await;
    assert_eq!(
        instances.len(),
        1,
        "no instance was discarded: {instances:?}"
    );
}

fn env_manifest(env: &str) -> String {
    format!(
        "name = \"envs\"\n\n[[blocks]]\nname = \"b\"\nlanguage = \"python\"\ncode = \"\"\"\nimport os\ndef main(block_input, backpack):\n    return {{k: len(v) for k, v in os.environ.items() if k in ('A', 'BB')}}\n\"\"\"\n{env}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn environment_variables_that_could_not_start_an_instance_are_refused_at_deploy() {
    let server = Server::start().await;
    let (_, key) = server.account("envs").await;

    let refusals = [
        (
            "env = { OK = \"1\", BAD = \"a\\u0000b\" }".to_string(),
            "blocks[0].env.BAD",
            "NUL",
        ),
        (
            "env = { \"NUL\\u0000NAME\" = \"x\" }".to_string(),
            "blocks[0].env.NUL\\0NAME",
            "invalid variable name",
        ),
        (
            "env = { \"1X\" = \"x\" }".to_string(),
            "blocks[0].env.1X",
            "invalid variable name",
        ),
        (
            "env = { PATH = \"/evil\" }".to_string(),
            "blocks[0].env.PATH",
            "set by the platform",
        ),
        (
            "env = { REFINERY_BACKPACK = \"{}\" }".to_string(),
            "blocks[0].env.REFINERY_BACKPACK",
            "set by the platform",
        ),
        (
            // (A 10 MB value no longer fits the 1 MiB manifest limit: `storage.rs` tests that 413.)
            format!("env = {{ A = \"{}\" }}", "x".repeat(512 * 1024)),
            "blocks[0].env",
            "the limit is 4096 bytes",
        ),
        (
            format!("env = {{ A = \"{}\", BB = \"xy\" }}", "v".repeat(4096 - 4)),
            "blocks[0].env",
            "take 4097 bytes",
        ),
    ];
    for (env, field, expected) in refusals {
        let (status, body) = server.deploy(&key, &env_manifest(&env), &[]).await;
        let shown: String = env.chars().take(60).collect();
        assert_eq!(status, 422, "{shown}: {body}");
        assert_eq!(body["error"]["field"], field, "{shown}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(expected), "{shown}: {message}");
        assert_eq!(body["error"]["file"], "refinery.toml", "{body}");
        assert_eq!(body["error"]["line"], 11, "{shown}: {body}");
    }
    let (_, projects) = server
        .request("GET", "/v1/projects", Some(&key), None)
        .await;
    assert_eq!(
        projects["projects"],
        json!([]),
        "nothing was deployed: {projects}"
    );

    // Exactly the limit (names and values together): deploys, and the instance starts
    // with it.
    let env = format!("env = {{ A = \"{}\", BB = \"x\" }}", "v".repeat(4096 - 4));
    let (status, body) = server.deploy(&key, &env_manifest(&env), &[]).await;
    assert_eq!(status, 201, "{body}");
    let reply = server.invoke_ok(&key, "envs", "b", json!(null)).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["output"], json!({ "A": 4092, "BB": 1 }));
}

const ERRORS: &str = r#"
name = "errors"

[[blocks]]
name = "py_raise"
language = "python"
code = """
def helper(x):
    raise ValueError(f"bad value {x}")

def main(block_input, backpack):
    if block_input == "import":
        import left_pad_not_installed
    return helper(block_input)
"""

[[blocks]]
name = "py_import"
language = "python"
code = """
import requests_not_installed

def main(block_input, backpack):
    return 1
"""

[[blocks]]
name = "js_raise"
language = "node"
code = """
function helper(x) { throw new TypeError(`bad value ${x}`); }
exports.main = async (input) => {
  if (input === 'require') return require('left-pad-not-installed');
  if (input === 'relative') return require('./no-such-file');
  await new Promise((r) => setTimeout(r, 1));
  return helper(input);
};
"""

[[blocks]]
name = "js_import"
language = "node"
code = """
import pad from 'left-pad-not-installed';
export function main(input) { return pad(input); }
"""
"#;

fn assert_no_platform_lines(text: &str, what: &str) {
    for platform in [
        "python_shim",
        "node_shim",
        "/runtime/",
        "node:internal",
        "zygote",
    ] {
        assert!(
            !text.contains(platform),
            "{what} shows `{platform}`:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tracebacks_show_the_users_frames_only_and_a_missing_package_gets_a_hint() {
    // Every way an instance starts: adopted standby sandboxes, then (no standbys) the
    // Python zygote's fork and Node's exec.
    for args in [&[][..], &["--standby", "0"][..]] {
        let server = Server::start_with(args).await;
        let (_, key) = server.account("errs").await;
        server.deploy_ok(&key, ERRORS).await;

        let reply = server.invoke_ok(&key, "errors", "py_raise", json!(7)).await;
        assert_eq!(reply["status"], "error", "{args:?}: {reply}");
        assert_eq!(reply["error"]["type"], "ValueError");
        assert_eq!(reply["error"]["message"], "bad value 7");
        let traceback = reply["error"]["traceback"].as_str().expect("traceback");
        assert_no_platform_lines(traceback, "the Python traceback");
        assert!(
            traceback
                .starts_with("Traceback (most recent call last):\n  File \"/code/py_raise.py\""),
            "{traceback}"
        );
        assert!(
            traceback.contains("in main") && traceback.contains("in helper"),
            "{traceback}"
        );
        assert!(
            traceback.trim_end().ends_with("ValueError: bad value 7"),
            "{traceback}"
        );

        let reply = server
            .invoke_ok(&key, "errors", "py_raise", json!("import"))
            .await;
        assert_eq!(reply["error"]["type"], "ModuleNotFoundError", "{reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with("No module named 'left_pad_not_installed'\nhint: third-party packages are not installed"), "{message}");
        assert!(message.contains("standard library"), "{message}");
        assert_no_platform_lines(
            reply["error"]["traceback"].as_str().unwrap_or_default(),
            "the traceback",
        );

        let reply = server
            .invoke_ok(&key, "errors", "py_import", json!(1))
            .await;
        assert_eq!(reply["status"], "init_error", "{reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with(
                "No module named 'requests_not_installed'\nhint: third-party packages"
            ),
            "{message}"
        );
        assert_no_platform_lines(
            reply["error"]["traceback"].as_str().unwrap_or_default(),
            "the traceback",
        );

        let reply = server.invoke_ok(&key, "errors", "js_raise", json!(7)).await;
        assert_eq!(reply["status"], "error", "{args:?}: {reply}");
        assert_eq!(reply["error"]["type"], "TypeError");
        assert_eq!(reply["error"]["message"], "bad value 7");
        let stack = reply["error"]["traceback"].as_str().expect("stack");
        assert_no_platform_lines(stack, "the Node stack");
        assert!(
            stack.starts_with("TypeError: bad value 7\n    at helper (/code/js_raise.js:"),
            "{stack}"
        );
        assert!(
            stack.contains("at exports.main (/code/js_raise.js:"),
            "{stack}"
        );

        let reply = server
            .invoke_ok(&key, "errors", "js_raise", json!("require"))
            .await;
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("Cannot find module 'left-pad-not-installed'"),
            "{message}"
        );
        assert!(
            message.contains("hint: third-party packages are not installed"),
            "{message}"
        );
        assert!(message.contains("built-in modules"), "{message}");
        assert_no_platform_lines(message, "the Node message");
        assert_no_platform_lines(
            reply["error"]["traceback"].as_str().unwrap_or_default(),
            "the Node stack",
        );

        // A missing file of the block's own is not a package: no hint.
        let reply = server
            .invoke_ok(&key, "errors", "js_raise", json!("relative"))
            .await;
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("Cannot find module './no-such-file'"),
            "{message}"
        );
        assert!(!message.contains("hint:"), "{message}");

        let reply = server
            .invoke_ok(&key, "errors", "js_import", json!("x"))
            .await;
        assert_eq!(reply["status"], "init_error", "{reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("Cannot find package 'left-pad-not-installed'"),
            "{message}"
        );
        assert!(message.contains("hint: third-party packages"), "{message}");
        assert_no_platform_lines(
            reply["error"]["traceback"].as_str().unwrap_or_default(),
            "the Node stack",
        );
    }
}
