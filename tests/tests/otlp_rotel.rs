//! End to end against a real collector: Pipeline → OtlpExporter → Rotel →
//! (Rotel's OTLP exporter) → in-process receiver, decoded and checked.
//! Rotel must be installed (`cargo xtask setup`); a missing Rotel fails.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use perch::config::export::{PipelineConfig, Protocol};
use perch::exporters::otlp::OtlpExporter;
use perch::pipeline::Pipeline;
use perch::selfmetrics::SelfMetrics;
use perch_tests::otlp_receiver::*;

const INTERVAL: Duration = Duration::from_millis(300);

async fn run_through_rotel(protocol: Protocol) {
    let sink = Receiver::start().await;
    let rotel = Rotel::start(sink.grpc);
    let endpoint = match protocol {
        Protocol::Grpc => rotel.grpc_url(),
        Protocol::HttpProtobuf => rotel.http_url(),
    };
    let selfm = Arc::new(SelfMetrics::new());
    let memory = perch::pipeline::memory::MemoryGauge::default();
    let cfg = test_config(endpoint, protocol);
    let exporter =
        OtlpExporter::start_with_resource(&cfg, selfm.clone(), memory.clone(), test_resource())
            .expect("start")
            .expect("endpoint configured");
    let mut pipeline = Pipeline::new(&PipelineConfig::default(), selfm.clone(), memory.clone());
    let rounds = 3u64;
    let mut sent_points = 0;
    for round in 1..=rounds {
        let s = pipeline.process(synthetic_snapshot(round, 3));
        sent_points += points_in(&s);
        exporter.submit(Arc::new(s));
        tokio::time::sleep(INTERVAL).await;
    }
    let want = sent_points as usize;
    assert!(
        sink.wait_for(Duration::from_secs(10), |r| accepted_points(r).len()
            >= want)
            .await,
        "{protocol:?}: rotel forwarded {} of {want} points",
        accepted_points(&sink.received()).len()
    );
    exporter.shutdown(Duration::from_secs(2)).await;
    let received = sink.received();
    let points = accepted_points(&received);
    assert_eq!(
        points.len(),
        want,
        "{protocol:?}: no duplicates, nothing lost"
    );

    // Names, units, attributes.
    let units: Vec<(&str, &str)> = vec![
        ("system.cpu.time", "s"),
        ("perch.tcp.bytes", "By"),
        ("system.cpu.load_average.1m", "{thread}"),
        ("perch.sched.runqueue.latency", "s"),
    ];
    for (name, unit) in units {
        let p = points
            .iter()
            .find(|p| p.metric == name)
            .unwrap_or_else(|| panic!("{protocol:?}: {name} missing"));
        assert_eq!(p.unit, unit, "{name}");
    }
    let peer = points
        .iter()
        .find(|p| p.metric == "perch.tcp.bytes")
        .expect("peer point");
    assert!(
        peer.attributes
            .contains(&("network.peer.address".to_owned(), "10.0.0.1".to_owned()))
            || points.iter().any(|p| p.metric == "perch.tcp.bytes"
                && p.attributes
                    .iter()
                    .any(|(k, _)| k == "network.peer.address"))
    );
    let cpu_attrs: Vec<(String, String)> = vec![
        ("cpu".into(), "1".into()),
        ("cpu.mode".into(), "system".into()),
    ];
    assert!(points
        .iter()
        .any(|p| p.metric == "system.cpu.time" && p.attributes == cpu_attrs));

    // Resource attributes, as sent (Rotel passes them through).
    let res = resource_attributes(
        &received
            .iter()
            .find(|r| r.accepted)
            .expect("a request")
            .request,
    );
    for (k, v) in test_resource() {
        assert!(
            res.contains(&(k.clone(), v.clone())),
            "{protocol:?}: resource {k}={v} missing in {res:?}"
        );
    }

    // Cumulative values: monotonic across intervals, start time constant.
    let series = series_values(
        &received,
        "system.cpu.time",
        &[("cpu", "1"), ("cpu.mode", "system")],
    );
    assert_eq!(series.len(), rounds as usize);
    for w in series.windows(2) {
        assert!(w[1].0 > w[0].0, "{protocol:?}: not monotonic: {series:?}");
        assert_eq!(
            w[1].1, w[0].1,
            "{protocol:?}: start time changed: {series:?}"
        );
    }
    assert_eq!(series.last().map(|s| s.0), Some(0.5 * 3.0 * 2.0));
    let hist = series_values(&received, "perch.sched.runqueue.latency", &[]);
    assert_eq!(
        hist.iter().map(|h| h.0).collect::<Vec<_>>(),
        vec![6.0, 12.0, 18.0]
    );
    // The kernel's exponential buckets arrive as they were sent: an
    // ExponentialHistogram point at scale 3 with exactly the populated
    // buckets, the count and the sum.
    let last = received
        .iter()
        .filter(|r| r.accepted)
        .flat_map(|r| &r.request.resource_metrics)
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .filter(|m| m.name == "perch.sched.runqueue.latency")
        .filter_map(|m| match &m.data {
            Some(Data::ExponentialHistogram(h)) => h.data_points.last().cloned(),
            other => panic!("{protocol:?}: not an exponential histogram: {other:?}"),
        })
        .max_by_key(|p| p.time_unix_nano)
        .expect("a run-queue point");
    let perch::model::Buckets::Exponential(sent) =
        kernel_buckets(&[(1_000, rounds), (2_000, 2 * rounds), (4_000, 3 * rounds)])
    else {
        unreachable!()
    };
    assert_eq!(last.scale, sent.scale, "{protocol:?}");
    assert_eq!(last.zero_count, 0);
    assert_eq!(last.count, 6 * rounds);
    assert_eq!(last.sum, Some(0.003 * rounds as f64));
    let positive = last.positive.expect("positive buckets");
    assert_eq!(
        (positive.offset, positive.bucket_counts),
        (sent.offset, sent.counts),
        "{protocol:?}: buckets changed on the way"
    );

    assert_eq!(
        selfm_value(&selfm, "perch.export.points.sent", &[]),
        sent_points as f64
    );
    for reason in ["queue_full", "rejected", "shutdown"] {
        assert_eq!(
            selfm_value(&selfm, "perch.export.points.dropped", &[("reason", reason)]),
            0.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_through_rotel() {
    let _serial = perch_tests::serial_async().await;
    run_through_rotel(Protocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_through_rotel() {
    let _serial = perch_tests::serial_async().await;
    run_through_rotel(Protocol::HttpProtobuf).await;
}

/// Rotel killed mid-run and restarted: the exporter queues meanwhile,
/// delivers everything within one interval of the restart, and the
/// cumulative series show no reset (same start time, monotonic values).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotel_killed_and_restarted() {
    let _serial = perch_tests::serial_async().await;
    let sink = Receiver::start().await;
    let mut rotel = Rotel::start(sink.grpc);
    let selfm = Arc::new(SelfMetrics::new());
    let memory = perch::pipeline::memory::MemoryGauge::default();
    let cfg = test_config(rotel.grpc_url(), Protocol::Grpc);
    let bound = cfg.queue.max_bytes as f64;
    let watch = QueueWatch::start(selfm.clone());
    let exporter =
        OtlpExporter::start_with_resource(&cfg, selfm.clone(), memory.clone(), test_resource())
            .unwrap()
            .unwrap();
    let mut pipeline = Pipeline::new(&PipelineConfig::default(), selfm.clone(), memory.clone());
    let mut round = 0;
    let mut submit = |exporter: &OtlpExporter, pipeline: &mut Pipeline| {
        round += 1;
        exporter.submit(Arc::new(pipeline.process(synthetic_snapshot(round, 3))));
    };
    for _ in 0..3 {
        submit(&exporter, &mut pipeline);
        tokio::time::sleep(INTERVAL).await;
    }
    assert!(
        sink.wait_for(Duration::from_secs(5), |r| r
            .iter()
            .filter(|x| x.accepted)
            .count()
            >= 3)
            .await
    );
    rotel.kill();
    for _ in 0..4 {
        submit(&exporter, &mut pipeline);
        tokio::time::sleep(INTERVAL).await;
    }
    assert!(
        selfm_value(&selfm, "perch.export.retries", &[]) >= 1.0,
        "the outage was noticed"
    );
    rotel.restart();
    let back = std::time::Instant::now();
    submit(&exporter, &mut pipeline);
    let rounds = 8;
    assert!(
        sink.wait_for(Duration::from_secs(10), |r| series_values(
            r,
            "system.cpu.time",
            &[("cpu", "0"), ("cpu.mode", "user")]
        )
        .len()
            >= rounds)
            .await,
        "not all intervals delivered after the restart"
    );
    // Recovery within one interval of the collector's return (plus Rotel's
    // own 10 ms batching).
    let recovered = back.elapsed();
    assert!(
        recovered < INTERVAL + Duration::from_millis(500),
        "recovered after {recovered:?}"
    );
    exporter.shutdown(Duration::from_secs(2)).await;

    let series = series_values(
        &sink.received(),
        "system.cpu.time",
        &[("cpu", "0"), ("cpu.mode", "user")],
    );
    assert_eq!(
        series.len(),
        rounds,
        "each interval exactly once: {series:?}"
    );
    for w in series.windows(2) {
        assert!(w[1].0 > w[0].0, "reset in a cumulative series: {series:?}");
        assert_eq!(w[1].1, w[0].1, "start time changed: {series:?}");
    }
    assert_eq!(
        selfm_value(
            &selfm,
            "perch.export.points.dropped",
            &[("reason", "queue_full")]
        ),
        0.0
    );
    assert!(
        watch.max() <= bound,
        "queue grew to {} > {bound}",
        watch.max()
    );
    assert!(watch.max() > 0.0, "the queue held the outage's data");
}
