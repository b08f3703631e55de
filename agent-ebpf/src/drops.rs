//! Drops family: packets the kernel dropped, by drop reason.
//!
//! - Hook: `kfree_skb(struct sk_buff *skb, void *location,
//!   enum skb_drop_reason reason[, struct sock *rx_sk])` as `tp_btf`
//!   (preferred) or `raw_tp`. `reason` arrived in 5.17 (commit c504e5c2f964);
//!   `rx_sk` (6.10) is not read. Normal frees go to `consume_skb`, a separate
//!   tracepoint, and are not seen here; 5.19-6.1 kernels may still pass
//!   `SKB_CONSUMED` here, which userspace skips by name.
//! - Map: `DROPS_BY_REASON` (per-CPU array, one slot per reason).
//! - Metric: `perch.network.packet.drops{perch.drop.reason}`.
//! - Fallback: a fixed mapping of `/proc/net/snmp`, `/proc/net/netstat` and
//!   `/proc/net/softnet_stat` counters (see the collector).
//! - Oldest kernel: 5.17.
//!
//! Every reason is counted, `NOT_SPECIFIED` included: the filter is by name
//! in userspace, because reason numbers move between kernels and only BTF
//! says which number is which.

use agent_common::drops as c;
use aya_ebpf::{
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::PerCpuArray,
    programs::{BtfTracePointContext, RawTracePointContext},
};

#[map]
static DROPS_BY_REASON: PerCpuArray<u64> = PerCpuArray::with_max_entries(c::SLOTS, 0);

#[inline(always)]
fn on_kfree_skb(reason: u64) -> u32 {
    let slot = c::slot((reason & 0xffff_ffff) as u32);
    if let Some(p) = DROPS_BY_REASON.get_ptr_mut(slot) {
        // Per-CPU slot: only this CPU writes it, with preemption disabled.
        unsafe { *p += 1 };
    }
    0
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn drops_kfree_skb_btf(ctx: BtfTracePointContext) -> u32 {
    on_kfree_skb(ctx.arg(2))
}

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn drops_kfree_skb_raw(ctx: RawTracePointContext) -> u32 {
    on_kfree_skb(ctx.arg(2))
}
