//! The `cpu` collector: `/proc/stat` and `/proc/loadavg`.
//!
//! `user` and `nice` include guest time, as the kernel accounts it.

use std::time::SystemTime;

use crate::model::{Attributes, Data, Metric, Number, NumberPoint, StartTimes};
use crate::sources::{stat, Root};

use super::loadavg;

use crate::collectors::{CollectError, Collector};

pub struct CpuCollector {
    proc: Root,
    starts: StartTimes,
    ticks_per_sec: f64,
}

impl CpuCollector {
    pub fn new(proc: Root, boot: SystemTime) -> Self {
        Self {
            proc,
            starts: StartTimes::new(boot),
            ticks_per_sec: stat::USER_HZ as f64,
        }
    }
}

impl Collector for CpuCollector {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn collect(&mut self, now: SystemTime, out: &mut Vec<Metric>) -> Result<(), CollectError> {
        let st = stat::parse_stat(&self.proc.read("stat")?)?;
        let mut points = Vec::with_capacity(st.cpus.len() * 8);
        for (cpu, t) in &st.cpus {
            for (mode, ticks) in [
                ("user", t.user),
                ("nice", t.nice),
                ("system", t.system),
                ("idle", t.idle),
                ("iowait", t.iowait),
                ("interrupt", t.irq),
                ("softirq", t.softirq),
                ("steal", t.steal),
            ] {
                let attributes: Attributes = vec![
                    ("cpu.logical_number", (*cpu).into()),
                    ("cpu.mode", mode.into()),
                ];
                let value = ticks as f64 / self.ticks_per_sec;
                let start =
                    self.starts
                        .observe(crate::catalogue::CPU_TIME, &attributes, value, now);
                points.push(NumberPoint {
                    attributes,
                    start_time: Some(start),
                    time: now,
                    value: Number::Double(value),
                });
            }
        }
        self.starts.end_collection(now);
        out.push(Metric::counter(
            crate::catalogue::CPU_TIME,
            "Seconds each logical CPU spent in each mode.",
            "s",
            points,
        ));

        let la = loadavg::parse_loadavg(&self.proc.read("loadavg")?)?;
        for (name, value) in [
            (crate::catalogue::LOAD_1M, la.one),
            (crate::catalogue::LOAD_5M, la.five),
            (crate::catalogue::LOAD_15M, la.fifteen),
        ] {
            out.push(Metric {
                name,
                description:
                    "Load average: runnable and uninterruptible tasks, exponentially averaged.",
                unit: "{thread}",
                data: Data::Gauge {
                    points: vec![NumberPoint {
                        attributes: Vec::new(),
                        start_time: None,
                        time: now,
                        value: Number::Double(value),
                    }],
                },
            });
        }
        Ok(())
    }
}
