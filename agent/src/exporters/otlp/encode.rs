//! Snapshot → OTLP `ExportMetricsServiceRequest` bytes, split into batches.
//!
//! Kernel histograms are binned exponentially in the kernel (scale 3, see
//! `agent_common::exp`), so by default they go out as OTLP
//! `ExponentialHistogram` points carrying the kernel's counts unchanged: only
//! the populated range, no re-binning. A point wider than
//! `export.max_buckets` is downscaled by merging adjacent buckets exactly,
//! as the OTel SDK does, and its lower scale is what it reports. With
//! `export.histograms = "explicit"` they go out as explicit-bounds points in
//! the classic layout, whose bounds are all kernel bounds, so that too is
//! exact. `min` and `max` are not sent: the kernel does not keep them.
//! The OTel SDK is not used: its instruments aggregate raw measurements,
//! and Perch's histograms are already aggregated in the kernel.
//!
//! Batches are bounded by points and by encoded bytes (under the
//! collector's default 4 MiB gRPC limit); a metric larger than a batch is
//! split across batches, each repeating the metric's name and unit.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    self as pm, exponential_histogram_data_point, metric::Data as PData, number_data_point,
    AggregationTemporality, ExponentialHistogramDataPoint, HistogramDataPoint, NumberDataPoint,
    ResourceMetrics, ScopeMetrics,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use crate::config::export::{ExportConfig, HistogramFormat, Temporality, DEFAULT_MAX_BUCKETS};
use crate::histogram::ClassicLayout;
use crate::model::{AttrValue, Attributes, Buckets, Data, Metric, Number, Snapshot};
use crate::pipeline::cardinality::{Val, OVERFLOW_ATTRIBUTE};

/// One encoded request.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Encoded, uncompressed `ExportMetricsServiceRequest`.
    pub body: Bytes,
    /// Data points inside.
    pub points: u64,
}

/// Nanoseconds since the Unix epoch (0 for times before it).
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn kv(key: &str, v: &AttrValue) -> KeyValue {
    let value = match v {
        // The model has no booleans; the overflow marker is one in OTel.
        AttrValue::Str(s) if key == OVERFLOW_ATTRIBUTE && s == "true" => {
            any_value::Value::BoolValue(true)
        }
        AttrValue::Str(s) => any_value::Value::StringValue(s.clone()),
        AttrValue::Int(i) => any_value::Value::IntValue(*i),
    };
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        key_strindex: 0,
    }
}

fn kvs(attrs: &Attributes) -> Vec<KeyValue> {
    attrs.iter().map(|(k, v)| kv(k, v)).collect()
}

/// How histograms are encoded (`export.histograms`, `max_buckets`,
/// `histogram_bounds`).
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramExport {
    pub format: HistogramFormat,
    pub max_buckets: usize,
    pub layout: ClassicLayout,
}

impl Default for HistogramExport {
    fn default() -> Self {
        Self {
            format: HistogramFormat::Exponential,
            max_buckets: DEFAULT_MAX_BUCKETS,
            layout: ClassicLayout::default(),
        }
    }
}

impl HistogramExport {
    /// From a validated config (an invalid layout falls back to the default).
    pub fn from_config(cfg: &ExportConfig) -> Self {
        Self {
            format: cfg.histograms,
            max_buckets: cfg.max_buckets.max(2),
            layout: cfg.classic_layout().unwrap_or_default(),
        }
    }
}

/// Delta-temporality memory of one series.
#[derive(Debug)]
struct Prev {
    val: Val,
    time: SystemTime,
    seen: u64,
}

/// Encodes snapshots; keeps delta state when delta temporality is on.
#[derive(Debug)]
pub struct Encoder {
    resource: Resource,
    scope: InstrumentationScope,
    temporality: Temporality,
    max_points: usize,
    max_bytes: usize,
    prev: HashMap<(&'static str, Attributes), Prev>,
    generation: u64,
    histograms: HistogramExport,
}

/// Keeps delta state of series absent for this many snapshots.
const DELTA_TTL: u64 = 10;

enum Point {
    Number(NumberDataPoint),
    Histogram(HistogramDataPoint),
    Exponential(ExponentialHistogramDataPoint),
}

impl Point {
    fn encoded_len(&self) -> usize {
        match self {
            Point::Number(p) => p.encoded_len(),
            Point::Histogram(p) => p.encoded_len(),
            Point::Exponential(p) => p.encoded_len(),
        }
    }
}

impl Encoder {
    pub fn new(
        resource: Resource,
        temporality: Temporality,
        max_points: usize,
        max_bytes: usize,
    ) -> Self {
        Self {
            resource,
            scope: InstrumentationScope {
                name: "perch".to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                attributes: vec![],
                dropped_attributes_count: 0,
            },
            temporality,
            max_points: max_points.max(1),
            max_bytes,
            prev: HashMap::new(),
            generation: 0,
            histograms: HistogramExport::default(),
        }
    }

    /// Sets how histograms are encoded.
    pub fn with_histograms(mut self, histograms: HistogramExport) -> Self {
        self.histograms = histograms;
        self
    }

    /// Converts one model metric's points, applying delta temporality.
    fn points(&mut self, m: &Metric) -> (PData, Vec<Point>) {
        let delta = self.temporality == Temporality::Delta;
        let gen = self.generation;
        let cumulative = AggregationTemporality::Cumulative as i32;
        let delta_t = AggregationTemporality::Delta as i32;
        match &m.data {
            Data::Sum { monotonic, points } => {
                let use_delta = delta && *monotonic;
                let pts = points
                    .iter()
                    .map(|p| {
                        let mut start = p.start_time.unwrap_or(p.time);
                        let mut value = p.value;
                        if use_delta {
                            let cur = Val::from_number(p.value);
                            let key = (m.name, p.attributes.clone());
                            if let Some(prev) = self.prev.get(&key) {
                                if let Some(d) = cur.delta(&prev.val) {
                                    value = d.to_number();
                                    start = prev.time;
                                }
                            }
                            self.prev.insert(
                                key,
                                Prev {
                                    val: cur,
                                    time: p.time,
                                    seen: gen,
                                },
                            );
                        }
                        Point::Number(NumberDataPoint {
                            attributes: kvs(&p.attributes),
                            start_time_unix_nano: unix_nanos(start),
                            time_unix_nano: unix_nanos(p.time),
                            exemplars: vec![],
                            flags: 0,
                            value: Some(number(value)),
                        })
                    })
                    .collect();
                (
                    PData::Sum(pm::Sum {
                        data_points: vec![],
                        aggregation_temporality: if use_delta { delta_t } else { cumulative },
                        is_monotonic: *monotonic,
                    }),
                    pts,
                )
            }
            Data::Gauge { points } => (
                PData::Gauge(pm::Gauge {
                    data_points: vec![],
                }),
                points
                    .iter()
                    .map(|p| {
                        Point::Number(NumberDataPoint {
                            attributes: kvs(&p.attributes),
                            start_time_unix_nano: 0,
                            time_unix_nano: unix_nanos(p.time),
                            exemplars: vec![],
                            flags: 0,
                            value: Some(number(p.value)),
                        })
                    })
                    .collect(),
            ),
            Data::Histogram { points } => {
                let exponential = self.histograms.format == HistogramFormat::Exponential
                    && points
                        .first()
                        .is_some_and(|p| matches!(p.buckets, Buckets::Exponential(_)));
                let pts = points
                    .iter()
                    .map(|p| {
                        let mut start = p.start_time;
                        let (mut count, mut sum, mut buckets) = (p.count, p.sum, p.buckets.clone());
                        if delta {
                            let cur = Val::Hist {
                                count: p.count,
                                sum: p.sum,
                                buckets: p.buckets.clone(),
                            };
                            let key = (m.name, p.attributes.clone());
                            if let Some(prev) = self.prev.get(&key) {
                                if let Some(Val::Hist {
                                    count: c,
                                    sum: s,
                                    buckets: b,
                                }) = cur.delta(&prev.val)
                                {
                                    (count, sum, buckets) = (c, s, b);
                                    start = prev.time;
                                }
                            }
                            self.prev.insert(
                                key,
                                Prev {
                                    val: cur,
                                    time: p.time,
                                    seen: gen,
                                },
                            );
                        }
                        let attributes = kvs(&p.attributes);
                        let (start_time_unix_nano, time_unix_nano) =
                            (unix_nanos(start), unix_nanos(p.time));
                        match (buckets, exponential) {
                            (Buckets::Exponential(mut e), true) => {
                                // `buckets` is this point's own copy: downscale it in place.
                                e.fit(self.histograms.max_buckets);
                                Point::Exponential(ExponentialHistogramDataPoint {
                                    attributes,
                                    start_time_unix_nano,
                                    time_unix_nano,
                                    count,
                                    sum: Some(sum),
                                    scale: e.scale,
                                    zero_count: e.zero_count,
                                    positive: Some(exponential_histogram_data_point::Buckets {
                                        offset: e.offset,
                                        bucket_counts: e.counts,
                                    }),
                                    negative: None,
                                    flags: 0,
                                    exemplars: vec![],
                                    min: None,
                                    max: None,
                                    zero_threshold: 0.0,
                                })
                            }
                            (buckets, _) => {
                                let (bounds, bucket_counts) = match buckets {
                                    Buckets::Explicit { bounds, counts } => {
                                        (bounds.to_vec(), counts)
                                    }
                                    Buckets::Exponential(e) => (
                                        self.histograms.layout.bounds().to_vec(),
                                        self.histograms.layout.counts(&e),
                                    ),
                                };
                                Point::Histogram(HistogramDataPoint {
                                    attributes,
                                    start_time_unix_nano,
                                    time_unix_nano,
                                    count,
                                    sum: Some(sum),
                                    bucket_counts,
                                    explicit_bounds: bounds,
                                    exemplars: vec![],
                                    flags: 0,
                                    min: None,
                                    max: None,
                                })
                            }
                        }
                    })
                    .collect();
                let aggregation_temporality = if delta { delta_t } else { cumulative };
                let shape = if exponential {
                    PData::ExponentialHistogram(pm::ExponentialHistogram {
                        data_points: vec![],
                        aggregation_temporality,
                    })
                } else {
                    PData::Histogram(pm::Histogram {
                        data_points: vec![],
                        aggregation_temporality,
                    })
                };
                (shape, pts)
            }
        }
    }

    fn request(&self, metrics: Vec<pm::Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(self.resource.clone()),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(self.scope.clone()),
                    metrics,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    /// Encodes `snapshot` into batches within the point and byte bounds.
    pub fn encode(&mut self, snapshot: &Snapshot) -> Vec<Batch> {
        self.generation += 1;
        // Bytes of the request without metrics, plus framing slack.
        let base = self.request(vec![]).encoded_len() + 16;
        let budget = self.max_bytes.saturating_sub(base).max(1);
        let mut out = Vec::new();
        let mut metrics: Vec<pm::Metric> = Vec::new();
        let (mut bytes, mut points) = (0usize, 0usize);

        for m in &snapshot.metrics {
            let (shape, pts) = self.points(m);
            if pts.is_empty() {
                continue;
            }
            let header = pm::Metric {
                name: m.name.to_owned(),
                description: m.description.to_owned(),
                unit: m.unit.to_owned(),
                metadata: vec![],
                data: Some(shape),
            };
            let header_len = header.encoded_len() + 8;
            let mut cur: Option<pm::Metric> = None;
            for p in pts {
                let plen = p.encoded_len() + 6;
                let extra = plen + if cur.is_none() { header_len } else { 0 };
                if points > 0 && (points + 1 > self.max_points || bytes + extra > budget) {
                    if let Some(c) = cur.take() {
                        metrics.push(c);
                    }
                    out.push(self.finish(std::mem::take(&mut metrics), points));
                    bytes = 0;
                    points = 0;
                }
                let c = cur.get_or_insert_with(|| {
                    bytes += header_len;
                    header.clone()
                });
                bytes += plen;
                points += 1;
                match (c.data.as_mut(), p) {
                    (Some(PData::Sum(s)), Point::Number(n)) => s.data_points.push(n),
                    (Some(PData::Gauge(g)), Point::Number(n)) => g.data_points.push(n),
                    (Some(PData::Histogram(h)), Point::Histogram(hp)) => h.data_points.push(hp),
                    (Some(PData::ExponentialHistogram(h)), Point::Exponential(hp)) => {
                        h.data_points.push(hp)
                    }
                    _ => {}
                }
            }
            if let Some(c) = cur.take() {
                metrics.push(c);
            }
        }
        if points > 0 {
            out.push(self.finish(metrics, points));
        }
        let gen = self.generation;
        if self.temporality == Temporality::Delta {
            self.prev.retain(|_, p| p.seen + DELTA_TTL >= gen);
        }
        out
    }

    fn finish(&self, metrics: Vec<pm::Metric>, points: usize) -> Batch {
        Batch {
            body: Bytes::from(self.request(metrics).encode_to_vec()),
            points: points as u64,
        }
    }
}

fn number(n: Number) -> number_data_point::Value {
    match n {
        Number::Int(i) => number_data_point::Value::AsInt(i),
        Number::Double(d) => number_data_point::Value::AsDouble(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HistogramPoint, NumberPoint};
    use std::sync::Arc;
    use std::time::Duration;

    fn t(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    fn snapshot(at: u64, n: usize, v: i64) -> Snapshot {
        Snapshot {
            time: t(at),
            metrics: vec![Metric {
                name: "perch.tcp.bytes",
                description: "bytes",
                unit: "By",
                data: Data::Sum {
                    monotonic: true,
                    points: (0..n)
                        .map(|i| NumberPoint {
                            attributes: vec![(
                                "network.peer.address",
                                format!("10.0.0.{i}").into(),
                            )],
                            start_time: Some(t(1)),
                            time: t(at),
                            value: Number::Int(v * (i as i64 + 1)),
                        })
                        .collect(),
                },
            }],
        }
    }

    fn decode(b: &Batch) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest::decode(b.body.clone()).unwrap()
    }

    fn sum_points(r: &ExportMetricsServiceRequest) -> Vec<NumberDataPoint> {
        r.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .flat_map(|m| match &m.data {
                Some(PData::Sum(s)) => s.data_points.clone(),
                _ => vec![],
            })
            .collect()
    }

    #[test]
    fn batches_respect_points_and_bytes() {
        // (max_points, max_bytes, points in snapshot, want batches)
        let cases: &[(usize, usize, usize, usize)] = &[
            (100, 1 << 20, 10, 1),
            (100, 1 << 20, 250, 3),
            (10_000, 4096, 1000, 0), // 0: only check bounds
            (1, 1 << 20, 3, 3),
        ];
        for &(max_points, max_bytes, n, want) in cases {
            let mut e = Encoder::new(
                Resource::default(),
                Temporality::Cumulative,
                max_points,
                max_bytes,
            );
            let batches = e.encode(&snapshot(10, n, 1));
            if want > 0 {
                assert_eq!(batches.len(), want, "{max_points}/{max_bytes}/{n}");
            }
            let mut total = 0;
            for b in &batches {
                assert!(
                    b.body.len() <= max_bytes,
                    "batch of {} bytes > {max_bytes}",
                    b.body.len()
                );
                assert!(b.points as usize <= max_points);
                let pts = sum_points(&decode(b));
                assert_eq!(pts.len() as u64, b.points);
                total += pts.len();
            }
            assert_eq!(total, n);
        }
    }

    #[test]
    fn delta_temporality() {
        let mut e = Encoder::new(Resource::default(), Temporality::Delta, 100, 1 << 20);
        let first = sum_points(&decode(&e.encode(&snapshot(10, 2, 5))[0]));
        assert_eq!(first[1].value, Some(number_data_point::Value::AsInt(10)));
        assert_eq!(first[1].start_time_unix_nano, unix_nanos(t(1)));
        let second = sum_points(&decode(&e.encode(&snapshot(20, 2, 7))[0]));
        assert_eq!(second[1].value, Some(number_data_point::Value::AsInt(4)));
        assert_eq!(second[1].start_time_unix_nano, unix_nanos(t(10)));
        // A reset: the new cumulative value is the delta.
        let third = sum_points(&decode(&e.encode(&snapshot(30, 2, 1))[0]));
        assert_eq!(third[1].value, Some(number_data_point::Value::AsInt(2)));
    }

    #[test]
    fn histograms_keep_exact_buckets_and_overflow_is_bool() {
        let mut e = Encoder::new(Resource::default(), Temporality::Cumulative, 100, 1 << 20);
        let s = Snapshot {
            time: t(10),
            metrics: vec![Metric {
                name: "perch.sched.runqueue.latency",
                description: "",
                unit: "s",
                data: Data::Histogram {
                    points: vec![HistogramPoint {
                        attributes: vec![(OVERFLOW_ATTRIBUTE, "true".into())],
                        start_time: t(1),
                        time: t(10),
                        count: 6,
                        sum: 0.5,
                        buckets: Buckets::Explicit {
                            bounds: Arc::from(vec![0.001, 0.002, 0.004]),
                            counts: vec![1, 2, 3, 0],
                        },
                    }],
                },
            }],
        };
        let r = decode(&e.encode(&s)[0]);
        let m = &r.resource_metrics[0].scope_metrics[0].metrics[0];
        let Some(PData::Histogram(h)) = &m.data else {
            panic!("not a histogram")
        };
        assert_eq!(
            h.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        let p = &h.data_points[0];
        assert_eq!(p.bucket_counts, vec![1, 2, 3, 0]);
        assert_eq!(p.explicit_bounds, vec![0.001, 0.002, 0.004]);
        assert_eq!(
            p.attributes[0].value.as_ref().unwrap().value,
            Some(any_value::Value::BoolValue(true))
        );
    }

    /// A kernel-shaped run-queue snapshot: `values` ns, `n` times each.
    fn kernel_snapshot(at: u64, values: &[(u64, u64)]) -> Snapshot {
        let mut slots = vec![0u64; agent_common::exp::SLOTS as usize];
        let mut sum = 0.0;
        for &(ns, n) in values {
            slots[agent_common::exp::slot(ns) as usize] += n;
            sum += ns as f64 * n as f64 / 1e9;
        }
        let e = crate::model::Exponential::from_slots(&slots);
        Snapshot {
            time: t(at),
            metrics: vec![Metric::histogram(
                crate::catalogue::RUNQUEUE_LATENCY,
                "",
                "s",
                vec![HistogramPoint {
                    attributes: vec![],
                    start_time: t(1),
                    time: t(at),
                    count: e.count(),
                    sum,
                    buckets: Buckets::Exponential(e),
                }],
            )],
        }
    }

    fn exponential_point(r: &ExportMetricsServiceRequest) -> ExponentialHistogramDataPoint {
        let m = &r.resource_metrics[0].scope_metrics[0].metrics[0];
        let Some(PData::ExponentialHistogram(h)) = &m.data else {
            panic!("not an exponential histogram: {m:?}")
        };
        h.data_points[0].clone()
    }

    #[test]
    fn kernel_histograms_are_exponential_with_the_kernels_counts() {
        let values = [
            (0, 2),
            (900, 1),
            (1_000, 4),
            (3_000_000, 7),
            (40_000_000, 1),
        ];
        let s = kernel_snapshot(10, &values);
        let mut e = Encoder::new(Resource::default(), Temporality::Cumulative, 100, 1 << 20);
        let p = exponential_point(&decode(&e.encode(&s)[0]));
        assert_eq!(p.scale, 3);
        assert_eq!(p.zero_count, 2);
        assert_eq!(p.count, 15);
        assert!((p.sum.unwrap() - 0.061000900 - 4e-6).abs() < 1e-12);
        assert_eq!(p.min, None, "the kernel keeps no min");
        let pos = p.positive.unwrap();
        // Every value is in the OTel bucket (2^(i/8), 2^((i+1)/8)] s of its index.
        for &(ns, n) in &values[1..] {
            let i = agent_common::exp::index(ns);
            let v = ns as f64 / 1e9;
            assert!(2f64.powf(i as f64 / 8.0) < v && v <= 2f64.powf((i + 1) as f64 / 8.0));
            assert!(pos.bucket_counts[(i - pos.offset) as usize] >= n);
        }
        assert_eq!(pos.bucket_counts.iter().sum::<u64>(), 13);
        assert_eq!(pos.offset, agent_common::exp::index(900));
        assert_eq!(
            *pos.bucket_counts.last().unwrap(),
            1,
            "populated range only"
        );
    }

    #[test]
    fn max_buckets_downscales_exactly() {
        let s = kernel_snapshot(10, &[(1_000, 1), (1_000_000, 2), (1_000_000_000, 3)]);
        let wide = {
            let mut e = Encoder::new(Resource::default(), Temporality::Cumulative, 100, 1 << 20);
            exponential_point(&decode(&e.encode(&s)[0]))
        };
        assert!(wide.positive.as_ref().unwrap().bucket_counts.len() > 100);
        let mut e = Encoder::new(Resource::default(), Temporality::Cumulative, 100, 1 << 20)
            .with_histograms(HistogramExport {
                max_buckets: 20,
                ..HistogramExport::default()
            });
        let p = exponential_point(&decode(&e.encode(&s)[0]));
        let pos = p.positive.unwrap();
        assert!(pos.bucket_counts.len() <= 20);
        assert_eq!(
            p.scale, 0,
            "three buckets per 2^10 range fit in 20 at scale 0"
        );
        assert_eq!(pos.bucket_counts.iter().sum::<u64>(), 6);
        // At scale 0 the buckets are (2^i, 2^(i+1)] s.
        for (ns, n) in [(1_000u64, 1u64), (1_000_000, 2), (1_000_000_000, 3)] {
            let v = ns as f64 / 1e9;
            let i = (v.log2().ceil() as i32) - 1;
            assert_eq!(pos.bucket_counts[(i - pos.offset) as usize], n, "{ns} ns");
        }
    }

    #[test]
    fn explicit_mode_sums_into_the_classic_layout() {
        let s = kernel_snapshot(
            10,
            &[(0, 1), (3_000, 2), (1_000_000, 5), (2_000_000_000, 1)],
        );
        let mut e = Encoder::new(Resource::default(), Temporality::Cumulative, 100, 1 << 20)
            .with_histograms(HistogramExport {
                format: HistogramFormat::Explicit,
                ..HistogramExport::default()
            });
        let r = decode(&e.encode(&s)[0]);
        let Some(PData::Histogram(h)) = &r.resource_metrics[0].scope_metrics[0].metrics[0].data
        else {
            panic!("not an explicit histogram")
        };
        let p = &h.data_points[0];
        assert_eq!(p.explicit_bounds.len(), 15);
        assert_eq!(p.bucket_counts.len(), 16);
        assert_eq!(p.count, 9);
        assert_eq!(p.bucket_counts.iter().sum::<u64>(), 9);
        for (v, k) in [(0.0, 0usize), (3e-6, 1), (1e-3, 10), (2.0, 15)] {
            let want = p.explicit_bounds.partition_point(|b| *b < v);
            assert_eq!(want, k, "{v} s");
            assert!(
                p.bucket_counts[k] > 0,
                "{v} s in bucket {k}: {:?}",
                p.bucket_counts
            );
        }
    }

    #[test]
    fn delta_exponential_points_subtract_bucket_wise() {
        let mut e = Encoder::new(Resource::default(), Temporality::Delta, 100, 1 << 20);
        let first = kernel_snapshot(10, &[(1_000, 1), (5_000, 2)]);
        let second = kernel_snapshot(20, &[(1_000, 1), (5_000, 5), (9_000_000, 1)]);
        let _ = e.encode(&first);
        let p = exponential_point(&decode(&e.encode(&second)[0]));
        assert_eq!(p.count, 4);
        let pos = p.positive.unwrap();
        assert_eq!(pos.offset, agent_common::exp::index(5_000));
        assert_eq!(pos.bucket_counts[0], 3);
        assert_eq!(*pos.bucket_counts.last().unwrap(), 1);
        assert_eq!(pos.bucket_counts.iter().sum::<u64>(), 4);
        assert_eq!(p.start_time_unix_nano, unix_nanos(t(10)));
    }
}
