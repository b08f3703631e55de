//! CPU and scheduler families against the kernel's own counters, with the
//! real programs loaded, in eBPF mode and in forced-procfs mode.
//!
//! Privileged: run as root (`cargo xtask test`). These tests fail, never
//! skip, when they cannot load programs.

use std::time::Duration;

use perch_tests::kernel;
use perch_tests::perch::{self, collect, points, source, sum};
use perch_tests::workload;

const ROUND_TRIPS: u64 = 50_000;

/// eBPF mode: the context switches Perch counted in the kernel match
/// `/proc/stat ctxt` over exactly the same span within 2 %: the test samples
/// `ctxt` every 2 ms and reads it at perch's attach time (the counters'
/// start time) and collection time (the snapshot's time). The voluntary
/// split covers the workload's own voluntary switches, and the run-queue
/// histogram saw at least every wake-up of the workload.
#[test]
fn sched_ebpf_matches_proc_stat() {
    sched_ebpf_case(&[], "tp_btf");
}

/// The same on the `raw_tp` variant (`--skip-hook tp_btf`).
#[test]
fn sched_raw_tp_matches_proc_stat() {
    sched_ebpf_case(&["--skip-hook", "tp_btf"], "raw_tp");
}

/// The same on the classic tracepoint variant (the one kernels before 5.18
/// get), with tracefs mounted for the test if it is not.
#[test]
fn sched_tracepoint_matches_proc_stat() {
    let _tracefs = kernel::Tracefs::ensure();
    sched_ebpf_case(
        &["--skip-hook", "tp_btf", "--skip-hook", "raw_tp"],
        "tracepoint",
    );
}

/// The same, with the agent run the way the DaemonSet runs it (uid 0 with
/// only CAP_BPF and CAP_PERFMON, its own mount namespace, the host's /proc
/// and /sys at `proc_root`/`sys_root`, the host's pid namespace).
#[test]
fn sched_matches_proc_stat_as_the_daemonset_runs_it() {
    let root = tempfile::tempdir().expect("tempdir");
    sched_ebpf_case_in(&[], "tp_btf", Some(root.path()));
}

/// The same with the previous task's state read from `task_struct`, as
/// kernels before 5.18 (no `prev_state` argument) must: the voluntary split
/// still covers the workload's own voluntary switches.
#[test]
fn sched_state_from_task_struct_matches_proc_stat() {
    let cfg = perch::ConfigFile::new("[probes.sched]\nprev_state = \"task_struct\"\n");
    let path = cfg.path();
    for (extra, hook) in [
        (vec!["--config", path], "tp_btf"),
        (vec!["--config", path, "--skip-hook", "tp_btf"], "raw_tp"),
    ] {
        let snap = sched_ebpf_case_in(&extra, hook, None);
        let reason = perch::plan_entry(&snap, "sched")["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            reason.contains("state read from task_struct"),
            "{hook}: sched plan reason `{reason}` does not say the state comes from task_struct"
        );
    }
}

fn sched_ebpf_case(extra: &[&str], hook: &str) {
    sched_ebpf_case_in(extra, hook, None);
}

fn sched_ebpf_case_in(
    extra: &[&str],
    hook: &str,
    daemonset: Option<&std::path::Path>,
) -> serde_json::Value {
    let _serial = kernel::privileged();
    let window = Duration::from_secs(3);
    let sampler = kernel::CtxtSampler::start();
    let mut args = vec!["--probe", "sched=ebpf"];
    args.extend_from_slice(extra);
    let during = || workload::ping_pong_for(window - Duration::from_millis(300));
    let (snap, pp) = match daemonset {
        None => collect(&args, window, during),
        Some(root) => {
            let duration = format!("{}ms", window.as_millis());
            let mut full = vec!["collect", "--format", "json", "--duration", &duration];
            full.extend_from_slice(&args);
            perch::collect_with(perch::daemonset_command(root, &full), during)
        }
    };
    let samples = sampler.finish();
    assert_eq!(source(&snap, "sched"), "ebpf");
    assert_eq!(hook_of(&snap, "sched"), hook);

    let secs = |v: &serde_json::Value| {
        std::time::UNIX_EPOCH + Duration::from_secs_f64(v.as_f64().expect("a time"))
    };
    let p0 = points(&snap, "perch.cpu.context_switches")[0];
    let (attached, collected) = (secs(&p0["start_time"]), secs(&p0["time"]));
    let counted = sum(&snap, "perch.cpu.context_switches", &[]);
    let kernel_delta = samples.at(collected) - samples.at(attached);
    let err = (counted - kernel_delta).abs() / kernel_delta;
    eprintln!(
        "context switches: perch {counted}, /proc/stat over the same span {kernel_delta:.0} \
         ({:.3} % apart; sampling step up to {} switches); workload {pp:?}",
        err * 100.0,
        samples.max_step()
    );
    assert!(
        err < 0.02,
        "context switches: perch {counted}, /proc/stat delta {kernel_delta:.0} ({:.2} % apart)",
        err * 100.0
    );
    assert!(
        counted >= (2 * pp.round_trips) as f64,
        "fewer switches than the workload made: {counted}"
    );

    let voluntary = sum(
        &snap,
        "perch.cpu.context_switches",
        &[("perch.context_switch.type", "voluntary")],
    );
    assert!(
        voluntary >= pp.switches.voluntary as f64,
        "voluntary {voluntary} < the workload threads' own voluntary switches {}",
        pp.switches.voluntary
    );
    // Per-CPU series exist for every online CPU.
    let cpus: std::collections::BTreeSet<String> = points(&snap, "perch.cpu.context_switches")
        .iter()
        .map(|p| p["attributes"]["cpu.logical_number"].to_string())
        .collect();
    assert_eq!(cpus.len(), kernel::online_cpus(), "{cpus:?}");

    let h = points(&snap, "perch.scheduler.runqueue.latency");
    assert_eq!(h.len(), 1, "host-wide histogram by default");
    let count = h[0]["count"].as_u64().expect("count");
    let mean = perch_tests::perch::check_exponential(h[0]);
    eprintln!(
        "run-queue latency: {count} samples for {} workload wake-ups",
        pp.wakeups
    );
    assert!(
        count >= pp.wakeups,
        "run-queue latency count {count} < workload wake-ups {}",
        pp.wakeups
    );
    assert!(
        mean > 0.0 && mean < 0.1,
        "mean run-queue latency {mean} s is implausible"
    );
    snap
}

/// procfs mode: the counter is `/proc/stat ctxt` itself (no per-CPU or type
/// split), read between the test's own two reads, and there is no histogram.
#[test]
fn sched_procfs_is_proc_stat_ctxt() {
    let _serial = kernel::privileged();
    let before = kernel::ctxt();
    let (snap, pp) = collect(&["--probe", "sched=procfs"], Duration::from_secs(2), || {
        workload::ping_pong(ROUND_TRIPS / 4)
    });
    let after = kernel::ctxt();
    assert_eq!(source(&snap, "sched"), "procfs");
    let p = points(&snap, "perch.cpu.context_switches");
    assert_eq!(p.len(), 1, "one host-wide series: {p:?}");
    assert_eq!(p[0]["attributes"], serde_json::json!({}));
    let v = p[0]["value"].as_u64().expect("integer");
    assert!(
        before + 2 * pp.round_trips <= v && v <= after,
        "{before} <= {v} <= {after}"
    );
    assert!(points(&snap, "perch.scheduler.runqueue.latency").is_empty());
}

/// Scheduler wait time, per CPU in seconds. With `/proc/schedstat`
/// (`CONFIG_SCHEDSTATS`) it is that file, bracketed by the test's own reads,
/// in both modes. Without it, eBPF mode derives it from the kernel-side
/// run-queue latencies: it then covers at least the workload threads' own
/// `run_delay` (the kernel's per-task count) and equals the histogram's sum;
/// procfs mode has no source and leaves the metric out.
#[test]
fn scheduler_wait_time() {
    let _serial = kernel::privileged();
    if std::path::Path::new("/proc/schedstat").exists() {
        let read = || -> Vec<f64> {
            std::fs::read_to_string("/proc/schedstat")
                .unwrap()
                .lines()
                .filter(|l| l.starts_with("cpu"))
                .map(|l| l.split_whitespace().nth(8).unwrap().parse::<f64>().unwrap() / 1e9)
                .collect()
        };
        for mode in ["sched=ebpf", "sched=procfs"] {
            let before = read();
            let (snap, _) = collect(&["--probe", mode], Duration::from_millis(500), || {
                workload::ping_pong(10_000)
            });
            let after = read();
            for (cpu, (b, a)) in before.iter().zip(&after).enumerate() {
                let v = sum(
                    &snap,
                    "perch.scheduler.wait.time",
                    &[("cpu.logical_number", &cpu.to_string())],
                );
                assert!(*b <= v && v <= *a, "{mode} cpu{cpu}: {b} <= {v} <= {a}");
            }
        }
        return;
    }
    // No /proc/schedstat: this kernel lacks CONFIG_SCHEDSTATS.
    // Kernel stamps (the default where task_struct has sched_info): a wait
    // is recorded as the kernel adds it to the task's run_delay, from its
    // enqueue on the CPU it runs on. Pinned, the workload's waits are never
    // split by a migration, so all of its run_delay must be there.
    wait_time_case(&[], Some(kernel::online_cpus() - 1), "sched_info stamps");
    // Wake-up clock: whole waits from sched_wakeup, workload free to move.
    let cfg = std::env::temp_dir().join(format!("perch-wakeup-clock-{}.toml", std::process::id()));
    std::fs::write(&cfg, "[probes.sched]\nrunqueue_clock = \"wakeup\"\n").unwrap();
    wait_time_case(
        &["--config", cfg.to_str().unwrap()],
        None,
        "timed from sched_wakeup",
    );
    let _ = std::fs::remove_file(&cfg);

    let (snap, _) = collect(
        &["--probe", "sched=procfs"],
        Duration::from_millis(300),
        || (),
    );
    assert!(
        points(&snap, "perch.scheduler.wait.time").is_empty(),
        "procfs mode has no wait-time source here"
    );
}

/// eBPF wait time with `extra` args: it equals the run-queue histogram's
/// sum and covers the workload threads' own `run_delay`; the plan names the
/// clock (`clock` is a phrase of its reason).
fn wait_time_case(extra: &[&str], pin: Option<usize>, clock: &str) {
    let mut args = vec!["--probe", "sched=ebpf"];
    args.extend_from_slice(extra);
    let (snap, pp) = collect(&args, Duration::from_secs(3), || {
        workload::ping_pong_on(pin, 50_000)
    });
    let reason = perch::plan_entry(&snap, "sched")["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        reason.contains(clock),
        "sched plan reason `{reason}` lacks `{clock}`"
    );
    let wait = sum(&snap, "perch.scheduler.wait.time", &[]);
    let hist_sum = points(&snap, "perch.scheduler.runqueue.latency")[0]["sum"]
        .as_f64()
        .unwrap();
    assert!(
        (wait - hist_sum).abs() < 1e-6,
        "{clock}: wait {wait} != run-queue latency sum {hist_sum}"
    );
    let own = pp.switches.run_delay_ns as f64 / 1e9;
    eprintln!("{clock}: host-wide wait {wait:.6} s, the workload's own run_delay {own:.6} s");
    assert!(
        own > 0.0,
        "the workload threads report no run_delay: is CONFIG_SCHED_INFO off?"
    );
    assert!(
        wait >= own,
        "{clock}: host-wide wait {wait} s < the workload threads' own run_delay {own} s"
    );
    let count = points(&snap, "perch.scheduler.runqueue.latency")[0]["count"]
        .as_u64()
        .unwrap();
    eprintln!(
        "{clock}: {count} waits host-wide, the workload's own pcount {}",
        pp.switches.pcount
    );
    if pin.is_some() {
        // Each of the workload's arrivals after a wait is one sample.
        assert!(
            count >= pp.switches.pcount,
            "{clock}: {count} waits host-wide < the workload threads' own pcount {}",
            pp.switches.pcount
        );
    }
    assert_eq!(
        points(&snap, "perch.scheduler.wait.time").len(),
        kernel::online_cpus()
    );
    // The wake-up clock keeps one slot per live task that has waited; the
    // kernel's stamps need none. Entries are published with the capacity.
    let entries = points(&snap, "perch.bpf.map.entries");
    let point = entries
        .iter()
        .find(|p| p["attributes"]["perch.bpf.map"] == "SCHED_RUNQ_START")
        .unwrap_or_else(|| panic!("{clock}: no SCHED_RUNQ_START entries in {entries:?}"));
    assert_eq!(point["attributes"]["perch.bpf.map.capacity"], 16384);
    let slots = point["value"].as_f64().expect("numeric");
    let threads = kernel::live_threads();
    eprintln!("{clock}: SCHED_RUNQ_START holds {slots} slots, the host {threads} threads");
    if clock == "sched_info stamps" {
        assert_eq!(slots, 0.0, "{clock}: SCHED_RUNQ_START is in use");
    } else {
        assert!(
            slots > 0.0 && slots <= threads as f64,
            "{clock}: {slots} SCHED_RUNQ_START slots for {threads} live threads"
        );
    }
}

/// A thread pinned to the last CPU spins in user space for 3 s: Perch's
/// `system.cpu.time{mode=user}` for that CPU grows by at least the thread's
/// own CPU time and at most the wall time, and its idle time by no more than
/// what the spin left (right CPU, right mode, seconds not ticks).
/// The CPU family reads /proc/stat in both modes; run it in both.
#[test]
fn cpu_time_tracks_a_pinned_spinner() {
    let _serial = kernel::privileged();
    let cpu = kernel::online_cpus() - 1;
    for mode in ["cpu=auto", "cpu=procfs"] {
        let agent = perch::Agent::start(&["--interval", "1s", "--probe", mode]);
        let series = |m: &str| {
            format!(
                "system_cpu_time_seconds_total{{cpu_logical_number=\"{cpu}\",cpu_mode=\"{m}\"}}"
            )
        };
        // Let one collection land after start-up, then take the baseline.
        std::thread::sleep(Duration::from_millis(1500));
        let s0 = agent.scrape();
        let t0 = std::time::Instant::now();
        let spun = workload::spin_pinned(cpu, Duration::from_secs(3));
        // Wait for a collection after the spin ended.
        std::thread::sleep(Duration::from_millis(2200));
        let s1 = agent.scrape();
        let elapsed = t0.elapsed().as_secs_f64();
        let user = s1[&series("user")] - s0[&series("user")];
        let spun = spun.as_secs_f64();
        eprintln!(
            "{mode}: cpu{cpu} user time grew {user:.2} s; the spinner used {spun:.2} s of CPU"
        );
        // At least the spinner's own CPU time (less tick granularity), and no
        // more than the wall time that CPU had: other tasks may run there too.
        assert!(
            user >= spun - 0.05 && user <= elapsed + 1.1,
            "{mode}: cpu{cpu} user time grew {user:.2} s in {elapsed:.2} s; the spinner used {spun:.2} s"
        );
        // The scrapes are ~`elapsed` apart (each shows the collection before
        // it, at most one interval old): idle time fits in what the spin
        // left of that span, plus an interval of slack.
        let idle = s1[&series("idle")] - s0[&series("idle")];
        assert!(
            idle <= elapsed - spun + 1.1,
            "{mode}: cpu{cpu} idle grew {idle:.2} s in {elapsed:.2} s, {spun:.2} s of it spinning"
        );
        // Load average is exported as gauges.
        assert!(
            s1.contains_key("system_cpu_load_average_1m"),
            "no load average"
        );
        assert!(
            agent.stop(),
            "{mode}: perch did not exit cleanly on SIGTERM"
        );
    }
}

/// Softirq counts equal /proc/softirqs (bracketed), in both modes; in eBPF
/// mode the per-vector time is present and NET_RX time grows under a
/// loopback TCP load.
#[test]
fn softirq_counts_and_time() {
    let _serial = kernel::privileged();
    let _tracefs = kernel::Tracefs::ensure();
    for (mode, skip, hook) in [
        ("softirq=ebpf", &[][..], "tp_btf"),
        ("softirq=ebpf", &["tp_btf"][..], "raw_tp"),
        ("softirq=ebpf", &["tp_btf", "raw_tp"][..], "tracepoint"),
        ("softirq=procfs", &[][..], "none"),
    ] {
        let before = kernel::softirqs();
        let mut args = vec!["--probe", mode];
        for h in skip {
            args.extend(["--skip-hook", h]);
        }
        let (snap, bytes) = collect(&args, Duration::from_secs(3), || {
            loopback_blast(Duration::from_secs(2))
        });
        let after = kernel::softirqs();
        assert!(bytes > 10_000_000, "loopback load moved only {bytes} bytes");
        for ((name, b), (_, a)) in before.iter().zip(&after) {
            for (cpu, (bv, av)) in b.iter().zip(a).enumerate() {
                let v = sum(
                    &snap,
                    "perch.cpu.softirq.count",
                    &[
                        ("perch.softirq.vector", name),
                        ("cpu.logical_number", &cpu.to_string()),
                    ],
                );
                assert!(
                    *bv as f64 <= v && v <= *av as f64,
                    "{mode} {name} cpu{cpu}: {bv} <= {v} <= {av}"
                );
            }
        }
        let time = points(&snap, "perch.cpu.softirq.time");
        if mode == "softirq=ebpf" {
            assert_eq!(source(&snap, "softirq"), "ebpf");
            assert_eq!(hook_of(&snap, "softirq"), hook);
            let net_rx = sum(
                &snap,
                "perch.cpu.softirq.time",
                &[("perch.softirq.vector", "net_rx")],
            );
            assert!(
                net_rx > 0.001,
                "NET_RX time {net_rx} s under a loopback TCP load"
            );
            let total = sum(&snap, "perch.cpu.softirq.time", &[]);
            let cap = 3.5 * kernel::online_cpus() as f64;
            assert!(
                total < cap,
                "softirq time {total} s exceeds the window x CPUs"
            );
        } else {
            assert_eq!(source(&snap, "softirq"), "procfs");
            assert!(time.is_empty(), "procfs mode has no per-vector time");
        }
    }
}

/// The eBPF hook the plan chose for `family`.
fn hook_of(snapshot: &serde_json::Value, family: &str) -> String {
    perch::plan_entry(snapshot, family)["hook"]
        .as_str()
        .unwrap_or("none")
        .to_owned()
}

/// Sends bytes over loopback TCP for `wall`; returns the bytes received.
fn loopback_blast(wall: Duration) -> u64 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let rx = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break n,
                Ok(k) => n += k as u64,
            }
        }
    });
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    let buf = vec![7u8; 1 << 16];
    let start = std::time::Instant::now();
    while start.elapsed() < wall {
        c.write_all(&buf).unwrap();
    }
    drop(c);
    rx.join().unwrap()
}

/// `--probe cpu=ebpf` is refused with a message naming the family.
#[test]
fn forcing_ebpf_on_a_procfs_family_is_a_clear_error() {
    let _serial = kernel::privileged();
    let out = std::process::Command::new(perch_tests::perch_bin())
        .args(["collect", "--duration", "100ms", "--probe", "cpu=ebpf"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("probes.cpu.mode") && err.contains("the cpu family has no eBPF source"),
        "{err}"
    );
}

/// `perch features --json` reports the kernel facts and a plan in which the
/// eBPF families use tp_btf on this kernel (BTF present, tp_btf allowed).
#[test]
fn features_reports_the_plan() {
    let _serial = kernel::privileged();
    let out = std::process::Command::new(perch_tests::perch_bin())
        .args(["features", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["kernel"]["release"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    assert_eq!(v["kernel"]["btf"], btf);
    for fam in v["plan"]["families"].as_array().unwrap() {
        assert!(
            fam["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{fam}"
        );
        if fam["family"] == "sched" && btf {
            assert_eq!(fam["source"], "ebpf", "{fam}");
            assert_eq!(fam["hook"], "tp_btf", "{fam}");
        }
    }
}

/// Unexpected `/proc` content at run time: the failing collector's error is
/// logged once with the file and line, counted in
/// `perch.collector.errors{perch.component,error.type}` every interval, and
/// the other metrics keep coming.
#[test]
fn odd_proc_content_is_counted_and_collection_goes_on() {
    let _serial = kernel::privileged();
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["stat", "softirqs"] {
        std::fs::copy(format!("/proc/{f}"), dir.path().join(f)).expect("copy");
    }
    std::fs::write(dir.path().join("loadavg"), "0.5 garbage\n").expect("write");
    let out = std::process::Command::new(perch_tests::perch_bin())
        .args(["collect", "--duration", "200ms", "--format", "json"])
        // Only the families that read the files put in place above.
        .args(perch::only(&["cpu", "sched", "softirq"]))
        .env("PERCH_PROC_ROOT", dir.path())
        .output()
        .expect("perch");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("collector failed") && log.contains("loadavg: line 1"),
        "{log}"
    );
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let errors = sum(
        &snap,
        "perch.collector.errors",
        &[("perch.component", "cpu"), ("error.type", "malformed")],
    );
    assert_eq!(errors, 1.0, "one failed collection counted");
    assert!(
        !points(&snap, "system.cpu.time").is_empty(),
        "CPU time still collected"
    );
    assert!(
        !points(&snap, "perch.cpu.softirq.count").is_empty(),
        "other collectors went on"
    );
}

/// `nonvoluntary_ctxt_switches` of every thread of the host, by tid
/// (`/proc/<pid>/task/<tid>/status`).
fn all_tasks_nivcsw() -> std::collections::HashMap<String, u64> {
    let mut out = std::collections::HashMap::new();
    for p in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
                continue;
            };
            if let Some(n) = status
                .lines()
                .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                out.insert(t.file_name().to_string_lossy().into_owned(), n);
            }
        }
    }
    out
}

/// Involuntary switches are preemptions of real tasks, not the idle task
/// going back to sleep: under a preempting workload (two spinners sharing
/// CPU 0) `involuntary` agrees with the tasks' own `nivcsw` summed over the
/// host, scaled to perch's span inside the test's, and switches out of idle
/// are their own type. Before `idle` was split out, every switch out of the
/// idle task counted as involuntary (8 548 voluntary / 8 546 involuntary on
/// one CPU of a mostly idle 6.12 guest).
#[test]
fn involuntary_switches_match_the_tasks_nivcsw() {
    let _serial = kernel::privileged();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                workload::pin_to(0);
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for i in 0..10_000u64 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
                    }
                    std::hint::black_box(x);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let outer_start = std::time::SystemTime::now();
    let idle_before = idle_ticks();
    let before = all_tasks_nivcsw();
    let mut args = vec!["--probe", "sched=ebpf"];
    args.extend(perch::only(&["sched"]));
    let (snap, ()) = collect(&args, Duration::from_secs(3), || ());
    let after = all_tasks_nivcsw();
    let idle_ran = idle_ticks() - idle_before;
    let outer = outer_start.elapsed().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }

    let secs = |v: &serde_json::Value| Duration::from_secs_f64(v.as_f64().expect("a time"));
    let p0 = points(&snap, "perch.cpu.context_switches")[0];
    let span = secs(&p0["time"]) - secs(&p0["start_time"]);
    let by = |t: &str| {
        sum(
            &snap,
            "perch.cpu.context_switches",
            &[("perch.context_switch.type", t)],
        )
    };
    let (inv, idle, vol) = (by("involuntary"), by("idle"), by("voluntary"));
    // A thread that exits takes its count with it, so the comparison needs
    // a quiet host: the test's own threads live through the whole window.
    let exited = before.keys().filter(|t| !after.contains_key(*t)).count();
    assert!(
        exited <= 20,
        "{exited} threads exited during the window: this comparison needs a quiet host \
         (their nonvoluntary switches vanish from /proc)"
    );
    let delta: u64 = after
        .iter()
        .map(|(t, n)| n - before.get(t).copied().unwrap_or(0).min(*n))
        .sum();
    let delta = delta as f64;
    let expected = delta * span.as_secs_f64() / outer.as_secs_f64();
    eprintln!(
        "involuntary {inv}, idle {idle}, voluntary {vol} over {span:?}; tasks' nivcsw +{delta} \
         over {outer:?} (scaled to perch's span: {expected:.0}); idle ran {idle_ran} ticks"
    );
    // Perch's span lies inside the test's: never more than the tasks
    // counted, give or take the exited perch process's own few switches.
    assert!(
        inv <= delta + 200.0,
        "involuntary {inv} > the tasks' nivcsw delta {delta}: idle switches leaking in?"
    );
    // The spinners preempt each other at a steady rate, so perch's share of
    // the tasks' count is about its share of the time.
    assert!(
        inv >= 0.8 * expected,
        "involuntary {inv} < 80 % of the tasks' nivcsw over perch's span ({expected:.0})"
    );
    // The idle task ran (the kernel's own idle time grew by half a second
    // or more, so it also switched out): those switches are counted, as
    // their own type.
    if idle_ran >= 50 {
        assert!(
            idle > 0.0,
            "/proc/stat idle grew {idle_ran} ticks, but no switch out of idle was counted"
        );
    }
}

/// Host-wide idle time from `/proc/stat`, in ticks.
fn idle_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu = stat.lines().next().expect("the cpu line");
    cpu.split_whitespace()
        .nth(4)
        .and_then(|v| v.parse().ok())
        .expect("idle ticks")
}
