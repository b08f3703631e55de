//! Softirq family: time spent per softirq vector.

use crate::contract::{GlobalSpec, MapSpec};

/// Per-CPU array of `u64` nanoseconds spent in each vector, indexed by vector.
pub const MAP_TIME: &str = "SOFTIRQ_TIME";
/// Per-CPU array with one slot: when the current softirq started (ns).
pub const MAP_START: &str = "SOFTIRQ_START";

/// `NR_SOFTIRQS` in `include/linux/interrupt.h`, stable since 4.1 (when
/// `IRQ_POLL` replaced `BLOCK_IOPOLL`).
pub const NR_SOFTIRQS: u32 = 10;

/// Every map of the family's kernel side ([`crate::contract`]).
pub const MAPS: &[MapSpec] = &[
    MapSpec::per_cpu_array::<u64>(MAP_TIME, NR_SOFTIRQS),
    MapSpec::per_cpu_array::<u64>(MAP_START, 1),
];

/// The vector names as `/proc/softirqs` prints them, lower-cased, by index.
pub const VECTOR_NAMES: [&str; NR_SOFTIRQS as usize] = [
    "hi", "timer", "net_tx", "net_rx", "block", "irq_poll", "tasklet", "sched", "hrtimer", "rcu",
];

/// Global (`.rodata`) holding [`TpOffsets`].
pub const GLOBAL_TP_OFFSETS: &str = "SOFTIRQ_TP_OFFSETS";

/// Every global userspace overrides ([`crate::contract`]).
pub const GLOBALS: &[GlobalSpec] = &[GlobalSpec::of::<TpOffsets>(GLOBAL_TP_OFFSETS)];

/// Byte offsets into the classic `irq:softirq_entry`/`irq:softirq_exit`
/// records, from tracefs at start-up (see `sched::TpOffsets`). Zero means
/// unknown: the tracepoint variant is tried only when it was found.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TpOffsets {
    /// `vec` (unsigned int), the same in both records.
    pub vec: u32,
    /// Explicit padding.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<TpOffsets>() == 8);

#[cfg(feature = "user")]
// SAFETY: repr(C), only u32 fields, no implicit padding.
unsafe impl aya::Pod for TpOffsets {}
