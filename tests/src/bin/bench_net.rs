//! `cargo xtask bench net`: the TCP family's cost, printed as markdown.
//!
//! 1. Load: iperf3 between two network namespaces joined by a veth pair
//!    (`NetnsPair`), for two write sizes: bulk (128 KiB, iperf3's default)
//!    and small (1 KiB, many more `sendmsg`/`recvmsg` events per byte).
//! 2. Throughput with vs without the agent: runs alternate (without, with,
//!    without, with, ...) so drift in the machine hits both sides; the
//!    ratio is mean(with) / mean(without). The agent is `perch run` with
//!    only the TCP family on (`--probe tcp=ebpf`, the others off), so the
//!    figure is this family's cost. Target ≥ 97 %.
//!    These runs have BPF stats off, as users run the agent (the stats add
//!    two clock reads per program run: the measurement's cost).
//! 3. ns per event per program: one more run per write size with
//!    `kernel.bpf_stats_enabled=1`, which makes the kernel account
//!    `run_time_ns` / `run_cnt` per program (read with `bpftool prog show
//!    --json` before the agent stops). Target ≤ 150 ns.
//!
//! Needs root, iperf3 and bpftool. The previous `bpf_stats_enabled` value is
//! restored at the end, also on a panic.
//!
//! Usage: bench_net [--secs N] [--rounds N]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use perch_tests::kernel::{require_root, sh};
use perch_tests::netns::NetnsPair;
use perch_tests::perch::Agent;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
        .unwrap_or(default)
}

/// iperf3 server in namespace `b`; killed (by its own pid) on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 run from `a`: received throughput in bit/s.
fn iperf(pair: &NetnsPair, port: u16, secs: u64, len: u64) -> f64 {
    let out = sh(&format!(
        "ip netns exec {a} iperf3 -c {ip} -p {port} -t {secs} -l {len} -J",
        a = pair.a,
        ip = pair.ip_b
    ));
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("iperf3 JSON: {e}\n{out}"));
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no end.sum_received.bits_per_second in iperf3 output:\n{out}"))
}

/// `run_time_ns`, `run_cnt` of every loaded program whose name starts with
/// `tcp_`, by name.
fn tcp_prog_stats() -> BTreeMap<String, (u64, u64)> {
    let out = sh("bpftool prog show --json");
    let v: serde_json::Value = serde_json::from_str(&out).expect("bpftool JSON");
    let mut m = BTreeMap::new();
    for p in v.as_array().expect("program list") {
        let name = p["name"].as_str().unwrap_or("");
        if !name.starts_with("tcp_") {
            continue;
        }
        let e = m.entry(name.to_owned()).or_insert((0, 0));
        e.0 += p["run_time_ns"].as_u64().unwrap_or(0);
        e.1 += p["run_cnt"].as_u64().unwrap_or(0);
    }
    m
}

fn main() {
    require_root();
    let secs = arg("--secs", 5);
    let rounds = arg("--rounds", 3);
    let stats = perch_tests::kernel::BpfStats::save();

    let pair = NetnsPair::new();
    let port = 5201;
    let server = Server(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &pair.b,
                "iperf3",
                "-s",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting iperf3 -s (apt-get install iperf3)"),
    );
    std::thread::sleep(Duration::from_millis(500));

    let agent_args = [
        "--interval",
        "1s",
        "--probe",
        "tcp=ebpf",
        "--probe",
        "sched=off",
        "--probe",
        "softirq=off",
        "--probe",
        "drops=off",
        "--probe",
        "interfaces=off",
        "--probe",
        "connections=off",
        "--probe",
        "cpu=off",
    ];
    let profiles = [
        ("bulk, 128 KiB writes", 131_072u64),
        ("small, 1 KiB writes", 1024),
    ];
    let mut rows = Vec::new();
    let mut progs: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (label, len) in profiles {
        let (mut without, mut with) = (Vec::new(), Vec::new());
        stats.set(false);
        for r in 0..rounds {
            without.push(iperf(&pair, port, secs, len));
            let agent = Agent::start(&agent_args);
            with.push(iperf(&pair, port, secs, len));
            assert!(agent.stop(), "perch run did not exit cleanly");
            eprintln!(
                "{label} round {}: without {:.2} Gbit/s, with {:.2} Gbit/s",
                r + 1,
                without[r as usize] / 1e9,
                with[r as usize] / 1e9
            );
        }
        stats.set(true);
        let agent = Agent::start(&agent_args);
        let _ = iperf(&pair, port, secs, len);
        for (name, (t, n)) in tcp_prog_stats() {
            let e = progs.entry(name).or_insert((0, 0));
            e.0 += t;
            e.1 += n;
        }
        assert!(agent.stop(), "perch run did not exit cleanly");
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        rows.push((label, mean(&without), mean(&with)));
    }
    drop(server);
    drop(stats);

    println!("### TCP family: ns per event (kernel BPF stats, under the iperf3 loads)\n");
    println!("| program | events | ns/event | target |");
    println!("|---|---:|---:|---:|");
    for (name, (t, n)) in &progs {
        let per = if *n > 0 { *t as f64 / *n as f64 } else { 0.0 };
        println!("| `{name}` | {n} | {per:.0} | ≤ 150 |");
    }
    println!(
        "\n### Throughput with vs without the agent (alternating runs, {rounds} × {secs} s each)\n"
    );
    println!("| load | without (Gbit/s) | with (Gbit/s) | ratio | target |");
    println!("|---|---:|---:|---:|---:|");
    for (label, wo, w) in rows {
        println!(
            "| iperf3 over veth, {label} | {:.2} | {:.2} | {:.1} % | ≥ 97 % |",
            wo / 1e9,
            w / 1e9,
            100.0 * w / wo
        );
    }
}
