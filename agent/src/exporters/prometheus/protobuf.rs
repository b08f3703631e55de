//! The Prometheus protobuf exposition format: length-delimited
//! `io.prometheus.client.MetricFamily` messages (the client_model
//! `metrics.proto`, written out here as the few messages Perch sends).
//!
//! Kernel histograms are native histograms: `schema` is the kernel's scale,
//! the buckets are the kernel's (Prometheus bucket `i` is OTel bucket
//! `i - 1`: Prometheus indexes by upper bound), as spans of populated
//! buckets with delta-encoded counts, and no classic buckets, so Prometheus
//! stores one series per histogram. Exact zeros are the zero bucket; the
//! zero threshold is the client libraries' default, `2^-128`, far below the
//! kernel's smallest bucket (1 ns). Explicit (self-metric) histograms are
//! classic histograms with cumulative buckets.

use prost::Message;

use super::{metric_name, sanitize};
use crate::model::{Buckets, Data, Exponential, Metric, Number};

/// The content type of the delimited protobuf format.
pub const CONTENT_TYPE: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

/// The zero bucket's threshold (`prometheus.DefNativeHistogramZeroThreshold`).
pub const ZERO_THRESHOLD: f64 = 2.938735877055719e-39;

#[derive(Clone, PartialEq, Message)]
pub struct LabelPair {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `MetricType`: COUNTER = 0, GAUGE = 1, HISTOGRAM = 4.
pub const COUNTER: i32 = 0;
pub const GAUGE: i32 = 1;
pub const HISTOGRAM: i32 = 4;

#[derive(Clone, PartialEq, Message)]
pub struct Gauge {
    #[prost(double, tag = "1")]
    pub value: f64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Counter {
    #[prost(double, tag = "1")]
    pub value: f64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Bucket {
    #[prost(uint64, tag = "1")]
    pub cumulative_count: u64,
    #[prost(double, tag = "2")]
    pub upper_bound: f64,
}

#[derive(Clone, PartialEq, Message)]
pub struct BucketSpan {
    #[prost(sint32, tag = "1")]
    pub offset: i32,
    #[prost(uint32, tag = "2")]
    pub length: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct Histogram {
    #[prost(uint64, tag = "1")]
    pub sample_count: u64,
    #[prost(double, tag = "2")]
    pub sample_sum: f64,
    #[prost(message, repeated, tag = "3")]
    pub bucket: Vec<Bucket>,
    #[prost(sint32, tag = "5")]
    pub schema: i32,
    #[prost(double, tag = "6")]
    pub zero_threshold: f64,
    #[prost(uint64, tag = "7")]
    pub zero_count: u64,
    #[prost(message, repeated, tag = "12")]
    pub positive_span: Vec<BucketSpan>,
    #[prost(sint64, repeated, packed = "false", tag = "13")]
    pub positive_delta: Vec<i64>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PromMetric {
    #[prost(message, repeated, tag = "1")]
    pub label: Vec<LabelPair>,
    #[prost(message, optional, tag = "2")]
    pub gauge: Option<Gauge>,
    #[prost(message, optional, tag = "3")]
    pub counter: Option<Counter>,
    #[prost(message, optional, tag = "7")]
    pub histogram: Option<Histogram>,
}

#[derive(Clone, PartialEq, Message)]
pub struct MetricFamily {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub help: String,
    #[prost(enumeration = "i32", tag = "3")]
    pub r#type: i32,
    #[prost(message, repeated, tag = "4")]
    pub metric: Vec<PromMetric>,
}

fn labels(attrs: &[(&'static str, crate::model::AttrValue)]) -> Vec<LabelPair> {
    attrs
        .iter()
        .map(|(k, v)| LabelPair {
            name: sanitize(k),
            value: v.to_string(),
        })
        .collect()
}

fn value(n: Number) -> f64 {
    n.as_f64()
}

/// A native histogram from exponential buckets: spans over the populated
/// buckets (a run of three or more empty buckets starts a new span) and
/// counts as deltas from the previous bucket's count.
pub fn native(e: &Exponential, count: u64, sum: f64) -> Histogram {
    let mut spans: Vec<BucketSpan> = Vec::new();
    let mut deltas: Vec<i64> = Vec::new();
    let mut prev_count = 0i64;
    // The Prometheus index just past the last bucket of the last span.
    let mut next: Option<i32> = None;
    let mut n = 0;
    while n < e.counts.len() {
        if e.counts[n] == 0 {
            n += 1;
            continue;
        }
        let idx = e.index(n) + 1;
        let gap = next.map(|end| idx - end);
        match gap {
            Some(g) if g <= 2 => {
                // Extend the span across one or two empty buckets (cheaper
                // than a new span).
                for _ in 0..g {
                    deltas.push(-prev_count);
                    prev_count = 0;
                }
                if let Some(s) = spans.last_mut() {
                    s.length += g as u32;
                }
            }
            _ => spans.push(BucketSpan {
                offset: gap.unwrap_or(idx),
                length: 0,
            }),
        }
        let c = e.counts[n] as i64;
        deltas.push(c - prev_count);
        prev_count = c;
        if let Some(s) = spans.last_mut() {
            s.length += 1;
        }
        next = Some(idx + 1);
        n += 1;
    }
    if spans.is_empty() {
        // An empty native histogram still needs a span to read as native.
        spans.push(BucketSpan {
            offset: 0,
            length: 0,
        });
    }
    Histogram {
        sample_count: count,
        sample_sum: sum,
        bucket: Vec::new(),
        schema: e.scale,
        zero_threshold: ZERO_THRESHOLD,
        zero_count: e.zero_count,
        positive_span: spans,
        positive_delta: deltas,
    }
}

/// Renders metrics as delimited `MetricFamily` messages.
pub fn render(metrics: &[Metric]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * 1024);
    for m in metrics {
        let (kind, counter) = match &m.data {
            Data::Sum {
                monotonic: true, ..
            } => (COUNTER, true),
            Data::Sum { .. } | Data::Gauge { .. } => (GAUGE, false),
            Data::Histogram { .. } => (HISTOGRAM, false),
        };
        let metric = match &m.data {
            Data::Sum { points, .. } | Data::Gauge { points } => points
                .iter()
                .map(|p| PromMetric {
                    label: labels(&p.attributes),
                    gauge: (!counter).then(|| Gauge {
                        value: value(p.value),
                    }),
                    counter: counter.then(|| Counter {
                        value: value(p.value),
                    }),
                    histogram: None,
                })
                .collect(),
            Data::Histogram { points } => points
                .iter()
                .map(|p| {
                    let histogram = match &p.buckets {
                        Buckets::Exponential(e) => native(e, p.count, p.sum),
                        Buckets::Explicit { bounds, counts } => {
                            let mut cumulative = 0;
                            Histogram {
                                sample_count: p.count,
                                sample_sum: p.sum,
                                bucket: bounds
                                    .iter()
                                    .zip(counts)
                                    .map(|(b, c)| {
                                        cumulative += c;
                                        Bucket {
                                            cumulative_count: cumulative,
                                            upper_bound: *b,
                                        }
                                    })
                                    .collect(),
                                ..Histogram::default()
                            }
                        }
                    };
                    PromMetric {
                        label: labels(&p.attributes),
                        gauge: None,
                        counter: None,
                        histogram: Some(histogram),
                    }
                })
                .collect(),
        };
        let family = MetricFamily {
            name: metric_name(m.name, m.unit, counter),
            help: m.description.replace('\n', " "),
            r#type: kind,
            metric,
        };
        // Writing to a Vec cannot fail.
        let _ = family.encode_length_delimited(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::HistogramPoint;
    use agent_common::exp;
    use std::time::SystemTime;

    /// Expands spans and deltas back to (Prometheus index, count) pairs.
    fn expand(h: &Histogram) -> Vec<(i32, u64)> {
        let mut out = Vec::new();
        let (mut idx, mut count, mut d) = (0i32, 0i64, h.positive_delta.iter());
        for (k, s) in h.positive_span.iter().enumerate() {
            idx = if k == 0 { s.offset } else { idx + s.offset };
            for _ in 0..s.length {
                count += d.next().expect("a delta per bucket");
                out.push((idx, count as u64));
                idx += 1;
            }
        }
        assert!(d.next().is_none(), "no extra deltas");
        out
    }

    #[test]
    fn native_buckets_are_the_kernel_buckets_shifted_by_one() {
        let mut slots = vec![0u64; exp::SLOTS as usize];
        let values = [
            (0u64, 4u64),
            (1_000, 3),
            (1_100, 2),
            (50_000, 7),
            (60_000, 1),
            (9_000_000, 5),
        ];
        for (ns, n) in values {
            slots[exp::slot(ns) as usize] += n;
        }
        let e = Exponential::from_slots(&slots);
        let h = native(&e, e.count(), 1.0);
        assert_eq!(h.schema, 3);
        assert_eq!(h.zero_count, 4);
        assert_eq!(h.sample_count, 22);
        let got = expand(&h);
        let mut want: Vec<(i32, u64)> = e
            .counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(n, c)| (e.index(n) + 1, *c))
            .collect();
        want.sort();
        let nonzero: Vec<(i32, u64)> = got.iter().copied().filter(|(_, c)| *c > 0).collect();
        assert_eq!(nonzero, want);
        // Prometheus bucket i is (2^((i-1)/8), 2^(i/8)]: 1 µs lies in it.
        let i = exp::index(1_000) + 1;
        assert!(2f64.powf((i - 1) as f64 / 8.0) < 1e-6 && 1e-6 <= 2f64.powf(i as f64 / 8.0));
        assert!(
            h.positive_span.len() >= 2,
            "far-apart buckets get their own spans"
        );
    }

    #[test]
    fn empty_native_histogram_still_has_a_span() {
        let h = native(&Exponential::empty(3), 0, 0.0);
        assert_eq!(
            h.positive_span,
            vec![BucketSpan {
                offset: 0,
                length: 0
            }]
        );
        assert!(h.positive_delta.is_empty());
    }

    #[test]
    fn families_decode_back() {
        let now = SystemTime::now();
        let mut slots = vec![0u64; exp::SLOTS as usize];
        slots[exp::slot(2_000) as usize] = 9;
        let metrics = vec![
            Metric::counter(
                crate::catalogue::CPU_TIME,
                "d",
                "s",
                vec![crate::model::NumberPoint {
                    attributes: vec![("cpu.mode", "user".into())],
                    start_time: Some(now),
                    time: now,
                    value: Number::Double(1.5),
                }],
            ),
            Metric::histogram(
                crate::catalogue::RUNQUEUE_LATENCY,
                "d",
                "s",
                vec![HistogramPoint {
                    attributes: vec![],
                    start_time: now,
                    time: now,
                    count: 9,
                    sum: 18e-6,
                    buckets: Buckets::Exponential(Exponential::from_slots(&slots)),
                }],
            ),
        ];
        let bytes = render(&metrics);
        let mut buf = &bytes[..];
        let a = MetricFamily::decode_length_delimited(&mut buf).unwrap();
        let b = MetricFamily::decode_length_delimited(&mut buf).unwrap();
        assert!(buf.is_empty());
        assert_eq!(a.name, "system_cpu_time_seconds_total");
        assert_eq!(a.r#type, COUNTER);
        assert_eq!(a.metric[0].counter.as_ref().unwrap().value, 1.5);
        assert_eq!(a.metric[0].label[0].name, "cpu_mode");
        assert_eq!(b.name, "perch_scheduler_runqueue_latency_seconds");
        assert_eq!(b.r#type, HISTOGRAM);
        let h = b.metric[0].histogram.as_ref().unwrap();
        assert!(h.bucket.is_empty(), "no classic buckets");
        assert_eq!(expand(h), vec![(exp::index(2_000) + 1, 9)]);
    }
}
