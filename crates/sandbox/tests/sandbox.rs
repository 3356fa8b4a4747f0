//! End-to-end tests of the sandbox. Must run as root on a host with cgroups (v1, v2 or hybrid).

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use refinery_sandbox::{Entry, FreezerState, InstanceSpec, SandboxError, SandboxHost, Spawned};

#[test]
fn entry_is_pid2_hostname_and_workdir() {
    let t = test_host();
    let (out, logs, report) =
        t.run_sh("echo pid=$$; cat /proc/sys/kernel/hostname; pwd; cat /etc/hostname; cat /code/main.sh /runtime/runtime.txt");
    assert_eq!(
        out, "pid=2\nrefinery\n/tmp\nrefinery\necho from-code\nrt\n",
        "logs: {logs}"
    );
    assert_eq!(report.exit, "exit 0");
    assert!(!report.oom_killed);
}

#[test]
fn environment_is_exactly_base_plus_block_env() {
    let t = test_host();
    let mut spec = t.spec(Entry::Exec {
        argv: vec![
            "/usr/bin/python3".into(),
            "-c".into(),
            "import os; os.write(4, '\\n'.join(sorted(f'{k}={v}' for k, v in os.environ.items())).encode())".into(),
        ],
    });
    spec.env.insert("FOO".into(), "bar baz".into());
    spec.env.insert("SECRET_TOKEN".into(), "s3".into());
    let (out, logs, _) = t.run(&spec);
    assert_eq!(
        out,
        "FOO=bar baz\nHOME=/tmp\nLANG=C.UTF-8\nPATH=/usr/local/bin:/usr/bin:/bin\nSECRET_TOKEN=s3\nTMPDIR=/tmp",
        "logs: {logs}"
    );
}

#[test]
fn uid_is_unprivileged_and_unique_per_instance() {
    let t = test_host();
    let script = "id -u; id -g; id -G; grep CapEff /proc/self/status; grep NoNewPrivs /proc/self/status; whoami";
    let a = t.spawn(&t.spec(sh(script)));
    let b = t.spawn(&t.spec(sh(script)));
    let out_a = read_to_end(a.channels.responses);
    let out_b = read_to_end(b.channels.responses);
    let lines_a: Vec<&str> = out_a.lines().collect();
    let lines_b: Vec<&str> = out_b.lines().collect();
    assert_eq!(lines_a.len(), 6, "output: {out_a}");
    let uid_a: u32 = lines_a[0].parse().expect("uid");
    let uid_b: u32 = lines_b[0].parse().expect("uid");
    assert_ne!(uid_a, 0);
    assert_ne!(uid_a, uid_b);
    assert_eq!(Some(uid_a), a.instance.uid());
    assert_eq!(lines_a[1], lines_a[0], "gid = uid");
    assert_eq!(lines_a[2], lines_a[0], "no supplementary groups");
    assert_eq!(lines_a[3], "CapEff:\t0000000000000000");
    assert_eq!(lines_a[4], "NoNewPrivs:\t1");
    assert_eq!(lines_a[5], "sandbox");
}

#[test]
fn root_is_read_only_and_tmp_is_private() {
    let t = test_host();
    let script = "for p in /x /usr/x /etc/x /code/x /runtime/x /dev/x; do touch $p 2>/dev/null && echo WROTE $p; done; \
                  ls /tmp; echo hello > /tmp/marker && cat /tmp/marker; stat -c %a /tmp; \
                  dd if=/dev/zero of=/tmp/big bs=1M count=64 2>/dev/null; echo dd=$?; echo ok > /dev/null && echo devnull-ok";
    let (out_a, logs, _) = t.run_sh(script);
    assert_eq!(out_a, "hello\n1777\ndd=1\ndevnull-ok\n", "logs: {logs}");
    // A second instance sees an empty /tmp (the first one's marker is not there).
    let (out_b, logs, _) = t.run_sh("ls -A /tmp; echo end");
    assert_eq!(out_b, "end\n", "logs: {logs}");
}

#[test]
fn host_is_invisible() {
    let t = test_host();
    let state = t.state.path().display().to_string();
    let code = t.code.path().display().to_string();
    let script = format!(
        "for p in /root /work /home /sys /var /boot /srv /opt /mnt /run /etc/shadow /dev/sda /dev/vda {state} {code} /proc/1/root/work; do \
           test -e $p && echo VISIBLE $p; done; ls /; ls /dev; ls /proc > /tmp/procs; grep -c '^[0-9]' /tmp/procs"
    );
    let (out, logs, _) = t.run_sh(&script);
    let mut lines = out.lines();
    let visible: Vec<&str> = out.lines().filter(|l| l.starts_with("VISIBLE")).collect();
    assert!(visible.is_empty(), "{visible:?}\nlogs: {logs}");
    let root: Vec<&str> = lines.by_ref().take_while(|l| *l != "fd").collect();
    let mut root_sorted = root.clone();
    root_sorted.sort();
    // `ls /` lists these, then `ls /dev` starts with "fd".
    assert!(
        root_sorted.starts_with(&["bin", "code", "dev", "etc"]),
        "{root:?}"
    );
    for name in &root {
        assert!(
            [
                "bin", "code", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "runtime",
                "sbin", "tmp", "usr"
            ]
            .contains(name),
            "unexpected top-level entry {name}"
        );
    }
    let rest: Vec<&str> = lines.collect();
    assert_eq!(
        rest,
        ["full", "null", "random", "stderr", "stdin", "stdout", "urandom", "zero", "3"],
        "ls /dev (after fd) and process count while `ls /proc` ran (reaper, sh, ls)"
    );
}

#[test]
fn no_network_but_a_down_loopback() {
    let t = test_host();
    let (out, logs, _) = t.run(&t.spec(Entry::Exec {
        argv: vec![
            "/usr/bin/python3".into(),
            "-c".into(),
            "import socket, fcntl, struct, os\n\
             names = [n for _, n in socket.if_nameindex()]\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             flags = struct.unpack('16sH', fcntl.ioctl(s.fileno(), 0x8913, struct.pack('16sH', b'lo', 0)))[1]\n\
             dev = [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]]\n\
             try:\n    socket.create_connection(('1.1.1.1', 53), timeout=1); net = 'reachable'\n\
             except OSError as e:\n    net = 'unreachable'\n\
             os.write(4, f'{names} {dev} up={flags & 1} {net}'.encode())"
                .into(),
        ],
    }));
    assert_eq!(out, "['lo'] ['lo'] up=0 unreachable", "logs: {logs}");
}

#[test]
fn memory_hog_is_oom_killed() {
    let t = test_host();
    let mut spec = t.spec(Entry::Exec {
        argv: vec![
            "/usr/bin/python3".into(),
            "-c".into(),
            "b = bytearray(400 * 1024 * 1024); import os; os.write(4, b'survived')".into(),
        ],
    });
    spec.memory_mb = 64;
    let Spawned { instance, channels } = t.spawn(&spec);
    let out = read_to_end(channels.responses);
    assert_eq!(out, "");
    assert!(instance.oom_killed(), "oom_killed() before destroy");
    let report = instance.destroy().expect("destroy");
    assert!(report.oom_killed);
    // The OOM killer killed the entry (pid 2); the reaper exits with 128 + SIGKILL.
    assert!(
        report.exit == "exit 137" || report.exit == "signal 9",
        "{}",
        report.exit
    );
}

#[test]
fn freeze_and_thaw() {
    let t = test_host();
    // An echo server over the runtime channels: reads fd 3, answers on fd 4.
    let spec = t.spec(Entry::Exec {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "while read -r line <&3; do echo \"got $line\" >&4; done".into(),
        ],
    });
    let Spawned { instance, channels } = t.spawn(&spec);
    let mut requests = File::from(channels.requests);
    let mut responses = File::from(channels.responses.try_clone().expect("dup"));
    let mut buf = [0u8; 64];

    requests.write_all(b"one\n").expect("write");
    let n = responses.read(&mut buf).expect("read");
    assert_eq!(&buf[..n], b"got one\n");

    assert_eq!(
        instance.freezer_state().expect("state"),
        FreezerState::Thawed
    );
    instance.freeze().expect("freeze");
    let deadline = Instant::now() + Duration::from_secs(5);
    while instance.freezer_state().expect("state") != FreezerState::Frozen
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        instance.freezer_state().expect("state"),
        FreezerState::Frozen
    );
    requests.write_all(b"two\n").expect("write");
    assert!(
        !readable(&channels.responses, Duration::from_millis(300)),
        "a frozen instance answered"
    );
    instance.thaw().expect("thaw");
    assert_eq!(
        instance.freezer_state().expect("state"),
        FreezerState::Thawed
    );
    assert!(readable(&channels.responses, Duration::from_secs(5)));
    let n = responses.read(&mut buf).expect("read");
    assert_eq!(&buf[..n], b"got two\n");

    // Destroying a frozen instance works too (v1 needs a thaw for SIGKILL to land).
    instance.freeze().expect("freeze");
    let report = instance.destroy().expect("destroy");
    assert_eq!(report.exit, "signal 9");
}

#[test]
fn destroy_kills_everything_and_removes_cgroups() {
    let t = test_host();
    let Spawned { instance, channels } =
        t.spawn(&t.spec(sh("sleep 1000 & sleep 1000 & echo started; wait")));
    let mut responses = File::from(channels.responses);
    let mut buf = [0u8; 8];
    let n = responses.read(&mut buf).expect("read");
    assert_eq!(&buf[..n], b"started\n");

    let paths = instance.cgroup_paths();
    assert!(!paths.is_empty());
    let mut pids: Vec<i32> = Vec::new();
    for p in &paths {
        if let Ok(procs) = std::fs::read_to_string(p.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.parse::<i32>().ok()));
        }
    }
    pids.sort();
    pids.dedup();
    assert!(
        pids.contains(&instance.pid()),
        "init {} in {pids:?}",
        instance.pid()
    );
    assert_eq!(pids.len(), 4, "reaper + sh + 2 sleeps: {pids:?}");
    // Memory limit and pids limit really are set.
    let limits: Vec<String> = paths
        .iter()
        .flat_map(|p| ["memory.limit_in_bytes", "memory.max", "pids.max"].map(|f| p.join(f)))
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|s| s.trim().to_string())
        .collect();
    assert!(
        limits.contains(&(128u64 * 1024 * 1024).to_string()),
        "{limits:?}"
    );
    assert!(limits.contains(&"64".to_string()), "{limits:?}");
    let cpu: Vec<String> = paths
        .iter()
        .flat_map(|p| ["cpu.cfs_quota_us", "cpu.max"].map(|f| p.join(f)))
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|s| s.trim().to_string())
        .collect();
    assert!(
        cpu.iter().any(|c| c == "100000" || c == "100000 100000"),
        "{cpu:?}"
    );

    let report = instance.destroy().expect("destroy");
    assert_eq!(report.exit, "signal 9");
    for pid in &pids {
        assert!(!process_exists(*pid), "pid {pid} survived destroy");
    }
    for p in &paths {
        assert!(!p.exists(), "{} survived destroy", p.display());
    }
    // Idempotent.
    assert_eq!(instance.destroy().expect("destroy again"), report);
    // The responses pipe reaches EOF: every writer is gone.
    let mut rest = String::new();
    responses.read_to_string(&mut rest).expect("read");
    assert_eq!(rest, "");
}

#[test]
fn drop_destroys() {
    let t = test_host();
    let Spawned { instance, channels } = t.spawn(&t.spec(sh("echo up; sleep 1000")));
    let mut buf = [0u8; 3];
    File::from(channels.responses)
        .read_exact(&mut buf)
        .expect("read");
    let (pid, paths) = (instance.pid(), instance.cgroup_paths());
    drop(instance);
    assert!(!process_exists(pid));
    assert!(paths.iter().all(|p| !p.exists()));
}

#[test]
fn cleanup_stale_removes_leftovers() {
    let t = test_host();
    let Spawned { instance, channels } = t.spawn(&t.spec(sh("sleep 1000 & echo up; wait")));
    let mut buf = [0u8; 3];
    File::from(channels.responses)
        .read_exact(&mut buf)
        .expect("read");
    let (pid, paths) = (instance.pid(), instance.cgroup_paths());
    // Simulate a crash: the instance is never destroyed.
    std::mem::forget(instance);
    // A "restarted" host with the same cgroup root.
    let again = SandboxHost::detect(config(
        t.state.path(),
        t.host.cgroup_root_paths()[0]
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned(),
    ))
    .expect("detect");
    assert_eq!(again.cleanup_stale().expect("cleanup"), 1);
    // SAFETY: reaps our own (now killed) child so it does not linger as a zombie.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    assert!(!process_exists(pid));
    for p in &paths {
        assert!(!p.exists(), "{} survived cleanup", p.display());
        assert!(
            !p.parent().expect("group").exists(),
            "group dir survived cleanup"
        );
    }
    assert_eq!(again.cleanup_stale().expect("cleanup"), 0);
}

#[test]
fn builtin_entry_runs_unprivileged() {
    let t = test_host();
    let (out, logs, report) = t.run(&t.spec(Entry::Builtin {
        name: "echo".into(),
        args: vec!["hi".into(), "there".into()],
    }));
    let uid = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("uid="))
        .and_then(|u| u.parse::<u32>().ok());
    assert!(out.starts_with("hi there uid="), "{out} logs: {logs}");
    assert!(
        uid.is_some_and(|u| u >= refinery_sandbox::FIRST_UID),
        "{out}"
    );
    assert!(out.ends_with("home=/tmp\n"), "{out}");
    assert_eq!(report.exit, "exit 0");
}

#[test]
fn setup_failure_is_reported_on_the_log_pipe() {
    let t = test_host();
    let (out, logs, report) = t.run(&t.spec(Entry::Exec {
        argv: vec!["/code/does-not-exist".into()],
    }));
    assert_eq!(out, "");
    assert!(
        logs.contains("refinery-sandbox: execve /code/does-not-exist"),
        "{logs}"
    );
    assert_eq!(report.exit, "exit 125");
}

#[test]
fn invalid_specs_are_rejected() {
    let t = test_host();
    let mut spec = t.spec(sh("true"));
    spec.instance_id = "../escape".into();
    assert!(matches!(
        t.host.spawn(&spec),
        Err(SandboxError::InvalidSpec(_))
    ));
    let mut spec = t.spec(Entry::Exec {
        argv: vec!["relative".into()],
    });
    spec.group = "ok".into();
    assert!(matches!(
        t.host.spawn(&spec),
        Err(SandboxError::InvalidSpec(_))
    ));
    let state = tempfile::tempdir().expect("tempdir");
    let err = SandboxHost::detect(config(state.path(), "a/b".into())).expect_err("bad root name");
    assert!(err.to_string().contains("cgroup_root_name"), "{err}");
    assert!(!t.host.cgroup_layout().to_string().is_empty());
}

/// Not a test on its own: the "server" process of `instances_die_with_the_server`.
#[test]
#[ignore = "helper process started by instances_die_with_the_server"]
fn helper_server_process() {
    let (Ok(root), Ok(state), Ok(code)) = (
        std::env::var("REFINERY_SANDBOX_HELPER_ROOT"),
        std::env::var("REFINERY_SANDBOX_HELPER_STATE"),
        std::env::var("REFINERY_SANDBOX_HELPER_CODE"),
    ) else {
        return;
    };
    let host = SandboxHost::detect(config(Path::new(&state), root)).expect("detect");
    let spec = InstanceSpec {
        instance_id: "orphan".into(),
        group: "acct".into(),
        code_dir: code.clone().into(),
        shared_dir: None,
        runtime_dir: code.into(),
        entry: sh("sleep 1000 & echo up; wait"),
        env: BTreeMap::new(),
        memory_mb: 64,
        tmp_mb: 4,
        pids_max: 16,
        cpu_percent: 50,
        network: false,
        extra_mounts: Vec::new(),
    };
    let spawned = host.spawn(&spec).expect("spawn");
    let mut buf = [0u8; 3];
    File::from(spawned.channels.responses.try_clone().expect("dup"))
        .read_exact(&mut buf)
        .expect("read");
    println!("PID {}", spawned.instance.pid());
    std::io::stdout().flush().expect("flush");
    std::mem::forget(spawned);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn instances_die_with_the_server() {
    use std::io::BufRead;
    let state = tempfile::tempdir().expect("tempdir");
    let code = tempfile::tempdir().expect("tempdir");
    let root = unique("refinery-test");
    let mut server = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "helper_server_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("REFINERY_SANDBOX_HELPER_ROOT", &root)
        .env("REFINERY_SANDBOX_HELPER_STATE", state.path())
        .env("REFINERY_SANDBOX_HELPER_CODE", code.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start helper");
    let stdout = server.stdout.take().expect("stdout");
    let helper_pid = server.id() as i32;
    std::thread::spawn(move || {
        // Watchdog: never hang the suite if the helper fails to report.
        std::thread::sleep(Duration::from_secs(30));
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(helper_pid, libc::SIGKILL) };
    });
    let pid: i32 = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.split("PID ").nth(1).and_then(|p| p.trim().parse().ok()))
        .expect("helper printed the init pid");
    assert!(process_exists(pid));
    server.kill().expect("kill helper");
    server.wait().expect("wait helper");
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_exists(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!process_exists(pid), "instance outlived its server");
    // The crashed server's cgroups are what cleanup_stale is for.
    let host = SandboxHost::detect(config(state.path(), root)).expect("detect");
    assert_eq!(host.cleanup_stale().expect("cleanup"), 1);
    for r in host.cgroup_root_paths() {
        std::fs::remove_dir(&r).expect("root dir empty after cleanup");
    }
}

#[test]
fn handles_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<SandboxHost>();
    assert_send_sync::<refinery_sandbox::SandboxedInstance>();
}

#[test]
fn pids_limit_is_enforced() {
    let t = test_host();
    let mut spec = t.spec(Entry::Exec {
        argv: vec![
            "/usr/bin/python3".into(),
            "-c".into(),
            "import os, time\n\
             n, err = 0, None\n\
             try:\n\
             \x20   for i in range(20):\n\
             \x20       if os.fork() == 0:\n\
             \x20           time.sleep(100); os._exit(0)\n\
             \x20       n += 1\n\
             except OSError as e:\n\
             \x20   err = e.errno\n\
             os.write(4, f'{n} {err}'.encode())"
                .into(),
        ],
    });
    spec.pids_max = 6;
    let (out, logs, _) = t.run(&spec);
    assert_eq!(
        out, "4 11",
        "reaper + python + 4 children, then EAGAIN; logs: {logs}"
    );
}
