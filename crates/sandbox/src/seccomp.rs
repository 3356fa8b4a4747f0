//! The syscall filter every instance runs under: default ALLOW, the deny list [`DENY`] and the
//! quiet answers [`QUIET`], kept here as data so a reviewer reads the whole policy in one place.
//!
//! The init installs it (after `no_new_privs`, as the instance's uid) right before the entry
//! runs; every process and thread the instance starts inherits it and can only add filters,
//! never remove one. A call of [`DENY`] fails with the row's errno and leaves a kernel audit
//! record (its filters carry `SECCOMP_FILTER_FLAG_LOG`, below), which the server reads back into
//! its audit trail (`server/src/audit.rs`); a call of [`QUIET`] gets the row's answer and leaves
//! none (its filters are installed without the flag): those are deliberate answers that ordinary
//! code meets every day (glibc tries `clone3` for every thread and `posix_spawn`), and logging
//! them floods the kernel's audit rate limit so that real refusals are dropped. The sandbox test
//! suite proves each row from inside a real instance, and that only [`DENY`] reaches the log.
//!
//! How it is compiled: seccompiler gives one action per filter, so the rows are grouped by
//! (table, errno) and each group becomes one filter. The kernel runs every filter, newest first,
//! and keeps the lowest action (`SECCOMP_RET_ERRNO` for all of these, whatever the errno); among
//! equal actions the first it met — the newest filter's — wins, and the audit record is written
//! or not by that filter's log flag (`kernel/seccomp.c`: `seccomp_run_filters`, `seccomp_log`).
//! The two tables never name the same syscall ([`programs`] refuses it), and the logged filters
//! are installed last, so even a mistake there would log rather than hide a refusal. Every filter
//! starts with seccompiler's architecture check, which kills a process that makes a syscall
//! through another ABI (e.g. 32-bit `int 0x80` on x86_64; kills are always logged), so the deny
//! list cannot be bypassed through the compat table. On x86_64 a hand-written guard (logged: no
//! ordinary code makes x32 calls, an attempt is a bypass attempt) also fails every x32-ABI
//! syscall (`nr | 0x40000000`) with ENOSYS, for the same reason. Since Linux 5.11 the kernel
//! caches "always allowed" syscalls per filter, so calls outside these tables do not even run the
//! BPF program.

use std::collections::BTreeMap;
use std::fmt;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// One argument test: `(args[arg] as u32) <op> value` (syscall arguments compared as 32-bit
/// words, as the kernel reads them: every argument tested here is an `int` or a flag word whose
/// tested bits all live in the low 32 bits).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cond {
    pub arg: u8,
    pub op: Op,
    pub value: u32,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Eq,
    Ne,
    /// `args[arg] & mask == value`.
    Masked(u32),
}

/// When a row applies.
#[derive(Clone, Copy, Debug)]
pub(crate) enum When {
    /// Every call of the syscall.
    Always,
    /// Calls for which any of the clauses holds; a clause holds when all its conditions do.
    Any(&'static [&'static [Cond]]),
}

/// One denied syscall (or a subset of its calls, by argument), or in [`QUIET`] one answered.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Denial {
    pub syscall: &'static str,
    pub when: When,
    /// What the call fails with; 0 (only in [`QUIET`]): it returns 0 without running.
    pub errno: i32,
    /// For the reviewer (and [`crate::seccomp_deny_list`]); not logged anywhere.
    pub why: &'static str,
}

const fn eq(arg: u8, value: u32) -> Cond {
    Cond {
        arg,
        op: Op::Eq,
        value,
    }
}
const fn ne(arg: u8, value: u32) -> Cond {
    Cond {
        arg,
        op: Op::Ne,
        value,
    }
}
const fn bit(arg: u8, flag: u32) -> Cond {
    Cond {
        arg,
        op: Op::Masked(flag),
        value: flag,
    }
}
const fn masked(arg: u8, mask: u32, value: u32) -> Cond {
    Cond {
        arg,
        op: Op::Masked(mask),
        value,
    }
}

const EPERM: i32 = libc::EPERM;
const ENOSYS: i32 = libc::ENOSYS;
const EAFNOSUPPORT: i32 = libc::EAFNOSUPPORT;

// Flag values as 32-bit words (libc spells them as c_int).
const CLONE_NEWNS: u32 = libc::CLONE_NEWNS as u32;
const CLONE_NEWCGROUP: u32 = libc::CLONE_NEWCGROUP as u32;
const CLONE_NEWUTS: u32 = libc::CLONE_NEWUTS as u32;
const CLONE_NEWIPC: u32 = libc::CLONE_NEWIPC as u32;
const CLONE_NEWUSER: u32 = libc::CLONE_NEWUSER as u32;
const CLONE_NEWPID: u32 = libc::CLONE_NEWPID as u32;
const CLONE_NEWNET: u32 = libc::CLONE_NEWNET as u32;
const AF_UNIX: u32 = libc::AF_UNIX as u32;
const AF_INET: u32 = libc::AF_INET as u32;
const AF_INET6: u32 = libc::AF_INET6 as u32;
const AF_NETLINK: u32 = libc::AF_NETLINK as u32;
const SOCK_TYPE_MASK: u32 = 0xf;
const SOCK_RAW: u32 = libc::SOCK_RAW as u32;
/// The obsolete packet socket type (libc deprecates the constant, the kernel still takes it).
const SOCK_PACKET: u32 = 10;
const NETLINK_ROUTE: u32 = libc::NETLINK_ROUTE as u32;
/// personality(2) values that keep the default Linux persona: PER_LINUX, PER_LINUX32,
/// UNAME26, UNAME26|PER_LINUX32, and 0xffffffff (query only). Anything else (ADDR_NO_RANDOMIZE,
/// READ_IMPLIES_EXEC, foreign personas, ...) is denied.
const PERSONA_OK: [u32; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// THE deny list. Everything not listed here is allowed (the other layers — namespaces, the
/// unprivileged uid without capabilities, cgroups, Landlock, the read-only mount table — still
/// apply). Rows name syscalls; names the running architecture lacks are skipped.
#[rustfmt::skip]
pub(crate) const DENY: &[Denial] = &[
    // Namespaces, mounts and the root: the sandbox's own structure must stay as built.
    Denial { syscall: "mount",          when: When::Always, errno: EPERM, why: "mount table is fixed (mounts.rs)" },
    Denial { syscall: "umount2",        when: When::Always, errno: EPERM, why: "would unmask /proc files or uncover mount points" },
    Denial { syscall: "pivot_root",     when: When::Always, errno: EPERM, why: "root is fixed" },
    Denial { syscall: "chroot",         when: When::Always, errno: EPERM, why: "root is fixed" },
    Denial { syscall: "fsopen",         when: When::Always, errno: EPERM, why: "new mount API" },
    Denial { syscall: "fsconfig",       when: When::Always, errno: EPERM, why: "new mount API" },
    Denial { syscall: "fsmount",        when: When::Always, errno: EPERM, why: "new mount API" },
    Denial { syscall: "fspick",         when: When::Always, errno: EPERM, why: "new mount API" },
    Denial { syscall: "move_mount",     when: When::Always, errno: EPERM, why: "new mount API" },
    Denial { syscall: "open_tree",      when: When::Always, errno: EPERM, why: "new mount API (clones mounts)" },
    Denial { syscall: "open_tree_attr", when: When::Always, errno: EPERM, why: "new mount API (clones mounts, 6.15+)" },
    Denial { syscall: "mount_setattr",  when: When::Always, errno: EPERM, why: "new mount API (changes mount flags)" },
    Denial { syscall: "unshare",        when: When::Always, errno: EPERM, why: "no new namespaces (user namespaces are the usual kernel attack surface)" },
    Denial { syscall: "setns",          when: When::Always, errno: EPERM, why: "no joining other namespaces" },
    Denial { syscall: "clone",          when: When::Any(&[
        &[bit(0, CLONE_NEWNS)], &[bit(0, CLONE_NEWCGROUP)], &[bit(0, CLONE_NEWUTS)], &[bit(0, CLONE_NEWIPC)],
        &[bit(0, CLONE_NEWUSER)], &[bit(0, CLONE_NEWPID)], &[bit(0, CLONE_NEWNET)],
    ]), errno: EPERM, why: "fork/threads yes, new namespaces no (any CLONE_NEW* flag)" },
    // Other processes and the kernel's memory.
    Denial { syscall: "ptrace",            when: When::Always, errno: EPERM, why: "no debugging/injecting into other processes (e.g. the reaper)" },
    Denial { syscall: "process_vm_readv",  when: When::Always, errno: EPERM, why: "cross-process memory access" },
    Denial { syscall: "process_vm_writev", when: When::Always, errno: EPERM, why: "cross-process memory access" },
    Denial { syscall: "process_madvise",   when: When::Always, errno: EPERM, why: "acts on another process's memory" },
    Denial { syscall: "process_mrelease",  when: When::Always, errno: EPERM, why: "acts on another process's memory" },
    Denial { syscall: "pidfd_getfd",       when: When::Always, errno: EPERM, why: "steals another process's file descriptors" },
    Denial { syscall: "kcmp",              when: When::Always, errno: EPERM, why: "compares kernel objects of other processes (pointer leaks)" },
    Denial { syscall: "move_pages",        when: When::Always, errno: EPERM, why: "moves another process's pages" },
    Denial { syscall: "migrate_pages",     when: When::Always, errno: EPERM, why: "moves another process's pages" },
    // Kernel attack surface with a history of exploits and no use in a function.
    Denial { syscall: "bpf",             when: When::Always, errno: EPERM, why: "eBPF verifier/JIT attack surface" },
    Denial { syscall: "perf_event_open", when: When::Always, errno: EPERM, why: "perf attack surface, side channels" },
    Denial { syscall: "userfaultfd",     when: When::Always, errno: EPERM, why: "stalls kernel page faults (race-exploit primitive)" },
    Denial { syscall: "io_uring_setup",    when: When::Always, errno: EPERM, why: "io_uring attack surface; callers fall back to syscalls" },
    Denial { syscall: "io_uring_enter",    when: When::Always, errno: EPERM, why: "io_uring attack surface" },
    Denial { syscall: "io_uring_register", when: When::Always, errno: EPERM, why: "io_uring attack surface" },
    Denial { syscall: "keyctl",      when: When::Always, errno: EPERM, why: "kernel keyrings are not namespaced" },
    Denial { syscall: "add_key",     when: When::Always, errno: EPERM, why: "kernel keyrings are not namespaced" },
    Denial { syscall: "request_key", when: When::Always, errno: EPERM, why: "kernel keyrings are not namespaced" },
    Denial { syscall: "fanotify_init",      when: When::Always, errno: EPERM, why: "filesystem-wide monitoring" },
    Denial { syscall: "open_by_handle_at",  when: When::Always, errno: EPERM, why: "opens files by handle, bypassing the mount table (shocker)" },
    Denial { syscall: "name_to_handle_at",  when: When::Always, errno: EPERM, why: "file handles: companion of open_by_handle_at" },
    Denial { syscall: "lookup_dcookie",     when: When::Always, errno: EPERM, why: "profiling interface, leaks kernel paths" },
    Denial { syscall: "modify_ldt",         when: When::Always, errno: EPERM, why: "x86 LDT: old exploit surface, unused by modern code" },
    Denial { syscall: "iopl",               when: When::Always, errno: EPERM, why: "raw I/O port access" },
    Denial { syscall: "ioperm",             when: When::Always, errno: EPERM, why: "raw I/O port access" },
    Denial { syscall: "personality", when: When::Any(&[&[
        ne(0, PERSONA_OK[0]), ne(0, PERSONA_OK[1]), ne(0, PERSONA_OK[2]), ne(0, PERSONA_OK[3]), ne(0, PERSONA_OK[4]),
    ]]), errno: EPERM, why: "only the default persona (no ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, ...)" },
    // Host-wide state: modules, power, swap, time, accounting, logs, terminals, names.
    Denial { syscall: "init_module",     when: When::Always, errno: EPERM, why: "kernel modules" },
    Denial { syscall: "finit_module",    when: When::Always, errno: EPERM, why: "kernel modules" },
    Denial { syscall: "delete_module",   when: When::Always, errno: EPERM, why: "kernel modules" },
    Denial { syscall: "create_module",   when: When::Always, errno: EPERM, why: "kernel modules (obsolete)" },
    Denial { syscall: "get_kernel_syms", when: When::Always, errno: EPERM, why: "kernel modules (obsolete)" },
    Denial { syscall: "query_module",    when: When::Always, errno: EPERM, why: "kernel modules (obsolete)" },
    Denial { syscall: "kexec_load",      when: When::Always, errno: EPERM, why: "replaces the kernel" },
    Denial { syscall: "kexec_file_load", when: When::Always, errno: EPERM, why: "replaces the kernel" },
    Denial { syscall: "reboot",          when: When::Always, errno: EPERM, why: "host power state" },
    Denial { syscall: "swapon",          when: When::Always, errno: EPERM, why: "host swap" },
    Denial { syscall: "swapoff",         when: When::Always, errno: EPERM, why: "host swap" },
    Denial { syscall: "clock_settime",   when: When::Always, errno: EPERM, why: "host clock is not namespaced" },
    Denial { syscall: "clock_adjtime",   when: When::Always, errno: EPERM, why: "host clock is not namespaced" },
    Denial { syscall: "settimeofday",    when: When::Always, errno: EPERM, why: "host clock is not namespaced" },
    Denial { syscall: "adjtimex",        when: When::Always, errno: EPERM, why: "host clock is not namespaced" },
    Denial { syscall: "acct",            when: When::Always, errno: EPERM, why: "host process accounting" },
    Denial { syscall: "quotactl",        when: When::Always, errno: EPERM, why: "host disk quotas" },
    Denial { syscall: "quotactl_fd",     when: When::Always, errno: EPERM, why: "host disk quotas" },
    Denial { syscall: "syslog",          when: When::Always, errno: EPERM, why: "kernel log (addresses, other tenants' events)" },
    Denial { syscall: "vhangup",         when: When::Always, errno: EPERM, why: "terminal hangup" },
    Denial { syscall: "nfsservctl",      when: When::Always, errno: EPERM, why: "NFS server control (removed from Linux)" },
    Denial { syscall: "uselib",          when: When::Always, errno: EPERM, why: "a.out loader (obsolete)" },
    Denial { syscall: "_sysctl",         when: When::Always, errno: EPERM, why: "binary sysctl (removed from Linux)" },
    Denial { syscall: "sethostname",     when: When::Always, errno: EPERM, why: "the hostname is set once by the init" },
    Denial { syscall: "setdomainname",   when: When::Always, errno: EPERM, why: "the domain name is set once by the init" },
    // Sockets: only UNIX, IPv4/IPv6 (the namespace has a down loopback and nothing else) and
    // NETLINK_ROUTE (glibc's getifaddrs/if_nameindex/getaddrinfo(AI_ADDRCONFIG), Node's
    // os.networkInterfaces). Disallowed families fail as if the kernel lacked them.
    Denial { syscall: "socket", when: When::Any(&[&[
        ne(0, AF_UNIX), ne(0, AF_INET), ne(0, AF_INET6), ne(0, AF_NETLINK),
    ]]), errno: EAFNOSUPPORT, why: "AF_PACKET, AF_VSOCK (reaches the hypervisor host), AF_ALG, AF_KEY, AF_BLUETOOTH, ... are not needed" },
    Denial { syscall: "socket", when: When::Any(&[
        &[ne(0, AF_NETLINK), masked(1, SOCK_TYPE_MASK, SOCK_RAW)],
        &[masked(1, SOCK_TYPE_MASK, SOCK_PACKET)],
        &[eq(0, AF_NETLINK), ne(2, NETLINK_ROUTE)],
    ]), errno: EPERM, why: "raw/packet sockets; netlink other than NETLINK_ROUTE (uevents of the host, audit, sock_diag, ...)" },
];

/// Calls the filter answers itself without an audit record: not attacks but what ordinary code
/// does, answered so that it takes a path the deny list can check (or so that it costs the host
/// nothing). Never the same syscall as a [`DENY`] row.
#[rustfmt::skip]
pub(crate) const QUIET: &[Denial] = &[
    Denial { syscall: "clone3", when: When::Always, errno: ENOSYS, why: "flags live in memory a filter cannot read; ENOSYS makes libcs fall back to clone (checked by DENY); glibc tries it for every thread and spawn" },
    // An instance can write only to its /tmp (tmpfs: nothing to flush), so flushing is
    // meaningless for it, but the real calls flush the host's filesystems (sync: all of them;
    // syncfs: the one under /usr and /code) and would let a block stall every tenant's disk I/O.
    Denial { syscall: "sync",   when: When::Always, errno: 0, why: "host-wide disk flush (I/O noisy neighbour): a no-op returning 0, an instance has nothing on disk to flush" },
    Denial { syscall: "syncfs", when: When::Always, errno: 0, why: "flushes the host filesystem under /usr and /code: a no-op returning 0, as sync" },
];

/// Syscall number of `name` on the running architecture, None if it has no such syscall.
pub(crate) fn nr(name: &str) -> Option<i64> {
    #[cfg(target_arch = "x86_64")]
    let arch_specific = match name {
        // Obsolete (ENOSYS in every current kernel); numbers from arch/x86/entry/syscalls.
        "create_module" => Some(174),
        "get_kernel_syms" => Some(177),
        "query_module" => Some(178),
        "modify_ldt" => Some(libc::SYS_modify_ldt),
        "iopl" => Some(libc::SYS_iopl),
        "ioperm" => Some(libc::SYS_ioperm),
        "uselib" => Some(libc::SYS_uselib),
        "_sysctl" => Some(libc::SYS__sysctl),
        "lookup_dcookie" => Some(libc::SYS_lookup_dcookie),
        _ => None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let arch_specific: Option<i64> = None;
    if arch_specific.is_some() {
        return arch_specific;
    }
    Some(match name {
        "mount" => libc::SYS_mount,
        "umount2" => libc::SYS_umount2,
        "pivot_root" => libc::SYS_pivot_root,
        "chroot" => libc::SYS_chroot,
        "fsopen" => libc::SYS_fsopen,
        "fsconfig" => libc::SYS_fsconfig,
        "fsmount" => libc::SYS_fsmount,
        "fspick" => libc::SYS_fspick,
        "move_mount" => libc::SYS_move_mount,
        "open_tree" => libc::SYS_open_tree,
        // Linux 6.15; new syscalls share one number on every architecture.
        "open_tree_attr" => 467,
        "mount_setattr" => libc::SYS_mount_setattr,
        "unshare" => libc::SYS_unshare,
        "setns" => libc::SYS_setns,
        "clone" => libc::SYS_clone,
        "clone3" => libc::SYS_clone3,
        "ptrace" => libc::SYS_ptrace,
        "process_vm_readv" => libc::SYS_process_vm_readv,
        "process_vm_writev" => libc::SYS_process_vm_writev,
        "process_madvise" => libc::SYS_process_madvise,
        "process_mrelease" => libc::SYS_process_mrelease,
        "pidfd_getfd" => libc::SYS_pidfd_getfd,
        "kcmp" => libc::SYS_kcmp,
        "move_pages" => libc::SYS_move_pages,
        "migrate_pages" => libc::SYS_migrate_pages,
        "bpf" => libc::SYS_bpf,
        "perf_event_open" => libc::SYS_perf_event_open,
        "userfaultfd" => libc::SYS_userfaultfd,
        "io_uring_setup" => libc::SYS_io_uring_setup,
        "io_uring_enter" => libc::SYS_io_uring_enter,
        "io_uring_register" => libc::SYS_io_uring_register,
        "keyctl" => libc::SYS_keyctl,
        "add_key" => libc::SYS_add_key,
        "request_key" => libc::SYS_request_key,
        "fanotify_init" => libc::SYS_fanotify_init,
        "open_by_handle_at" => libc::SYS_open_by_handle_at,
        "name_to_handle_at" => libc::SYS_name_to_handle_at,
        "personality" => libc::SYS_personality,
        "init_module" => libc::SYS_init_module,
        "finit_module" => libc::SYS_finit_module,
        "delete_module" => libc::SYS_delete_module,
        "kexec_load" => libc::SYS_kexec_load,
        "kexec_file_load" => libc::SYS_kexec_file_load,
        "reboot" => libc::SYS_reboot,
        "swapon" => libc::SYS_swapon,
        "swapoff" => libc::SYS_swapoff,
        "clock_settime" => libc::SYS_clock_settime,
        "clock_adjtime" => libc::SYS_clock_adjtime,
        "settimeofday" => libc::SYS_settimeofday,
        "adjtimex" => libc::SYS_adjtimex,
        "acct" => libc::SYS_acct,
        "quotactl" => libc::SYS_quotactl,
        "quotactl_fd" => libc::SYS_quotactl_fd,
        "syslog" => libc::SYS_syslog,
        "vhangup" => libc::SYS_vhangup,
        "nfsservctl" => libc::SYS_nfsservctl,
        "sethostname" => libc::SYS_sethostname,
        "setdomainname" => libc::SYS_setdomainname,
        "socket" => libc::SYS_socket,
        "sync" => libc::SYS_sync,
        "syncfs" => libc::SYS_syncfs,
        _ => return None,
    })
}

/// Building the filter failed (a bug in the table, not an OS condition).
#[derive(Debug)]
pub(crate) struct FilterError(String);

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn target_arch() -> Result<TargetArch, FilterError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| FilterError(format!("seccomp: unsupported architecture: {e}")))
}

fn condition(c: &Cond) -> Result<SeccompCondition, FilterError> {
    let (op, value) = match c.op {
        Op::Eq => (SeccompCmpOp::Eq, c.value),
        Op::Ne => (SeccompCmpOp::Ne, c.value),
        Op::Masked(mask) => (SeccompCmpOp::MaskedEq(u64::from(mask)), c.value),
    };
    SeccompCondition::new(c.arg, SeccompCmpArgLen::Dword, op, u64::from(value))
        .map_err(|e| FilterError(format!("seccomp condition {c:?}: {e}")))
}

/// One compiled filter and whether the kernel logs the calls it decides.
pub(crate) struct Program {
    pub bpf: BpfProgram,
    /// Installed with `SECCOMP_FILTER_FLAG_LOG` ([`DENY`]'s filters and the x32 guard).
    pub log: bool,
}

/// The filters in installation order: [`QUIET`]'s (unlogged), one per errno, then [`DENY`]'s
/// (logged), one per errno, then the x32 guard on x86_64 (logged). Installed last, the logged
/// filters win any tie (see the module doc).
pub(crate) fn programs() -> Result<Vec<Program>, FilterError> {
    let arch = target_arch()?;
    let quiet: std::collections::BTreeSet<&str> = QUIET.iter().map(|d| d.syscall).collect();
    if let Some(both) = DENY.iter().find(|d| quiet.contains(d.syscall)) {
        return Err(FilterError(format!(
            "seccomp: {} is both denied (logged) and answered quietly; a syscall belongs to one table",
            both.syscall
        )));
    }
    let mut out = Vec::new();
    for (table, log) in [(QUIET, false), (DENY, true)] {
        for (errno, rules) in group_by_errno(table)? {
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(errno as u32),
                arch,
            )
            .map_err(|e| FilterError(format!("seccomp filter (errno {errno}): {e}")))?;
            let bpf: BpfProgram = filter
                .try_into()
                .map_err(|e| FilterError(format!("seccomp filter (errno {errno}): {e}")))?;
            out.push(Program { bpf, log });
        }
    }
    #[cfg(target_arch = "x86_64")]
    out.push(Program {
        bpf: x32_guard(),
        log: true,
    });
    Ok(out)
}

/// A table's rows as seccompiler rules, grouped by errno (in a fixed order).
fn group_by_errno(
    table: &[Denial],
) -> Result<BTreeMap<i32, BTreeMap<i64, Vec<SeccompRule>>>, FilterError> {
    let mut by_errno: BTreeMap<i32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for d in table {
        let Some(number) = nr(d.syscall) else {
            continue;
        };
        let rules = by_errno.entry(d.errno).or_default();
        match d.when {
            When::Always => {
                if rules.insert(number, Vec::new()).is_some() {
                    return Err(FilterError(format!(
                        "seccomp: {} is listed twice with errno {}",
                        d.syscall, d.errno
                    )));
                }
            }
            When::Any(clauses) => {
                let chain = rules.entry(number).or_default();
                for clause in clauses {
                    let conds = clause
                        .iter()
                        .map(condition)
                        .collect::<Result<Vec<_>, _>>()?;
                    chain.push(SeccompRule::new(conds).map_err(|e| {
                        FilterError(format!("seccomp rule for {}: {e}", d.syscall))
                    })?);
                }
            }
        }
    }
    Ok(by_errno)
}

/// x86_64 only: any syscall number with the x32 bit set fails with ENOSYS. (The other filters
/// compare full syscall numbers, so an x32 alias of a denied call would not match them.)
#[cfg(target_arch = "x86_64")]
fn x32_guard() -> BpfProgram {
    use seccompiler::sock_filter;
    /// BPF_LD | BPF_W | BPF_ABS (0x00 | 0x00 | 0x20).
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
    const BPF_RET_K: u16 = 0x06;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        // A = seccomp_data.nr (offset 0). The arch is checked by the other filters.
        ins(BPF_LD_W_ABS, 0, 0, 0),
        ins(BPF_JMP_JGE_K, 0, 1, X32_SYSCALL_BIT),
        ins(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        ins(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
}

/// `SECCOMP_FILTER_FLAG_LOG`: the kernel logs every action of the filter but "allow" (per
/// `/proc/sys/kernel/seccomp/actions_logged`), so each refused syscall leaves an audit record
/// naming the instance's uid, its command and the syscall: attacks are refused *and* seen.
const SECCOMP_FILTER_FLAG_LOG: libc::c_ulong = 2;
const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;

/// Install the filters on the calling (single-threaded) process. Requires no_new_privs.
pub(crate) fn install() -> Result<(), FilterError> {
    for program in programs()? {
        let len = u16::try_from(program.bpf.len()).map_err(|_| {
            FilterError(format!(
                "a filter of {} instructions is too long",
                program.bpf.len()
            ))
        })?;
        let fprog = libc::sock_fprog {
            len,
            // seccompiler's `sock_filter` is the kernel's `struct sock_filter` (repr(C), same fields).
            filter: program.bpf.as_ptr() as *mut libc::sock_filter,
        };
        let flags = if program.log {
            SECCOMP_FILTER_FLAG_LOG
        } else {
            0
        };
        // SAFETY: seccomp(2) reads `fprog` and the `len` instructions it points to, both alive
        // for the duration of the call; it writes nothing through them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                flags,
                &fprog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(FilterError(format!(
                "installing the seccomp filter: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_names_a_known_syscall() {
        for d in DENY.iter().chain(QUIET) {
            #[cfg(target_arch = "x86_64")]
            assert!(nr(d.syscall).is_some(), "{} has no number", d.syscall);
            assert!(!d.why.is_empty());
        }
    }

    #[test]
    fn compiles() {
        let programs = programs().expect("compile");
        assert!(programs.len() >= 4, "one filter per table and errno");
        assert!(programs
            .iter()
            .all(|p| !p.bpf.is_empty() && p.bpf.len() < 4096));
        // Unlogged first, logged last (ties go to the logged filters).
        let logs: Vec<bool> = programs.iter().map(|p| p.log).collect();
        assert_eq!(
            logs,
            [false, false, true, true, cfg!(target_arch = "x86_64")][..logs.len()]
        );
        let first_logged = logs.iter().position(|l| *l).expect("a logged filter");
        assert!(logs[first_logged..].iter().all(|l| *l), "{logs:?}");
    }

    /// Forks a child that installs `filters` (in order, each with or without the log flag) and
    /// calls getppid(2); returns its pid and exit code (the errno the call failed with).
    fn run_filtered_child(filters: &[(BpfProgram, bool)]) -> (i32, i32) {
        let fprogs: Vec<(libc::sock_fprog, libc::c_ulong)> = filters
            .iter()
            .map(|(bpf, log)| {
                let fprog = libc::sock_fprog {
                    len: u16::try_from(bpf.len()).expect("short filter"),
                    filter: bpf.as_ptr() as *mut libc::sock_filter,
                };
                (fprog, if *log { SECCOMP_FILTER_FLAG_LOG } else { 0 })
            })
            .collect();
        // SAFETY: the child makes only raw syscalls on memory prepared before the fork (alive
        // in its copy of the address space), then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: see above; every pointer refers to `fprogs`, alive until _exit.
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    libc::_exit(200);
                }
                for (fprog, flags) in &fprogs {
                    let rc = libc::syscall(
                        libc::SYS_seccomp,
                        SECCOMP_SET_MODE_FILTER,
                        *flags,
                        fprog as *const libc::sock_fprog,
                    );
                    if rc != 0 {
                        libc::_exit(201);
                    }
                }
                let rc = libc::syscall(libc::SYS_getppid);
                libc::_exit(if rc < 0 { *libc::__errno_location() } else { 0 });
            }
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        (pid, libc::WEXITSTATUS(status))
    }

    /// What the design rests on, tested on the running kernel: when several filters give the
    /// same action, the newest one's answer (its errno) is returned and its log flag decides
    /// whether an audit record is written (`kernel/seccomp.c`: `seccomp_run_filters` walks from
    /// the newest filter and keeps a strictly lower action only; `seccomp_log` asks the matching
    /// filter). Needs root and `/dev/kmsg`; retries while the kernel rate-limits records.
    #[test]
    fn among_equal_actions_the_newest_filter_answers_and_decides_the_log() {
        use std::io::{Read, Seek, SeekFrom};
        use std::os::unix::fs::OpenOptionsExt;
        let mut kmsg = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .expect("this test reads kernel audit records from /dev/kmsg (run as root)");
        kmsg.seek(SeekFrom::End(0)).expect("seek");
        let arch = target_arch().expect("arch");
        let filter = |errno: i32| -> BpfProgram {
            SeccompFilter::new(
                BTreeMap::from([(libc::SYS_getppid, Vec::new())]),
                SeccompAction::Allow,
                SeccompAction::Errno(errno as u32),
                arch,
            )
            .expect("filter")
            .try_into()
            .expect("compile")
        };
        let logged_then_quiet = [(filter(EPERM), true), (filter(ENOSYS), false)];
        let quiet_then_logged = [(filter(ENOSYS), false), (filter(EPERM), true)];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let mut silent = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no audit record of the logged-newest child came through"
            );
            let (a, errno_a) = run_filtered_child(&logged_then_quiet);
            assert_eq!(errno_a, ENOSYS, "the newest (quiet) filter answers");
            let (b, errno_b) = run_filtered_child(&quiet_then_logged);
            assert_eq!(errno_b, EPERM, "the newest (logged) filter answers");
            silent.push(a);
            std::thread::sleep(std::time::Duration::from_millis(300));
            let mut logged = false;
            loop {
                match kmsg.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let line = String::from_utf8_lossy(&buf[..n]);
                        if !line.contains("type=1326") {
                            continue;
                        }
                        let pid = line
                            .split_whitespace()
                            .find_map(|w| w.strip_prefix("pid="))
                            .and_then(|p| p.parse::<i32>().ok());
                        assert!(
                            !pid.is_some_and(|p| silent.contains(&p)),
                            "a tie won by the unlogged filter was logged: {line}"
                        );
                        logged |= pid == Some(b);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => continue,
                    Err(e) => panic!("reading /dev/kmsg: {e}"),
                }
            }
            if logged {
                break;
            }
        }
    }

    #[test]
    fn quiet_answers_are_only_deliberate_fallbacks_and_never_denials() {
        let quiet: Vec<&str> = QUIET.iter().map(|d| d.syscall).collect();
        assert_eq!(quiet, ["clone3", "sync", "syncfs"]);
        assert!(DENY.iter().all(|d| !quiet.contains(&d.syscall)));
        assert!(QUIET.iter().all(|d| d.errno == ENOSYS || d.errno == 0));
    }
}
