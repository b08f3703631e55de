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
//! Usage: bench_export [--points N] [--rounds N] [--outage-secs N]

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use perch::config::export::{ExportConfig, Protocol, Temporality};
use perch::exporters::otlp::encode::Encoder;
use perch::exporters::otlp::{resource, OtlpExporter};
use perch::pipeline::memory::rss_bytes;
use perch::selfmetrics::SelfMetrics;
use perch_tests::bench::arg;
use perch_tests::otlp_receiver::*;

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

fn main() {
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

    println!("| measurement | value |\n|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
}
