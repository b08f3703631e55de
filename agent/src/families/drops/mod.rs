//! Drops family: packets the kernel dropped, by reason.
//!
//! - Hook (kernel side `agent-ebpf/src/drops.rs`): `kfree_skb` as `tp_btf`
//!   or `raw_tp`, reading its `reason` argument (5.17+), counted per reason
//!   in a per-CPU array.
//! - Metric: `perch.network.packet.drops{perch.drop.reason}`, a counter
//!   (see `collector.rs`).
//! - Fallback: the protocol counters of [`FALLBACK`], each mapped to the
//!   kernel reason that the same code path passes to `kfree_skb_reason`, and
//!   `/proc/net/softnet_stat` `dropped` as `cpu_backlog`. It misses drops no
//!   counter records (netfilter, qdisc, TCP segments to closed ports,
//!   IPv6 UDP to closed ports: that one is in `/proc/net/snmp6`).
//! - Oldest kernel: 5.17 (eBPF); any (fallback).

mod collector;
pub mod softnet;

use crate::gate::rules::{p, Hook, Rule, Variant};

use super::{BuildCtx, BuildError, ProbeConfig, Unit};

pub use collector::{
    fallback_values, reason_name, reason_names, FallbackCounter, ATTR_REASON, FALLBACK,
    SOFTNET_REASON,
};

/// `[probes.drops]`.
pub type Config = ProbeConfig;

pub const RULE: Rule = Rule {
    variants: &[
        // `kfree_skb` gained its `reason` argument in 5.17 (commit
        // c504e5c2f964, "net: skb: introduce kfree_skb_reason()"); `rx_sk`
        // was appended in 6.10 and is not read. Before 5.17 `tp_btf` fails
        // the verifier on the third argument, and `raw_tp` fails to attach
        // (its context is larger than the tracepoint's).
        Variant {
            hook: Hook::TpBtf,
            programs: &[p("drops_kfree_skb_btf", "kfree_skb")],
            min_kernel: (5, 17),
            needs_btf: true,
        },
        Variant {
            hook: Hook::RawTp,
            programs: &[p("drops_kfree_skb_raw", "kfree_skb")],
            min_kernel: (5, 17),
            needs_btf: false,
        },
    ],
    fallback: Some(
        "/proc/net/snmp, /proc/net/netstat, /proc/net/softnet_stat \
         (a fixed mapping of drop counters to reasons)",
    ),
    fallback_loses: "drops that no protocol counter records (e.g. netfilter \
                     and qdisc drops) and the kernel's exact reason names",
};

pub struct Drops;
pub static UNIT: Drops = Drops;

impl Unit for Drops {
    fn rule(&self) -> &'static Rule {
        &RULE
    }

    fn build(
        &self,
        ctx: &mut BuildCtx<'_>,
    ) -> Result<Box<dyn crate::collectors::Collector>, BuildError> {
        Ok(Box::new(collector::DropsCollector::new(ctx)?))
    }
}
