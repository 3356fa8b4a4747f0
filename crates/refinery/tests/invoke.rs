//! Deploy and invoke over HTTP: the three languages, warm reuse, concurrency and
//! isolation between concurrent instances, freezing and reaping.

mod common;

use std::time::Duration;

use common::{cgroup_frozen, eventually, process_alive, Server};
use serde_json::{json, Value};

const LANGUAGES: &str = r#"
name = "langs"

[[blocks]]
name = "py"
language = "python"
code = """
import os
def main(block_input, backpack):
    print("hello from python")
    backpack["seen_by"] = "py"
    return {"echo": block_input, "greeting": os.environ.get("GREETING"), "from_backpack": backpack.get("user")}
"""
env = { GREETING = "hi" }

[[blocks]]
name = "pyasync"
language = "python"
code = """
import asyncio
async def main(block_input, backpack):
    await asyncio.sleep(0.01)
    return block_input["n"] * 2
"""

[[blocks]]
name = "js"
language = "node"
code = """
exports.main = async (blockInput, backpack) => {
  console.log("hello from node");
  backpack.seen_by = "js";
  return { echo: blockInput, greeting: process.env.GREETING, fromBackpack: backpack.user };
};
"""
env = { GREETING = "hola" }

[[blocks]]
name = "esm"
language = "node"
code = """
export function main(blockInput, backpack) { return { esm: true, n: blockInput.n + 1 }; }
"""

[[blocks]]
name = "sh"
language = "shell"
code = """
read input
echo "shell got $input" >&2
printf '{"wrapped": %s, "greeting": "%s"}' "$input" "$GREETING"
"""
env = { GREETING = "salut" }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn deploys_and_invokes_python_node_and_shell_blocks() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    let deployed = server.deploy_ok(&key, LANGUAGES).await;
    assert_eq!(deployed["deployment"], 1);
    assert_eq!(deployed["project"], "langs");

    let backpack_header = json!({ "user": 7 }).to_string();
    let invoke_with_backpack = |block: &'static str| {
        let request = server
            .http
            .post(format!(
                "{}/v1/projects/langs/blocks/{block}/invoke",
                server.url
            ))
            .bearer_auth(&key)
            .header("refinery-backpack", backpack_header.clone())
            .json(&json!({ "name": "world" }));
        async move {
            let response = request.send().await.expect("send");
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.expect("json")
        }
    };

    let py = invoke_with_backpack("py").await;
    assert_eq!(py["status"], "ok", "{py}");
    assert_eq!(
        py["output"],
        json!({ "echo": { "name": "world" }, "greeting": "hi", "from_backpack": 7 })
    );
    assert_eq!(py["backpack"], json!({ "user": 7, "seen_by": "py" }));
    assert!(
        py["logs"]
            .as_str()
            .unwrap_or_default()
            .contains("hello from python"),
        "{py}"
    );
    assert_eq!(py["cold"], true);
    assert!(py["init_ms"].as_f64().is_some(), "{py}");
    assert!(py["execution_id"].as_str().is_some_and(|id| !id.is_empty()));

    let js = invoke_with_backpack("js").await;
    assert_eq!(js["status"], "ok", "{js}");
    assert_eq!(
        js["output"],
        json!({ "echo": { "name": "world" }, "greeting": "hola", "fromBackpack": 7 })
    );
    assert_eq!(js["backpack"]["seen_by"], "js");
    assert!(
        js["logs"]
            .as_str()
            .unwrap_or_default()
            .contains("hello from node"),
        "{js}"
    );

    let sh = invoke_with_backpack("sh").await;
    assert_eq!(sh["status"], "ok", "{sh}");
    assert_eq!(
        sh["output"],
        json!({ "wrapped": { "name": "world" }, "greeting": "salut" })
    );
    assert!(
        sh["logs"]
            .as_str()
            .unwrap_or_default()
            .contains("shell got"),
        "{sh}"
    );

    let pyasync = server
        .invoke_ok(&key, "langs", "pyasync", json!({ "n": 21 }))
        .await;
    assert_eq!(pyasync["output"], 42, "{pyasync}");
    let esm = server
        .invoke_ok(&key, "langs", "esm", json!({ "n": 1 }))
        .await;
    assert_eq!(esm["output"], json!({ "esm": true, "n": 2 }), "{esm}");
}

const SLEEPY: &str = r#"
name = "sleepy"

[[blocks]]
name = "nap"
language = "python"
code = """
import os, time
def main(block_input, backpack):
    mark = "/tmp/mark-%s" % block_input["n"]
    with open(mark, "w") as f:
        f.write("x")
    time.sleep(block_input.get("sleep", 0))
    return {"tmp": sorted(os.listdir("/tmp")), "pid": os.getpid()}
"""
"#;

#[tokio::test(flavor = "multi_thread")]
async fn sequential_invocations_reuse_one_warm_instance() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, SLEEPY).await;

    let first = server
        .invoke_ok(&key, "sleepy", "nap", json!({ "n": 1 }))
        .await;
    let second = server
        .invoke_ok(&key, "sleepy", "nap", json!({ "n": 2 }))
        .await;
    assert_eq!(first["cold"], true, "{first}");
    assert_eq!(second["cold"], false, "{second}");
    assert_eq!(first["instance_id"], second["instance_id"]);
    assert!(second["init_ms"].is_null());
    // Same process: the first invocation's file is still in its /tmp.
    assert_eq!(second["output"]["tmp"], json!(["mark-1", "mark-2"]));
    let instances = server.instances().await;
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert_eq!(instances[0]["invocations"], 2);
    // The operator sees the instance's host uid, which kernel audit records name.
    assert!(
        instances[0]["uid"]
            .as_u64()
            .is_some_and(|uid| uid >= 100_000),
        "{instances:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_invocations_run_in_separate_isolated_instances() {
    let server = Server::start().await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, SLEEPY).await;

    let calls =
        (0..5).map(|n| server.invoke(&key, "sleepy", "nap", json!({ "n": n, "sleep": 1.5 })));
    let results = futures::future::join_all(calls).await;
    let mut instance_ids = std::collections::BTreeSet::new();
    for (n, (status, body)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["status"], "ok", "{body}");
        assert_eq!(body["cold"], true, "{body}");
        // Each instance's /tmp holds only its own mark.
        assert_eq!(
            body["output"]["tmp"],
            json!([format!("mark-{n}")]),
            "{body}"
        );
        instance_ids.insert(body["instance_id"].as_str().expect("id").to_string());
    }
    assert_eq!(instance_ids.len(), 5);

    let instances = server.instances().await;
    assert_eq!(instances.len(), 5, "{instances:?}");
    let pids: std::collections::BTreeSet<i64> =
        instances.iter().filter_map(|i| i["pid"].as_i64()).collect();
    assert_eq!(pids.len(), 5, "distinct host processes: {instances:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_instances_are_frozen_then_reaped_after_keep_alive() {
    let server = Server::start_with(&["--keep-alive", "2s"]).await;
    let (_, key) = server.account("acme").await;
    server.deploy_ok(&key, SLEEPY).await;
    server
        .invoke_ok(&key, "sleepy", "nap", json!({ "n": 1 }))
        .await;

    let instances = server.instances().await;
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0]["state"], "frozen", "{instances:?}");
    let cgroups = instances[0]["cgroups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!cgroups.is_empty());
    let frozen = eventually(Duration::from_secs(2), || {
        cgroup_frozen(&cgroups) == Some(true)
    })
    .await;
    assert!(
        frozen,
        "the kernel does not report the instance frozen: {cgroups:?}"
    );
    let pid = instances[0]["pid"].as_i64().expect("pid");
    assert!(process_alive(pid));

    // Reaped: process gone and cgroups removed.
    let reaped = eventually(Duration::from_secs(10), || !process_alive(pid)).await;
    assert!(reaped, "instance {pid} outlived its keep-alive");
    assert!(server.instances().await.is_empty());
    let removed = eventually(Duration::from_secs(2), || {
        cgroups
            .iter()
            .filter_map(Value::as_str)
            .all(|p| !std::path::Path::new(p).exists())
    })
    .await;
    assert!(removed, "cgroups left behind: {cgroups:?}");

    // The next invocation is cold again.
    let again = server
        .invoke_ok(&key, "sleepy", "nap", json!({ "n": 2 }))
        .await;
    assert_eq!(again["cold"], true);
}

/// Parent pid of `pid`, from /proc.
fn parent_of(pid: i64) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

const PY_ONLY: &str = r#"
name = "pyonly"
[[blocks]]
name = "py"
language = "python"
code = """
import os
def main(block_input, backpack):
    return {"pid": os.getpid(), "uid": os.getuid(), "n": block_input}
"""
"#;

const PY_CMDLINE: &str = r#"
name = "pycmd"
[[blocks]]
name = "py"
language = "python"
code = """
import os
def main(block_input, backpack):
    cmdline = open("/proc/self/cmdline", "rb").read().split(b"\\0")
    return {"pid": os.getpid(), "uid": os.getuid(), "n": block_input, "env": dict(os.environ),
            "standby": b"--standby" in cmdline}
"""
env = { GREETING = "hi" }
"#;

/// How a Python cold start is served: by default it adopts a standby sandbox (pid 2 under
/// the sandbox's reaper, a child of the server); with `--standby 0` it is forked from the
/// zygote (pid 1, a child of the zygote); with `--no-zygotes` it is exec'd (pid 2, a child of
/// the server). All three answer the same way, as an unprivileged uid with exactly the
/// block's environment.
#[tokio::test]
async fn python_instances_adopt_a_standby_fork_from_the_zygote_or_exec() {
    for (args, how) in [
        (&[][..], "standby"),
        (&["--standby", "0"][..], "zygote"),
        (&["--no-zygotes"][..], "exec"),
    ] {
        let server = Server::start_with(args).await;
        if how == "standby" {
            assert!(
                wait_for_standbys(&server, "python").await,
                "python standbys"
            );
        }
        let (_, key) = server.account("zy").await;
        server.deploy_ok(&key, PY_CMDLINE).await;
        let reply = server.invoke_ok(&key, "pycmd", "py", json!(7)).await;
        assert_eq!(reply["status"], "ok", "{reply}");
        let out = &reply["output"];
        assert_eq!(out["n"], 7);
        assert!(out["uid"].as_i64().is_some_and(|u| u >= 100_000));
        assert_eq!(
            out["env"],
            json!({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
                   "LANG": "C.UTF-8", "GREETING": "hi"}),
            "{args:?}"
        );
        assert_eq!(out["standby"], how == "standby", "{args:?}: {reply}");
        let expected_pid = if how == "zygote" { 1 } else { 2 };
        assert_eq!(out["pid"], expected_pid, "{args:?}: {reply}");
        let instances = server.instances().await;
        let pid = instances[0]["pid"]
            .as_i64()
            .expect("the operator sees the pid");
        let parent = parent_of(pid).expect("the instance's parent");
        if how == "zygote" {
            assert_ne!(parent, i64::from(server.pid()), "forked by the zygote");
            let zygote_cmd = std::fs::read(format!("/proc/{parent}/cmdline")).unwrap_or_default();
            assert!(
                String::from_utf8_lossy(&zygote_cmd).contains("zygote_python.py"),
                "parent of a forked instance: {}",
                String::from_utf8_lossy(&zygote_cmd)
            );
        } else {
            assert_eq!(
                parent,
                i64::from(server.pid()),
                "{args:?}: cloned by the server itself"
            );
        }
    }
}

/// If the zygote dies, its instances die with it (parent-death signal; a frozen one once
/// thawed): the pool never hands such an idle instance an invocation, and the next fork
/// restarts the zygote.
#[tokio::test]
async fn a_killed_zygote_costs_a_cold_start_never_a_failed_invocation() {
    // Without standbys every Python cold start forks from the zygote.
    let server = Server::start_with(&["--standby", "0"]).await;
    let (_, key) = server.account("zk").await;
    server.deploy_ok(&key, PY_ONLY).await;
    let first = server.invoke_ok(&key, "pyonly", "py", json!(1)).await;
    assert_eq!(first["status"], "ok", "{first}");
    let pid = server.instances().await[0]["pid"]
        .as_i64()
        .expect("instance pid");
    let zygote = parent_of(pid).expect("the zygote");
    // SAFETY: kill(2) on the zygote's pid, read from /proc a moment ago.
    unsafe { libc::kill(zygote as i32, libc::SIGKILL) };
    assert!(eventually(Duration::from_secs(10), || common::exited(zygote)).await);

    let second = server.invoke_ok(&key, "pyonly", "py", json!(2)).await;
    assert_eq!(second["status"], "ok", "{second}");
    assert_eq!(
        second["cold"], true,
        "the dead instance was not reused: {second}"
    );
    let instances = server.instances().await;
    assert_eq!(instances.len(), 1, "the dead one is gone: {instances:?}");
    let new_pid = instances[0]["pid"].as_i64().expect("instance pid");
    let new_zygote = parent_of(new_pid).expect("a zygote again");
    assert_ne!(new_zygote, zygote, "a new zygote");
}

const NODE_ONLY: &str = r#"
name = "nodeonly"

[[blocks]]
name = "js"
language = "node"
tmp_mb = 32
code = """
const fs = require('node:fs');
exports.main = (n) => {
  const tmp = fs.statfsSync('/tmp');
  return {
    n,
    cmdline: fs.readFileSync('/proc/self/cmdline', 'utf8').split('\\0').filter(Boolean),
    argv: process.argv.slice(1),
    env: process.env,
    pid: process.pid,
    uid: process.getuid(),
    tmp_mb: (tmp.blocks * tmp.bsize) / (1024 * 1024),
  };
};
"""
env = { GREETING = "hi" }

[[blocks]]
name = "opts"
language = "node"
code = """
exports.main = () => require('node:fs').readFileSync('/proc/self/cmdline', 'utf8');
"""
env = { NODE_OPTIONS = "--max-old-space-size=64" }
"#;

/// How many standby sandboxes of `runtime` the server reports waiting.
async fn standbys(server: &Server, runtime: &str) -> Option<i64> {
    let text = server
        .http
        .get(format!("{}/metrics", server.url))
        .bearer_auth(&server.operator_key)
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "refinery_standby_sandboxes{{runtime=\"{runtime}\"}} "
            ))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// Node cannot fork from a zygote, so by default its cold starts adopt a standby sandbox
/// (started ahead of time, shim loaded); with `--no-zygotes` or `--standby 0` they start
/// by exec. Either way the block sees the same instance: argv, environment (exactly the
/// block's), pid 2 under the reaper, its own uid, its own /tmp size. A block that sets a
/// variable Node reads while starting (NODE_OPTIONS) always starts by exec, with it.
#[tokio::test]
async fn node_instances_adopt_standby_sandboxes_or_exec_without_them() {
    for (args, standby) in [
        (&[][..], true),
        (&["--no-zygotes"][..], false),
        (&["--standby", "0"][..], false),
    ] {
        let server = Server::start_with(args).await;
        if standby {
            assert!(
                wait_for_standbys(&server, "node").await,
                "the server keeps Node standbys waiting"
            );
        }
        let (_, key) = server.account("nd").await;
        server.deploy_ok(&key, NODE_ONLY).await;
        let reply = server.invoke_ok(&key, "nodeonly", "js", json!(5)).await;
        assert_eq!(reply["status"], "ok", "{args:?}: {reply}");
        let out = &reply["output"];
        assert_eq!(out["n"], 5);
        let cmdline = out["cmdline"].to_string();
        assert_eq!(
            cmdline.contains("--standby"),
            standby,
            "{args:?}: adopted a standby sandbox? {cmdline}"
        );
        assert_eq!(
            out["argv"],
            json!(["/runtime/node_shim.cjs", "/code/js.js"])
        );
        assert_eq!(
            out["env"],
            json!({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
                   "LANG": "C.UTF-8", "GREETING": "hi"}),
            "{args:?}"
        );
        assert_eq!(out["pid"], 2, "{args:?}");
        assert!(out["uid"].as_i64().is_some_and(|u| u >= 100_000));
        assert_eq!(out["tmp_mb"], 32, "{args:?}: the block's tmp_mb");

        let opts = server
            .invoke_ok(&key, "nodeonly", "opts", json!(null))
            .await;
        assert_eq!(opts["status"], "ok", "{opts}");
        let cmdline = opts["output"].as_str().unwrap_or_default();
        assert!(
            !cmdline.contains("--standby"),
            "NODE_OPTIONS means exec: {cmdline:?}"
        );
    }
}

/// Waits until the server reports at least one standby sandbox of `runtime` waiting.
async fn wait_for_standbys(server: &Server, runtime: &str) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if standbys(server, runtime).await.is_some_and(|n| n > 0) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

const SHELL_AGE: &str = r#"
name = "shage"
[[blocks]]
name = "sh"
language = "shell"
tmp_mb = 16
code = """
uptime=$(cut -d' ' -f1 /proc/uptime)
started=$(cut -d' ' -f22 /proc/2/stat)
age=$(awk -v u="$uptime" -v s="$started" 'BEGIN { printf "%.2f", u - s / 100 }')
tmp=$(df -m /tmp | awk 'NR == 2 { print $2 }')
echo "{\\"age\\": $age, \\"greeting\\": \\"$GREETING\\", \\"tmp_mb\\": $tmp}"
"""
env = { GREETING = "hi" }
"#;

/// Shell cold starts adopt a standby sandbox too (the runtime is built in, so the sandbox is
/// all of its start): its runtime process (pid 2) was started before the invocation; with
/// `--standby 0` it starts during it. Either way the script gets its variables and /tmp.
#[tokio::test]
async fn shell_instances_adopt_standby_sandboxes_or_start_without_them() {
    for (args, standby) in [(&[][..], true), (&["--standby", "0"][..], false)] {
        let server = Server::start_with(args).await;
        if standby {
            assert!(wait_for_standbys(&server, "shell").await, "shell standbys");
        }
        let (_, key) = server.account("sh").await;
        server.deploy_ok(&key, SHELL_AGE).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let reply = server.invoke_ok(&key, "shage", "sh", json!(null)).await;
        assert_eq!(reply["status"], "ok", "{args:?}: {reply}");
        let out = &reply["output"];
        assert_eq!(out["greeting"], "hi", "{reply}");
        assert_eq!(out["tmp_mb"], 16, "{reply}");
        let age = out["age"].as_f64().expect("the runtime's age");
        assert_eq!(
            age >= 1.0,
            standby,
            "{args:?}: the runtime started {age} s before the script"
        );
    }
}
