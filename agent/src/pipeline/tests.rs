//! Pipeline unit tests: deny list, series cap, adaptive detail, folding
//! with exact and monotonic totals, memory shedding, clock jumps.

use super::memory::{MemoryGauge, MemoryState};
use super::*;
use crate::model::{Buckets, Number};
use std::time::Duration;

fn t(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
}

fn counter(name: &'static str, at: u64, pts: Vec<(Attributes, i64)>) -> Metric {
    Metric {
        name,
        description: "d",
        unit: "By",
        data: Data::Sum {
            monotonic: true,
            points: pts
                .into_iter()
                .map(|(a, v)| NumberPoint {
                    attributes: a,
                    start_time: Some(t(0)),
                    time: t(at),
                    value: Number::Int(v),
                })
                .collect(),
        },
    }
}

fn gauge(name: &'static str, at: u64, pts: Vec<(Attributes, f64)>) -> Metric {
    Metric {
        name,
        description: "d",
        unit: "1",
        data: Data::Gauge {
            points: pts
                .into_iter()
                .map(|(a, v)| NumberPoint {
                    attributes: a,
                    start_time: None,
                    time: t(at),
                    value: Number::Double(v),
                })
                .collect(),
        },
    }
}

fn snap(at: u64, metrics: Vec<Metric>) -> Snapshot {
    Snapshot {
        time: t(at),
        metrics,
    }
}

fn peer(i: usize) -> Attributes {
    vec![(
        detail::PEER_ATTRIBUTE,
        format!("10.0.{}.{}", i / 256, i % 256).into(),
    )]
}

fn points(m: &Metric) -> Vec<(Attributes, f64, Option<SystemTime>)> {
    match &m.data {
        Data::Sum { points, .. } | Data::Gauge { points } => points
            .iter()
            .map(|p| (p.attributes.clone(), p.value.as_f64(), p.start_time))
            .collect(),
        Data::Histogram { points } => points
            .iter()
            .map(|p| (p.attributes.clone(), p.count as f64, Some(p.start_time)))
            .collect(),
    }
}

fn total(m: &Metric) -> f64 {
    points(m).iter().map(|p| p.1).sum()
}

fn value_of(m: &Metric, attrs: &Attributes) -> Option<f64> {
    points(m).into_iter().find(|p| &p.0 == attrs).map(|p| p.1)
}

fn full_detail_cfg(cap: usize) -> PipelineConfig {
    PipelineConfig {
        max_series_per_metric: cap,
        // Enter full detail at once: any error ratio above 0.
        detail_enter_ratio: -1.0,
        detail_exit_ratio: -1.0,
        ..PipelineConfig::default()
    }
}

fn pipeline(cfg: PipelineConfig) -> (Pipeline, Arc<SelfMetrics>) {
    let selfm = Arc::new(SelfMetrics::new());
    let p = Pipeline::new(&cfg, selfm.clone(), MemoryGauge::default()).with_rss_source(|| Some(1));
    (p, selfm)
}

#[test]
fn deny_list_and_ephemeral_ports() {
    struct Case {
        name: &'static str,
        input: Vec<(Attributes, i64)>,
        want: Vec<(Attributes, f64)>,
    }
    let cases = vec![
        Case {
            name: "denied key removed, series merged",
            input: vec![
                (vec![("cpu", 0i64.into()), ("pid", 10i64.into())], 5),
                (vec![("cpu", 0i64.into()), ("pid", 11i64.into())], 7),
                (vec![("cpu", 1i64.into()), ("pid", 10i64.into())], 1),
            ],
            want: vec![
                (vec![("cpu", 0i64.into())], 12.0),
                (vec![("cpu", 1i64.into())], 1.0),
            ],
        },
        Case {
            name: "client.port and request_id never leave",
            input: vec![(
                vec![
                    ("client.port", 50000i64.into()),
                    ("request_id", "abc".into()),
                    ("server.port", 443i64.into()),
                ],
                3,
            )],
            want: vec![(vec![("server.port", 443i64.into())], 3.0)],
        },
        Case {
            name: "ephemeral peer ports folded, well-known kept",
            input: vec![
                (vec![("network.peer.port", 40000i64.into())], 1),
                (vec![("network.peer.port", 50000i64.into())], 2),
                (vec![("network.peer.port", 80i64.into())], 4),
            ],
            want: vec![
                (vec![("network.peer.port", "ephemeral".into())], 3.0),
                (vec![("network.peer.port", 80i64.into())], 4.0),
            ],
        },
        Case {
            name: "a listening port above 32767 is kept (server.port is never a client's)",
            input: vec![(vec![("server.port", 40000i64.into())], 5)],
            want: vec![(vec![("server.port", 40000i64.into())], 5.0)],
        },
        Case {
            name: "nothing to do",
            input: vec![(vec![("cpu", 0i64.into())], 9)],
            want: vec![(vec![("cpu", 0i64.into())], 9.0)],
        },
    ];
    for c in cases {
        let (mut p, _) = pipeline(PipelineConfig::default());
        let out = p.process(snap(10, vec![counter("m", 10, c.input)]));
        let got: Vec<(Attributes, f64)> = points(&out.metrics[0])
            .into_iter()
            .map(|(a, v, _)| (a, v))
            .collect();
        assert_eq!(got, c.want, "{}", c.name);
    }
}

#[test]
fn deny_list_is_configurable() {
    let cfg = PipelineConfig {
        deny_attributes: vec!["container.id".into()],
        ..PipelineConfig::default()
    };
    let (mut p, _) = pipeline(cfg);
    let out = p.process(snap(
        10,
        vec![counter(
            "m",
            10,
            vec![(vec![("container.id", "a".into()), ("pid", 1i64.into())], 1)],
        )],
    ));
    assert_eq!(points(&out.metrics[0])[0].0, vec![("pid", 1i64.into())]);
}

#[test]
fn series_cap_holds_and_totals_stay_exact() {
    // (cap, distinct series, want own series, want overflowed points)
    let cases: &[(usize, usize, usize, u64)] = &[
        (10, 5, 5, 0),
        (10, 9, 9, 0),
        (10, 10, 9, 1),
        (10, 1000, 9, 991),
        (2000, 100_000, 1999, 98_001),
    ];
    for &(cap, n, want_own, want_over) in cases {
        let (mut p, selfm) = pipeline(full_detail_cfg(cap));
        let input: Vec<(Attributes, i64)> = (0..n)
            .map(|i| (vec![("k", (i as i64).into())], i as i64 + 1))
            .collect();
        let want_total: f64 = input.iter().map(|(_, v)| *v as f64).sum();
        let out = p.process(snap(10, vec![counter("m", 10, input)]));
        let pts = points(&out.metrics[0]);
        assert!(pts.len() <= cap, "cap {cap}: {} series", pts.len());
        let own = pts
            .iter()
            .filter(|p| p.0 != cardinality::overflow_attributes())
            .count();
        assert_eq!(own, want_own, "cap {cap} n {n}");
        assert_eq!(total(&out.metrics[0]), want_total, "cap {cap} n {n}: total");
        let over = selfm
            .value(
                crate::catalogue::SERIES_OVERFLOWED,
                &vec![("metric", "m".into())],
            )
            .unwrap_or(0.0);
        assert_eq!(over, want_over as f64, "cap {cap} n {n}: overflow counter");
    }
}

#[test]
fn overflow_is_monotonic_when_series_come_and_go() {
    // Cap 3: two own series, then the overflow. Series churn every interval.
    let cfg = PipelineConfig {
        series_ttl_intervals: 2,
        ..full_detail_cfg(3)
    };
    let (mut p, _) = pipeline(cfg);
    let over = cardinality::overflow_attributes();
    let mut last_over = 0.0;
    let mut cumulative_inputs: HashMap<i64, i64> = HashMap::new();
    for round in 0..8u64 {
        // Keys 0 and 1 always present; two churning keys per round.
        let mut input = vec![];
        for k in [0, 1, 10 + round as i64, 11 + round as i64] {
            let v = cumulative_inputs.entry(k).or_insert(0);
            *v += 5;
            input.push((vec![("k", k.into())], *v));
        }
        let out = p.process(snap(
            10 * (round + 1),
            vec![counter("m", 10 * (round + 1), input)],
        ));
        let o = value_of(&out.metrics[0], &over).expect("overflow series");
        assert!(
            o >= last_over,
            "round {round}: overflow went down {last_over} -> {o}"
        );
        last_over = o;
        // Everything ever counted is in the output, exactly once.
        let everything: i64 = cumulative_inputs.values().sum();
        assert_eq!(total(&out.metrics[0]), everything as f64, "round {round}");
    }
}

#[test]
fn gauges_fold_by_adding_current_values() {
    let (mut p, _) = pipeline(full_detail_cfg(3));
    let input: Vec<(Attributes, f64)> = (0..5)
        .map(|i| (vec![("k", (i as i64).into())], 1.5))
        .collect();
    for round in 1..=2u64 {
        let out = p.process(snap(
            round * 10,
            vec![gauge("g", round * 10, input.clone())],
        ));
        assert_eq!(total(&out.metrics[0]), 7.5, "round {round}");
        assert_eq!(
            value_of(&out.metrics[0], &cardinality::overflow_attributes()),
            Some(4.5),
            "round {round}"
        );
    }
}

fn feed(at: u64, packets: i64, drops: i64) -> Vec<Metric> {
    vec![
        counter(
            crate::catalogue::NETWORK_PACKETS,
            at,
            vec![(vec![], packets)],
        ),
        counter(crate::catalogue::PACKET_DROPS, at, vec![(vec![], drops)]),
    ]
}

#[test]
fn reduced_detail_keeps_top_k_and_totals() {
    let cfg = PipelineConfig {
        max_series_per_metric: 100,
        detail_top_k: 3,
        ..PipelineConfig::default()
    };
    let (mut p, selfm) = pipeline(cfg);
    // Peer i sends (i+1)*10 bytes per interval.
    let bytes = |round: i64| -> Vec<(Attributes, i64)> {
        (0..10)
            .map(|i| (peer(i), (i as i64 + 1) * 10 * round))
            .collect()
    };
    let mut last_other = 0.0;
    for round in 1..=3i64 {
        let at = round as u64 * 10;
        let mut ms = feed(at, 1000 * round, 0);
        ms.push(counter("perch.tcp.bytes", at, bytes(round)));
        let out = p.process(snap(at, ms));
        assert_eq!(p.detail_mode(), DetailMode::Reduced);
        let m = out
            .metrics
            .iter()
            .find(|m| m.name == "perch.tcp.bytes")
            .unwrap();
        let pts = points(m);
        // Top 3 peers (7, 8, 9) and `other`.
        assert_eq!(pts.len(), 4, "round {round}: {pts:?}");
        for i in 7..10 {
            assert!(
                value_of(m, &peer(i)).is_some(),
                "round {round}: peer {i} kept"
            );
        }
        let other: Attributes = vec![(detail::PEER_ATTRIBUTE, "other".into())];
        let o = value_of(m, &other).expect("other series");
        assert!(o > last_other);
        last_other = o;
        let want_total: i64 = bytes(round).iter().map(|(_, v)| v).sum();
        assert_eq!(total(m), want_total as f64, "round {round}");
    }
    assert_eq!(
        selfm.value(
            crate::catalogue::DETAIL_FOLDED,
            &vec![("metric", "perch.tcp.bytes".into())]
        ),
        Some(21.0)
    );
    assert_eq!(
        selfm.value(
            crate::catalogue::DETAIL_MODE,
            &vec![("mode", "reduced".into())]
        ),
        Some(1.0)
    );
}

#[test]
fn errors_switch_to_full_detail_without_double_counting() {
    let cfg = PipelineConfig {
        max_series_per_metric: 100,
        detail_top_k: 2,
        detail_exit_intervals: 2,
        ..PipelineConfig::default()
    };
    let (mut p, selfm) = pipeline(cfg);
    // (round, drops so far, want mode)
    let script: &[(i64, i64, DetailMode)] = &[
        (1, 0, DetailMode::Reduced),
        (2, 0, DetailMode::Reduced),
        (3, 100, DetailMode::Full), // 100 drops / 1000 packets = 10 %
        (4, 100, DetailMode::Full),
        (5, 100, DetailMode::Reduced),
        (6, 100, DetailMode::Reduced),
    ];
    // Folding and restarting series must preserve every increase: the sum
    // over output series of their increase this round (a new series or a
    // new start time counts from zero) equals the input's increase.
    let mut prev: HashMap<Attributes, (f64, Option<SystemTime>)> = HashMap::new();
    for &(round, drops, want) in script {
        let at = round as u64 * 10;
        let mut ms = feed(at, 1000 * round, drops);
        let per_peer: Vec<(Attributes, i64)> =
            (0..5).map(|i| (peer(i), (i as i64 + 1) * round)).collect();
        ms.push(counter("perch.tcp.bytes", at, per_peer.clone()));
        let out = p.process(snap(at, ms));
        assert_eq!(p.detail_mode(), want, "round {round}");
        let m = out
            .metrics
            .iter()
            .find(|m| m.name == "perch.tcp.bytes")
            .unwrap();
        let other: Attributes = vec![(detail::PEER_ATTRIBUTE, "other".into())];
        let n_own = points(m).iter().filter(|p| p.0 != other).count();
        match want {
            DetailMode::Full => assert_eq!(n_own, 5, "round {round}"),
            DetailMode::Reduced => assert_eq!(n_own, 2, "round {round}"),
        }
        let mut increase = 0.0;
        for (a, v, start) in points(m) {
            match prev.get(&a) {
                Some((pv, pstart)) if *pstart == start => {
                    assert!(
                        v >= *pv,
                        "round {round}: {a:?} went {pv} -> {v} without a new start"
                    );
                    increase += v - pv;
                }
                _ => increase += v,
            }
            prev.insert(a, (v, start));
        }
        assert_eq!(increase, 15.0, "round {round}: increase");
    }
    assert_eq!(
        selfm.value(crate::catalogue::DETAIL_RATIO, &vec![]),
        Some(0.0)
    );
}

#[test]
fn memory_soft_limit_sheds_detail_and_hard_limit_is_published() {
    let cfg = PipelineConfig {
        memory_soft_limit_bytes: 100,
        memory_hard_limit_bytes: 200,
        ..full_detail_cfg(100)
    };
    let rss = Arc::new(std::sync::atomic::AtomicU64::new(50));
    let r = rss.clone();
    let selfm = Arc::new(SelfMetrics::new());
    let gauge = MemoryGauge::default();
    let mut p = Pipeline::new(&cfg, selfm.clone(), gauge.clone())
        .with_rss_source(move || Some(r.load(std::sync::atomic::Ordering::Relaxed)));
    // Each peer sends 10 bytes per interval.
    let run = |p: &mut Pipeline, at: u64| {
        let per_peer: Vec<(Attributes, i64)> = (0..5).map(|i| (peer(i), at as i64)).collect();
        let mut ms = feed(at, 1000 * at as i64, 500 * at as i64);
        ms.push(counter("perch.tcp.bytes", at, per_peer));
        let out = p.process(snap(at, ms));
        out.metrics
            .into_iter()
            .find(|m| m.name == "perch.tcp.bytes")
            .unwrap()
    };
    run(&mut p, 10);
    let m = run(&mut p, 20);
    assert_eq!(points(&m).len(), 5, "full detail under the limit");
    rss.store(150, std::sync::atomic::Ordering::Relaxed);
    let m = run(&mut p, 30);
    assert_eq!(points(&m).len(), 1, "soft limit: all peers shed into other");
    // `other` carries the increase since the peers were last exported.
    assert_eq!(total(&m), 50.0);
    assert_eq!(
        selfm.value(
            crate::catalogue::MEMORY_SHED,
            &vec![("metric", "perch.tcp.bytes".into())]
        ),
        Some(5.0)
    );
    assert_eq!(
        selfm.value(crate::catalogue::MEMORY_STATE, &vec![]),
        Some(1.0)
    );
    assert_eq!(gauge.get(), MemoryState::Soft);
    rss.store(250, std::sync::atomic::Ordering::Relaxed);
    run(&mut p, 40);
    assert_eq!(
        selfm.value(crate::catalogue::MEMORY_STATE, &vec![]),
        Some(2.0)
    );
    // What the exporter reads.
    assert_eq!(gauge.get(), MemoryState::Hard);
    rss.store(50, std::sync::atomic::Ordering::Relaxed);
    run(&mut p, 50);
    assert_eq!(
        selfm.value(crate::catalogue::MEMORY_STATE, &vec![]),
        Some(0.0)
    );
    assert_eq!(gauge.get(), MemoryState::Normal);
}

#[test]
fn clock_jump_back_never_emits_older_points() {
    let (mut p, selfm) = pipeline(PipelineConfig::default());
    let a = p.process(snap(100, vec![counter("m", 100, vec![(vec![], 1)])]));
    // The wall clock steps back 50 s.
    let b = p.process(snap(50, vec![counter("m", 50, vec![(vec![], 2)])]));
    let time = |s: &Snapshot| match &s.metrics[0].data {
        Data::Sum { points, .. } => (points[0].time, points[0].start_time.unwrap()),
        _ => unreachable!(),
    };
    let (ta, _) = time(&a);
    let (tb, sb) = time(&b);
    assert!(tb > ta, "point went back in time");
    assert!(b.time > a.time);
    assert!(sb <= tb);
    assert_eq!(
        selfm.value(crate::catalogue::CLOCK_JUMPS, &vec![]),
        Some(1.0)
    );
}

#[test]
fn histograms_fold_bucket_wise() {
    let bounds: Arc<[f64]> = Arc::from(vec![1.0, 2.0, 4.0]);
    let h = |attrs: Attributes, at: u64, buckets: Vec<u64>| HistogramPoint {
        attributes: attrs,
        start_time: t(0),
        time: t(at),
        count: buckets.iter().sum(),
        sum: buckets.iter().sum::<u64>() as f64,
        buckets: Buckets::Explicit {
            bounds: bounds.clone(),
            counts: buckets,
        },
    };
    let (mut p, _) = pipeline(full_detail_cfg(2));
    let m = Metric {
        name: "h",
        description: "",
        unit: "s",
        data: Data::Histogram {
            points: vec![
                h(vec![("k", 1i64.into())], 10, vec![1, 0, 0, 0]),
                h(vec![("k", 2i64.into())], 10, vec![0, 2, 0, 0]),
                h(vec![("k", 3i64.into())], 10, vec![0, 0, 3, 1]),
            ],
        },
    };
    let out = p.process(snap(10, vec![m]));
    let Data::Histogram { points } = &out.metrics[0].data else {
        panic!("not a histogram")
    };
    assert_eq!(points.len(), 2);
    let over = points
        .iter()
        .find(|p| p.attributes == cardinality::overflow_attributes())
        .unwrap();
    assert_eq!(
        over.buckets,
        Buckets::Explicit {
            bounds,
            counts: vec![0, 2, 3, 1]
        }
    );
    assert_eq!(over.count, 6);
}

#[test]
fn exponential_histograms_fold_exactly() {
    use crate::model::Exponential;
    let slots = |values: &[(u64, u64)]| {
        let mut s = vec![0u64; agent_common::exp::SLOTS as usize];
        for &(ns, n) in values {
            s[agent_common::exp::slot(ns) as usize] += n;
        }
        Exponential::from_slots(&s)
    };
    let parts = [
        slots(&[(1_000, 1)]),
        slots(&[(2_000_000, 2), (0, 1)]),
        slots(&[(1_000, 3), (5_000_000_000, 4)]),
    ];
    let h = |k: i64, e: &Exponential| HistogramPoint {
        attributes: vec![("k", k.into())],
        start_time: t(0),
        time: t(10),
        count: e.count(),
        sum: 1.0,
        buckets: Buckets::Exponential(e.clone()),
    };
    let (mut p, _) = pipeline(full_detail_cfg(1));
    let m = Metric {
        name: "h",
        description: "",
        unit: "s",
        data: Data::Histogram {
            points: parts
                .iter()
                .enumerate()
                .map(|(k, e)| h(k as i64, e))
                .collect(),
        },
    };
    let out = p.process(snap(10, vec![m]));
    let Data::Histogram { points } = &out.metrics[0].data else {
        panic!("not a histogram")
    };
    let over = points
        .iter()
        .find(|p| p.attributes == cardinality::overflow_attributes())
        .unwrap();
    // A cap of one: every series folds into the overflow series.
    assert_eq!(points.len(), 1);
    let mut want = parts[0].clone();
    want.add(&parts[1]);
    want.add(&parts[2]);
    assert_eq!(over.buckets, Buckets::Exponential(want));
    assert_eq!(over.count, 11);
}
