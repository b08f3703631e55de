//! The `sched` collector.
//!
//! - Metrics: `perch.cpu.context_switches{cpu.logical_number,
//!   perch.context_switch.type}`, `perch.scheduler.runqueue.latency`
//!   (host-wide, or per CPU with `probes.sched.runqueue_per_cpu`),
//!   `perch.scheduler.wait.time{cpu.logical_number}` (`/proc/schedstat` in
//!   every mode; on kernels built without `CONFIG_SCHEDSTATS`, which have no
//!   `/proc/schedstat`, the per-CPU sum of the eBPF run-queue latencies,
//!   which measures the same time: runnable, not running. In procfs mode on
//!   such a kernel it is not collected, and the start-up log says so).
//! - Fallback: `/proc/stat` `ctxt`, host-wide with no type attribute; no
//!   run-queue histogram.
//!
//! Counting happens in per-CPU maps; this reads them once per interval.

use std::time::SystemTime;

use agent_common::{exp, sched as c};
use aya::maps::{HashMap, MapData, PerCpuArray};

use crate::families::{BuildCtx, BuildError};
use crate::gate::Source;
use crate::model::{
    Attributes, Buckets, Exponential, HistogramPoint, Metric, Number, NumberPoint, StartTimes,
};
use crate::sources::{stat, Root};

use super::schedstat;
use crate::collectors::{cpu_sum, cpu_value, online_cpus, read_slot, CollectError, Collector};

const CTX: &str = crate::catalogue::CONTEXT_SWITCHES;
const CTX_DESC: &str = "Context switches, by CPU and by whether the previous task blocked \
                        (voluntary), was preempted while runnable (involuntary), or was the \
                        idle task (idle).";
const RUNQ: &str = crate::catalogue::RUNQUEUE_LATENCY;
const WAIT: &str = crate::catalogue::WAIT_TIME;

struct Maps {
    counters: PerCpuArray<MapData, u64>,
    hist: PerCpuArray<MapData, u64>,
    /// One slot per live task that has waited, where the wake-up clock
    /// times waits (empty with the kernel's sched_info stamps).
    runq_start: HashMap<MapData, u64, u64>,
    attached_at: SystemTime,
    /// `probes.sched.runqueue_per_cgroup`, where the kernel side records it.
    cgroups: Option<super::cgroups::CgroupRunq>,
}

pub struct SchedCollector {
    proc: Root,
    maps: Option<Maps>,
    per_cpu_runq: bool,
    /// Start times of the context-switch and run-queue series: attach time
    /// in eBPF mode, boot time in procfs mode.
    starts: StartTimes,
    /// Start times of the schedstat series: boot time.
    wait_starts: StartTimes,
    runq_start_full: u64,
    /// `/proc/schedstat` exists (`CONFIG_SCHEDSTATS=y`).
    schedstat: bool,
}

impl SchedCollector {
    pub fn new(ctx: &mut BuildCtx<'_>) -> Result<Self, BuildError> {
        let maps = match ctx.source() {
            Source::Ebpf => Some(Maps {
                counters: ctx.map(c::MAP_COUNTERS)?,
                hist: ctx.map(c::MAP_RUNQ_HIST)?,
                runq_start: ctx.map(c::MAP_RUNQ_START)?,
                attached_at: ctx.attached_at()?,
                cgroups: per_cgroup(ctx)?,
            }),
            _ => None,
        };
        let proc = ctx.proc.clone();
        let boot = ctx.boot;
        let per_cpu_runq = ctx.config.sched.runqueue_per_cpu;
        let schedstat = proc.path("schedstat").exists();
        if !schedstat {
            let source = if maps.is_some() {
                "the eBPF run-queue latency sum per CPU"
            } else {
                "nowhere in procfs mode: it is not collected"
            };
            tracing::info!(
                path = %proc.path("schedstat").display(),
                "no /proc/schedstat (kernel built without CONFIG_SCHEDSTATS); scheduler wait time comes from {source}"
            );
        }
        Ok(Self {
            schedstat,
            proc,
            wait_starts: StartTimes::new(boot),
            starts: StartTimes::new(maps.as_ref().map(|m| m.attached_at).unwrap_or(boot)),
            maps,
            per_cpu_runq,
            runq_start_full: 0,
        })
    }
}

/// The per-cgroup run-queue reader, where `prepare` turned the kernel side
/// on (it did when the option is set and a cgroup2 mount exists).
fn per_cgroup(ctx: &mut BuildCtx<'_>) -> Result<Option<super::cgroups::CgroupRunq>, BuildError> {
    if !ctx.config.sched.runqueue_per_cgroup {
        return Ok(None);
    }
    let Ok(root) = crate::families::containers::ids::cgroup2_root(&ctx.sys.path("fs/cgroup"))
    else {
        return Ok(None);
    };
    let containers = &ctx.config.containers;
    let ids = crate::families::containers::ids::CgroupIds::new(
        root,
        containers.host_depth,
        containers.max_cgroups,
    );
    Ok(Some(super::cgroups::CgroupRunq::new(
        super::cgroups::Maps {
            front: ctx.map(c::MAP_CGROUP_FRONT)?,
            map: ctx.map(c::MAP_CGROUP_RUNQ)?,
            gone_map: ctx.map(c::MAP_CGROUP_GONE)?,
            overflow: ctx.map(c::MAP_CGROUP_OVF)?,
        },
        ctx.config.sched.max_cgroup_buckets,
        ids,
        ctx.attached_at()?,
    )))
}

fn sum_point(attributes: Attributes, start: SystemTime, now: SystemTime, v: Number) -> NumberPoint {
    NumberPoint {
        attributes,
        start_time: Some(start),
        time: now,
        value: v,
    }
}

impl Collector for SchedCollector {
    fn name(&self) -> &'static str {
        "sched"
    }

    fn collect(&mut self, now: SystemTime, out: &mut Vec<Metric>) -> Result<(), CollectError> {
        // Per-CPU run-queue latency sums (ns), in eBPF mode.
        let mut runq_sums: Option<Vec<(u32, u64)>> = None;
        match &mut self.maps {
            Some(maps) => {
                let cpus = online_cpus();
                let read = |slot: u32| read_slot(&maps.counters, slot, c::MAP_COUNTERS);
                let vol = read(c::SLOT_VOLUNTARY)?;
                let invol = read(c::SLOT_INVOLUNTARY)?;
                let idle = read(c::SLOT_IDLE)?;
                let mut points = Vec::with_capacity(cpus.len() * 3);
                for cpu in &cpus {
                    for (kind, values) in [
                        ("voluntary", &vol),
                        ("involuntary", &invol),
                        ("idle", &idle),
                    ] {
                        let v = cpu_value(values, *cpu);
                        let attributes: Attributes = vec![
                            ("cpu.logical_number", (*cpu).into()),
                            ("perch.context_switch.type", kind.into()),
                        ];
                        let start = self.starts.observe(CTX, &attributes, v as f64, now);
                        points.push(sum_point(attributes, start, now, Number::Int(v as i64)));
                    }
                }
                out.push(Metric::counter(CTX, CTX_DESC, "{switch}", points));

                self.runq_start_full = read(c::SLOT_RUNQ_START_FULL)?.iter().sum();
                let mut failures = vec![crate::collectors::map_insert_failure_point(
                    c::MAP_RUNQ_START,
                    self.runq_start_full,
                    maps.attached_at,
                    now,
                )];
                // A key walk: one syscall per entry (about one per live task
                // with the wake-up clock, none with the kernel's stamps).
                let entries = maps
                    .runq_start
                    .keys()
                    .take(c::RUNQ_START_ENTRIES as usize)
                    .count();
                let mut map_entries = vec![crate::collectors::map_entries_point(
                    c::MAP_RUNQ_START,
                    entries as u64,
                    c::RUNQ_START_ENTRIES,
                    now,
                )];
                if let Some(cg) = &mut maps.cgroups {
                    let figures = cg.collect(&maps.counters, now, out)?;
                    let (failed, entries) =
                        super::cgroups::map_points(&figures, maps.attached_at, now);
                    failures.push(failed);
                    map_entries.extend(entries);
                }
                out.push(crate::collectors::map_insert_failures(failures));
                out.push(crate::collectors::map_entries(map_entries));
                let sum_ns = read(c::SLOT_RUNQ_SUM_NS)?;
                runq_sums = Some(cpus.iter().map(|c| (*c, cpu_value(&sum_ns, *c))).collect());
                // Read each bucket once: per CPU values, summed or kept.
                let width = if self.per_cpu_runq { cpus.len() } else { 1 };
                let mut buckets = vec![vec![0u64; exp::SLOTS as usize]; width];
                for b in 0..exp::SLOTS {
                    let values = read_slot(&maps.hist, b, c::MAP_RUNQ_HIST)?;
                    for (k, cpu) in cpus.iter().enumerate() {
                        let v = cpu_value(&values, *cpu);
                        buckets[if self.per_cpu_runq { k } else { 0 }][b as usize] += v;
                    }
                }
                let points = buckets
                    .into_iter()
                    .enumerate()
                    .map(|(k, counts)| {
                        let (attributes, sum): (Attributes, u64) = if self.per_cpu_runq {
                            let cpu = cpus[k];
                            (
                                vec![("cpu.logical_number", cpu.into())],
                                cpu_value(&sum_ns, cpu),
                            )
                        } else {
                            (Vec::new(), cpu_sum(&sum_ns, &cpus))
                        };
                        let count: u64 = counts.iter().sum();
                        let start = self.starts.observe(RUNQ, &attributes, count as f64, now);
                        HistogramPoint {
                            attributes,
                            start_time: start,
                            time: now,
                            count,
                            sum: sum as f64 / 1e9,
                            buckets: Buckets::Exponential(Exponential::from_slots(&counts)),
                        }
                    })
                    .collect();
                out.push(Metric::histogram(
                    RUNQ,
                    "Time tasks spent runnable on a run queue before running: \
                                  from wake-up, or from preemption, to being switched in.",
                    "s",
                    points,
                ));
            }
            None => {
                let st = stat::parse_stat(&self.proc.read("stat")?)?;
                let attributes = Vec::new();
                let start = self.starts.observe(CTX, &attributes, st.ctxt as f64, now);
                out.push(Metric::counter(
                    CTX,
                    CTX_DESC,
                    "{switch}",
                    vec![sum_point(
                        attributes,
                        start,
                        now,
                        Number::Int(st.ctxt as i64),
                    )],
                ));
            }
        }

        let waits: Vec<(u32, u64)> = if self.schedstat {
            schedstat::parse_schedstat(&self.proc.read("schedstat")?)?
                .iter()
                .map(|c| (c.cpu, c.wait_time_ns))
                .collect()
        } else if let Some(sums) = &runq_sums {
            sums.clone()
        } else {
            self.starts.end_collection(now);
            return Ok(());
        };
        // schedstat counts since boot; the eBPF sums since attach.
        let wait_starts = if self.schedstat {
            &mut self.wait_starts
        } else {
            &mut self.starts
        };
        let points = waits
            .iter()
            .map(|(cpu, ns)| {
                let attributes: Attributes = vec![("cpu.logical_number", (*cpu).into())];
                let v = *ns as f64 / 1e9;
                let start = wait_starts.observe(WAIT, &attributes, v, now);
                sum_point(attributes, start, now, Number::Double(v))
            })
            .collect();
        self.starts.end_collection(now);
        self.wait_starts.end_collection(now);
        out.push(Metric::counter(
            WAIT,
            "Time tasks spent runnable but waiting on each CPU's run queue.",
            "s",
            points,
        ));
        Ok(())
    }
}
