//! Pipeline: what happens to a [`Snapshot`] between collection and the
//! exporters. It runs once per interval, before both Prometheus `/metrics`
//! and OTLP, so the two always show the same series:
//!
//! 1. **Clock guard** ([`clock`]): exported times never go back, even when
//!    the wall clock does.
//!    Then pod and container names from the kubelet cache, where
//!    `probes.containers.kubelet_url` is set ([`crate::families::containers::kubelet`]).
//! 2. **Deny list**: high-cardinality attribute keys (`pid`, `request_id`,
//!    `client.port`...) are removed and ephemeral port values replaced by
//!    `"ephemeral"`; the series they split are merged by adding values.
//! 3. **Adaptive detail** ([`detail`]): while the host's error ratio is low,
//!    only the busiest top-K peers of each per-peer metric keep their own
//!    series; the rest fold into `network.peer.address="other"`.
//! 4. **Memory limiter** ([`memory`]): past the soft limit every per-peer
//!    series folds into `other`.
//! 5. **Series cap** ([`cardinality`]): past `max_series_per_metric`,
//!    points fold into the `otel.metric.overflow=true` series.
//!
//! Folding never changes a metric's total (see [`cardinality`]).

pub mod cardinality;
pub mod clock;
pub mod detail;
pub mod memory;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::config::export::PipelineConfig;
use crate::model::{AttrValue, Attributes, Data, HistogramPoint, Metric, NumberPoint, Snapshot};
use crate::selfmetrics::SelfMetrics;

use cardinality::{Kind, Limits, MetricState, Val, P};
use clock::ClockGuard;
use detail::{DetailController, DetailMode, ErrorRatio};
use memory::{MemoryGauge, MemoryState};

/// Transforms snapshots between collection and export.
pub struct Pipeline {
    cfg: PipelineConfig,
    selfm: Arc<SelfMetrics>,
    clock: ClockGuard,
    ratio: ErrorRatio,
    detail: DetailController,
    states: HashMap<&'static str, MetricState>,
    interval: u64,
    rss: Box<dyn Fn() -> Option<u64> + Send>,
    memory: MemoryGauge,
    /// Pod and container names from the kubelet, when asked for.
    k8s: Option<crate::families::containers::kubelet::Shared>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("interval", &self.interval)
            .field("mode", &self.detail.mode())
            .field("metrics", &self.states.len())
            .finish()
    }
}

impl Pipeline {
    /// A pipeline with `cfg`; it records into `selfm` and publishes the
    /// memory limiter's state in `memory`.
    pub fn new(cfg: &PipelineConfig, selfm: Arc<SelfMetrics>, memory: MemoryGauge) -> Self {
        Self {
            detail: DetailController::new(
                cfg.detail_enter_ratio,
                cfg.detail_exit_ratio,
                cfg.detail_exit_intervals,
            ),
            cfg: cfg.clone(),
            selfm,
            clock: ClockGuard::default(),
            ratio: ErrorRatio::default(),
            states: HashMap::new(),
            interval: 0,
            rss: Box::new(memory::rss_bytes),
            memory,
            k8s: None,
        }
    }

    /// Adds pod and container names from `names` (the kubelet cache) to
    /// the series that carry `k8s.pod.uid` / `container.id`.
    pub fn with_k8s_names(mut self, names: crate::families::containers::kubelet::Shared) -> Self {
        self.k8s = Some(names);
        self
    }

    /// Replaces the resident-memory source (tests simulate memory pressure).
    pub fn with_rss_source(mut self, rss: impl Fn() -> Option<u64> + Send + 'static) -> Self {
        self.rss = Box::new(rss);
        self
    }

    /// The current detail mode.
    pub fn detail_mode(&self) -> DetailMode {
        self.detail.mode()
    }

    /// Applies the stages above to one snapshot.
    pub fn process(&mut self, mut snapshot: Snapshot) -> Snapshot {
        self.interval += 1;

        // 1. Clock guard.
        let adj = self.clock.adjust(snapshot.time, Instant::now());
        if adj.jumped_back {
            self.selfm.add(
                crate::catalogue::CLOCK_JUMPS,
                "Times the wall clock went backwards between two collections",
                "{jump}",
                vec![],
                1,
            );
            tracing::warn!(
                shift_ms = adj.shift.as_millis() as u64,
                "wall clock went backwards; exported times follow the monotonic clock until it catches up"
            );
        }
        snapshot.time = adj.time;

        // Names of pods and containers (a read of the cached names: the
        // kubelet is asked on its own thread).
        if let Some(k8s) = &self.k8s {
            let names = k8s.read().unwrap_or_else(|e| e.into_inner()).clone();
            names.enrich(&mut snapshot);
        }

        // 3. Error ratio and detail mode (on the raw counters).
        let ratio = self.ratio.observe(&snapshot);
        let mode = self.detail.update(ratio);
        self.selfm.clear(crate::catalogue::DETAIL_MODE);
        for m in [DetailMode::Reduced, DetailMode::Full] {
            self.selfm.set(
                crate::catalogue::DETAIL_MODE,
                "Per-peer detail mode: 1 for the current mode",
                "1",
                vec![("mode", m.as_str().into())],
                if m == mode { 1.0 } else { 0.0 },
            );
        }
        if let Some(r) = ratio {
            self.selfm.set(
                crate::catalogue::DETAIL_RATIO,
                "Host error ratio of the last interval that drives adaptive detail",
                "1",
                vec![],
                r,
            );
        }

        // 4. Memory limiter.
        let mem = match (self.rss)() {
            // The RSS itself is `process.memory.usage`, recorded by the run
            // loop: one RSS metric.
            Some(rss) => memory::classify(
                rss,
                self.cfg.memory_soft_limit_bytes,
                self.cfg.memory_hard_limit_bytes,
            ),
            None => MemoryState::Normal,
        };
        if mem != self.memory.get() {
            tracing::warn!(state = ?mem, "memory limiter state changed");
        }
        self.memory.set(mem);
        self.selfm.set(
            crate::catalogue::MEMORY_STATE,
            "Memory limiter: 0 normal, 1 over the soft limit (shedding detail), 2 over the hard limit (refusing data)",
            "1",
            vec![],
            mem as u8 as f64,
        );

        let top_k = if mem >= MemoryState::Soft {
            Some(0)
        } else if mode == DetailMode::Reduced {
            Some(self.cfg.detail_top_k)
        } else {
            None
        };
        let lim = Limits {
            cap: self.cfg.max_series_per_metric,
            top_k,
            interval: self.interval,
            ttl: u64::from(self.cfg.series_ttl_intervals),
        };

        let now = snapshot.time;
        let metrics = std::mem::take(&mut snapshot.metrics);
        snapshot.metrics = metrics
            .into_iter()
            .map(|m| self.process_metric(m, adj.shift, &lim, now, mem))
            .collect();
        // Forget metrics that vanished long ago.
        let ttl = lim.ttl;
        let interval = self.interval;
        self.states
            .retain(|_, s| s.tracked() > 0 || interval % ttl.max(1) != 0);
        snapshot
    }

    fn process_metric(
        &mut self,
        m: Metric,
        shift: std::time::Duration,
        lim: &Limits,
        now: SystemTime,
        mem: MemoryState,
    ) -> Metric {
        let Metric {
            name,
            description,
            unit,
            data,
        } = m;
        let (kind, points, monotonic) = to_working(data);
        let mut points = points;
        // 1. Clock shift, and start <= time.
        if !shift.is_zero() {
            for p in &mut points {
                p.time += shift;
            }
        }
        for p in &mut points {
            if let Some(s) = &mut p.start {
                if *s > p.time {
                    *s = p.time;
                }
            }
        }
        // 2. Deny list and ephemeral ports.
        let points = self.hygiene(points);
        // 3-5. Detail, shedding, cap.
        let state = self.states.entry(name).or_default();
        let (points, outcome) = state.process(kind, points, lim, now);
        if outcome.overflowed > 0 {
            self.selfm.add(
                crate::catalogue::SERIES_OVERFLOWED,
                "Points folded into the otel.metric.overflow series because the metric hit its series cap",
                "{point}",
                vec![("metric", name.into())],
                outcome.overflowed,
            );
        }
        if outcome.folded > 0 {
            let (counter, description) = if mem >= MemoryState::Soft {
                (
                    crate::catalogue::MEMORY_SHED,
                    "Per-peer points folded into network.peer.address=other because memory is over the soft limit",
                )
            } else {
                (
                    crate::catalogue::DETAIL_FOLDED,
                    "Per-peer points folded into network.peer.address=other by adaptive detail",
                )
            };
            self.selfm.add(
                counter,
                description,
                "{point}",
                vec![("metric", name.into())],
                outcome.folded,
            );
        }
        Metric {
            name,
            description,
            unit,
            data: from_working(kind, monotonic, points),
        }
    }

    /// Removes denied keys, replaces ephemeral ports, merges what collided.
    fn hygiene(&self, mut points: Vec<P>) -> Vec<P> {
        let mut changed = false;
        for p in &mut points {
            let before = p.attrs.len();
            p.attrs
                .retain(|(k, _)| !self.cfg.deny_attributes.iter().any(|d| d == k));
            changed |= p.attrs.len() != before;
            for (k, v) in &mut p.attrs {
                if let AttrValue::Int(port) = v {
                    if *port >= i64::from(self.cfg.ephemeral_port_min)
                        && self.cfg.ephemeral_port_attributes.iter().any(|e| e == k)
                    {
                        *v = AttrValue::Str("ephemeral".to_owned());
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            return points;
        }
        merge(points)
    }
}

/// Merges points with equal attributes (values added, earliest start).
fn merge(points: Vec<P>) -> Vec<P> {
    let mut index: HashMap<Attributes, usize> = HashMap::with_capacity(points.len());
    let mut out: Vec<P> = Vec::with_capacity(points.len());
    for p in points {
        match index.get(&p.attrs) {
            Some(&i) => {
                let o = &mut out[i];
                o.val.add(&p.val);
                o.start = match (o.start, p.start) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                o.time = o.time.max(p.time);
            }
            None => {
                index.insert(p.attrs.clone(), out.len());
                out.push(p);
            }
        }
    }
    out
}

fn to_working(data: Data) -> (Kind, Vec<P>, bool) {
    match data {
        Data::Sum { monotonic, points } => (
            if monotonic {
                Kind::Monotonic
            } else {
                Kind::NonMonotonic
            },
            points.into_iter().map(number_to_p).collect(),
            monotonic,
        ),
        Data::Gauge { points } => (
            Kind::Gauge,
            points.into_iter().map(number_to_p).collect(),
            false,
        ),
        Data::Histogram { points } => (
            Kind::Histogram,
            points
                .into_iter()
                .map(|h| P {
                    attrs: h.attributes,
                    start: Some(h.start_time),
                    time: h.time,
                    val: Val::Hist {
                        count: h.count,
                        sum: h.sum,
                        buckets: h.buckets,
                    },
                })
                .collect(),
            false,
        ),
    }
}

fn number_to_p(n: NumberPoint) -> P {
    P {
        attrs: n.attributes,
        start: n.start_time,
        time: n.time,
        val: Val::from_number(n.value),
    }
}

fn from_working(kind: Kind, monotonic: bool, points: Vec<P>) -> Data {
    let numbers = |points: Vec<P>| {
        points
            .into_iter()
            .map(|p| NumberPoint {
                value: p.val.to_number(),
                attributes: p.attrs,
                start_time: p.start,
                time: p.time,
            })
            .collect()
    };
    match kind {
        Kind::Monotonic | Kind::NonMonotonic => Data::Sum {
            monotonic,
            points: numbers(points),
        },
        Kind::Gauge => Data::Gauge {
            points: numbers(points),
        },
        Kind::Histogram => Data::Histogram {
            points: points
                .into_iter()
                .filter_map(|p| match p.val {
                    Val::Hist {
                        count,
                        sum,
                        buckets,
                    } => Some(HistogramPoint {
                        attributes: p.attrs,
                        start_time: p.start.unwrap_or(p.time),
                        time: p.time,
                        count,
                        sum,
                        buckets,
                    }),
                    _ => None,
                })
                .collect(),
        },
    }
}

#[cfg(test)]
mod tests;
