//! The one harness the integration tests (`crates/refinery/tests`) and the benchmarks
//! (`refinery-bench`) share: starts the real `refinery serve` on a loopback port with a
//! private data dir, and talks to it over HTTP ([`Server`]'s typed requests for tests,
//! [`Client`] for the benchmarks) and through the CLI binary.
//!
//! Two flavours over one launcher: the test helpers panic with what went wrong (a panic is
//! how a test fails), [`Server::launch`] and [`Client`] return errors (the bench reports
//! them).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

mod client;
pub use client::Client;

/// The `refinery` binary the tests run: `REFINERY_BIN` when set, else the one Cargo built
/// beside the running test (`target/<profile>/deps/<test>` → `target/<profile>/refinery`)
/// or bench (`target/<profile>/refinery-bench` → `target/<profile>/refinery`).
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("REFINERY_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the running executable's path");
    let found = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("refinery"))
        .find(|candidate| candidate.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "no refinery binary beside {} (build it with `cargo build -p refinery`, or set REFINERY_BIN)",
            exe.display()
        )
    })
}

/// A running `refinery serve` (stopped with SIGTERM, and waited for, when dropped).
pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub data_dir: PathBuf,
    _data_root: Option<tempfile::TempDir>,
    pub operator_key: String,
    pub http: reqwest::Client,
}

impl Server {
    /// A server with a fresh data dir and default settings, plus the flags in
    /// `REFINERY_TEST_SERVE_ARGS` (space-separated): scripts/test runs the security suite
    /// again with `--standby 0`, so that its attacks meet every way an instance starts.
    pub async fn start() -> Server {
        let extra = std::env::var("REFINERY_TEST_SERVE_ARGS").unwrap_or_default();
        let args: Vec<&str> = extra.split_whitespace().collect();
        Server::start_with(&args).await
    }

    pub async fn start_with(args: &[&str]) -> Server {
        Server::launch_fresh(&binary(), args, Stdio::inherit(), "warn")
            .unwrap_or_else(|e| panic!("start refinery serve: {e:#}"))
    }

    /// A server on an existing data dir (for restart tests).
    pub async fn start_in(data_dir: &Path, args: &[&str]) -> Server {
        Server::spawn(data_dir, args, Stdio::inherit(), "warn").await
    }

    /// Starts `refinery serve` on `data_dir` with `args`, its stderr going to `stderr` and
    /// `REFINERY_LOG=log_level`; waits for its listening line.
    async fn spawn(data_dir: &Path, args: &[&str], stderr: Stdio, log_level: &str) -> Server {
        Server::launch(&binary(), data_dir, args, stderr, log_level)
            .unwrap_or_else(|e| panic!("start refinery serve: {e:#}"))
    }

    /// Starts `binary serve --listen 127.0.0.1:0 --data-dir data_dir args...` with its stderr
    /// going to `stderr` and `REFINERY_LOG=log_level`, and waits (30 s at most) for its
    /// listening line. The server is stopped (SIGTERM, then waited for) when dropped.
    pub fn launch(
        binary: &Path,
        data_dir: &Path,
        args: &[&str],
        stderr: Stdio,
        log_level: &str,
    ) -> anyhow::Result<Server> {
        let mut child = Command::new(binary)
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .env("REFINERY_LOG", log_level)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let (tx, rx) = mpsc::channel();
        // Reads stdout to its end, so that the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("Refinery listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let Ok(url) = rx.recv_timeout(Duration::from_secs(30)) else {
            // SAFETY: signalling our own child process, not yet waited for.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
            bail!(
                "{} serve did not print its listening line within 30 s (its stderr says why)",
                binary.display()
            );
        };
        let operator_key = std::fs::read_to_string(data_dir.join("operator.key"))
            .context("reading the server's operator.key")?
            .trim()
            .to_string();
        Ok(Server {
            child: Some(child),
            url,
            data_dir: data_dir.to_path_buf(),
            _data_root: None,
            operator_key,
            http: reqwest::Client::new(),
        })
    }

    /// Like [`Server::launch`] on a fresh private data dir (removed when dropped).
    pub fn launch_fresh(
        binary: &Path,
        args: &[&str],
        stderr: Stdio,
        log_level: &str,
    ) -> anyhow::Result<Server> {
        let root = tempfile::tempdir().context("a temporary data dir")?;
        let mut server =
            Server::launch(binary, &root.path().join("data"), args, stderr, log_level)?;
        server._data_root = Some(root);
        Ok(server)
    }

    /// The server's host pid (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().expect("wait")
    }

    /// Creates an account; returns (id, api key).
    pub async fn account(&self, name: &str) -> (String, String) {
        let (status, body) = self
            .request(
                "POST",
                "/v1/accounts",
                Some(&self.operator_key),
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(status, 201, "create account: {body}");
        (
            body["id"].as_str().expect("id").to_string(),
            body["api_key"].as_str().expect("key").to_string(),
        )
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self.http.request(method, format!("{}{}", self.url, path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("send");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Deploys an inline manifest (sources given as (path, contents)).
    pub async fn deploy(&self, key: &str, manifest: &str, files: &[(&str, &str)]) -> (u16, Value) {
        let files: serde_json::Map<String, Value> = files
            .iter()
            .map(|(p, c)| (p.to_string(), Value::String(c.to_string())))
            .collect();
        self.request(
            "POST",
            "/v1/deployments",
            Some(key),
            Some(json!({ "manifest": manifest, "files": files })),
        )
        .await
    }

    pub async fn deploy_ok(&self, key: &str, manifest: &str) -> Value {
        let (status, body) = self.deploy(key, manifest, &[]).await;
        assert_eq!(status, 201, "deploy: {body}");
        body
    }

    pub async fn invoke(
        &self,
        key: &str,
        project: &str,
        block: &str,
        input: Value,
    ) -> (u16, Value) {
        self.request(
            "POST",
            &format!("/v1/projects/{project}/blocks/{block}/invoke"),
            Some(key),
            Some(input),
        )
        .await
    }

    /// Invokes; returns (status, the `Retry-After` header if any, body).
    pub async fn invoke_retry_after(
        &self,
        key: &str,
        project: &str,
        block: &str,
        input: Value,
    ) -> (u16, Option<String>, Value) {
        post_invoke(
            self.http.clone(),
            self.invoke_url(project, block),
            key.to_string(),
            input,
        )
        .await
    }

    /// Like [`Server::invoke_retry_after`], in a task of its own (for invocations that
    /// must be running while the test goes on).
    pub fn invoke_in_background(
        &self,
        key: &str,
        project: &str,
        block: &str,
        input: Value,
    ) -> tokio::task::JoinHandle<(u16, Option<String>, Value)> {
        tokio::spawn(post_invoke(
            self.http.clone(),
            self.invoke_url(project, block),
            key.to_string(),
            input,
        ))
    }

    fn invoke_url(&self, project: &str, block: &str) -> String {
        format!("{}/v1/projects/{project}/blocks/{block}/invoke", self.url)
    }

    /// Invokes and asserts HTTP 200; returns the execution.
    pub async fn invoke_ok(&self, key: &str, project: &str, block: &str, input: Value) -> Value {
        let (status, body) = self.invoke(key, project, block, input).await;
        assert_eq!(status, 200, "invoke {project}/{block}: {body}");
        body
    }

    /// The operator's view of live instances.
    pub async fn instances(&self) -> Vec<Value> {
        let (status, body) = self
            .request(
                "GET",
                "/v1/instances",
                Some(&self.operator_key.clone()),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["instances"].as_array().cloned().unwrap_or_default()
    }

    /// Runs the CLI binary against this server; returns (exit code, stdout, stderr).
    pub fn cli(&self, key: &str, args: &[&str], cwd: Option<&Path>) -> (i32, String, String) {
        let mut command = Command::new(binary());
        command
            .args(args)
            .env("REFINERY_URL", &self.url)
            .env("REFINERY_API_KEY", key);
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let output = command.output().expect("run cli");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// POSTs `input` to an invoke URL with `key`; returns (status, the `Retry-After` header if
/// any, body: its JSON, or its text if it is not JSON).
async fn post_invoke(
    http: reqwest::Client,
    url: String,
    key: String,
    input: Value,
) -> (u16, Option<String>, Value) {
    let response = http
        .post(url)
        .bearer_auth(key)
        .json(&input)
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = response.text().await.expect("body");
    (
        status,
        retry_after,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Whether an instance's cgroup says it is frozen: v2 `cgroup.events` where the instance
/// has a v2 cgroup (pure v2 and hybrid hosts freeze through it), else v1 `freezer.state`.
pub fn cgroup_frozen(cgroups: &[Value]) -> Option<bool> {
    let dirs: Vec<&Path> = cgroups
        .iter()
        .filter_map(Value::as_str)
        .map(Path::new)
        .collect();
    for dir in &dirs {
        if let Ok(events) = std::fs::read_to_string(dir.join("cgroup.events")) {
            if let Some(line) = events.lines().find(|l| l.starts_with("frozen ")) {
                return Some(line.trim_end().ends_with('1'));
            }
        }
    }
    dirs.iter().find_map(|dir| {
        std::fs::read_to_string(dir.join("freezer.state"))
            .ok()
            .map(|state| state.trim() == "FROZEN")
    })
}

/// Whether process `pid` has exited: gone, or a zombie nobody reaped yet.
pub fn exited(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

pub fn process_alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Polls `check` until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

// =============================================================================================
// Security-suite helpers (used by security.rs; additive only).

static BYSTANDERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Server {
    /// Deploys a manifest with uploaded source files; asserts 201.
    pub async fn deploy_files_ok(
        &self,
        key: &str,
        manifest: &str,
        files: &[(&str, &str)],
    ) -> Value {
        let (status, body) = self.deploy(key, manifest, files).await;
        assert_eq!(status, 201, "deploy: {body}");
        body
    }

    /// The platform still serves normally: health answers and a brand-new account can deploy
    /// and invoke a block (status "ok", the expected output).
    pub async fn assert_still_serving(&self) {
        let (status, body) = self.request("GET", "/v1/health", None, None).await;
        assert_eq!(status, 200, "health: {body}");
        let n = BYSTANDERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (_, key) = self.account(&format!("bystander-{n}")).await;
        self.deploy_ok(
            &key,
            r#"
name = "canary"
[[blocks]]
name = "ping"
language = "python"
code = """
def main(block_input, backpack):
    return {"pong": block_input}
"""
"#,
        )
        .await;
        let reply = self.invoke_ok(&key, "canary", "ping", json!(n)).await;
        assert_eq!(reply["status"], "ok", "bystander invocation: {reply}");
        assert_eq!(reply["output"], json!({ "pong": n }), "{reply}");
    }

    /// The operator's view of the instances of one block.
    pub async fn instances_of(&self, project: &str, block: &str) -> Vec<Value> {
        self.instances()
            .await
            .into_iter()
            .filter(|i| i["project"] == project && i["block"] == block)
            .collect()
    }
}

/// Host pids in an instance's cgroups (union of every `cgroup.procs` listed).
pub fn cgroup_pids(cgroups: &[Value]) -> Vec<i64> {
    let mut pids: Vec<i64> = cgroups
        .iter()
        .filter_map(Value::as_str)
        .filter_map(|dir| std::fs::read_to_string(Path::new(dir).join("cgroup.procs")).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i64>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The pid a host process has inside its innermost pid namespace (last `NSpid` field).
pub fn namespace_pid(host_pid: i64) -> Option<i64> {
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// The host's non-loopback IP addresses (from `ip -j addr`, else /proc/net/fib_trie).
pub fn host_addresses() -> Vec<String> {
    let mut addrs = Vec::new();
    if let Ok(out) = Command::new("ip").args(["-j", "addr"]).output() {
        if let Ok(Value::Array(links)) = serde_json::from_slice::<Value>(&out.stdout) {
            for link in links {
                for info in link["addr_info"].as_array().cloned().unwrap_or_default() {
                    if let Some(a) = info["local"].as_str() {
                        addrs.push(a.to_string());
                    }
                }
            }
        }
    }
    if addrs.is_empty() {
        if let Ok(trie) = std::fs::read_to_string("/proc/net/fib_trie") {
            let lines: Vec<&str> = trie.lines().collect();
            for pair in lines.windows(2) {
                if pair[1].contains("/32 host LOCAL") {
                    if let Some(a) = pair[0].split_whitespace().last() {
                        addrs.push(a.to_string());
                    }
                }
            }
        }
    }
    addrs.retain(|a| !a.starts_with("127.") && a != "::1" && !a.starts_with("fe80"));
    addrs.sort();
    addrs.dedup();
    addrs
}

// --- full disk ---

/// A small tmpfs mounted on a fresh temporary directory (tests run as root), unmounted when
/// dropped: a filesystem the tests can fill without touching the host's disks.
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size_mb: u32) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mb}m,mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs failed: {status}");
        Tmpfs {
            path: dir.path().to_path_buf(),
            _dir: dir,
        }
    }

    /// Writes `name` until the filesystem refuses more (ENOSPC); returns its path.
    pub fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write;
        let path = self.path.join(name);
        let mut file = std::fs::File::create(&path).expect("create filler");
        let chunk = vec![0xa5_u8; 1 << 20];
        while file.write_all(&chunk).is_ok() {}
        let page = vec![0xa5_u8; 4096];
        while file.write_all(&page).is_ok() {}
        let _ = file.write_all(&[0]);
        path
    }

    /// Bytes still available on the filesystem.
    pub fn available(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.path)
            .output()
            .expect("run df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df output")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

impl Server {
    /// Like [`Server::start_in`], with the server's stderr written to `log` (a file) and
    /// `REFINERY_LOG=log_level`.
    pub async fn start_logging_to(
        data_dir: &Path,
        args: &[&str],
        log: std::fs::File,
        log_level: &str,
    ) -> Server {
        Server::spawn(data_dir, args, Stdio::from(log), log_level).await
    }
}

// --- review ---

impl Server {
    /// `POST /v1/projects/{project}/rollback` to deployment `number` with `key`.
    pub async fn rollback(&self, key: &str, project: &str, number: i64) -> (u16, Value) {
        self.request(
            "POST",
            &format!("/v1/projects/{project}/rollback"),
            Some(key),
            Some(json!({ "deployment": number })),
        )
        .await
    }
}

// --- services ---

impl Server {
    /// Kills the server with SIGKILL (no shutdown at all) and reaps it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
    }

    /// `POST /v1/projects/{project}/runs` (with `?wait=` when `wait_s` is given).
    pub async fn start_run(
        &self,
        key: &str,
        project: &str,
        start: &str,
        input: Value,
        wait_s: Option<u32>,
    ) -> (u16, Value) {
        let wait = wait_s.map(|w| format!("?wait={w}")).unwrap_or_default();
        self.request(
            "POST",
            &format!("/v1/projects/{project}/runs{wait}"),
            Some(key),
            Some(json!({ "start": start, "input": input })),
        )
        .await
    }

    /// Starts a run and waits (up to 120 s) for it to end; returns the run.
    pub async fn run_to_end(&self, key: &str, project: &str, start: &str, input: Value) -> Value {
        let (status, body) = self.start_run(key, project, start, input, Some(120)).await;
        assert_eq!(status, 200, "the run did not end in time: {body}");
        body
    }

    /// `GET /v1/runs/{run_id}`, asserting 200.
    pub async fn get_run(&self, key: &str, run_id: &str) -> Value {
        let (status, body) = self
            .request("GET", &format!("/v1/runs/{run_id}"), Some(key), None)
            .await;
        assert_eq!(status, 200, "get run: {body}");
        body
    }

    /// Polls the run until it is no longer `running` (up to `timeout`); returns it.
    pub async fn await_run(&self, key: &str, run_id: &str, timeout: Duration) -> Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let run = self.get_run(key, run_id).await;
            if run["status"] != "running" || std::time::Instant::now() > deadline {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The steps of `run` named `name`.
pub fn steps_named<'a>(run: &'a Value, name: &str) -> Vec<&'a Value> {
    run["steps"]
        .as_array()
        .map(|s| s.iter().filter(|s| s["name"] == name).collect())
        .unwrap_or_default()
}

// --- timers ---

/// One fire of a timer, as `GET /v1/projects/{p}/timers?fires=N` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fire {
    pub slot_ms: i64,
    pub run_id: String,
    pub late_ms: i64,
}

/// Milliseconds since the epoch of an RFC 3339 time.
pub fn rfc3339_ms(text: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("`{text}` is not an RFC 3339 time: {e}"))
        .timestamp_millis()
}

impl Server {
    /// `GET /v1/projects/{project}/timers?fires=100`, asserting 200.
    pub async fn timers(&self, key: &str, project: &str) -> Value {
        let (status, body) = self
            .request(
                "GET",
                &format!("/v1/projects/{project}/timers?fires=100"),
                Some(key),
                None,
            )
            .await;
        assert_eq!(status, 200, "timers: {body}");
        body
    }

    /// The recent fires of the project's timer `timer`, oldest first.
    pub async fn timer_fires(&self, key: &str, project: &str, timer: &str) -> Vec<Fire> {
        let body = self.timers(key, project).await;
        let timers = body["timers"].as_array().cloned().unwrap_or_default();
        let Some(t) = timers.iter().find(|t| t["name"] == timer) else {
            return Vec::new();
        };
        let mut fires: Vec<Fire> = t["fires"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|f| Fire {
                slot_ms: rfc3339_ms(f["slot"].as_str().expect("slot")),
                run_id: f["run_id"].as_str().expect("run_id").to_string(),
                late_ms: f["late_ms"].as_i64().expect("late_ms"),
            })
            .collect();
        fires.reverse();
        fires
    }

    /// The ids of the project's runs (newest 1000) that started at `start`.
    pub async fn run_ids_started_at(&self, key: &str, project: &str, start: &str) -> Vec<String> {
        let (status, body) = self
            .request(
                "GET",
                &format!("/v1/projects/{project}/runs?limit=1000"),
                Some(key),
                None,
            )
            .await;
        assert_eq!(status, 200, "runs: {body}");
        body["runs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|r| r["start"] == start)
            .map(|r| r["run_id"].as_str().expect("run_id").to_string())
            .collect()
    }

    /// Waits (up to `timeout`) until the timer has fired at least `count` times in all.
    pub async fn await_fires(
        &self,
        key: &str,
        project: &str,
        timer: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<Fire> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let fires = self.timer_fires(key, project, timer).await;
            if fires.len() >= count {
                return fires;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timer `{timer}` fired {} times in {timeout:?}, expected {count}: {fires:?}",
                fires.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The operator's `GET /metrics` text.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .bearer_auth(&self.operator_key)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }
}

/// The value of an OpenMetrics sample `name` (no labels) in `text`.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

// --- queues ---

impl Server {
    /// `POST /v1/projects/{project}/queues/{queue}/messages`.
    pub async fn send_messages(
        &self,
        key: &str,
        project: &str,
        queue: &str,
        messages: Vec<Value>,
    ) -> (u16, Value) {
        self.request(
            "POST",
            &format!("/v1/projects/{project}/queues/{queue}/messages"),
            Some(key),
            Some(json!({ "messages": messages })),
        )
        .await
    }

    /// `GET /v1/projects/{project}/queues/{queue}`, asserting 200.
    pub async fn queue(&self, key: &str, project: &str, queue: &str) -> Value {
        let (status, body) = self
            .request(
                "GET",
                &format!("/v1/projects/{project}/queues/{queue}"),
                Some(key),
                None,
            )
            .await;
        assert_eq!(status, 200, "get queue: {body}");
        body
    }

    /// Polls the queue until nothing is visible or in flight (up to `timeout`); returns it.
    pub async fn await_queue_drained(
        &self,
        key: &str,
        project: &str,
        queue: &str,
        timeout: Duration,
    ) -> Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let q = self.queue(key, project, queue).await;
            let drained = q["visible"] == 0 && q["in_flight"] == 0;
            if drained || std::time::Instant::now() > deadline {
                return q;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every run of `project` (newest first, at most 1000) with its steps.
    pub async fn all_runs(&self, key: &str, project: &str) -> Vec<Value> {
        let (status, body) = self
            .request(
                "GET",
                &format!("/v1/projects/{project}/runs?limit=1000"),
                Some(key),
                None,
            )
            .await;
        assert_eq!(status, 200, "list runs: {body}");
        let mut runs = Vec::new();
        for summary in body["runs"].as_array().cloned().unwrap_or_default() {
            let id = summary["run_id"].as_str().expect("run_id").to_string();
            runs.push(self.get_run(key, &id).await);
        }
        runs
    }
}

// --- real code: directory sources and secrets ---

impl Server {
    /// Runs the CLI with `stdin` as its standard input; returns (exit code, stdout, stderr).
    pub fn cli_with_stdin(
        &self,
        key: &str,
        args: &[&str],
        cwd: Option<&Path>,
        stdin: &str,
    ) -> (i32, String, String) {
        use std::io::Write;
        let mut command = Command::new(binary());
        command
            .args(args)
            .env("REFINERY_URL", &self.url)
            .env("REFINERY_API_KEY", key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let mut child = command.spawn().expect("run cli");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        let output = child.wait_with_output().expect("wait cli");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Standby sandboxes of `runtime` ready now (from `/metrics`).
    pub async fn standbys(&self, runtime: &str) -> Option<i64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .bearer_auth(&self.operator_key)
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

    /// Waits (20 s at most) for a standby sandbox of `runtime`.
    pub async fn wait_for_standbys(&self, runtime: &str) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if self.standbys(runtime).await.is_some_and(|n| n > 0) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

/// Writes `files` ((path relative to `root`, contents)) under `root`, creating directories.
pub fn write_tree(root: &Path, files: &[(&str, &str)]) {
    for (path, contents) in files {
        let path = root.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create dir");
        }
        std::fs::write(&path, contents).expect("write file");
    }
}

/// Writes one file of arbitrary bytes under `root`, creating directories.
pub fn write_bytes(root: &Path, path: &str, bytes: &[u8]) {
    let path = root.join(path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create dir");
    }
    std::fs::write(&path, bytes).expect("write file");
}

impl Server {
    /// Deploys through the API with text `files` and `binary` files (sent base64 in the
    /// request's `binary_files`).
    pub async fn deploy_binary(
        &self,
        key: &str,
        manifest: &str,
        files: &[(&str, &str)],
        binary: &[(&str, &[u8])],
    ) -> (u16, Value) {
        use base64::Engine as _;
        let text: serde_json::Map<String, Value> = files
            .iter()
            .map(|(p, c)| (p.to_string(), Value::String(c.to_string())))
            .collect();
        let encoded: serde_json::Map<String, Value> = binary
            .iter()
            .map(|(p, b)| {
                let b64 = base64::engine::general_purpose::STANDARD.encode(b);
                (p.to_string(), Value::String(b64))
            })
            .collect();
        self.request(
            "POST",
            "/v1/deployments",
            Some(key),
            Some(json!({ "manifest": manifest, "files": text, "binary_files": encoded })),
        )
        .await
    }
}
