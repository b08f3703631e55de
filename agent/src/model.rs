//! The internal metric model: what collectors emit and exporters read.
//!
//! It mirrors the OpenTelemetry data model closely enough that the OTLP
//! exporter maps it one to one (cumulative sums with a start time, gauges,
//! histograms with exact bucket counts: exponential as the kernel bins them,
//! or explicit), but it is not tied to any wire format. Prometheus text and
//! protobuf are rendered from the same values.

use std::collections::HashMap;
use std::time::SystemTime;

/// One collection: every metric read at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Wall-clock time of the collection.
    pub time: SystemTime,
    pub metrics: Vec<Metric>,
}

/// A named metric with its points.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// OpenTelemetry name, e.g. `system.cpu.time`.
    pub name: &'static str,
    pub description: &'static str,
    /// UCUM unit, e.g. `s`, `By`, `{switch}`.
    pub unit: &'static str,
    pub data: Data,
}

impl Metric {
    /// A monotonic cumulative sum (a counter).
    pub fn counter(
        name: &'static str,
        description: &'static str,
        unit: &'static str,
        points: Vec<NumberPoint>,
    ) -> Metric {
        Metric {
            name,
            description,
            unit,
            data: Data::Sum {
                monotonic: true,
                points,
            },
        }
    }

    /// A gauge.
    pub fn gauge(
        name: &'static str,
        description: &'static str,
        unit: &'static str,
        points: Vec<NumberPoint>,
    ) -> Metric {
        Metric {
            name,
            description,
            unit,
            data: Data::Gauge { points },
        }
    }

    /// A cumulative histogram.
    pub fn histogram(
        name: &'static str,
        description: &'static str,
        unit: &'static str,
        points: Vec<HistogramPoint>,
    ) -> Metric {
        Metric {
            name,
            description,
            unit,
            data: Data::Histogram { points },
        }
    }
}

/// The instrument kind and its points.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// A cumulative sum. `monotonic` sums are counters.
    Sum {
        monotonic: bool,
        points: Vec<NumberPoint>,
    },
    /// A value sampled at `time`.
    Gauge { points: Vec<NumberPoint> },
    /// A cumulative histogram (exponential or explicit buckets).
    Histogram { points: Vec<HistogramPoint> },
}

/// An attribute value. OTLP keeps the type; Prometheus renders both as text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttrValue {
    Str(String),
    Int(i64),
}

impl std::fmt::Display for AttrValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttrValue::Str(s) => f.write_str(s),
            AttrValue::Int(i) => write!(f, "{i}"),
        }
    }
}

impl From<&str> for AttrValue {
    fn from(s: &str) -> Self {
        AttrValue::Str(s.to_owned())
    }
}
impl From<String> for AttrValue {
    fn from(s: String) -> Self {
        AttrValue::Str(s)
    }
}
impl From<i64> for AttrValue {
    fn from(i: i64) -> Self {
        AttrValue::Int(i)
    }
}
impl From<u32> for AttrValue {
    fn from(i: u32) -> Self {
        AttrValue::Int(i64::from(i))
    }
}
impl From<u16> for AttrValue {
    fn from(i: u16) -> Self {
        AttrValue::Int(i64::from(i))
    }
}

/// Attributes of one series, in a stable order (as the collector built them).
pub type Attributes = Vec<(&'static str, AttrValue)>;

/// A number: integers stay integers on the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(i64),
    Double(f64),
}

impl Number {
    pub fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Double(d) => d,
        }
    }
}

/// One point of a sum or gauge.
#[derive(Debug, Clone, PartialEq)]
pub struct NumberPoint {
    pub attributes: Attributes,
    /// Start of the cumulative window (sums only).
    pub start_time: Option<SystemTime>,
    pub time: SystemTime,
    pub value: Number,
}

pub use crate::histogram::{Buckets, Exponential};

/// One point of a histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramPoint {
    pub attributes: Attributes,
    pub start_time: SystemTime,
    pub time: SystemTime,
    pub count: u64,
    /// Exact sum of the observed values, in the metric's unit.
    pub sum: f64,
    pub buckets: Buckets,
}

/// Assigns start times to cumulative series and detects resets.
///
/// A series keeps its start time while its value does not decrease. When a
/// value goes down (an interface re-created, a program re-loaded, a counter
/// wrapped) the series gets a new start time at the previous collection, so
/// consumers never see a negative delta.
#[derive(Debug, Default)]
pub struct StartTimes {
    series: HashMap<SeriesKey, (SystemTime, f64)>,
    /// Start time for series first seen now.
    process_start: Option<SystemTime>,
    last_collection: Option<SystemTime>,
    resets: u64,
}

type SeriesKey = (&'static str, Attributes);

impl StartTimes {
    /// `start` is used for series present at the first collection: for
    /// counters the kernel keeps since boot, pass the boot time.
    pub fn new(start: SystemTime) -> Self {
        Self {
            process_start: Some(start),
            ..Self::default()
        }
    }

    /// Returns the start time of `(metric, attributes)` for a cumulative
    /// `value` read at `now`.
    pub fn observe(
        &mut self,
        metric: &'static str,
        attributes: &Attributes,
        value: f64,
        now: SystemTime,
    ) -> SystemTime {
        let first = self.process_start.unwrap_or(now);
        let fresh = self.last_collection.unwrap_or(first);
        match self.series.get_mut(&(metric, attributes.clone())) {
            Some((start, last)) => {
                if value < *last {
                    self.resets += 1;
                    *start = fresh;
                }
                *last = value;
                *start
            }
            None => {
                // A series that appears after the first collection started
                // counting at some point since the previous collection.
                let start = if self.last_collection.is_some() {
                    fresh
                } else {
                    first
                };
                self.series
                    .insert((metric, attributes.clone()), (start, value));
                start
            }
        }
    }

    /// Marks the end of a collection at `now`.
    pub fn end_collection(&mut self, now: SystemTime) {
        self.last_collection = Some(now);
    }

    /// How many resets have been seen.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Forgets series not seen since `keep` returned false for them.
    pub fn retain(&mut self, mut keep: impl FnMut(&'static str, &Attributes) -> bool) {
        self.series.retain(|(m, a), _| keep(m, a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn start_time_is_kept_while_monotonic() {
        let mut st = StartTimes::new(t(100));
        let a: Attributes = vec![("cpu.mode", "user".into())];
        assert_eq!(st.observe("m", &a, 5.0, t(200)), t(100));
        st.end_collection(t(200));
        assert_eq!(st.observe("m", &a, 7.0, t(210)), t(100));
        st.end_collection(t(210));
        assert_eq!(st.resets(), 0);
    }

    #[test]
    fn reset_gets_new_start_time() {
        let mut st = StartTimes::new(t(100));
        let a: Attributes = vec![];
        st.observe("m", &a, 50.0, t(200));
        st.end_collection(t(200));
        // The counter went down: it restarted some time after t(200).
        assert_eq!(st.observe("m", &a, 3.0, t(210)), t(200));
        st.end_collection(t(210));
        assert_eq!(st.observe("m", &a, 4.0, t(220)), t(200));
        assert_eq!(st.resets(), 1);
    }

    #[test]
    fn new_series_after_first_collection_start_at_previous_collection() {
        let mut st = StartTimes::new(t(100));
        st.end_collection(t(200));
        let a: Attributes = vec![("x", 1i64.into())];
        assert_eq!(st.observe("m", &a, 1.0, t(210)), t(200));
    }
}
