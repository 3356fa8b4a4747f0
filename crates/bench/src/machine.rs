//! Facts about the machine and the moment a run was made, printed with its figures.

use std::process::Command;

pub struct Machine {
    pub date_utc: String,
    pub commit: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
    pub cgroups: &'static str,
    pub python: String,
    pub node: String,
    pub bwrap: String,
}

fn first_line(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        }
        _ => "unavailable".to_string(),
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub fn describe() -> Machine {
    let cpuinfo = read("/proc/cpuinfo");
    let meminfo = read("/proc/meminfo");
    let os_release = read("/etc/os-release");
    let cgroups = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "cgroup v2"
    } else if std::path::Path::new("/sys/fs/cgroup/unified").exists() {
        "hybrid cgroups (v1 controllers + v2 unified)"
    } else {
        "cgroup v1"
    };
    let mut commit = first_line("git", &["rev-parse", "--short", "HEAD"]);
    if Command::new("git")
        .args(["diff", "--quiet", "HEAD", "--", "crates"])
        .status()
        .is_ok_and(|s| s.code() == Some(1))
    {
        commit.push_str(" + uncommitted changes");
    }
    Machine {
        date_utc: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        commit,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model: cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_string(),
        memory_gib: meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        os: os_release
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .unwrap_or("unknown")
            .trim_matches('"')
            .to_string(),
        cgroups,
        python: first_line("/usr/bin/python3", &["--version"]),
        node: first_line("/usr/bin/node", &["--version"]),
        bwrap: first_line("/usr/bin/bwrap", &["--version"]),
    }
}

/// The 1-minute load average and how many compiler processes (rustc, cc, ld) other than
/// ours are running: a shared machine shows here.
pub struct Load {
    pub load1: f64,
    pub compilers: usize,
}

pub fn load() -> Load {
    let load1 = read("/proc/loadavg")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let compilers = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .filter(|e| {
                    let comm = read(&format!("{}/comm", e.path().display()));
                    matches!(
                        comm.trim(),
                        "rustc" | "cc1" | "cc" | "ld" | "cargo" | "clippy-driver"
                    )
                })
                .count()
        })
        .unwrap_or(0);
    Load { load1, compilers }
}
