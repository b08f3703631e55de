//! End to end: the real `perch run` binary, with its real collectors, pushes
//! over OTLP to a real collector (Rotel), which forwards to an in-process
//! receiver that decodes what arrived. Both transports.

use std::collections::BTreeMap;
use std::time::Duration;

use perch_tests::otlp_receiver::{accepted_points, resource_attributes, Receiver, Rotel};
use perch_tests::perch::Agent;

/// (metric, attributes) -> [(time, start, value)].
type Series = BTreeMap<(String, Vec<(String, String)>), Vec<(u64, u64, f64)>>;

async fn agent_through_rotel(protocol: &str) {
    let _serial = perch_tests::serial_async().await;
    perch_tests::kernel::require_root();
    let sink = Receiver::start().await;
    let rotel = Rotel::start(sink.grpc);
    let endpoint = if protocol == "grpc" {
        rotel.grpc_url()
    } else {
        rotel.http_url()
    };
    std::env::set_var("NODE_NAME", "node-e2e");
    std::env::set_var("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=e2e");
    let agent = Agent::start(&[
        "--interval",
        "1s",
        "--otlp-endpoint",
        &endpoint,
        "--otlp-protocol",
        protocol,
    ]);
    // Three intervals of data.
    let got = sink
        .wait_for(Duration::from_secs(15), |r| {
            r.iter()
                .filter(|x| {
                    x.accepted
                        && perch_tests::otlp_receiver::flat_points(&x.request)
                            .iter()
                            .any(|p| p.metric == "system.cpu.time")
                })
                .count()
                >= 3
        })
        .await;
    assert!(agent.stop(), "perch did not exit cleanly");
    assert!(
        got,
        "{protocol}: fewer than 3 intervals arrived through Rotel"
    );

    let received = sink.received();
    let res: BTreeMap<String, String> = resource_attributes(&received[0].request)
        .into_iter()
        .collect();
    assert_eq!(
        res.get("service.name").map(String::as_str),
        Some("perch"),
        "{res:?}"
    );
    assert_eq!(
        res.get("k8s.node.name").map(String::as_str),
        Some("node-e2e"),
        "{res:?}"
    );
    assert_eq!(
        res.get("deployment.environment").map(String::as_str),
        Some("e2e"),
        "{res:?}"
    );
    for key in [
        "service.version",
        "service.instance.id",
        "host.name",
        "host.arch",
        "os.type",
    ] {
        assert!(res.contains_key(key), "resource lacks {key}: {res:?}");
    }

    let points = accepted_points(&received);
    let unit_of = |name: &str| {
        points
            .iter()
            .find(|p| p.metric == name)
            .map(|p| p.unit.clone())
    };
    for (name, unit) in [
        ("system.cpu.time", "s"),
        ("perch.cpu.context_switches", "{switch}"),
        ("perch.scheduler.runqueue.latency", "s"),
        ("perch.cpu.softirq.count", "{softirq}"),
        ("system.cpu.load_average.1m", "{thread}"),
        ("perch.probe.state", ""),
    ] {
        assert_eq!(unit_of(name).as_deref(), Some(unit), "{protocol}: {name}");
    }
    let ctx = points
        .iter()
        .find(|p| p.metric == "perch.cpu.context_switches")
        .expect("ctx");
    let keys: Vec<&str> = ctx.attributes.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["cpu.logical_number", "perch.context_switch.type"],
        "{protocol}"
    );

    // Every cumulative series is monotonic with one start time.
    let mut series: Series = BTreeMap::new();
    for p in points.iter().filter(|p| p.monotonic) {
        series
            .entry((p.metric.clone(), p.attributes.clone()))
            .or_default()
            .push((p.time_unix_nano, p.start_unix_nano, p.value));
    }
    let mut checked = 0;
    for ((metric, attrs), mut pts) in series {
        pts.sort_by_key(|p| p.0);
        for w in pts.windows(2) {
            assert!(
                w[1].2 >= w[0].2,
                "{protocol}: {metric} {attrs:?} went down: {w:?}"
            );
            assert_eq!(
                w[1].1, w[0].1,
                "{protocol}: {metric} {attrs:?} changed start time"
            );
            assert!(
                w[1].0 > w[0].0,
                "{protocol}: {metric} {attrs:?} time did not advance"
            );
        }
        checked += usize::from(pts.len() >= 2);
    }
    assert!(
        checked > 20,
        "{protocol}: only {checked} series seen in two intervals or more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_pushes_through_rotel_grpc() {
    agent_through_rotel("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_pushes_through_rotel_http() {
    agent_through_rotel("http/protobuf").await;
}
