//! Perch's own metrics (`perch.*`): errors, drops, probe states, timings.
//!
//! Any component records into the shared [`SelfMetrics`]; the registry is
//! rendered next to the host metrics on `/metrics` and exported like them.
//! Updates are rare (per interval or per error), so a mutex is enough.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::model::{Attributes, Buckets, Data, HistogramPoint, Metric, Number, NumberPoint};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
}

#[derive(Debug)]
struct Family {
    description: &'static str,
    unit: &'static str,
    kind: Kind,
    series: BTreeMap<Attributes, f64>,
}

/// One series of a self-histogram: counts per bucket (the last one above
/// every bound), count and sum.
#[derive(Debug, Clone)]
struct HistSeries {
    buckets: Vec<u64>,
    count: u64,
    sum: f64,
}

#[derive(Debug)]
struct HistFamily {
    description: &'static str,
    unit: &'static str,
    bounds: Arc<[f64]>,
    series: BTreeMap<Attributes, HistSeries>,
}

/// The registry of self-metrics.
#[derive(Debug)]
pub struct SelfMetrics {
    start: SystemTime,
    families: Mutex<BTreeMap<&'static str, Family>>,
    histograms: Mutex<BTreeMap<&'static str, HistFamily>>,
}

impl Default for SelfMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl SelfMetrics {
    pub fn new() -> Self {
        Self {
            start: SystemTime::now(),
            families: Mutex::new(BTreeMap::new()),
            histograms: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records `value` in histogram `name`, whose upper bucket bounds
    /// (inclusive, ascending) are `bounds`; a value above the last bound
    /// goes to the overflow bucket.
    pub fn observe(
        &self,
        name: &'static str,
        description: &'static str,
        unit: &'static str,
        bounds: &'static [f64],
        attributes: Attributes,
        value: f64,
    ) {
        let mut h = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        let family = h.entry(name).or_insert_with(|| HistFamily {
            description,
            unit,
            bounds: bounds.into(),
            series: BTreeMap::new(),
        });
        let n = family.bounds.len();
        let series = family
            .series
            .entry(attributes)
            .or_insert_with(|| HistSeries {
                buckets: vec![0; n + 1],
                count: 0,
                sum: 0.0,
            });
        let i = family.bounds.partition_point(|b| *b < value);
        series.buckets[i] += 1;
        series.count += 1;
        series.sum += value;
    }

    fn with_series(
        &self,
        name: &'static str,
        description: &'static str,
        unit: &'static str,
        kind: Kind,
        attributes: Attributes,
        f: impl FnOnce(&mut f64),
    ) {
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let family = families.entry(name).or_insert_with(|| Family {
            description,
            unit,
            kind,
            series: BTreeMap::new(),
        });
        debug_assert_eq!(family.kind, kind, "{name} used as counter and gauge");
        f(family.series.entry(attributes).or_insert(0.0));
    }

    /// Adds `n` to a counter.
    pub fn add(
        &self,
        name: &'static str,
        description: &'static str,
        unit: &'static str,
        attributes: Attributes,
        n: u64,
    ) {
        self.with_series(name, description, unit, Kind::Counter, attributes, |v| {
            *v += n as f64
        });
    }

    /// Sets a counter to a total read elsewhere (e.g. from a BPF map). The
    /// value must not decrease.
    pub fn set_total(
        &self,
        name: &'static str,
        description: &'static str,
        unit: &'static str,
        attributes: Attributes,
        total: u64,
    ) {
        self.with_series(name, description, unit, Kind::Counter, attributes, |v| {
            *v = v.max(total as f64)
        });
    }

    /// Sets a gauge.
    /// Sets a counter to a cumulative `total` that is not a whole number
    /// (CPU seconds); it never goes down.
    pub fn set_counter(
        &self,
        name: &'static str,
        description: &'static str,
        unit: &'static str,
        attributes: Attributes,
        total: f64,
    ) {
        self.with_series(name, description, unit, Kind::Counter, attributes, |v| {
            *v = v.max(total)
        });
    }

    pub fn set(
        &self,
        name: &'static str,
        description: &'static str,
        unit: &'static str,
        attributes: Attributes,
        value: f64,
    ) {
        self.with_series(name, description, unit, Kind::Gauge, attributes, |v| {
            *v = value
        });
    }

    /// Removes every series of gauge `name` (before re-setting a state set).
    pub fn clear(&self, name: &'static str) {
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = families.get_mut(name) {
            f.series.clear();
        }
    }

    /// The current value of a series, if it exists (for tests and health).
    pub fn value(&self, name: &str, attributes: &Attributes) -> Option<f64> {
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        families.get(name)?.series.get(attributes).copied()
    }

    /// Every self-metric as model metrics at `now`.
    pub fn metrics(&self, now: SystemTime) -> Vec<Metric> {
        let mut out = self.number_metrics(now);
        let h = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        out.extend(h.iter().map(|(name, f)| {
            let points = f
                .series
                .iter()
                .map(|(attributes, s)| HistogramPoint {
                    attributes: attributes.clone(),
                    start_time: self.start,
                    time: now,
                    count: s.count,
                    sum: s.sum,
                    buckets: Buckets::Explicit {
                        bounds: f.bounds.clone(),
                        counts: s.buckets.clone(),
                    },
                })
                .collect();
            Metric::histogram(name, f.description, f.unit, points)
        }));
        out
    }

    fn number_metrics(&self, now: SystemTime) -> Vec<Metric> {
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        families
            .iter()
            .map(|(name, f)| {
                let points = f
                    .series
                    .iter()
                    .map(|(attributes, v)| NumberPoint {
                        attributes: attributes.clone(),
                        start_time: (f.kind == Kind::Counter).then_some(self.start),
                        time: now,
                        value: if v.fract() == 0.0 && v.abs() < 9e15 {
                            Number::Int(*v as i64)
                        } else {
                            Number::Double(*v)
                        },
                    })
                    .collect();
                Metric {
                    name,
                    description: f.description,
                    unit: f.unit,
                    data: match f.kind {
                        Kind::Counter => Data::Sum {
                            monotonic: true,
                            points,
                        },
                        Kind::Gauge => Data::Gauge { points },
                    },
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod histogram_tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_with_exact_count_and_sum() {
        const BOUNDS: &[f64] = &[0.01, 0.1, 1.0];
        let m = SelfMetrics::new();
        let attrs = || vec![("outcome", "success".into())];
        for v in [0.005, 0.01, 0.05, 0.5, 2.0, 2.0] {
            m.observe("perch.test.duration", "test", "s", BOUNDS, attrs(), v);
        }
        m.observe("perch.test.duration", "test", "s", BOUNDS, vec![], 0.2);
        let metrics = m.metrics(SystemTime::now());
        let h = metrics
            .iter()
            .find(|x| x.name == "perch.test.duration")
            .expect("histogram rendered");
        let Data::Histogram { points } = &h.data else {
            panic!("not a histogram: {:?}", h.data);
        };
        assert_eq!(points.len(), 2);
        let p = points.iter().find(|p| !p.attributes.is_empty()).unwrap();
        // Upper bounds are inclusive: 0.01 is in the first bucket.
        let Buckets::Explicit { bounds, counts } = &p.buckets else {
            panic!("self-histograms are explicit: {:?}", p.buckets);
        };
        assert_eq!(counts, &vec![2, 1, 1, 2]);
        assert_eq!(p.count, 6);
        assert!((p.sum - 4.565).abs() < 1e-9, "{}", p.sum);
        assert_eq!(&**bounds, BOUNDS);
    }
}
