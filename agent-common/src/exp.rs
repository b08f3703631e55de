//! Exponential (OpenTelemetry / Prometheus native) histogram bucketing at a
//! fixed scale, shared by the kernel and userspace.
//!
//! Scale [`SCALE`] = 3: base `2^(1/8)`, eight buckets per power of two, each
//! about 9 % wide. The buckets are buckets **of seconds**, the unit the
//! metrics are exported in: OTel bucket `i` covers `(2^(i/8), 2^((i+1)/8)]`
//! seconds (upper-inclusive), Prometheus native bucket `i + 1`. So the
//! kernel's counts go to OTLP and Prometheus as they are: nothing is
//! re-binned.
//!
//! The kernel sees integer nanoseconds `v`. The bucket of `v` is the largest
//! `m` with `2^(m/8) s < v ns`, i.e. with `T(m) < v` where
//! `T(m) = floor(1e9 * 2^(m/8))` (the product is irrational unless `8 | m`,
//! and an integer when it is not, so the floor changes nothing). [`BOUNDS_NS`]
//! holds these thresholds; a big-integer test checks every one of them.
//!
//! The index is computed without floating point and without a loop (the
//! verifier wants bounded code):
//! 1. a leading-zero count and seven compares give the bucket of `v` **in
//!    nanoseconds**, `n = ceil(8 * log2 v) - 1` (the compares are against
//!    `floor(2^(63 + j/8))`, exact for a value normalised to bit 63);
//! 2. `8 * log2(1e9) = 239.18`, so nanosecond bucket `n` holds exactly one
//!    seconds boundary, `T(n - 239)`, and the seconds bucket is `n - 240`
//!    or `n - 239`: one table compare decides.
//!
//! Tracked range: 1 ns up to `2^40` ns (about 18 min), indexes
//! [`MIN_INDEX`] ..= [`MAX_INDEX`]. `0` goes to the zero bucket, values
//! above `2^40` ns to the overflow slot; both are counted, never dropped.

/// The OpenTelemetry / Prometheus native-histogram scale (schema).
pub const SCALE: i32 = 3;
/// The largest tracked value is `2^MAX_POWER` ns.
pub const MAX_POWER: u32 = 40;
/// `floor(8 * log2(1e9))`: nanosecond bucket `n` holds seconds boundary `n - 239`.
const SECONDS_SHIFT: i32 = 239;
/// The smallest nanosecond bucket, `(2^(-1/8), 1]` ns.
const NS_MIN_INDEX: i32 = -1;
/// The largest nanosecond bucket, `(2^(MAX_POWER - 1/8), 2^MAX_POWER]` ns.
const NS_MAX_INDEX: i32 = (MAX_POWER as i32) * 8 - 1;
/// The smallest tracked (seconds) index: bucket `(2^-30, 2^-29.875]` s,
/// which holds 1 ns.
pub const MIN_INDEX: i32 = NS_MIN_INDEX - SECONDS_SHIFT;
/// The largest tracked (seconds) index: the bucket of `2^MAX_POWER` ns.
pub const MAX_INDEX: i32 = NS_MAX_INDEX - SECONDS_SHIFT;
/// Slot holding the count of zero values.
pub const ZERO_SLOT: u32 = 0;
/// Slot holding the count of values above `2^MAX_POWER` ns.
pub const OVERFLOW_SLOT: u32 = (MAX_INDEX - MIN_INDEX) as u32 + 2;
/// The number of map slots: zero, every tracked index, overflow.
pub const SLOTS: u32 = OVERFLOW_SLOT + 1;

/// The kernel's `.rodata` copy of [`BOUNDS_NS`]. Never overridden: it is
/// listed so the object check sees every global the object defines.
pub const GLOBAL_BOUNDS: &str = "EXP_BOUNDS_NS";

/// The object's histogram globals (no maps: each family owns its histograms).
pub const GLOBALS: &[crate::contract::GlobalSpec] = &[crate::contract::GlobalSpec::of::<
    [u64; BOUNDS_LEN],
>(GLOBAL_BOUNDS)];

/// `floor(2^(63 + j/8))` for `j = 1..=7`: the sub-bucket thresholds of a
/// value normalised to bit 63. Checked exactly (big-integer 8th powers) in
/// the tests.
const THRESHOLDS: [u64; 7] = [
    0x8b95_c1e3_ea8b_d6e6,
    0x9837_f051_8db8_a96f,
    0xa5fe_d6a9_b151_38ea,
    0xb504_f333_f9de_6484,
    0xc567_2a11_5506_dadd,
    0xd744_fcca_d69d_6af4,
    0xeac0_c6e7_dd24_392e,
];

/// The number of entries of [`BOUNDS_NS`].
pub const BOUNDS_LEN: usize = (NS_MAX_INDEX - NS_MIN_INDEX + 1) as usize;

/// `BOUNDS_NS[n - NS_MIN_INDEX] = T(n - 239) = floor(1e9 * 2^((n - 239)/8))`:
/// the one seconds boundary inside nanosecond bucket `n`. The kernel keeps
/// a copy in `.rodata`.
pub const BOUNDS_NS: [u64; BOUNDS_LEN] = bounds_ns();

const fn bounds_ns() -> [u64; BOUNDS_LEN] {
    let mut out = [0u64; BOUNDS_LEN];
    let mut p = 0;
    while p < BOUNDS_LEN {
        out[p] = threshold_ns(p as i32 + NS_MIN_INDEX - SECONDS_SHIFT);
        p += 1;
    }
    out
}

/// `floor(1e9 * 2^(m/8))`, from the 64-bit fixed-point `2^(r/8)`; the
/// tests check the result exactly.
const fn threshold_ns(m: i32) -> u64 {
    let q = m.div_euclid(8);
    let r = m.rem_euclid(8) as usize;
    let frac: u128 = if r == 0 {
        1 << 63
    } else {
        THRESHOLDS[r - 1] as u128
    };
    // 1e9 * 2^(r/8) * 2^63, then * 2^q / 2^63.
    let x = 1_000_000_000u128 * frac;
    let shift = 63 - q;
    if shift >= 0 {
        (x >> shift) as u64
    } else {
        (x << -shift) as u64
    }
}

/// The bucket of `value >= 1` ns **in nanoseconds** (`ceil(8 log2 v) - 1`).
#[inline(always)]
const fn ns_index(value: u64) -> i32 {
    let k = 63 - value.leading_zeros();
    let x = value << (63 - k);
    let sub = (x > 1 << 63) as i32
        + (x > THRESHOLDS[0]) as i32
        + (x > THRESHOLDS[1]) as i32
        + (x > THRESHOLDS[2]) as i32
        + (x > THRESHOLDS[3]) as i32
        + (x > THRESHOLDS[4]) as i32
        + (x > THRESHOLDS[5]) as i32
        + (x > THRESHOLDS[6]) as i32;
    (k as i32) * 8 - 1 + sub
}

/// The OTel index (scale 3, seconds) of `1 ..= 2^MAX_POWER` ns, with the
/// thresholds read from `bounds` (the kernel passes its `.rodata` copy of
/// [`BOUNDS_NS`]).
#[inline(always)]
pub fn index_with(value: u64, bounds: &[u64; BOUNDS_LEN]) -> i32 {
    let n = ns_index(value);
    let p = (n - NS_MIN_INDEX) as usize;
    let above = match bounds.get(p) {
        Some(&t) => (value > t) as i32,
        None => 0,
    };
    n - SECONDS_SHIFT - 1 + above
}

/// The OTel index (scale 3, seconds) of `1 ..= 2^MAX_POWER` ns.
pub fn index(value: u64) -> i32 {
    index_with(value, &BOUNDS_NS)
}

/// The map slot for `value` ns, thresholds from `bounds`: [`ZERO_SLOT`],
/// `index - MIN_INDEX + 1`, or [`OVERFLOW_SLOT`].
#[inline(always)]
pub fn slot_with(value: u64, bounds: &[u64; BOUNDS_LEN]) -> u32 {
    if value == 0 {
        return ZERO_SLOT;
    }
    if value > 1 << MAX_POWER {
        return OVERFLOW_SLOT;
    }
    (index_with(value, bounds) - MIN_INDEX + 1) as u32
}

/// The map slot for `value` ns.
pub fn slot(value: u64) -> u32 {
    slot_with(value, &BOUNDS_NS)
}

/// The OTel index held by `slot` (only for `1 ..= OVERFLOW_SLOT - 1`).
pub const fn slot_index(slot: u32) -> i32 {
    slot as i32 - 1 + MIN_INDEX
}

/// The largest integer ns in bucket `index` (its inclusive upper bound in
/// ns), for `MIN_INDEX <= index <= MAX_INDEX`.
pub const fn upper_ns(index: i32) -> u64 {
    threshold_ns(index + 1)
}

/// The exact upper bound of bucket `index` in seconds, `2^((index+1)/8)`
/// to f64 precision. Classic (explicit) bounds are these values, so every
/// classic bucket is a union of kernel buckets.
pub fn upper_seconds(index: i32) -> f64 {
    let m = index + 1;
    let q = m.div_euclid(8);
    let r = m.rem_euclid(8) as usize;
    let frac = if r == 0 {
        1.0
    } else {
        THRESHOLDS[r - 1] as f64 / (1u64 << 63) as f64
    };
    frac * pow2(q)
}

fn pow2(q: i32) -> f64 {
    f64::from_bits(((1023 + q as i64) as u64) << 52)
}

/// Merges adjacent buckets exactly as the OpenTelemetry SDK does when it
/// lowers the scale by `by`: bucket `i` goes to `i >> by` (arithmetic shift,
/// so negative indexes round down). Works in place on `counts` (bucket
/// `offset + n` at `counts[n]`) and returns the new offset and length; the
/// reported scale becomes `SCALE - by`. No count is lost.
pub fn downscale(offset: i32, counts: &mut [u64], by: u32) -> (i32, usize) {
    if by == 0 || counts.is_empty() {
        return (offset, counts.len());
    }
    let new_offset = offset >> by;
    let mut len = 0;
    for n in 0..counts.len() {
        // n' <= n, so every source is read before it can be overwritten.
        let to = (((offset + n as i32) >> by) - new_offset) as usize;
        let c = counts[n];
        counts[n] = 0;
        counts[to] += c;
        len = to + 1;
    }
    (new_offset, len)
}

/// The smallest scale reduction that fits the populated range
/// `offset .. offset + len` into `max_buckets` (at least 2) buckets.
pub fn downscale_needed(offset: i32, len: usize, max_buckets: usize) -> u32 {
    if len == 0 {
        return 0;
    }
    let last = offset + len as i32 - 1;
    let mut by = 0;
    // Bounded: after 40 halvings any i32 range is one or two buckets.
    while by < 40 && ((last >> by) - (offset >> by)) as usize + 1 > max_buckets.max(2) {
        by += 1;
    }
    by
}

/// The default classic (Prometheus text / OTLP explicit) layout: upper
/// bounds at `2^k` seconds for these `k`, plus `+Inf`. One octave per
/// bucket from 0.95 µs to 0.98 ms, where run-queue waits and LAN round
/// trips live, then two octaves per bucket up to 1 s (3.9, 15.6, 62.5,
/// 250 ms, 1 s) for WAN round trips and retried connects: 16 finite bounds,
/// so 1 µs to 1 s in 19 series per histogram. `2^k` s is the exact upper
/// bound of kernel bucket `8k - 1`, so cumulative counts are exact sums of
/// kernel buckets.
pub const CLASSIC_DEFAULT_POWERS: [i32; 16] = [
    -20, -19, -18, -17, -16, -15, -14, -13, -12, -11, -10, -8, -6, -4, -2, 0,
];

/// The kernel bucket whose upper bound is `2^k` seconds.
pub const fn index_of_power(k: i32) -> i32 {
    k * 8 - 1
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::cmp::Ordering;
    use std::vec::Vec;

    /// Little-endian u64-limb multiply, exact.
    fn mul(a: &[u64], b: &[u64]) -> Vec<u64> {
        let mut out = std::vec![0u64; a.len() + b.len()];
        for (i, &x) in a.iter().enumerate() {
            let mut carry = 0u128;
            for (j, &y) in b.iter().enumerate() {
                let t = out[i + j] as u128 + x as u128 * y as u128 + carry;
                out[i + j] = t as u64;
                carry = t >> 64;
            }
            out[i + b.len()] = carry as u64;
        }
        out
    }

    fn pow8(x: u64) -> Vec<u64> {
        let x2 = mul(&[x], &[x]);
        let x4 = mul(&x2, &x2);
        mul(&x4, &x4)
    }

    /// `a * 2^e`.
    fn shl(a: &[u64], e: u32) -> Vec<u64> {
        let mut b = std::vec![0u64; e as usize / 64];
        b.push(1 << (e % 64));
        mul(a, &b)
    }

    fn cmp(a: &[u64], b: &[u64]) -> Ordering {
        let n = a.len().max(b.len());
        let (mut a, mut b) = (a.to_vec(), b.to_vec());
        a.resize(n, 0);
        b.resize(n, 0);
        a.iter().rev().cmp(b.iter().rev())
    }

    /// Compares `x^8` with `1e72 * 2^m`, i.e. `x` ns with `2^(m/8)` s, exactly.
    fn cmp_boundary(x: u64, m: i32) -> Ordering {
        let giga8 = pow8(1_000_000_000);
        if m >= 0 {
            cmp(&pow8(x), &shl(&giga8, m as u32))
        } else {
            cmp(&shl(&pow8(x), (-m) as u32), &giga8)
        }
    }

    #[test]
    fn thresholds_are_exact_floors() {
        for (j, &t) in THRESHOLDS.iter().enumerate() {
            let e = 504 + j as u32 + 1;
            assert_eq!(
                cmp(&pow8(t), &shl(&[1], e)),
                Ordering::Less,
                "t{j}^8 < 2^{e}"
            );
            assert_eq!(
                cmp(&pow8(t + 1), &shl(&[1], e)),
                Ordering::Greater,
                "(t{j}+1)^8 > 2^{e}"
            );
        }
    }

    #[test]
    fn nanosecond_thresholds_are_exact_floors() {
        for m in MIN_INDEX..=MAX_INDEX + 1 {
            let t = threshold_ns(m);
            assert_ne!(
                cmp_boundary(t, m),
                Ordering::Greater,
                "T({m}) = {t} too big"
            );
            assert_eq!(
                cmp_boundary(t + 1, m),
                Ordering::Greater,
                "T({m}) = {t} too small"
            );
        }
        for (p, &t) in BOUNDS_NS.iter().enumerate() {
            assert_eq!(t, threshold_ns(p as i32 + NS_MIN_INDEX - SECONDS_SHIFT));
        }
    }

    /// Exact reference: the index of `v` ns is the largest `m` with
    /// `2^(m/8) s < v ns`, found by big-integer comparison near the float guess.
    fn reference_index(v: u64) -> i32 {
        let guess = (8.0 * ((v as f64) / 1e9).log2()).floor() as i32;
        let mut m = guess - 3;
        assert_eq!(cmp_boundary(v, m), Ordering::Greater);
        while cmp_boundary(v, m + 1) == Ordering::Greater {
            m += 1;
        }
        assert!(m <= guess + 2);
        m
    }

    #[test]
    fn every_boundary_agrees_with_the_exact_reference() {
        for m in MIN_INDEX..=MAX_INDEX + 1 {
            let b = threshold_ns(m);
            for v in [b.saturating_sub(1), b, b + 1, b + 2] {
                if v == 0 || v > 1 << MAX_POWER {
                    continue;
                }
                assert_eq!(index(v), reference_index(v), "value {v} near boundary {m}");
            }
        }
    }

    #[test]
    fn small_and_power_of_two_values_match_reference() {
        for v in 1..3000u64 {
            assert_eq!(index(v), reference_index(v), "value {v}");
        }
        for k in 0..=MAX_POWER {
            for v in [(1u64 << k) - 1, 1 << k, (1 << k) + 1] {
                if v >= 1 {
                    assert_eq!(index(v), reference_index(v), "value {v}");
                }
            }
        }
    }

    #[test]
    fn buckets_are_contiguous_and_upper_inclusive() {
        assert_eq!(index(1), MIN_INDEX);
        assert_eq!(MIN_INDEX, -240);
        // 1 ms = 2^-9.97 s: bucket (2^(-80/8), 2^(-79/8)].
        assert_eq!(index(1_000_000), -80);
        assert_eq!(index(1_000_000_000), 0 - 1);
        assert_eq!(index(1_000_000_001), 0);
        for i in MIN_INDEX..MAX_INDEX {
            let hi = upper_ns(i);
            if hi >= 1 {
                assert!(index(hi) <= i, "upper of {i}");
            }
            assert!(index(hi + 1) > i, "above upper of {i}");
        }
        assert_eq!(index(1 << MAX_POWER), MAX_INDEX);
        assert_eq!(slot(1 << MAX_POWER), OVERFLOW_SLOT - 1);
        assert_eq!(slot((1 << MAX_POWER) + 1), OVERFLOW_SLOT);
        assert_eq!(slot(u64::MAX), OVERFLOW_SLOT);
        assert_eq!(slot(0), ZERO_SLOT);
        assert_eq!(slot(1), 1);
        assert_eq!(slot_index(1), MIN_INDEX);
        assert_eq!(SLOTS, 323);
    }

    #[test]
    fn upper_seconds_matches_powers() {
        for i in MIN_INDEX..=MAX_INDEX {
            let want = 2f64.powf((i + 1) as f64 / 8.0);
            let got = upper_seconds(i);
            assert!(
                ((got - want) / want).abs() < 1e-12,
                "bucket {i}: {got} vs {want}"
            );
            assert!(upper_ns(i) as f64 <= got * 1e9 * (1.0 + 1e-15));
            assert!(upper_ns(i) as f64 + 1.0 > got * 1e9 * (1.0 - 1e-15));
        }
        assert_eq!(upper_seconds(7), 2.0);
    }

    #[test]
    fn downscale_merges_like_the_sdk() {
        // Indexes -3..=4 at scale 3 with counts 1..=8.
        let mut c = [1, 2, 3, 4, 5, 6, 7, 8u64];
        let (off, len) = downscale(-3, &mut c, 1);
        // -3>>1=-2, -2>>1=-1, -1>>1=-1, 0,1->0, 2,3->1, 4->2
        assert_eq!((off, len), (-2, 5));
        assert_eq!(&c[..len], &[1, 2 + 3, 4 + 5, 6 + 7, 8]);
        assert_eq!(c.iter().sum::<u64>(), 36);
        let n = (MAX_INDEX - MIN_INDEX + 1) as usize;
        let mut c = std::vec![5u64; n];
        let by = downscale_needed(MIN_INDEX, n, 170);
        let (off, len) = downscale(MIN_INDEX, &mut c, by);
        assert_eq!(by, 1);
        assert!(len <= 170);
        assert_eq!(off, MIN_INDEX >> 1);
        assert_eq!(c[..len].iter().sum::<u64>(), 5 * n as u64);
        assert_eq!(downscale_needed(0, 0, 10), 0);
        assert_eq!(downscale_needed(0, 10, 10), 0);
        assert_eq!(downscale_needed(0, 11, 10), 1);
    }

    #[test]
    fn classic_default_bounds_are_kernel_bounds() {
        assert!(CLASSIC_DEFAULT_POWERS.windows(2).all(|w| w[0] < w[1]));
        for k in CLASSIC_DEFAULT_POWERS {
            let i = index_of_power(k);
            assert_eq!(upper_seconds(i), pow2(k));
            let ns = upper_ns(i);
            assert_eq!(index(ns), i);
            assert_eq!(index(ns + 1), i + 1);
        }
    }
}
