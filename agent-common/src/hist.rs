//! Log-linear ("H2") histogram bucketing shared by the kernel and userspace.
//!
//! The kernel computes a bucket index from a value in nanoseconds and bumps a
//! per-CPU counter; userspace turns indexes back into exact bucket bounds. Both
//! sides use these functions, so the exported buckets are exactly the kernel's:
//! nothing is re-binned.
//!
//! Values below `2^(GROUPING_POWER + 1)` get one bucket each. Above that, each
//! power of two is split into `2^GROUPING_POWER` equal buckets, so the relative
//! width of a bucket is at most `1 / 2^GROUPING_POWER` (12.5 %). Values at or
//! above `2^(MAX_POWER + 1)` land in the last bucket.

/// Each power of two is split into `2^GROUPING_POWER` buckets.
pub const GROUPING_POWER: u32 = 3;
/// The largest tracked power of two: values up to `2^36 - 1` ns (about 68.7 s).
pub const MAX_POWER: u32 = 35;
/// The number of buckets.
pub const BUCKETS: u32 = (MAX_POWER - GROUPING_POWER + 2) << GROUPING_POWER;

/// The bucket index for `value`.
#[inline(always)]
pub const fn bucket_index(value: u64) -> u32 {
    if value < (1 << (GROUPING_POWER + 1)) {
        return value as u32;
    }
    if value >= (1u64 << (MAX_POWER + 1)) {
        return BUCKETS - 1;
    }
    let power = 63 - value.leading_zeros();
    let log_bin = power - GROUPING_POWER;
    let offset = (value >> log_bin) as u32;
    (log_bin << GROUPING_POWER) + offset
}

/// The smallest value that falls into bucket `index`.
pub const fn bucket_lower(index: u32) -> u64 {
    if index < (1 << (GROUPING_POWER + 1)) {
        return index as u64;
    }
    let log_bin = (index >> GROUPING_POWER) - 1;
    let offset = (index & ((1 << GROUPING_POWER) - 1)) as u64 | (1 << GROUPING_POWER);
    offset << log_bin
}

/// The largest value that falls into bucket `index` (inclusive), or `u64::MAX`
/// for the last bucket, which also holds every larger value.
pub const fn bucket_upper(index: u32) -> u64 {
    if index + 1 >= BUCKETS {
        u64::MAX
    } else {
        bucket_lower(index + 1) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_are_exact() {
        for v in 0..16u64 {
            assert_eq!(bucket_index(v) as u64, v);
            assert_eq!(bucket_lower(v as u32), v);
            assert_eq!(bucket_upper(v as u32), v);
        }
    }

    #[test]
    fn bounds_round_trip_and_are_contiguous() {
        for i in 0..BUCKETS - 1 {
            let lo = bucket_lower(i);
            let hi = bucket_upper(i);
            assert!(lo <= hi, "bucket {i}: {lo} > {hi}");
            assert_eq!(bucket_index(lo), i, "lower bound of {i}");
            assert_eq!(bucket_index(hi), i, "upper bound of {i}");
            assert_eq!(bucket_lower(i + 1), hi + 1, "gap after bucket {i}");
        }
    }

    #[test]
    fn relative_width_is_bounded() {
        for i in 16..BUCKETS - 1 {
            let lo = bucket_lower(i) as f64;
            let hi = bucket_upper(i) as f64 + 1.0;
            assert!((hi - lo) / lo <= 0.125 + 1e-12, "bucket {i} too wide");
        }
    }

    #[test]
    fn huge_values_saturate() {
        assert_eq!(bucket_index(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_index(1 << 36), BUCKETS - 1);
        // The last bucket is the top eighth of 2^35..2^36 and everything above.
        assert_eq!(bucket_index((1 << 36) - 1), BUCKETS - 1);
        assert_eq!(bucket_index((15 << 32) - 1), BUCKETS - 2);
        assert_eq!(bucket_lower(BUCKETS - 1), 15 << 32);
        assert_eq!(BUCKETS, 272);
    }
}
