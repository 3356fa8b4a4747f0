//! The baselines Refinery's cold start is compared with, measured in the same run: the same
//! no-op handler started by a bare interpreter process (a tiny runner script imports the
//! handler file and calls `main` once), and the same start under `bwrap` (Debian's
//! bubblewrap: fresh user/pid/net/ipc/uts/cgroup namespaces, a read-only bind of `/usr`, a
//! fresh `/proc`, `/dev` and `/tmp`) — the container-style start without an image.
//!
//! Each sample is one process start to exit, wall clock, measured from this process, with
//! an empty environment (only `PATH`) in both modes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::stats::{summary, Summary};

pub const PYTHON_HANDLER: &str = "def main(block_input, backpack):\n    return block_input\n";
pub const NODE_HANDLER: &str = "exports.main = (blockInput, backpack) => blockInput;\n";
pub const SHELL_HANDLER: &str = "input=$(cat)\nprintf '%s' \"$input\"\n";

const PYTHON_RUNNER: &str = r#"import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("handler", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(module.main(json.loads(sys.stdin.read() or "null"), {})))
"#;
const NODE_RUNNER: &str = r#"const handler = require(process.argv[2]);
Promise.resolve(handler.main(null, {})).then((r) => console.log(JSON.stringify(r)));
"#;

/// One language's command line inside the code directory (`dir` is where the files are:
/// the host path for a bare start, `/code` under bwrap).
fn command_line(language: &str, dir: &str) -> Vec<String> {
    match language {
        "python" => vec![
            "/usr/bin/python3".into(),
            "-I".into(),
            "-B".into(),
            format!("{dir}/runner.py"),
            format!("{dir}/handler.py"),
        ],
        "node" => vec![
            "/usr/bin/node".into(),
            format!("{dir}/runner.js"),
            format!("{dir}/handler.js"),
        ],
        _ => vec!["/bin/sh".into(), format!("{dir}/handler.sh")],
    }
}

/// How the handler process is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bare,
    Bwrap,
}

/// Where bwrap is, or why it cannot be used.
pub fn bwrap() -> std::result::Result<PathBuf, String> {
    let path = PathBuf::from("/usr/bin/bwrap");
    match Command::new(&path).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(path),
        Ok(out) => Err(format!(
            "`bwrap --version` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!(
            "bwrap is not installed ({e}); `apt-get install bubblewrap` (scripts/bench does)"
        )),
    }
}

fn bwrap_args(code_dir: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/sbin",
        "/sbin",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--ro-bind",
        "/etc/ld.so.cache",
        "/etc/ld.so.cache",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--chdir",
        "/code",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--ro-bind".to_string(),
        code_dir.display().to_string(),
        "/code".to_string(),
        "--".to_string(),
    ]);
    args
}

/// Starts the handler once; the wall time to its exit in ms.
fn run_once(language: &str, mode: Mode, code_dir: &Path, bwrap: Option<&Path>) -> Result<f64> {
    let mut command = match (mode, bwrap) {
        (Mode::Bare, _) => {
            let line = command_line(language, &code_dir.display().to_string());
            let mut c = Command::new(&line[0]);
            // A clean environment, as in a sandbox and under `bwrap --clearenv`: inherited
            // variables change start-up (NODE_EXTRA_CA_CERTS makes node parse a CA bundle).
            c.args(&line[1..]).env_clear().env("PATH", "/usr/bin:/bin");
            c
        }
        (Mode::Bwrap, Some(bwrap)) => {
            let mut c = Command::new(bwrap);
            c.args(bwrap_args(code_dir))
                .args(command_line(language, "/code"));
            c
        }
        (Mode::Bwrap, None) => bail!("bwrap is unavailable"),
    };
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the {language} baseline"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // The handler may exit without reading its input (python/node ignore it here).
        let _ = stdin.write_all(b"null");
    }
    let out = child.wait_with_output()?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() || out.stdout.is_empty() {
        bail!(
            "the {language} baseline ({mode:?}) failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(ms)
}

/// One row of the baseline table.
pub struct Baseline {
    pub language: &'static str,
    pub mode: Mode,
    /// The figures, or why there are none.
    pub result: std::result::Result<Summary, String>,
}

/// Measures every language bare and (if available) under bwrap, `samples` each,
/// interleaved so a change in machine load hits all rows alike.
pub fn measure(samples: usize, bwrap: Option<&Path>) -> Result<Vec<Baseline>> {
    let dir = tempfile::tempdir()?;
    for (name, text) in [
        ("handler.py", PYTHON_HANDLER),
        ("runner.py", PYTHON_RUNNER),
        ("handler.js", NODE_HANDLER),
        ("runner.js", NODE_RUNNER),
        ("handler.sh", SHELL_HANDLER),
    ] {
        std::fs::write(dir.path().join(name), text)?;
    }
    let rows: Vec<(&'static str, Mode)> = ["python", "node", "shell"]
        .into_iter()
        .flat_map(|l| [(l, Mode::Bare), (l, Mode::Bwrap)])
        .collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
    let mut errors: Vec<Option<String>> = rows
        .iter()
        .map(|(_, mode)| match (mode, bwrap) {
            (Mode::Bwrap, None) => Some("bwrap unavailable".to_string()),
            _ => None,
        })
        .collect();
    // One unmeasured round first: the page cache, not the start, would be measured.
    for round in 0..=samples {
        for (index, (language, mode)) in rows.iter().enumerate() {
            if errors[index].is_some() {
                continue;
            }
            match run_once(language, *mode, dir.path(), bwrap) {
                Ok(ms) if round > 0 => times[index].push(ms),
                Ok(_) => {}
                Err(e) => errors[index] = Some(format!("{e:#}")),
            }
        }
    }
    Ok(rows
        .into_iter()
        .zip(times.iter().zip(errors))
        .map(|((language, mode), (t, error))| Baseline {
            language,
            mode,
            result: match error {
                Some(e) => Err(e),
                None => Ok(summary(t)),
            },
        })
        .collect())
}
