//! Reading memory from the host: the proportional set size (PSS) of processes and the
//! charge of memory cgroups. PSS splits each shared page among the processes mapping it,
//! so PSS summed over processes counts every page once (pages shared with a zygote are
//! split with the zygote too).

use std::path::{Path, PathBuf};

/// `Pss:` of `/proc/PID/smaps_rollup`, in KiB; `None` if the process is gone.
pub fn pss_kib(pid: u32) -> Option<u64> {
    rollup_kib(pid, "Pss:")
}

/// `Rss:` of `/proc/PID/smaps_rollup`, in KiB: every page the process maps, shared or not.
pub fn rss_kib(pid: u32) -> Option<u64> {
    rollup_kib(pid, "Rss:")
}

fn rollup_kib(pid: u32, field: &str) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Pids in a cgroup directory (`cgroup.procs`).
pub fn cgroup_pids(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// PSS of every process of one instance (all hierarchies hold the same processes, so the
/// first directory is enough), in KiB; `None` if it has no process or one vanished.
pub fn instance_pss_kib(cgroups: &[PathBuf]) -> Option<u64> {
    let pids = cgroup_pids(cgroups.first()?);
    if pids.is_empty() {
        return None;
    }
    pids.into_iter().map(pss_kib).sum()
}

/// The instance's memory cgroup: the v1 `memory` hierarchy, or the v2 directory (which
/// has `memory.current`).
pub fn memory_cgroup(cgroups: &[PathBuf]) -> Option<PathBuf> {
    cgroups
        .iter()
        .find(|p| p.join("memory.usage_in_bytes").exists() || p.join("memory.current").exists())
        .cloned()
}

/// A memory cgroup's current charge in bytes (v1 `memory.usage_in_bytes`, v2
/// `memory.current`): anonymous memory, page cache (the instance's tmpfs) and kernel
/// memory of every process in it and below it.
pub fn cgroup_usage_bytes(dir: &Path) -> Option<u64> {
    read_u64(&dir.join("memory.usage_in_bytes")).or_else(|| read_u64(&dir.join("memory.current")))
}

/// The highest charge the memory cgroup has had since it was created (v1
/// `memory.max_usage_in_bytes`, v2 `memory.peak` on kernels ≥ 5.19).
pub fn cgroup_peak_bytes(dir: &Path) -> Option<u64> {
    read_u64(&dir.join("memory.max_usage_in_bytes")).or_else(|| read_u64(&dir.join("memory.peak")))
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Direct children of `pid` (over all its threads).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// The processes of the server's waiting standby sandboxes (each a reaper and its runtime):
/// its children still in the `standby` cgroup group, and their children.
pub fn standby_processes(server_pid: u32) -> Vec<u32> {
    children(server_pid)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .map(|c| c.contains("/standby/sb-"))
                .unwrap_or(false)
        })
        .flat_map(|pid| std::iter::once(pid).chain(children(pid)))
        .collect()
}

/// The server's zygotes: its children whose command line names a zygote.
pub fn zygotes(server_pid: u32) -> Vec<u32> {
    children(server_pid)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("zygote"))
                .unwrap_or(false)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_pss() {
        let pss = pss_kib(std::process::id());
        assert!(pss.is_some_and(|kib| kib > 0), "{pss:?}");
    }

    #[test]
    fn a_missing_process_has_none() {
        // Above the default pid_max of 4194304: cannot exist.
        assert_eq!(pss_kib(4_194_305), None);
    }
}
