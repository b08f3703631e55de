//! Range checks shared by the config and the families' config sections.

use std::fmt::Display;
use std::ops::RangeInclusive;

/// `Ok` when `v` is in `range`, else the message config errors carry.
pub fn check_range<T: PartialOrd + Display>(v: T, range: &RangeInclusive<T>) -> Result<(), String> {
    if range.contains(&v) {
        Ok(())
    } else {
        Err(format!(
            "must be between {} and {} (got {v})",
            range.start(),
            range.end()
        ))
    }
}
