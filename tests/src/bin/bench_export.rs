//! `cargo xtask bench export`: OTLP export costs, printed as a markdown table.
//!
//! 1. Encode 10 000 points: CPU time per encode (thread CPU clock), encoded
//!    bytes, and gzip bytes (what goes on the wire with compression on).
//! 2. Encode and send 10 000 points to Rotel over loopback gRPC, one
//!    interval at a time: process CPU per interval, and the latency from
//!    `submit` (the end of an interval) to the collector's ack (median,
//!    p90). Target: ≤ 12 ms median.
//! 3. Collector outage: submit 10 000-point intervals every 100 ms to a
//!    port where nothing listens, for `--outage-secs` (default 10 s; the
//!    10-minute figure is `--outage-secs 600`), and record the peak RSS and
//!    queue bytes against the configured queue limit.
//!
//! 4. Exposition size (issue 13), against the real agent (`$PERCH_BIN`,
//!    every family on, 1 s interval) on this host: series and bytes per
//!    `/metrics` scrape in text and in protobuf (native histograms), OTLP
//!    bytes per interval (all metrics and the histogram metrics alone,
//!    plain and gzip) with exponential and with explicit histograms, and
//!    node_exporter's series for the comparable collectors. Run it with
//!    `PERCH_BIN` set to an older build for the before figures.
//!
//! Usage: bench_export [--points N] [--rounds N] [--outage-secs N]
//!        [--exposition-only]

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use perch::config::export::{ExportConfig, Protocol, Temporality};
use perch::exporters::otlp::encode::Encoder;
use perch::exporters::otlp::{resource, OtlpExporter};
use perch::pipeline::memory::rss_bytes;
use perch::selfmetrics::SelfMetrics;
use perch_tests::bench::{arg, text_series};
use perch_tests::otlp_receiver::*;
use perch_tests::perch::http_get_bytes;
use prost::Message;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn process_cpu() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / (1024.0 * 1024.0))
}

/// What one agent run serves and sends.
struct Exposition {
    text_series: usize,
    text_bytes: usize,
    /// (series, bytes) of the protobuf scrape, if the agent serves one.
    proto: Option<(usize, usize)>,
    /// Mean bytes per interval: (all, gzip all, histograms, gzip histograms).
    otlp: (f64, f64, f64, f64),
    /// The kernel histograms alone (not the self-histogram
    /// `perch.export.duration`): (plain, gzip) bytes per interval.
    kernel: (f64, f64),
    histogram_points: usize,
}

fn gzip_len(b: &[u8]) -> usize {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(b).expect("gzip");
    enc.finish().expect("gzip").len()
}

/// Series a protobuf scrape gives Prometheus: one per counter or gauge, one
/// per native histogram, buckets (+Inf included) + sum + count per classic one.
fn proto_series(mut body: &[u8]) -> usize {
    use perch::exporters::prometheus::protobuf::{MetricFamily, HISTOGRAM};
    use prost::Message;
    let mut n = 0;
    while !body.is_empty() {
        let f = MetricFamily::decode_length_delimited(&mut body).expect("a MetricFamily");
        for m in &f.metric {
            n += match (&m.histogram, f.r#type) {
                (Some(h), HISTOGRAM) if !h.positive_span.is_empty() => 1,
                (Some(h), HISTOGRAM) => {
                    let inf = h.bucket.last().is_some_and(|b| b.upper_bound.is_infinite());
                    h.bucket.len() + usize::from(!inf) + 2
                }
                _ => 1,
            };
        }
    }
    n
}

/// Runs the agent with `env` for a few intervals and measures what it serves.
fn exposition(env: &[(&str, &str)]) -> Exposition {
    use perch_tests::perch::Agent;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let sink = rt.block_on(Receiver::start());
    let endpoint = format!("http://{}", sink.grpc);
    let agent = Agent::start_cmd(
        |run| {
            let mut c = std::process::Command::new(perch_tests::perch_bin());
            c.args(run).envs(env.iter().copied());
            c
        },
        &["--interval", "1s", "--otlp-endpoint", &endpoint],
    );
    // Warm up (the first intervals' rates and peers settle), then measure.
    std::thread::sleep(Duration::from_secs(4));
    let warm = sink.received().len();
    std::thread::sleep(Duration::from_secs(5));
    let (code, _, text) = http_get_bytes(agent.addr, "/metrics", None).expect("text scrape");
    assert_eq!(code, 200);
    let native = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;\
                  encoding=delimited;q=0.8,text/plain;version=0.0.4;q=0.2";
    let (code, ctype, proto) =
        http_get_bytes(agent.addr, "/metrics", Some(native)).expect("protobuf scrape");
    assert_eq!(code, 200);
    let proto = ctype
        .starts_with("application/vnd.google.protobuf")
        .then(|| (proto_series(&proto), proto.len()));
    drop(agent);
    let received = sink.received();
    let reqs: Vec<_> = received[warm..].iter().filter(|r| r.accepted).collect();
    assert!(!reqs.is_empty(), "no OTLP request in the measured window");
    let (mut all, mut all_gz, mut hist, mut hist_gz, mut hpoints) = (0, 0, 0, 0, 0);
    let (mut kern, mut kern_gz) = (0, 0);
    for r in &reqs {
        let body = r.request.encode_to_vec();
        all += body.len();
        all_gz += gzip_len(&body);
        // The histogram metrics' own bytes: their Metric messages (name,
        // description, unit, points), without the request's resource.
        let mut only = Vec::new();
        let mut kernel = Vec::new();
        for m in r
            .request
            .resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
        {
            let n = match &m.data {
                Some(Data::Histogram(h)) => h.data_points.len(),
                Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
                _ => continue,
            };
            hpoints += n;
            m.encode_length_delimited(&mut only).expect("encoding");
            if m.name != perch::catalogue::EXPORT_DURATION {
                m.encode_length_delimited(&mut kernel).expect("encoding");
            }
        }
        hist += only.len();
        hist_gz += gzip_len(&only);
        kern += kernel.len();
        kern_gz += gzip_len(&kernel);
    }
    let k = reqs.len() as f64;
    let text = String::from_utf8_lossy(&text).into_owned();
    Exposition {
        text_series: text_series(&text),
        text_bytes: text.len(),
        proto,
        otlp: (
            all as f64 / k,
            all_gz as f64 / k,
            hist as f64 / k,
            hist_gz as f64 / k,
        ),
        kernel: (kern as f64 / k, kern_gz as f64 / k),
        histogram_points: hpoints / reqs.len(),
    }
}

/// node_exporter with the collectors comparable to Perch's families (those
/// this node_exporter has: Debian 12's 1.5.0 has no `softirqs`): the
/// collectors used, and (series, bytes) of one scrape.
fn node_exporter() -> (Vec<&'static str>, usize, usize) {
    let bin = "prometheus-node-exporter";
    let help = std::process::Command::new(bin)
        .arg("--help")
        .output()
        .expect("prometheus-node-exporter (apt prometheus-node-exporter; cargo xtask setup --test installs it)");
    let help =
        String::from_utf8_lossy(&help.stdout).into_owned() + &String::from_utf8_lossy(&help.stderr);
    let wanted = [
        "cpu",
        "stat",
        "schedstat",
        "loadavg",
        "netdev",
        "netstat",
        "softnet",
        "sockstat",
        "softirqs",
    ];
    let have: Vec<&'static str> = wanted
        .into_iter()
        .filter(|c| {
            help.contains(&format!("--[no-]collector.{c} "))
                || help.contains(&format!("--collector.{c} "))
        })
        .collect();
    let port = free_port();
    let mut child = std::process::Command::new(bin)
        .arg("--collector.disable-defaults")
        .args(have.iter().map(|c| format!("--collector.{c}")))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting prometheus-node-exporter");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        if let Ok((200, _, b)) = http_get_bytes(addr, "/metrics", None) {
            break b;
        }
        assert!(Instant::now() < deadline, "node_exporter did not answer");
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&body);
    (have, text_series(&text), body.len())
}

fn kb(b: f64) -> String {
    format!("{:.1} kB", b / 1000.0)
}

fn exposition_rows(rows: &mut Vec<(String, String)>) {
    let (collectors, ne_series, ne_bytes) = node_exporter();
    let ne = (ne_series, ne_bytes);
    rows.push((
        format!(
            "node_exporter ({}): series / bytes per scrape",
            collectors.join(", ")
        ),
        format!("{} / {}", ne.0, kb(ne.1 as f64)),
    ));
    let exp = exposition(&[]);
    rows.push((
        "/metrics text (classic layout): series / bytes per scrape".into(),
        format!(
            "{} / {} ({:.2}× node_exporter's series)",
            exp.text_series,
            kb(exp.text_bytes as f64),
            exp.text_series as f64 / ne.0 as f64
        ),
    ));
    rows.push((
        "/metrics protobuf (native histograms): series / bytes per scrape".into(),
        match exp.proto {
            Some((s, b)) => format!(
                "{s} / {} ({:.2}× node_exporter's series)",
                kb(b as f64),
                s as f64 / ne.0 as f64
            ),
            None => "not served (text only)".into(),
        },
    ));
    let explicit = exposition(&[(
        "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION",
        "explicit_bucket_histogram",
    )]);
    for (label, e) in [("exponential (default)", &exp), ("explicit", &explicit)] {
        rows.push((
            format!("OTLP per interval, histograms {label}: all metrics, plain / gzip"),
            format!("{} / {}", kb(e.otlp.0), kb(e.otlp.1)),
        ));
        rows.push((
            format!(
                "OTLP per interval, histograms {label}: the {} histogram points (their Metric messages), plain / gzip",
                e.histogram_points
            ),
            format!("{} / {}", kb(e.otlp.2), kb(e.otlp.3)),
        ));
        rows.push((
            format!(
                "OTLP per interval, histograms {label}: of which the kernel histograms, plain / gzip"
            ),
            format!("{:.0} B / {:.0} B", e.kernel.0, e.kernel.1),
        ));
    }
}

fn main() {
    if perch_tests::bench::flag("--exposition-only") {
        let mut rows = vec![];
        exposition_rows(&mut rows);
        println!("| measurement | value |\n|---|---|");
        for (k, v) in rows {
            println!("| {k} | {v} |");
        }
        return;
    }
    let points = arg("--points", 10_000);
    let rounds = arg("--rounds", 50);
    let outage = arg("--outage-secs", 10);
    // synthetic_snapshot has 6 points besides the per-peer ones.
    let peers = (points.saturating_sub(6)) as usize;
    let snap = synthetic_snapshot(1, peers);
    let n = points_in(&snap);
    let mut rows: Vec<(String, String)> = vec![];

    // 1. Encoding.
    let attrs = resource::attributes(&ExportConfig::default(), std::path::Path::new("/"), |k| {
        std::env::var(k).ok()
    });
    let mut enc = Encoder::new(
        resource::resource(&attrs),
        Temporality::Cumulative,
        10_000,
        3 << 20,
    );
    let mut cpu = vec![];
    let mut bytes = 0;
    let mut gz = 0;
    for _ in 0..20 {
        let t = thread_cpu();
        let batches = enc.encode(&snap);
        cpu.push(thread_cpu() - t);
        bytes = batches.iter().map(|b| b.body.len()).sum::<usize>();
        gz = batches
            .iter()
            .map(|b| {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(&b.body).expect("gzip");
                e.finish().expect("gzip").len()
            })
            .sum::<usize>();
    }
    cpu.sort();
    rows.push((
        format!("encode {n} points: CPU (median of 20)"),
        ms(percentile(&cpu, 0.5)),
    ));
    rows.push((
        format!("encode {n} points: protobuf bytes"),
        format!("{bytes} B ({:.1} B/point)", bytes as f64 / n as f64),
    ));
    rows.push((
        format!("encode {n} points: gzip bytes on the wire"),
        format!("{gz} B ({:.1} B/point)", gz as f64 / n as f64),
    ));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // 2. Send to Rotel, interval by interval.
        let rotel = Rotel::start_blackhole();
        let selfm = Arc::new(SelfMetrics::new());
        let memory = perch::pipeline::memory::MemoryGauge::default();
        let cfg = ExportConfig {
            endpoint: Some(rotel.grpc_url()),
            protocol: Protocol::Grpc,
            ..ExportConfig::default()
        };
        let exporter =
            OtlpExporter::start_with_resource(&cfg, selfm.clone(), memory.clone(), attrs.clone())
                .expect("start")
                .expect("endpoint");
        let mut delivered = exporter.delivered();
        let mut lat = vec![];
        let mut small_lat = vec![];
        let small = Arc::new(synthetic_snapshot(1, 494));
        let big = Arc::new(snap.clone());
        // Warm-up: connection and HTTP/2 windows.
        for _ in 0..3 {
            exporter.submit(big.clone());
            let _ = delivered.changed().await;
        }
        let cpu0 = process_cpu();
        for _ in 0..rounds {
            let t = Instant::now();
            exporter.submit(big.clone());
            let _ = delivered.changed().await;
            lat.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cpu_total = process_cpu() - cpu0;
        for _ in 0..rounds {
            let t = Instant::now();
            exporter.submit(small.clone());
            let _ = delivered.changed().await;
            small_lat.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        lat.sort();
        small_lat.sort();
        exporter.shutdown(Duration::from_secs(2)).await;
        // The same without compression: what gzip costs in latency.
        let plain_cfg = ExportConfig {
            compression: perch::config::export::Compression::None,
            ..cfg.clone()
        };
        let exporter = OtlpExporter::start_with_resource(
            &plain_cfg,
            selfm.clone(),
            memory.clone(),
            attrs.clone(),
        )
        .expect("start")
        .expect("endpoint");
        let mut delivered = exporter.delivered();
        let mut plain_lat = vec![];
        for i in 0..rounds + 3 {
            let t = Instant::now();
            exporter.submit(big.clone());
            let _ = delivered.changed().await;
            if i >= 3 {
                plain_lat.push(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        plain_lat.sort();
        exporter.shutdown(Duration::from_secs(2)).await;
        drop(rotel);
        rows.push((
            format!(
                "encode + send {n} points (gRPC+gzip, Rotel, loopback): process CPU per interval"
            ),
            ms(cpu_total / rounds as u32),
        ));
        rows.push((
            format!("interval end → collector ack, {n} points: median"),
            ms(percentile(&lat, 0.5)),
        ));
        rows.push((
            format!("interval end → collector ack, {n} points: p90"),
            ms(percentile(&lat, 0.9)),
        ));
        rows.push((
            format!("interval end → collector ack, {n} points, no compression: median"),
            ms(percentile(&plain_lat, 0.5)),
        ));
        rows.push((
            "interval end → collector ack, 500 points: median".into(),
            ms(percentile(&small_lat, 0.5)),
        ));
        rows.push((
            "interval end → collector ack, 500 points: p90".into(),
            ms(percentile(&small_lat, 0.9)),
        ));

        // 3. Outage.
        let selfm = Arc::new(SelfMetrics::new());
        let memory = perch::pipeline::memory::MemoryGauge::default();
        let cfg = ExportConfig {
            endpoint: Some(format!("http://127.0.0.1:{}", free_port())),
            protocol: Protocol::Grpc,
            ..ExportConfig::default()
        };
        let limit = cfg.queue.max_bytes as f64;
        let exporter =
            OtlpExporter::start_with_resource(&cfg, selfm.clone(), memory.clone(), attrs.clone())
                .expect("start")
                .expect("endpoint");
        let rss0 = rss_bytes().unwrap_or(0) as f64;
        let (mut rss_max, mut q_max) = (0f64, 0f64);
        let end = Instant::now() + Duration::from_secs(outage);
        let mut sent = 0u64;
        while Instant::now() < end {
            exporter.submit(big.clone());
            sent += n;
            tokio::time::sleep(Duration::from_millis(100)).await;
            rss_max = rss_max.max(rss_bytes().unwrap_or(0) as f64);
            q_max = q_max.max(selfm_value(&selfm, "perch.export.queue.bytes", &[]));
        }
        let dropped = selfm_value(
            &selfm,
            "perch.export.points.dropped",
            &[("reason", "queue_full")],
        );
        exporter.shutdown(Duration::from_millis(100)).await;
        rows.push((
            format!("outage {outage} s: queue bytes peak (limit {})", mib(limit)),
            mib(q_max),
        ));
        rows.push((
            format!("outage {outage} s: RSS before → peak"),
            format!("{} → {}", mib(rss0), mib(rss_max)),
        ));
        rows.push((
            format!("outage {outage} s: points submitted / dropped (queue_full, counted)"),
            format!("{sent} / {dropped}"),
        ));
    });

    exposition_rows(&mut rows);

    println!("| measurement | value |\n|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
}
