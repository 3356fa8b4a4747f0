//! CPU time of processes (`/proc/PID/stat` utime + stime), to say where a figure's time went:
//! the server, the instances, or the load generator itself.

/// User + system CPU seconds `pid` has used so far (all its threads); `None` if it is gone.
pub fn seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing paren.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / per_second.max(1) as f64)
}

/// The sum over `pids` (the ones still alive).
pub fn seconds_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| seconds(*p)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_used_some_cpu_after_spinning() {
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_add(1);
        }
        assert!(x > 0);
        let used = seconds(std::process::id());
        assert!(used.is_some_and(|s| s > 0.0), "{used:?}");
    }
}
