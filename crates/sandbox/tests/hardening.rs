//! The hardening layers, proved from inside real instances: the seccomp deny list (every row),
//! Landlock, the masked /proc, the pid-1 reaper, and the per-account memory backstop. Must run
//! as root on a host with cgroups (v1, v2 or hybrid).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use refinery_sandbox::{seccomp_deny_list, Entry, ExitReport};

/// Runs a script inside an instance; returns (what it wrote to fd 4, logs, exit report).
trait RunScript {
    fn python(&self, script: &str) -> (String, String, ExitReport);
    fn sh(&self, script: &str) -> (String, String, ExitReport);
}

impl RunScript for TestHost {
    fn python(&self, script: &str) -> (String, String, ExitReport) {
        self.run(&self.spec(Entry::Exec {
            argv: vec!["/usr/bin/python3".into(), "-c".into(), script.into()],
        }))
    }

    fn sh(&self, script: &str) -> (String, String, ExitReport) {
        self.run(&self.spec(Entry::Exec {
            argv: vec!["/bin/sh".into(), "-c".into(), format!("exec >&4; {script}")],
        }))
    }
}

/// `name errno` lines → map.
fn parse_results(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Python prelude: `sys(nr, *args)` returns 0/result or -errno via ctypes.
const PY_SYSCALL: &str = "\
import ctypes, os, sys, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if r < 0:
        return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
    return 'ok'
out = []
";

#[test]
fn every_unconditional_seccomp_denial_fails_with_its_errno() {
    let t = test_host();
    // All-zero arguments: seccomp answers before the kernel looks at them. For many rows the
    // kernel's own answer would differ (unshare(0), ptrace(TRACEME), settimeofday(NULL, NULL),
    // iopl(0) and modify_ldt(0, NULL, 0) succeed; clone3(NULL, 0) is EINVAL; setns(0, 0) EINVAL;
    // removed syscalls ENOSYS; ...), so a matching errno proves the filter.
    let rows: Vec<_> = seccomp_deny_list()
        .into_iter()
        .filter(|d| !d.by_argument)
        .filter_map(|d| d.number.map(|n| (d.syscall, n, d.errno)))
        .collect();
    assert!(rows.len() > 50, "{rows:?}");
    let mut script = PY_SYSCALL.to_string();
    for (name, nr, _) in &rows {
        script.push_str(&format!(
            "out.append('{name} ' + call({nr}, 0, 0, 0, 0, 0, 0))\n"
        ));
    }
    script.push_str("os.write(4, '\\n'.join(out).encode())\n");
    let (out, logs, report) = t.python(&script);
    let results = parse_results(&out);
    assert_eq!(results.len(), rows.len(), "out: {out}\nlogs: {logs}");
    let errname = |e: i32| match e {
        0 => "ok",
        libc::EPERM => "EPERM",
        libc::ENOSYS => "ENOSYS",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        _ => "?",
    };
    let wrong: Vec<String> = rows
        .iter()
        .filter(|(name, _, errno)| results.get(*name).map(String::as_str) != Some(errname(*errno)))
        .map(|(name, _, errno)| {
            format!(
                "{name}: got {:?}, want {}",
                results.get(*name),
                errname(*errno)
            )
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(report.exit, "exit 0", "logs: {logs}");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn seccomp_argument_rules_and_normal_work() {
    let t = test_host();
    let script = format!(
        "{PY_SYSCALL}\
import socket, threading, subprocess, asyncio
def sock(*a):
    try:
        socket.socket(*a).close(); return 'ok'
    except OSError as e:
        return errno.errorcode[e.errno]
# clone(2) with a namespace flag (x86_64: 56); a child that slipped through exits at once.
for name, flag in [('newuser', 0x10000000), ('newnet', 0x40000000), ('newns', 0x20000), ('newpid', 0x20000000)]:
    r = libc.syscall(ctypes.c_long(56), ctypes.c_long(flag | 17), ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
    if r == 0:
        os._exit(0)
    out.append(f'clone_{{name}} ' + (errno.errorcode[ctypes.get_errno()] if r < 0 else 'ok'))
out.append('clone3 ' + call(435, 0, 0))
out.append('x32_getpid ' + call(0x40000000 | 39))
out.append('personality_no_aslr ' + call(135, 0x0040000))
out.append('personality_query ' + call(135, 0xffffffff))
out.append('af_packet ' + sock(17, socket.SOCK_RAW, 0))
out.append('af_packet_dgram ' + sock(17, socket.SOCK_DGRAM, 0))
out.append('af_vsock ' + sock(40, socket.SOCK_STREAM, 0))
out.append('af_alg ' + sock(38, socket.SOCK_SEQPACKET, 0))
out.append('inet_raw ' + sock(socket.AF_INET, socket.SOCK_RAW, 1))
out.append('inet_raw_cloexec ' + sock(socket.AF_INET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 1))
out.append('inet6_raw ' + sock(socket.AF_INET6, socket.SOCK_RAW, 58))
out.append('inet_packet ' + sock(socket.AF_INET, 10, 0))
out.append('netlink_uevent ' + sock(socket.AF_NETLINK, socket.SOCK_RAW, 15))
out.append('netlink_route ' + sock(socket.AF_NETLINK, socket.SOCK_RAW, 0))
out.append('unix ' + sock(socket.AF_UNIX, socket.SOCK_STREAM))
out.append('inet_tcp ' + sock(socket.AF_INET, socket.SOCK_STREAM))
out.append('inet6_udp ' + sock(socket.AF_INET6, socket.SOCK_DGRAM))
# Normal work.
a, b = socket.socketpair(); a.send(b'x'); out.append('socketpair ' + ('ok' if b.recv(1) == b'x' else 'bad'))
try:
    socket.create_connection(('127.0.0.1', 9), timeout=1); out.append('connect reached')
except OSError as e:
    out.append('connect ' + errno.errorcode.get(e.errno, 'timeout'))
res = []
ts = [threading.Thread(target=lambda i=i: res.append(i)) for i in range(8)]
[x.start() for x in ts]; [x.join() for x in ts]
out.append('threads ' + ('ok' if sorted(res) == list(range(8)) else 'bad'))
p = subprocess.run(['/bin/sh', '-c', 'echo $((6*7)) | cat; ls / >/dev/null; date >/dev/null'], capture_output=True)
out.append('subprocess ' + p.stdout.decode().strip())
pid = os.fork()
if pid == 0:
    os._exit(3)
out.append('fork ' + str(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])))
r, w = os.pipe(); os.write(w, b'p'); out.append('pipe ' + os.read(r, 1).decode())
async def main():
    await asyncio.sleep(0.01); return 'ok'
out.append('asyncio ' + asyncio.run(main()))
os.write(4, '\\n'.join(out).encode())
"
    );
    let (out, logs, report) = t.python(&script);
    let r = parse_results(&out);
    let expect = [
        ("clone_newuser", "EPERM"),
        ("clone_newnet", "EPERM"),
        ("clone_newns", "EPERM"),
        ("clone_newpid", "EPERM"),
        ("clone3", "ENOSYS"),
        ("x32_getpid", "ENOSYS"),
        ("personality_no_aslr", "EPERM"),
        ("personality_query", "ok"),
        ("af_packet", "EAFNOSUPPORT"),
        ("af_packet_dgram", "EAFNOSUPPORT"),
        ("af_vsock", "EAFNOSUPPORT"),
        ("af_alg", "EAFNOSUPPORT"),
        ("inet_raw", "EPERM"),
        ("inet_raw_cloexec", "EPERM"),
        ("inet6_raw", "EPERM"),
        ("inet_packet", "EPERM"),
        ("netlink_uevent", "EPERM"),
        ("netlink_route", "ok"),
        ("unix", "ok"),
        ("inet_tcp", "ok"),
        ("inet6_udp", "ok"),
        ("socketpair", "ok"),
        ("connect", "ENETUNREACH"),
        ("threads", "ok"),
        ("subprocess", "42"),
        ("fork", "3"),
        ("pipe", "p"),
        ("asyncio", "ok"),
    ];
    for (k, v) in expect {
        assert_eq!(
            r.get(k).map(String::as_str),
            Some(v),
            "{k}\nout: {out}\nlogs: {logs}"
        );
    }
    assert_eq!(report.exit, "exit 0", "logs: {logs}");
}

#[test]
fn node_runs_with_workers_and_child_processes() {
    let t = test_host();
    let script = "\
const { Worker } = require('node:worker_threads');
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const w = new Worker('require(\"node:worker_threads\").parentPort.postMessage(6 * 7)', { eval: true });
w.on('message', (m) => {
  const sh = execFileSync('/bin/sh', ['-c', 'echo hi | tr a-z A-Z']).toString().trim();
  fs.writeFileSync('/tmp/x', 'y');
  const ifs = Object.keys(os.networkInterfaces()).join(',');
  fs.writeSync(4, `worker=${m} sh=${sh} tmp=${fs.readFileSync('/tmp/x')} ifs=${ifs}`);
  w.terminate();
});
";
    let (out, logs, report) = t.run(&t.spec(Entry::Exec {
        argv: vec!["/usr/bin/node".into(), "-e".into(), script.into()],
    }));
    assert_eq!(out, "worker=42 sh=HI tmp=y ifs=", "logs: {logs}");
    assert_eq!(report.exit, "exit 0", "logs: {logs}");
}

#[test]
fn landlock_confines_writes_and_exec_beyond_the_mount_table() {
    let t = test_host();
    let Some(abi) = t.host.landlock_abi() else {
        eprintln!("kernel without Landlock: nothing to prove");
        return;
    };
    assert!(abi >= 1);
    // The mounts would allow all of these: /proc is read-write and the instance owns its proc
    // files. Landlock denies them, while /tmp stays fully usable (including running what a block
    // unpacks there).
    let script = "\
grep -E ' /proc | /tmp ' /proc/self/mountinfo | awk '{print $5, $6}'
echo x > /proc/self/comm 2>/dev/null && echo comm=written || echo comm=denied
echo 0 > /proc/self/oom_score_adj 2>/dev/null && echo oom=written || echo oom=denied
cp /bin/true /tmp/t && chmod +x /tmp/t && { /tmp/t 2>/dev/null && echo exec=ran || echo exec=denied; }
echo data > /tmp/f && cat /tmp/f && mkdir /tmp/d && mv /tmp/f /tmp/d/g && rm -r /tmp/d && echo tmp=ok
echo z > /dev/null && head -c 4 /dev/zero | wc -c && echo dev=ok
head -c1 /etc/passwd && echo && /usr/bin/env true && echo usr=ok
python3 -c 'import os, subprocess; fd = os.memfd_create(\"m\"); os.dup2(fd, 1); subprocess.run([\"sh\", \"-c\", \"echo via-proc > /dev/stdout\"]); os.write(4, os.pread(fd, 64, 0))'
";
    let (out, logs, _) = t.sh(script);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() >= 2, "{out}\nlogs: {logs}");
    let opts = |mnt: &str| -> String {
        lines[..2]
            .iter()
            .find_map(|l| l.strip_prefix(mnt))
            .unwrap_or_default()
            .to_string()
    };
    assert!(opts("/proc ").starts_with("rw"), "{out}");
    assert!(opts("/tmp ").starts_with("rw"), "{out}");
    assert!(!opts("/tmp ").contains("noexec"), "{out}");
    assert_eq!(
        &lines[2..],
        [
            "comm=denied",
            "oom=denied",
            "exec=ran",
            "data",
            "tmp=ok",
            "4",
            "dev=ok",
            "r",
            "usr=ok",
            "via-proc"
        ],
        "logs: {logs}"
    );
}

#[test]
fn sensitive_proc_files_are_masked() {
    let t = test_host();
    let script = "\
for f in /proc/kallsyms /proc/keys /proc/timer_list /proc/kcore /proc/sched_debug /proc/sysrq-trigger /proc/config.gz; do
  test -e $f && echo \"$f $(cat $f 2>&1 | wc -c)\"
done
for d in /proc/acpi /proc/scsi /proc/asound; do test -d $d && echo \"$d $(ls -A $d | wc -l)\"; done
awk '$5 ~ \"^/proc/(sys|bus|fs|irq|acpi)$\" {split($6, o, \",\"); print $5, o[1]}' /proc/self/mountinfo
";
    let (out, logs, _) = t.sh(script);
    let host_has = |p: &str| Path::new(p).exists();
    for f in [
        "/proc/kallsyms",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/kcore",
        "/proc/config.gz",
    ] {
        if host_has(f) {
            assert!(
                out.contains(&format!("{f} 0\n")),
                "{f} not empty: {out}\nlogs: {logs}"
            );
        }
    }
    if host_has("/proc/acpi") {
        assert!(out.contains("/proc/acpi 0\n"), "{out}");
        assert!(out.contains("/proc/acpi ro\n"), "{out}");
    }
    for d in ["/proc/sys", "/proc/bus", "/proc/fs", "/proc/irq"] {
        if host_has(d) {
            assert!(
                out.contains(&format!("{d} ro\n")),
                "{d} not read-only: {out}"
            );
        }
    }
}

#[test]
fn the_entry_is_pid2_and_its_exit_status_is_the_instances() {
    let t = test_host();
    let (out, logs, report) = t.sh("echo $$ $PPID; grep -E '^Seccomp' /proc/self/status; exit 7");
    // Filter mode, one filter per (table, errno) group — quiet: ENOSYS and 0; deny list: EPERM
    // and EAFNOSUPPORT — + the x32 guard (x86_64).
    let filters = if cfg!(target_arch = "x86_64") { 5 } else { 4 };
    assert_eq!(
        out,
        format!("2 1\nSeccomp:\t2\nSeccomp_filters:\t{filters}\n"),
        "logs: {logs}"
    );
    assert_eq!(report.exit, "exit 7");
    // The reaper holds none of the instance's fds: the host sees EOF when the entry dies even
    // though a background process still holds its stdout (it dies with the namespace).
    let started = Instant::now();
    let (out, _, report) = t.sh("sleep 1000 & echo started");
    assert_eq!(out, "started\n");
    assert_eq!(report.exit, "exit 0");
    assert!(started.elapsed() < Duration::from_secs(10));
    let (out, _, report) = t.sh("kill -9 $$");
    assert_eq!(out, "");
    assert_eq!(report.exit, "exit 137", "128 + SIGKILL");
}

#[test]
fn orphans_are_reaped_and_never_pile_up() {
    let t = test_host();
    // 100 double-forked orphans with pids.max 64: only possible if pid 1 reaps them.
    let (out, logs, report) = t.sh(
        "i=0; while [ $i -lt 100 ]; do ( /bin/true & ) || echo fork-failed; i=$((i+1)); done; \
         sleep 0.3; echo zombies=$(cat /proc/[0-9]*/stat 2>/dev/null | awk '$3 == \"Z\"' | wc -l); \
         kill -9 1 2>/dev/null; echo reaper-alive=$(test -d /proc/1 && echo yes)",
    );
    assert_eq!(out, "zombies=0\nreaper-alive=yes\n", "logs: {logs}");
    assert_eq!(report.exit, "exit 0");
}

#[test]
fn group_memory_limit_caps_the_account() {
    let t = test_host();
    t.host
        .set_group_limits(GROUP, Some(48))
        .expect("set limits");
    let group_dirs: Vec<PathBuf> = t
        .host
        .cgroup_root_paths()
        .iter()
        .map(|r| r.join(GROUP))
        .collect();
    let limit = |dirs: &[PathBuf]| -> Vec<String> {
        dirs.iter()
            .flat_map(|d| ["memory.limit_in_bytes", "memory.max"].map(|f| d.join(f)))
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .map(|s| s.trim().to_string())
            .collect()
    };
    assert_eq!(limit(&group_dirs), [(48u64 << 20).to_string()]);
    // The instance's own limit (128 MB) would allow it; the account's (48 MB) does not.
    let spec = t.spec(Entry::Exec {
        argv: vec![
            "/usr/bin/python3".into(),
            "-c".into(),
            "b = bytearray(96 * 1024 * 1024); import os; os.write(4, b'survived')".into(),
        ],
    });
    let (out, _, report) = t.run(&spec);
    assert_eq!(out, "");
    assert!(report.oom_killed, "{report:?}");
    // Raising (memsw first on v1) and removing the limit work too.
    t.host.set_group_limits(GROUP, Some(512)).expect("raise");
    assert_eq!(limit(&group_dirs), [(512u64 << 20).to_string()]);
    let (out, _, _) = t.run(&spec);
    assert_eq!(out, "survived");
    t.host.set_group_limits(GROUP, None).expect("unlimited");
    let unlimited = limit(&group_dirs);
    assert!(
        unlimited == ["max"] || unlimited[0].parse::<u64>().is_ok_and(|b| b > 1 << 50),
        "{unlimited:?}"
    );
    assert!(t.host.set_group_limits("../x", Some(1)).is_err());
}
