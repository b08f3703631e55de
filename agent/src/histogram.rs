//! Histogram buckets: the kernel's exponential buckets as collected, and the
//! classic (explicit-bound) layouts exporters derive from them.
//!
//! The kernel bins durations at scale [`exp::SCALE`] in seconds
//! ([`agent_common::exp`]). A collector turns a map's slots into an
//! [`Exponential`] with only the populated range. Exporters then send it
//! as it is (OTLP `ExponentialHistogram`, Prometheus native histograms),
//! merge adjacent buckets exactly to fit a bucket limit
//! ([`Exponential::downscaled`]), or sum it into a [`ClassicLayout`] whose
//! bounds are all kernel bucket bounds, so no count moves across a bound.

use std::sync::Arc;

use agent_common::exp;

/// The buckets of one histogram point.
#[derive(Debug, Clone, PartialEq)]
pub enum Buckets {
    /// `counts[i]` counts values in `(bounds[i-1], bounds[i]]`; the last count
    /// is the overflow above the last bound: `counts.len() == bounds.len() + 1`.
    Explicit {
        bounds: Arc<[f64]>,
        counts: Vec<u64>,
    },
    /// Base `2^(2^-scale)` buckets.
    Exponential(Exponential),
}

impl Buckets {
    /// Adds `other` in place. Explicit buckets add when their bounds match;
    /// exponential ones at the coarser of the two scales.
    pub fn add(&mut self, other: &Buckets) {
        match (self, other) {
            (
                Buckets::Explicit { bounds, counts },
                Buckets::Explicit {
                    bounds: ob,
                    counts: oc,
                },
            ) if bounds == ob => {
                for (a, b) in counts.iter_mut().zip(oc) {
                    *a += b;
                }
            }
            (Buckets::Exponential(a), Buckets::Exponential(b)) => a.add(b),
            _ => {}
        }
    }

    /// `self - prev`, or None when a count went down or the shapes differ.
    pub fn delta(&self, prev: &Buckets) -> Option<Buckets> {
        match (self, prev) {
            (
                Buckets::Explicit { bounds, counts },
                Buckets::Explicit {
                    bounds: pb,
                    counts: pc,
                },
            ) => {
                if bounds != pb || counts.len() != pc.len() {
                    return None;
                }
                let counts = counts
                    .iter()
                    .zip(pc)
                    .map(|(a, b)| a.checked_sub(*b))
                    .collect::<Option<Vec<u64>>>()?;
                Some(Buckets::Explicit {
                    bounds: bounds.clone(),
                    counts,
                })
            }
            (Buckets::Exponential(a), Buckets::Exponential(b)) => {
                a.delta(b).map(Buckets::Exponential)
            }
            _ => None,
        }
    }

    /// The empty buckets of the same shape.
    pub fn zero_like(&self) -> Buckets {
        match self {
            Buckets::Explicit { bounds, counts } => Buckets::Explicit {
                bounds: bounds.clone(),
                counts: vec![0; counts.len()],
            },
            Buckets::Exponential(e) => Buckets::Exponential(Exponential::empty(e.scale)),
        }
    }

    /// The number of values counted.
    pub fn count(&self) -> u64 {
        match self {
            Buckets::Explicit { counts, .. } => counts.iter().sum(),
            Buckets::Exponential(e) => e.count(),
        }
    }
}

/// An exponential histogram's buckets: `counts[n]` counts values in
/// `(base^(offset+n), base^(offset+n+1)]`, `base = 2^(2^-scale)`, and
/// `zero_count` the zeros. Only the populated range is kept: the first and
/// last counts are non-zero (or `counts` is empty).
#[derive(Debug, Clone, PartialEq)]
pub struct Exponential {
    pub scale: i32,
    pub zero_count: u64,
    pub offset: i32,
    pub counts: Vec<u64>,
}

impl Exponential {
    /// No values, at `scale`.
    pub fn empty(scale: i32) -> Self {
        Self {
            scale,
            zero_count: 0,
            offset: 0,
            counts: Vec::new(),
        }
    }

    /// From a kernel map's [`exp::SLOTS`] slots (summed over CPUs). The
    /// overflow slot (values above `2^exp::MAX_POWER` ns, about 18 min) is
    /// counted in the top tracked bucket: kept in the count, never dropped.
    pub fn from_slots(slots: &[u64]) -> Self {
        let mut e = Self::empty(exp::SCALE);
        e.zero_count = slots.get(exp::ZERO_SLOT as usize).copied().unwrap_or(0);
        let tracked = exp::ZERO_SLOT as usize + 1..exp::OVERFLOW_SLOT as usize;
        let mut dense: Vec<u64> = slots.get(tracked.clone()).unwrap_or_default().to_vec();
        dense.resize(tracked.len(), 0);
        if let (Some(last), Some(&over)) =
            (dense.last_mut(), slots.get(exp::OVERFLOW_SLOT as usize))
        {
            *last += over;
        }
        e.set_dense(exp::MIN_INDEX, dense);
        e
    }

    /// From `(index, count)` pairs at [`exp::SCALE`], e.g. a sparse per-peer map.
    pub fn from_sparse(zero_count: u64, buckets: impl IntoIterator<Item = (i32, u64)>) -> Self {
        Self::from_sparse_at(exp::SCALE, zero_count, buckets)
    }

    /// From `(index, count)` pairs at `scale`.
    pub fn from_sparse_at(
        scale: i32,
        zero_count: u64,
        buckets: impl IntoIterator<Item = (i32, u64)>,
    ) -> Self {
        let mut pairs: Vec<(i32, u64)> = buckets.into_iter().filter(|(_, c)| *c > 0).collect();
        pairs.sort_unstable();
        let mut e = Self::empty(scale);
        e.zero_count = zero_count;
        if let (Some(&(lo, _)), Some(&(hi, _))) = (pairs.first(), pairs.last()) {
            let mut dense = vec![0u64; (hi - lo) as usize + 1];
            for (i, c) in pairs {
                dense[(i - lo) as usize] += c;
            }
            e.set_dense(lo, dense);
        }
        e
    }

    /// Sets the buckets from `dense` (bucket `offset + n` at `dense[n]`),
    /// trimming the empty ends.
    fn set_dense(&mut self, offset: i32, mut dense: Vec<u64>) {
        let Some(first) = dense.iter().position(|&c| c > 0) else {
            self.offset = 0;
            self.counts = Vec::new();
            return;
        };
        let last = dense.iter().rposition(|&c| c > 0).unwrap_or(first);
        dense.truncate(last + 1);
        dense.drain(..first);
        self.offset = offset + first as i32;
        self.counts = dense;
    }

    /// The number of values counted, zeros included.
    pub fn count(&self) -> u64 {
        self.zero_count + self.counts.iter().sum::<u64>()
    }

    /// The bucket index of `counts[n]`.
    pub fn index(&self, n: usize) -> i32 {
        self.offset + n as i32
    }

    /// The same values at `self.scale - by`: adjacent buckets merged exactly
    /// (bucket `i` into `i >> by`), as the OpenTelemetry SDK does.
    pub fn downscale(&mut self, by: u32) {
        if by == 0 {
            return;
        }
        let (offset, len) = exp::downscale(self.offset, &mut self.counts, by);
        self.counts.truncate(len);
        let counts = std::mem::take(&mut self.counts);
        self.scale -= by as i32;
        self.set_dense(offset, counts);
    }

    /// A copy with at most `max_buckets` buckets (at least 2): the scale is
    /// lowered as little as needed, and reported.
    pub fn downscaled(&self, max_buckets: usize) -> Exponential {
        let mut e = self.clone();
        e.fit(max_buckets);
        e
    }

    /// [`Exponential::downscaled`] in place.
    pub fn fit(&mut self, max_buckets: usize) {
        self.downscale(exp::downscale_needed(
            self.offset,
            self.counts.len(),
            max_buckets,
        ));
    }

    /// Adds `other` in place, at the coarser of the two scales.
    pub fn add(&mut self, other: &Exponential) {
        let mut other = other.clone();
        if other.scale > self.scale {
            other.downscale((other.scale - self.scale) as u32);
        } else if self.scale > other.scale {
            self.downscale((self.scale - other.scale) as u32);
        }
        self.zero_count += other.zero_count;
        if other.counts.is_empty() {
            return;
        }
        if self.counts.is_empty() {
            self.offset = other.offset;
            self.counts = other.counts;
            return;
        }
        let lo = self.offset.min(other.offset);
        let hi =
            (self.offset + self.counts.len() as i32).max(other.offset + other.counts.len() as i32);
        let mut dense = vec![0u64; (hi - lo) as usize];
        for e in [&*self, &other] {
            for (n, c) in e.counts.iter().enumerate() {
                dense[(e.offset - lo) as usize + n] += c;
            }
        }
        self.set_dense(lo, dense);
    }

    /// `self - prev` bucket by bucket, or None if any count went down (a
    /// reset) or the scales differ.
    pub fn delta(&self, prev: &Exponential) -> Option<Exponential> {
        if self.scale != prev.scale || self.zero_count < prev.zero_count {
            return None;
        }
        let mut dense = self.counts.clone();
        let mut offset = self.offset;
        if dense.is_empty() {
            offset = prev.offset;
        }
        for (n, &c) in prev.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let i = prev.index(n);
            if i < offset || i >= offset + dense.len() as i32 {
                return None;
            }
            let d = &mut dense[(i - offset) as usize];
            *d = d.checked_sub(c)?;
        }
        let mut e = Exponential::empty(self.scale);
        e.zero_count = self.zero_count - prev.zero_count;
        e.set_dense(offset, dense);
        Some(e)
    }
}

/// The kernel bucket whose upper bound is `bound` seconds, if `bound` is
/// one (to 1e-9 relative: configured bounds are decimal approximations).
pub fn index_of_bound(bound: f64) -> Option<i32> {
    if !(bound > 0.0 && bound.is_finite()) {
        return None;
    }
    let i = (8.0 * bound.log2()).round() as i32 - 1;
    let exact = exp::upper_seconds(i);
    (((bound - exact) / exact).abs() < 1e-9).then_some(i)
}

/// Explicit (classic) bucket bounds that are all kernel bucket bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassicLayout {
    /// Kernel bucket (at [`exp::SCALE`]) whose upper bound each bound is.
    indexes: Vec<i32>,
    bounds: Arc<[f64]>,
}

impl Default for ClassicLayout {
    /// [`exp::CLASSIC_DEFAULT_POWERS`]: 15 powers of two seconds from
    /// `2^-19` (1.9 µs) to 1 s, plus `+Inf`.
    fn default() -> Self {
        Self::from_indexes(
            exp::CLASSIC_DEFAULT_POWERS
                .iter()
                .map(|&k| exp::index_of_power(k))
                .collect(),
        )
    }
}

impl ClassicLayout {
    fn from_indexes(indexes: Vec<i32>) -> Self {
        let bounds = indexes.iter().map(|&i| exp::upper_seconds(i)).collect();
        Self { indexes, bounds }
    }

    /// A layout from configured bounds in seconds. Each must be a kernel
    /// bucket bound `2^(m/8)` s (to 1e-9 relative), and they must increase.
    pub fn from_bounds(bounds: &[f64]) -> Result<Self, String> {
        if bounds.is_empty() {
            return Err("needs at least one bound".into());
        }
        let mut indexes = Vec::with_capacity(bounds.len());
        for &b in bounds {
            let Some(i) = index_of_bound(b) else {
                let m = (8.0 * b.log2()).floor();
                let (lo, hi) = (2f64.powf(m / 8.0), 2f64.powf((m + 1.0) / 8.0));
                return Err(format!(
                    "{b} s is not a kernel bucket bound (bounds are 2^(m/8) seconds, \
                     m an integer, e.g. powers of two); the nearest are {lo:.9e} and {hi:.9e}"
                ));
            };
            if !(exp::MIN_INDEX..=exp::MAX_INDEX).contains(&i) {
                return Err(format!(
                    "{b} s is outside the kernel's range ({:.3e} s to {:.3e} s)",
                    exp::upper_seconds(exp::MIN_INDEX),
                    exp::upper_seconds(exp::MAX_INDEX)
                ));
            }
            if indexes.last().is_some_and(|&l| l >= i) {
                return Err(format!(
                    "bounds must increase: {b} s after a larger or equal one"
                ));
            }
            indexes.push(i);
        }
        Ok(Self::from_indexes(indexes))
    }

    /// The finite upper bounds, in seconds.
    pub fn bounds(&self) -> &Arc<[f64]> {
        &self.bounds
    }

    /// Per-bucket counts (not cumulative) of `e` in this layout, plus the
    /// overflow: `bounds().len() + 1` counts. Exact for `e` at the kernel's
    /// scale: every kernel bucket lies wholly within one classic bucket.
    pub fn counts(&self, e: &Exponential) -> Vec<u64> {
        let mut out = vec![0u64; self.indexes.len() + 1];
        out[0] += e.zero_count;
        let by = (exp::SCALE - e.scale).max(0) as u32;
        for (n, &c) in e.counts.iter().enumerate() {
            // The bucket's upper bound as a kernel-scale bucket index.
            let upper = ((e.index(n) + 1) << by) - 1;
            let k = self.indexes.partition_point(|&i| i < upper);
            out[k] += c;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kernel-shaped slots: values `v` ns `n` times each.
    fn slots(values: &[(u64, u64)]) -> Vec<u64> {
        let mut s = vec![0u64; exp::SLOTS as usize];
        for &(v, n) in values {
            s[exp::slot(v) as usize] += n;
        }
        s
    }

    #[test]
    fn from_slots_keeps_every_count_and_only_the_populated_range() {
        let s = slots(&[
            (0, 2),
            (1_500, 3),
            (40_000, 5),
            (2_000_000, 7),
            (u64::MAX, 1),
        ]);
        let e = Exponential::from_slots(&s);
        assert_eq!(e.count(), 18);
        assert_eq!(e.zero_count, 2);
        assert_eq!(e.scale, 3);
        assert_eq!(e.offset, exp::index(1_500));
        assert_eq!(e.counts[0], 3);
        assert_eq!(*e.counts.last().unwrap(), 1, "overflow in the top bucket");
        assert_eq!(e.index(e.counts.len() - 1), exp::MAX_INDEX);
        let empty = Exponential::from_slots(&vec![0; exp::SLOTS as usize]);
        assert!(empty.counts.is_empty());
        assert_eq!(empty.count(), 0);
    }

    #[test]
    fn downscaling_merges_exactly_and_reports_the_scale() {
        let s = slots(&[
            (1_000, 1),
            (10_000, 2),
            (100_000, 3),
            (1_000_000, 4),
            (10_000_000, 5),
        ]);
        let e = Exponential::from_slots(&s);
        assert!(e.counts.len() > 10);
        let d = e.downscaled(10);
        assert!(d.counts.len() <= 10, "{d:?}");
        assert!(d.scale < 3);
        assert_eq!(d.count(), e.count());
        // Every value stays in the bucket its merged bucket covers.
        let by = (e.scale - d.scale) as u32;
        for (n, &c) in e.counts.iter().enumerate() {
            if c > 0 {
                let i = e.index(n) >> by;
                assert!(d.counts[(i - d.offset) as usize] >= c);
            }
        }
        assert_eq!(e.downscaled(1000), e);
    }

    #[test]
    fn add_and_delta_align_offsets() {
        let a = Exponential::from_slots(&slots(&[(1_000, 1), (5_000, 2)]));
        let b = Exponential::from_slots(&slots(&[(5_000, 3), (1_000_000, 4), (0, 1)]));
        let mut sum = a.clone();
        sum.add(&b);
        assert_eq!(sum.count(), 11);
        assert_eq!(sum.offset, a.offset);
        assert_eq!(sum.delta(&a), Some(b.clone()));
        assert_eq!(sum.delta(&b), Some(a.clone()));
        assert_eq!(a.delta(&sum), None, "a count went down");
        let mut coarse = b.downscaled(2);
        coarse.add(&a);
        assert_eq!(coarse.count(), 11);
        assert_eq!(coarse.scale, b.downscaled(2).scale);
    }

    #[test]
    fn classic_counts_are_exact_sums_of_kernel_buckets() {
        let layout = ClassicLayout::default();
        assert_eq!(layout.bounds().len(), 15);
        // Values at and just above each bound land on the right side of it.
        let mut values = vec![(0u64, 1u64)];
        for &i in &layout.indexes {
            let ns = exp::upper_ns(i);
            values.push((ns, 1));
            values.push((ns + 1, 1));
        }
        values.push((u64::MAX, 1));
        let e = Exponential::from_slots(&slots(&values));
        let counts = layout.counts(&e);
        assert_eq!(counts.iter().sum::<u64>(), e.count());
        for (k, &bound) in layout.bounds().iter().enumerate() {
            let below = values
                .iter()
                .filter(|(v, _)| (*v as f64) / 1e9 <= bound)
                .count() as u64;
            let cumulative: u64 = counts[..=k].iter().sum();
            assert_eq!(cumulative, below, "le={bound}");
        }
        // A downscaled histogram is still summed without loss.
        let d = e.downscaled(8);
        assert_eq!(layout.counts(&d).iter().sum::<u64>(), e.count());
    }

    #[test]
    fn every_kernel_bound_is_recognised() {
        for i in exp::MIN_INDEX..=exp::MAX_INDEX {
            let b = exp::upper_seconds(i);
            assert_eq!(index_of_bound(b), Some(i));
            assert_eq!(index_of_bound(b * 1.0001), None);
            // As a config file would write it, to 10 significant digits.
            let text: f64 = format!("{b:.10e}").parse().unwrap();
            assert_eq!(index_of_bound(text), Some(i));
        }
        assert_eq!(index_of_bound(0.0), None);
        assert_eq!(index_of_bound(f64::INFINITY), None);
        assert_eq!(index_of_bound(f64::NAN), None);
    }

    #[test]
    fn configured_bounds_must_be_kernel_bounds() {
        let l = ClassicLayout::from_bounds(&[0.25, 0.001953125]);
        assert!(l.unwrap_err().contains("increase"));
        let l = ClassicLayout::from_bounds(&[0.000244140625, 0.001953125, 0.5]).unwrap();
        assert_eq!(l.bounds().len(), 3);
        let err = ClassicLayout::from_bounds(&[0.001]).unwrap_err();
        assert!(err.contains("not a kernel bucket bound"), "{err}");
        assert!(ClassicLayout::from_bounds(&[]).is_err());
        assert!(ClassicLayout::from_bounds(&[1048576.0])
            .unwrap_err()
            .contains("outside"));
    }
}
