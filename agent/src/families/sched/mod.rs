//! Scheduler family: context switches, run-queue latency, scheduler wait.
//!
//! - Hooks (kernel side `agent-ebpf/src/sched.rs`): `sched_switch` as
//!   `tp_btf` or `raw_tp`, reading the kernel's `sched_info` stamps; with
//!   `sched_wakeup`/`sched_wakeup_new` where the kernel keeps none; the
//!   classic tracepoints (`sched/sched_switch`, ...) before 5.18.
//! - Metrics: `perch.cpu.context_switches`, `perch.scheduler.runqueue.latency`,
//!   `perch.scheduler.wait.time` (see `collector.rs`), and per cgroup
//!   `perch.container.runqueue.latency` (see `cgroups.rs`).
//! - Fallback: `/proc/stat` `ctxt` and `/proc/schedstat`.
//! - Oldest kernel: 5.18 for `tp_btf`/`raw_tp` (the `prev_state`
//!   argument), 4.7 for the classic tracepoint, any for procfs.

mod cgroups;
mod collector;
pub mod offsets;
pub mod schedstat;

use serde::Deserialize;

use agent_common::sched as c;

use crate::gate::rules::{p, Hook, Rule, Variant};
use crate::gate::Mode;
use crate::sources::tracefs;

use super::{BuildCtx, BuildError, PrepareCtx, Prepared, Section, Unit};

/// Programs that time run-queue waits from wake-ups, left unattached where
/// `sched_switch` reads the kernel's stamps.
const WAKEUP_PROGRAMS: [&str; 4] = [
    "sched_wakeup_btf",
    "sched_wakeup_new_btf",
    "sched_wakeup_raw",
    "sched_wakeup_new_raw",
];

pub const RULE: Rule = Rule {
    variants: &[
        // Both variants read sched_switch's prev_state argument, appended in
        // 5.18 (commit fa2c3254d7cf). Where task_struct has sched_info
        // (CONFIG_SCHED_INFO), sched_switch reads the kernel's run-queue
        // stamps and the wake-up programs are not attached; the classic
        // tracepoint sees pids, not tasks, and always times wake-ups.
        Variant {
            hook: Hook::TpBtf,
            programs: &[
                p("sched_switch_btf", "sched_switch"),
                p("sched_wakeup_btf", "sched_wakeup"),
                p("sched_wakeup_new_btf", "sched_wakeup_new"),
            ],
            min_kernel: (5, 18),
            needs_btf: true,
        },
        Variant {
            hook: Hook::RawTp,
            programs: &[
                p("sched_switch_raw", "sched_switch"),
                p("sched_wakeup_raw", "sched_wakeup"),
                p("sched_wakeup_new_raw", "sched_wakeup_new"),
            ],
            min_kernel: (5, 18),
            needs_btf: false,
        },
        // The classic record has carried prev_state since 2.6; BPF
        // tracepoint programs arrived in 4.7 (commit 98b5c2c65c29). Needs
        // tracefs mounted; offsets come from its format files.
        Variant {
            hook: Hook::Tracepoint,
            programs: &[
                p("sched_switch_tp", "sched/sched_switch"),
                p("sched_wakeup_tp", "sched/sched_wakeup"),
                p("sched_wakeup_new_tp", "sched/sched_wakeup_new"),
            ],
            min_kernel: (4, 7),
            needs_btf: false,
        },
    ],
    fallback: Some("/proc/stat ctxt, /proc/schedstat"),
    fallback_loses: "the voluntary/involuntary and per-CPU split of context switches, \
                     and the run-queue latency histogram",
};

/// `[probes.sched]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `auto`, `ebpf`, `procfs` or `off`. Default `auto`.
    pub mode: Mode,
    /// Export the run-queue latency histogram per CPU instead of one
    /// host-wide histogram. Multiplies that metric's series by the CPU
    /// count, so it is opt-in. Default `false`.
    pub runqueue_per_cpu: bool,
    /// How run-queue waits are timed. Default `auto`.
    pub runqueue_clock: RunqueueClock,
    /// Where `tp_btf`/`raw_tp` read the previous task's state. Default
    /// `auto`.
    pub prev_state: PrevState,
    /// Also record each run-queue wait in the waiting task's cgroup:
    /// `perch.container.runqueue.latency`, one histogram per container,
    /// pod cgroup and host cgroup (as `[probes.containers]` attributes
    /// them). Needs a cgroup2 mount (v2, or a hybrid host's `unified`).
    /// Costs one per-CPU array access per wait (+4 ns per context switch
    /// on the reference VM, docs/performance.md). Default `true`.
    pub runqueue_per_cgroup: bool,
    /// Bound of the per-CPU hash that holds the waits of cgroups that
    /// collide in the kernel's direct-mapped front array, in (cgroup,
    /// bucket) entries; waits past it go to the overflow series, counted.
    /// 1 024 to 1 048 576, default 4 096.
    pub max_cgroup_buckets: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Auto,
            runqueue_per_cpu: false,
            runqueue_clock: RunqueueClock::Auto,
            prev_state: PrevState::Auto,
            runqueue_per_cgroup: true,
            max_cgroup_buckets: c::CGROUP_RUNQ_DEFAULT_ENTRIES,
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
        if !(1024..=1 << 20).contains(&self.max_cgroup_buckets) {
            return Err((
                "max_cgroup_buckets".into(),
                "must be 1024 to 1048576".into(),
            ));
        }
        Ok(())
    }
}

/// `probes.sched.runqueue_clock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunqueueClock {
    /// The kernel's own stamps (`task_struct.sched_info`) where the kernel
    /// keeps them (`CONFIG_SCHED_INFO`): one program per context switch.
    /// Else the wake-up clock.
    #[default]
    Auto,
    /// `sched_wakeup` programs stamp every wake-up with a clock read: a
    /// second program per wake-up, and a wait that spans a load-balancer
    /// migration counts whole rather than from the last enqueue.
    Wakeup,
}

/// `probes.sched.prev_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrevState {
    /// `sched_switch`'s `prev_state` argument where it has one (5.18+),
    /// else `task_struct.__state`/`.state`.
    #[default]
    Auto,
    /// Always `task_struct.__state`/`.state`, as kernels before 5.18 must:
    /// one more load per switch, and a task that changes its state between
    /// the scheduler's decision and the tracepoint is classified by the new
    /// state. For testing and measuring the pre-5.18 path on a newer kernel.
    TaskStruct,
}

pub struct Sched;
pub static UNIT: Sched = Sched;

impl Unit for Sched {
    fn rule(&self) -> &'static Rule {
        &RULE
    }

    fn prepare(&self, ctx: &PrepareCtx<'_>) -> Prepared {
        let stamps = if ctx.config.sched.runqueue_clock == RunqueueClock::Wakeup {
            Err("probes.sched.runqueue_clock = \"wakeup\"".to_owned())
        } else {
            ctx.btf.get().and_then(|btf| {
                offsets::sched_offsets(btf)
                    .map_err(|e| format!("{e} (kernel built without CONFIG_SCHED_INFO?)"))
            })
        };
        // Where the previous task's state is: without BTF, assume the
        // argument (5.18+); an older kernel then refuses the load and says
        // so. Asked to read it from the task, without BTF there is no
        // task layout: tp_btf and raw_tp are refused.
        let from_task = ctx.config.sched.prev_state == PrevState::TaskStruct;
        let (state, no_layout) = match ctx.btf.get() {
            Ok(btf) => (offsets::task_state(btf, from_task), None),
            Err(e) => (Ok((0, 0)), from_task.then_some(e)),
        };
        let per_cgroup = if ctx.config.sched.runqueue_per_cgroup {
            crate::families::containers::ids::cgroup2_root(&ctx.sys_root.join("fs/cgroup"))
                .map(|_| ())
        } else {
            Err("probes.sched.runqueue_per_cgroup = false".to_owned())
        };
        let id_path = match (&per_cgroup, ctx.btf.get()) {
            (Ok(()), Ok(btf)) => offsets::cgroup_id_path(btf).ok(),
            _ => None,
        };
        let mut out = clock(stamps, state, per_cgroup.is_ok(), id_path);
        let note = match per_cgroup {
            Ok(()) => {
                out.map_sizes
                    .push((c::MAP_CGROUP_RUNQ, ctx.config.sched.max_cgroup_buckets));
                "; run-queue waits also per cgroup".to_owned()
            }
            Err(e) => {
                // The programs never touch it then: 1 slot, not 172 KiB per CPU.
                out.map_sizes.push((c::MAP_CGROUP_FRONT, 1));
                format!("; no per-cgroup run-queue latency: {e}")
            }
        };
        for n in out.notes.values_mut() {
            n.push_str(&note);
        }
        if let Some(e) = no_layout {
            let why = format!(
                "probes.sched.prev_state = \"task_struct\" needs the task's layout from BTF: {e}"
            );
            out.refuse_all(&RULE, &why, |h| h != Hook::Tracepoint);
        }
        match ctx.tracefs.map(tracepoint_offsets) {
            Some(Ok(tp)) => out.global(c::GLOBAL_TP_OFFSETS, &tp),
            Some(Err(e)) => {
                out.refused.insert(Hook::Tracepoint, e);
            }
            None => {
                out.refused
                    .insert(Hook::Tracepoint, "tracefs is not mounted".to_owned());
            }
        }
        out
    }

    fn build(
        &self,
        ctx: &mut BuildCtx<'_>,
    ) -> Result<Box<dyn crate::collectors::Collector>, BuildError> {
        Ok(Box::new(collector::SchedCollector::new(ctx)?))
    }
}

/// How `tp_btf`/`raw_tp` time run-queue waits: from the kernel's stamps
/// when their offsets are known (the wake-up programs stay unattached), else
/// from wake-ups, with why.
fn clock(
    stamps: Result<c::SchedOffsets, String>,
    state: Result<(u32, u32), crate::sources::btf::BtfError>,
    per_cgroup: bool,
    cgroup_id_path: Option<[u32; 4]>,
) -> Prepared {
    let mut out = Prepared::default();
    let mut offsets = stamps.clone().unwrap_or_default();
    offsets.per_cgroup = per_cgroup.into();
    if let Some([a, b, c_, d]) = cgroup_id_path {
        (
            offsets.task_cgroups,
            offsets.css_dfl_cgrp,
            offsets.cgroup_kn,
            offsets.kn_id,
        ) = (a, b, c_, d);
    }
    let mut note = match stamps {
        Ok(_) => {
            out.unused_programs.extend(WAKEUP_PROGRAMS);
            "run-queue waits from the kernel's sched_info stamps (no sched_wakeup programs)"
                .to_owned()
        }
        Err(e) => format!("run-queue waits timed from sched_wakeup: {e}"),
    };
    match state {
        Ok((0, 0)) => {}
        Ok((at, size)) => {
            (offsets.task_state, offsets.task_state_size) = (at, size);
            note.push_str(
                "; the previous task's state read from task_struct (sched_switch has no \
                 prev_state before 5.18, or probes.sched.prev_state = \"task_struct\")",
            );
        }
        Err(e) => {
            let why =
                format!("sched_switch has no prev_state and the task's state is not in BTF: {e}");
            out.refuse_all(&RULE, &why, |h| h != Hook::Tracepoint);
        }
    }
    out.global(c::GLOBAL_OFFSETS, &offsets);
    out.note_all(&RULE, &note, |h| h != Hook::Tracepoint);
    out.notes.insert(
        Hook::Tracepoint,
        "run-queue waits timed from sched_wakeup (a classic tracepoint sees pids, not tasks)"
            .to_owned(),
    );
    out
}

/// Record offsets of the classic tracepoints, from the kernel's own format
/// files.
fn tracepoint_offsets(root: &std::path::Path) -> Result<c::TpOffsets, String> {
    let off = |event: &str, field: &str| {
        tracefs::field_offset(root, event, field)
            .map_err(|e| format!("tracepoint record layout: {e}"))
    };
    Ok(c::TpOffsets {
        switch_prev_pid: off("sched/sched_switch", "prev_pid")?,
        switch_prev_state: off("sched/sched_switch", "prev_state")?,
        switch_next_pid: off("sched/sched_switch", "next_pid")?,
        wakeup_pid: off("sched/sched_wakeup", "pid")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::{plan, Family, HookStatus, KernelFacts};

    fn facts(hook: Hook, prepared: &Prepared) -> KernelFacts {
        let mut f = KernelFacts::default();
        f.hooks.insert((Family::Sched, hook), HookStatus::Ok);
        f.unused_programs
            .extend(prepared.unused_programs.iter().copied());
        for (h, note) in &prepared.notes {
            f.notes.insert((Family::Sched, *h), note.clone());
        }
        f
    }

    /// With the kernel's sched_info stamps the wake-up programs are not
    /// read, and the reason says which clock times run-queue waits; the
    /// classic tracepoint always times wake-ups.
    #[test]
    fn sched_reads_follow_the_runqueue_clock() {
        let stamped = clock(Ok(c::SchedOffsets::default()), Ok((0, 0)), false, None);
        let p = plan(&facts(Hook::TpBtf, &stamped), |_| Mode::Auto).unwrap();
        let sched = p.get(Family::Sched).unwrap();
        assert_eq!(sched.reads, "tp_btf sched_switch");
        assert!(
            sched.reason.ends_with(
                "; run-queue waits from the kernel's sched_info stamps (no sched_wakeup programs)"
            ),
            "{}",
            sched.reason
        );

        let wakeup = clock(Err("no stamps".into()), Ok((0, 0)), false, None);
        let p = plan(&facts(Hook::RawTp, &wakeup), |_| Mode::Auto).unwrap();
        let sched = p.get(Family::Sched).unwrap();
        assert_eq!(
            sched.reads,
            "raw_tp sched_switch, raw_tp sched_wakeup, raw_tp sched_wakeup_new"
        );
        assert!(
            sched.reason.ends_with("timed from sched_wakeup: no stamps"),
            "{}",
            sched.reason
        );

        let p = plan(&facts(Hook::Tracepoint, &stamped), |_| Mode::Auto).unwrap();
        let sched = p.get(Family::Sched).unwrap();
        assert!(
            sched.reads.contains("sched/sched_wakeup_new"),
            "{}",
            sched.reads
        );
        assert!(
            sched.reason.contains("classic tracepoint sees pids"),
            "{}",
            sched.reason
        );
    }

    /// Every program the stamps leave unattached is a program of the rule.
    #[test]
    fn wakeup_programs_are_in_the_rule() {
        for name in WAKEUP_PROGRAMS {
            assert!(
                RULE.variants
                    .iter()
                    .any(|v| v.programs.iter().any(|p| p.program == name)),
                "{name}"
            );
        }
    }
}
