//! Drops family: packets the kernel dropped, by drop reason, or by L3
//! protocol where the kernel gives no reason.
//!
//! - Hook: `kfree_skb(struct sk_buff *skb, void *location[,
//!   enum skb_drop_reason reason[, struct sock *rx_sk]])` as `tp_btf`
//!   (preferred) or `raw_tp`. `reason` arrived in 5.17 (commit c504e5c2f964);
//!   `rx_sk` (6.10) is not read. Normal frees go to `consume_skb`, a separate
//!   tracepoint, and are not seen here; 5.19-6.1 kernels may still pass
//!   `SKB_CONSUMED` here, which userspace skips by name.
//! - Before 5.17 (`DROPS_CONFIG.no_reason`, a `.rodata` constant: the
//!   verifier of such a kernel never sees the third argument read) each
//!   drop counts by `skb->protocol` (IPv4, IPv6, other), read at the offset
//!   BTF gives. Those kernels also free some packets that were not dropped
//!   with `kfree_skb`; they count too, as userspace documents.
//! - Map: `DROPS_BY_REASON` (per-CPU array, one slot per reason, then the
//!   protocol slots).
//! - Metric: `perch.network.packet.drops{perch.drop.reason[, network.type]}`.
//! - Fallback: a fixed mapping of `/proc/net/snmp`, `/proc/net/netstat` and
//!   `/proc/net/softnet_stat` counters (see the collector).
//! - Oldest kernel: 5.5 (`tp_btf`); `raw_tp` 4.17 where BTF gives the
//!   layout, else 5.17 (without BTF it reads the reason); reasons from 5.17.
//!
//! Every reason is counted, `NOT_SPECIFIED` included: the filter is by name
//! in userspace, because reason numbers move between kernels and only BTF
//! says which number is which.

use agent_common::drops::{self as c, DropsConfig};
use aya_ebpf::{
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::PerCpuArray,
    programs::{BtfTracePointContext, RawTracePointContext},
};

use crate::kmem::field;

/// Filled in by userspace from kernel BTF (`.rodata`).
#[unsafe(no_mangle)]
static DROPS_CONFIG: DropsConfig = DropsConfig {
    no_reason: 0,
    protocol: 0,
};

#[map]
static DROPS_BY_REASON: PerCpuArray<u64> = PerCpuArray::with_max_entries(c::SLOTS, 0);

#[inline(always)]
fn on_kfree_skb<const BTF: bool>(skb: u64, reason: impl FnOnce() -> u64) -> u32 {
    // Volatile reads, so the compiler cannot fold the zero initializer.
    let no_reason = unsafe { core::ptr::read_volatile(&DROPS_CONFIG.no_reason) };
    let slot = if no_reason == 0 {
        c::slot((reason() & 0xffff_ffff) as u32)
    } else {
        match unsafe { core::ptr::read_volatile(&DROPS_CONFIG.protocol) } {
            0 => c::SLOT_PROTO_UNREAD,
            at => field::<u16, BTF>(skb, at).map_or(c::SLOT_PROTO_UNREAD, c::protocol_slot),
        }
    };
    if let Some(p) = DROPS_BY_REASON.get_ptr_mut(slot) {
        // Per-CPU slot: only this CPU writes it, with preemption disabled.
        unsafe { *p += 1 };
    }
    0
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn drops_kfree_skb_btf(ctx: BtfTracePointContext) -> u32 {
    on_kfree_skb::<true>(ctx.arg(0), || ctx.arg(2))
}

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn drops_kfree_skb_raw(ctx: RawTracePointContext) -> u32 {
    on_kfree_skb::<false>(ctx.arg(0), || ctx.arg(2))
}
