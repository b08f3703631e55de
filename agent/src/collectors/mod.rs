//! Collectors: turn maps and procfs files into model metrics, once per
//! interval. Each family's collector lives in its folder
//! (`agent/src/families/<name>/`) and is built by
//! [`crate::families::build_collectors`]; this module holds what they share.
//!
//! A failing collector never stops a collection: its error is logged with
//! fields and counted in `perch.collector.errors{perch.component,error.type}`,
//! and the other collectors go on. Each runs on a thread of its own
//! ([`worker`]) with a deadline, so one that hangs does not hold up the rest.

pub mod worker;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::model::Metric;
use crate::sources::{ProcError, Root};

/// A source of metrics, read once per interval.
pub trait Collector: Send {
    /// The component name used in logs and self-metrics.
    fn name(&self) -> &'static str;
    /// Appends this interval's metrics to `out`.
    fn collect(&mut self, now: SystemTime, out: &mut Vec<Metric>) -> Result<(), CollectError>;
    /// Failures of a part of this collector that did not stop the
    /// collection (the tcp family's sock_diag sampler), since the last call,
    /// as `(component, error.type)`. The run loop counts them in
    /// `perch.collector.errors` like a failed collection: one place emits it.
    fn take_partial_errors(&mut self) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }
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
            CollectError::Proc(ProcError::NotRegular { .. }) => "not_regular_file",
            CollectError::Proc(ProcError::TooLarge { .. }) => "too_large",
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
pub fn boot_time(proc: &Root) -> Result<SystemTime, ProcError> {
    let stat = crate::sources::stat::parse_stat(&proc.read("stat")?)?;
    Ok(UNIX_EPOCH + Duration::from_secs(stat.btime))
}

/// `perch.bpf.map.insert_failures{perch.bpf.map}`: inserts into bounded
/// kernel maps refused because they were full, so the loss is counted,
/// never silent. `points` come from [`map_insert_failure_point`].
pub fn map_insert_failures(points: Vec<crate::model::NumberPoint>) -> Metric {
    Metric::counter(
        crate::catalogue::BPF_MAP_INSERT_FAILURES,
        "Kernel-side inserts refused because a bounded BPF map was full; what they \
         carried went to an overflow series or is named in docs/metrics.md.",
        "{insert}",
        points,
    )
}

/// One map's point of [`map_insert_failures`].
pub fn map_insert_failure_point(
    map: &'static str,
    total: u64,
    start: SystemTime,
    now: SystemTime,
) -> crate::model::NumberPoint {
    crate::model::NumberPoint {
        attributes: vec![("perch.bpf.map", map.into())],
        start_time: Some(start),
        time: now,
        value: crate::model::Number::Int(i64::try_from(total).unwrap_or(i64::MAX)),
    }
}

/// `perch.bpf.map.entries`: entries in bounded BPF maps, each point
/// carrying its map's capacity (0 when it has none of its own).
pub fn map_entries(points: Vec<crate::model::NumberPoint>) -> Metric {
    Metric::gauge(
        crate::catalogue::BPF_MAP_ENTRIES,
        "Entries in a bounded BPF map.",
        "{entry}",
        points,
    )
}

/// One map's point of [`map_entries`].
pub fn map_entries_point(
    map: &'static str,
    entries: u64,
    capacity: u32,
    now: SystemTime,
) -> crate::model::NumberPoint {
    let mut attributes: crate::model::Attributes = vec![("perch.bpf.map", map.into())];
    if capacity > 0 {
        attributes.push((crate::catalogue::BPF_MAP_CAPACITY, capacity.into()));
    }
    crate::model::NumberPoint {
        attributes,
        start_time: None,
        time: now,
        value: crate::model::Number::Int(i64::try_from(entries).unwrap_or(i64::MAX)),
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

/// `cpu`'s value in one read of a per-CPU map slot (0 past its end).
pub(crate) fn cpu_value(values: &[u64], cpu: u32) -> u64 {
    values.get(cpu as usize).copied().unwrap_or(0)
}

/// The sum over `cpus` of one read of a per-CPU map slot.
pub(crate) fn cpu_sum(values: &[u64], cpus: &[u32]) -> u64 {
    cpus.iter().map(|&c| cpu_value(values, c)).sum()
}

/// Reads slot `index` of per-CPU array `map` (named `name` in errors).
pub(crate) fn read_slot(
    map: &aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    index: u32,
    name: &'static str,
) -> Result<aya::maps::PerCpuValues<u64>, CollectError> {
    map.get(&index, 0).map_err(|e| CollectError::map(name, e))
}

/// Slots `0..len` of per-CPU array `map`, each summed over `cpus`.
pub(crate) fn read_summed(
    map: &aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    len: u32,
    name: &'static str,
    cpus: &[u32],
) -> Result<Vec<u64>, CollectError> {
    (0..len)
        .map(|i| read_slot(map, i, name).map(|v| cpu_sum(&v, cpus)))
        .collect()
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
