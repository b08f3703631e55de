//! End to end with a real Prometheus (apt `prometheus`): the agent runs as
//! the systemd unit would (`perch run`, 1 s interval), Prometheus scrapes
//! it, and its HTTP API answers `up == 1` and Perch's own series; `/readyz`
//! answers 200. With `--enable-feature=native-histograms` Prometheus
//! negotiates the protobuf format and stores the kernel's run-queue
//! histogram as a native histogram whose counts are the kernel map's.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use agent_common::exp;
use perch_tests::bpftool;
use perch_tests::perch::{free_port, http_get, Agent};

/// A running Prometheus scraping one Perch agent every second; killed when
/// dropped. Its config and TSDB live in a temporary directory of its own.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `prometheus` scraping `target` (job `perch`) every second,
    /// with `features` (`--enable-feature=`), and waits until it is ready
    /// and has scraped the agent (`up == 1`).
    fn start(target: SocketAddr, features: &[&str]) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: perch\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"));
        if !features.is_empty() {
            cmd.arg(format!("--enable-feature={}", features.join(",")));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (apt prometheus; `cargo xtask setup --test` installs it)");
        let prom = Prometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http_get(addr, "/-/ready") {
                let r = prom.query("up{job=\"perch\"}");
                if r.first().and_then(|s| s["value"][1].as_str()) == Some("1") {
                    eprintln!("up: {r:?}");
                    return prom;
                }
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus never saw up{{job=\"perch\"}} == 1; its log:\n{}",
                prom.log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The result vector of an instant query, evaluated now.
    fn query(&self, q: &str) -> Vec<serde_json::Value> {
        self.query_at(q, None)
    }

    /// The result of an instant query evaluated at `time` (Unix seconds),
    /// or now.
    fn query_at(&self, q: &str, time: Option<f64>) -> Vec<serde_json::Value> {
        let mut path = format!("/api/v1/query?query={}", encode(q));
        if let Some(t) = time {
            path.push_str(&format!("&time={t:.3}"));
        }
        let (code, body) = http_get(self.addr, &path)
            .unwrap_or_else(|e| panic!("querying Prometheus for {q}: {e}"));
        assert_eq!(code, 200, "{q}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("query JSON");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The tail of Prometheus's log, for failure messages.
    fn log(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// The single value of an instant query's result, as a number.
fn scalar(result: &[serde_json::Value], q: &str) -> f64 {
    assert_eq!(result.len(), 1, "{q}: {result:?}");
    result[0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{q}: not a number: {result:?}"))
}

#[test]
fn prometheus_scrapes_perch() {
    let _serial = perch_tests::kernel::privileged();
    let agent = Agent::start(&["--interval", "1s"]);
    let prom = Prometheus::start(agent.addr, &[]);
    // Perch's own series, as Prometheus stored them from the scrape.
    let sched = prom.query(
        "perch_probe_state{job=\"perch\",perch_family=\"sched\",perch_probe_source=\"ebpf\"}",
    );
    assert_eq!(sched.len(), 1, "sched's probe state: {sched:?}");
    let rss = prom.query("process_resident_memory_bytes{job=\"perch\"}");
    let rss: f64 = rss
        .first()
        .and_then(|s| s["value"][1].as_str())
        .and_then(|v| v.parse().ok())
        .expect("process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 128.0 * 1024.0 * 1024.0, "RSS {rss}");
    let switches = prom.query("sum(perch_cpu_context_switches_total{job=\"perch\"})");
    assert_eq!(switches.len(), 1, "{switches:?}");
    let (code, body) = agent.get("/readyz").expect("/readyz");
    assert_eq!(code, 200, "/readyz: {body}");
    let ready = prom.query("perch_ready{job=\"perch\"}");
    eprintln!("perch_ready: {ready:?}; RSS {rss} B");
}

const RUNQ: &str = "perch_scheduler_runqueue_latency_seconds";

/// One read of the kernel's run-queue histogram, summed over CPUs: slot
/// `s` of `SCHED_RUNQ_HIST` at `counts[s]` ([`exp::ZERO_SLOT`], the OTel
/// indexes, [`exp::OVERFLOW_SLOT`]).
struct MapRead {
    counts: Vec<u64>,
    /// When the read started.
    at: SystemTime,
}

/// A bucket of the run-queue histogram: the zero bucket (exact zeros,
/// ordered first) or OTel index `i`, `(2^(i/8), 2^((i+1)/8)]` s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Bucket {
    Zero,
    Index(i32),
}

impl MapRead {
    fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Bucket -> count, as Perch exports it: the overflow slot folded into
    /// the top bucket, empty buckets left out.
    fn buckets(&self) -> BTreeMap<Bucket, u64> {
        let mut out = BTreeMap::new();
        for (s, &c) in self.counts.iter().enumerate() {
            let s = s as u32;
            let b = if s == exp::ZERO_SLOT {
                Bucket::Zero
            } else if s >= exp::OVERFLOW_SLOT {
                Bucket::Index(exp::MAX_INDEX)
            } else {
                Bucket::Index(exp::slot_index(s))
            };
            if c > 0 {
                *out.entry(b).or_insert(0) += c;
            }
        }
        out
    }

    /// The bucket holding quantile `q`, as Prometheus finds it: the first
    /// whose cumulative count reaches `q * count`.
    fn quantile_bucket(&self, q: f64) -> Bucket {
        let rank = q * self.count() as f64;
        let mut cum = 0u64;
        let buckets = self.buckets();
        for (&b, &c) in &buckets {
            cum += c;
            if cum as f64 >= rank {
                return b;
            }
        }
        *buckets.keys().last().expect("an empty histogram")
    }
}

/// Lower bound of the bucket below `b` and upper bound of the bucket above
/// it, in seconds: where a quantile "within one bucket" of `b` may lie.
/// The zero bucket's neighbour above is the lowest populated bucket of
/// `read` (Prometheus walks populated buckets only).
fn one_bucket_around(b: Bucket, read: &MapRead) -> (f64, f64) {
    match b {
        Bucket::Zero => {
            let next = read
                .buckets()
                .keys()
                .find_map(|k| match k {
                    Bucket::Index(i) => Some(*i),
                    Bucket::Zero => None,
                })
                .unwrap_or(exp::MIN_INDEX);
            (0.0, exp::upper_seconds(next))
        }
        // Bucket i - 1 starts at 2^((i-1)/8), the upper bound of i - 2.
        Bucket::Index(i) => (exp::upper_seconds(i - 2), exp::upper_seconds(i + 1)),
    }
}

/// Reads map `id` with `bpftool -j map dump id`. On this machine (aya maps,
/// no BTF for their types) each element is `{"key": [4 hex bytes],
/// "values": [{"cpu": N, "value": [8 hex bytes]}, ...]}`; with BTF, bpftool
/// puts the decoded element under `"formatted"`, which is preferred.
fn read_runq_map(id: u32) -> MapRead {
    let at = SystemTime::now();
    let dump = bpftool::try_bpftool(&["-j", "map", "dump", "id", &id.to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    let elements = dump.as_array().expect("bpftool dump: an array");
    let mut counts = vec![0u64; exp::SLOTS as usize];
    for e in elements {
        let e = e.get("formatted").unwrap_or(e);
        let key = bpftool::number(&e["key"]) as usize;
        let values = e["values"].as_array().expect("per-CPU values");
        counts[key] = values.iter().map(|v| bpftool::number(&v["value"])).sum();
    }
    MapRead { counts, at }
}

/// Scheduler load: `ping_pongs` round trips between two threads over a
/// socket pair (two wake-ups each) while one spinning thread per CPU, plus
/// one, keeps the run queues busy so that the woken threads wait.
fn scheduler_load(ping_pongs: usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..perch_tests::kernel::online_cpus() + 1)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
        })
        .collect();
    let (mut a, mut b) = UnixStream::pair().expect("socket pair");
    let echo = std::thread::spawn(move || {
        let mut byte = [0u8];
        while b.read_exact(&mut byte).is_ok() {
            b.write_all(&byte).expect("echo");
        }
    });
    let mut byte = [0u8];
    for _ in 0..ping_pongs {
        a.write_all(&[1]).expect("ping");
        a.read_exact(&mut byte).expect("pong");
    }
    drop(a);
    echo.join().expect("echo thread");
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        s.join().expect("spinner");
    }
}

/// The last native-histogram sample of `RUNQ` Prometheus holds: its
/// (scrape) timestamp in Unix seconds, its count, and its buckets as
/// `bucket -> count` (from the API's `[rule, lower, upper, count]`).
fn last_native_sample(prom: &Prometheus) -> Option<(f64, u64, BTreeMap<Bucket, u64>)> {
    let r = prom.query(&format!("{RUNQ}{{job=\"perch\"}}[10s]"));
    let [series] = &r[..] else {
        return None;
    };
    let last = series["histograms"].as_array()?.last()?;
    let ts = last[0].as_f64()?;
    let h = &last[1];
    let count = h["count"].as_str()?.parse().ok()?;
    let mut buckets = BTreeMap::new();
    for b in h["buckets"].as_array().into_iter().flatten() {
        let lower: f64 = b[1].as_str()?.parse().ok()?;
        let upper: f64 = b[2].as_str()?.parse().ok()?;
        let c: f64 = b[3].as_str()?.parse().ok()?;
        let bucket = if lower <= 0.0 {
            Bucket::Zero
        } else {
            // Upper bound 2^((i+1)/8): i = 8 log2(upper) - 1.
            Bucket::Index((8.0 * upper.log2()).round() as i32 - 1)
        };
        *buckets.entry(bucket).or_insert(0) += c as u64;
    }
    Some((ts, count, buckets))
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs_f64()
}

/// Prometheus negotiates the protobuf format, stores the run-queue
/// histogram as a native histogram (no `_bucket` series), and its count,
/// buckets and quantiles are the kernel map's.
#[test]
fn native_histograms_match_the_kernel_map() {
    let _serial = perch_tests::kernel::privileged();
    let mut args = vec!["--interval", "1s"];
    args.extend(perch_tests::perch::only(&["sched"]));
    let agent = Agent::start(&args);
    let map = bpftool::map_of(agent.pid(), "SCHED_RUNQ_HIST");
    let prom = Prometheus::start(agent.addr, &["native-histograms"]);
    scheduler_load(5000);

    let q_count = format!("histogram_count({RUNQ}{{job=\"perch\"}})");
    let deadline = Instant::now() + Duration::from_secs(30);
    while prom.query(&q_count).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no native histogram in Prometheus within 30 s: `{q_count}` is empty \
             (is the protobuf format negotiated?); {RUNQ}: {:?}; log:\n{}",
            prom.query(&format!("{{__name__=~\"{RUNQ}.*\"}}")),
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Native only: no classic series beside it.
    for suffix in ["_bucket", "_count", "_sum"] {
        let classic = prom.query(&format!("count({RUNQ}{suffix})"));
        assert!(classic.is_empty(), "{RUNQ}{suffix} stored: {classic:?}");
    }

    // Count and buckets against the map. The agent collects every second
    // and Prometheus scrapes the last collection every second, so neither
    // reads the map at the instant the test does, and the host keeps
    // scheduling (the map only grows). The test brackets the sample
    // instead: `before` is read, then the test waits for a sample scraped
    // two collection intervals after that read (one would do on time; the
    // second is slack for a late collection on a busy host), so the
    // collection it holds started after `before`; `after` is read once the
    // sample is in hand, so after that collection. Every bucket and the
    // count must then lie between the two reads, exactly: a tighter
    // equality would need the agent's collection instant, which the
    // exposition does not carry (Prometheus stamps the scrape).
    // First let the load's last wake-ups settle into two scrapes.
    std::thread::sleep(Duration::from_millis(2500));
    let before = read_runq_map(map);
    let not_before = unix(before.at) + 2.0;
    let deadline = Instant::now() + Duration::from_secs(15);
    let (ts, count, prom_buckets) = loop {
        match last_native_sample(&prom) {
            Some(s) if s.0 > not_before => break s,
            s => assert!(
                Instant::now() < deadline,
                "no sample scraped after {not_before}: last {s:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let after = read_runq_map(map);
    eprintln!(
        "kernel map {map}: {} before, Prometheus {count} (scraped {:.3} s after that read), {} after",
        before.count(),
        ts - unix(before.at),
        after.count()
    );
    eprintln!(
        "zero bucket: map {} before, Prometheus {}, map {} after; {} populated buckets in Prometheus",
        before.counts[exp::ZERO_SLOT as usize],
        prom_buckets.get(&Bucket::Zero).copied().unwrap_or(0),
        after.counts[exp::ZERO_SLOT as usize],
        prom_buckets.len()
    );
    assert!(
        count >= 2 * 5000,
        "the load's wake-ups are missing: count {count}"
    );
    assert!(
        before.count() <= count && count <= after.count(),
        "Prometheus's count {count} is not between the map's {} and {}",
        before.count(),
        after.count()
    );
    assert_eq!(
        scalar(&prom.query_at(&q_count, Some(ts)), &q_count),
        count as f64,
        "histogram_count at the sample's time"
    );
    let (lo, hi) = (before.buckets(), after.buckets());
    for b in lo.keys().chain(hi.keys()).chain(prom_buckets.keys()) {
        let p = prom_buckets.get(b).copied().unwrap_or(0);
        let (l, h) = (
            lo.get(b).copied().unwrap_or(0),
            hi.get(b).copied().unwrap_or(0),
        );
        assert!(
            l <= p && p <= h,
            "bucket {b:?}: Prometheus {p}, map {l} before and {h} after"
        );
    }

    // Quantiles: histogram_quantile lands in the bucket where the
    // cumulative count reaches q * count; allow one bucket either side of
    // the map's (before and after) for the counts that came in between.
    for q in [0.5, 0.9, 0.99] {
        let query = format!("histogram_quantile({q}, {RUNQ}{{job=\"perch\"}})");
        let got = scalar(&prom.query_at(&query, Some(ts)), &query);
        let (b0, b1) = (before.quantile_bucket(q), after.quantile_bucket(q));
        let (low, _) = one_bucket_around(b0.min(b1), &before);
        let (_, high) = one_bucket_around(b0.max(b1), &after);
        eprintln!(
            "p{}: Prometheus {got:e} s; map bucket {b0:?} before, {b1:?} after: [{low:e}, {high:e}] s",
            q * 100.0
        );
        assert!(
            low <= got && got <= high,
            "{query} = {got} s, outside [{low}, {high}] s around the map's buckets {b0:?}..{b1:?}"
        );
    }

    // The dashboard's quantile query (deploy/grafana/perch.json) serves
    // both forms: classic buckets when scraped as text, the native series
    // here. It must answer from the native one.
    let dashboard = format!(
        "histogram_quantile(0.5, sum by (le) (rate({RUNQ}_bucket{{job=\"perch\"}}[1m])) \
         or sum(rate({RUNQ}{{job=\"perch\"}}[1m])))"
    );
    let p50 = scalar(&prom.query_at(&dashboard, Some(ts)), &dashboard);
    assert!(
        p50 > 0.0 && p50 < 1.0,
        "the dashboard's p50 over the native histogram: {p50} s"
    );

    // The text format (no protobuf `Accept`) keeps the compact classic
    // layout: 15 finite buckets and `+Inf` (promtool checks the scrape in
    // exposition.rs).
    let (code, text) = agent.get("/metrics").expect("scraping /metrics");
    assert_eq!(code, 200, "{text}");
    let bucket_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{RUNQ}_bucket")))
        .collect();
    assert!(
        bucket_lines.len() == agent_common::exp::CLASSIC_DEFAULT_POWERS.len() + 1,
        "{} classic bucket lines: {bucket_lines:#?}",
        bucket_lines.len()
    );
    assert!(
        bucket_lines.iter().any(|l| l.contains("le=\"+Inf\"")),
        "no +Inf bucket: {bucket_lines:#?}"
    );
    eprintln!("text scrape: {} classic bucket lines", bucket_lines.len());
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
