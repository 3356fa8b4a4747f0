//! Refinery's language runtimes.
//!
//! This crate owns the *inside* of an instance and the protocol to it:
//!
//! - the shims — `python_shim.py`, `node_shim.cjs` ([`install`]ed under `/runtime`) and the
//!   shell runtime (Rust, [`run_builtin`]) — which load a block's code once, report
//!   `ready` or `init_error`, then serve invocations one at a time, capturing logs and
//!   giving a step of a service run its [`RunContext`] as environment variables;
//! - what an instance executes for a block ([`entry`]) and the files its code dir holds
//!   ([`code_files`]);
//! - the framed protocol ([`protocol`]) and its async host-side driver ([`InstanceChannel`]),
//!   which adds the platform's [`hints`] to errors whose cause is a platform rule (a missing
//!   third-party package).
//!
//! It must never isolate anything (namespaces, cgroups, mounts and limits are the sandbox
//! crate's), never decide an instance's fate (the pool discards instances on errors and
//! timeouts), and never trust a peer's frame lengths: both sides refuse frames over
//! [`protocol::MAX_FRAME_BYTES`] before allocating for them.
//!
//! After an `init_error` every shim exits, so the host sees `InitFailed` once and then a
//! closed instance.

pub mod client;
pub mod deps;
pub mod hints;
pub mod protocol;
pub mod shell;

use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use refinery_domain::Language;

pub use client::{ChannelError, InstanceChannel, Output, Ready, Reply};
pub use protocol::RunContext;

/// Where the sandbox mounts [`install`]'s directory inside an instance.
pub const RUNTIME_DIR: &str = "/runtime";
/// Where the sandbox mounts the block's code dir inside an instance.
pub const CODE_DIR: &str = "/code";

const PYTHON: &str = "/usr/bin/python3";
const NODE: &str = "/usr/bin/node";
const PYTHON_SHIM: &str = "python_shim.py";
const NODE_SHIM: &str = "node_shim.cjs";

const PYTHON_SHIM_SOURCE: &str = include_str!("shims/python_shim.py");
const NODE_SHIM_SOURCE: &str = include_str!("shims/node_shim.cjs");

/// The protocol's descriptors inside an instance (set up by the sandbox).
const REQUESTS_FD: RawFd = 3;
const RESPONSES_FD: RawFd = 4;

/// What the sandbox should run for a block. Mirrors the sandbox crate's entry type, so
/// this crate does not depend on the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEntry {
    /// Execute this program (argv[0] is its absolute path).
    Exec { argv: Vec<String> },
    /// Re-enter the Refinery binary and call [`run_builtin`]`(name, args)`.
    Builtin { name: String, args: Vec<String> },
    /// Fork from the pre-initialised runtime named `zygote` (see [`zygotes`]), which runs its
    /// preloaded shim's `main()` with `args`; exec `fallback` if that runtime is unavailable.
    Fork {
        zygote: String,
        args: Vec<String>,
        fallback: Vec<String>,
    },
    /// Adopt a sandbox of the standby runtime named `runtime` (see [`standby_runtimes`]),
    /// started ahead of time with its shim loaded, which then serves `args`; start
    /// `fallback` (a zygote fork or an exec) if none is waiting.
    Standby {
        runtime: String,
        args: Vec<String>,
        fallback: Box<RuntimeEntry>,
    },
}

impl RuntimeEntry {
    /// The program to exec for this entry, if it has one: the argv of an `Exec`, the
    /// fallback of a `Fork` (for running shims outside a sandbox).
    pub fn exec_argv(&self) -> Option<&[String]> {
        match self {
            RuntimeEntry::Exec { argv } | RuntimeEntry::Fork { fallback: argv, .. } => Some(argv),
            RuntimeEntry::Standby { fallback, .. } => fallback.exec_argv(),
            RuntimeEntry::Builtin { .. } => None,
        }
    }
}

/// A pre-initialised runtime the host should keep running: `interpreter` (argv prefix) with
/// the shim at `preload` already imported, forking instances of `language`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zygote {
    pub name: String,
    pub interpreter: Vec<String>,
    pub preload: std::path::PathBuf,
}

/// The zygotes for the shims [`install`]ed in `runtime_dir` (a host path). Python only: a
/// forked Python is a complete, working interpreter; Node's runtime is multi-threaded (V8
/// platform and libuv workers) and cannot be forked safely (see [`standby_runtimes`]).
pub fn zygotes(runtime_dir: &Path) -> Vec<Zygote> {
    vec![Zygote {
        name: PYTHON_ZYGOTE.into(),
        interpreter: python_interpreter(),
        preload: runtime_dir.join(PYTHON_SHIM),
    }]
}

const PYTHON_ZYGOTE: &str = "python";
const PYTHON_STANDBY: &str = "python";
const NODE_STANDBY: &str = "node";
const SHELL_STANDBY: &str = "shell";
/// The argument that starts a shim (or the shell runtime) in standby mode.
const STANDBY_FLAG: &str = "--standby";

/// A runtime the host should keep standby sandboxes of: each runs `entry` (an `Exec` with
/// paths inside the sandbox, or a `Builtin`), the shim loaded and waiting for its adoption
/// frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyRuntime {
    pub name: String,
    pub entry: RuntimeEntry,
}

/// The runtimes that start instances from standby sandboxes, their start-up paid ahead of
/// time, once per instance: Node, whose multi-threaded runtime cannot be forked from a
/// zygote; Python, whose adopted standbys start faster than even a zygote fork (that builds
/// its sandbox on the cold start's path) — the zygote serves Python cold starts that find no
/// standby waiting, such as a burst's; and the shell runtime, whose sandbox set-up is all
/// of its start.
pub fn standby_runtimes() -> Vec<StandbyRuntime> {
    let mut node = node_argv(RUNTIME_DIR);
    node.push(STANDBY_FLAG.into());
    let mut python = python_interpreter();
    python.extend([format!("{RUNTIME_DIR}/{PYTHON_SHIM}"), STANDBY_FLAG.into()]);
    vec![
        StandbyRuntime {
            name: NODE_STANDBY.into(),
            entry: RuntimeEntry::Exec { argv: node },
        },
        StandbyRuntime {
            name: PYTHON_STANDBY.into(),
            entry: RuntimeEntry::Exec { argv: python },
        },
        StandbyRuntime {
            name: SHELL_STANDBY.into(),
            entry: RuntimeEntry::Builtin {
                name: "shell".into(),
                args: vec![STANDBY_FLAG.into()],
            },
        },
    ]
}

/// Node and its shim (the block's source comes after).
fn node_argv(runtime_dir: &str) -> Vec<String> {
    vec![
        NODE.into(),
        // Warnings would land in the instance's stray output, not the user's logs.
        "--disable-warning=ExperimentalWarning".into(),
        format!("{runtime_dir}/{NODE_SHIM}"),
    ]
}

/// Whether Node (or the dynamic loader and libc under it) reads variable `name` while it
/// starts, before the shim runs: a block that sets one gets an instance started by exec with
/// it, since a standby sandbox started without it. (`TZ` is not one: Node re-reads it when it
/// changes.)
fn read_by_node_at_start(name: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "NODE_",
        "UV_",
        "OPENSSL_",
        "SSL_CERT_",
        "LC_",
        "LD_",
        "MALLOC_",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p))
        || matches!(name, "LANG" | "LANGUAGE" | "GLIBC_TUNABLES")
}

/// -I: ignore PYTHON* variables and the user site dir; -B: /code is read-only.
fn python_interpreter() -> Vec<String> {
    vec![PYTHON.into(), "-I".into(), "-B".into()]
}

/// Writes the shim files into `dir` (created if missing), world-readable so instances
/// running as unprivileged uids can read them. The protocol bounds are written into the
/// shims here, so they cannot drift from [`protocol`]'s.
pub fn install(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for (name, source) in [
        (PYTHON_SHIM, PYTHON_SHIM_SOURCE),
        (NODE_SHIM, NODE_SHIM_SOURCE),
    ] {
        let path = dir.join(name);
        fs::write(&path, fill_bounds(source))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

fn fill_bounds(source: &str) -> String {
    source
        .replace(
            "__MAX_FRAME_BYTES__",
            &protocol::MAX_FRAME_BYTES.to_string(),
        )
        .replace("__LOG_CAP_BYTES__", &protocol::LOG_CAP_BYTES.to_string())
        .replace(
            "__MAX_JSON_DEPTH__",
            &refinery_domain::limits::MAX_JSON_DEPTH.to_string(),
        )
}

/// What the sandbox runs for a block whose source is `/code/<source_name>` and whose
/// variables are `env`.
///
/// `function` is the handler in that file (`main` unless the manifest's `handler` names
/// another); the shims take it, and the code dir's root (for a handler in a subdirectory,
/// so `import helper` finds the block's top-level files), as further arguments.
pub fn entry(
    language: Language,
    source_name: &str,
    function: &str,
    env: &std::collections::BTreeMap<String, String>,
) -> RuntimeEntry {
    entry_with_deps(language, source_name, function, env, false)
}

/// [`entry`] for a block that may have a dependency layer (`deps`: mounted at its
/// language's [`deps::DepsDescriptor::mount_at`]). A standby sandbox was started without the
/// layer's mount (and Landlock grants only what existed when it started), so an adopted one
/// gets the layer hard-linked into its code dir instead, at
/// [`deps::DepsDescriptor::standby_at`]; without a standby waiting, Python forks from the
/// zygote, which builds the sandbox with the layer mounted from the same plan as any
/// instance (the shim puts the layer on `sys.path` before the handler is imported), and Node
/// starts by exec.
pub fn entry_with_deps(
    language: Language,
    source_name: &str,
    function: &str,
    env: &std::collections::BTreeMap<String, String>,
    deps: bool,
) -> RuntimeEntry {
    if deps {
        if let Some(d) = deps::descriptor(language) {
            let fallback =
                entry_for_deps(language, source_name, function, RUNTIME_DIR, CODE_DIR, d);
            return match language {
                // Adopted: the layer is hard-linked into its code dir (`/code/.deps`).
                Language::Python => RuntimeEntry::Standby {
                    runtime: PYTHON_STANDBY.into(),
                    args: vec![
                        format!("{CODE_DIR}/{source_name}"),
                        function.to_string(),
                        CODE_DIR.to_string(),
                        format!("{CODE_DIR}/{}", d.standby_at),
                    ],
                    fallback: Box::new(fallback),
                },
                // Adopted: `/code/node_modules`, which resolution from `/code` finds first.
                Language::Node if !env.keys().any(|k| read_by_node_at_start(k)) => {
                    RuntimeEntry::Standby {
                        runtime: NODE_STANDBY.into(),
                        args: shim_args(language, source_name, function, CODE_DIR),
                        fallback: Box::new(fallback),
                    }
                }
                _ => fallback,
            };
        }
    }
    let entry = entry_for(language, source_name, function, RUNTIME_DIR, CODE_DIR);
    let args = shim_args(language, source_name, function, CODE_DIR);
    match language {
        // The zygote applies the environment after start-up too, so no variable needs exec.
        Language::Python => RuntimeEntry::Standby {
            runtime: PYTHON_STANDBY.into(),
            args,
            fallback: Box::new(entry),
        },
        Language::Node if !env.keys().any(|k| read_by_node_at_start(k)) => RuntimeEntry::Standby {
            runtime: NODE_STANDBY.into(),
            args,
            fallback: Box::new(entry),
        },
        // The builtin applies the environment in-process, started or adopted alike.
        Language::Shell => RuntimeEntry::Standby {
            runtime: SHELL_STANDBY.into(),
            args,
            fallback: Box::new(entry),
        },
        _ => entry,
    }
}

/// [`entry`] with the runtime and code directories given explicitly: for running shims
/// outside a sandbox (tests, development), where they are not at `/runtime` and `/code`.
pub fn entry_in(
    language: Language,
    source_name: &str,
    runtime_dir: &str,
    code_dir: &str,
) -> RuntimeEntry {
    entry_for(language, source_name, "main", runtime_dir, code_dir)
}

/// [`entry_in`] for a handler `function` other than `main`.
pub fn entry_for(
    language: Language,
    source_name: &str,
    function: &str,
    runtime_dir: &str,
    code_dir: &str,
) -> RuntimeEntry {
    let runtime_dir = runtime_dir.trim_end_matches('/');
    let args = shim_args(language, source_name, function, code_dir);
    match language {
        Language::Python => {
            let mut fallback = python_interpreter();
            fallback.push(format!("{runtime_dir}/{PYTHON_SHIM}"));
            fallback.extend(args.iter().cloned());
            RuntimeEntry::Fork {
                zygote: PYTHON_ZYGOTE.into(),
                args,
                fallback,
            }
        }
        Language::Node => {
            let mut argv = node_argv(runtime_dir);
            argv.extend(args);
            RuntimeEntry::Exec { argv }
        }
        Language::Shell => RuntimeEntry::Builtin {
            name: "shell".into(),
            args,
        },
    }
}

/// [`entry_for`] with a dependency layer mounted at `deps.mount_at`.
fn entry_for_deps(
    language: Language,
    source_name: &str,
    function: &str,
    runtime_dir: &str,
    code_dir: &str,
    deps: &deps::DepsDescriptor,
) -> RuntimeEntry {
    match language {
        Language::Python => {
            let runtime_dir = runtime_dir.trim_end_matches('/');
            let code_dir = code_dir.trim_end_matches('/');
            let args = vec![
                format!("{code_dir}/{source_name}"),
                function.to_string(),
                code_dir.to_string(),
                deps.mount_at.to_string(),
            ];
            let mut fallback = python_interpreter();
            fallback.push(format!("{runtime_dir}/{PYTHON_SHIM}"));
            fallback.extend(args.iter().cloned());
            RuntimeEntry::Fork {
                zygote: PYTHON_ZYGOTE.into(),
                args,
                fallback,
            }
        }
        // Node finds `/node_modules` by its own resolution from `/code`.
        _ => entry_for(language, source_name, function, runtime_dir, code_dir),
    }
}

/// The shim's arguments: the handler's file; then, unless the handler is `main` in a file
/// at the top of the code dir, the function and the code dir's root.
fn shim_args(language: Language, source_name: &str, function: &str, code_dir: &str) -> Vec<String> {
    let code_dir = code_dir.trim_end_matches('/');
    let mut args = vec![format!("{code_dir}/{source_name}")];
    if language != Language::Shell && (function != "main" || source_name.contains('/')) {
        args.extend([function.to_string(), code_dir.to_string()]);
    }
    args
}

/// The files of a block's code dir: the source itself, plus a `package.json` declaring
/// `"type": "module"` for a Node `.js` file that uses ES module syntax (without it Node
/// would load the file as CommonJS and fail on `export`).
pub fn code_files(language: Language, source_name: &str, code: &str) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![(source_name.to_string(), code.as_bytes().to_vec())];
    if language == Language::Node
        && source_name.ends_with(".js")
        && source_name != "package.json"
        && uses_esm_syntax(code)
    {
        files.push((
            "package.json".to_string(),
            b"{\"type\": \"module\"}\n".to_vec(),
        ));
    }
    files
}

/// The files of a block's code dir, at their paths relative to it (a directory source's
/// files keep their subdirectories): as [`code_files`] (the generated `package.json`
/// only when the handler's file uses ES module syntax and the directory has none of its own).
pub fn block_code_files(block: &refinery_domain::BlockSpec) -> Vec<(String, Vec<u8>)> {
    if block.files.is_empty() && block.binary_files.is_empty() {
        return code_files(block.language, &block.source_name, &block.code);
    }
    let mut files: Vec<(String, Vec<u8>)> = block
        .source_files()
        .map(|(path, text)| (path.to_string(), text.as_bytes().to_vec()))
        .chain(
            block
                .binary_files
                .iter()
                .map(|(path, bytes)| (path.clone(), bytes.clone())),
        )
        .collect();
    if block.language == Language::Node
        && !block.files.contains_key("package.json")
        && block.source_name.ends_with(".js")
        && uses_esm_syntax(&block.code)
    {
        files.push((
            "package.json".to_string(),
            b"{\"type\": \"module\"}\n".to_vec(),
        ));
    }
    files
}

/// A line-based guess at whether JavaScript source is an ES module: a top-level-looking
/// `import ... from`/`import '...'`/`export ...` statement, or `import.meta`. Dynamic
/// `import(...)` is valid CommonJS and does not count.
fn uses_esm_syntax(code: &str) -> bool {
    code.lines().any(|line| {
        let line = line.trim_start();
        if line.starts_with("//") || line.starts_with('*') || line.starts_with("/*") {
            return false;
        }
        if line.contains("import.meta") {
            return true;
        }
        if let Some(rest) = line.strip_prefix("export") {
            return rest.starts_with([' ', '{', '*', '\t']);
        }
        if let Some(rest) = line.strip_prefix("import") {
            let spaced = rest.starts_with(char::is_whitespace);
            let rest = rest.trim_start();
            return (spaced && !rest.starts_with('(')) || rest.starts_with(['{', '*', '"', '\'']);
        }
        false
    })
}

/// Runs a builtin runtime inside the sandbox (the Refinery binary calls this for
/// [`RuntimeEntry::Builtin`]); returns the process exit code. `"shell"` serves the
/// protocol on fds 3 and 4 for the script `args[0]`.
pub fn run_builtin(name: &str, args: &[String]) -> i32 {
    match name {
        "shell" => {
            let (requests, responses) = match protocol_fds() {
                Ok(fds) => fds,
                Err(e) => {
                    eprintln!("refinery shell runtime: protocol fds 3 and 4 unusable: {e}");
                    return 2;
                }
            };
            let (mut requests, mut responses) =
                (fs::File::from(requests), fs::File::from(responses));
            let mut args = args.to_vec();
            if args == [STANDBY_FLAG] {
                match shell::await_adoption(&mut requests, &mut responses) {
                    Ok(Some(adoption)) => {
                        // Still one thread: the environment can be replaced safely.
                        for (k, _) in std::env::vars_os() {
                            std::env::remove_var(k);
                        }
                        for (k, v) in &adoption.env {
                            std::env::set_var(k, v);
                        }
                        args = adoption.args;
                    }
                    Ok(None) => return 0,
                    Err(e) => {
                        eprintln!("refinery shell runtime: {e}");
                        return 2;
                    }
                }
            }
            let [script] = args.as_slice() else {
                eprintln!("refinery shell runtime: expected one argument, the script path");
                return 2;
            };
            match shell::serve(requests, responses, Path::new(script)) {
                Ok(()) => 0,
                Err(shell::ShellError::InitFailed(_)) => 1,
                Err(e) => {
                    eprintln!("refinery shell runtime: {e}");
                    1
                }
            }
        }
        other => {
            eprintln!("refinery: unknown builtin runtime `{other}`");
            2
        }
    }
}

/// Takes ownership of fds 3 and 4, marking them close-on-exec so scripts cannot see the
/// protocol pipes.
fn protocol_fds() -> io::Result<(OwnedFd, OwnedFd)> {
    for fd in [REQUESTS_FD, RESPONSES_FD] {
        // SAFETY: fcntl on an integer fd touches no memory; an unopened fd yields EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above; only the descriptor flags change.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: both fds were just checked to be open, and by the sandbox's contract they are
    // the protocol pipes, which nothing else in this process owns or closes.
    let owned = unsafe {
        (
            OwnedFd::from_raw_fd(REQUESTS_FD),
            OwnedFd::from_raw_fd(RESPONSES_FD),
        )
    };
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_match_the_contract() {
        let no_env = std::collections::BTreeMap::new();
        assert_eq!(
            entry(Language::Python, "main.py", "main", &no_env),
            RuntimeEntry::Standby {
                runtime: "python".into(),
                args: vec!["/code/main.py".into()],
                fallback: Box::new(RuntimeEntry::Fork {
                    zygote: "python".into(),
                    args: vec!["/code/main.py".into()],
                    fallback: vec![
                        "/usr/bin/python3".into(),
                        "-I".into(),
                        "-B".into(),
                        "/runtime/python_shim.py".into(),
                        "/code/main.py".into()
                    ]
                })
            }
        );
        let zygotes = zygotes(Path::new("/data/runtime"));
        assert_eq!(zygotes.len(), 1);
        assert_eq!(zygotes[0].name, "python");
        assert_eq!(
            zygotes[0].preload,
            Path::new("/data/runtime/python_shim.py")
        );
        let RuntimeEntry::Standby {
            runtime,
            args,
            fallback,
        } = entry(Language::Node, "h.js", "main", &no_env)
        else {
            panic!("node adopts a standby sandbox");
        };
        assert_eq!(runtime, "node");
        assert_eq!(args, ["/code/h.js"]);
        let argv = fallback.exec_argv().expect("node falls back to exec");
        assert_eq!(argv.first().map(String::as_str), Some("/usr/bin/node"));
        assert_eq!(
            argv[argv.len() - 2..],
            ["/runtime/node_shim.cjs", "/code/h.js"]
        );
        let standby = standby_runtimes();
        let names: Vec<&str> = standby.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["node", "python", "shell"]);
        let node = standby[0].entry.exec_argv().expect("node execs");
        assert_eq!(
            node[node.len() - 2..],
            ["/runtime/node_shim.cjs", "--standby"]
        );
        assert_eq!(
            standby[1].entry.exec_argv().expect("python execs"),
            [
                "/usr/bin/python3",
                "-I",
                "-B",
                "/runtime/python_shim.py",
                "--standby"
            ]
        );
        assert_eq!(
            standby[2].entry,
            RuntimeEntry::Builtin {
                name: "shell".into(),
                args: vec!["--standby".into()]
            }
        );
        assert_eq!(
            entry(Language::Shell, "x.sh", "main", &no_env),
            RuntimeEntry::Standby {
                runtime: "shell".into(),
                args: vec!["/code/x.sh".into()],
                fallback: Box::new(RuntimeEntry::Builtin {
                    name: "shell".into(),
                    args: vec!["/code/x.sh".into()]
                })
            }
        );
    }

    #[test]
    fn node_variables_read_at_start_mean_exec() {
        for name in [
            "NODE_OPTIONS",
            "NODE_EXTRA_CA_CERTS",
            "UV_THREADPOOL_SIZE",
            "LANG",
            "LD_PRELOAD",
            "GLIBC_TUNABLES",
        ] {
            let env = std::collections::BTreeMap::from([(name.to_string(), "x".to_string())]);
            assert!(
                matches!(
                    entry(Language::Node, "h.js", "main", &env),
                    RuntimeEntry::Exec { .. }
                ),
                "{name}"
            );
        }
        let env = std::collections::BTreeMap::from([
            ("TZ".to_string(), "UTC".to_string()),
            ("GREETING".to_string(), "hi".to_string()),
        ]);
        assert!(matches!(
            entry(Language::Node, "h.js", "main", &env),
            RuntimeEntry::Standby { .. }
        ));
    }

    #[test]
    fn detects_esm_syntax() {
        assert!(uses_esm_syntax("export function main() {}"));
        assert!(uses_esm_syntax("export default async (x) => x"));
        assert!(uses_esm_syntax(
            "import fs from 'node:fs';\nmodule.exports = 1"
        ));
        assert!(uses_esm_syntax("import {a} from './a.js'"));
        assert!(uses_esm_syntax("import './side.js'"));
        assert!(uses_esm_syntax("const u = import.meta.url"));
        assert!(!uses_esm_syntax("module.exports.main = async () => 1"));
        assert!(!uses_esm_syntax("const m = await import('./x.mjs')"));
        assert!(!uses_esm_syntax("// export function main() {}"));
        assert!(!uses_esm_syntax("exports.main = () => 1"));
    }

    #[test]
    fn package_json_only_for_esm_js() {
        let esm = code_files(Language::Node, "h.js", "export const main = () => 1");
        assert_eq!(esm.len(), 2);
        assert_eq!(esm[1].0, "package.json");
        assert_eq!(
            code_files(Language::Node, "h.mjs", "export const main = () => 1").len(),
            1
        );
        assert_eq!(
            code_files(Language::Node, "h.js", "exports.main = () => 1").len(),
            1
        );
        assert_eq!(
            code_files(Language::Python, "h.py", "def main(a, b): pass"),
            vec![("h.py".to_string(), b"def main(a, b): pass".to_vec())]
        );
    }

    #[test]
    fn installed_shims_have_their_bounds_filled_in() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        install(dir.path())?;
        for name in [PYTHON_SHIM, NODE_SHIM] {
            let text = fs::read_to_string(dir.path().join(name))?;
            assert!(!text.contains("__MAX_FRAME_BYTES__"), "{name}");
            assert!(!text.contains("__LOG_CAP_BYTES__"), "{name}");
            assert!(!text.contains("__MAX_JSON_DEPTH__"), "{name}");
            assert!(text.contains(&protocol::MAX_FRAME_BYTES.to_string()));
        }
        Ok(())
    }

    #[test]
    fn unknown_builtin_is_exit_2() {
        assert_eq!(run_builtin("cobol", &[]), 2);
        assert_eq!(run_builtin("shell", &[]), 2);
    }
}
