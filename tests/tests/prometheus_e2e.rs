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
