//! The exponential bucket of a duration: [`agent_common::exp`] with its
//! lookup tables read from this object's `.rodata` copy.

use agent_common::exp;

/// `exp::TABLES`, once for every program of the object (read-only data).
#[unsafe(no_mangle)]
static EXP_TABLES: exp::Tables = exp::TABLES;

/// The map slot of a duration of `ns` nanoseconds.
#[inline(always)]
pub fn slot(ns: u64) -> u32 {
    exp::slot_with(ns, &EXP_TABLES)
}
