//! `cargo xtask bench cpu`: the cost of the CPU/scheduler families under a
//! context-switch-heavy load.
//!
//! - ns per event per program: the kernel's own BPF stats
//!   (`kernel.bpf_stats_enabled=1`), read from the agent's
//!   `perch.bpf.program.run.{time,count}` self-metrics.
//! - the agent's CPU time per collection and its RSS, from /proc/<pid>.
//! - the load's slowdown: `stress-ng --switch` bogo-ops/s with and without
//!   the agent, in alternating runs, as a ratio, with BPF stats off (the
//!   stats themselves cost two clock reads per program run); the ns/event
//!   figures come from one more run with them on, and one with
//!   `probes.sched.prev_state = "task_struct"` (the pre-5.18 path).
//! - the cost of per-container attribution on the switch path:
//!   `sched_switch` ns/event with `probes.sched.runqueue_per_cgroup` on (the
//!   default) and off, in alternating runs (`--attribution-pairs`, default
//!   3), as means and their difference.
//!
//! Usage: bench-cpu [--pairs N] [--secs S] [--interval-secs I] [--attribution-pairs N]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use perch_tests::bench::{arg, mean, process_cpu_rss};
use perch_tests::perch::{Agent, ConfigFile};

/// Runs `stress-ng --switch` for `secs` and returns its bogo-ops per second.
fn stress(secs: u64) -> f64 {
    let out = Command::new("stress-ng")
        .args(["--switch", "2", "--timeout"])
        .arg(format!("{secs}s"))
        .args(["--metrics-brief"])
        .output()
        .expect("stress-ng (apt stress-ng; cargo xtask setup --test installs it)");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    // "stress-ng: metrc: [..] switch  12345678  10.00  1.2  3.4  1234567.89  ..."
    text.lines()
        .find(|l| l.contains(" switch ") && l.contains("metrc"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "switch")?;
            f.get(i + 5)?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no switch metrics line in stress-ng output:\n{text}"))
}

/// Program label set → (run time in ns, run count) over one `secs` run of
/// the load with an agent started with `args` (BPF stats must be on).
fn measure_ns_per_event(args: &[&str], secs: u64, interval: u64) -> BTreeMap<String, (f64, f64)> {
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let agent = Agent::start(args);
    std::thread::sleep(Duration::from_millis(1200));
    let m0 = agent.scrape();
    let _ = stress(secs);
    std::thread::sleep(Duration::from_millis(1200 * interval));
    let m1 = agent.scrape();
    for (k, v) in &m1 {
        if let Some(labels) = k.strip_prefix("perch_bpf_program_run_time_seconds") {
            let count_key = format!("perch_bpf_program_run_count_total{labels}");
            let dt = v - m0.get(k).copied().unwrap_or(0.0);
            let dc = m1.get(&count_key).copied().unwrap_or(0.0)
                - m0.get(&count_key).copied().unwrap_or(0.0);
            let e = out.entry(labels.to_owned()).or_default();
            e.0 += dt * 1e9;
            e.1 += dc;
        }
    }
    assert!(agent.stop(), "agent did not stop cleanly");
    out
}

/// The programs of `runs` that `keep` accepts and that ran, as a table.
fn print_ns_per_event(runs: &BTreeMap<String, (f64, f64)>, keep: impl Fn(&str) -> bool) {
    println!("| program | events | ns/event |");
    println!("|---|---:|---:|");
    for (labels, (ns, n)) in runs {
        if *n > 0.0 && keep(labels) {
            println!("| {labels} | {n:.0} | {:.1} |", ns / n);
        }
    }
}

fn main() {
    perch_tests::kernel::require_root();
    let pairs = arg("--pairs", 5);
    let secs = arg("--secs", 10);
    let interval = arg("--interval-secs", 1);
    let stats = perch_tests::kernel::BpfStats::save();

    // 1. Slowdown: alternating runs without and with the agent, BPF stats
    //    off (as users run it: the stats add two clock reads per program
    //    run, which is the measurement's cost, not the agent's).
    stats.set(false);
    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut per_collection = Vec::new();
    let mut rss = 0u64;
    for i in 0..pairs {
        // Alternate the order so drift (thermal, other load) hits both sides.
        for with_agent in if i % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            if !with_agent {
                without.push(stress(secs));
                continue;
            }
            let agent = Agent::start(&["--interval", &format!("{interval}s")]);
            let pid = agent.pid();
            std::thread::sleep(Duration::from_millis(1200));
            let (cpu0, _) = process_cpu_rss(pid);
            with.push(stress(secs));
            std::thread::sleep(Duration::from_millis(1200 * interval));
            let (cpu1, rss_kb) = process_cpu_rss(pid);
            rss = rss.max(rss_kb);
            per_collection.push((cpu1 - cpu0) / ((secs + 1) as f64 / interval as f64));
            assert!(agent.stop(), "agent did not stop cleanly");
        }
    }

    // 2. ns per event: one run under the same load with BPF stats on, read
    //    from the agent's own perch.bpf.program.run.* self-metrics; then the
    //    same with the previous task's state read from task_struct (the
    //    path kernels before 5.18 take), so the two sched_switch variants
    //    are measured side by side.
    stats.set(true);
    let interval_arg = format!("{interval}s");
    let ns_per_event = measure_ns_per_event(&["--interval", &interval_arg], secs, interval);
    let cfg = ConfigFile::new("[probes.sched]\nprev_state = \"task_struct\"\n");
    let ns_task_struct = measure_ns_per_event(
        &["--interval", &interval_arg, "--config", cfg.path()],
        secs,
        interval,
    );
    // 3. Attribution on and off, alternating, sched_switch only.
    let attribution_pairs = arg("--attribution-pairs", 3);
    let unattributed = ConfigFile::new("[probes.sched]\nrunqueue_per_cgroup = false\n");
    let switch_ns = |runs: &BTreeMap<String, (f64, f64)>| {
        let (ns, n) = runs
            .iter()
            .filter(|(labels, _)| labels.contains("sched_switch"))
            .fold((0.0, 0.0), |(a, b), (_, (ns, n))| (a + ns, b + n));
        if n > 0.0 {
            ns / n
        } else {
            f64::NAN
        }
    };
    let (mut on_ns, mut off_ns) = (Vec::new(), Vec::new());
    for i in 0..attribution_pairs {
        for on in if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            let mut args = vec!["--interval", interval_arg.as_str()];
            if !on {
                args.extend_from_slice(&["--config", unattributed.path()]);
            }
            let runs = measure_ns_per_event(&args, secs, interval);
            if on { &mut on_ns } else { &mut off_ns }.push(switch_ns(&runs));
        }
    }
    drop(stats);

    let ratio = mean(&with) / mean(&without);
    println!("## bench cpu: stress-ng --switch 2, {pairs} alternating pairs of {secs} s, interval {interval} s\n");
    println!("ns/event: one more {secs} s run with kernel.bpf_stats_enabled=1\n");
    print_ns_per_event(&ns_per_event, |_| true);
    println!("\nwith probes.sched.prev_state = \"task_struct\" (the pre-5.18 path):\n");
    print_ns_per_event(&ns_task_struct, |labels| labels.contains("sched_"));
    println!(
        "\nsched_switch with per-container attribution (probes.sched.runqueue_per_cgroup), \
         {attribution_pairs} alternating pairs:\n"
    );
    println!("| attribution | ns/event (mean) | runs |");
    println!("|---|---:|---|");
    println!("| on | {:.1} | {on_ns:.1?} |", mean(&on_ns));
    println!("| off | {:.1} | {off_ns:.1?} |", mean(&off_ns));
    println!("| difference | {:+.1} | |", mean(&on_ns) - mean(&off_ns));
    println!();
    println!("| figure | value |");
    println!("|---|---:|");
    println!(
        "| load without agent (bogo-ops/s, mean) | {:.0} |",
        mean(&without)
    );
    println!(
        "| load with agent (bogo-ops/s, mean) | {:.0} |",
        mean(&with)
    );
    println!("| throughput ratio with/without | {ratio:.4} |");
    println!("| slowdown | {:.2} % |", (1.0 - ratio) * 100.0);
    println!(
        "| agent CPU per collection | {:.2} ms |",
        mean(&per_collection) * 1000.0
    );
    println!("| agent max RSS | {:.1} MB |", rss as f64 / 1024.0);
    println!("\nruns without: {without:.0?}\nruns with:    {with:.0?}");
}
