//! Record offsets of the classic tracepoints, from tracefs at start-up (see
//! `agent_common::tracepoint`). All zero unless the loader found them; the
//! tracepoint variants are only planned when it did.

use agent_common::tracepoint::TpOffsets;

#[unsafe(no_mangle)]
pub(crate) static TP_OFFSETS: TpOffsets = TpOffsets {
    switch_prev_pid: 0,
    switch_prev_state: 0,
    switch_next_pid: 0,
    wakeup_pid: 0,
    softirq_vec: 0,
    _pad: 0,
};

/// One field of [`TP_OFFSETS`], read so the compiler cannot fold the
/// all-zero initializer.
macro_rules! tp_offset {
    ($field:ident) => {
        // SAFETY: a valid, aligned static.
        unsafe { core::ptr::read_volatile(&crate::tracepoint::TP_OFFSETS.$field) as usize }
    };
}
pub(crate) use tp_offset;
