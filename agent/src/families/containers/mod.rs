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
//! No API server or runtime socket is asked: everything comes from the
//! cgroup tree, read where the host's `/sys` is (`agent.sys_root`). Pod
//! and container names can come from the kubelet (`kubelet_url`, off by
//! default), cached and added by the pipeline ([`kubelet`]).

pub mod cgroup_path;
pub mod cgroupfs;
mod collector;
pub mod ids;
pub mod kubelet;

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
    /// The kubelet to ask for pod and container names
    /// (`https://<node>:10250`, or `http://...:10255` where the read-only
    /// port is on; `${NAME}` expands an environment variable); "" (the
    /// default) asks nobody: ids only.
    pub kubelet_url: String,
    /// Bearer token sent to the kubelet, read at each refresh; "" sends
    /// none. Default: the pod's service-account token.
    pub kubelet_token_file: String,
    /// CA bundle of the kubelet's serving certificate; "" uses the system
    /// roots. Default: the service account's `ca.crt` (the cluster CA,
    /// which signs kubelet certificates with `serverTLSBootstrap`).
    pub kubelet_ca_file: String,
    /// Seconds between two pod-list refreshes. 5 to 3600, default 30.
    pub kubelet_refresh_secs: u64,
}

impl Config {
    /// Where to ask the kubelet, when `kubelet_url` is set; `${NAME}` in
    /// it is replaced by that environment variable (the DaemonSet passes
    /// the node's IP), an error if unset.
    pub fn kubelet(&self) -> Result<Option<kubelet::Source>, String> {
        if self.kubelet_url.is_empty() {
            return Ok(None);
        }
        let url = kubelet::expand_env(&self.kubelet_url, |k| std::env::var(k).ok())
            .map_err(|e| format!("probes.containers.kubelet_url: {e}"))?;
        let path = |s: &str| (!s.is_empty()).then(|| std::path::PathBuf::from(s));
        Ok(Some(kubelet::Source {
            url,
            token_file: path(&self.kubelet_token_file),
            ca_file: path(&self.kubelet_ca_file),
            refresh: std::time::Duration::from_secs(self.kubelet_refresh_secs),
            timeout: std::time::Duration::from_secs(5),
        }))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Auto,
            host_depth: 1,
            max_cgroups: 16_384,
            hierarchy: cgroupfs::Hierarchy::Auto,
            kubelet_url: String::new(),
            kubelet_token_file: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            kubelet_ca_file: "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt".into(),
            kubelet_refresh_secs: 30,
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
        let url = &self.kubelet_url;
        if !url.is_empty() && !url.starts_with("https://") && !url.starts_with("http://") {
            return Err((
                "kubelet_url".into(),
                format!("{url:?}: must start with https:// or http://"),
            ));
        }
        if !(5..=3600).contains(&self.kubelet_refresh_secs) {
            return Err(("kubelet_refresh_secs".into(), "must be 5 to 3600".into()));
        }
        Ok(())
    }
}
