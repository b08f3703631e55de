//! Drops family: packets the kernel dropped, by reason.
//!
//! - Hook (kernel side `agent-ebpf/src/drops.rs`): `kfree_skb` as `tp_btf`
//!   or `raw_tp`, reading its `reason` argument (5.17+), counted per reason
//!   in a per-CPU array. Where `kfree_skb` has no reason (before 5.17, as
//!   BTF shows, or `probes.drops.by = "protocol"`) the programs count by
//!   `skb->protocol` instead.
//! - Metric: `perch.network.packet.drops{perch.drop.reason}`, a counter
//!   (see `collector.rs`); `perch.drop.reason = "unknown"` with
//!   `network.type` where the kernel gives no reason.
//! - Fallback: the protocol counters of [`FALLBACK`], each mapped to the
//!   kernel reason that the same code path passes to `kfree_skb_reason`, and
//!   `/proc/net/softnet_stat` `dropped` as `cpu_backlog`. It misses drops no
//!   counter records (netfilter, qdisc, TCP segments to closed ports,
//!   IPv6 UDP to closed ports: that one is in `/proc/net/snmp6`).
//! - Oldest kernel: 5.5 (`tp_btf`; by protocol before 5.17), 5.17
//!   (`raw_tp`, which without BTF cannot tell); any (fallback).

mod collector;
pub mod softnet;

use agent_common::drops::{self as c, DropsConfig};
use serde::Deserialize;

use crate::gate::rules::{p, Hook, Rule, Variant};
use crate::gate::Mode;
use crate::sources::btf::KernelBtf;

use super::{BuildCtx, BuildError, PrepareCtx, Prepared, Section, Unit};

pub use collector::{
    fallback_values, reason_name, reason_names, FallbackCounter, ATTR_NETWORK_TYPE, ATTR_REASON,
    FALLBACK, REASON_UNKNOWN, SOFTNET_REASON,
};

/// `[probes.drops]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `auto`, `ebpf`, `procfs` or `off`. Default `auto`.
    pub mode: Mode,
    /// What eBPF drops are counted by. Default `auto`.
    pub by: By,
}

impl Section for Config {
    fn mode(&self) -> Mode {
        self.mode
    }
    fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }
}

/// `probes.drops.by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum By {
    /// The kernel's drop reason where `kfree_skb` passes one (5.17+), else
    /// the packet's L3 protocol.
    #[default]
    Auto,
    /// Always the L3 protocol, as kernels before 5.17 must: for testing
    /// that path on a newer kernel.
    Protocol,
}

pub const RULE: Rule = Rule {
    variants: &[
        // `kfree_skb` gained its `reason` argument in 5.17 (commit
        // c504e5c2f964, "net: skb: introduce kfree_skb_reason()"); `rx_sk`
        // was appended in 6.10 and is not read. Before 5.17 the programs
        // count by protocol and never read the third argument (reading it,
        // `tp_btf` fails the verifier and `raw_tp` fails to attach: its
        // context would be larger than the tracepoint's). Without BTF
        // userspace cannot tell, so `raw_tp` reads the reason and a kernel
        // before 5.17 refuses it.
        Variant {
            hook: Hook::TpBtf,
            programs: &[p("drops_kfree_skb_btf", "kfree_skb")],
            min_kernel: (5, 5),
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

    fn prepare(&self, ctx: &PrepareCtx<'_>) -> Prepared {
        let (config, note) = kernel_config(ctx.btf.get(), ctx.config.drops.by == By::Protocol);
        let mut out = Prepared::default();
        out.global(c::GLOBAL_CONFIG, &config);
        if let Some(note) = note {
            out.note_all(&RULE, &note, |_| true);
        }
        out
    }

    fn build(
        &self,
        ctx: &mut BuildCtx<'_>,
    ) -> Result<Box<dyn crate::collectors::Collector>, BuildError> {
        Ok(Box::new(collector::DropsCollector::new(ctx)?))
    }
}

/// How the programs read `kfree_skb` on this kernel, and the plan's note
/// when they count by protocol. `forced`: `probes.drops.by = "protocol"`.
fn kernel_config(btf: Result<&KernelBtf, String>, forced: bool) -> (DropsConfig, Option<String>) {
    // A BTF without the tracepoint's typedef says nothing: assume the
    // reason, and let the kernel's verdict on the load tell.
    let no_reason = forced
        || btf
            .as_ref()
            .is_ok_and(|b| b.tracepoint_args("kfree_skb").is_ok_and(|n| n < 3));
    if !no_reason {
        return (DropsConfig::default(), None);
    }
    let (protocol, what) = match btf.and_then(|b| {
        b.member_sized("sk_buff", "protocol", 2)
            .map_err(|e| e.to_string())
    }) {
        Ok(at) => (at, "by L3 protocol".to_owned()),
        Err(e) => (
            0,
            format!("all as protocol unknown (sk_buff.protocol: {e})"),
        ),
    };
    let why = if forced {
        "probes.drops.by = \"protocol\""
    } else {
        "kfree_skb has no drop reason before 5.17"
    };
    let note = format!(
        "{why}: every kfree_skb counted {what}, including packets the kernel \
         frees with kfree_skb that were not dropped"
    );
    (
        DropsConfig {
            no_reason: 1,
            protocol,
        },
        Some(note),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::btf::testutil::Builder;
    use crate::sources::btf::KIND_STRUCT;

    /// `kfree_skb`'s tracepoint with `args` arguments after the context
    /// (2 before 5.17, 3 after, 4 from 6.10), and `sk_buff` with
    /// `protocol` at byte 180 or without it.
    fn btf(args: usize, protocol: bool) -> KernelBtf {
        let mut b = Builder::new();
        let u16_ = b.int("unsigned short", 2);
        let be16 = b.typedef("__be16", u16_);
        let long = b.int("long", 8);
        let mut members = vec![("len", long, 0, 0)];
        if protocol {
            members.push(("protocol", be16, 180 * 8, 0));
        }
        b.composite(KIND_STRUCT, "sk_buff", 232, &members);
        let params = vec![long; args + 1];
        let proto = b.func_proto(&params);
        let ptr = b.ptr(proto);
        b.typedef("btf_trace_kfree_skb", ptr);
        KernelBtf::parse(b.build(), "test").expect("BTF parses")
    }

    #[test]
    fn reason_where_the_tracepoint_has_one() {
        for args in [3, 4] {
            let (cfg, note) = kernel_config(Ok(&btf(args, true)), false);
            assert_eq!(cfg, DropsConfig::default(), "{args} arguments");
            assert!(note.is_none());
        }
        // No BTF, or no typedef in it: assume the reason.
        assert_eq!(
            kernel_config(Err("no BTF".into()), false).0,
            DropsConfig::default()
        );
        let mut b = Builder::new();
        b.int("int", 4);
        let bare = KernelBtf::parse(b.build(), "bare").unwrap();
        assert_eq!(kernel_config(Ok(&bare), false).0, DropsConfig::default());
    }

    #[test]
    fn protocol_before_5_17_or_when_asked() {
        let (cfg, note) = kernel_config(Ok(&btf(2, true)), false);
        assert_eq!(
            cfg,
            DropsConfig {
                no_reason: 1,
                protocol: 180
            }
        );
        let note = note.unwrap();
        assert!(
            note.contains("before 5.17") && note.contains("by L3 protocol"),
            "{note}"
        );

        let (cfg, note) = kernel_config(Ok(&btf(3, true)), true);
        assert_eq!((cfg.no_reason, cfg.protocol), (1, 180));
        assert!(note.unwrap().contains("probes.drops.by"));

        // Without the field's offset every drop is counted, as unread.
        let (cfg, note) = kernel_config(Ok(&btf(2, false)), false);
        assert_eq!((cfg.no_reason, cfg.protocol), (1, 0));
        assert!(note.unwrap().contains("protocol unknown"));
        let (cfg, _) = kernel_config(Err("no BTF".into()), true);
        assert_eq!((cfg.no_reason, cfg.protocol), (1, 0));
    }
}
