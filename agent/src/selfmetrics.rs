//! Perch's own metrics (`perch.*`): errors, drops, probe states, timings.
//!
//! Any component records into the shared [`SelfMetrics`]; the registry is
//! rendered next to the host metrics on `/metrics` and exported like them.
//! Updates are rare (per interval or per error), so a mutex is enough.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::model::{Attributes, Data, Metric, Number, NumberPoint};

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

/// The registry of self-metrics.
#[derive(Debug)]
pub struct SelfMetrics {
    start: SystemTime,
    families: Mutex<BTreeMap<&'static str, Family>>,
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
        }
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
