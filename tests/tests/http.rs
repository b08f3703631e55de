//! The agent's HTTP endpoint against the real `perch run` binary, on
//! loopback: the listener's bounds under hostile clients (issue 10: slow
//! never-ending headers, idle connections under a 1024-fd limit) and
//! `/healthz`, `/readyz`, `/status`, 404 and 405 (issue 11 §2).
//!
//! Figures (RSS, fds) are printed; run with `--nocapture` to see them.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use perch_tests::perch::{parse_prometheus, Agent};
use serde_json::Value;

const MIB: u64 = 1024 * 1024;

/// VmRSS of `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One request with `method`; (status, body). Connection: close.
fn request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_owned()))
}

/// Polls GET `path` from fresh connections until it answers `want` or
/// `within` passes; returns the last answer and how long it took.
fn wait_for(agent: &Agent, path: &str, want: u16, within: Duration) -> (u16, String, Duration) {
    let start = Instant::now();
    loop {
        let (code, body) = agent.get(path).unwrap_or((0, String::new()));
        if code == want || start.elapsed() > within {
            return (code, body, start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Lets this test process hold more sockets than the default 1024.
fn raise_own_nofile(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on our own process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_cur.max(n);
        lim.rlim_max = lim.rlim_max.max(n);
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim),
            0,
            "raising our own RLIMIT_NOFILE to {n}"
        );
    }
}

fn collector_errors(m: &std::collections::BTreeMap<String, f64>) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with("perch_collector_errors_total"))
        .map(|(_, v)| v)
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0, which prints as "-0"
}

fn refused(m: &std::collections::BTreeMap<String, f64>, reason: &str) -> f64 {
    m.get(&format!(
        "perch_http_connections_refused_total{{reason=\"{reason}\"}}"
    ))
    .copied()
    .unwrap_or(0.0)
}

/// Issue 10, critical row: 600 connections each sending `GET /metrics` and
/// a 380 KB header that never ends.
#[test]
fn slow_header_attack_keeps_rss_bounded_and_recovers() {
    let _g = perch_tests::serial();
    raise_own_nofile(4096);
    let agent = Agent::start(&["--interval", "1s"]);
    let pid = agent.pid();
    // Steady state: a few collections and a scrape.
    std::thread::sleep(Duration::from_secs(3));
    let _ = agent.scrape();
    let baseline = rss(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let addr = agent.addr;
    let header = format!(
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}",
        "a".repeat(380 * 1024)
    );
    let started = Instant::now();
    // Four threads of 150 connections; each keeps its sockets open (the
    // header never ends) until the test is done with them.
    let attackers: Vec<_> = (0..4)
        .map(|_| {
            let header = header.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for _ in 0..150 {
                    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    else {
                        continue;
                    };
                    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                    let _ = s.write_all(header.as_bytes());
                    held.push(s);
                }
                held
            })
        })
        .collect();
    let held: Vec<TcpStream> = attackers
        .into_iter()
        .flat_map(|t| t.join().expect("attacker"))
        .collect();
    let sent = started.elapsed();
    // A fresh probe is answered while the attackers still hold their sockets.
    let (code, body, took) = wait_for(&agent, "/healthz", 200, Duration::from_secs(15));
    let under_attack = peak.load(Ordering::Relaxed);
    let fds_under = open_fds(pid);
    drop(held);

    // RSS returns near the baseline once the connections are gone.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut after = rss(pid);
    while after > baseline + 8 * MIB && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        after = rss(pid);
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    // Two collections after, so the limiter has seen the current RSS.
    std::thread::sleep(Duration::from_secs(2));
    let m = agent.scrape();
    println!(
        "slow-header attack: 600 connections x 380 KB sent in {sent:?}; RSS baseline {:.1} MiB, \
         peak under attack {:.1} MiB, after {:.1} MiB; agent fds under attack {fds_under}; \
         /healthz {code} after {took:?}; refused: limit {} evicted {} header_too_large {} \
         header_timeout {}",
        baseline as f64 / MIB as f64,
        under_attack as f64 / MIB as f64,
        after as f64 / MIB as f64,
        refused(&m, "limit"),
        refused(&m, "evicted"),
        refused(&m, "header_too_large"),
        refused(&m, "header_timeout"),
    );
    assert_eq!(code, 200, "/healthz during the attack: {body}");
    assert!(
        under_attack < 64 * MIB,
        "RSS under attack {under_attack} B: must stay well under 128 MiB"
    );
    assert!(
        after <= baseline + 8 * MIB,
        "RSS after the attack {after} B, baseline {baseline} B"
    );
    assert_eq!(
        m.get("perch_memory_state_ratio").copied(),
        Some(0.0),
        "memory limiter after the attack"
    );
    let closed: f64 = ["limit", "evicted", "header_too_large", "header_timeout"]
        .iter()
        .map(|r| refused(&m, r))
        .sum();
    assert!(closed > 0.0, "the attack is counted: {m:?}");
    assert!(agent.stop(), "perch run did not stop cleanly");
}

/// Issue 10, high row: 1 100 idle connections with the agent's
/// RLIMIT_NOFILE at 1024.
#[test]
fn idle_connections_under_fd_limit_keep_endpoints_and_collectors_working() {
    let _g = perch_tests::serial();
    raise_own_nofile(4096);
    let agent = Agent::start(&["--interval", "1s"]);
    let pid = agent.pid();
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=1024:1024"])
        .output()
        .expect("running prlimit");
    assert!(out.status.success(), "prlimit: {out:?}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains("1024")),
        "{limits}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let before = agent.scrape();
    let errors_before = collector_errors(&before);
    let fds_before = open_fds(pid);

    let mut held = Vec::new();
    for _ in 0..1100 {
        match TcpStream::connect_timeout(&agent.addr, Duration::from_secs(2)) {
            Ok(s) => held.push(s),
            Err(e) => panic!("connect {} failed: {e}", held.len()),
        }
    }
    // Let the agent accept (and close) what is past its cap, then a few
    // collections run with the idle sockets held.
    std::thread::sleep(Duration::from_secs(3));
    let fds_under = open_fds(pid);
    let (hc, hb, htook) = wait_for(&agent, "/healthz", 200, Duration::from_secs(10));
    let (mc, mb, mtook) = wait_for(&agent, "/metrics", 200, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    let (_, mb2, _) = wait_for(&agent, "/metrics", 200, Duration::from_secs(10));
    let during = parse_prometheus(&mb2);
    let errors_during = collector_errors(&during);
    println!(
        "idle connections: 1 100 held, agent RLIMIT_NOFILE 1024; agent fds before {fds_before}, \
         with the connections held {fds_under}; /healthz {hc} after {htook:?}, /metrics {mc} \
         after {mtook:?} ({} bytes); collector errors {errors_before} -> {errors_during}; \
         refused: limit {} evicted {}",
        mb.len(),
        refused(&during, "limit"),
        refused(&during, "evicted"),
    );
    assert_eq!(hc, 200, "/healthz with 1 100 idle connections: {hb}");
    assert_eq!(mc, 200, "/metrics with 1 100 idle connections");
    assert!(
        fds_under < 200,
        "agent fds with 1 100 idle connections: {fds_under}"
    );
    assert_eq!(
        errors_during,
        errors_before,
        "collectors failed while the listener was at its cap: {:?}",
        during
            .iter()
            .filter(|(k, _)| k.starts_with("perch_collector_errors_total"))
            .collect::<Vec<_>>()
    );
    drop(held);
    assert!(agent.stop(), "perch run did not stop cleanly");
}

/// Seconds until the agent closes `s` (a read returns 0 or fails), up to
/// `within`.
fn closed_after(mut s: TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(within)).expect("read timeout");
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            // A 408/431 answer before the close: keep reading.
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return None
            }
            Err(_) => return Some(start.elapsed()),
        }
    }
}

/// A request head that stalls and a connection that never sends a byte
/// are closed after the 5 s header timeout and counted; an idle keep-alive
/// connection is closed as well but not counted (a scraper's normal
/// connection); a client that stops reading its responses is closed by the
/// 30 s idle timeout and counted.
#[test]
fn stalled_silent_keepalive_and_nonreading_connections_are_closed() {
    let _g = perch_tests::serial();
    let agent = Agent::start(&["--interval", "1s"]);
    let addr = agent.addr;
    let silent = TcpStream::connect(addr).expect("connect");
    let mut slow = TcpStream::connect(addr).expect("connect");
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        .expect("partial head");
    let mut keep = TcpStream::connect(addr).expect("connect");
    keep.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    // Pipelined scrapes whose answers are never read: the agent's writes
    // stall once the socket buffers are full.
    let mut deaf = TcpStream::connect(addr).expect("connect");
    deaf.set_write_timeout(Some(Duration::from_secs(2)))
        .expect("write timeout");
    for _ in 0..2000 {
        if deaf
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .is_err()
        {
            break;
        }
    }
    let deaf_t = std::thread::spawn(move || {
        // Wait without reading, then see whether the agent closed it: a
        // write to a socket the peer closed fails with a reset.
        let start = Instant::now();
        std::thread::sleep(Duration::from_secs(36));
        let _ = deaf.set_write_timeout(Some(Duration::from_secs(1)));
        let r = deaf.write_all(b"x").and_then(|()| {
            std::thread::sleep(Duration::from_millis(300));
            deaf.write_all(b"x")
        });
        (r.is_err(), start.elapsed())
    });
    let silent_t = std::thread::spawn(move || closed_after(silent, Duration::from_secs(15)));
    let keep_t = std::thread::spawn(move || closed_after(keep, Duration::from_secs(15)));
    let slow_after = closed_after(slow, Duration::from_secs(15));
    let silent_after = silent_t.join().expect("silent reader");
    let keep_after = keep_t.join().expect("keep-alive reader");
    std::thread::sleep(Duration::from_millis(1500));
    let m = agent.scrape();
    let header_timeouts = refused(&m, "header_timeout");
    println!(
        "stalled head closed after {slow_after:?}, silent connection after {silent_after:?}, \
         idle keep-alive after {keep_after:?}; refused: header_timeout {header_timeouts}"
    );
    for (what, after) in [
        ("a stalled request head", slow_after),
        ("a silent connection", silent_after),
        ("an idle keep-alive connection", keep_after),
    ] {
        let after = after.unwrap_or_else(|| panic!("{what} is not closed within 15 s"));
        assert!(
            after >= Duration::from_secs(4) && after <= Duration::from_secs(8),
            "{what} closed after {after:?}, want about 5 s"
        );
    }
    assert_eq!(
        header_timeouts, 2.0,
        "the stalled and the silent connection are counted, the keep-alive one is not: {m:?}"
    );
    let (deaf_closed, waited) = deaf_t.join().expect("deaf client");
    let m = agent.scrape();
    println!(
        "non-reading client closed: {deaf_closed} (checked after {waited:?}); refused: \
         idle_timeout {}",
        refused(&m, "idle_timeout")
    );
    assert!(
        deaf_closed,
        "a client that never reads is closed by the idle timeout"
    );
    assert_eq!(refused(&m, "idle_timeout"), 1.0, "{m:?}");
    assert!(agent.stop(), "perch run did not stop cleanly");
}

/// Issue 11 §2: /healthz, /readyz (and `perch_ready`), /status, 404, 405.
#[test]
fn health_ready_status_and_routes() {
    let _g = perch_tests::serial();
    let agent = Agent::start(&["--interval", "1s"]);
    let (code, body, took) = wait_for(&agent, "/readyz", 200, Duration::from_secs(15));
    assert_eq!(code, 200, "/readyz: {body}");
    assert_eq!(body.trim(), "ready");
    println!("/readyz 200 after {took:?}");
    let (code, _) = agent.get("/healthz").expect("healthz");
    assert_eq!(code, 200);
    std::thread::sleep(Duration::from_millis(1500));
    let m = agent.scrape();
    assert_eq!(m.get("perch_ready").copied(), Some(1.0), "perch_ready");

    let (code, body) = agent.get("/status").expect("status");
    assert_eq!(code, 200, "{body}");
    let s: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["uptime_secs"].as_f64().expect("uptime") > 0.0);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert_eq!(s["kernel"]["release"], release.trim());
    assert!(s["kernel"]["btf"].is_boolean());
    assert_eq!(s["ready"], true);
    let families = s["families"].as_array().expect("families");
    assert_eq!(families.len(), ::perch::families::Family::ALL.len(), "{s}");
    for f in families {
        for k in ["family", "mode", "source", "reason"] {
            assert!(f[k].is_string(), "family field {k}: {f}");
        }
        if f["source"] != "off" {
            assert_eq!(f["produced"], true, "{f}");
        }
        if f["source"] == "ebpf" {
            assert!(f["hook"].is_string(), "{f}");
        }
    }
    let programs = s["programs"].as_array().expect("programs");
    for p in programs {
        let state = p["state"].as_str().expect("state");
        assert!(
            [
                "attached",
                "loaded_unused",
                "refused",
                "not_tried",
                "unattached"
            ]
            .contains(&state),
            "{p}"
        );
        if state == "refused" {
            assert!(p["error"].as_str().is_some_and(|e| !e.is_empty()), "{p}");
        }
    }
    // Every family the plan runs on eBPF has its programs attached.
    for f in families.iter().filter(|f| f["source"] == "ebpf") {
        assert!(
            programs
                .iter()
                .any(|p| p["family"] == f["family"] && p["state"] == "attached"),
            "no attached program for {f}"
        );
    }
    assert_eq!(s["exporter"]["enabled"], false);
    assert_eq!(s["pipeline"]["max_series_per_metric"], 2000);
    assert!(s["pipeline"]["series_per_metric"]["perch.ready"].as_u64() == Some(1));
    assert!(s["pipeline"]["detail_mode"].is_string(), "{s}");
    assert_eq!(s["http"]["max_connections"], 64);
    println!(
        "/status: {} families, {} programs",
        families.len(),
        programs.len()
    );

    assert_eq!(request(agent.addr, "GET", "/nope").expect("404").0, 404);
    assert_eq!(request(agent.addr, "GET", "/").expect("404").0, 404);
    for path in ["/metrics", "/healthz", "/readyz", "/status"] {
        assert_eq!(
            request(agent.addr, "POST", path).expect("405").0,
            405,
            "POST {path}"
        );
        assert_eq!(
            request(agent.addr, "DELETE", path).expect("405").0,
            405,
            "DELETE {path}"
        );
    }
    assert!(agent.stop(), "perch run did not stop cleanly");
}

/// /readyz says 503 with the reason while the exporter's circuit is open
/// (the collector is down), and `perch_ready` is 0; /healthz stays 200.
#[test]
fn readyz_reports_an_open_export_circuit() {
    let _g = perch_tests::serial();
    // A port with nothing listening: every export fails at once.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("perch.toml");
    std::fs::write(
        &cfg,
        format!(
            "[export]\nendpoint = \"http://127.0.0.1:{port}/v1/metrics\"\n\
             protocol = \"http/protobuf\"\ntimeout_ms = 500\n\
             [export.retry]\ninitial_backoff_ms = 100\nmax_backoff_ms = 200\n\
             [export.circuit]\nfailure_threshold = 2\nhalf_open_after_ms = 600000\n"
        ),
    )
    .expect("writing config");
    let agent = Agent::start(&["--config", cfg.to_str().expect("path"), "--interval", "1s"]);
    let (code, body, took) = wait_for(&agent, "/readyz", 503, Duration::from_secs(20));
    assert_eq!(code, 503, "/readyz with the collector down: {body}");
    assert!(body.starts_with("not ready: "), "{body}");
    assert!(body.contains("export circuit open"), "{body}");
    assert_eq!(body.trim().lines().count(), 1, "one line: {body}");
    println!("/readyz 503 after {took:?}: {}", body.trim());
    let (code, _) = agent.get("/healthz").expect("healthz");
    assert_eq!(code, 200, "liveness does not depend on export");
    std::thread::sleep(Duration::from_millis(1500));
    let m = agent.scrape();
    assert_eq!(m.get("perch_ready").copied(), Some(0.0), "perch_ready");
    let (_, body) = agent.get("/status").expect("status");
    let s: Value = serde_json::from_str(&body).expect("status JSON");
    assert_eq!(s["exporter"]["enabled"], true);
    assert_eq!(s["exporter"]["protocol"], "http/protobuf");
    assert_eq!(s["exporter"]["circuit"], "open", "{s}");
    assert!(s["exporter"]["last_error"].is_string(), "{s}");
    assert!(s["exporter"]["last_success_age_secs"].is_null(), "{s}");
    assert_eq!(s["ready"], false);
    assert!(agent.stop(), "perch run did not stop cleanly");
}
