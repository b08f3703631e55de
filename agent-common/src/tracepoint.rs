//! Field offsets of the classic tracepoints Perch can attach to, read at
//! start-up from tracefs (`events/<category>/<name>/format`) and handed to
//! the programs as a read-only global: the record layout is the kernel's
//! own description, never a constant compiled in.

use crate::contract::GlobalSpec;

/// Name of the global (`.rodata`) holding [`TpOffsets`].
pub const GLOBAL_OFFSETS: &str = "TP_OFFSETS";

/// Every global userspace overrides for the classic tracepoints
/// ([`crate::contract`]).
pub const GLOBALS: &[GlobalSpec] = &[GlobalSpec::of::<TpOffsets>(GLOBAL_OFFSETS)];

/// Byte offsets into a classic tracepoint record. Zero means "unknown":
/// the tracepoint variants are used only when every offset was found.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TpOffsets {
    /// `sched:sched_switch` `prev_pid` (pid_t).
    pub switch_prev_pid: u32,
    /// `sched:sched_switch` `prev_state` (long; the report state, with the
    /// preempted case encoded above the low byte).
    pub switch_prev_state: u32,
    /// `sched:sched_switch` `next_pid` (pid_t).
    pub switch_next_pid: u32,
    /// `sched:sched_wakeup` and `sched:sched_wakeup_new` `pid` (pid_t).
    pub wakeup_pid: u32,
    /// `irq:softirq_entry` and `irq:softirq_exit` `vec` (unsigned int).
    pub softirq_vec: u32,
    /// Explicit padding.
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<TpOffsets>() == 24);

#[cfg(feature = "user")]
// SAFETY: repr(C), only u32 fields, no implicit padding.
unsafe impl aya::Pod for TpOffsets {}
