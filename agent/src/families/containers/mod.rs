//! Containers family: CPU time and CPU throttling per container, per pod
//! and per host cgroup, attributed from cgroup paths.
//!
//! - Hooks: none. cgroupfs is the kernel's own per-cgroup accounting
//!   (`cpu.stat`, `cpuacct.*`), exact in every mode. The per-container
//!   run-queue histogram comes from the sched family's `sched_switch`
//!   program, keyed by cgroup id, and is attributed by [`ids`].
//! - Metrics: `container.cpu.time{cpu.mode}`,
//!   `perch.container.cpu.throttled.{periods,time}`,
//!   `perch.container.cpu.{quota,period}`, with `container.id`,
//!   `k8s.pod.uid`, `perch.k8s.qos_class` where the path names them and
//!   `perch.cgroup` always; `perch.containers.cgroups.skipped`.
//! - Fallback: this is the cgroupfs source, in every mode.
//! - Oldest kernel: any with cgroup v1 `cpuacct` or cgroup v2 (4.5).
//!
//! No API server, kubelet or runtime socket is asked: everything comes from
//! the cgroup tree, read where the host's `/sys` is (`agent.sys_root`).

pub mod cgroup_path;
pub mod cgroupfs;
mod collector;
pub mod ids;

use serde::Deserialize;

use crate::gate::rules::Rule;
use crate::gate::Mode;

use super::{BuildCtx, BuildError, Section, Unit};

pub use collector::{attributes, ContainersCollector, Reading};

pub const RULE: Rule = Rule {
    variants: &[],
    fallback: Some("cgroupfs (cgroup v2 cpu.stat and cpu.max, or v1 cpuacct and cpu)"),
    fallback_loses: "nothing: these are the cgroups' own counters",
};

pub struct Containers;
pub static UNIT: Containers = Containers;

impl Unit for Containers {
    fn rule(&self) -> &'static Rule {
        &RULE
    }

    fn build(
        &self,
        ctx: &mut BuildCtx<'_>,
    ) -> Result<Box<dyn crate::collectors::Collector>, BuildError> {
        let cfg = &ctx.config.containers;
        let layout = cgroupfs::Layout::discover(&ctx.sys.path("fs/cgroup"), cfg.hierarchy)
            .map_err(BuildError::Unavailable)?;
        tracing::info!(
            hierarchy = %layout.walk_root().display(),
            "containers: reading CPU accounting from cgroupfs"
        );
        Ok(Box::new(ContainersCollector::new(
            layout,
            cfg.host_depth,
            cfg.max_cgroups,
            ctx.boot,
        )))
    }
}

/// `[probes.containers]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `auto`, `procfs` (cgroupfs; the same) or `off`. Default `auto`.
    pub mode: Mode,
    /// Components a host cgroup (outside any container) keeps: 1 reports
    /// `system.slice`, `user.slice`, `init.scope`; 2 reports each service
    /// (`system.slice/sshd.service`). 1 to 4, default 1.
    pub host_depth: usize,
    /// Most cgroups walked per interval; the rest are counted in
    /// `perch.containers.cgroups.skipped`. 1 to 1 000 000, default 16 384.
    pub max_cgroups: usize,
    /// `auto`, `v1` or `v2`: which cgroup hierarchy to read. `auto` reads
    /// v2 on a v2 host and v1 `cpuacct`/`cpu` on a v1 or hybrid host.
    pub hierarchy: cgroupfs::Hierarchy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Auto,
            host_depth: 1,
            max_cgroups: 16_384,
            hierarchy: cgroupfs::Hierarchy::Auto,
        }
    }
}

impl Section for Config {
    fn mode(&self) -> Mode {
        self.mode
    }
    fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }
    fn validate(&self) -> Result<(), (String, String)> {
        if !(1..=4).contains(&self.host_depth) {
            return Err(("host_depth".into(), "must be 1 to 4".into()));
        }
        if !(1..=1_000_000).contains(&self.max_cgroups) {
            return Err(("max_cgroups".into(), "must be 1 to 1000000".into()));
        }
        Ok(())
    }
}
