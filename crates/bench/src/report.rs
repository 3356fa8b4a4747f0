//! Markdown for one suite run: the machine, the brief's targets with a verdict, and a table
//! per figure, baselines side by side with Refinery as ratios.

use std::fmt::Write as _;

use crate::baseline::Mode;
use crate::stats::Summary;
use crate::suite::{Results, SuiteConfig};

/// The brief's "10 MB" idle target, in MiB (the unit PSS is read in).
const IDLE_TARGET_MIB: f64 = 10.0 * 1_000_000.0 / 1_048_576.0;

fn ms(v: f64) -> String {
    if v.is_nan() {
        "—".into()
    } else if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.1} ms")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "—".into()
    } else {
        format!("{:.2}×", a / b)
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "**met**"
    } else {
        "**not met**"
    }
}

/// The command line that reproduces this run's sample counts.
pub fn command(config: &SuiteConfig) -> String {
    format!(
        "scripts/bench --cold {} --warm {} --concurrency {} --burst {} --burst-hold {} --idle-many {} --baseline {}",
        config.cold,
        config.warm,
        config.concurrency,
        config.burst,
        config.burst_hold_s,
        config.idle_many,
        config.baseline
    )
}

pub fn suite(r: &Results) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let _ = writeln!(o, "Measured {} at commit `{}` by:\n", m.date_utc, m.commit);
    let _ = writeln!(o, "```sh\n{}\n```\n", command(&r.config));
    let _ = writeln!(
        o,
        "Machine: {} × {}, {:.1} GiB, Linux {}, {}, {}; {}, Node {}, {}. Release build; the load \
         generator runs on the same machine. The run took {:.0} s.",
        m.cpus,
        m.cpu_model,
        m.memory_gib,
        m.kernel,
        m.os,
        m.cgroups,
        m.python,
        m.node,
        if m.bwrap == "unavailable" {
            "no bwrap".to_string()
        } else {
            m.bwrap.clone()
        },
        r.elapsed.as_secs_f64()
    );
    let note = if r.load_before.compilers + r.load_after.compilers > 0 {
        " **The machine was shared with other builds during this run**: figures are noisier \
         and slower than on an idle machine."
    } else if r.load_before.load1 > 1.0 {
        " No other build was running at start or end, but other work had been running shortly \
         before (the load average decays over minutes)."
    } else {
        ""
    };
    let _ = writeln!(
        o,
        "\nLoad average (1 min) {:.2} before the run, {:.2} after it (the burst's own 500 \
         instances included); {} / {} compiler processes of other work running at start / end.{note}",
        r.load_before.load1,
        r.load_after.load1,
        r.load_before.compilers,
        r.load_after.compilers,
    );

    targets(&mut o, r);
    warm(&mut o, r);
    cold(&mut o, r);
    burst(&mut o, r);
    idle(&mut o, r);
    o
}

fn python_cold(r: &Results) -> Option<&Summary> {
    cold_row(r, "python")
}

fn cold_row<'a>(r: &'a Results, label: &str) -> Option<&'a Summary> {
    r.cold.iter().find(|c| c.label == label).map(|c| &c.http)
}

fn targets(o: &mut String, r: &Results) {
    let _ = writeln!(o, "\n### Targets (brief §5)\n");
    let _ = writeln!(o, "| figure | target | measured | verdict |");
    let _ = writeln!(o, "|---|---|---|---|");
    if let Some(w) = r.warm.first() {
        let _ = writeln!(
            o,
            "| warm invocation, HTTP in to result out, no-op Python | p50 ≤ 1 ms, p99 ≤ 5 ms | p50 {}, p99 {} | {} |",
            ms(w.latency.p50),
            ms(w.latency.p99),
            verdict(w.latency.p50 <= 1.0 && w.latency.p99 <= 5.0)
        );
    }
    for (label, how) in [
        ("python", "back to back"),
        ("python (0.3 s apart)", "one at a time, 0.3 s apart"),
    ] {
        if let Some(c) = cold_row(r, label) {
            let _ = writeln!(
                o,
                "| cold start, Python, process tier (HTTP end to end; {how}) | p50 ≤ 10 ms | p50 {}, p99 {} | {} |",
                ms(c.p50),
                ms(c.p99),
                verdict(c.p50 <= 10.0)
            );
        }
    }
    let b = &r.burst;
    let ok = b.http_statuses.get(&200).copied().unwrap_or(0);
    let _ = writeln!(
        o,
        "| burst | {n} simultaneous → {n} isolated instances, none lost | {ok} answered 200, {} distinct instances, {} lost | {} |",
        b.distinct_instances,
        b.invocations - ok,
        verdict(ok == b.invocations && b.distinct_instances == b.invocations),
        n = b.invocations,
    );
    for row in &r.idle {
        let _ = writeln!(
            o,
            "| idle warm instance, Python, PSS ({} instances) | ≤ 10 MB ({IDLE_TARGET_MIB:.2} MiB) | mean {:.2} MiB, max {:.2} MiB | {} |",
            row.measured,
            row.pss.mean,
            row.pss.max,
            verdict(row.measured > 0 && row.pss.max <= IDLE_TARGET_MIB)
        );
    }
    let best = r
        .warm
        .iter()
        .max_by(|a, b| a.per_second.total_cmp(&b.per_second));
    if let Some(w) = best {
        let _ = writeln!(
            o,
            "| warm throughput, no-op Python, 2 cores | ≥ 5,000 /s | {:.0} /s ({} clients, load generator on the same cores) | {} |",
            w.per_second,
            w.concurrency,
            verdict(w.per_second >= 5000.0)
        );
    }
    if let (Some(c), Some(w)) = (python_cold(r), r.warm.first()) {
        let _ = writeln!(
            o,
            "| warm ≥ 10× faster than cold (§3.4) | ≥ 10× | {} | {} |",
            ratio(c.p50, w.latency.p50),
            verdict(c.p50 / w.latency.p50 >= 10.0)
        );
    }
    let _ = writeln!(
        o,
        "| isolation | every attack fails, and is logged | not a benchmark: the security suite (SECURITY.md) | — |"
    );
}

fn warm(o: &mut String, r: &Results) {
    let _ = writeln!(o, "\n### Warm invocation over HTTP (no-op Python)\n");
    let _ = writeln!(
        o,
        "| clients | p50 | p99 | invocations/s | instances serving | cold starts among them | CPU per invocation: server / instances / load generator |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|");
    for w in &r.warm {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {:.0} | {} | {} | {:.0} / {:.0} / {:.0} µs |",
            w.concurrency,
            ms(w.latency.p50),
            ms(w.latency.p99),
            w.per_second,
            w.instances,
            w.cold_seen,
            w.server_cpu_us,
            w.instances_cpu_us,
            w.client_cpu_us
        );
    }
}

fn baseline_p50(r: &Results, language: &str, mode: Mode) -> f64 {
    r.baselines
        .iter()
        .find(|b| b.language == language && b.mode == mode)
        .and_then(|b| b.result.as_ref().ok())
        .map_or(f64::NAN, |s| s.p50)
}

fn cold(o: &mut String, r: &Results) {
    let _ = writeln!(o, "\n### Cold start per language\n");
    let _ = writeln!(
        o,
        "| block | HTTP p50 | HTTP p99 | `init_ms` p50 | `init_ms` p99 | samples |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    for c in &r.cold {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} |",
            c.label,
            ms(c.http.p50),
            ms(c.http.p99),
            ms(c.init.p50),
            ms(c.init.p99),
            c.http.n
        );
    }
    let _ = writeln!(
        o,
        "\nBaselines, the same handler, measured in the same run:\n"
    );
    let _ = writeln!(o, "| start | p50 | p99 | samples |");
    let _ = writeln!(o, "|---|---|---|---|");
    for b in &r.baselines {
        let how = match b.mode {
            Mode::Bare => "bare process",
            Mode::Bwrap => "under bwrap",
        };
        match &b.result {
            Ok(s) => {
                let _ = writeln!(
                    o,
                    "| {} {how} | {} | {} | {} |",
                    b.language,
                    ms(s.p50),
                    ms(s.p99),
                    s.n
                );
            }
            Err(e) => {
                let _ = writeln!(
                    o,
                    "| {} {how} | not measured: {} | | |",
                    b.language,
                    e.replace('|', "/")
                );
            }
        }
    }
    if let Some(why) = &r.bwrap_unavailable {
        let _ = writeln!(o, "\n**bwrap was not measured**: {why}.");
    }
    let _ = writeln!(
        o,
        "\nRatios of p50s (below 1× = Refinery's cold start, HTTP round trip included, is faster than the baseline's process start):\n"
    );
    let _ = writeln!(
        o,
        "| Refinery cold start | Refinery p50 | bare p50 | bwrap p50 | Refinery / bare | Refinery / bwrap |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    for c in &r.cold {
        let (bare, bwrap) = (
            baseline_p50(r, c.language, Mode::Bare),
            baseline_p50(r, c.language, Mode::Bwrap),
        );
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} |",
            c.label,
            ms(c.http.p50),
            ms(bare),
            ms(bwrap),
            ratio(c.http.p50, bare),
            ratio(c.http.p50, bwrap)
        );
    }
}

fn burst(o: &mut String, r: &Results) {
    let b = &r.burst;
    let _ = writeln!(
        o,
        "\n### Burst: {} simultaneous invocations of one block\n",
        b.invocations
    );
    let statuses: Vec<String> = b
        .http_statuses
        .iter()
        .map(|(s, n)| format!("{n} × HTTP {s}"))
        .collect();
    let records: Vec<String> = b
        .record_statuses
        .iter()
        .map(|(s, n)| format!("{n} × {s}"))
        .collect();
    let _ = writeln!(o, "| figure | value |");
    let _ = writeln!(o, "|---|---|");
    let _ = writeln!(
        o,
        "| block | Python, `time.sleep({})` then return, memory_mb 128, max_concurrency {} |",
        b.hold_s, b.invocations
    );
    let _ = writeln!(
        o,
        "| time until all answered | {} (first answer after {}; each handler sleeps {} s, so ≈ {:.1} s went to starting the instances and answering) |",
        ms(b.all_answered_ms),
        ms(b.first_answered_ms),
        b.hold_s,
        (b.all_answered_ms / 1000.0 - b.hold_s).max(0.0)
    );
    let _ = writeln!(
        o,
        "| answers | {}{} |",
        statuses.join(", "),
        if b.client_errors > 0 {
            format!(", {} requests failed at the client", b.client_errors)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        o,
        "| execution records | {} ({}), {} cold |",
        b.records,
        records.join(", "),
        b.cold_records
    );
    let _ = writeln!(
        o,
        "| distinct instances (records' `instance_id`) | {} |",
        b.distinct_instances
    );
    let _ = writeln!(
        o,
        "| `init_ms` of the cold starts during the burst | p50 {}, p99 {}, max {} |",
        ms(b.init.p50),
        ms(b.init.p99),
        ms(b.init.max)
    );
    let peak = match b.instances_peak_mib {
        Some(instances) => format!(
            "{:.0} MiB = instances {:.0} MiB (high-water mark of the memory cgroup holding the account's instances) + server {:.1} MiB (peak PSS) + zygote {:.1} MiB (peak RSS: the pages instances share with it), sampled every 50 ms",
            instances + b.server_peak_mib + b.zygote_peak_mib,
            instances,
            b.server_peak_mib,
            b.zygote_peak_mib
        ),
        None => "instances' cgroup high-water mark unavailable".to_string(),
    };
    let _ = writeln!(
        o,
        "| peak memory (cgroup charge; a lower bound, see below) | {peak} |"
    );
    let _ = writeln!(
        o,
        "| peak memory, sampled | {:.0} MiB (server PSS + zygote RSS + the charge of the server's whole instance cgroup tree, highest 50 ms sample) |",
        b.sampled_total_peak_mib
    );
    let _ = writeln!(
        o,
        "| memory after the burst, its instances frozen (PSS, page by page) | {:.0} MiB in all: {} instances {:.0} MiB ({:.2} MiB each) + server and zygote {:.1} MiB |",
        b.after_instances_pss_mib + b.after_server_zygote_pss_mib,
        b.after_instances,
        b.after_instances_pss_mib,
        b.after_instances_pss_mib / b.after_instances.max(1) as f64,
        b.after_server_zygote_pss_mib
    );
    let _ = writeln!(
        o,
        "| responsiveness: `GET /v1/health` | quiet p50 {} / max {}; during the burst p50 {} / p99 {} / max {} ({} samples) |",
        ms(b.health_quiet.p50),
        ms(b.health_quiet.max),
        ms(b.health_during.p50),
        ms(b.health_during.p99),
        ms(b.health_during.max),
        b.health_during.n
    );
    let _ = writeln!(
        o,
        "| responsiveness: warm invocation of another block | quiet p50 {} / max {}; during the burst p50 {} / p99 {} / max {} ({} samples, {} failed) |",
        ms(b.warm_quiet.p50),
        ms(b.warm_quiet.max),
        ms(b.warm_during.p50),
        ms(b.warm_during.p99),
        ms(b.warm_during.max),
        b.warm_during.n,
        b.warm_during_failed
    );
}

fn idle(o: &mut String, r: &Results) {
    let _ = writeln!(o, "\n### Idle frozen instances: memory (PSS)\n");
    let _ = writeln!(
        o,
        "| instances | measured | PSS per instance p50 | mean | max | total | the Python zygote's own PSS | standby sandboxes waiting, all languages (PSS) |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    for row in &r.idle {
        let _ = writeln!(
            o,
            "| {} | {} | {:.2} MiB | {:.2} MiB | {:.2} MiB | {:.1} MiB | {:.2} MiB | {} ({:.1} MiB) |",
            row.requested,
            row.measured,
            row.pss.p50,
            row.pss.mean,
            row.pss.max,
            row.total_mib,
            row.zygote_mib,
            row.standbys,
            row.standby_mib
        );
    }
}
