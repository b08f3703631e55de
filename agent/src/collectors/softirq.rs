//! Softirq family: time and count per CPU and vector.
//!
//! - Hooks (kernel side `agent-ebpf/src/softirq.rs`): `softirq_entry`,
//!   `softirq_exit` as `tp_btf` or `raw_tp`.
//! - Metrics: `perch.cpu.softirq.time{cpu.logical_number,perch.softirq.vector}`
//!   (eBPF), `perch.cpu.softirq.count{...}` (`/proc/softirqs`, every mode).
//! - Fallback: counts only.
//! - Oldest kernel: 4.17 for eBPF (raw_tp), any for procfs.

use std::time::SystemTime;

use agent_common::softirq as c;
use aya::maps::{MapData, PerCpuArray};

use crate::gate::{Family, Source};
use crate::model::{Attributes, Data, Metric, Number, NumberPoint, StartTimes};
use crate::probes::Probes;
use crate::procfs::{softirqs, ProcRoot};

use super::{online_cpus, CollectError, Collector};

const TIME: &str = "perch.cpu.softirq.time";
const COUNT: &str = "perch.cpu.softirq.count";

pub struct SoftirqCollector {
    proc: ProcRoot,
    time: Option<PerCpuArray<MapData, u64>>,
    time_starts: StartTimes,
    count_starts: StartTimes,
}

impl SoftirqCollector {
    pub fn new(
        proc: ProcRoot,
        boot: SystemTime,
        source: Source,
        probes: &mut Probes,
    ) -> Option<Self> {
        let (time, attached) = match source {
            Source::Off => return None,
            Source::Procfs => (None, boot),
            Source::Ebpf => (
                Some(PerCpuArray::try_from(probes.take_map(c::MAP_TIME)?).ok()?),
                probes.attached_at(Family::Softirq)?,
            ),
        };
        Some(Self {
            proc,
            time,
            time_starts: StartTimes::new(attached),
            count_starts: StartTimes::new(boot),
        })
    }
}

impl Collector for SoftirqCollector {
    fn name(&self) -> &'static str {
        "softirq"
    }

    fn collect(&mut self, now: SystemTime, out: &mut Vec<Metric>) -> Result<(), CollectError> {
        if let Some(map) = &self.time {
            let cpus = online_cpus();
            let mut points = Vec::new();
            for (vec, name) in c::VECTOR_NAMES.iter().enumerate() {
                let values = map
                    .get(&(vec as u32), 0)
                    .map_err(|e| CollectError::map(c::MAP_TIME, e))?;
                for cpu in &cpus {
                    let ns = values.get(*cpu as usize).copied().unwrap_or(0);
                    let attributes: Attributes = vec![
                        ("cpu.logical_number", (*cpu).into()),
                        ("perch.softirq.vector", (*name).into()),
                    ];
                    let v = ns as f64 / 1e9;
                    let start = self.time_starts.observe(TIME, &attributes, v, now);
                    points.push(NumberPoint {
                        attributes,
                        start_time: Some(start),
                        time: now,
                        value: Number::Double(v),
                    });
                }
            }
            self.time_starts.end_collection(now);
            out.push(Metric {
                name: TIME,
                description: "Time spent handling softirqs, by CPU and vector.",
                unit: "s",
                data: Data::Sum {
                    monotonic: true,
                    points,
                },
            });
        }

        let si = softirqs::parse_softirqs(&self.proc.read("softirqs")?)?;
        let mut points = Vec::new();
        for (name, counts) in &si.vectors {
            for (cpu, n) in si.cpus.iter().zip(counts) {
                let attributes: Attributes = vec![
                    ("cpu.logical_number", (*cpu).into()),
                    ("perch.softirq.vector", name.clone().into()),
                ];
                let start = self
                    .count_starts
                    .observe(COUNT, &attributes, *n as f64, now);
                points.push(NumberPoint {
                    attributes,
                    start_time: Some(start),
                    time: now,
                    value: Number::Int(*n as i64),
                });
            }
        }
        self.count_starts.end_collection(now);
        out.push(Metric {
            name: COUNT,
            description: "Softirqs raised and handled, by CPU and vector (/proc/softirqs).",
            unit: "{softirq}",
            data: Data::Sum {
                monotonic: true,
                points,
            },
        });
        Ok(())
    }
}
