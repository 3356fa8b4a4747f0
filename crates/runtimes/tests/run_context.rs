//! A step of a service run is told which run, step and attempt it is: every shim puts the
//! [`RunContext`] in the handler's environment (`REFINERY_RUN_ID`, `REFINERY_STEP_ID`,
//! `REFINERY_ATTEMPT`, inherited by its subprocesses) for that invocation only, so the next
//! invocation of the same warm instance without a context (a plain invoke) sees none of them.

mod common;

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use common::{pipes, protocol_fds_in_child, start, Running, TestResult};
use refinery_domain::Language;
use refinery_runtimes::{install, InstanceChannel, RunContext};
use refinery_runtimes::{protocol, shell};
use serde_json::{json, Value};

/// What a subprocess of the handler sees: `run|step|attempt`, `-` for an unset variable.
const SUB: &str = r#"echo "${REFINERY_RUN_ID--}|${REFINERY_STEP_ID--}|${REFINERY_ATTEMPT--}""#;

/// Each handler returns `{"vars": [run, step, attempt] (null when unset), "sub": SUB's line,
/// "greeting": $GREETING or null, "pid": the serving process}`.
fn python_handler() -> String {
    format!(
        r#"import os, subprocess
NAMES = ("REFINERY_RUN_ID", "REFINERY_STEP_ID", "REFINERY_ATTEMPT")
SUB = {SUB:?}

def main(block_input, backpack):
    sub = subprocess.run(["/bin/sh", "-c", SUB], capture_output=True, text=True).stdout
    return {{
        "vars": [os.environ.get(n) for n in NAMES],
        "sub": sub.strip(),
        "greeting": os.environ.get("GREETING"),
        "pid": os.getpid(),
    }}
"#
    )
}

fn node_handler() -> String {
    format!(
        r#"const {{ execFileSync }} = require('node:child_process');
const NAMES = ['REFINERY_RUN_ID', 'REFINERY_STEP_ID', 'REFINERY_ATTEMPT'];
exports.main = () => ({{
  vars: NAMES.map((n) => process.env[n] ?? null),
  sub: execFileSync('/bin/sh', ['-c', {SUB:?}], {{ encoding: 'utf8' }}).trim(),
  greeting: process.env.GREETING ?? null,
  pid: process.pid,
}});
"#
    )
}

/// The shell runner starts a new script process per invocation; `pid` is the runner's.
fn shell_handler() -> String {
    format!(
        r#"v() {{ if [ "$1" = set ]; then printf '"%s"' "$2"; else printf null; fi; }}
run=$(v "${{REFINERY_RUN_ID+set}}" "${{REFINERY_RUN_ID-}}")
step=$(v "${{REFINERY_STEP_ID+set}}" "${{REFINERY_STEP_ID-}}")
attempt=$(v "${{REFINERY_ATTEMPT+set}}" "${{REFINERY_ATTEMPT-}}")
greeting=$(v "${{GREETING+set}}" "${{GREETING-}}")
sub=$(/bin/sh -c '{SUB}')
echo "{{\"vars\": [$run, $step, $attempt], \"sub\": \"$sub\", \"greeting\": $greeting, \"pid\": $PPID}}"
"#
    )
}

fn context(run_id: &str, step_id: &str, attempt: u32) -> RunContext {
    RunContext {
        run_id: run_id.into(),
        step_id: step_id.into(),
        attempt,
    }
}

/// What the handler should report for `context`.
fn expected(context: Option<&RunContext>, greeting: Option<&str>) -> Value {
    match context {
        Some(c) => json!({
            "vars": [c.run_id, c.step_id, c.attempt.to_string()],
            "sub": format!("{}|{}|{}", c.run_id, c.step_id, c.attempt),
            "greeting": greeting,
        }),
        None => json!({"vars": [null, null, null], "sub": "-|-|-", "greeting": greeting}),
    }
}

/// Steps and plain invokes, alternating, on one warm instance: each sees exactly its own
/// context, or none.
async fn check(channel: &mut InstanceChannel, label: &str, greeting: Option<&str>) -> TestResult {
    let first = context("run_01JA2B3C", "step-fetch/1", 1);
    let retry = context("run_01JA2B3D", "step-store/7", 3);
    let mut pid = None;
    for (n, step) in [Some(&first), None, Some(&retry), None, None]
        .into_iter()
        .enumerate()
    {
        let reply = channel.invoke_in(&json!(n), &json!({}), step).await?;
        let mut output = reply
            .outcome
            .map_err(|e| format!("{label} invocation {n}: {e:?} (logs: {})", reply.logs))?
            .output;
        let served_by = output
            .as_object_mut()
            .and_then(|o| o.remove("pid"))
            .ok_or_else(|| format!("{label} invocation {n}: no pid in {output}"))?;
        assert_eq!(
            output,
            expected(step, greeting),
            "{label} invocation {n} (context {step:?})"
        );
        // One instance served them all (warm reuse, not a new process per invocation).
        assert_eq!(
            *pid.get_or_insert(served_by.clone()),
            served_by,
            "{label} invocation {n}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn python_handlers_see_the_context_of_their_invocation_only() -> TestResult {
    let mut p: Running = start(Language::Python, "main.py", &python_handler(), &[])?;
    check(&mut p.channel, "python", None).await
}

#[tokio::test]
async fn node_handlers_see_the_context_of_their_invocation_only() -> TestResult {
    let mut p = start(Language::Node, "main.js", &node_handler(), &[])?;
    check(&mut p.channel, "node", None).await
}

#[tokio::test]
async fn shell_scripts_see_the_context_of_their_invocation_only() -> TestResult {
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("block.sh");
    fs::write(&script, shell_handler())?;
    let ((req_w, req_r), (resp_w, resp_r)) = pipes()?;
    let server =
        std::thread::spawn(move || shell::serve(File::from(req_r), File::from(resp_w), &script));
    let mut channel = InstanceChannel::new(req_w, resp_r)?;
    // The runner is this test process: its environment has no GREETING.
    check(&mut channel, "shell", None).await?;
    drop(channel);
    server.join().map_err(|_| "runner panicked")??;
    Ok(())
}

/// What the Python zygote does (`sandbox/src/zygote_python.py`): import the shim as a
/// module ahead of time, fork, replace the environment with the block's in the child and
/// call the shim's `main()` there. Run here without the sandbox around it.
const ZYGOTE: &str = r#"
import importlib.util, os, sys

shim_path, source = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("refinery_shim", shim_path)
shim = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shim)
pid = os.fork()
if pid == 0:
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "GREETING": "hi"})
    sys.argv = [shim.__file__, source]
    os._exit(shim.main())
os.close(3)
os.close(4)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"#;

#[tokio::test]
async fn python_forked_from_a_zygote_sees_the_context_and_keeps_the_blocks_variables() -> TestResult
{
    let runtime = tempfile::tempdir()?;
    install(runtime.path())?;
    let code = tempfile::tempdir()?;
    let source = code.path().join("main.py");
    fs::write(&source, python_handler())?;
    let ((req_w, req_r), (resp_w, resp_r)) = pipes()?;
    let mut command = Command::new("/usr/bin/python3");
    command
        .args(["-I", "-B", "-c", ZYGOTE])
        .arg(runtime.path().join("python_shim.py"))
        .arg(&source)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null());
    protocol_fds_in_child(&mut command, req_r.as_raw_fd(), resp_w.as_raw_fd());
    let mut zygote = command.spawn()?;
    drop((req_r, resp_w));
    let mut channel = InstanceChannel::new(req_w, resp_r)?;
    let checked = check(&mut channel, "python (zygote fork)", Some("hi")).await;
    // Closing the pipe ends the forked shim, and with it the zygote stand-in.
    drop(channel);
    let status = zygote.wait()?;
    checked?;
    assert!(status.success(), "{status}");
    Ok(())
}

/// Python and Node instances mostly start as adopted standbys: started with the shim and no
/// code, then told their environment and source by one adoption frame.
#[tokio::test]
async fn adopted_standbys_see_the_context_and_keep_the_blocks_variables() -> TestResult {
    for (language, name, code) in [
        (Language::Python, "main.py", python_handler()),
        (Language::Node, "main.js", node_handler()),
    ] {
        let runtime = tempfile::tempdir()?;
        install(runtime.path())?;
        let code_dir = tempfile::tempdir()?;
        let source = code_dir.path().join(name);
        fs::write(&source, code)?;
        let shim = |file: &str| runtime.path().join(file).display().to_string();
        let argv: Vec<String> = match language {
            Language::Python => vec![
                "/usr/bin/python3".into(),
                "-I".into(),
                "-B".into(),
                shim("python_shim.py"),
            ],
            _ => vec!["/usr/bin/node".into(), shim("node_shim.cjs")],
        };
        let ((req_w, req_r), (resp_w, resp_r)) = pipes()?;
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .arg("--standby")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null());
        protocol_fds_in_child(&mut command, req_r.as_raw_fd(), resp_w.as_raw_fd());
        let mut child = command.spawn()?;
        drop((req_r, resp_w));

        let (mut requests, mut responses) = (File::from(req_w), File::from(resp_r));
        let waiting = protocol::read_frame(&mut responses)?.ok_or("standby closed its pipe")?;
        assert_eq!(
            serde_json::from_slice::<Value>(&waiting)?,
            json!({"type": "standby"})
        );
        protocol::write_message(
            &mut requests,
            &json!({
                "type": "adopt",
                "env": [["PATH", "/usr/bin:/bin"], ["GREETING", "hi"]],
                "args": [source.display().to_string()],
            }),
        )?;
        let mut channel = InstanceChannel::new(requests.into(), responses.into())?;
        let checked = check(&mut channel, &format!("{language:?} (standby)"), Some("hi")).await;
        drop(channel);
        let _ = child.kill();
        child.wait()?;
        checked?;
    }
    Ok(())
}

#[tokio::test]
async fn a_context_no_environment_can_hold_is_a_clear_error_of_that_invocation() -> TestResult {
    let mut p = start(Language::Python, "main.py", &python_handler(), &[])?;
    let bad = context("run_1\0x", "step", 1);
    let reply = p
        .channel
        .invoke_in(&json!(0), &json!({}), Some(&bad))
        .await?;
    let error = reply.outcome.expect_err("a NUL byte is refused");
    assert_eq!(error.kind, "InvalidRunContext");
    assert!(
        error.message.contains("run_id") && error.message.contains("REFINERY_RUN_ID"),
        "{error:?}"
    );
    // Nothing reached the shim: the instance serves the next invocation as usual.
    let reply = p.channel.invoke_in(&json!(1), &json!({}), None).await?;
    let mut output = reply.outcome.map_err(|e| format!("{e:?}"))?.output;
    output.as_object_mut().and_then(|o| o.remove("pid"));
    assert_eq!(output, expected(None, None));
    Ok(())
}
