//! Collectors: turn maps and procfs files into model metrics, once per
//! interval. One module per probe family, registered in [`build`].
//!
//! A failing collector never stops a collection: its error is logged with
//! fields and counted in `perch.collector.errors{perch.component,error.type}`,
//! and the other collectors go on.

pub mod connections;
pub mod cpu;
pub mod drops;
pub mod interfaces;
pub mod netlink;
pub mod sched;
pub mod softirq;
pub mod tcp;
pub mod tcp_sockdiag;
pub mod tcp_walk;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::gate::Family;
use crate::model::Metric;
use crate::probes::Probes;
use crate::procfs::{ProcError, ProcRoot, SysRoot};

/// A source of metrics, read once per interval.
pub trait Collector: Send {
    /// The component name used in logs and self-metrics.
    fn name(&self) -> &'static str;
    /// Appends this interval's metrics to `out`.
    fn collect(&mut self, now: SystemTime, out: &mut Vec<Metric>) -> Result<(), CollectError>;
}

/// Why a collector produced nothing this interval.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// A procfs or sysfs file could not be read or parsed.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// A BPF map could not be read.
    #[error("reading BPF map {map}: {message}")]
    Map { map: &'static str, message: String },
    /// A BPF iterator could not be run, or wrote what it should not.
    #[error("running BPF iterator {program}: {message}")]
    Iter {
        program: &'static str,
        message: String,
    },
}

impl CollectError {
    /// A short, low-cardinality error type for the `error.type` attribute.
    pub fn kind(&self) -> &'static str {
        match self {
            CollectError::Proc(ProcError::Io { .. }) => "io",
            CollectError::Proc(ProcError::Malformed { .. }) => "malformed",
            CollectError::Proc(ProcError::Missing { .. }) => "missing",
            CollectError::Map { .. } => "bpf_map",
            CollectError::Iter { .. } => "bpf_iter",
        }
    }

    pub(crate) fn map(map: &'static str, e: impl std::fmt::Display) -> Self {
        CollectError::Map {
            map,
            message: e.to_string(),
        }
    }
}

/// The boot time, from `/proc/stat` `btime`: the start of every counter the
/// kernel keeps since boot.
pub fn boot_time(proc: &ProcRoot) -> Result<SystemTime, ProcError> {
    let stat = crate::procfs::stat::parse_stat(&proc.read("stat")?)?;
    Ok(UNIX_EPOCH + Duration::from_secs(stat.btime))
}

/// Builds the collectors for the plan: the one place families are registered.
pub fn build(cfg: &Config, probes: &mut Probes) -> Result<Vec<Box<dyn Collector>>, ProcError> {
    let proc = ProcRoot::new(&cfg.agent.proc_root);
    let boot = boot_time(&proc)?;
    let mut out: Vec<Box<dyn Collector>> = Vec::new();
    for fp in probes.plan.families.clone() {
        match fp.family {
            Family::Cpu => {
                if let Some(c) = cpu::CpuCollector::new(proc.clone(), boot, fp.source) {
                    out.push(Box::new(c));
                }
            }
            Family::Sched => {
                if let Some(c) = sched::SchedCollector::new(
                    proc.clone(),
                    boot,
                    fp.source,
                    cfg.probes.sched.runqueue_per_cpu,
                    probes,
                ) {
                    out.push(Box::new(c));
                }
            }
            Family::Softirq => {
                if let Some(c) =
                    softirq::SoftirqCollector::new(proc.clone(), boot, fp.source, probes)
                {
                    out.push(Box::new(c));
                }
            }
            Family::Interfaces => {
                if let Some(c) = interfaces::InterfacesCollector::new(
                    proc.clone(),
                    SysRoot::new(&cfg.agent.sys_root),
                    boot,
                    fp.source,
                    cfg.probes.interfaces.clone(),
                ) {
                    out.push(Box::new(c));
                }
            }
            Family::Connections => {
                if let Some(c) =
                    connections::ConnectionsCollector::new(proc.clone(), fp.source, fp.requested)
                {
                    out.push(Box::new(c));
                }
            }
            Family::Tcp => {
                if let Some(c) = tcp::TcpCollector::new(
                    proc.clone(),
                    boot,
                    fp.source,
                    cfg.probes.tcp.rtt_per_peer,
                    cfg.probes.tcp.max_peers,
                    probes,
                ) {
                    out.push(Box::new(c));
                }
            }
            Family::Drops => {
                if let Some(c) = drops::DropsCollector::new(proc.clone(), boot, fp.source, probes) {
                    out.push(Box::new(c));
                }
            }
        }
    }
    Ok(out)
}

/// `perch.bpf.map.insert_failures{perch.bpf.map}`: inserts a bounded kernel
/// map refused because it was full, so the loss is counted, never silent.
pub fn map_insert_failures(
    map: &'static str,
    total: u64,
    attached_at: SystemTime,
    now: SystemTime,
) -> Metric {
    Metric {
        name: "perch.bpf.map.insert_failures",
        description: "Kernel-side inserts refused because a bounded BPF map was full.",
        unit: "{insert}",
        data: crate::model::Data::Sum {
            monotonic: true,
            points: vec![crate::model::NumberPoint {
                attributes: vec![("perch.bpf.map", map.into())],
                start_time: Some(attached_at),
                time: now,
                value: crate::model::Number::Int(total as i64),
            }],
        },
    }
}

/// Merges metrics of the same name (several collectors may report one
/// self-metric), keeping the first one's description and unit.
pub fn merge_same_name(metrics: Vec<Metric>) -> Vec<Metric> {
    use crate::model::Data;
    let mut out: Vec<Metric> = Vec::with_capacity(metrics.len());
    for m in metrics {
        let Some(existing) = out.iter_mut().find(|e| e.name == m.name) else {
            out.push(m);
            continue;
        };
        match (&mut existing.data, m.data) {
            (Data::Sum { points: a, .. }, Data::Sum { points: b, .. })
            | (Data::Gauge { points: a }, Data::Gauge { points: b }) => a.extend(b),
            (Data::Histogram { points: a }, Data::Histogram { points: b }) => a.extend(b),
            (_, other) => {
                tracing::error!(metric = m.name, "two collectors report one metric with different instruments; keeping the first");
                let _ = other;
            }
        }
    }
    out
}

/// Online CPUs, for per-CPU map reads: the maps have a slot per possible CPU.
pub(crate) fn online_cpus() -> Vec<u32> {
    aya::util::online_cpus().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Data, Number, NumberPoint};

    fn sum(name: &'static str, v: i64) -> Metric {
        Metric {
            name,
            description: "d",
            unit: "1",
            data: Data::Sum {
                monotonic: true,
                points: vec![NumberPoint {
                    attributes: vec![("k", v.into())],
                    start_time: None,
                    time: UNIX_EPOCH,
                    value: Number::Int(v),
                }],
            },
        }
    }

    #[test]
    fn same_name_metrics_are_merged_in_order() {
        let merged = merge_same_name(vec![sum("a", 1), sum("b", 2), sum("a", 3)]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].name, "a");
        let Data::Sum { points, .. } = &merged[0].data else {
            panic!("sum expected")
        };
        let values: Vec<Number> = points.iter().map(|p| p.value).collect();
        assert_eq!(values, vec![Number::Int(1), Number::Int(3)]);
    }
}
