//! CPU family: time per CPU and mode, and load averages.
//!
//! - Hooks: none. `/proc/stat` is the kernel's own CPU accounting and is exact;
//!   an eBPF re-implementation could only add error.
//! - Metrics: `system.cpu.time{cpu.logical_number,cpu.mode}`,
//!   `system.cpu.load_average.{1m,5m,15m}`.
//! - Fallback: this is the procfs source, in every mode.
//! - Oldest kernel: any (columns missing on old kernels read as zero).
//!
//! `user` and `nice` include guest time, as the kernel accounts it.

use std::time::SystemTime;

use crate::gate::Source;
use crate::model::{Attributes, Data, Metric, Number, NumberPoint, StartTimes};
use crate::procfs::{loadavg, stat, ProcRoot};

use super::{CollectError, Collector};

pub struct CpuCollector {
    proc: ProcRoot,
    starts: StartTimes,
    ticks_per_sec: f64,
}

impl CpuCollector {
    pub fn new(proc: ProcRoot, boot: SystemTime, source: Source) -> Option<Self> {
        (source != Source::Off).then(|| Self {
            proc,
            starts: StartTimes::new(boot),
            ticks_per_sec: stat::USER_HZ as f64,
        })
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
                let start = self
                    .starts
                    .observe("system.cpu.time", &attributes, value, now);
                points.push(NumberPoint {
                    attributes,
                    start_time: Some(start),
                    time: now,
                    value: Number::Double(value),
                });
            }
        }
        self.starts.end_collection(now);
        out.push(Metric {
            name: "system.cpu.time",
            description: "Seconds each logical CPU spent in each mode.",
            unit: "s",
            data: Data::Sum {
                monotonic: true,
                points,
            },
        });

        let la = loadavg::parse_loadavg(&self.proc.read("loadavg")?)?;
        for (name, value) in [
            ("system.cpu.load_average.1m", la.one),
            ("system.cpu.load_average.5m", la.five),
            ("system.cpu.load_average.15m", la.fifteen),
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
