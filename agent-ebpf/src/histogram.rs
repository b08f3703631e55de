//! The exponential bucket of a duration: [`agent_common::exp`] with its
//! seconds thresholds read from this object's `.rodata` copy.

use agent_common::exp;

/// `exp::BOUNDS_NS`, once for every program of the object (read-only data).
#[unsafe(no_mangle)]
static EXP_BOUNDS_NS: [u64; exp::BOUNDS_LEN] = exp::BOUNDS_NS;

/// The map slot of a duration of `ns` nanoseconds.
#[inline(always)]
pub fn slot(ns: u64) -> u32 {
    exp::slot_with(ns, &EXP_BOUNDS_NS)
}
