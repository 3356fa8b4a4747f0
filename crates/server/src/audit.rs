//! The security audit trail: reads the kernel's records of refused syscalls back from
//! `/dev/kmsg` and attributes each to an instance (account, project, block).
//!
//! Every instance's seccomp deny list is installed with `SECCOMP_FILTER_FLAG_LOG`, so each
//! syscall it refuses leaves a kernel audit record (`audit: type=1326 … uid=<instance uid>
//! … comm="python3" … syscall=272 … code=0x50000`); its quiet answers (`clone3` → ENOSYS so
//! libc falls back to `clone`, `sync`/`syncfs` → 0) are installed without it and leave none. With no audit daemon the kernel prints
//! those records to its log, where this watcher reads them: from the log's current end
//! (history is skipped: it may name uids of another run), as a task waiting on the
//! non-blocking device (`AsyncFd`), so it costs nothing while nothing is refused.
//!
//! For each record it logs a `tracing` warning (target `refinery::audit`), counts
//! `refinery_refused_syscalls_total{account,project,block}` and stores a row
//! (`store/src/audit.rs`, bounded per account) that `GET /v1/audit` lists.
//!
//! What it cannot see: the kernel rate-limits these records (printk's rate limit, 10 per
//! 5 s by default, and the audit backlog); it says how many it dropped in
//! `kauditd_printk_skb: N callbacks suppressed` lines, counted as
//! `refinery_audit_records_suppressed_total`. Only records of uids in this server's uid blocks
//! are its own (each Refinery process on a host claims distinct blocks, `sandbox/src/uid.rs`):
//! any other record (another server's instance) is ignored, at debug level. A record of this
//! server's blocks whose uid no instance holds (or held in the last [`REMEMBER`]) is stored
//! without account and counted as `refinery_refused_syscalls_unattributed_total`. When an
//! audit daemon (auditd) runs, the records go to it instead of the kernel log, and this trail
//! stays empty. Without `/dev/kmsg` (a container without it) the server starts anyway and
//! warns once.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use refinery_pool::InstancePool;
use refinery_sandbox::{owns_uid, seccomp_deny_list};
use refinery_store::{SecurityEvent, Store};
use tokio::io::unix::AsyncFd;

/// The kernel log device.
pub const KMSG: &str = "/dev/kmsg";

/// How long a gone instance's uid still attributes late records to it. Uids are handed out
/// round-robin over this server's uid blocks (at least 4,096 uids before one is reused, see
/// the sandbox's `uid.rs`); a record arrives within milliseconds of its call.
const REMEMBER: Duration = Duration::from_secs(600);

/// How often the uid → instance map is refreshed while no record arrives, so an instance
/// that refuses a call and dies at once is still known when its record is read.
const REFRESH: Duration = Duration::from_secs(1);

/// Audit record type of a seccomp action (`AUDIT_SECCOMP`).
const AUDIT_SECCOMP: &str = "1326";

/// The audit architecture of this build's syscall table (`AUDIT_ARCH_*`).
#[cfg(target_arch = "x86_64")]
const NATIVE_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const NATIVE_ARCH: u32 = 0xc000_00b7;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const NATIVE_ARCH: u32 = 0;

/// One seccomp audit record, as the kernel printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompRecord {
    /// The record's own timestamp (`audit(SECONDS.MILLIS:SERIAL)`), ms since the epoch.
    pub at_ms: i64,
    pub uid: u32,
    pub pid: Option<i32>,
    pub comm: String,
    pub arch: u32,
    pub syscall: i64,
    /// The filter's action (`SECCOMP_RET_ACTION_FULL` bits; the errno is not in it).
    pub code: u32,
}

/// What one `/dev/kmsg` record is to the watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KmsgLine {
    Seccomp(SeccompRecord),
    /// `kauditd_printk_skb: N callbacks suppressed`: N audit records the kernel dropped.
    Suppressed(u64),
    /// Anything else (including malformed seccomp records).
    Other,
}

/// Parses one `/dev/kmsg` record: `PRIO,SEQ,USEC,FLAGS[,...];MESSAGE` followed by optional
/// continuation lines (` KEY=VALUE`), or a bare message (as `dmesg` prints it).
pub fn parse_kmsg(record: &str) -> KmsgLine {
    let first_line = record.lines().next().unwrap_or("");
    let message = match first_line.split_once(';') {
        Some((prefix, message)) if prefix.split(',').count() >= 4 => message,
        _ => first_line,
    };
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("kauditd_printk_skb:") {
        return match rest.trim().strip_suffix("callbacks suppressed") {
            Some(n) => n
                .trim()
                .parse()
                .map_or(KmsgLine::Other, KmsgLine::Suppressed),
            None => KmsgLine::Other,
        };
    }
    parse_seccomp(message).map_or(KmsgLine::Other, KmsgLine::Seccomp)
}

fn parse_seccomp(message: &str) -> Option<SeccompRecord> {
    let message = message
        .strip_prefix("audit:")
        .unwrap_or(message)
        .trim_start();
    let rest = message.strip_prefix("type=")?;
    let (kind, rest) = rest.split_once(' ')?;
    if kind != AUDIT_SECCOMP {
        return None;
    }
    let rest = rest.trim_start().strip_prefix("audit(")?;
    let (stamp, rest) = rest.split_once("):")?;
    let (time, _serial) = stamp.split_once(':')?;
    let (secs, millis) = time.split_once('.')?;
    let at_ms = secs
        .parse::<i64>()
        .ok()?
        .checked_mul(1000)?
        .checked_add(millis.parse::<i64>().ok().filter(|m| *m < 1000)?)?;
    let fields = fields(rest);
    let get = |key: &str| fields.get(key).map(String::as_str);
    Some(SeccompRecord {
        at_ms,
        uid: get("uid")?.parse().ok()?,
        pid: get("pid").and_then(|p| p.parse().ok()),
        comm: get("comm").unwrap_or("?").to_string(),
        arch: u32::from_str_radix(get("arch")?, 16).ok()?,
        syscall: get("syscall")?.parse().ok()?,
        code: u32::from_str_radix(get("code")?.strip_prefix("0x")?, 16).ok()?,
    })
}

/// `key=value` pairs separated by spaces; a value is `"quoted"` (no quotes inside) or bare.
/// The kernel hex-encodes an untrusted string (`comm`, `exe`) that would need escaping;
/// such a bare all-hex value of a string field is decoded back.
fn fields(text: &str) -> HashMap<&str, String> {
    let mut out = HashMap::new();
    let mut rest = text.trim_start();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((value, next)) => (value.to_string(), next),
                None => (quoted.to_string(), ""),
            }
        } else {
            let (value, next) = after.split_once(' ').unwrap_or((after, ""));
            let decoded = match key {
                "comm" | "exe" => decode_hex(value).unwrap_or_else(|| value.to_string()),
                _ => value.to_string(),
            };
            (decoded, next)
        };
        if !key.is_empty() && !key.contains(' ') {
            out.insert(key, value);
        }
        rest = next.trim_start();
    }
    out
}

fn decode_hex(value: &str) -> Option<String> {
    if value.is_empty() || !value.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..value.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(value.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Names syscall numbers and actions from the sandbox's own deny table.
pub struct SyscallNames {
    by_number: HashMap<i64, (&'static str, i32)>,
}

impl Default for SyscallNames {
    fn default() -> Self {
        SyscallNames {
            by_number: seccomp_deny_list()
                .into_iter()
                .filter_map(|d| Some((d.number?, (d.syscall, d.errno))))
                .collect(),
        }
    }
}

impl SyscallNames {
    /// The syscall's name: from the deny table, or `syscall N` (with the x32 bit or a
    /// foreign architecture said so).
    pub fn name(&self, record: &SeccompRecord) -> String {
        const X32_BIT: i64 = 0x4000_0000;
        if record.arch != NATIVE_ARCH {
            return format!("syscall {} (arch {:x})", record.syscall, record.arch);
        }
        if let Some((name, _)) = self.by_number.get(&record.syscall) {
            return (*name).to_string();
        }
        if record.syscall & X32_BIT != 0 {
            return format!("x32 syscall {}", record.syscall & !X32_BIT);
        }
        format!("syscall {}", record.syscall)
    }

    /// What the filter did: `errno EPERM`, `kill_process`, ...
    pub fn action(&self, record: &SeccompRecord) -> String {
        match record.code {
            0x0005_0000 => {
                let errno = if record.arch != NATIVE_ARCH {
                    None
                } else if record.syscall & 0x4000_0000 != 0 {
                    Some(ENOSYS)
                } else {
                    self.by_number.get(&record.syscall).map(|(_, e)| *e)
                };
                match errno {
                    Some(errno) => format!("errno {}", errno_name(errno)),
                    None => "errno".into(),
                }
            }
            0x8000_0000 => "kill_process".into(),
            0x0000_0000 => "kill_thread".into(),
            0x0003_0000 => "trap".into(),
            0x7fc0_0000 => "user_notif".into(),
            0x7ff0_0000 => "trace".into(),
            0x7ffc_0000 => "log".into(),
            other => format!("action {other:#x}"),
        }
    }
}

const ENOSYS: i32 = 38;

fn errno_name(errno: i32) -> String {
    match errno {
        1 => "EPERM".into(),
        38 => "ENOSYS".into(),
        97 => "EAFNOSUPPORT".into(),
        13 => "EACCES".into(),
        other => other.to_string(),
    }
}

/// Who held a uid.
#[derive(Debug, Clone)]
struct Holder {
    account_id: String,
    project: String,
    block: String,
    instance: String,
    seen: Instant,
}

/// uid → the instance holding it now or lately (for records read after it was destroyed),
/// and the uids of the standby sandboxes starting or waiting now (no account's: their records
/// are the runtime's own start-up). Only those of now: once adopted, a uid's records are the
/// block's, even before the pool lists its instance.
#[derive(Default)]
struct Holders {
    instances: HashMap<u32, Holder>,
    standby: std::collections::HashSet<u32>,
}

impl Holders {
    fn refresh(&mut self, pool: &InstancePool) {
        let now = Instant::now();
        for info in pool.instances() {
            let Some(uid) = info.uid else { continue };
            self.instances.insert(
                uid,
                Holder {
                    account_id: info.account_id,
                    project: info.project,
                    block: info.block,
                    instance: info.id,
                    seen: now,
                },
            );
        }
        self.instances
            .retain(|_, h| now.duration_since(h.seen) < REMEMBER);
        self.standby = pool.standby_uids().into_iter().collect();
    }
}

/// Whether a watcher of this process is reading the kernel log (the trail is being kept).
static WATCHING: AtomicBool = AtomicBool::new(false);

/// Whether refused syscalls are being recorded (false: no `/dev/kmsg`, or not started yet).
pub fn watching() -> bool {
    WATCHING.load(Ordering::Relaxed)
}

/// Opens the kernel log at its current end, non-blocking.
fn open_kmsg() -> std::io::Result<File> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(KMSG)?;
    file.seek(SeekFrom::End(0))?;
    Ok(file)
}

/// Runs until aborted (the server aborts it at shutdown). Returns at once, after one
/// warning, when `/dev/kmsg` cannot be read.
pub async fn watch(pool: InstancePool, store: Store) {
    let kmsg = match open_kmsg().and_then(|file| {
        // SAFETY: the `File` is moved into the `AsyncFd`, which owns it (and so its fd,
        // open and unchanged) until the `AsyncFd` is dropped.
        unsafe { AsyncFd::register(file) }.map_err(std::io::Error::from)
    }) {
        Ok(kmsg) => kmsg,
        Err(error) => {
            tracing::warn!(target: "refinery::audit", path = KMSG, %error,
                "the audit trail of refused syscalls is unavailable (the kernel still logs them)");
            return;
        }
    };
    tracing::info!(target: "refinery::audit", path = KMSG, "watching for refused syscalls");
    WATCHING.store(true, Ordering::Relaxed);
    let names = SyscallNames::default();
    let mut holders = Holders::default();
    let mut refresh = tokio::time::interval(REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One record per read; the kernel caps a record well below this.
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut guard = tokio::select! {
            ready = kmsg.readable() => match ready {
                Ok(guard) => guard,
                Err(error) => {
                    tracing::warn!(target: "refinery::audit", %error, "reading the kernel log failed; the audit trail stops");
                    WATCHING.store(false, Ordering::Relaxed);
                    return;
                }
            },
            _ = refresh.tick() => {
                holders.refresh(&pool);
                continue;
            }
        };
        let mut records = Vec::new();
        let mut suppressed = 0u64;
        loop {
            match guard.try_io(|fd| fd.get_ref().read(&mut buf)) {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => match parse_kmsg(&String::from_utf8_lossy(&buf[..n])) {
                    KmsgLine::Seccomp(r) if owns_uid(r.uid) => records.push(r),
                    // Another Refinery process's instance (its uid block), or not a sandbox's.
                    KmsgLine::Seccomp(r) => {
                        tracing::debug!(target: "refinery::audit", uid = r.uid, syscall = r.syscall,
                            comm = %r.comm, "refused syscall of a uid outside this server's blocks (not its instance)");
                    }
                    KmsgLine::Suppressed(n) => suppressed += n,
                    _ => {}
                },
                // The ring buffer overwrote records before they were read.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    tracing::warn!(target: "refinery::audit", "kernel log records were overwritten before the audit watcher read them");
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(Err(error)) => {
                    tracing::warn!(target: "refinery::audit", %error, "reading the kernel log failed; the audit trail stops");
                    WATCHING.store(false, Ordering::Relaxed);
                    return;
                }
                // Drained: wait for the next record.
                Err(_would_block) => break,
            }
            if records.len() >= 512 {
                break;
            }
        }
        drop(guard);
        if suppressed > 0 {
            pool.count_suppressed_audit_records(suppressed);
            tracing::warn!(target: "refinery::audit", dropped = suppressed,
                "the kernel rate-limited audit records (refused syscalls among them are not in the trail)");
        }
        if records.is_empty() {
            continue;
        }
        holders.refresh(&pool);
        let events: Vec<SecurityEvent> = records
            .iter()
            .filter_map(|r| attribute(r, &holders, &names, &pool))
            .collect();
        if events.is_empty() {
            continue;
        }
        if let Err(error) = store.record_security_events(&events).await {
            tracing::warn!(target: "refinery::audit", %error, count = events.len(), "storing refused syscalls failed");
        }
    }
}

/// One record → the event stored, after logging and counting it; None for a standby
/// sandbox's record (logged at debug level only: no account's code ran there).
fn attribute(
    record: &SeccompRecord,
    holders: &Holders,
    names: &SyscallNames,
    pool: &InstancePool,
) -> Option<SecurityEvent> {
    let syscall = names.name(record);
    let action = names.action(record);
    let holder = holders.instances.get(&record.uid);
    if holder.is_none() && holders.standby.contains(&record.uid) {
        tracing::debug!(target: "refinery::audit", uid = record.uid, %syscall,
            comm = %record.comm, %action, "refused syscall of a standby sandbox (its runtime starting)");
        return None;
    }
    match holder {
        Some(h) => {
            pool.count_refused_syscall(Some((&h.account_id, &h.project, &h.block)));
            tracing::warn!(target: "refinery::audit", account = %h.account_id, project = %h.project,
                block = %h.block, instance = %h.instance, uid = record.uid, %syscall,
                comm = %record.comm, %action, "refused syscall");
        }
        None => {
            pool.count_refused_syscall(None);
            tracing::warn!(target: "refinery::audit", uid = record.uid, %syscall,
                comm = %record.comm, %action, "refused syscall of an instance no longer known");
        }
    }
    Some(SecurityEvent {
        account_id: holder.map(|h| h.account_id.clone()),
        at_ms: record.at_ms,
        project: holder.map(|h| h.project.clone()),
        block: holder.map(|h| h.block.clone()),
        instance: holder.map(|h| h.instance.clone()),
        uid: i64::from(record.uid),
        syscall,
        comm: record.comm.clone(),
        action,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REAL: &str = "5,25447,10009599968,-;audit: type=1326 audit(1795590032.463:6003): auid=4294967295 uid=134630 gid=134630 ses=4294967295 pid=26133 comm=\"node\" exe=\"/usr/bin/node\" sig=0 arch=c000003e syscall=435 compat=0 ip=0x7f31b72278d9 code=0x50000";
    const DMESG: &str = "audit: type=1326 audit(1795589898.527:5908): auid=4294967295 uid=128600 gid=128600 ses=4294967295 pid=16076 comm=\"python3\" exe=\"/usr/bin/python3.11\" sig=0 arch=c000003e syscall=429 compat=0 ip=0x7f5e02230829 code=0x50000";

    fn seccomp(line: &str) -> SeccompRecord {
        match parse_kmsg(line) {
            KmsgLine::Seccomp(r) => r,
            other => panic!("not a seccomp record: {other:?}"),
        }
    }

    #[test]
    fn parses_real_kmsg_and_dmesg_lines() {
        let r = seccomp(REAL);
        assert_eq!(
            r,
            SeccompRecord {
                at_ms: 1_795_590_032_463,
                uid: 134_630,
                pid: Some(26133),
                comm: "node".into(),
                arch: 0xc000_003e,
                syscall: 435,
                code: 0x50000,
            }
        );
        let r = seccomp(DMESG);
        assert_eq!(
            (r.uid, r.syscall, r.comm.as_str()),
            (128_600, 429, "python3")
        );
        // With continuation lines (the kernel's dictionary) after the message.
        let r = seccomp(&format!("{REAL}\n SUBSYSTEM=x\n"));
        assert_eq!(r.syscall, 435);
    }

    #[test]
    fn names_syscalls_and_actions_from_the_deny_table() {
        let names = SyscallNames::default();
        let mut r = seccomp(REAL);
        if NATIVE_ARCH == 0xc000_003e {
            assert_eq!(names.name(&r), "clone3");
            assert_eq!(names.action(&r), "errno ENOSYS");
            r.syscall = 272;
            assert_eq!(names.name(&r), "unshare");
            assert_eq!(names.action(&r), "errno EPERM");
            r.syscall = 0x4000_0000 | 272;
            assert_eq!(names.name(&r), "x32 syscall 272");
            assert_eq!(names.action(&r), "errno ENOSYS");
        }
        r.syscall = 99_999;
        r.arch = NATIVE_ARCH;
        assert_eq!(names.name(&r), "syscall 99999");
        r.arch = 0x4000_0003;
        r.code = 0x8000_0000;
        assert_eq!(names.name(&r), "syscall 99999 (arch 40000003)");
        assert_eq!(names.action(&r), "kill_process");
    }

    #[test]
    fn decodes_hex_encoded_comm() {
        // comm "a b" needs escaping: the kernel prints it as hex, unquoted.
        let line = DMESG.replace("comm=\"python3\"", "comm=612062");
        assert_eq!(seccomp(&line).comm, "a b");
        // A quoted comm that merely looks like hex stays as it is.
        let line = DMESG.replace("comm=\"python3\"", "comm=\"cafe\"");
        assert_eq!(seccomp(&line).comm, "cafe");
    }

    #[test]
    fn counts_suppressed_records() {
        assert_eq!(
            parse_kmsg("4,24954,9843720903,-;kauditd_printk_skb: 65 callbacks suppressed"),
            KmsgLine::Suppressed(65)
        );
        assert_eq!(
            parse_kmsg("4,1,2,-;kauditd_printk_skb: many callbacks suppressed"),
            KmsgLine::Other
        );
    }

    #[test]
    fn ignores_other_and_malformed_records() {
        for line in [
            "",
            ";",
            "6,1,2,-;eth0: link up",
            // Another audit type.
            "5,1,2,-;audit: type=1400 audit(1795589898.527:1): apparmor=\"DENIED\" uid=100001",
            // Truncated mid-record.
            "5,1,2,-;audit: type=1326 audit(1795589898.527:5908): auid=4294967295 uid=12",
            "5,1,2,-;audit: type=1326 audit(1795589898.527:5908",
            // Bad numbers.
            &DMESG.replace("uid=128600 ", "uid=-1 "),
            &DMESG.replace("syscall=429", "syscall=x"),
            &DMESG.replace("code=0x50000", "code=50000"),
            &DMESG.replace("arch=c000003e", "arch=zz"),
            &DMESG.replace("1795589898.527", "1795589898.5270"),
            &DMESG.replace("1795589898.527", "99999999999999999999.527"),
        ] {
            assert_eq!(parse_kmsg(line), KmsgLine::Other, "{line}");
        }
    }
}
