//! The shell runtime, served in-process on pipes (the sandbox would run it via
//! `run_builtin("shell", ..)` on fds 3 and 4).

mod common;

use std::fs::{self, File};
use std::thread::JoinHandle;

use common::{pipes, TestResult};
use refinery_runtimes::shell::{self, ShellError};
use refinery_runtimes::{ChannelError, InstanceChannel};
use serde_json::json;
use tempfile::TempDir;

struct Served {
    channel: InstanceChannel,
    server: JoinHandle<Result<(), ShellError>>,
    _dir: TempDir,
}

fn serve(script: Option<&str>) -> Result<Served, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("block.sh");
    if let Some(script) = script {
        fs::write(&path, script)?;
    }
    let ((req_w, req_r), (resp_w, resp_r)) = pipes()?;
    let server =
        std::thread::spawn(move || shell::serve(File::from(req_r), File::from(resp_w), &path));
    Ok(Served {
        channel: InstanceChannel::new(req_w, resp_r)?,
        server,
        _dir: dir,
    })
}

#[tokio::test]
async fn json_output_and_unchanged_backpack() -> TestResult {
    let mut s = serve(Some(
        "input=$(cat)\necho \"{\\\"input\\\": $input, \\\"backpack\\\": $REFINERY_BACKPACK}\"\n",
    ))?;
    assert!(s.channel.ready().await?.init_ms >= 0.0);
    for n in 0..2 {
        let reply = s
            .channel
            .invoke(&json!({"n": n}), &json!({"k": "v"}))
            .await?;
        let out = reply.outcome.map_err(|e| format!("{e:?}"))?;
        assert_eq!(
            out.output,
            json!({"input": {"n": n}, "backpack": {"k": "v"}})
        );
        assert_eq!(out.backpack, json!({"k": "v"}));
    }
    // Closing the host side ends the loop cleanly.
    drop(s.channel);
    s.server.join().map_err(|_| "server panicked")??;
    Ok(())
}

#[tokio::test]
async fn text_output_is_a_trimmed_string_and_stderr_is_logs() -> TestResult {
    let mut s = serve(Some(
        "echo 'working...' >&2\necho '  hello world  '\necho 'done' >&2\n",
    ))?;
    let reply = s.channel.invoke(&json!(null), &json!({})).await?;
    assert_eq!(reply.logs, "working...\ndone\n");
    assert_eq!(
        reply.outcome.map_err(|e| format!("{e:?}"))?.output,
        json!("hello world")
    );
    Ok(())
}

#[tokio::test]
async fn non_zero_exit_is_an_exit_status_error() -> TestResult {
    let mut s = serve(Some("echo partial\necho 'something broke' >&2\nexit 3\n"))?;
    let reply = s.channel.invoke(&json!(null), &json!({})).await?;
    let err = reply.outcome.err().ok_or("expected an error")?;
    assert_eq!(err.kind, "ExitStatus");
    assert_eq!(err.message, "script exited with status 3");
    assert_eq!(err.traceback.as_deref(), Some("something broke"));
    assert_eq!(reply.logs, "something broke\n");
    Ok(())
}

#[tokio::test]
async fn a_script_ignoring_a_large_input_does_not_hang() -> TestResult {
    let mut s = serve(Some("echo ok\n"))?;
    let big = json!("y".repeat(2 * 1024 * 1024));
    let reply = s.channel.invoke(&big, &json!({})).await?;
    assert_eq!(
        reply.outcome.map_err(|e| format!("{e:?}"))?.output,
        json!("ok")
    );
    Ok(())
}

#[tokio::test]
async fn syntax_error_is_init_failed() -> TestResult {
    let mut s = serve(Some("if true; then\n  echo x\n"))?;
    match s.channel.ready().await {
        Err(ChannelError::InitFailed(err)) => {
            assert_eq!(err.kind, "SyntaxError");
            assert!(err.message.contains("block.sh"), "{}", err.message);
        }
        other => return Err(format!("expected InitFailed, got {other:?}").into()),
    }
    assert!(matches!(
        s.server.join().map_err(|_| "server panicked")?,
        Err(ShellError::InitFailed(_))
    ));
    Ok(())
}

#[tokio::test]
async fn missing_script_is_init_failed() -> TestResult {
    let mut s = serve(None)?;
    match s.channel.ready().await {
        Err(ChannelError::InitFailed(err)) => assert_eq!(err.kind, "HandlerNotFound"),
        other => return Err(format!("expected InitFailed, got {other:?}").into()),
    }
    Ok(())
}

#[test]
fn oversized_request_frame_stops_the_runtime() -> TestResult {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("block.sh");
    fs::write(&path, "echo 1\n")?;
    let ((req_w, req_r), (resp_w, resp_r)) = pipes()?;
    let server =
        std::thread::spawn(move || shell::serve(File::from(req_r), File::from(resp_w), &path));
    let mut requests = File::from(req_w);
    let header = u32::try_from(refinery_runtimes::protocol::MAX_FRAME_BYTES + 1)?.to_be_bytes();
    requests.write_all(&header)?;
    let result = server.join().map_err(|_| "server panicked")?;
    assert!(
        matches!(
            result,
            Err(ShellError::Frame(
                refinery_runtimes::protocol::FrameError::TooLarge(_)
            ))
        ),
        "{result:?}"
    );
    // It had sent `ready` and nothing else.
    let mut responses = Vec::new();
    File::from(resp_r).read_to_end(&mut responses)?;
    assert!(String::from_utf8_lossy(&responses).contains("\"ready\""));
    Ok(())
}

/// Standby mode: the runtime says it is waiting, then takes the sandbox's adoption frame
/// (the environment and the script); a host that closes the pipe first ends it cleanly.
#[test]
fn a_standby_says_it_waits_then_takes_its_adoption() -> TestResult {
    use std::io::{Read, Write};
    let ((req_w, req_r), (resp_w, resp_r)) = pipes()?;
    let waiter =
        std::thread::spawn(move || shell::await_adoption(File::from(req_r), File::from(resp_w)));
    let mut responses = File::from(resp_r);
    let mut header = [0u8; 4];
    responses.read_exact(&mut header)?;
    let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
    responses.read_exact(&mut body)?;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body)?,
        json!({"type": "standby"})
    );
    let frame = serde_json::to_vec(&json!({
        "type": "adopt", "env": [["GREETING", "hi"]], "args": ["/code/x.sh"]
    }))?;
    let mut requests = File::from(req_w);
    requests.write_all(&(frame.len() as u32).to_be_bytes())?;
    requests.write_all(&frame)?;
    let adoption = waiter
        .join()
        .map_err(|_| "panicked")??
        .ok_or("no adoption")?;
    assert_eq!(adoption.env, [("GREETING".to_string(), "hi".to_string())]);
    assert_eq!(adoption.args, ["/code/x.sh"]);

    let ((req_w, req_r), (resp_w, _resp_r)) = pipes()?;
    drop(req_w);
    let closed = shell::await_adoption(File::from(req_r), File::from(resp_w))?;
    assert!(closed.is_none(), "a closed pipe is no adoption");
    Ok(())
}
