//! Fault tests against the in-process scripted receiver. Each shows
//! bounded memory (the queue never exceeds its configured bytes), counted
//! drops, and recovery within one interval of the collector's return.

use std::sync::Arc;
use std::time::{Duration, Instant};

use perch::config::export::{ExportConfig, PipelineConfig, Protocol};
use perch::exporters::otlp::OtlpExporter;
use perch::model::Snapshot;
use perch::pipeline::Pipeline;
use perch::selfmetrics::SelfMetrics;
use perch_tests::otlp_receiver::*;

/// The collection interval simulated here. The test config's backoff
/// (≤ 200 ms) and half-open time (300 ms) fit inside it, so "recovery
/// within one interval" is checked against 600 ms. With the defaults
/// (backoff ≤ 30 s, half-open 30 s) recovery takes up to 30 s, which is
/// three 10 s intervals: see docs/architecture.md, Export.
const INTERVAL: Duration = Duration::from_millis(600);

fn start(cfg: &ExportConfig) -> (OtlpExporter, Arc<SelfMetrics>, QueueWatch) {
    let selfm = Arc::new(SelfMetrics::new());
    let memory = perch::pipeline::memory::MemoryGauge::default();
    let watch = QueueWatch::start(selfm.clone());
    let e = OtlpExporter::start_with_resource(cfg, selfm.clone(), memory.clone(), test_resource())
        .expect("start")
        .expect("endpoint");
    (e, selfm, watch)
}

fn snapshot(round: u64, peers: usize) -> Arc<Snapshot> {
    Arc::new(synthetic_snapshot(round, peers))
}

fn rounds_received(r: &[Received]) -> Vec<f64> {
    series_values(r, "system.cpu.time", &[("cpu", "0"), ("cpu.mode", "user")])
        .into_iter()
        .map(|v| v.0)
        .collect()
}

fn dropped(selfm: &SelfMetrics, reason: &str) -> f64 {
    selfm_value(selfm, "perch.export.points.dropped", &[("reason", reason)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_at_startup() {
    let _serial = perch_tests::serial_async().await;
    let port = free_port();
    let cfg = test_config(format!("http://127.0.0.1:{port}"), Protocol::Grpc);
    let (exporter, selfm, watch) = start(&cfg);
    for round in 1..=4 {
        exporter.submit(snapshot(round, 3));
        tokio::time::sleep(INTERVAL / 2).await;
    }
    assert!(exporter.last_error().is_some(), "the failure is visible");
    assert!(selfm_value(&selfm, "perch.export.retries", &[]) >= 1.0);
    let rx = Receiver::start_on(Some(port), None, None).await;
    let back = Instant::now();
    exporter.submit(snapshot(5, 3));
    assert!(
        rx.wait_for(INTERVAL, |r| rounds_received(r).len() == 5)
            .await,
        "not recovered within one interval: {:?}",
        rounds_received(&rx.received())
    );
    let took = back.elapsed();
    assert_eq!(
        rounds_received(&rx.received()),
        vec![0.5, 1.0, 1.5, 2.0, 2.5],
        "in order, once each"
    );
    assert!(exporter.last_error().is_none());
    assert_eq!(dropped(&selfm, "queue_full"), 0.0);
    assert!(watch.max() <= cfg.queue.max_bytes as f64);
    exporter.shutdown(Duration::from_secs(1)).await;
    eprintln!("recovered in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_503_and_429_honour_retry_after() {
    let _serial = perch_tests::serial_async().await;
    let rx = Receiver::start().await;
    let msg = |m: &str| m.to_owned();
    rx.script([
        Reply::Http {
            status: 503,
            retry_after_secs: Some(1),
            message: msg("overloaded"),
        },
        Reply::Http {
            status: 429,
            retry_after_secs: Some(1),
            message: msg("slow down"),
        },
    ]);
    let cfg = test_config(rx.http_url(), Protocol::HttpProtobuf);
    let (exporter, selfm, watch) = start(&cfg);
    exporter.submit(snapshot(1, 3));
    assert!(
        rx.wait_for(Duration::from_secs(5), |r| r.iter().any(|x| x.accepted))
            .await
    );
    let r = rx.received();
    assert_eq!(r.len(), 3, "two refusals then the success");
    for w in r.windows(2) {
        let gap = w[1].at - w[0].at;
        // Backoff alone would retry after ≤ 200 ms.
        assert!(
            gap >= Duration::from_millis(950),
            "Retry-After not honoured: {gap:?}"
        );
    }
    assert_eq!(selfm_value(&selfm, "perch.export.retries", &[]), 2.0);
    assert_eq!(dropped(&selfm, "rejected"), 0.0);
    // Recovery: the next interval goes straight through.
    let t = Instant::now();
    exporter.submit(snapshot(2, 3));
    assert!(
        rx.wait_for(INTERVAL, |r| rounds_received(r).len() == 2)
            .await
    );
    assert!(t.elapsed() < INTERVAL);
    assert!(watch.max() <= cfg.queue.max_bytes as f64);
    exporter.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_resource_exhausted() {
    let _serial = perch_tests::serial_async().await;
    let rx = Receiver::start().await;
    rx.script([
        // With RetryInfo: the server will recover; wait as asked.
        Reply::Grpc {
            code: tonic::Code::ResourceExhausted,
            retry_info: Some(Duration::from_millis(700)),
            message: "memory limiter".into(),
        },
        Reply::Ok,
        // Without RetryInfo: the request itself is too big; never retried.
        Reply::Grpc {
            code: tonic::Code::ResourceExhausted,
            retry_info: None,
            message: "too big".into(),
        },
    ]);
    let cfg = test_config(rx.grpc_url(), Protocol::Grpc);
    let (exporter, selfm, watch) = start(&cfg);
    let s1 = snapshot(1, 3);
    let n = points_in(&s1) as f64;
    exporter.submit(s1);
    assert!(
        rx.wait_for(Duration::from_secs(5), |r| r.iter().any(|x| x.accepted))
            .await
    );
    let r = rx.received();
    assert_eq!(r.len(), 2);
    let gap = r[1].at - r[0].at;
    assert!(
        gap >= Duration::from_millis(690),
        "RetryInfo not honoured: {gap:?}"
    );
    exporter.submit(snapshot(2, 3));
    assert!(rx.wait_for(Duration::from_secs(2), |r| r.len() == 3).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 3, "no retry without RetryInfo");
    assert_eq!(dropped(&selfm, "rejected"), n);
    assert_eq!(selfm_value(&selfm, "perch.export.retries", &[]), 1.0);
    // Recovery within one interval.
    exporter.submit(snapshot(3, 3));
    assert!(
        rx.wait_for(INTERVAL, |r| rounds_received(r).len() == 2)
            .await
    );
    assert!(watch.max() <= cfg.queue.max_bytes as f64);
    exporter.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_argument_and_400_are_dropped_and_counted() {
    let _serial = perch_tests::serial_async().await;
    for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
        let rx = Receiver::start().await;
        let refusal = match protocol {
            Protocol::Grpc => Reply::Grpc {
                code: tonic::Code::InvalidArgument,
                retry_info: None,
                message: "metric name is invalid".into(),
            },
            Protocol::HttpProtobuf => Reply::Http {
                status: 400,
                retry_after_secs: None,
                message: "metric name is invalid".into(),
            },
        };
        rx.script([
            refusal.clone(),
            refusal,
            Reply::Partial {
                rejected: 2,
                message: "2 bad points".into(),
            },
        ]);
        let url = match protocol {
            Protocol::Grpc => rx.grpc_url(),
            Protocol::HttpProtobuf => rx.http_url(),
        };
        let cfg = test_config(url, protocol);
        let (exporter, selfm, watch) = start(&cfg);
        let s = snapshot(1, 3);
        let n = points_in(&s) as f64;
        exporter.submit(s);
        assert!(rx.wait_for(Duration::from_secs(2), |r| r.len() == 1).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(rx.received().len(), 1, "{protocol:?}: a 400 is not retried");
        let err = exporter.last_error().unwrap_or_default();
        assert!(
            err.contains("metric name is invalid"),
            "{protocol:?}: collector message kept: {err}"
        );
        exporter.submit(snapshot(2, 3));
        exporter.submit(snapshot(3, 3));
        assert!(rx.wait_for(Duration::from_secs(2), |r| r.len() == 3).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(dropped(&selfm, "rejected"), 2.0 * n, "{protocol:?}");
        assert_eq!(dropped(&selfm, "partial_success"), 2.0, "{protocol:?}");
        assert_eq!(
            selfm_value(&selfm, "perch.export.points.sent", &[]),
            n - 2.0,
            "{protocol:?}"
        );
        assert_eq!(
            selfm_value(&selfm, "perch.export.circuit.state", &[]),
            0.0,
            "collector is up"
        );
        // Recovery within one interval.
        exporter.submit(snapshot(4, 3));
        assert!(
            rx.wait_for(INTERVAL, |r| rounds_received(r).len() == 2)
                .await,
            "{protocol:?}"
        );
        assert!(watch.max() <= cfg.queue.max_bytes as f64);
        exporter.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_collector_bounded_queue_and_recovery() {
    let _serial = perch_tests::serial_async().await;
    let rx = Receiver::start().await;
    // Slower than the 500 ms request timeout.
    rx.set_default(Reply::Slow(Duration::from_millis(900), Box::new(Reply::Ok)));
    let mut cfg = test_config(rx.grpc_url(), Protocol::Grpc);
    cfg.queue.max_bytes = 64 << 10;
    cfg.batch.max_bytes = 16 << 10;
    let (exporter, selfm, watch) = start(&cfg);
    // ~300 peers per snapshot: ~12 KiB encoded, the queue holds ~5.
    for round in 1..=12 {
        exporter.submit(snapshot(round, 300));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(dropped(&selfm, "queue_full") > 0.0, "overflow is counted");
    assert!(selfm_value(&selfm, "perch.export.retries", &[]) >= 1.0);
    assert!(
        watch.max() <= cfg.queue.max_bytes as f64,
        "queue grew to {} > {}",
        watch.max(),
        cfg.queue.max_bytes
    );
    rx.set_default(Reply::Ok);
    let back = Instant::now();
    exporter.submit(snapshot(13, 300));
    assert!(
        rx.wait_for(INTERVAL + Duration::from_millis(900), |r| rounds_received(
            r
        )
        .contains(&6.5))
            .await,
        "round 13 not delivered within one interval (+ one slow request in flight)"
    );
    eprintln!("recovered in {:?}", back.elapsed());
    exporter.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_opens_and_half_opens() {
    let _serial = perch_tests::serial_async().await;
    let rx = Receiver::start().await;
    rx.set_default(Reply::Grpc {
        code: tonic::Code::Unavailable,
        retry_info: None,
        message: "down".into(),
    });
    let mut cfg = test_config(rx.grpc_url(), Protocol::Grpc);
    cfg.circuit.failure_threshold = 3;
    cfg.circuit.half_open_after_ms = 500;
    let (exporter, selfm, _watch) = start(&cfg);
    exporter.submit(snapshot(1, 3));
    assert!(rx.wait_for(Duration::from_secs(2), |r| r.len() >= 3).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        selfm_value(&selfm, "perch.export.circuit.state", &[]),
        1.0,
        "open"
    );
    let opened = Instant::now();
    let before = rx.received().len();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Open for 500 ms, then one trial, which fails and reopens: at most
    // one request per half-open period.
    let during = rx.received().len() - before;
    let allowed = (opened.elapsed().as_millis() / 500) as usize + 1;
    assert!(
        during <= allowed,
        "{during} requests while open (allowed {allowed})"
    );
    assert!(during >= 1, "half-open trials happen");
    rx.set_default(Reply::Ok);
    assert!(
        rx.wait_for(Duration::from_millis(800), |r| r.iter().any(|x| x.accepted))
            .await
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        selfm_value(&selfm, "perch.export.circuit.state", &[]),
        0.0,
        "closed again"
    );
    assert_eq!(
        dropped(&selfm, "queue_full") + dropped(&selfm, "rejected"),
        0.0
    );
    exporter.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshake_failure_is_clear_and_custom_ca_works() {
    let _serial = perch_tests::serial_async().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = test_pki(dir.path());
    let rx = Receiver::start_on(None, None, Some((cert, key))).await;
    let url = format!("https://127.0.0.1:{}", rx.grpc.port());

    // Not trusted: a clear error, nothing sent, nothing lost yet.
    let cfg = test_config(url.clone(), Protocol::Grpc);
    let (exporter, selfm, watch) = start(&cfg);
    exporter.submit(snapshot(1, 3));
    let deadline = Instant::now() + Duration::from_secs(3);
    let err = loop {
        if let Some(e) = exporter.last_error() {
            break e;
        }
        assert!(Instant::now() < deadline, "no error reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let lower = err.to_lowercase();
    assert!(
        lower.contains("certificate") || lower.contains("issuer"),
        "unclear TLS error: {err}"
    );
    assert!(rx.received().is_empty());
    assert!(watch.max() <= cfg.queue.max_bytes as f64);
    exporter.shutdown(Duration::from_millis(200)).await;
    assert!(
        dropped(&selfm, "shutdown") > 0.0,
        "undelivered data is counted at shutdown"
    );

    // Trusted through the custom CA: delivered.
    let mut cfg = test_config(url, Protocol::Grpc);
    cfg.tls.ca_file = Some(dir.path().join("ca.pem"));
    let (exporter, _selfm, _watch) = start(&cfg);
    exporter.submit(snapshot(1, 3));
    assert!(
        rx.wait_for(Duration::from_secs(3), |r| r.iter().any(|x| x.accepted))
            .await,
        "TLS with custom CA: {:?}",
        exporter.last_error()
    );
    exporter.shutdown(Duration::from_secs(1)).await;

    // HTTPS to a plain-text server: the handshake fails with a clear error.
    let plain = Receiver::start().await;
    let cfg = test_config(
        format!("https://{}/v1/metrics", plain.http),
        Protocol::HttpProtobuf,
    );
    let (exporter, _selfm, _watch) = start(&cfg);
    exporter.submit(snapshot(1, 3));
    let deadline = Instant::now() + Duration::from_secs(3);
    let err = loop {
        if let Some(e) = exporter.last_error() {
            break e;
        }
        assert!(Instant::now() < deadline, "no error reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("https to plain http: {err}");
    let lower = err.to_lowercase();
    assert!(
        lower.contains("tls") || lower.contains("corrupt") || lower.contains("handshake"),
        "unclear error: {err}"
    );
    exporter.shutdown(Duration::from_millis(200)).await;
}

fn drops_feed(at: std::time::SystemTime, round: i64, drops: i64) -> Vec<perch::model::Metric> {
    use perch::model::{Data, Metric, Number, NumberPoint};
    let c = |name: &'static str, v: i64| Metric {
        name,
        description: "",
        unit: "{packet}",
        data: Data::Sum {
            monotonic: true,
            points: vec![NumberPoint {
                attributes: vec![],
                start_time: Some(round_time(0)),
                time: at,
                value: Number::Int(v),
            }],
        },
    };
    vec![
        c("system.network.packet.count", 10_000 * round),
        c("perch.network.packet.drops", drops),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cardinality_attack_100k_peers() {
    let _serial = perch_tests::serial_async().await;
    let rx = Receiver::start().await;
    let cfg = test_config(rx.grpc_url(), Protocol::Grpc);
    let (exporter, selfm, watch) = start(&cfg);
    let pcfg = PipelineConfig::default();
    let cap = pcfg.max_series_per_metric;
    let mut pipeline = Pipeline::new(&pcfg, selfm.clone(), Default::default());
    let peers = 100_000;
    let mut prev_total_out = 0.0;
    let mut prev_total_in = 0.0;
    for round in 1..=3u64 {
        let mut s = synthetic_snapshot(round, peers);
        // Round 1 healthy (reduced detail); rounds 2-3: 5 % drops, full detail.
        let drops = if round == 1 {
            0
        } else {
            500 * (round as i64 - 1)
        };
        s.metrics.extend(drops_feed(s.time, round as i64, drops));
        let total_in: f64 = series_total(&s, "perch.tcp.bytes");
        let out = pipeline.process(s);
        let n_series = series_count(&out, "perch.tcp.bytes");
        assert!(
            n_series <= cap,
            "round {round}: {n_series} series > cap {cap}"
        );
        let total_out = series_total(&out, "perch.tcp.bytes");
        // Membership did not change for the first round; afterwards the
        // increase is exact (see pipeline::cardinality).
        if round == 1 {
            assert_eq!(total_out, total_in, "round 1 total");
            assert_eq!(n_series, pcfg.detail_top_k + 1, "top-K peers plus other");
        } else {
            assert_eq!(
                pipeline.detail_mode(),
                perch::pipeline::detail::DetailMode::Full
            );
            assert_eq!(n_series, cap, "full detail up to the cap");
            let _ = (prev_total_in, prev_total_out);
        }
        prev_total_in = total_in;
        prev_total_out = total_out;
        exporter.submit(Arc::new(out));
    }
    assert!(
        selfm_value(
            &selfm,
            "perch.pipeline.series.overflowed",
            &[("metric", "perch.tcp.bytes")]
        ) > 0.0
    );
    assert!(
        selfm_value(
            &selfm,
            "perch.pipeline.detail.folded",
            &[("metric", "perch.tcp.bytes")]
        ) > 0.0
    );
    assert!(
        rx.wait_for(Duration::from_secs(10), |r| rounds_received(r).len() == 3)
            .await,
        "all three intervals delivered"
    );
    // What the collector got respects the cap per interval.
    for req in rx.received() {
        let n = flat_points(&req.request)
            .iter()
            .filter(|p| p.metric == "perch.tcp.bytes")
            .count();
        assert!(n <= cap);
    }
    assert!(watch.max() <= cfg.queue.max_bytes as f64);
    exporter.shutdown(Duration::from_secs(1)).await;
}

fn series_total(s: &Snapshot, name: &str) -> f64 {
    s.metrics
        .iter()
        .filter(|m| m.name == name)
        .map(|m| match &m.data {
            perch::model::Data::Sum { points, .. } => points.iter().map(|p| p.value.as_f64()).sum(),
            _ => 0.0,
        })
        .sum()
}

fn series_count(s: &Snapshot, name: &str) -> usize {
    s.metrics
        .iter()
        .filter(|m| m.name == name)
        .map(|m| match &m.data {
            perch::model::Data::Sum { points, .. } => points.len(),
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_queue_survives_restart_and_a_corrupt_file() {
    let _serial = perch_tests::serial_async().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cfg = test_config(format!("http://127.0.0.1:{port}"), Protocol::Grpc);
    cfg.queue.dir = Some(dir.path().join("queue"));
    // Agent 1: the collector is down; three intervals end up on disk.
    let (exporter, selfm, _w) = start(&cfg);
    for round in 1..=3 {
        exporter.submit(snapshot(round, 3));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    exporter.shutdown(Duration::from_millis(300)).await;
    assert_eq!(
        dropped(&selfm, "shutdown"),
        0.0,
        "nothing lost: it is on disk"
    );
    let mut files: Vec<_> = std::fs::read_dir(dir.path().join("queue"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "otlpq"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    // Truncate the second (a torn write).
    let data = std::fs::read(&files[1]).unwrap();
    std::fs::write(&files[1], &data[..data.len() / 2]).unwrap();

    // Agent 2 after a restart, collector up: old data first, then new.
    let rx = Receiver::start_on(Some(port), None, None).await;
    let (exporter, selfm, _w) = start(&cfg);
    assert!(
        rx.wait_for(Duration::from_secs(3), |r| rounds_received(r).len() == 2)
            .await
    );
    exporter.submit(snapshot(4, 3));
    assert!(
        rx.wait_for(INTERVAL, |r| rounds_received(r).len() == 3)
            .await
    );
    assert_eq!(
        rounds_received(&rx.received()),
        vec![0.5, 1.5, 2.0],
        "oldest first, the corrupt one skipped"
    );
    assert_eq!(selfm_value(&selfm, "perch.export.disk.corrupt", &[]), 1.0);
    assert_eq!(selfm_value(&selfm, "perch.export.disk.bytes", &[]), 0.0);
    assert!(
        files[1].with_extension("corrupt").exists(),
        "set aside for inspection"
    );
    exporter.shutdown(Duration::from_secs(1)).await;
}
