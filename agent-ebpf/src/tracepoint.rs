//! Reading the record offsets of classic tracepoints, which each family
//! receives from tracefs at start-up as a global of its own
//! (`agent_common::sched::TpOffsets`, `agent_common::softirq::TpOffsets`).
//! All zero unless the loader found them; the tracepoint variants are only
//! tried when it did.

/// One field of a family's offsets global, read so the compiler cannot fold
/// the all-zero initializer.
macro_rules! tp_offset {
    ($global:path, $field:ident) => {
        // SAFETY: a valid, aligned static.
        unsafe { core::ptr::read_volatile(&$global.$field) as usize }
    };
}
pub(crate) use tp_offset;
