//! Softirq family: time spent in each softirq vector, per CPU.
//!
//! - Hooks: `softirq_entry`, `softirq_exit` as `tp_btf` (5.5+), `raw_tp`
//!   (4.17+) or a classic tracepoint (tracefs, 4.7+; `vec` at the offset
//!   the format file gives). All take `unsigned int vec_nr`.
//! - Maps: `SOFTIRQ_START` (per-CPU, 1 slot), `SOFTIRQ_TIME` (per-CPU, one
//!   slot per vector).
//! - Metric: `perch.cpu.softirq.time`. (`perch.cpu.softirq.count` comes from
//!   `/proc/softirqs` in every mode.)
//! - Fallback: none for the per-vector time; the family's procfs mode keeps
//!   the counts only.
//! - Oldest kernel: 4.17.
//!
//! Softirqs do not nest on one CPU, so one start slot per CPU is enough.

use agent_common::softirq as c;
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::PerCpuArray,
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};

use crate::tracepoint::tp_offset;

/// Classic tracepoint record offsets, from tracefs (see `tracepoint.rs`).
#[unsafe(no_mangle)]
static SOFTIRQ_TP_OFFSETS: c::TpOffsets = c::TpOffsets { vec: 0, _pad: 0 };

#[map]
static SOFTIRQ_START: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static SOFTIRQ_TIME: PerCpuArray<u64> = PerCpuArray::with_max_entries(c::NR_SOFTIRQS, 0);

#[inline(always)]
fn on_entry() -> u32 {
    if let Some(p) = SOFTIRQ_START.get_ptr_mut(0) {
        unsafe { *p = bpf_ktime_get_ns() };
    }
    0
}

#[inline(always)]
fn on_exit(vec: u64) -> u32 {
    let Some(start) = SOFTIRQ_START.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot, written only by this CPU with preemption off.
    let begun = unsafe { *start };
    if begun == 0 {
        // Attached mid-softirq: no start to measure from.
        return 0;
    }
    unsafe { *start = 0 };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(t) = SOFTIRQ_TIME.get_ptr_mut((vec & 0xffff_ffff) as u32) {
        unsafe { *t += now.saturating_sub(begun) };
    }
    0
}

#[btf_tracepoint(function = "softirq_entry")]
pub fn softirq_entry_btf(_ctx: BtfTracePointContext) -> u32 {
    on_entry()
}

#[raw_tracepoint(tracepoint = "softirq_entry")]
pub fn softirq_entry_raw(_ctx: RawTracePointContext) -> u32 {
    on_entry()
}

#[btf_tracepoint(function = "softirq_exit")]
pub fn softirq_exit_btf(ctx: BtfTracePointContext) -> u32 {
    on_exit(ctx.arg(0))
}

#[raw_tracepoint(tracepoint = "softirq_exit")]
pub fn softirq_exit_raw(ctx: RawTracePointContext) -> u32 {
    on_exit(ctx.arg(0))
}

#[tracepoint(category = "irq", name = "softirq_entry")]
pub fn softirq_entry_tp(_ctx: TracePointContext) -> u32 {
    on_entry()
}

#[tracepoint(category = "irq", name = "softirq_exit")]
pub fn softirq_exit_tp(ctx: TracePointContext) -> u32 {
    let offset = tp_offset!(SOFTIRQ_TP_OFFSETS, vec);
    // SAFETY: offset from this kernel's own format file.
    match unsafe { ctx.read_at::<u32>(offset) } {
        Ok(vec) => on_exit(u64::from(vec)),
        Err(_) => 0,
    }
}
