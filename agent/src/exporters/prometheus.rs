//! Prometheus text exposition (format 0.0.4) of model metrics, with names
//! translated per the OpenTelemetry → Prometheus compatibility rules:
//! dots become underscores, the unit is appended as a word (`s` → `seconds`,
//! `By` → `bytes`; `{annotations}` are dropped), and monotonic sums get
//! `_total`. So `system.cpu.time` (unit `s`) is `system_cpu_time_seconds_total`.

use std::fmt::Write;

use crate::model::{Data, Metric, Number};

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

/// Renders metrics as Prometheus text.
pub fn render(metrics: &[Metric]) -> String {
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
                    let mut cumulative = 0u64;
                    for (i, c) in p.bucket_counts.iter().enumerate() {
                        cumulative += c;
                        let le = p
                            .bounds
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
    use crate::model::{HistogramPoint, NumberPoint};
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
                        bounds: vec![0.5, 1.0].into(),
                        bucket_counts: vec![1, 2, 3],
                    }],
                },
            },
        ];
        let text = render(&metrics);
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
        assert!(render(&[m]).contains(r#"g_ratio{k="a\"b\\c\nd"} 1"#));
    }
}
