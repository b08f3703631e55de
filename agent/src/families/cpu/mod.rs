//! CPU family: time per CPU and mode, and load averages.
//!
//! - Hooks: none. `/proc/stat` is the kernel's own CPU accounting and is
//!   exact; an eBPF re-implementation could only add error.
//! - Metrics: `system.cpu.time{cpu.logical_number,cpu.mode}`,
//!   `system.cpu.load_average.{1m,5m,15m}`.
//! - Fallback: this is the procfs source, in every mode.
//! - Oldest kernel: any (columns missing on old kernels read as zero).

mod collector;
pub mod loadavg;

use crate::gate::rules::Rule;

use super::{BuildCtx, BuildError, ProbeConfig, Unit};

/// `[probes.cpu]`.
pub type Config = ProbeConfig;

pub const RULE: Rule = Rule {
    variants: &[],
    fallback: Some("/proc/stat, /proc/loadavg"),
    fallback_loses:
        "nothing: /proc/stat is the kernel's own CPU accounting, which eBPF could only re-derive",
};

pub struct Cpu;
pub static UNIT: Cpu = Cpu;

impl Unit for Cpu {
    fn rule(&self) -> &'static Rule {
        &RULE
    }

    fn build(
        &self,
        ctx: &mut BuildCtx<'_>,
    ) -> Result<Box<dyn crate::collectors::Collector>, BuildError> {
        Ok(Box::new(collector::CpuCollector::new(
            ctx.proc.clone(),
            ctx.boot,
        )))
    }
}
