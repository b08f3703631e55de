//! Softirq family: time and count per CPU and vector.
//!
//! - Hooks (kernel side `agent-ebpf/src/softirq.rs`): `softirq_entry`,
//!   `softirq_exit` as `tp_btf`, `raw_tp` or classic tracepoints.
//! - Metrics: `perch.cpu.softirq.time{cpu.logical_number,perch.softirq.vector}`
//!   (eBPF), `perch.cpu.softirq.count{...}` (`/proc/softirqs`, every mode).
//! - Fallback: counts only.
//! - Oldest kernel: 4.7 for eBPF (classic tracepoint), any for procfs.

mod collector;
pub mod softirqs;

use agent_common::softirq as c;

use crate::gate::rules::{p, Hook, Rule, Variant};
use crate::sources::tracefs;

use super::{BuildCtx, BuildError, PrepareCtx, Prepared, ProbeConfig, Unit};

/// `[probes.softirq]`.
pub type Config = ProbeConfig;

pub const RULE: Rule = Rule {
    variants: &[
        Variant {
            hook: Hook::TpBtf,
            programs: &[
                p("softirq_entry_btf", "softirq_entry"),
                p("softirq_exit_btf", "softirq_exit"),
            ],
            min_kernel: (5, 5),
            needs_btf: true,
        },
        Variant {
            hook: Hook::RawTp,
            programs: &[
                p("softirq_entry_raw", "softirq_entry"),
                p("softirq_exit_raw", "softirq_exit"),
            ],
            min_kernel: (4, 17),
            needs_btf: false,
        },
        Variant {
            hook: Hook::Tracepoint,
            programs: &[
                p("softirq_entry_tp", "irq/softirq_entry"),
                p("softirq_exit_tp", "irq/softirq_exit"),
            ],
            min_kernel: (4, 7),
            needs_btf: false,
        },
    ],
    fallback: Some("/proc/softirqs"),
    fallback_loses: "the time spent per vector (counts remain)",
};

pub struct Softirq;
pub static UNIT: Softirq = Softirq;

impl Unit for Softirq {
    fn rule(&self) -> &'static Rule {
        &RULE
    }

    fn prepare(&self, ctx: &PrepareCtx<'_>) -> Prepared {
        let mut out = Prepared::default();
        let offsets = match ctx.tracefs {
            Some(root) => tracefs::field_offset(root, "irq/softirq_exit", "vec")
                .map_err(|e| format!("tracepoint record layout: {e}")),
            None => Err("tracefs is not mounted".to_owned()),
        };
        match offsets {
            Ok(vec) => out.global(c::GLOBAL_TP_OFFSETS, &c::TpOffsets { vec, _pad: 0 }),
            Err(e) => {
                out.refused.insert(Hook::Tracepoint, e);
            }
        }
        out
    }

    fn build(
        &self,
        ctx: &mut BuildCtx<'_>,
    ) -> Result<Box<dyn crate::collectors::Collector>, BuildError> {
        Ok(Box::new(collector::SoftirqCollector::new(ctx)?))
    }
}
