//! Series cap per metric and folding, with exact totals.
//!
//! A series is *folded* when its points are added into another series
//! instead of being exported on their own: into the overflow series
//! (`otel.metric.overflow=true`, past the per-metric cap) or into the
//! `network.peer.address="other"` series (adaptive detail, memory shedding).
//!
//! Folding cumulative data needs care, or the folded series would go down
//! whenever a member leaves it (a reset) or be counted twice when a member
//! comes back:
//! - A folded series of a monotonic sum or histogram accumulates the
//!   *deltas* of its members since their previous value, so it only grows,
//!   also when members vanish.
//! - A series that leaves a fold and gets its own series again restarts:
//!   its values are rebased on the value already folded, with a new start
//!   time, so nothing is counted twice.
//! - Gauges and non-monotonic sums fold by adding the current values.
//!
//! Slots under the cap are first come, first kept (as in the OTel SDK):
//! an admitted series keeps its slot until it has been absent for
//! `series_ttl_intervals`, so the set of exported series is stable.

use std::collections::HashMap;
use std::time::SystemTime;

use crate::model::{AttrValue, Attributes, Buckets, Number};

use super::detail::{OTHER_PEER, PEER_ATTRIBUTE};

/// Attribute marking the overflow series (OpenTelemetry SDK convention).
pub const OVERFLOW_ATTRIBUTE: &str = "otel.metric.overflow";

/// Attributes of the overflow series. The model has no boolean attribute
/// value; the OTLP encoder sends this key as the boolean `true`.
pub fn overflow_attributes() -> Attributes {
    vec![(OVERFLOW_ATTRIBUTE, AttrValue::Str("true".to_owned()))]
}

/// How a metric's values combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic cumulative sum: folds accumulate deltas.
    Monotonic,
    /// Non-monotonic sum: folds add current values.
    NonMonotonic,
    /// Gauge: folds add current values.
    Gauge,
    /// Cumulative histogram: folds accumulate bucket-wise deltas.
    Histogram,
}

impl Kind {
    fn cumulative(self) -> bool {
        matches!(self, Kind::Monotonic | Kind::Histogram)
    }
}

/// A point value in the working form.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Int(i64),
    Dbl(f64),
    Hist {
        count: u64,
        sum: f64,
        buckets: Buckets,
    },
}

impl Val {
    pub fn from_number(n: Number) -> Self {
        match n {
            Number::Int(i) => Val::Int(i),
            Number::Double(d) => Val::Dbl(d),
        }
    }

    pub fn to_number(&self) -> Number {
        match self {
            Val::Int(i) => Number::Int(*i),
            Val::Dbl(d) => Number::Double(*d),
            Val::Hist { sum, .. } => Number::Double(*sum),
        }
    }

    fn f64(&self) -> f64 {
        match self {
            Val::Int(i) => *i as f64,
            Val::Dbl(d) => *d,
            Val::Hist { count, .. } => *count as f64,
        }
    }

    /// `self - prev`, or None when a value went down (a reset) or the
    /// shapes differ.
    pub fn delta(&self, prev: &Val) -> Option<Val> {
        match (self, prev) {
            (Val::Int(a), Val::Int(b)) => (a >= b).then(|| Val::Int(a - b)),
            (
                Val::Hist {
                    count,
                    sum,
                    buckets,
                },
                Val::Hist {
                    count: pc,
                    sum: ps,
                    buckets: pb,
                },
            ) => {
                if count < pc {
                    return None;
                }
                Some(Val::Hist {
                    count: count - pc,
                    sum: sum - ps,
                    buckets: buckets.delta(pb)?,
                })
            }
            (Val::Hist { .. }, _) | (_, Val::Hist { .. }) => None,
            (a, b) => {
                let (a, b) = (a.f64(), b.f64());
                (a >= b).then_some(Val::Dbl(a - b))
            }
        }
    }

    /// Adds `other` in place (same shape assumed; integers stay integers).
    pub fn add(&mut self, other: &Val) {
        match (&mut *self, other) {
            (Val::Int(a), Val::Int(b)) => *a = a.saturating_add(*b),
            (
                Val::Hist {
                    count,
                    sum,
                    buckets,
                    ..
                },
                Val::Hist {
                    count: oc,
                    sum: os,
                    buckets: ob,
                    ..
                },
            ) => {
                *count += oc;
                *sum += os;
                buckets.add(ob);
            }
            (Val::Hist { .. }, _) => {}
            (a, b) => *a = Val::Dbl(a.f64() + b.f64()),
        }
    }

    /// The zero of the same shape.
    fn zero_like(&self) -> Val {
        match self {
            Val::Int(_) => Val::Int(0),
            Val::Dbl(_) => Val::Dbl(0.0),
            Val::Hist { buckets, .. } => Val::Hist {
                count: 0,
                sum: 0.0,
                buckets: buckets.zero_like(),
            },
        }
    }
}

/// A point in the working form.
#[derive(Debug, Clone, PartialEq)]
pub struct P {
    pub attrs: Attributes,
    pub start: Option<SystemTime>,
    pub time: SystemTime,
    pub val: Val,
}

#[derive(Debug)]
struct SeriesState {
    /// Last cumulative value seen (cumulative kinds only).
    last: Option<(Val, SystemTime)>,
    /// Holds a slot under the cap.
    admitted: bool,
    /// Was folded at its last appearance.
    folded: bool,
    /// Own series restarted after a fold: exported value is `value - base`.
    base: Option<(Val, SystemTime)>,
    /// Interval number of the last appearance.
    seen: u64,
}

#[derive(Debug)]
struct FoldState {
    acc: Val,
    start: SystemTime,
    seen: u64,
    /// An `other` fold holds a slot under the cap; the overflow does not.
    counts_against_cap: bool,
}

/// Limits for one interval.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Series per metric, overflow included.
    pub cap: usize,
    /// Per-peer series kept (None: all, up to the cap).
    pub top_k: Option<usize>,
    /// Interval number (increases by one per snapshot).
    pub interval: u64,
    /// Intervals of absence before state is forgotten.
    pub ttl: u64,
}

/// What one metric's processing folded.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Points folded into the overflow series (past the cap).
    pub overflowed: u64,
    /// Points folded into `other` (adaptive detail or memory shedding).
    pub folded: u64,
}

/// Per-metric state across intervals.
#[derive(Debug, Default)]
pub struct MetricState {
    series: HashMap<Attributes, SeriesState>,
    admitted: usize,
    folds: HashMap<Attributes, FoldState>,
}

enum Route {
    Keep,
    Fold { dest: Attributes, overflow: bool },
}

fn peer_of(attrs: &Attributes) -> Option<&AttrValue> {
    attrs
        .iter()
        .find(|(k, _)| *k == PEER_ATTRIBUTE)
        .map(|(_, v)| v)
        .filter(|v| !matches!(v, AttrValue::Str(s) if s == OTHER_PEER))
}

fn other_attrs(attrs: &Attributes) -> Attributes {
    attrs
        .iter()
        .map(|(k, v)| {
            if *k == PEER_ATTRIBUTE {
                (*k, AttrValue::Str(OTHER_PEER.to_owned()))
            } else {
                (*k, v.clone())
            }
        })
        .collect()
}

impl MetricState {
    /// Series (own and `other`) currently holding a slot.
    pub fn admitted(&self) -> usize {
        self.admitted
    }

    /// Series whose state is remembered (bounded by the TTL).
    pub fn tracked(&self) -> usize {
        self.series.len()
    }

    /// Applies detail and cap to one metric's points at `now`.
    pub fn process(
        &mut self,
        kind: Kind,
        points: Vec<P>,
        lim: &Limits,
        now: SystemTime,
    ) -> (Vec<P>, Outcome) {
        let routes = self.route(kind, &points, lim);
        let mut out = Vec::with_capacity(points.len().min(lim.cap) + 2);
        let mut outcome = Outcome::default();
        // Gauge-like folds of this interval: current values added up.
        let mut current: HashMap<Attributes, P> = HashMap::new();
        for (p, route) in points.into_iter().zip(routes) {
            match route {
                Route::Keep => out.push(self.keep(kind, p, lim.interval)),
                Route::Fold { dest, overflow } => {
                    if overflow {
                        outcome.overflowed += 1;
                    } else {
                        outcome.folded += 1;
                    }
                    self.fold(kind, p, dest, !overflow, lim.interval, now, &mut current);
                }
            }
        }
        if kind.cumulative() {
            let mut folds: Vec<P> = self
                .folds
                .iter()
                .filter(|(_, f)| f.seen + lim.ttl >= lim.interval)
                .map(|(a, f)| P {
                    attrs: a.clone(),
                    start: Some(f.start),
                    time: now,
                    val: f.acc.clone(),
                })
                .collect();
            folds.sort_by(|a, b| a.attrs.cmp(&b.attrs));
            out.extend(folds);
        } else {
            let mut folds: Vec<P> = current.into_values().collect();
            folds.sort_by(|a, b| a.attrs.cmp(&b.attrs));
            out.extend(folds);
        }
        self.evict(lim);
        (out, outcome)
    }

    fn route(&mut self, kind: Kind, points: &[P], lim: &Limits) -> Vec<Route> {
        // Histogram points whose explicit bounds differ from the first
        // one's cannot be added up: they keep their own series whatever the
        // cap. Exponential points add up at any scale.
        let shape = |v: &Val| match v {
            Val::Hist {
                buckets: Buckets::Explicit { bounds, .. },
                ..
            } => Some(Some(bounds.clone())),
            Val::Hist { .. } => Some(None),
            _ => None,
        };
        let shape0 = points.iter().find_map(|p| shape(&p.val));
        let odd_bounds = |p: &P| match (shape(&p.val), &shape0) {
            (Some(s), Some(s0)) => &s != s0,
            _ => false,
        };

        // Adaptive detail: the busiest `k` peers by activity this interval.
        let mut kept_peers: Option<std::collections::HashSet<&AttrValue>> = None;
        if let Some(k) = lim.top_k {
            let mut score: HashMap<&AttrValue, f64> = HashMap::new();
            for p in points {
                let Some(peer) = peer_of(&p.attrs) else {
                    continue;
                };
                let activity = match kind {
                    Kind::Monotonic | Kind::Histogram => {
                        let last = self.series.get(&p.attrs).and_then(|s| s.last.as_ref());
                        match last.and_then(|(l, _)| p.val.delta(l)) {
                            Some(d) => d.f64(),
                            None => p.val.f64(),
                        }
                    }
                    Kind::Gauge | Kind::NonMonotonic => p.val.f64().abs(),
                };
                *score.entry(peer).or_default() += activity;
            }
            if score.len() > k {
                let mut ranked: Vec<(&AttrValue, f64)> = score.into_iter().collect();
                ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
                ranked.truncate(k);
                kept_peers = Some(ranked.into_iter().map(|(p, _)| p).collect());
            }
        }

        let limit = lim.cap.saturating_sub(1);
        let mut routes = Vec::with_capacity(points.len());
        for p in points {
            let folded_peer = match (&kept_peers, peer_of(&p.attrs)) {
                (Some(kept), Some(peer)) => !kept.contains(peer),
                _ => false,
            };
            if folded_peer {
                // Its own slot is released while it is folded.
                if let Some(s) = self.series.get_mut(&p.attrs).filter(|s| s.admitted) {
                    s.admitted = false;
                    self.admitted -= 1;
                }
                let dest = other_attrs(&p.attrs);
                if let Some(f) = self.folds.get_mut(&dest) {
                    f.seen = lim.interval;
                    routes.push(Route::Fold {
                        dest,
                        overflow: false,
                    });
                } else if self.admitted < limit {
                    // Reserve the slot now; fold() creates the state.
                    self.admitted += 1;
                    self.folds.insert(
                        dest.clone(),
                        FoldState {
                            acc: p.val.zero_like(),
                            start: p.start.unwrap_or(p.time),
                            seen: lim.interval,
                            counts_against_cap: true,
                        },
                    );
                    routes.push(Route::Fold {
                        dest,
                        overflow: false,
                    });
                } else {
                    routes.push(Route::Fold {
                        dest: overflow_attributes(),
                        overflow: true,
                    });
                }
                continue;
            }
            let admitted = self.series.get(&p.attrs).is_some_and(|s| s.admitted);
            if admitted || odd_bounds(p) {
                routes.push(Route::Keep);
            } else if self.admitted < limit {
                self.admitted += 1;
                let s = self.series.entry(p.attrs.clone()).or_insert(SeriesState {
                    last: None,
                    admitted: false,
                    folded: false,
                    base: None,
                    seen: lim.interval,
                });
                s.admitted = true;
                routes.push(Route::Keep);
            } else {
                routes.push(Route::Fold {
                    dest: overflow_attributes(),
                    overflow: true,
                });
            }
        }
        routes
    }

    fn keep(&mut self, kind: Kind, mut p: P, interval: u64) -> P {
        let s = self.series.entry(p.attrs.clone()).or_insert(SeriesState {
            last: None,
            admitted: false,
            folded: false,
            base: None,
            seen: interval,
        });
        s.seen = interval;
        if !kind.cumulative() {
            return p;
        }
        if s.folded {
            // Its history up to `last` is inside a fold: restart here.
            s.base = s.last.clone();
            s.folded = false;
        }
        let value = p.val.clone();
        if let Some((bv, bt)) = &s.base {
            match p.val.delta(bv) {
                Some(d) => {
                    p.val = d;
                    p.start = Some(*bt);
                }
                // The counter itself reset: its own start time is right.
                None => s.base = None,
            }
        }
        s.last = Some((value, p.time));
        p
    }

    #[expect(clippy::too_many_arguments, reason = "one call site, all state")]
    fn fold(
        &mut self,
        kind: Kind,
        p: P,
        dest: Attributes,
        counts_against_cap: bool,
        interval: u64,
        now: SystemTime,
        current: &mut HashMap<Attributes, P>,
    ) {
        if !kind.cumulative() {
            match current.get_mut(&dest) {
                Some(acc) => {
                    acc.val.add(&p.val);
                    acc.start = match (acc.start, p.start) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                None => {
                    current.insert(
                        dest.clone(),
                        P {
                            attrs: dest,
                            start: p.start,
                            time: now,
                            val: p.val,
                        },
                    );
                }
            }
            return;
        }
        let s = self.series.entry(p.attrs).or_insert(SeriesState {
            last: None,
            admitted: false,
            folded: false,
            base: None,
            seen: interval,
        });
        s.seen = interval;
        let contribution = match &s.last {
            Some((l, _)) => p.val.delta(l).unwrap_or_else(|| p.val.clone()),
            None => p.val.clone(),
        };
        s.last = Some((p.val.clone(), p.time));
        s.folded = true;
        s.base = None;
        let f = self.folds.entry(dest).or_insert_with(|| FoldState {
            acc: p.val.zero_like(),
            start: p.start.unwrap_or(p.time),
            seen: interval,
            counts_against_cap,
        });
        f.seen = interval;
        f.acc.add(&contribution);
    }

    fn evict(&mut self, lim: &Limits) {
        let mut freed = 0;
        self.series.retain(|_, s| {
            let keep = s.seen + lim.ttl >= lim.interval;
            if !keep && s.admitted {
                freed += 1;
            }
            keep
        });
        self.folds.retain(|_, f| {
            let keep = f.seen + lim.ttl >= lim.interval;
            if !keep && f.counts_against_cap {
                freed += 1;
            }
            keep
        });
        self.admitted -= freed;
    }
}
