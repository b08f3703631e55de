//! Prometheus exposition of model metrics, with names translated per the
//! OpenTelemetry → Prometheus compatibility rules: dots become underscores,
//! the unit is appended as a word (`s` → `seconds`, `By` → `bytes`;
//! `{annotations}` are dropped), and monotonic sums get `_total`. So
//! `system.cpu.time` (unit `s`) is `system_cpu_time_seconds_total`.
//!
//! Two formats, chosen by the scraper's `Accept` header ([`negotiate`]):
//! - **text** (format 0.0.4): kernel histograms as classic histograms in the
//!   [`ClassicLayout`] (`export.histogram_bounds`; by default 15 bounds
//!   from 1.9 µs to 1 s, powers of two seconds), every bound a kernel
//!   bucket bound;
//! - **protobuf** ([`protobuf`], delimited `io.prometheus.client.MetricFamily`):
//!   kernel histograms as native histograms, schema = the kernel's scale,
//!   the kernel's buckets as they are and no `_bucket` series.

pub mod protobuf;

use std::fmt::Write;

use crate::histogram::ClassicLayout;
use crate::model::{Buckets, Data, Metric, Number};

/// The text format's content type.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Protobuf,
}

/// The format an `Accept` header asks for: protobuf when it names the
/// delimited `io.prometheus.client.MetricFamily` type with a quality at
/// least that of any text type it accepts, text otherwise (also for no
/// header, or one that accepts neither: text is what every scraper reads).
pub fn negotiate(accept: Option<&str>) -> Format {
    let Some(accept) = accept else {
        return Format::Text;
    };
    let (mut proto_q, mut text_q) = (-1.0f64, -1.0f64);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let mut q = 1.0;
        let (mut proto, mut delimited) = (false, false);
        for param in parts {
            let (k, v) = param.split_once('=').unwrap_or((param, ""));
            let v = v.trim().trim_matches('"');
            match k.trim().to_ascii_lowercase().as_str() {
                "q" => q = v.parse().unwrap_or(0.0),
                "proto" => proto = v == "io.prometheus.client.MetricFamily",
                "encoding" => delimited = v == "delimited",
                _ => {}
            }
        }
        if media == "application/vnd.google.protobuf" && proto && delimited {
            proto_q = proto_q.max(q);
        } else if media.starts_with("text/")
            || media.starts_with("application/openmetrics-text")
            || media == "*/*"
        {
            text_q = text_q.max(q);
        }
    }
    if proto_q > 0.0 && proto_q >= text_q {
        Format::Protobuf
    } else {
        Format::Text
    }
}

/// The Prometheus name of an OpenTelemetry metric. The agent's own process
/// metrics take the names every Prometheus client gives them
/// ([`crate::catalogue::PROMETHEUS_PROCESS_NAMES`]).
pub fn metric_name(name: &str, unit: &str, counter: bool) -> String {
    if let Some((_, prom)) = crate::catalogue::PROMETHEUS_PROCESS_NAMES
        .iter()
        .find(|(otel, _)| *otel == name)
    {
        return (*prom).to_owned();
    }
    let mut out = sanitize(name);
    if let Some(suffix) = unit_suffix(unit) {
        if !out.ends_with(&format!("_{suffix}")) {
            out.push('_');
            out.push_str(suffix);
        }
    }
    if counter {
        out.push_str("_total");
    }
    out
}

fn unit_suffix(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "By/s" => "bytes_per_second",
        "%" => "percent",
        "1" => "ratio",
        _ => return None,
    })
}

/// Replaces every character Prometheus does not allow with `_`.
pub fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

fn number(n: Number) -> String {
    match n {
        Number::Int(i) => i.to_string(),
        Number::Double(d) => float(d),
    }
}

fn float(d: f64) -> String {
    if d.is_nan() {
        "NaN".into()
    } else if d == f64::INFINITY {
        "+Inf".into()
    } else if d == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{d}")
    }
}

fn labels(
    attrs: &[(&'static str, crate::model::AttrValue)],
    extra: Option<(&str, &str)>,
) -> String {
    if attrs.is_empty() && extra.is_none() {
        return String::new();
    }
    let mut parts: Vec<String> = attrs
        .iter()
        .map(|(k, v)| format!("{}=\"{}\"", sanitize(k), escape(&v.to_string())))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    format!("{{{}}}", parts.join(","))
}

/// Renders metrics as Prometheus text, kernel histograms in `layout`.
pub fn render(metrics: &[Metric], layout: &ClassicLayout) -> String {
    let mut out = String::with_capacity(16 * 1024);
    for m in metrics {
        let (kind, counter) = match &m.data {
            Data::Sum {
                monotonic: true, ..
            } => ("counter", true),
            Data::Sum { .. } | Data::Gauge { .. } => ("gauge", false),
            Data::Histogram { .. } => ("histogram", false),
        };
        let name = metric_name(m.name, m.unit, counter);
        let _ = writeln!(out, "# HELP {name} {}", m.description.replace('\n', " "));
        let _ = writeln!(out, "# TYPE {name} {kind}");
        match &m.data {
            Data::Sum { points, .. } | Data::Gauge { points } => {
                for p in points {
                    let _ = writeln!(
                        out,
                        "{name}{} {}",
                        labels(&p.attributes, None),
                        number(p.value)
                    );
                }
            }
            Data::Histogram { points } => {
                for p in points {
                    let (bounds, counts) = match &p.buckets {
                        Buckets::Explicit { bounds, counts } => (&bounds[..], counts.clone()),
                        Buckets::Exponential(e) => (&layout.bounds()[..], layout.counts(e)),
                    };
                    let mut cumulative = 0u64;
                    for (i, c) in counts.iter().enumerate() {
                        cumulative += c;
                        let le = bounds
                            .get(i)
                            .map(|b| float(*b))
                            .unwrap_or_else(|| "+Inf".into());
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {cumulative}",
                            labels(&p.attributes, Some(("le", &le)))
                        );
                    }
                    let l = labels(&p.attributes, None);
                    let _ = writeln!(out, "{name}_sum{l} {}", float(p.sum));
                    let _ = writeln!(out, "{name}_count{l} {}", p.count);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Buckets, HistogramPoint, NumberPoint};
    use std::time::SystemTime;

    #[test]
    fn names() {
        for (name, unit, counter, want) in [
            (
                crate::catalogue::CPU_TIME,
                "s",
                true,
                "system_cpu_time_seconds_total",
            ),
            (
                crate::catalogue::NETWORK_IO,
                "By",
                true,
                "system_network_io_bytes_total",
            ),
            (
                crate::catalogue::CONTEXT_SWITCHES,
                "{switch}",
                true,
                "perch_cpu_context_switches_total",
            ),
            (
                crate::catalogue::LOAD_1M,
                "{thread}",
                false,
                "system_cpu_load_average_1m",
            ),
            (
                crate::catalogue::RUNQUEUE_LATENCY,
                "s",
                false,
                "perch_scheduler_runqueue_latency_seconds",
            ),
            (
                crate::catalogue::EXPORT_QUEUE_BYTES,
                "By",
                false,
                "perch_export_queue_bytes",
            ),
            ("x.ratio", "1", false, "x_ratio"),
        ] {
            assert_eq!(metric_name(name, unit, counter), want);
        }
    }

    #[test]
    fn renders_counter_and_histogram() {
        let now = SystemTime::now();
        let metrics = vec![
            Metric {
                name: crate::catalogue::CPU_TIME,
                description: "d",
                unit: "s",
                data: Data::Sum {
                    monotonic: true,
                    points: vec![NumberPoint {
                        attributes: vec![
                            ("cpu.logical_number", 0i64.into()),
                            ("cpu.mode", "user".into()),
                        ],
                        start_time: Some(now),
                        time: now,
                        value: Number::Double(12.5),
                    }],
                },
            },
            Metric {
                name: "h",
                description: "d",
                unit: "s",
                data: Data::Histogram {
                    points: vec![HistogramPoint {
                        attributes: vec![],
                        start_time: now,
                        time: now,
                        count: 6,
                        sum: 3.5,
                        buckets: Buckets::Explicit {
                            bounds: vec![0.5, 1.0].into(),
                            counts: vec![1, 2, 3],
                        },
                    }],
                },
            },
        ];
        let text = render(&metrics, &ClassicLayout::default());
        assert!(
            text.contains("# TYPE system_cpu_time_seconds_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "system_cpu_time_seconds_total{cpu_logical_number=\"0\",cpu_mode=\"user\"} 12.5\n"
            ),
            "{text}"
        );
        assert!(text.contains("h_seconds_bucket{le=\"0.5\"} 1\n"), "{text}");
        assert!(text.contains("h_seconds_bucket{le=\"1\"} 3\n"), "{text}");
        assert!(text.contains("h_seconds_bucket{le=\"+Inf\"} 6\n"), "{text}");
        assert!(
            text.contains("h_seconds_sum 3.5\nh_seconds_count 6\n"),
            "{text}"
        );
    }

    #[test]
    fn kernel_histograms_render_in_the_classic_layout() {
        use crate::model::Exponential;
        let now = SystemTime::now();
        let mut slots = vec![0u64; agent_common::exp::SLOTS as usize];
        // 3 µs x2, 1 ms x5, 2 s x1.
        for (ns, n) in [(3_000u64, 2u64), (1_000_000, 5), (2_000_000_000, 1)] {
            slots[agent_common::exp::slot(ns) as usize] += n;
        }
        let m = Metric {
            name: "k",
            description: "d",
            unit: "s",
            data: Data::Histogram {
                points: vec![HistogramPoint {
                    attributes: vec![],
                    start_time: now,
                    time: now,
                    count: 8,
                    sum: 2.005006,
                    buckets: Buckets::Exponential(Exponential::from_slots(&slots)),
                }],
            },
        };
        let text = render(&[m], &ClassicLayout::default());
        assert_eq!(text.matches("k_seconds_bucket{").count(), 16, "{text}");
        // 3 µs <= 2^-18 s (3.81 µs); 1 ms <= 2^-8 s (3.9 ms); 2 s only in +Inf.
        assert!(
            text.contains("k_seconds_bucket{le=\"0.000003814697265625\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("k_seconds_bucket{le=\"0.0009765625\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("k_seconds_bucket{le=\"0.00390625\"} 7\n"),
            "{text}"
        );
        assert!(text.contains("k_seconds_bucket{le=\"1\"} 7\n"), "{text}");
        assert!(text.contains("k_seconds_bucket{le=\"+Inf\"} 8\n"), "{text}");
        assert!(text.contains("k_seconds_count 8\n"), "{text}");
    }

    #[test]
    fn negotiation_prefers_protobuf_only_when_asked() {
        // What Prometheus 2.42 sends with --enable-feature=native-histograms.
        let native = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;\
                      encoding=delimited;q=0.8,application/openmetrics-text;version=1.0.0;q=0.5,\
                      text/plain;version=0.0.4;q=0.2,*/*;q=0.1";
        assert_eq!(negotiate(Some(native)), Format::Protobuf);
        // ... and without it.
        let classic = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                       version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(Some(classic)), Format::Text);
        assert_eq!(negotiate(None), Format::Text);
        assert_eq!(negotiate(Some("*/*")), Format::Text);
        assert_eq!(
            negotiate(Some("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=text")),
            Format::Text,
            "only the delimited encoding is served"
        );
        assert_eq!(
            negotiate(Some("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0")),
            Format::Text
        );
    }

    #[test]
    fn escapes_label_values() {
        let now = SystemTime::now();
        let m = Metric {
            name: "g",
            description: "d",
            unit: "1",
            data: Data::Gauge {
                points: vec![NumberPoint {
                    attributes: vec![("k", "a\"b\\c\nd".into())],
                    start_time: None,
                    time: now,
                    value: Number::Int(1),
                }],
            },
        };
        assert!(render(&[m], &ClassicLayout::default()).contains(r#"g_ratio{k="a\"b\\c\nd"} 1"#));
    }
}
