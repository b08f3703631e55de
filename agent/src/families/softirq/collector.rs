//! The `softirq` collector: per-vector time from the kernel maps, counts
//! from `/proc/softirqs`.

use std::time::SystemTime;

use agent_common::softirq as c;
use aya::maps::{MapData, PerCpuArray};

use crate::families::{BuildCtx, BuildError};
use crate::gate::Source;
use crate::model::{Attributes, Metric, Number, NumberPoint, StartTimes};
use crate::sources::Root;

use super::softirqs;
use crate::collectors::{cpu_value, online_cpus, read_slot, CollectError, Collector};

const TIME: &str = crate::catalogue::SOFTIRQ_TIME;
const COUNT: &str = crate::catalogue::SOFTIRQ_COUNT;

pub struct SoftirqCollector {
    proc: Root,
    time: Option<PerCpuArray<MapData, u64>>,
    time_starts: StartTimes,
    count_starts: StartTimes,
}

impl SoftirqCollector {
    pub fn new(ctx: &mut BuildCtx<'_>) -> Result<Self, BuildError> {
        let (time, attached) = match ctx.source() {
            Source::Ebpf => (Some(ctx.map(c::MAP_TIME)?), ctx.attached_at()?),
            _ => (None, ctx.boot),
        };
        let proc = ctx.proc.clone();
        let boot = ctx.boot;
        Ok(Self {
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
                let values = read_slot(map, vec as u32, c::MAP_TIME)?;
                for cpu in &cpus {
                    let ns = cpu_value(&values, *cpu);
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
            out.push(Metric::counter(
                TIME,
                "Time spent handling softirqs, by CPU and vector.",
                "s",
                points,
            ));
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
        out.push(Metric::counter(
            COUNT,
            "Softirqs raised and handled, by CPU and vector (/proc/softirqs).",
            "{softirq}",
            points,
        ));
        Ok(())
    }
}
