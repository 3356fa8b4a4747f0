//! Hostile code: every test deploys a block that *tries* an attack, asserts that the attack
//! fails (the errno or denial expected, or the data absent), and then that the platform still
//! serves other blocks and accounts normally.
//!
//! Blocks report what they observed as JSON (`{"mount": "EPERM"}`); errno names come from
//! Python's `errno.errorcode`. Calls the hardened sandbox filters with seccomp may fail with
//! EPERM, EACCES or ENOSYS (whichever errno the filter returns); the kernel's own checks are
//! asserted precisely.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{cgroup_pids, eventually, host_addresses, namespace_pid, process_alive, Server};
use serde_json::{json, Value};

/// Helpers every Python attack block starts with.
const PRELUDE: &str = r#"
import ctypes, errno, json, os, signal, socket, struct, subprocess, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def ename(e):
    return errno.errorcode.get(e, str(e))

def arg(a):
    if isinstance(a, int):
        return ctypes.c_long(a)
    if isinstance(a, str):
        return ctypes.c_char_p(a.encode())
    if isinstance(a, bytes):
        return ctypes.c_char_p(a)
    return a

def sc(nr, *args):
    """A raw x86_64 syscall: "ok" or the errno name."""
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[arg(a) for a in args])
    return "ok" if r >= 0 else ename(ctypes.get_errno())

def attempt(f, *a, **k):
    try:
        f(*a, **k)
        return "ok"
    except OSError as e:
        return ename(e.errno) if e.errno else type(e).__name__
    except Exception as e:
        return type(e).__name__

def in_child(f):
    """Runs f in a forked child (so a successful attack cannot change the shim itself) and
    returns its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            out = json.dumps(f()).encode()
        except BaseException as e:
            out = json.dumps({"child_error": repr(e)}).encode()
        os.write(w, out)
        os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data) if data else {"child_error": "no output"}

def own_pids():
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
"#;

fn py(body: &str) -> String {
    format!("{PRELUDE}\n{body}")
}

/// One block of a test project: its source is uploaded as `<name>.<ext>`.
struct B<'a> {
    name: &'a str,
    language: &'a str,
    code: String,
    extra: &'a str,
}

fn b<'a>(name: &'a str, language: &'a str, code: String, extra: &'a str) -> B<'a> {
    B {
        name,
        language,
        code,
        extra,
    }
}

fn ext(language: &str) -> &'static str {
    match language {
        "python" => "py",
        "node" => "js",
        _ => "sh",
    }
}

async fn deploy(server: &Server, key: &str, project: &str, blocks: &[B<'_>]) -> Value {
    let mut manifest = format!("name = \"{project}\"\n");
    let mut files = Vec::new();
    for block in blocks {
        let file = format!("{}.{}", block.name, ext(block.language));
        manifest.push_str(&format!(
            "\n[[blocks]]\nname = \"{}\"\nlanguage = \"{}\"\nsource = \"{file}\"\n{}\n",
            block.name, block.language, block.extra
        ));
        files.push((file, block.code.clone()));
    }
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(f, c)| (f.as_str(), c.as_str()))
        .collect();
    server.deploy_files_ok(key, &manifest, &files).await
}

/// Invokes and asserts status "ok"; returns the output.
async fn run(server: &Server, key: &str, project: &str, block: &str, input: Value) -> Value {
    let reply = server.invoke_ok(key, project, block, input).await;
    assert_eq!(reply["status"], "ok", "{project}/{block}: {reply}");
    reply["output"].clone()
}

/// Errnos a refused call may report (kernel permission checks or a seccomp filter).
const DENIED: &[&str] = &["EPERM", "EACCES", "ENOSYS"];

/// A host path probed from inside an instance is absent (ENOENT); through `/proc/1/root`
/// (the instance's init, not dumpable) the kernel may refuse with EACCES instead.
fn absent(path: &str, result: &Value) -> bool {
    result == "ENOENT" || (path.starts_with("/proc/1/") && result == "EACCES")
}

/// Every leaf of `report` (a tree of objects) must be one of `allowed`; returns the leaves
/// that are not, as "path = value", for one assertion listing every gap at once.
fn not_in(report: &Value, allowed: &[&str]) -> Vec<String> {
    fn walk(v: &Value, path: String, allowed: &[&str], bad: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(v, p, allowed, bad);
                }
            }
            Value::String(s) if allowed.contains(&s.as_str()) => {}
            other => bad.push(format!("{path} = {other}")),
        }
    }
    let mut bad = Vec::new();
    walk(report, String::new(), allowed, &mut bad);
    bad
}

// ---------------------------------------------------------------------------------------------
// Reading other blocks' code, /tmp and environment.

/// A victim: its secret is in its env, its code and (after one invocation) its /tmp.
fn victim(tag: &str) -> String {
    format!(
        r#"
import os
CODE_SECRET = "SECRET-{tag}-CODE"
def main(block_input, backpack):
    with open("/tmp/secret", "w") as f:
        f.write("SECRET-{tag}-TMP")
    return {{"uid": os.getuid(), "env": os.environ.get("SECRET")}}
"#
    )
}

const READER: &str = r#"
import re
# Built in two pieces so this file itself never matches.
PATTERN = re.compile(("SEC" + "RET-") + "[A-Za-z0-9-]+")
SKIP = ("/proc", "/usr", "/sys", "/dev", "/lib", "/lib64", "/bin", "/sbin")

def scan(path, found, seen):
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
        seen.append(path)
        for m in PATTERN.findall(data.decode("latin-1")):
            found.add(m + " @ " + path)
    except OSError:
        pass

def main(block_input, backpack):
    found, seen = set(), []
    for pid in own_pids():
        for leaf in ("environ", "cmdline", "root/tmp/secret", "cwd/secret"):
            scan("/proc/%d/%s" % (pid, leaf), found, seen)
        try:
            for name in os.listdir("/proc/%d/root/tmp" % pid):
                scan("/proc/%d/root/tmp/%s" % (pid, name), found, seen)
        except OSError:
            pass
    walked = 0
    for top, dirs, files in os.walk("/"):
        dirs[:] = [d for d in dirs if os.path.join(top, d) not in SKIP]
        for name in files:
            walked += 1
            scan(os.path.join(top, name), found, seen)
    guesses = {}
    data_dir = block_input["data_dir"]
    for d in range(1, 8):
        for blk in block_input["blocks"]:
            for prefix in ("", "/proc/1/root", "/proc/self/root", "/code/../.."):
                path = "%s%s/code/%d/%s/%s.py" % (prefix, data_dir, d, blk, blk)
                guesses[path] = attempt(lambda p=path: open(p, "rb").read())
                scan(path, found, seen)
    code = sorted(os.listdir("/code"))
    return {"found": sorted(found), "walked": walked, "guesses": guesses, "code": code,
            "uid": os.getuid(), "env": dict(os.environ)}
"#;

const SHELL_READER: &str = r#"
# Everything readable that might hold another block's secret, grepped for the marker.
{
  cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline
  cat /proc/[0-9]*/root/tmp/* /tmp/* /code/*
  ls -la / /code /tmp /proc
} 2>/dev/null | grep -ao 'SECRE[T]-[A-Za-z0-9-]*' | sort -u | tr '\n' ' '
true
"#;

const NODE_READER: &str = r#"
const fs = require('fs');
const marker = new RegExp('SEC' + 'RET-[A-Za-z0-9-]+', 'g');
exports.main = (input) => {
  const found = new Set();
  const scan = (p) => {
    try {
      const text = fs.readFileSync(p).toString('latin1');
      for (const m of text.match(marker) || []) found.add(m + ' @ ' + p);
    } catch (e) {}
  };
  for (const pid of fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
    scan(`/proc/${pid}/environ`);
    try { for (const f of fs.readdirSync(`/proc/${pid}/root/tmp`)) scan(`/proc/${pid}/root/tmp/${f}`); } catch (e) {}
  }
  for (const f of fs.readdirSync('/code')) scan('/code/' + f);
  for (const f of fs.readdirSync('/tmp')) scan('/tmp/' + f);
  const db = {};
  for (const p of [input.data_dir + '/refinery.db', input.data_dir + '/operator.key']) {
    try { fs.readFileSync(p); db[p] = 'ok'; } catch (e) { db[p] = e.code; }
  }
  return { found: [...found], db };
};
"#;

#[tokio::test(flavor = "multi_thread")]
async fn other_blocks_projects_and_accounts_code_tmp_and_env_are_invisible() {
    let server = Server::start().await;
    let (_, key_x) = server.account("mallory").await;
    let (_, key_y) = server.account("victim").await;

    // Account Y's block, account X's sibling block (same project) and another project of X.
    deploy(
        &server,
        &key_y,
        "vault",
        &[b(
            "keeper",
            "python",
            victim("Y"),
            r#"env = { SECRET = "SECRET-Y-ENV" }"#,
        )],
    )
    .await;
    deploy(
        &server,
        &key_x,
        "mine",
        &[
            b(
                "sibling",
                "python",
                victim("XSIB"),
                r#"env = { SECRET = "SECRET-XSIB-ENV" }"#,
            ),
            b("attacker", "python", py(READER), ""),
            b("shattacker", "shell", SHELL_READER.to_string(), ""),
            b("nodeattacker", "node", NODE_READER.to_string(), ""),
        ],
    )
    .await;
    deploy(
        &server,
        &key_x,
        "other",
        &[b(
            "keeper2",
            "python",
            victim("XOTH"),
            r#"env = { SECRET = "SECRET-XOTH-ENV" }"#,
        )],
    )
    .await;
    // Every victim has a live (warm, frozen) instance holding its secrets.
    let y = run(&server, &key_y, "vault", "keeper", json!(null)).await;
    let sib = run(&server, &key_x, "mine", "sibling", json!(null)).await;
    let oth = run(&server, &key_x, "other", "keeper2", json!(null)).await;
    assert_eq!(y["env"], "SECRET-Y-ENV");

    let data_dir = server.data_dir.to_string_lossy().to_string();
    let input = json!({
        "data_dir": data_dir,
        "blocks": ["keeper", "sibling", "keeper2", "attacker"],
    });
    let report = run(&server, &key_x, "mine", "attacker", input.clone()).await;
    assert_eq!(report["found"], json!([]), "secrets leaked: {report}");
    assert!(
        report["walked"].as_u64().unwrap_or(0) > 0,
        "walked nothing: {report}"
    );
    assert_eq!(report["code"], json!(["attacker.py"]), "{report}");
    for (path, result) in report["guesses"].as_object().expect("guesses") {
        assert!(absent(path, result), "host path {path} reachable: {report}");
    }
    // A clean environment: only the platform's variables.
    let env: BTreeSet<String> = report["env"]
        .as_object()
        .expect("env")
        .keys()
        .cloned()
        .collect();
    let expected: BTreeSet<String> = ["HOME", "LANG", "PATH", "TMPDIR"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(env, expected, "{report}");
    // Every instance runs under its own uid.
    let uids: BTreeSet<i64> = [&y, &sib, &oth, &report]
        .iter()
        .filter_map(|v| v["uid"].as_i64())
        .collect();
    assert_eq!(uids.len(), 4, "instances share a uid: {uids:?}");
    assert!(uids.iter().all(|u| *u >= 1000), "{uids:?}");

    let shell = server
        .invoke_ok(&key_x, "mine", "shattacker", json!(null))
        .await;
    assert_eq!(shell["status"], "ok", "{shell}");
    assert_eq!(
        shell["output"], "",
        "secrets leaked to a shell block: {shell}"
    );

    let node = run(&server, &key_x, "mine", "nodeattacker", input).await;
    assert_eq!(
        node["found"],
        json!([]),
        "secrets leaked to a node block: {node}"
    );
    for (path, result) in node["db"].as_object().expect("db") {
        assert_eq!(result, "ENOENT", "{path}: {node}");
    }
    server.assert_still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// The host's data dir, database and operator key.

const HOST_FILES: &str = r#"
def main(block_input, backpack):
    out = {"direct": {}, "via": {}, "symlink": {}}
    for path in block_input["paths"]:
        out["direct"][path] = attempt(lambda: open(path, "rb").read())
        for prefix in ("/proc/1/root", "/proc/self/root", "/proc/self/cwd", "/code/../../..", "/tmp/../.."):
            p = prefix + path
            out["via"][p] = attempt(lambda: open(p, "rb").read())
        link = "/tmp/link-%d" % len(out["symlink"])
        os.symlink(path, link)
        out["symlink"][link] = attempt(lambda: open(link, "rb").read())
    # The "shocker" escape: open a host inode by a forged file handle (needs
    # CAP_DAC_READ_SEARCH). handle_bytes = 8, handle_type = 1 (FILEID_INO32_GEN): inode 2.
    handle = ctypes.create_string_buffer(struct.pack("IiII", 8, 1, 2, 0), 16)
    mount_fd = os.open("/code", os.O_RDONLY)
    out["open_by_handle_at"] = sc(304, mount_fd, handle, os.O_RDONLY)
    # Info: what mountinfo tells about host paths.
    out["mountinfo_mentions_data_dir"] = block_input["data_dir"] in open("/proc/self/mountinfo").read()
    return out
"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_data_dir_database_and_operator_key_are_unreachable() {
    let server = Server::start().await;
    let (_, key) = server.account("mallory").await;
    deploy(
        &server,
        &key,
        "steal",
        &[b("files", "python", py(HOST_FILES), "")],
    )
    .await;
    let data = server.data_dir.clone();
    let paths: Vec<String> = [
        data.clone(),
        data.join("refinery.db"),
        data.join("refinery.db-wal"),
        data.join("operator.key"),
        data.join("code/1/files/files.py"),
        data.join("runtime/python_shim.py"),
    ]
    .iter()
    .map(|p| p.to_string_lossy().to_string())
    .collect();
    let report = run(
        &server,
        &key,
        "steal",
        "files",
        json!({ "paths": paths, "data_dir": data.to_string_lossy() }),
    )
    .await;
    for group in ["direct", "via", "symlink"] {
        for (path, result) in report[group].as_object().expect("group") {
            assert!(absent(path, result), "{group} {path}: {report}");
        }
    }
    assert_eq!(report["open_by_handle_at"], "EPERM", "{report}");
    eprintln!(
        "info: /proc/self/mountinfo names the host data dir: {}",
        report["mountinfo_mentions_data_dir"]
    );
    // The host never followed the instance's symlinks: nothing under the data dir is a link.
    for entry in walk(&data) {
        let meta = std::fs::symlink_metadata(&entry).expect("meta");
        assert!(
            !meta.file_type().is_symlink(),
            "symlink in the data dir: {}",
            entry.display()
        );
    }
    server.assert_still_serving().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            out.push(path.clone());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk(&path));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Host processes.

const PROCESSES: &str = r#"
def main(block_input, backpack):
    out = {"pids": own_pids(), "getppid": os.getppid(), "kill": {}}
    for name, pid in block_input["host_pids"].items():
        out["kill"][name + " 0"] = attempt(os.kill, pid, 0)
        out["kill"][name + " SIGKILL"] = attempt(os.kill, pid, signal.SIGKILL)
        out["kill"][name + " pgrp"] = attempt(os.kill, -pid, signal.SIGKILL)
        out["kill"][name + " pidfd_open"] = sc(434, pid, 0)
    # Signals to the namespace's init from a child: ignored (or refused), never fatal.
    out["init"] = in_child(lambda: {s: attempt(os.kill, 1, getattr(signal, s)) for s in ("SIGKILL", "SIGTERM", "SIGSTOP")})
    out["alive_after"] = True
    return out
"#;

#[tokio::test(flavor = "multi_thread")]
async fn host_processes_are_invisible_and_cannot_be_signalled() {
    let server = Server::start().await;
    let (_, key) = server.account("mallory").await;
    deploy(
        &server,
        &key,
        "procs",
        &[b("look", "python", py(PROCESSES), "")],
    )
    .await;
    let server_pid = server.pid();
    let own = std::process::id();
    let report = run(
        &server,
        &key,
        "procs",
        "look",
        json!({ "host_pids": { "server": server_pid, "test": own } }),
    )
    .await;
    let pids: Vec<i64> = report["pids"]
        .as_array()
        .expect("pids")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    assert!(
        !pids.is_empty() && pids.len() <= 3 && pids.iter().all(|p| *p <= 3),
        "/proc shows more than the instance's own processes: {report}"
    );
    assert!(!pids.contains(&i64::from(server_pid)));
    // The shim's parent is inside the namespace (pid 0 = none, 1 = the instance's init).
    assert!(
        report["getppid"].as_i64().is_some_and(|p| p <= 1),
        "{report}"
    );
    for (what, result) in report["kill"].as_object().expect("kill") {
        assert_eq!(result, "ESRCH", "{what}: {report}");
    }
    assert_eq!(report["alive_after"], true);
    assert!(process_alive(i64::from(server_pid)));
    // The instance survived its attempts on its own init and still answers.
    let again = run(&server, &key, "procs", "look", json!({ "host_pids": {} })).await;
    assert_eq!(again["alive_after"], true);
    server.assert_still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// ptrace and cross-process memory access.

const PTRACE: &str = r#"
def attach():
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    buf = ctypes.create_string_buffer(8)
    iov = ctypes.create_string_buffer(struct.pack("QQ", ctypes.addressof(buf), 8), 16)
    out = {
        "PTRACE_ATTACH child": sc(101, 16, pid, 0, 0),
        "process_vm_readv child": sc(310, pid, iov, 1, iov, 1, 0),
        "process_vm_writev child": sc(311, pid, iov, 1, iov, 1, 0),
    }
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return out

def main(block_input, backpack):
    out = {"PTRACE_TRACEME": in_child(lambda: sc(101, 0, 0, 0, 0))}
    out.update(in_child(attach))
    # PTRACE_SEIZE does not stop the tracee: trying it on the shim cannot hang the test.
    out["PTRACE_SEIZE init"] = in_child(lambda: sc(101, 0x4206, 1, 0, 0))
    out["PTRACE_SEIZE parent"] = in_child(lambda: sc(101, 0x4206, os.getppid(), 0, 0))
    return out
"#;

#[tokio::test(flavor = "multi_thread")]
async fn ptrace_and_process_vm_access_are_refused() {
    let server = Server::start().await;
    let (_, key) = server.account("mallory").await;
    deploy(&server, &key, "trace", &[b("t", "python", py(PTRACE), "")]).await;
    let report = run(&server, &key, "trace", "t", json!(null)).await;
    let gaps = not_in(&report, DENIED);
    assert!(gaps.is_empty(), "ptrace not refused: {gaps:?}\n{report}");
    server.assert_still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// /proc tricks, /dev, /sys, hostname.

const PROC_TRICKS: &str = r#"
def main(block_input, backpack):
    out = {}
    for pid in ("1", "self"):
        try:
            out["root %s is own root" % pid] = sorted(os.listdir("/proc/%s/root" % pid)) == sorted(os.listdir("/"))
        except OSError as e:
            out["root %s is own root" % pid] = ename(e.errno)
    out["shadow"] = attempt(lambda: open("/proc/1/root/etc/shadow").read())
    out["write /proc/self/exe"] = attempt(lambda: os.close(os.open("/proc/self/exe", os.O_WRONLY)))
    out["write /proc/1/exe"] = attempt(lambda: os.close(os.open("/proc/1/exe", os.O_WRONLY)))
    try:
        out["exe1"] = os.readlink("/proc/1/exe")
    except OSError as e:
        out["exe1"] = ename(e.errno)
    masked = {}
    for f in ("kcore", "keys", "key-users", "timer_list", "sysrq-trigger", "sched_debug", "kmsg"):
        try:
            with open("/proc/" + f, "rb") as fh:
                data = fh.read(4096)
            masked[f] = "readable" if data else "empty"
        except OSError as e:
            masked[f] = ename(e.errno)
    out["masked"] = masked
    out["write /proc/sys/kernel/hostname"] = attempt(lambda: open("/proc/sys/kernel/hostname", "w").write("pwned"))
    out["write /proc/sys/vm/drop_caches"] = attempt(lambda: open("/proc/sys/vm/drop_caches", "w").write("3"))
    out["sethostname"] = attempt(socket.sethostname, "pwned")
    out["hostname"] = socket.gethostname()
    out["sys"] = attempt(os.listdir, "/sys")
    out["dev"] = sorted(os.listdir("/dev"))
    out["dev_open"] = {d: attempt(lambda d=d: os.close(os.open(d, os.O_RDONLY)))
                       for d in ("/dev/mem", "/dev/kmem", "/dev/port", "/dev/kmsg", "/dev/vda", "/dev/sda",
                                 "/dev/tty", "/dev/console", "/dev/net/tun", "/dev/fuse", "/dev/kvm", "/dev/shm")}
    out["mountinfo"] = open("/proc/self/mountinfo").read()
    return out
"#;

const SHELL_PROC: &str = r#"
exe=$(readlink /proc/1/exe 2>&1)
if head -c 4 /proc/1/exe >/dev/null 2>&1; then read_exe=ok; else read_exe=denied; fi
if (true >>/proc/1/exe) 2>/dev/null; then write_exe=ok; else write_exe=denied; fi
if hostname pwned 2>/dev/null; then host=changed; else host=refused; fi
printf '{"exe1": "%s", "read_exe1": "%s", "write_exe1": "%s", "hostname": "%s"}' "$exe" "$read_exe" "$write_exe" "$host"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn proc_dev_sys_and_hostname_tricks_fail() {
    let server = Server::start().await;
    let (_, key) = server.account("mallory").await;
    deploy(
        &server,
        &key,
        "proc",
        &[
            b("tricks", "python", py(PROC_TRICKS), ""),
            b("sh", "shell", SHELL_PROC.to_string(), ""),
        ],
    )
    .await;
    let r = run(&server, &key, "proc", "tricks", json!(null)).await;
    // /proc/<pid>/root of the instance's processes is the instance's own root (or refused).
    for pid in ["1", "self"] {
        let v = &r[format!("root {pid} is own root")];
        assert!(*v == json!(true) || *v == json!("EACCES"), "{pid}: {r}");
    }
    assert!(absent("/proc/1/root/etc/shadow", &r["shadow"]), "{r}");
    for w in ["write /proc/self/exe", "write /proc/1/exe"] {
        assert!(
            ["EACCES", "ETXTBSY", "EROFS", "EPERM"].contains(&r[w].as_str().unwrap_or("ok")),
            "{w}: {r}"
        );
    }
    for w in [
        "write /proc/sys/kernel/hostname",
        "write /proc/sys/vm/drop_caches",
    ] {
        assert!(
            ["EACCES", "EROFS", "EPERM"].contains(&r[w].as_str().unwrap_or("ok")),
            "{w}: {r}"
        );
    }
    assert!(
        DENIED.contains(&r["sethostname"].as_str().unwrap_or("ok")),
        "{r}"
    );
    assert_eq!(r["hostname"], "refinery", "{r}");
    assert_eq!(r["sys"], "ENOENT", "{r}");
    assert_eq!(
        r["dev"],
        json!(["fd", "full", "null", "random", "stderr", "stdin", "stdout", "urandom", "zero"]),
        "{r}"
    );
    for (dev, result) in r["dev_open"].as_object().expect("dev_open") {
        assert_eq!(result, "ENOENT", "{dev}: {r}");
    }
    // Host-kernel information files are masked (absent, unreadable or empty).
    let leaks: Vec<String> = r["masked"]
        .as_object()
        .expect("masked")
        .iter()
        .filter(|(_, v)| *v == "readable")
        .map(|(k, _)| format!("/proc/{k}"))
        .collect();
    eprintln!(
        "info: /proc/1/exe = {}; mountinfo:\n{}",
        r["exe1"],
        r["mountinfo"].as_str().unwrap_or_default()
    );

    let sh = run(&server, &key, "proc", "sh", json!(null)).await;
    eprintln!("info: shell block sees /proc/1/exe = {sh}");
    assert_eq!(sh["write_exe1"], "denied", "{sh}");
    assert_eq!(sh["hostname"], "refused", "{sh}");
    server.assert_still_serving().await;
    assert!(leaks.is_empty(), "unmasked /proc files: {leaks:?}\n{r}");
}

// ---------------------------------------------------------------------------------------------
// Namespaces, mounts and kernel-level syscalls.

const KERNEL: &str = r#"
NEW = {"NEWNS": 0x00020000, "NEWCGROUP": 0x02000000, "NEWUTS": 0x04000000, "NEWIPC": 0x08000000,
       "NEWUSER": 0x10000000, "NEWPID": 0x20000000, "NEWNET": 0x40000000}

def raw_clone(flags):
    r = libc.syscall(ctypes.c_long(56), ctypes.c_long(flags | signal.SIGCHLD), ctypes.c_long(0),
                     ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
    if r == 0:
        os._exit(0)
    if r < 0:
        return ename(ctypes.get_errno())
    os.waitpid(r, 0)
    return "ok"

def clone3(flags):
    args = ctypes.create_string_buffer(struct.pack("QQQQQQQQ", flags, 0, 0, 0, signal.SIGCHLD, 0, 0, 0), 64)
    r = libc.syscall(ctypes.c_long(435), args, ctypes.c_long(64))
    if r == 0:
        os._exit(0)
    if r < 0:
        return ename(ctypes.get_errno())
    os.waitpid(r, 0)
    return "ok"

def setns(ns):
    fd = os.open("/proc/self/ns/" + ns, os.O_RDONLY)
    return sc(308, fd, 0)

def kernel():
    out = {}
    out["mount tmpfs"] = sc(165, "none", "/tmp", "tmpfs", 0, 0)
    out["mount proc"] = sc(165, "proc", "/tmp", "proc", 0, 0)
    out["remount /code rw"] = sc(165, 0, "/code", 0, 0x20 | 0x1000, 0)
    out["umount2 /code"] = sc(166, "/code", 2)
    os.makedirs("/tmp/newroot/old", exist_ok=True)
    out["pivot_root"] = sc(155, "/tmp/newroot", "/tmp/newroot/old")
    out["chroot"] = sc(161, "/tmp")
    attr = ctypes.create_string_buffer(struct.pack("IIII", 2, 4, 4, 1), 72)
    out["bpf map_create"] = sc(321, 0, attr, 72)
    out["keyctl get_keyring_id"] = sc(250, 0, -3, 0)
    out["add_key"] = sc(248, "user", "refinery-attack", "secret", 6, -2)
    out["request_key"] = sc(249, "user", "refinery-attack", 0, 0)
    out["io_uring_setup"] = sc(425, 4, ctypes.create_string_buffer(120))
    perf = ctypes.create_string_buffer(128)
    struct.pack_into("IIQ", perf, 0, 1, 128, 0)
    out["perf_event_open"] = sc(298, perf, 0, -1, -1, 0)
    out["userfaultfd"] = sc(323, 0)
    out["userfaultfd user-mode-only"] = sc(323, 1)
    out["kexec_load"] = sc(246, 0, 0, 0, 0)
    out["kexec_file_load"] = sc(320, -1, -1, 0, "", 0)
    out["init_module"] = sc(175, 0, 0, "")
    out["finit_module"] = sc(313, 0, "", 0)
    out["delete_module"] = sc(176, "ext4", 0)
    out["reboot"] = sc(169, 0xfee1dead, 672274793, 0x4321FEDC, 0)
    out["clock_settime"] = sc(227, 0, ctypes.create_string_buffer(16))
    out["settimeofday"] = sc(164, ctypes.create_string_buffer(16), 0)
    out["swapon"] = sc(167, "/tmp/swap", 0)
    out["swapoff"] = sc(168, "/tmp/swap")
    out["sethostname"] = sc(170, "pwned", 5)
    out["setdomainname"] = sc(171, "pwned", 5)
    out["acct"] = sc(163, "/tmp/acct")
    out["iopl"] = sc(172, 3)
    out["ioperm"] = sc(173, 0, 1024, 1)
    out["syslog read"] = sc(103, 3, ctypes.create_string_buffer(4096), 4096)
    out["setuid(0)"] = sc(105, 0)
    out["setgid(0)"] = sc(106, 0)
    out["capset full"] = sc(126, ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0), 8),
                            ctypes.create_string_buffer(struct.pack("IIIIII", *([0xffffffff] * 6)), 24))
    return out

def main(block_input, backpack):
    return {
        "unshare": {k: in_child(lambda f=f: sc(272, f)) for k, f in NEW.items()},
        "unshare NEWUSER|NEWNS": in_child(lambda: sc(272, NEW["NEWUSER"] | NEW["NEWNS"])),
        "unshare NEWTIME": in_child(lambda: sc(272, 0x80)),
        "clone": {k: in_child(lambda f=f: raw_clone(f)) for k, f in NEW.items()},
        "clone3 NEWUSER": in_child(lambda: clone3(NEW["NEWUSER"])),
        "clone3 plain": in_child(lambda: clone3(0)),
        "setns": {ns: in_child(lambda ns=ns: setns(ns)) for ns in sorted(os.listdir("/proc/self/ns"))},
        "kernel": in_child(kernel),
    }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn namespace_mount_and_kernel_syscalls_are_refused() {
    let server = Server::start().await;
    let (_, key) = server.account("mallory").await;
    deploy(&server, &key, "kern", &[b("k", "python", py(KERNEL), "")]).await;
    let mut report = run(&server, &key, "kern", "k", json!(null)).await;
    // setns into one's own user namespace is EINVAL from the kernel: also a refusal.
    if report["setns"]["user"] == "EINVAL" {
        report["setns"]["user"] = json!("EPERM");
    }
    // clone3 without namespace flags is an ordinary fork: ENOSYS (filtered, so that libc falls
    // back to clone, whose flags the filter can inspect) or "ok" are both fine.
    let plain = report
        .as_object_mut()
        .expect("report")
        .remove("clone3 plain");
    assert!(
        plain == Some(json!("ok")) || plain == Some(json!("ENOSYS")),
        "{plain:?}"
    );
    let gaps = not_in(&report, DENIED);
    server.assert_still_serving().await;
    assert!(gaps.is_empty(), "not refused: {gaps:#?}\n{report}");
}

// ---------------------------------------------------------------------------------------------
// Writing outside /tmp, device nodes, chmod/chown, setuid binaries.

const WRITES: &str = r#"
def main(block_input, backpack):
    create, overwrite, other = {}, {}, {}
    for d in ["/", "/code", "/runtime", "/usr", "/usr/bin", "/etc", "/dev", "/bin", "/lib", "/proc"]:
        create[d] = attempt(lambda d=d: os.close(os.open(os.path.join(d, "pwned"), os.O_CREAT | os.O_WRONLY, 0o644)))
    code = "/code/" + os.listdir("/code")[0]
    for f in [code, "/runtime/python_shim.py", "/runtime/node_shim.cjs", "/etc/passwd", "/etc/hosts",
              "/usr/bin/python3", "/etc/ld.so.cache"]:
        overwrite[f] = attempt(lambda f=f: os.close(os.open(f, os.O_WRONLY)))
    other["unlink shim"] = attempt(os.unlink, "/runtime/python_shim.py")
    other["rename /code"] = attempt(os.rename, "/code", "/tmp/code")
    other["symlink in /etc"] = attempt(os.symlink, "/tmp", "/etc/evil")
    other["chmod /etc/passwd"] = attempt(os.chmod, "/etc/passwd", 0o666)
    other["chmod /tmp"] = attempt(os.chmod, "/tmp", 0o777)
    open("/tmp/mine", "w").close()
    other["chown to root"] = attempt(os.chown, "/tmp/mine", 0, 0)
    other["chown /etc/passwd"] = attempt(os.chown, "/etc/passwd", os.getuid(), os.getgid())
    other["mknod char /dev/mem"] = attempt(os.mknod, "/tmp/mem", 0o600 | 0o020000, os.makedev(1, 1))
    other["mknod block"] = attempt(os.mknod, "/tmp/disk", 0o600 | 0o060000, os.makedev(254, 0))
    # A fifo in /tmp is harmless and allowed; setting the setuid bit on one's own file is allowed
    # too (the mount is nosuid); neither is checked.
    # setuid binaries: none grants root.
    setuid = {}
    for cmd in (["/usr/bin/su", "-c", "id -u", "root"], ["/usr/bin/passwd", "-S", "root"]):
        if os.path.exists(cmd[0]):
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
            setuid[cmd[0]] = {"code": p.returncode, "out": (p.stdout + p.stderr).decode(errors="replace")[:300]}
    # A setuid copy in /tmp (nosuid mount, and no_new_privs): the child's euid is unchanged.
    import shutil
    shutil.copy(sys.executable, "/tmp/py")
    os.chmod("/tmp/py", 0o4755)
    try:
        p = subprocess.run(["/tmp/py", "-c", "import os; print(os.geteuid(), os.getegid())"], capture_output=True)
        setuid["/tmp/py"] = p.stdout.decode().split()
    except OSError as e:
        # Executing from /tmp refused altogether: no setuid either.
        setuid["/tmp/py"] = ename(e.errno)
    return {"create": create, "overwrite": overwrite, "other": other, "setuid": setuid,
            "uid": os.getuid(), "gid": os.getgid()}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn writes_outside_tmp_device_nodes_and_setuid_tricks_fail() {
    let server = Server::start().await;
    let (_, key) = server.account("mallory").await;
    deploy(&server, &key, "fs", &[b("w", "python", py(WRITES), "")]).await;
    let r = run(&server, &key, "fs", "w", json!(null)).await;
    let read_only = ["EROFS", "EACCES", "EPERM"];
    for group in ["create", "overwrite", "other"] {
        for (what, result) in r[group].as_object().expect("group") {
            // /proc's root refuses creation with ENOENT.
            let ok = read_only.contains(&result.as_str().unwrap_or("ok"))
                || (what == "/proc" && result == "ENOENT")
                || (what == "rename /code" && result == "EXDEV");
            assert!(ok, "{group} {what} = {result}: {r}");
        }
    }
    for what in ["mknod char /dev/mem", "mknod block", "chown to root"] {
        assert_eq!(r["other"][what], "EPERM", "{what}: {r}");
    }
    let (uid, gid) = (r["uid"].to_string(), r["gid"].to_string());
    let copy = &r["setuid"]["/tmp/py"];
    assert!(
        *copy == json!([uid, gid]) || DENIED.contains(&copy.as_str().unwrap_or("ok")),
        "a setuid copy in /tmp changed the euid: {r}"
    );
    for (bin, result) in r["setuid"].as_object().expect("setuid") {
        if bin == "/tmp/py" {
            continue;
        }
        let out = result["out"].as_str().unwrap_or_default();
        assert!(
            !out.lines().any(|l| l.trim() == "0") && !out.contains("uid=0"),
            "{bin} ran as root: {r}"
        );
        if bin == "/usr/bin/su" {
            assert_ne!(result["code"], 0, "su succeeded: {r}");
        }
    }
    server.assert_still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// Resource exhaustion: /tmp, processes, threads, memory, CPU.

const FILL_TMP: &str = r#"
def main(block_input, backpack):
    if block_input == "check":
        return {"alive": True, "tmp": sorted(os.listdir("/tmp"))}
    written, error = 0, None
    chunk = b"x" * (1 << 20)
    try:
        with open("/tmp/fill", "wb") as f:
            for _ in range(256):
                f.write(chunk)
                f.flush()
                written += len(chunk)
    except OSError as e:
        error = ename(e.errno)
    return {"written_mb": written >> 20, "error": error}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn filling_tmp_stops_at_tmp_mb_and_the_instance_still_answers() {
    let server = Server::start().await;
    let (_, key) = server.account("mallory").await;
    deploy(
        &server,
        &key,
        "fill",
        &[b(
            "f",
            "python",
            py(FILL_TMP),
            "tmp_mb = 16\nmemory_mb = 256",
        )],
    )
    .await;
    let r = run(&server, &key, "fill", "f", json!("fill")).await;
    assert!(
        ["ENOSPC", "EFBIG"].contains(&r["error"].as_str().unwrap_or("none")),
        "{r}"
    );
    assert!(r["written_mb"].as_u64().unwrap_or(999) <= 16, "{r}");
    let check = server.invoke_ok(&key, "fill", "f", json!("check")).await;
    assert_eq!(check["status"], "ok", "{check}");
    assert_eq!(check["cold"], false, "{check}");
    server.assert_still_serving().await;
}

const BOMBS: &str = r#"
def fork_bomb():
    r, w = os.pipe()
    children, error = [], None
    for _ in range(500):
        try:
            pid = os.fork()
        except OSError as e:
            error = ename(e.errno)
            break
        if pid == 0:
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        children.append(pid)
    os.close(w)
    for pid in children:
        os.waitpid(pid, 0)
    return {"forked": len(children), "error": error}

def thread_bomb():
    release = threading.Event()
    threads, error = [], None
    for _ in range(500):
        t = threading.Thread(target=release.wait, daemon=True)
        try:
            t.start()
        except RuntimeError as e:
            error = str(e)
            break
        threads.append(t)
    release.set()
    for t in threads:
        t.join()
    return {"threads": len(threads), "error": error}

def main(block_input, backpack):
    return {"fork": in_child(fork_bomb), "thread": thread_bomb()}
"#;

const SHELL_BOMB: &str = r#"
bomb() { bomb | bomb & }
bomb
sleep 600
"#;

#[tokio::test(flavor = "multi_thread")]
async fn fork_and_thread_bombs_hit_the_pids_limit() {
    let server = Server::start().await;
    let (_, key) = server.account("mallory").await;
    deploy(
        &server,
        &key,
        "bombs",
        &[
            b("py", "python", py(BOMBS), ""),
            b("sh", "shell", SHELL_BOMB.to_string(), "timeout_s = 3"),
        ],
    )
    .await;
    let r = run(&server, &key, "bombs", "py", json!(null)).await;
    assert!(r["fork"]["forked"].as_u64().unwrap_or(999) < 64, "{r}");
    assert_eq!(r["fork"]["error"], "EAGAIN", "{r}");
    assert!(r["thread"]["threads"].as_u64().unwrap_or(999) < 64, "{r}");
    assert!(r["thread"]["error"].is_string(), "{r}");
    // The instance recovered (its children were released) and answers again.
    let again = server.invoke_ok(&key, "bombs", "py", json!(null)).await;
    assert_eq!(again["status"], "ok", "{again}");

    // The shell bomb ends at its timeout with the instance killed, or earlier as an error:
    // when the pids limit stops the shell runner from reading the script's output (the runner
    // kills the bomb and says so), or the script itself from forking its last command (it
    // exits with "Cannot fork"). Either way the limit held and the instance stays usable.
    let sh = server.invoke_ok(&key, "bombs", "sh", json!(null)).await;
    match sh["status"].as_str() {
        Some("timeout") => assert!(server.instances_of("bombs", "sh").await.is_empty()),
        Some("error") => assert!(
            sh["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("process limit"))
                || sh["logs"]
                    .as_str()
                    .is_some_and(|l| l.contains("Cannot fork")),
            "{sh}"
        ),
        _ => panic!("unexpected outcome of a shell fork bomb: {sh}"),
    }
    server.assert_still_serving().await;
}

const MEMORY_BOMB: &str = r#"
def main(block_input, backpack):
    hoard = []
    if block_input == "tmp":
        with open("/tmp/hoard", "wb") as f:
            for _ in range(480):
                f.write(b"x" * (1 << 20))
        return "wrote 480 MB to /tmp with memory_mb = 128"
    if block_input == "child":
        pid = os.fork()
        if pid == 0:
            while True:
                hoard.append(bytearray(16 << 20))
        os.waitpid(pid, 0)
        return "child done"
    while True:
        hoard.append(bytearray(16 << 20))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn memory_bombs_end_in_oom_and_the_platform_carries_on() {
    let server = Server::start().await;
    let (_, key) = server.account("mallory").await;
    deploy(
        &server,
        &key,
        "mem",
        &[b(
            "hog",
            "python",
            py(MEMORY_BOMB),
            "memory_mb = 128\ntmp_mb = 512",
        )],
    )
    .await;
    let heap = server.invoke_ok(&key, "mem", "hog", json!("heap")).await;
    assert_eq!(heap["status"], "oom", "{heap}");
    // /tmp is memory: filling it past memory_mb must not succeed either.
    let tmp = server.invoke_ok(&key, "mem", "hog", json!("tmp")).await;
    assert_ne!(tmp["status"], "ok", "/tmp escaped the memory limit: {tmp}");
    // A child's allocation is charged to the instance too.
    let child = server.invoke_ok(&key, "mem", "hog", json!("child")).await;
    eprintln!("info: memory bomb in a child process: {}", child["status"]);
    assert!(server.instances_of("mem", "hog").await.len() <= 1);
    server.assert_still_serving().await;
}

const SPIN: &str = r#"
def main(block_input, backpack):
    if os.fork() == 0:
        while True:
            pass
    while True:
        pass
"#;

#[tokio::test(flavor = "multi_thread")]
async fn cpu_spin_past_the_timeout_is_killed_with_all_its_processes() {
    let server = Server::start().await;
    let (_, key) = server.account("mallory").await;
    deploy(
        &server,
        &key,
        "spin",
        &[b("s", "python", py(SPIN), "timeout_s = 3")],
    )
    .await;
    let watch = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if let Some(i) = server.instances_of("spin", "s").await.first() {
                let cgroups = i["cgroups"].as_array().cloned().unwrap_or_default();
                let pids = cgroup_pids(&cgroups);
                if pids.len() >= 2 {
                    return (pids, cgroups);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (Vec::new(), Vec::new())
    };
    let (reply, (pids, cgroups)) =
        tokio::join!(server.invoke_ok(&key, "spin", "s", json!(null)), watch);
    assert_eq!(reply["status"], "timeout", "{reply}");
    assert!(
        pids.len() >= 2,
        "never saw the spinning processes: {pids:?}"
    );
    let gone = eventually(Duration::from_secs(15), || {
        pids.iter().all(|p| !process_alive(*p))
    })
    .await;
    assert!(gone, "processes outlived the timeout: {pids:?}");
    assert!(cgroup_pids(&cgroups).is_empty());
    server.assert_still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// Processes left behind after an invocation.

const LINGER: &str = r#"
def heartbeat():
    try:
        return open("/tmp/hb").read()
    except OSError:
        return None

def main(block_input, backpack):
    if block_input == "check":
        first = heartbeat()
        time.sleep(1)
        return {"pids": own_pids(), "moving": heartbeat() != first, "hb": first}
    sleeper = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            for fd in (0, 1, 2):
                os.close(fd)
            n = 0
            while True:
                n += 1
                with open("/tmp/hb.new", "w") as f:
                    f.write(str(n))
                os.rename("/tmp/hb.new", "/tmp/hb")
                time.sleep(0.02)
        os._exit(0)
    os.waitpid(pid, 0)
    os.close(w)
    daemon = int(os.read(r, 64))
    subprocess.run(["/bin/sh", "-c", "sleep 1000 >/dev/null 2>&1 &"])
    return {"sleeper": sleeper.pid, "daemon": daemon, "pids": own_pids()}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn processes_left_running_do_not_survive_the_invocation() {
    let server = Server::start().await;
    let (_, key) = server.account("mallory").await;
    deploy(&server, &key, "linger", &[b("l", "python", py(LINGER), "")]).await;
    let started = run(&server, &key, "linger", "l", json!("start")).await;
    let leftovers: Vec<i64> = [&started["sleeper"], &started["daemon"]]
        .iter()
        .filter_map(|v| v.as_i64())
        .collect();
    assert_eq!(leftovers.len(), 2, "{started}");

    let instance = server
        .instances_of("linger", "l")
        .await
        .into_iter()
        .next()
        .expect("instance");
    let cgroups = instance["cgroups"].as_array().cloned().unwrap_or_default();
    // On the host: nothing but the instance's init (and its shim) stays in its cgroup.
    let mut host_view = Vec::new();
    let cleaned = eventually(Duration::from_secs(10), || {
        host_view = cgroup_pids(&cgroups)
            .into_iter()
            .map(|p| (p, namespace_pid(p)))
            .collect::<Vec<_>>();
        host_view.len() <= 2
            && host_view
                .iter()
                .all(|(_, ns)| ns.is_none_or(|ns| !leftovers.contains(&ns)))
    })
    .await;
    let frozen = common::cgroup_frozen(&cgroups);
    let details: Vec<String> = host_view
        .iter()
        .map(|(p, _)| {
            let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
            let keep = [
                "State", "PPid", "Uid", "SigPnd", "ShdPnd", "SigBlk", "SigIgn",
            ];
            let status: Vec<&str> = status
                .lines()
                .filter(|l| keep.iter().any(|k| l.starts_with(k)))
                .collect();
            format!("{p}: {} {status:?}", String::from_utf8_lossy(&cmdline))
        })
        .collect();
    assert!(
        cleaned,
        "processes left running in the instance after its reply (host pid, pid in the instance): \
         {host_view:?}; instance frozen: {frozen:?}; started: {started}; {details:#?}"
    );

    // Inside: the next invocation sees none of them, and the heartbeat stopped.
    let check = run(&server, &key, "linger", "l", json!("check")).await;
    let pids: Vec<i64> = check["pids"]
        .as_array()
        .expect("pids")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    assert!(
        leftovers.iter().all(|p| !pids.contains(p)),
        "left-over processes still visible: {check}"
    );
    assert_eq!(
        check["moving"], false,
        "the daemon is still running: {check}"
    );
    server.assert_still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// Network.

const NETWORK: &str = r#"
import fcntl
def connect(host, port):
    def go():
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect((host, port))
    return attempt(go)

def main(block_input, backpack):
    port = block_input["port"]
    tcp = {}
    for host, p in [("127.0.0.1", port), ("127.0.0.1", 22), ("127.0.0.1", 8710), ("::1", port),
                    ("1.1.1.1", 80), ("8.8.8.8", 53), ("169.254.169.254", 80), ("10.0.0.1", 80)]:
        tcp["%s:%d" % (host, p)] = connect(host, p)
    for host in block_input["host_addrs"]:
        tcp["%s:%d" % (host, port)] = connect(host, port)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other = {"udp 1.1.1.1:53": attempt(udp.sendto, b"x", ("1.1.1.1", 53))}
    other["dns"] = attempt(socket.getaddrinfo, "example.com", 80)
    other["raw socket"] = attempt(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    other["raw socket v6"] = attempt(socket.socket, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    other["packet socket"] = attempt(socket.socket, socket.AF_PACKET, socket.SOCK_RAW, 0)
    other["packet dgram"] = attempt(socket.socket, socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other["lo up (SIOCSIFFLAGS)"] = attempt(fcntl.ioctl, s, 0x8914, struct.pack("16sH14x", b"lo", 1))
    ifaces = [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]]
    return {"tcp": tcp, "other": other, "ifaces": ifaces}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_network_is_unreachable() {
    let server = Server::start().await;
    let (_, key) = server.account("mallory").await;
    deploy(&server, &key, "net", &[b("n", "python", py(NETWORK), "")]).await;
    let port: u16 = server
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let addrs = host_addresses();
    let r = run(
        &server,
        &key,
        "net",
        "n",
        json!({ "port": port, "host_addrs": addrs }),
    )
    .await;
    let unreachable = [
        "ENETUNREACH",
        "ECONNREFUSED",
        "EHOSTUNREACH",
        "EADDRNOTAVAIL",
    ];
    for (target, result) in r["tcp"].as_object().expect("tcp") {
        assert!(
            unreachable.contains(&result.as_str().unwrap_or("ok")),
            "{target} = {result}: {r}"
        );
    }
    assert!(
        unreachable.contains(&r["other"]["udp 1.1.1.1:53"].as_str().unwrap_or("ok")),
        "{r}"
    );
    assert_ne!(r["other"]["dns"], "ok", "{r}");
    for what in [
        "raw socket",
        "raw socket v6",
        "packet socket",
        "packet dgram",
        "lo up (SIOCSIFFLAGS)",
    ] {
        // A filtered socket family may also be reported as unsupported.
        let result = r["other"][what].as_str().unwrap_or("ok");
        assert!(
            DENIED.contains(&result) || result == "EAFNOSUPPORT",
            "{what}: {r}"
        );
    }
    assert_eq!(r["ifaces"], json!(["lo"]), "{r}");
    server.assert_still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// IPC between instances.

const IPC_KEY: i64 = 0x5246_4e59;

const LISTENER: &str = r#"
KEY = 0x52464e59
HELD = []
def main(block_input, backpack):
    if not HELD:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind("\0refinery-attack")
        s.listen(8)
        p = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        p.bind("/tmp/refinery-attack.sock")
        p.listen(8)
        HELD.extend([s, p])
        libc.shmget.restype = ctypes.c_int
        shm = libc.shmget(KEY, 4096, 0o1000 | 0o666)
        libc.shmat.restype = ctypes.c_void_p
        addr = libc.shmat(shm, None, 0)
        ctypes.memmove(addr, b"SECRET-SHM", 10)
        msq = libc.msgget(KEY, 0o1000 | 0o666)
        sem = libc.semget(KEY, 1, 0o1000 | 0o666)
        HELD.append((shm, msq, sem))
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    own = attempt(c.connect, "\0refinery-attack")
    return {"ipc_ids": list(HELD[2]), "own_abstract_connect": own}
"#;

const PROBER: &str = r#"
KEY = 0x52464e59
def main(block_input, backpack):
    out = {}
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    out["abstract connect"] = attempt(c.connect, "\0refinery-attack")
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    out["path connect"] = attempt(c.connect, "/tmp/refinery-attack.sock")
    def ipc(call, *args):
        ctypes.set_errno(0)
        r = call(*args)
        return "ok" if r >= 0 else ename(ctypes.get_errno())
    out["shmget"] = ipc(libc.shmget, KEY, 0, 0)
    out["msgget"] = ipc(libc.msgget, KEY, 0)
    out["semget"] = ipc(libc.semget, KEY, 0, 0)
    # Guess ids directly (ids are per IPC namespace).
    out["shmat id 0"] = "ok" if libc.shmat(0, None, 0) not in (None, -1, 2**64 - 1) else ename(ctypes.get_errno())
    out["sysvipc listing"] = open("/proc/sysvipc/shm").read().count("\n") - 1
    return out
"#;

#[tokio::test(flavor = "multi_thread")]
async fn abstract_sockets_and_sysv_ipc_do_not_cross_instances() {
    let server = Server::start().await;
    let (_, key_x) = server.account("victim").await;
    let (_, key_y) = server.account("mallory").await;
    assert_eq!(IPC_KEY, 0x52464e59);
    deploy(
        &server,
        &key_x,
        "ipc",
        &[
            b("listen", "python", py(LISTENER), ""),
            b("probe", "python", py(PROBER), ""),
        ],
    )
    .await;
    deploy(
        &server,
        &key_y,
        "ipc",
        &[b("probe", "python", py(PROBER), "")],
    )
    .await;
    let listener = run(&server, &key_x, "ipc", "listen", json!(null)).await;
    // The attack works where it should: inside the listener's own instance.
    assert_eq!(listener["own_abstract_connect"], "ok", "{listener}");
    for (who, key) in [("other account", &key_y), ("same account", &key_x)] {
        let r = run(&server, key, "ipc", "probe", json!(null)).await;
        assert_eq!(r["abstract connect"], "ECONNREFUSED", "{who}: {r}");
        assert_eq!(r["path connect"], "ENOENT", "{who}: {r}");
        for call in ["shmget", "msgget", "semget"] {
            assert_eq!(r[call], "ENOENT", "{who} {call}: {r}");
        }
        assert_ne!(r["shmat id 0"], "ok", "{who}: {r}");
        assert_eq!(r["sysvipc listing"], 0, "{who}: {r}");
    }
    server.assert_still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// The protocol: forged frames, malformed frames, floods.

const FAKE_STDOUT: &str = r#"
def main(block_input, backpack):
    fake = json.dumps({"type": "result", "output": "forged", "backpack": {}, "logs": "", "logs_truncated": False}).encode()
    frame = struct.pack(">I", len(fake)) + fake
    sys.stdout.buffer.write(frame) if hasattr(sys.stdout, "buffer") else None
    os.write(1, frame)
    os.write(2, frame)
    return "real"
"#;

const BAD_FRAME: &str = r#"
def main(block_input, backpack):
    if block_input == "malformed":
        os.write(4, struct.pack(">I", 10) + b"not json!!")
    elif block_input == "huge":
        os.write(4, b"\xff\xff\xff\xff")
    elif block_input == "wrong-type":
        body = json.dumps({"type": "ready", "init_ms": 1}).encode()
        os.write(4, struct.pack(">I", len(body)) + body)
    elif block_input == "forged":
        body = json.dumps({"type": "result", "output": "forged", "backpack": {}, "logs": "", "logs_truncated": False}).encode()
        os.write(4, struct.pack(">I", len(body)) + body)
    elif block_input == "forged-id":
        # Guesses the id: 1 is the first invocation of a fresh instance.
        body = json.dumps({"type": "result", "id": 1, "output": "forged", "backpack": {}, "logs": "", "logs_truncated": False}).encode()
        os.write(4, struct.pack(">I", len(body)) + body)
    elif block_input == "eof":
        os.close(4)
        os.close(3)
    return "real"
"#;

const NODE_BAD_FRAME: &str = r#"
const fs = require('fs');
exports.main = () => {
  fs.writeSync(4, Buffer.concat([Buffer.from([0, 0, 0, 9]), Buffer.from('garbage!!')]));
  return 'real';
};
"#;

const SHELL_FD4: &str = r#"
printf 'garbage-frame' >&4 2>/dev/null
printf 'garbage-frame' >&3 2>/dev/null
echo '"real"'
"#;

const FLOOD: &str = r#"
def main(block_input, backpack):
    if block_input == "logs":
        line = "x" * 1023 + "\n"
        for _ in range(50 * 1024):
            sys.stdout.write(line)
        return "flooded"
    return "y" * (20 << 20)
"#;

#[tokio::test(flavor = "multi_thread")]
async fn forged_and_malformed_protocol_frames_only_hurt_their_own_instance() {
    let server = Server::start().await;
    let (_, key) = server.account("mallory").await;
    deploy(
        &server,
        &key,
        "proto",
        &[
            b("fake", "python", py(FAKE_STDOUT), ""),
            b("bad", "python", py(BAD_FRAME), ""),
            b("nodebad", "node", NODE_BAD_FRAME.to_string(), ""),
            b("shfd", "shell", SHELL_FD4.to_string(), ""),
            b("flood", "python", py(FLOOD), "memory_mb = 512"),
        ],
    )
    .await;
    // Fake frames on stdout/stderr are just logs.
    let fake = run(&server, &key, "proto", "fake", json!(null)).await;
    assert_eq!(fake, "real");

    for (input, expected) in [
        ("malformed", "crashed"),
        ("huge", "crashed"),
        ("wrong-type", "crashed"),
        ("eof", "crashed"),
    ] {
        let r = server.invoke_ok(&key, "proto", "bad", json!(input)).await;
        assert_eq!(r["status"], expected, "{input}: {r}");
        assert!(
            server.instances_of("proto", "bad").await.is_empty(),
            "{input}: the instance was kept"
        );
    }
    let node = server
        .invoke_ok(&key, "proto", "nodebad", json!(null))
        .await;
    assert_eq!(node["status"], "crashed", "{node}");

    // A forged result frame without the invocation's id breaks the protocol: the instance
    // is discarded and the next invocation starts clean.
    let forged = server
        .invoke_ok(&key, "proto", "bad", json!("forged"))
        .await;
    assert_eq!(forged["status"], "crashed", "{forged}");
    let next = server.invoke_ok(&key, "proto", "bad", json!(null)).await;
    assert_eq!(next["cold"], true, "{next}");
    assert_ne!(next["status"], "crashed", "{next}");
    // A wrong guess of the id (the warm instance is past invocation 1) is the same.
    let wrong = server
        .invoke_ok(&key, "proto", "bad", json!("forged-id"))
        .await;
    assert_eq!(wrong["status"], "crashed", "{wrong}");
    // A right guess (first invocation of a fresh instance) only forges its own reply; the
    // block's real reply can never be served for a later invocation: that one fails and
    // the instance goes.
    let guessed = server
        .invoke_ok(&key, "proto", "bad", json!("forged-id"))
        .await;
    assert_eq!(guessed["cold"], true, "{guessed}");
    let after = server.invoke_ok(&key, "proto", "bad", json!(null)).await;
    assert_eq!(
        after["status"], "crashed",
        "a stale reply was served: {after}"
    );
    assert!(server.instances_of("proto", "bad").await.is_empty());

    // The shell runner keeps the protocol pipes away from the script.
    let sh = server.invoke_ok(&key, "proto", "shfd", json!(null)).await;
    assert_eq!(sh["status"], "ok", "{sh}");
    assert_eq!(sh["output"], "real", "{sh}");

    // Floods: logs are cut at 256 KiB, an oversized output is an error, not a server problem.
    let logs = server
        .invoke_ok(&key, "proto", "flood", json!("logs"))
        .await;
    assert_eq!(logs["status"], "ok", "{}", logs["error"]);
    assert!(logs["logs"].as_str().unwrap_or_default().len() <= 256 * 1024);
    let id = logs["execution_id"].as_str().expect("id");
    let (status, record) = server
        .request("GET", &format!("/v1/executions/{id}"), Some(&key), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(record["logs_truncated"], true, "{}", record["status"]);
    let big = server.invoke_ok(&key, "proto", "flood", json!("big")).await;
    assert_eq!(big["status"], "error", "{}", big["error"]);
    assert!(big["output"].is_null());
    server.assert_still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// Environment injection (LD_PRELOAD, NODE_OPTIONS) stays within its own instance.

const PRELOAD_C: &str = r#"
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void evil(void) { setenv("PRELOADED", "yes", 1); }
"#;

const PRELOAD: &str = r#"
C_SOURCE = __C__
def main(block_input, backpack):
    if block_input == "build":
        with open("/tmp/evil.c", "w") as f:
            f.write(C_SOURCE)
        if not os.path.exists("/usr/bin/gcc"):
            return {"built": False}
        p = subprocess.run(["/usr/bin/gcc", "-shared", "-fPIC", "-o", "/tmp/evil.so", "/tmp/evil.c"],
                           capture_output=True, env={"PATH": "/usr/bin:/bin", "TMPDIR": "/tmp"})
        with open("/tmp/evil.js", "w") as f:
            f.write("process.env.PRELOADED = 'yes';")
        return {"built": p.returncode == 0, "err": p.stderr.decode()[-500:]}
    child = subprocess.run(["/bin/sh", "-c", "echo ${PRELOADED:-no}"], capture_output=True)
    return {"child": child.stdout.decode().strip(), "ld_preload": os.environ.get("LD_PRELOAD")}
"#;

const CLEAN_PY: &str = r#"
import os, subprocess
def main(block_input, backpack):
    child = subprocess.run(["/bin/sh", "-c", "echo ${PRELOADED:-no}"], capture_output=True)
    return {"child": child.stdout.decode().strip(), "env": sorted(os.environ),
            "evil": os.path.exists("/tmp/evil.so")}
"#;

const CLEAN_NODE: &str = r#"
exports.main = () => ({ preloaded: process.env.PRELOADED || 'no', env: Object.keys(process.env).sort() });
"#;

#[tokio::test(flavor = "multi_thread")]
async fn ld_preload_and_node_options_only_affect_their_own_instance() {
    let server = Server::start().await;
    let (_, key_x) = server.account("mallory").await;
    let (_, key_y) = server.account("victim").await;
    let code = py(PRELOAD).replace("__C__", &format!("{PRELOAD_C:?}"));
    deploy(
        &server,
        &key_x,
        "inject",
        &[b(
            "evil",
            "python",
            code,
            r#"env = { LD_PRELOAD = "/tmp/evil.so", NODE_OPTIONS = "--require /tmp/evil.js" }"#,
        )],
    )
    .await;
    deploy(
        &server,
        &key_y,
        "clean",
        &[
            b("py", "python", CLEAN_PY.to_string(), ""),
            b("js", "node", CLEAN_NODE.to_string(), ""),
        ],
    )
    .await;
    let built = run(&server, &key_x, "inject", "evil", json!("build")).await;
    if built["built"] == true {
        // The preload works inside the attacker's own instance (its own env, its own /tmp).
        let own = run(&server, &key_x, "inject", "evil", json!("use")).await;
        assert_eq!(own["child"], "yes", "{own}");
    } else {
        eprintln!("info: no gcc in the sandbox, preload not built: {built}");
    }
    let py = run(&server, &key_y, "clean", "py", json!(null)).await;
    assert_eq!(py["child"], "no", "{py}");
    assert_eq!(py["evil"], false, "{py}");
    assert!(
        !py.to_string().contains("LD_PRELOAD") && !py.to_string().contains("NODE_OPTIONS"),
        "{py}"
    );
    let js = run(&server, &key_y, "clean", "js", json!(null)).await;
    assert_eq!(js["preloaded"], "no", "{js}");
    assert!(!js.to_string().contains("NODE_OPTIONS"), "{js}");
    server.assert_still_serving().await;
}
