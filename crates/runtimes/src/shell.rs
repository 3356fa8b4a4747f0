//! The shell runtime: runs inside the sandbox (via `run_builtin("shell", ..)`), checks the
//! script once, then runs `/bin/sh <script>` once per invocation.
//!
//! Per invocation: stdin is the input as JSON, `REFINERY_BACKPACK` holds the backpack as
//! JSON (and, for a step of a service run only, `REFINERY_RUN_ID`, `REFINERY_STEP_ID` and
//! `REFINERY_ATTEMPT` hold its [`RunContext`]), stdout is the output (JSON if it parses,
//! else the trimmed text as a JSON string; JSON nested deeper than `MAX_JSON_DEPTH` is an
//! `OutputTooDeep` error), stderr is the logs. A non-zero exit is an `ExitStatus` error.
//! The backpack comes back unchanged: a child process cannot hand an environment back.
//!
//! Nothing a script starts outlives its invocation: once the script's own process has exited,
//! every other process of the instance is SIGKILLed ([`kill_stragglers`]), so `cmd &` left
//! holding stdout cannot hang the invocation either.
//!
//! The loop takes its pipes as parameters so tests drive it in-process.

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use refinery_domain::execution::truncate_utf8;
use refinery_domain::json_depth::{json_depth, too_deep_message, OUTPUT_TOO_DEEP};
use refinery_domain::limits::{MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES};
use refinery_domain::UserError;
use serde_json::Value;

use crate::protocol::{
    self, FrameError, HostMessage, RunContext, ShimMessage, ATTEMPT_VAR, LOG_CAP_BYTES, RUN_ID_VAR,
    STEP_ID_VAR,
};

/// The interpreter scripts run under.
const SHELL: &str = "/bin/sh";

/// Lines of stderr quoted as the traceback of a failed script.
const TRACEBACK_LINES: usize = 20;

/// Why the serving loop stopped early (a clean EOF on the requests pipe is not an error).
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the script could not be loaded: {}: {}", .0.kind, .0.message)]
    InitFailed(UserError),
}

/// What an adopted standby is told (the sandbox's adoption frame): the instance's whole
/// environment and the runtime's arguments (the script's path).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Adoption {
    #[serde(rename = "type")]
    pub kind: String,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
}

/// Standby mode: says `{"type":"standby"}` on `responses`, then waits for the adoption frame
/// on `requests`. `Ok(None)` if the host closed the pipe first.
pub fn await_adoption(
    mut requests: impl Read,
    mut responses: impl Write,
) -> Result<Option<Adoption>, FrameError> {
    protocol::write_message(&mut responses, &serde_json::json!({"type": "standby"}))?;
    let Some(body) = protocol::read_frame(&mut requests)? else {
        return Ok(None);
    };
    let adoption: Adoption = protocol::decode(&body)?;
    if adoption.kind != "adopt" {
        return Err(FrameError::Malformed(format!(
            "expected an adopt frame, got {:?}",
            adoption.kind
        )));
    }
    Ok(Some(adoption))
}

/// Serves the protocol for `script` until the host closes `requests`. Sends `ready` (or
/// `init_error`, then returns `Err(InitFailed)`) first.
pub fn serve(
    mut requests: impl Read,
    mut responses: impl Write,
    script: &Path,
) -> Result<(), ShellError> {
    let started = Instant::now();
    if let Err(error) = check_script(script) {
        protocol::write_message(
            &mut responses,
            &ShimMessage::InitError {
                error: error.clone(),
            },
        )?;
        return Err(ShellError::InitFailed(error));
    }
    let init_ms = started.elapsed().as_secs_f64() * 1000.0;
    // The sandbox's init hands the builtin default signal dispositions: a script that exits
    // without reading its input must cost the feeder an EPIPE, not this process a SIGPIPE.
    // (std::process::Command restores SIGPIPE's default in the scripts it starts.)
    // SAFETY: setting a signal disposition to SIG_IGN has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    protocol::write_message(&mut responses, &ShimMessage::Ready { init_ms })?;

    while let Some(body) = protocol::read_frame(&mut requests)? {
        let HostMessage::Invoke {
            id,
            input,
            backpack,
            context,
        } = protocol::decode(&body)?;
        let reply = invoke(id, script, &input, backpack, context.as_deref());
        protocol::write_message(&mut responses, &reply)?;
    }
    Ok(())
}

/// The script must exist and `sh -n` must accept it.
fn check_script(script: &Path) -> Result<(), UserError> {
    if !script.is_file() {
        return Err(UserError::new(
            "HandlerNotFound",
            format!("script {} not found", script.display()),
        ));
    }
    let checked = Command::new(SHELL)
        .arg("-n")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| UserError::new("RuntimeError", format!("cannot run {SHELL}: {e}")))?;
    if checked.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&checked.stderr).trim().to_string();
    let message = if stderr.is_empty() {
        format!("{SHELL} -n rejected {}", script.display())
    } else {
        stderr.clone()
    };
    Err(UserError {
        kind: "SyntaxError".into(),
        message,
        traceback: (!stderr.is_empty()).then_some(stderr),
    })
}

/// Runs the script once and turns what it did into a reply frame.
fn invoke(
    id: u64,
    script: &Path,
    input: &Value,
    backpack: Cow<'_, Value>,
    context: Option<&RunContext>,
) -> ShimMessage {
    let backpack = backpack.into_owned();
    let error = |error: UserError, logs: String, logs_truncated: bool| ShimMessage::Error {
        id,
        error,
        logs,
        logs_truncated,
    };
    let run = match run_script(script, input, &backpack, context) {
        Ok(run) => run,
        Err(e) => {
            return error(
                UserError::new("RuntimeError", format!("cannot run the script: {e}")),
                String::new(),
                false,
            )
        }
    };
    let mut logs = String::from_utf8_lossy(&run.stderr.bytes).into_owned();
    let logs_truncated = truncate_utf8(&mut logs, LOG_CAP_BYTES) || run.stderr.truncated;

    if let Some(failure) = exit_failure(run.status) {
        let tail = last_lines(&logs, TRACEBACK_LINES);
        let error_value = UserError {
            kind: "ExitStatus".into(),
            message: failure,
            traceback: (!tail.is_empty()).then_some(tail),
        };
        return error(error_value, logs, logs_truncated);
    }
    if run.stdout.truncated {
        return error(
            UserError::new(
                "OutputTooLarge",
                format!("the script wrote more than {MAX_PAYLOAD_BYTES} bytes to stdout"),
            ),
            logs,
            logs_truncated,
        );
    }
    let output = match parse_output(&run.stdout.bytes) {
        Ok(output) => output,
        Err(error_value) => return error(error_value, logs, logs_truncated),
    };
    ShimMessage::Result {
        id,
        output,
        backpack,
        logs,
        logs_truncated,
    }
}

/// `None` for a zero exit, else the error message.
fn exit_failure(status: std::process::ExitStatus) -> Option<String> {
    if let Some(code) = status.code() {
        return (code != 0).then(|| format!("script exited with status {code}"));
    }
    let signal = status.signal().unwrap_or(0);
    Some(format!("script was killed by signal {signal}"))
}

/// JSON if stdout parses as JSON, else the trimmed text as a JSON string; JSON nested
/// deeper than [`MAX_JSON_DEPTH`] is an `OutputTooDeep` error (also past serde_json's own
/// recursion limit, where it stops parsing: text that deep is JSON, not prose).
fn parse_output(stdout: &[u8]) -> Result<Value, UserError> {
    let depth = json_depth(stdout);
    match serde_json::from_slice::<Value>(stdout) {
        Ok(_) if depth > MAX_JSON_DEPTH => {}
        Ok(value) => return Ok(value),
        Err(e) if depth > MAX_JSON_DEPTH && e.to_string().starts_with("recursion limit") => {}
        Err(_) => {
            return Ok(Value::String(
                String::from_utf8_lossy(stdout).trim().to_string(),
            ))
        }
    }
    Err(UserError::new(
        OUTPUT_TOO_DEEP,
        too_deep_message("the output (the script's stdout)", depth),
    ))
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

struct Captured {
    bytes: Vec<u8>,
    truncated: bool,
}

struct Run {
    status: std::process::ExitStatus,
    stdout: Captured,
    stderr: Captured,
}

fn run_script(
    script: &Path,
    input: &Value,
    backpack: &Value,
    context: Option<&RunContext>,
) -> io::Result<Run> {
    let input = serde_json::to_vec(input)?;
    let mut command = Command::new(SHELL);
    command
        .arg(script)
        .env("REFINERY_BACKPACK", serde_json::to_string(backpack)?);
    // Each script is a new process: the variables are in its environment only when this
    // invocation is a step (the runner never sets them on itself; removing them from the
    // child's environment otherwise costs no syscall).
    match context {
        Some(context) => {
            for (name, value) in context.vars() {
                command.env(name, value.as_ref());
            }
        }
        None => {
            for name in [RUN_ID_VAR, STEP_ID_VAR, ATTEMPT_VAR] {
                command.env_remove(name);
            }
        }
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        // Unreachable with all three piped; reap the child rather than leak it.
        let _ = child.kill();
        let _ = child.wait();
        return Err(io::Error::other("child pipes missing"));
    };
    // Separate threads: a script that ignores stdin, or fills stderr before reading
    // stdin, must not deadlock us.
    // Spawning a thread can fail (the instance is at its pids limit): then the script is
    // stopped and the invocation fails cleanly instead of the runner panicking.
    let threads = (|| {
        let feeder = thread::Builder::new().spawn(move || {
            // A script that exits without reading its input closes the pipe: not an error.
            let _ = stdin.write_all(&input);
        })?;
        let stderr_reader =
            thread::Builder::new().spawn(move || read_capped(stderr, LOG_CAP_BYTES))?;
        let stdout_reader =
            thread::Builder::new().spawn(move || read_capped(stdout, MAX_PAYLOAD_BYTES))?;
        Ok::<_, io::Error>((feeder, stderr_reader, stdout_reader))
    })();
    let (feeder, stderr_reader, stdout_reader) = match threads {
        Ok(threads) => threads,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            kill_stragglers();
            return Err(io::Error::other(format!(
                "cannot start a thread to read the script's output ({e}); the instance is at its process limit"
            )));
        }
    };
    // The script's end is the invocation's end: whatever it left running (and holding the
    // pipes open) is killed, which also brings the readers their EOF.
    let status = child.wait();
    kill_stragglers();
    let stdout = stdout_reader
        .join()
        .map_err(|_| io::Error::other("stdout reader panicked"))?;
    let stderr = stderr_reader
        .join()
        .map_err(|_| io::Error::other("stderr reader panicked"))?;
    let _ = feeder.join();
    Ok(Run {
        status: status?,
        stdout: stdout?,
        stderr: stderr?,
    })
}

/// How long [`kill_stragglers`] waits for its own killed children to become reapable.
const REAP_BUDGET: Duration = Duration::from_millis(50);

/// SIGKILL every process this one may signal — in the sandbox, every process of the instance
/// but this runner and pid 1 (the sandbox's reaper, which collects the orphans) — then reap
/// this runner's own killed children (bounded wait).
///
/// Only inside the sandbox, where the runner is pid 2 under the reaper (or pid 1): on a host,
/// pids 1 and 2 are init and kthreadd, so a runner outside a sandbox (the in-process tests)
/// never kills anything.
pub(crate) fn kill_stragglers() {
    if std::process::id() > 2 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; pid -1 = everything we may signal
    // except ourselves and the namespace's init.
    if unsafe { libc::kill(-1, libc::SIGKILL) } != 0 {
        return; // ESRCH: nothing else runs
    }
    let deadline = Instant::now() + REAP_BUDGET;
    loop {
        // SAFETY: waitpid with a null status pointer is allowed.
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if pid > 0 {
            continue;
        }
        if pid < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return; // ECHILD: none left
        }
        if Instant::now() >= deadline {
            return;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Reads to EOF, keeping at most `cap` bytes and draining the rest so the writer never
/// blocks on a full pipe.
fn read_capped(mut reader: impl Read, cap: usize) -> io::Result<Captured> {
    let mut bytes = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let room = cap.saturating_sub(bytes.len());
        if n > room {
            truncated = true;
        }
        bytes.extend_from_slice(&buf[..n.min(room)]);
    }
    Ok(Captured { bytes, truncated })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_json_or_trimmed_text() {
        assert_eq!(
            parse_output(b"{\"a\": 1}\n"),
            Ok(serde_json::json!({"a": 1}))
        );
        assert_eq!(
            parse_output(b"  hello world \n"),
            Ok(serde_json::json!("hello world"))
        );
        assert_eq!(parse_output(b""), Ok(serde_json::json!("")));
        // Bracket-rich prose that is not JSON stays text.
        let prose = format!("{} not json", "[".repeat(100));
        assert_eq!(parse_output(prose.as_bytes()), Ok(serde_json::json!(prose)));
    }

    #[test]
    fn output_deeper_than_the_limit_is_an_error() {
        use refinery_domain::json_depth::nested_array;
        let at_limit = nested_array(MAX_JSON_DEPTH);
        assert!(parse_output(at_limit.as_bytes()).is_ok());
        for depth in [MAX_JSON_DEPTH + 1, 127, 128, 200] {
            let error = parse_output(nested_array(depth).as_bytes()).expect_err("too deep");
            assert_eq!(error.kind, OUTPUT_TOO_DEEP, "{depth}");
            assert!(
                error.message.contains(&format!("nested {depth} levels")),
                "{error:?}"
            );
        }
    }

    #[test]
    fn keeps_the_last_lines() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("", 2), "");
    }

    #[test]
    fn caps_and_drains() -> io::Result<()> {
        let data = vec![b'x'; 1000];
        let captured = read_capped(data.as_slice(), 10)?;
        assert_eq!(captured.bytes.len(), 10);
        assert!(captured.truncated);
        Ok(())
    }
}
