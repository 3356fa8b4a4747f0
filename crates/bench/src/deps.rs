//! `refinery-bench deps`: cold starts of blocks with a dependency layer against the same
//! blocks without one, in the same run on one server — Python importing a small pure-Python
//! package from PyPI (`inflection`), Node requiring a small npm package (`ms`) — plus the
//! first build of each layer and a redeploy that finds it cached. Each round redeploys the
//! project (its instances retired, the layers cached) and then invokes every block once, in
//! a rotating order, a pause before each: every invocation is a cold start.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::machine::{self, Load, Machine};
use crate::server::{self, Api};
use crate::stats::{summary, Summary};

const MANIFEST: &str = r#"name = "deps"

[[blocks]]
name = "py_plain"
language = "python"
source = "py_plain/"
memory_mb = 128

[[blocks]]
name = "py_deps"
language = "python"
source = "py_deps/"
memory_mb = 128

[[blocks]]
name = "js_plain"
language = "node"
source = "js_plain/"
memory_mb = 128

[[blocks]]
name = "js_deps"
language = "node"
source = "js_deps/"
memory_mb = 128
"#;

const PY_PLAIN: &str = "def main(i, b):\n    return i.title()\n";
const PY_DEPS: &str = "import inflection\n\ndef main(i, b):\n    return inflection.camelize(i)\n";
const JS_PLAIN: &str = "exports.main = (i) => i.toUpperCase();\n";
const JS_DEPS: &str = "const ms = require('ms');\nexports.main = (i) => ms(i);\n";

/// The blocks, with what each is.
const BLOCKS: [(&str, &str); 4] = [
    ("py_plain", "Python, no dependencies"),
    ("py_deps", "Python, `inflection` from PyPI (its layer)"),
    ("js_plain", "Node, no dependencies"),
    ("js_deps", "Node, `ms` from npm (its layer)"),
];

fn files() -> Value {
    json!({
        "py_plain/main.py": PY_PLAIN,
        "py_deps/main.py": PY_DEPS,
        "py_deps/requirements.txt": "inflection==0.5.1\n",
        "js_plain/index.js": JS_PLAIN,
        "js_deps/index.js": JS_DEPS,
        "js_deps/package.json": "{\"name\": \"js_deps\", \"dependencies\": {\"ms\": \"2.1.3\"}}\n",
    })
}

fn input(block: &str) -> Value {
    match block {
        "js_deps" => json!("2 days"),
        _ => json!("device_type"),
    }
}

pub struct DepsResults {
    machine: Machine,
    load_before: Load,
    load_after: Load,
    elapsed: Duration,
    rounds: usize,
    first_deploy_ms: f64,
    first_builds: Value,
    cached_deploy_ms: Summary,
    rows: Vec<(&'static str, &'static str, Summary, Summary)>,
}

async fn deploy(api: &Api, key: &str) -> Result<(f64, Value)> {
    let started = Instant::now();
    let reply = api
        .post(
            key,
            "/v1/deployments",
            &json!({"manifest": MANIFEST, "files": files()}),
        )
        .await?;
    Ok((started.elapsed().as_secs_f64() * 1000.0, reply))
}

pub async fn run(refinery: &std::path::Path, rounds: usize) -> Result<DepsResults> {
    let started = Instant::now();
    let machine = machine::describe();
    let load_before = machine::load();
    // A redeploy per round: more than the default deploy rate allows.
    let server = server::start(refinery, &[])?;
    let api = Api::new(&server)?;
    let key = api.account(&server.operator_key, "bench").await?;
    eprintln!("bench deps: first deploy (builds both layers)");
    let (first_deploy_ms, reply) = deploy(&api, &key).await?;
    let first_builds = reply["builds"].clone();
    let mut http = vec![Vec::with_capacity(rounds); BLOCKS.len()];
    let mut init = vec![Vec::with_capacity(rounds); BLOCKS.len()];
    let mut redeploys = Vec::with_capacity(rounds);
    eprintln!("bench deps: {rounds} rounds of one cold start per block");
    for round in 0..rounds {
        if round > 0 {
            let (ms, reply) = deploy(&api, &key).await?;
            if reply["builds"]
                .as_array()
                .is_some_and(|b| b.iter().any(|b| b["cached"] != true))
            {
                bail!("a redeploy rebuilt a layer: {reply}");
            }
            redeploys.push(ms);
        }
        for offset in 0..BLOCKS.len() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let index = (round + offset) % BLOCKS.len();
            let block = BLOCKS[index].0;
            let t = Instant::now();
            let reply = api
                .post(
                    &key,
                    &format!("/v1/projects/deps/blocks/{block}/invoke"),
                    &input(block),
                )
                .await?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if reply["status"] != "ok" || reply["cold"] != true {
                bail!("expected a cold start that succeeds: {reply}");
            }
            http[index].push(ms);
            init[index].push(reply["init_ms"].as_f64().unwrap_or(f64::NAN));
        }
    }
    drop(server);
    Ok(DepsResults {
        machine,
        load_before,
        load_after: machine::load(),
        elapsed: started.elapsed(),
        rounds,
        first_deploy_ms,
        first_builds,
        cached_deploy_ms: summary(&redeploys),
        rows: BLOCKS
            .iter()
            .enumerate()
            .map(|(i, (name, what))| (*name, *what, summary(&http[i]), summary(&init[i])))
            .collect(),
    })
}

pub fn report(r: &DepsResults) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let _ = writeln!(o, "Measured {} at commit `{}` by:\n", m.date_utc, m.commit);
    let _ = writeln!(
        o,
        "```sh\ntarget/release/refinery-bench deps --rounds {}\n```\n",
        r.rounds
    );
    let _ = writeln!(
        o,
        "Machine: {} × {}, {:.1} GiB, Linux {}; {}, {}. Release build, client on the same \
         machine. Load average (1 min) {:.2} before, {:.2} after; {} / {} compiler processes \
         running at start / end. The run took {:.0} s.\n",
        m.cpus,
        m.cpu_model,
        m.memory_gib,
        m.kernel,
        m.python,
        m.node,
        r.load_before.load1,
        r.load_after.load1,
        r.load_before.compilers,
        r.load_after.compilers,
        r.elapsed.as_secs_f64()
    );
    let _ = writeln!(
        o,
        "Cold starts, HTTP in to result out (each round: redeploy, then one invocation per \
         block, 300 ms apart):\n\n| block | p50 | p90 | mean | init p50 (shim: load the code) |\n|---|---|---|---|---|"
    );
    for (_, what, s, init) in &r.rows {
        let _ = writeln!(
            o,
            "| {what} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            s.p50, s.p90, s.mean, init.p50
        );
    }
    let p50 = |name: &str| {
        r.rows
            .iter()
            .find(|(n, ..)| *n == name)
            .map_or(f64::NAN, |(_, _, s, _)| s.p50)
    };
    let _ = writeln!(
        o,
        "\nAdded by the dependency (p50): Python {:+.2} ms, Node {:+.2} ms.\n",
        p50("py_deps") - p50("py_plain"),
        p50("js_deps") - p50("js_plain")
    );
    let builds: Vec<String> = r
        .first_builds
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            format!(
                "{} {:.1} s ({} files)",
                b["block"].as_str().unwrap_or("?"),
                b["duration_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0,
                b["files"]
            )
        })
        .collect();
    let _ = writeln!(
        o,
        "Layers: the first deploy took {:.1} s (builds: {}); a redeploy that finds both cached \
         {:.1} ms p50.",
        r.first_deploy_ms / 1000.0,
        builds.join(", "),
        r.cached_deploy_ms.p50
    );
    o
}
