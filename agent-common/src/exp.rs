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
//! `T(m) = floor(1e9 * 2^(m/8))` ([`threshold_ns`]): for an integer `v`,
//! `v > R` iff `v > floor(R)`, for any real `R`. Big-integer tests check
//! every threshold and every boundary.
//!
//! The index is computed without floating point and without a loop (the
//! verifier wants bounded code). `8 * log2(1e9) = 239.18` is not an
//! integer, but both spacings are 2^(1/8), so the seconds boundaries sit at
//! the **same eight mantissa positions in every power of two of
//! nanoseconds**: inside `[2^k, 2^(k+1))` ns they are `2^k * 2^(0.0224 +
//! j/8)`, `j = 0..8`. So:
//! 1. a leading-zero count gives the power `k`, and the value is shifted so
//!    its top bit is bit 63 (`x`);
//! 2. the next four bits pick one of 16 equal segments of the octave; each
//!    holds at most one of the eight boundaries (they are at least 0.092
//!    apart, a segment is 0.0625 wide). A 16-entry table gives the number
//!    of boundaries below the segment, and a second one the boundary inside
//!    it (normalised to bit 63, floored: exact for integer `x`);
//! 3. the index is `8k - 240 + below + (x > boundary)`.
//!
//! Two table loads and one compare after the leading-zero count; the
//! kernel keeps the tables in `.rodata`.
//!
//! Tracked range: 1 ns up to `2^40` ns (about 18 min), indexes
//! [`MIN_INDEX`] ..= [`MAX_INDEX`]. `0` goes to the zero bucket, values
//! above `2^40` ns to the overflow slot; both are counted, never dropped.

/// The OpenTelemetry / Prometheus native-histogram scale (schema).
pub const SCALE: i32 = 3;
/// The largest tracked value is `2^MAX_POWER` ns.
pub const MAX_POWER: u32 = 40;
/// The smallest tracked index: bucket `(2^-30, 2^-29.875]` s, which holds 1 ns.
pub const MIN_INDEX: i32 = -240;
/// The largest tracked index: the bucket of `2^MAX_POWER` ns.
pub const MAX_INDEX: i32 = (MAX_POWER as i32) * 8 - 240;
/// Slot holding the count of zero values.
pub const ZERO_SLOT: u32 = 0;
/// Slot holding the count of values above `2^MAX_POWER` ns.
pub const OVERFLOW_SLOT: u32 = (MAX_INDEX - MIN_INDEX) as u32 + 2;
/// The number of map slots: zero, every tracked index, overflow.
pub const SLOTS: u32 = OVERFLOW_SLOT + 1;

/// The kernel's `.rodata` copy of [`TABLES`]. Never overridden: it is
/// listed so the object check sees every global the object defines.
pub const GLOBAL_TABLES: &str = "EXP_TABLES";

/// The object's histogram globals (no maps: each family owns its histograms).
pub const GLOBALS: &[crate::contract::GlobalSpec] =
    &[crate::contract::GlobalSpec::of::<Tables>(GLOBAL_TABLES)];

/// `floor(2^(63 + j/8))` for `j = 1..=7`. Checked exactly (big-integer
/// 8th powers) in the tests.
const THRESHOLDS: [u64; 7] = [
    0x8b95_c1e3_ea8b_d6e6,
    0x9837_f051_8db8_a96f,
    0xa5fe_d6a9_b151_38ea,
    0xb504_f333_f9de_6484,
    0xc567_2a11_5506_dadd,
    0xd744_fcca_d69d_6af4,
    0xeac0_c6e7_dd24_392e,
];

/// `floor(1e9 * 2^(63 + (j - 239)/8))` for `j = 0..8`: the seconds
/// boundaries inside any power of two of nanoseconds, normalised to bit
/// 63. Checked exactly in the tests. (The last is `1e9 * 2^34`, exact.)
const OCTAVE_BOUNDS: [u64; 8] = [
    0x81ff_a7a9_549c_a6e3,
    0x8dc3_b896_0164_a7d9,
    0x9a98_6705_4d51_2391,
    0xa896_5f74_bf06_5071,
    0xb7d8_8a12_d0dd_9ea0,
    0xc87c_3e7d_03cd_bec3,
    0xdaa1_7c2c_d195_55db,
    0xee6b_2800_0000_0000,
];

/// The lookup tables of [`index_with`], by segment `s` (bits 62..59 of
/// the normalised value): boundaries below the segment, and the boundary
/// inside it (`u64::MAX` when there is none).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tables {
    pub bound: [u64; 16],
    pub below: [u32; 16],
}
const _: () = assert!(core::mem::size_of::<Tables>() == 192);

/// The tables, built from [`OCTAVE_BOUNDS`] at compile time.
pub const TABLES: Tables = tables();

const fn tables() -> Tables {
    let mut t = Tables {
        bound: [u64::MAX; 16],
        below: [0; 16],
    };
    let mut s = 0;
    while s < 16 {
        let start = (1u64 << 63) + ((s as u64) << 59);
        let end = start.wrapping_add(1 << 59); // 0 after the last segment
        let mut j = 0;
        while j < 8 {
            let b = OCTAVE_BOUNDS[j];
            if b < start {
                t.below[s] += 1;
            } else if end == 0 || b < end {
                t.bound[s] = b;
            }
            j += 1;
        }
        s += 1;
    }
    t
}

/// `floor(1e9 * 2^(m/8))`: the largest integer ns at or below the seconds
/// boundary `2^(m/8)` s. For bounds and tests, not for the kernel.
pub const fn threshold_ns(m: i32) -> u64 {
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

/// The OTel index (scale 3, seconds) of `1 ..= 2^MAX_POWER` ns, from the
/// tables `t` (the kernel passes its `.rodata` copy of [`TABLES`]).
#[inline(always)]
pub fn index_with(value: u64, t: &Tables) -> i32 {
    let k = 63 - value.leading_zeros();
    let x = value << (63 - k);
    let s = ((x >> 59) & 15) as usize;
    (k as i32) * 8 - 240 + t.below[s] as i32 + (x > t.bound[s]) as i32
}

/// The OTel index (scale 3, seconds) of `1 ..= 2^MAX_POWER` ns.
pub fn index(value: u64) -> i32 {
    index_with(value, &TABLES)
}

/// The map slot for `value` ns, with tables `t`: [`ZERO_SLOT`],
/// `index - MIN_INDEX + 1`, or [`OVERFLOW_SLOT`].
#[inline(always)]
pub fn slot_with(value: u64, t: &Tables) -> u32 {
    if value == 0 {
        return ZERO_SLOT;
    }
    if value > 1 << MAX_POWER {
        return OVERFLOW_SLOT;
    }
    (index_with(value, t) - MIN_INDEX + 1) as u32
}

/// The map slot for `value` ns.
pub fn slot(value: u64) -> u32 {
    slot_with(value, &TABLES)
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
/// bucket from 1.9 µs to 0.98 ms, where run-queue waits and LAN round
/// trips live, then two octaves per bucket up to 1 s (3.9, 15.6, 62.5,
/// 250 ms, 1 s) for WAN round trips and retried connects: 15 finite bounds,
/// so 2 µs to 1 s in 18 series per histogram. `2^k` s is the exact upper
/// bound of kernel bucket `8k - 1`, so cumulative counts are exact sums of
/// kernel buckets.
pub const CLASSIC_DEFAULT_POWERS: [i32; 15] = [
    -19, -18, -17, -16, -15, -14, -13, -12, -11, -10, -8, -6, -4, -2, 0,
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
    }

    #[test]
    fn octave_bounds_are_exact_floors_and_each_segment_holds_at_most_one() {
        let giga8 = pow8(1_000_000_000);
        for (j, &u) in OCTAVE_BOUNDS.iter().enumerate() {
            // u^8 <= 1e72 * 2^(504 + j - 239) < (u+1)^8
            let e = 504 + j as u32 - 239;
            assert_ne!(
                cmp(&pow8(u), &shl(&giga8, e)),
                Ordering::Greater,
                "U{j} too big"
            );
            assert_eq!(
                cmp(&pow8(u + 1), &shl(&giga8, e)),
                Ordering::Greater,
                "U{j} too small"
            );
        }
        let inside: u32 = TABLES.bound.iter().filter(|&&b| b != u64::MAX).count() as u32;
        assert_eq!(inside, 8, "every boundary is in one segment: {TABLES:?}");
        assert_eq!(TABLES.below[0], 0);
        assert_eq!(TABLES.below[15] + (TABLES.bound[15] != u64::MAX) as u32, 8);
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

    /// Against the exact thresholds (themselves checked above) on a million
    /// pseudo-random values spread over every power of two of the range.
    #[test]
    fn random_values_match_the_thresholds() {
        let thresholds: Vec<u64> = (MIN_INDEX..=MAX_INDEX + 1).map(threshold_ns).collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = (x >> 58) % MAX_POWER as u64;
            let v = (x & ((1 << k) - 1)) | (1 << k);
            // The largest m with T(m) < v.
            let want = MIN_INDEX - 1 + thresholds.partition_point(|&t| t < v) as i32;
            assert_eq!(index(v), want, "value {v}");
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
