//! `cargo xtask bench net`: the TCP family's cost, printed as markdown.
//!
//! The agent is `perch run --interval 1s` with only the TCP family on
//! (`--probe tcp=ebpf`), so every figure is this family's. `--raw-tp` runs
//! the per-I/O `raw_tp` variant instead of the default socket-counter one.
//! All traffic runs between two network namespaces joined by a veth pair
//! (`NetnsPair`); the agent stays in the host's namespace.
//!
//! 1. Loads, each run alternately without and with the agent (in ABBA
//!    order: drift hits both sides), with BPF stats off as
//!    users run the agent (the stats add two clock reads per program run:
//!    the measurement's cost); the ratio is mean(with) / mean(without).
//!    Target ≥ 97 %.
//!    - iperf3 over the veth, bulk (128 KiB writes, its default), and over
//!      namespace `a`'s loopback, bulk and small (1 KiB writes: many more
//!      `sendmsg`/`recvmsg` per byte; over the veth this load flips between
//!      two scheduling regimes with or without the agent, so its ratio says
//!      little);
//!    - connection churn, over the veth and over the loopback: one client
//!      opening connections back to back (connect, 100 bytes each way,
//!      close), the load on which a per-connection program shows.
//! 2. ns per event per program: one more run of each load with
//!    `kernel.bpf_stats_enabled=1`, which makes the kernel account
//!    `run_time_ns` / `run_cnt` per program (read with `bpftool prog show
//!    --json` before the agent stops). Target ≤ 150 ns.
//! 3. The walk (`tcp_walk`, socket counters only): `--sockets K` idle
//!    connections held open (2K sockets), BPF stats on, 10 collections:
//!    ns per file visited, time per walk, and the agent's CPU per
//!    collection and RSS.
//!
//! Needs root, iperf3 and bpftool. The previous `bpf_stats_enabled` value is
//! restored at the end, also on a panic.
//!
//! Usage: bench_net [--secs N] [--rounds N] [--sockets K] [--raw-tp]
//!                  [--per-cgroup] [--no-iperf] [--no-churn] [--no-walk]
//!                  [--only TEXT]
//!
//! `--per-cgroup` turns `probes.tcp.per_cgroup` on (peers and connection
//! counters keyed by the socket's cgroup too).
//!
//! `--only TEXT` runs only the loads whose label contains TEXT (e.g.
//! `--only "1 KiB"`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use perch_tests::bench::{arg, arg_str, flag, mean, process_cpu_rss};
use perch_tests::kernel::{require_root, sh, BpfStats};
use perch_tests::netns::NetnsPair;
use perch_tests::perch::Agent;

/// iperf3 server in namespace `b`; killed (by its own pid) on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 run from `a` to `ip` (its loopback, or `b` over the veth):
/// received throughput in bit/s.
fn iperf(pair: &NetnsPair, ip: &str, port: u16, secs: u64, len: u64) -> f64 {
    let out = sh(&format!(
        "ip netns exec {a} iperf3 -c {ip} -p {port} -t {secs} -l {len} -J",
        a = pair.a,
    ));
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("iperf3 JSON: {e}\n{out}"));
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no end.sum_received.bits_per_second in iperf3 output:\n{out}"))
}

/// Serves churn connections on `ip:port` in namespace `ns` until the
/// process ends: reads 100 bytes, answers 100, closes first (the server
/// side takes the TIME_WAIT, so the client never runs out of ports).
fn churn_server(pair: &NetnsPair, ns: &str, ip: Ipv4Addr, port: u16) {
    let addr = SocketAddrV4::new(ip, port);
    let l = pair
        .run_in(ns, move || TcpListener::bind(addr).expect("bind churn"))
        .join()
        .expect("bind thread");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut b = [0u8; 100];
            if s.read_exact(&mut b).is_ok() {
                let _ = s.write_all(&b);
            }
        }
    });
}

/// Connections per second of one client in `a` to `ip:port` over `secs`.
fn churn(pair: &NetnsPair, ip: Ipv4Addr, port: u16, secs: u64) -> f64 {
    let n = pair
        .run_in(&pair.a, move || {
            let end = Instant::now() + Duration::from_secs(secs);
            let start = Instant::now();
            let mut n = 0u64;
            while Instant::now() < end {
                let mut s = TcpStream::connect(SocketAddrV4::new(ip, port)).expect("connect");
                s.write_all(&[7u8; 100]).expect("write");
                let mut b = [0u8; 100];
                s.read_exact(&mut b).expect("read");
                // The server's FIN.
                let _ = s.read(&mut b);
                n += 1;
            }
            n as f64 / start.elapsed().as_secs_f64()
        })
        .join()
        .expect("churn client");
    assert!(n > 0.0, "no connections");
    n
}

/// `run_time_ns`, `run_cnt` per program name.
type ProgStats = BTreeMap<String, (u64, u64)>;

/// [`ProgStats`] of every loaded program whose name starts with `tcp_`.
fn tcp_prog_stats() -> ProgStats {
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

/// `after - before`, per program.
fn delta(after: &ProgStats, before: &ProgStats) -> ProgStats {
    after
        .iter()
        .map(|(k, (t, n))| {
            let (t0, n0) = before.get(k).copied().unwrap_or((0, 0));
            (k.clone(), (t - t0, n - n0))
        })
        .collect()
}

/// Open file descriptors of every process (what the walk visits).
fn open_files() -> usize {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_name().to_str()?.parse::<u32>().ok()?;
            Some(std::fs::read_dir(e.path().join("fd")).ok()?.count())
        })
        .sum()
}

/// A load: its label, its unit, and one run of it.
struct Load<'a> {
    label: &'static str,
    unit: &'static str,
    scale: f64,
    run: Box<dyn Fn() -> f64 + 'a>,
}

fn main() {
    require_root();
    let secs = arg("--secs", 5);
    let rounds = arg("--rounds", 3) as usize;
    let sockets = arg("--sockets", 2000) as usize;
    let raw = flag("--raw-tp");
    let stats = BpfStats::save();

    let pair = NetnsPair::new();
    let (iperf_port, churn_port, idle_port) = (5201, 5301, 5401);
    // iperf3 servers: in `b` (over the veth) and in `a` (its loopback).
    let _servers = [&pair.b, &pair.a].map(|ns| {
        Server(
            Command::new("ip")
                .args(["netns", "exec", ns, "iperf3", "-s", "-p"])
                .arg(iperf_port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting iperf3 -s (apt-get install iperf3)"),
        )
    });
    let veth = pair.ip_b.to_string();
    churn_server(&pair, &pair.b, pair.ip_b, churn_port);
    churn_server(&pair, &pair.a, Ipv4Addr::LOCALHOST, churn_port);
    std::thread::sleep(Duration::from_millis(500));

    let mut agent_args = vec!["--interval", "1s", "--probe", "tcp=ebpf"];
    agent_args.extend(perch_tests::perch::only(&["tcp"]));
    if raw {
        agent_args.extend(["--skip-hook", "tp_btf"]);
    }
    // `--per-cgroup`: peers and connection counters also keyed by the
    // socket's cgroup (`probes.tcp.per_cgroup`).
    let per_cgroup = flag("--per-cgroup")
        .then(|| perch_tests::perch::ConfigFile::new("[probes.tcp]\nper_cgroup = true\n"));
    if let Some(cfg) = &per_cgroup {
        agent_args.extend(["--config", cfg.path()]);
    }
    let loads = [
        Load {
            label: "iperf3 over veth, bulk (128 KiB writes)",
            unit: "Gbit/s",
            scale: 1e-9,
            run: Box::new(|| iperf(&pair, &veth, iperf_port, secs, 131_072)),
        },
        Load {
            label: "iperf3 over loopback, bulk (128 KiB writes)",
            unit: "Gbit/s",
            scale: 1e-9,
            run: Box::new(|| iperf(&pair, "127.0.0.1", iperf_port, secs, 131_072)),
        },
        Load {
            label: "iperf3 over loopback, small (1 KiB writes)",
            unit: "Gbit/s",
            scale: 1e-9,
            run: Box::new(|| iperf(&pair, "127.0.0.1", iperf_port, secs, 1024)),
        },
        Load {
            label: "connection churn over veth (connect, 100 B each way, close)",
            unit: "conn/s",
            scale: 1.0,
            run: Box::new(|| churn(&pair, pair.ip_b, churn_port, secs)),
        },
        Load {
            label: "connection churn over loopback (connect, 100 B each way, close)",
            unit: "conn/s",
            scale: 1.0,
            run: Box::new(|| churn(&pair, Ipv4Addr::LOCALHOST, churn_port, secs)),
        },
    ];
    let mut rows = Vec::new();
    let mut per_load: Vec<(&str, ProgStats)> = Vec::new();
    let skip: Vec<&str> = [("--no-iperf", "iperf3"), ("--no-churn", "connection churn")]
        .into_iter()
        .filter(|(f, _)| flag(f))
        .map(|(_, prefix)| prefix)
        .collect();
    let only = arg_str("--only");
    for load in loads.iter().filter(|l| {
        !skip.iter().any(|p| l.label.starts_with(p))
            && only.as_deref().is_none_or(|o| l.label.contains(o))
    }) {
        let (mut without, mut with) = (Vec::new(), Vec::new());
        stats.set(false);
        for r in 0..rounds {
            // ABBA: the order alternates, so a drift within a pair (caches,
            // the host's other guests) does not always favour one side.
            for with_agent in [r % 2 == 1, r % 2 == 0] {
                if !with_agent {
                    without.push((load.run)());
                    continue;
                }
                let agent = Agent::start(&agent_args);
                // Past start-up (BTF parsing, loading, the first walk).
                std::thread::sleep(Duration::from_secs(1));
                with.push((load.run)());
                assert!(agent.stop(), "perch run did not exit cleanly");
            }
            eprintln!(
                "{} round {}: without {:.2} {u}, with {:.2} {u}",
                load.label,
                r + 1,
                without[r] * load.scale,
                with[r] * load.scale,
                u = load.unit
            );
        }
        stats.set(true);
        let agent = Agent::start(&agent_args);
        let before = tcp_prog_stats();
        let _ = (load.run)();
        let d = delta(&tcp_prog_stats(), &before);
        assert!(agent.stop(), "perch run did not exit cleanly");
        per_load.push((load.label, d));
        rows.push((load, mean(&without), mean(&with), without, with));
    }

    // The walk: K idle connections, 10 collections, stats on.
    let walk = (!raw && !flag("--no-walk")).then(|| {
        let addr = SocketAddrV4::new(pair.ip_b, idle_port);
        let l = pair
            .run_in(&pair.b, move || TcpListener::bind(addr).expect("bind idle"))
            .join()
            .expect("bind thread");
        let ip = pair.ip_b;
        let accept = std::thread::spawn(move || {
            (0..sockets)
                .map(|_| l.accept().expect("accept").0)
                .collect::<Vec<TcpStream>>()
        });
        let clients = pair
            .run_in(&pair.a, move || {
                (0..sockets)
                    .map(|_| TcpStream::connect(SocketAddrV4::new(ip, idle_port)).expect("connect"))
                    .collect::<Vec<_>>()
            })
            .join()
            .expect("idle clients");
        let servers = accept.join().expect("accept thread");
        stats.set(true);
        let agent = Agent::start(&agent_args);
        std::thread::sleep(Duration::from_millis(1500));
        let (cpu0, _) = process_cpu_rss(agent.pid());
        let before = tcp_prog_stats();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(10));
        let d = delta(&tcp_prog_stats(), &before);
        let (cpu1, rss) = process_cpu_rss(agent.pid());
        let elapsed = t0.elapsed().as_secs_f64();
        assert!(agent.stop(), "perch run did not exit cleanly");
        drop((clients, servers));
        let (t, n) = d.get("tcp_walk").copied().unwrap_or((0, 0));
        let files = open_files();
        (t, n, (cpu1 - cpu0) / elapsed, rss, elapsed, files)
    });
    drop(stats);

    let variant = if raw {
        "raw_tp (per I/O)"
    } else {
        "tp_btf (socket counters)"
    };
    println!("### TCP family, {variant}: ns per event (kernel BPF stats)\n");
    println!("| load | program | events | ns/event | target |");
    println!("|---|---|---:|---:|---:|");
    for (label, progs) in &per_load {
        for (name, (t, n)) in progs {
            if name == "tcp_walk" {
                continue;
            }
            let per = if *n > 0 {
                format!("{:.0}", *t as f64 / *n as f64)
            } else {
                "-".into()
            };
            println!("| {label} | `{name}` | {n} | {per} | ≤ 150 |");
        }
    }
    println!(
        "\n### Throughput with vs without the agent (alternating runs, {rounds} × {secs} s each, BPF stats off)\n"
    );
    println!("| load | without | with | ratio | target |");
    println!("|---|---:|---:|---:|---:|");
    for (load, wo, w, _, _) in &rows {
        println!(
            "| {} | {:.2} {u} | {:.2} {u} | {:.1} % | ≥ 97 % |",
            load.label,
            wo * load.scale,
            w * load.scale,
            100.0 * w / wo,
            u = load.unit
        );
    }
    println!();
    for (load, _, _, wo, w) in &rows {
        let f = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{:.2}", x * load.scale))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!("- {}: without {}; with {}", load.label, f(wo), f(w));
    }
    if let Some((t, n, cpu, rss, elapsed, files)) = walk {
        let walks = elapsed.round();
        println!(
            "\n### The walk (`tcp_walk`, iter/task_file): {sockets} idle connections ({} sockets), {files} open files on the host, 1 s interval\n",
            2 * sockets
        );
        println!("| figure | value |");
        println!("|---|---:|");
        println!("| files visited per walk | {:.0} |", n as f64 / walks);
        println!(
            "| ns per file visited | {:.0} |",
            t as f64 / n.max(1) as f64
        );
        println!(
            "| walk time per collection | {:.2} ms |",
            t as f64 / walks / 1e6
        );
        println!("| agent CPU per collection | {:.2} ms |", cpu * 1e3);
        println!("| agent RSS | {:.1} MB |", rss as f64 / 1024.0);
    }
}
