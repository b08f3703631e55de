//! Memory limiter across pipeline and exporter. Its own test binary: the
//! limiter state is process-wide, and other tests must not see it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use perch::config::export::{PipelineConfig, Protocol};
use perch::exporters::otlp::OtlpExporter;
use perch::pipeline::Pipeline;
use perch::selfmetrics::SelfMetrics;
use perch_tests::otlp_receiver::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_limit_refuses_new_data_and_recovers() {
    let _serial = perch_tests::serial_async().await;
    let rx = Receiver::start().await;
    let selfm = Arc::new(SelfMetrics::new());
    let memory = perch::pipeline::memory::MemoryGauge::default();
    let cfg = test_config(rx.grpc_url(), Protocol::Grpc);
    let exporter =
        OtlpExporter::start_with_resource(&cfg, selfm.clone(), memory.clone(), test_resource())
            .unwrap()
            .unwrap();
    let pcfg = PipelineConfig {
        memory_soft_limit_bytes: 100 << 20,
        memory_hard_limit_bytes: 200 << 20,
        ..PipelineConfig::default()
    };
    let rss = Arc::new(AtomicU64::new(300 << 20));
    let r = rss.clone();
    let mut pipeline = Pipeline::new(&pcfg, selfm.clone(), memory.clone())
        .with_rss_source(move || Some(r.load(Ordering::Relaxed)));
    let s = pipeline.process(synthetic_snapshot(1, 3));
    let n = points_in(&s) as f64;
    exporter.submit(Arc::new(s));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.received().is_empty(), "refused past the hard limit");
    assert_eq!(
        selfm_value(
            &selfm,
            "perch.export.points.dropped",
            &[("reason", "memory_limit")]
        ),
        n
    );
    assert_eq!(selfm_value(&selfm, "perch.memory.state", &[]), 2.0);
    // Memory back under the limits: the next interval is delivered.
    rss.store(10 << 20, Ordering::Relaxed);
    exporter.submit(Arc::new(pipeline.process(synthetic_snapshot(2, 3))));
    assert!(
        rx.wait_for(Duration::from_millis(600), |r| r.iter().any(|x| x.accepted))
            .await
    );
    assert_eq!(selfm_value(&selfm, "perch.memory.state", &[]), 0.0);
    exporter.shutdown(Duration::from_secs(1)).await;
}
