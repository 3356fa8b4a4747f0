//! Nothing a block starts outlives its invocation: every runtime (Python, Node, the shell
//! builtin) SIGKILLs the instance's other processes after each invocation. That clean-up only
//! runs where the runtime is pid 2 of its own pid namespace (as in the sandbox), so these tests
//! run the runtimes that way: `unshare --pid --fork` with a `sh` as pid 1 standing in for the
//! sandbox's reaper. They need root (skipped otherwise).

mod common;

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{pipes, protocol_fds_in_child, TestResult};
use refinery_domain::Language;
use refinery_runtimes::{entry_in, install, InstanceChannel};
use serde_json::{json, Value};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A `sleep` argument no other process on the host has: `1000.<pid><n>`.
fn marker() -> String {
    format!(
        "1000.{}{:03}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Host pids of live (non-zombie) processes whose command line contains `needle`.
fn live_with(needle: &str) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// Wait up to 5 s for no process to carry `needle`.
fn all_gone(needle: &str) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = live_with(needle);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Zombies among the descendants of `pid`.
fn zombies_below(pid: i32) -> usize {
    let mut stack = vec![pid];
    let mut zombies = 0;
    while let Some(p) = stack.pop() {
        let children =
            fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for c in children
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok())
        {
            let stat = fs::read_to_string(format!("/proc/{c}/stat")).unwrap_or_default();
            if stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
            {
                zombies += 1;
            }
            stack.push(c);
        }
    }
    zombies
}

/// `argv` run as pid 2 of a new pid namespace (pid 1: a `sh` that waits), protocol pipes on
/// fds 3 and 4.
struct InPidNs {
    channel: InstanceChannel,
    child: Child,
}

impl Drop for InPidNs {
    fn drop(&mut self) {
        // --kill-child: unshare's death SIGKILLs the namespace's pid 1, and with it everything.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_in_pid_ns(
    argv: &[String],
    env: &[(&str, &str)],
) -> Result<InPidNs, Box<dyn std::error::Error>> {
    let ((req_w, req_r), (resp_w, resp_r)) = pipes()?;
    let (child_in, child_out) = (req_r.as_raw_fd(), resp_w.as_raw_fd());
    let mut command = Command::new("unshare");
    command
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            "--",
            "/bin/sh",
            "-c",
            "\"$@\" & wait $!",
            "sh",
        ])
        .args(argv)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    protocol_fds_in_child(&mut command, child_in, child_out);
    let child = command.spawn()?;
    drop((req_r, resp_w));
    Ok(InPidNs {
        channel: InstanceChannel::new(req_w, resp_r)?,
        child,
    })
}

/// Keeps the runtime and code dirs alive while the shim runs.
struct Installed {
    _runtime: tempfile::TempDir,
    _code: tempfile::TempDir,
}

fn shim_argv(
    language: Language,
    source: &str,
    code: &str,
) -> Result<(Vec<String>, Installed), Box<dyn std::error::Error>> {
    let runtime = tempfile::tempdir()?;
    install(runtime.path())?;
    let code_dir = tempfile::tempdir()?;
    for (name, bytes) in refinery_runtimes::code_files(language, source, code) {
        fs::write(code_dir.path().join(name), bytes)?;
    }
    let Some(argv) = entry_in(
        language,
        source,
        runtime.path().to_str().ok_or("non-UTF-8 tempdir")?,
        code_dir.path().to_str().ok_or("non-UTF-8 tempdir")?,
    )
    .exec_argv()
    .map(<[String]>::to_vec) else {
        return Err("not an exec entry".into());
    };
    Ok((
        argv,
        Installed {
            _runtime: runtime,
            _code: code_dir,
        },
    ))
}

async fn invoke(p: &mut InPidNs, input: Value) -> Result<Value, Box<dyn std::error::Error>> {
    let reply = p.channel.invoke(&input, &json!({})).await?;
    Ok(reply
        .outcome
        .map_err(|e| format!("{e:?} logs: {}", reply.logs))?
        .output)
}

/// Starts a block, invokes it `rounds` times; each invocation leaves a direct child and a
/// double-forked daemon running (the block itself reports them alive); after each, both are
/// gone, and zombies never pile up.
async fn check_runtime(mut p: InPidNs, rounds: usize) -> TestResult {
    p.channel.ready().await?;
    for round in 0..rounds {
        let m = marker();
        let out = invoke(&mut p, json!({ "marker": m })).await?;
        assert_eq!(
            out,
            json!(2),
            "round {round}: the block saw its two sleepers alive"
        );
        let left = all_gone(&m);
        assert!(
            left.is_empty(),
            "round {round}: {left:?} outlived the invocation"
        );
        let zombies = zombies_below(p.child.id() as i32);
        assert!(zombies <= 2, "round {round}: {zombies} zombies");
    }
    Ok(())
}

#[tokio::test]
async fn python_kills_what_an_invocation_left_behind() -> TestResult {
    if !is_root() {
        eprintln!("skipped: needs root for a pid namespace");
        return Ok(());
    }
    let code = "\
import os, subprocess, time
def alive(m):
    n = 0
    for p in os.listdir('/proc'):
        try:
            with open(f'/proc/{p}/cmdline', 'rb') as f:
                n += m.encode() in f.read()
        except OSError:
            pass
    return n
def main(block_input, backpack):
    m = block_input['marker']
    subprocess.Popen(['sleep', m])
    os.system(f'(sleep {m} &)')
    time.sleep(0.05)
    return alive(m)
";
    let (argv, _dirs) = shim_argv(Language::Python, "main.py", code)?;
    check_runtime(start_in_pid_ns(&argv, &[])?, 30).await
}

#[tokio::test]
async fn node_kills_what_an_invocation_left_behind() -> TestResult {
    if !is_root() {
        eprintln!("skipped: needs root for a pid namespace");
        return Ok(());
    }
    let code = "\
const fs = require('node:fs');
const { spawn, execSync } = require('node:child_process');
function alive(m) {
  let n = 0;
  for (const p of fs.readdirSync('/proc')) {
    try { if (fs.readFileSync(`/proc/${p}/cmdline`).includes(m)) n += 1; } catch {}
  }
  return n;
}
exports.main = async (input) => {
  const m = input.marker;
  spawn('sleep', [m], { stdio: 'ignore' });
  execSync(`(sleep ${m} &)`, { stdio: 'ignore' });
  await new Promise((r) => setTimeout(r, 50));
  return alive(m);
};
";
    let (argv, _dirs) = shim_argv(Language::Node, "main.js", code)?;
    check_runtime(start_in_pid_ns(&argv, &[])?, 30).await
}

/// Not a test on its own: the shell builtin serving fds 3/4, run by
/// `shell_kills_what_an_invocation_left_behind` as pid 2 of a pid namespace.
#[test]
#[ignore = "helper process started by shell_kills_what_an_invocation_left_behind"]
fn helper_shell_runtime() {
    let Ok(script) = std::env::var("REFINERY_STRAGGLERS_SCRIPT") else {
        return;
    };
    // SAFETY: fds 3 and 4 are the protocol pipes start_in_pid_ns set up; nothing else owns them.
    let (requests, responses) = unsafe { (fs::File::from_raw_fd(3), fs::File::from_raw_fd(4)) };
    let result = refinery_runtimes::shell::serve(requests, responses, Path::new(&script));
    std::process::exit(i32::from(result.is_err()));
}

#[tokio::test]
async fn shell_kills_what_an_invocation_left_behind() -> TestResult {
    if !is_root() {
        eprintln!("skipped: needs root for a pid namespace");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("block.sh");
    // The background sleeper keeps the script's stdout open: without the clean-up the
    // invocation would never see EOF.
    fs::write(
        &script,
        "m=$(sed 's/.*\"marker\":\"\\([^\"]*\\)\".*/\\1/')\n\
         sleep $m &\n\
         (sleep $m &)\n\
         sleep 0.05\n\
         grep -l \"$m\" /proc/[0-9]*/cmdline 2>/dev/null | wc -l\n",
    )?;
    let exe = std::env::current_exe()?;
    let argv: Vec<String> = vec![
        exe.to_str().ok_or("non-UTF-8 exe")?.to_string(),
        "helper_shell_runtime".into(),
        "--exact".into(),
        "--ignored".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ];
    let script = script.to_str().ok_or("non-UTF-8 tempdir")?.to_string();
    let p = start_in_pid_ns(&argv, &[("REFINERY_STRAGGLERS_SCRIPT", &script)])?;
    check_shell(p).await
}

async fn check_shell(mut p: InPidNs) -> TestResult {
    p.channel.ready().await?;
    for round in 0..30 {
        let m = marker();
        let out = invoke(&mut p, json!({ "marker": m })).await?;
        let seen = out.as_u64().ok_or(format!("output {out}"))?;
        assert!(seen >= 2, "round {round}: the script saw {seen} sleepers");
        let left = all_gone(&format!("sleep\0{m}"));
        assert!(
            left.is_empty(),
            "round {round}: {left:?} outlived the invocation"
        );
        assert!(
            zombies_below(p.child.id() as i32) <= 2,
            "round {round}: zombies"
        );
    }
    Ok(())
}
