//! End to end with a real Prometheus (apt `prometheus`): the agent runs as
//! the systemd unit would (`perch run`, 1 s interval), Prometheus scrapes
//! it, and its HTTP API answers `up == 1` and Perch's own series; `/readyz`
//! answers 200.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use perch_tests::perch::{free_port, http_get, Agent};

struct Prometheus(Child);
impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `%`-encodes a PromQL query for a URL.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The result vector of an instant query.
fn query(prom: SocketAddr, q: &str) -> Vec<serde_json::Value> {
    let (code, body) = http_get(prom, &format!("/api/v1/query?query={}", encode(q)))
        .unwrap_or_else(|e| panic!("querying Prometheus for {q}: {e}"));
    assert_eq!(code, 200, "{q}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("query JSON");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[test]
fn prometheus_scrapes_perch() {
    let _serial = perch_tests::kernel::privileged();
    let agent = Agent::start(&["--interval", "1s"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: perch\n    static_configs:\n      - targets: [\"{}\"]\n",
            agent.addr
        ),
    )
    .unwrap();
    let prom_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _prom = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (apt prometheus; `cargo xtask setup --test` installs it)"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let up = loop {
        if let Ok((200, _)) = http_get(prom_addr, "/-/ready") {
            let r = query(prom_addr, "up{job=\"perch\"}");
            if r.first().and_then(|s| s["value"][1].as_str()) == Some("1") {
                break r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw up{{job=\"perch\"}} == 1"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("up: {up:?}");
    // Perch's own series, as Prometheus stored them from the scrape.
    let sched = query(
        prom_addr,
        "perch_probe_state{job=\"perch\",perch_family=\"sched\",perch_probe_source=\"ebpf\"}",
    );
    assert_eq!(sched.len(), 1, "sched's probe state: {sched:?}");
    let rss = query(prom_addr, "process_resident_memory_bytes{job=\"perch\"}");
    let rss: f64 = rss
        .first()
        .and_then(|s| s["value"][1].as_str())
        .and_then(|v| v.parse().ok())
        .expect("process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 128.0 * 1024.0 * 1024.0, "RSS {rss}");
    let switches = query(
        prom_addr,
        "sum(perch_cpu_context_switches_total{job=\"perch\"})",
    );
    assert_eq!(switches.len(), 1, "{switches:?}");
    let (code, body) = agent.get("/readyz").expect("/readyz");
    assert_eq!(code, 200, "/readyz: {body}");
    let ready = query(prom_addr, "perch_ready{job=\"perch\"}");
    eprintln!("perch_ready: {ready:?}; RSS {rss} B");
}

/// Program run statistics are published only while the host counts them
/// (`kernel.bpf_stats_enabled=1`): with it off there is no
/// `perch_bpf_program_run_count_total` to mistake for a measured zero, and
/// `/status` says why; with it on, the attached programs' runs are there.
#[test]
fn bpf_run_stats_are_published_only_while_the_kernel_counts_them() {
    let _serial = perch_tests::kernel::privileged();
    let stats = perch_tests::kernel::BpfStats::save();
    stats.set(false);
    let agent = Agent::start(&["--interval", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let off = agent.scrape();
    assert!(
        !off.keys().any(|k| k.starts_with("perch_bpf_program_run")),
        "run stats published with kernel.bpf_stats_enabled=0"
    );
    let (_, status) = agent.get("/status").expect("/status");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        status["bpf_stats"]["enabled"], false,
        "{}",
        status["bpf_stats"]
    );
    assert!(
        status["bpf_stats"]["note"]
            .as_str()
            .is_some_and(|n| n.contains("bpf_stats_enabled=1")),
        "{}",
        status["bpf_stats"]
    );
    stats.set(true);
    std::thread::sleep(Duration::from_millis(2500));
    let on = agent.scrape();
    let runs: f64 = on
        .iter()
        .filter(|(k, _)| {
            k.starts_with("perch_bpf_program_run_count_total") && k.contains("sched_switch")
        })
        .map(|(_, v)| *v)
        .sum();
    assert!(
        runs > 0.0,
        "no sched_switch runs counted with stats on: {on:?}"
    );
}
