//! Exponential (OpenTelemetry / Prometheus native) histogram bucketing at a
//! fixed scale, shared by the kernel and userspace (issue 13).
//!
//! Scale [`SCALE`] = 3: base `2^(1/8)`, eight buckets per power of two. OTel
//! bucket `i` covers `(base^i, base^(i+1)]` (upper-inclusive). Values are
//! integer nanoseconds, so the integer bucket of `v >= 1` is
//! `max { i : base^i < v }`, i.e. `ceil(8 * log2 v) - 1`. With
//! `B(m) = floor(base^m)` that is exactly `max { m : B(m) < v }`: `base^m` is
//! irrational unless `8 | m`, so `base^m < v` iff `B(m) < v`. Bucket `i` holds
//! the integers `B(i) + 1 ..= B(i + 1)` (empty for a few tiny `i`).
//!
//! The index is computed without floating point or loops (the verifier needs
//! bounded code): a leading-zero count gives the power `k`, the value is
//! shifted so its top bit is bit 63, and seven unrolled compares against
//! `floor(2^(63 + j/8))` give the sub-bucket. For `x = v << (63 - k)`,
//! `v > 2^(k + j/8)` iff `x > 2^(63 + j/8)` iff `x > floor(2^(63 + j/8))`,
//! so the compares are exact.
//!
//! Tracked range: indexes [`MIN_INDEX`] ..= [`MAX_INDEX`], i.e. 1 ns up to
//! `2^36` ns (about 68.7 s). `0` goes to the zero bucket, values above
//! `2^36` to the overflow slot; both are counted, never dropped.

/// The OpenTelemetry / Prometheus native-histogram scale (schema).
pub const SCALE: i32 = 3;
/// The smallest tracked index: bucket `(2^(-1/8), 1]`, which holds 1 ns.
pub const MIN_INDEX: i32 = -1;
/// The largest tracked power of two: values up to `2^36` ns.
pub const MAX_POWER: u32 = 36;
/// The largest tracked index: bucket `(2^(36 - 1/8), 2^36]`.
pub const MAX_INDEX: i32 = (MAX_POWER as i32) * 8 - 1;
/// Slot holding the count of zero values.
pub const ZERO_SLOT: u32 = 0;
/// Slot holding the count of values above `2^MAX_POWER` ns.
pub const OVERFLOW_SLOT: u32 = (MAX_INDEX - MIN_INDEX) as u32 + 2;
/// The number of map slots: zero, every tracked index, overflow.
pub const SLOTS: u32 = OVERFLOW_SLOT + 1;

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

/// The OTel index (scale 3) of `value >= 1` ns. `value` must be non-zero.
#[inline(always)]
pub const fn index(value: u64) -> i32 {
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

/// The map slot for `value` ns: [`ZERO_SLOT`], `index - MIN_INDEX + 1`, or
/// [`OVERFLOW_SLOT`].
#[inline(always)]
pub const fn slot(value: u64) -> u32 {
    if value == 0 {
        return ZERO_SLOT;
    }
    if value > 1 << MAX_POWER {
        return OVERFLOW_SLOT;
    }
    (index(value) - MIN_INDEX + 1) as u32
}

/// The OTel index held by `slot` (only for `1 ..= OVERFLOW_SLOT - 1`).
pub const fn slot_index(slot: u32) -> i32 {
    slot as i32 - 1 + MIN_INDEX
}

/// `floor(base^m)` in ns for `m >= -8`: the largest integer not above
/// `2^(m/8)`. Bucket `m` holds the integers `floor_pow(m) + 1 ..= floor_pow(m + 1)`.
pub const fn floor_pow(m: i32) -> u64 {
    if m < 0 {
        return 0;
    }
    let k = (m / 8) as u32;
    let j = (m % 8) as usize;
    if j == 0 {
        return 1 << k;
    }
    // floor(2^(k + j/8)) = floor(floor(2^(63 + j/8)) / 2^(63 - k)) for k <= 63.
    THRESHOLDS[j - 1] >> (63 - k)
}

/// The largest integer ns in bucket `index` (inclusive upper bound).
pub const fn upper_ns(index: i32) -> u64 {
    floor_pow(index + 1)
}

/// The exact upper bound of bucket `index` in seconds, `base^(index+1) / 1e9`.
/// Used for explicit (classic) boundaries: every integer value `<= upper_ns`
/// is in a bucket `<= index`, so the cumulative count at this bound is exact.
pub fn upper_seconds(index: i32) -> f64 {
    // 2^((index+1)/8) computed as 2^q * 2^(r/8) from the exact thresholds.
    let m = index + 1;
    let q = m.div_euclid(8);
    let r = m.rem_euclid(8) as usize;
    let frac = if r == 0 {
        1.0
    } else {
        THRESHOLDS[r - 1] as f64 / (1u64 << 63) as f64
    };
    frac * pow2(q) / 1e9
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
/// `offset .. offset + len` into `max_buckets` (at least 1) buckets.
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
/// bounds at `2^k` ns for these `k`, 1.024 µs to 0.537 s, plus `+Inf`:
/// 20 finite bounds. Each `2^k` ns is the exact upper bound of kernel bucket
/// `8k - 1`, so cumulative counts are exact sums of kernel buckets.
pub const CLASSIC_DEFAULT_POWERS: core::ops::RangeInclusive<u32> = 10..=29;

/// The kernel bucket whose upper bound is `2^k` ns.
pub const fn index_of_power(k: u32) -> i32 {
    (k as i32) * 8 - 1
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
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

    /// Compares a big integer against `2^e`.
    fn cmp_pow2(a: &[u64], e: u32) -> core::cmp::Ordering {
        let mut b = std::vec![0u64; a.len().max(e as usize / 64 + 1)];
        b[e as usize / 64] = 1 << (e % 64);
        let mut a = a.to_vec();
        a.resize(b.len(), 0);
        a.iter().rev().cmp(b.iter().rev())
    }

    #[test]
    fn thresholds_are_exact_floors() {
        for (j, &t) in THRESHOLDS.iter().enumerate() {
            let e = 504 + j as u32 + 1;
            assert_eq!(
                cmp_pow2(&pow8(t), e),
                core::cmp::Ordering::Less,
                "t{j}^8 < 2^{e}"
            );
            assert_eq!(
                cmp_pow2(&pow8(t + 1), e),
                core::cmp::Ordering::Greater,
                "(t{j}+1)^8 > 2^{e}"
            );
        }
    }

    /// Exact reference: the index of `v` is the largest `m` with
    /// `2^m < v^8` (i.e. `base^m < v`), by big-integer comparison.
    fn reference_index(v: u64) -> i32 {
        let p = pow8(v);
        let mut m = -1;
        while cmp_pow2(&p, (m + 1) as u32) == core::cmp::Ordering::Greater {
            m += 1;
        }
        m
    }

    #[test]
    fn every_boundary_agrees_with_the_exact_reference() {
        for m in 0..=MAX_INDEX + 1 {
            let b = floor_pow(m);
            for v in [b.saturating_sub(1), b, b + 1, b + 2] {
                if v == 0 || v > 1 << MAX_POWER {
                    continue;
                }
                assert_eq!(index(v), reference_index(v), "value {v} near boundary {m}");
            }
        }
    }

    #[test]
    fn small_values_match_reference() {
        for v in 1..5000u64 {
            assert_eq!(index(v), reference_index(v), "value {v}");
        }
    }

    #[test]
    fn buckets_are_contiguous_and_upper_inclusive() {
        assert_eq!(index(1), -1);
        assert_eq!(index(2), 7);
        assert_eq!(index(3), 12);
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
        assert_eq!(SLOTS, 291);
    }

    #[test]
    fn upper_seconds_matches_powers() {
        for i in MIN_INDEX..=MAX_INDEX {
            let want = 2f64.powf((i + 1) as f64 / 8.0) / 1e9;
            let got = upper_seconds(i);
            assert!(
                ((got - want) / want).abs() < 1e-12,
                "bucket {i}: {got} vs {want}"
            );
            assert!(upper_ns(i) as f64 <= got * 1e9 * (1.0 + 1e-15));
        }
        assert_eq!(upper_seconds(7), 2e-9);
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
        let mut c = [5u64; 289];
        let by = downscale_needed(MIN_INDEX, 289, 160);
        let (off, len) = downscale(MIN_INDEX, &mut c, by);
        assert_eq!(by, 1);
        assert!(len <= 160);
        assert_eq!(off, -1);
        assert_eq!(c[..len].iter().sum::<u64>(), 5 * 289);
        assert_eq!(downscale_needed(0, 0, 10), 0);
        assert_eq!(downscale_needed(0, 10, 10), 0);
        assert_eq!(downscale_needed(0, 11, 10), 1);
    }

    #[test]
    fn classic_default_bounds_are_kernel_bounds() {
        assert_eq!(CLASSIC_DEFAULT_POWERS.count(), 20);
        for k in CLASSIC_DEFAULT_POWERS {
            let i = index_of_power(k);
            assert_eq!(upper_ns(i), 1 << k);
            assert_eq!(index(1 << k), i);
            assert_eq!(index((1 << k) + 1), i + 1);
            assert_eq!(upper_seconds(i), (1u64 << k) as f64 / 1e9);
        }
    }
}
