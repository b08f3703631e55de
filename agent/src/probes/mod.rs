//! Loading and attaching the kernel programs, family by family.
//!
//! Start-up follows the gate: every program of every eBPF variant a family
//! may use is loaded (the verifier's verdict is the support test), the pure
//! [`gate::plan`] picks a variant, and the variant's programs are attached
//! one by one. A load, verifier or attach failure disables that variant only:
//! it is recorded with the kernel's message and the family is planned again,
//! down to its procfs fallback. The agent never stops for one probe.
//!
//! Programs of variants that are not used are unloaded. Dropping [`Probes`]
//! detaches and unloads everything: nothing is pinned.

pub mod btf;
#[cfg(test)]
mod contract;
pub mod iter;

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::time::{Duration, SystemTime};

use aya::programs::{Program, ProgramError};
use aya::{Btf, Ebpf, EbpfLoader};
use tracing::{info, warn};

use crate::config::{ProbesConfig, RunqueueClock};
use crate::gate::rules::Run;
use crate::gate::{self, Family, Hook, HookStatus, KernelFacts, Mode, Plan, Source, RULES};

/// The eBPF object built from `agent-ebpf` by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/perch.bpf.o"));

/// Errors that stop start-up: only a configured mode that cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The plan could not honour a forced mode; names the family and the
    /// kernel's reason.
    #[error(transparent)]
    Plan(#[from] gate::PlanError),
}

/// Kernel-side run statistics of one attached program (`kernel.bpf_stats_enabled`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramStats {
    pub family: Family,
    pub program: &'static str,
    pub run_time: Duration,
    pub run_count: u64,
}

/// The loaded object, the facts, the plan, and what is attached.
pub struct Probes {
    ebpf: Option<Ebpf>,
    pub facts: KernelFacts,
    pub plan: Plan,
    /// Families attached in the kernel, with the time they were attached
    /// (the start time of their cumulative counters).
    attached: BTreeMap<Family, (Hook, SystemTime)>,
    /// Linked iterators ([`Run::Iter`]), by program name, until a collector
    /// takes them.
    iters: BTreeMap<&'static str, iter::IterLink>,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes")
            .field("plan", &self.plan)
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

impl Probes {
    /// Probes the kernel, plans, and attaches. Fails only when a family's
    /// configured mode cannot be honoured (e.g. `mode = "ebpf"` and nothing loads).
    pub fn start(cfg: &ProbesConfig) -> Result<Probes, ProbeError> {
        let mode = |f: Family| cfg.mode(f);
        let mut facts = gate::kernel::detect();
        let needs_ebpf = RULES.iter().any(|r| {
            r.variants.iter().any(|v| !cfg.skip_hooks.contains(&v.hook))
                && matches!(mode(r.family), Mode::Auto | Mode::Ebpf)
        });
        let btf = if facts.btf {
            match Btf::from_sys_fs() {
                Ok(b) => Some(b),
                Err(e) => {
                    warn!(error = %e, path = gate::kernel::BTF_PATH, "kernel BTF unreadable; tp_btf variants disabled");
                    None
                }
            }
        } else {
            None
        };
        // Struct offsets for the TCP and sched programs, from one parse of
        // the kernel's BTF, only when a family that reads them may run.
        let wants = |f: Family| matches!(mode(f), Mode::Auto | Mode::Ebpf);
        let kernel_btf = if facts.btf && (wants(Family::Tcp) || wants(Family::Sched)) {
            btf::KernelBtf::from_sys_fs().map_err(|e| e.to_string())
        } else {
            Err(format!("no kernel BTF at {}", gate::kernel::BTF_PATH))
        };
        // The socket-counter table is preallocated: full size only when its
        // variant may run.
        let tracked_slots = if wants(Family::Tcp) && !cfg.skip_hooks.contains(&Hook::TpBtf) {
            cfg.tcp.tracked_slots()
        } else {
            1
        };
        // The TCP programs read kernel structs at offsets found in BTF; without
        // them its variants are not tried.
        let tcp_offsets = match &kernel_btf {
            Ok(k) if wants(Family::Tcp) => btf::tcp_offsets(
                k,
                cfg.tcp.rtt_per_peer,
                btf::ephemeral_range(std::path::Path::new("/proc")),
                btf::tick_ns(),
                tracked_slots,
            )
            .map_err(|e| format!("struct offsets from kernel BTF: {e}")),
            Ok(_) => Err(format!("mode = {}", mode_name(mode(Family::Tcp)))),
            Err(e) => Err(format!("struct offsets need kernel BTF: {e}")),
        };
        // The scheduler's own run-queue stamps, when the kernel keeps them
        // and the config allows.
        let sched_offsets = if !wants(Family::Sched) {
            Err(String::new())
        } else if cfg.sched.runqueue_clock == RunqueueClock::Wakeup {
            Err("probes.sched.runqueue_clock = \"wakeup\"".to_owned())
        } else {
            match &kernel_btf {
                Ok(k) => btf::sched_offsets(k)
                    .map_err(|e| format!("{e} (kernel built without CONFIG_SCHED_INFO?)")),
                Err(e) => Err(e.clone()),
            }
        };
        drop(kernel_btf);
        facts.sched_info = sched_offsets.is_ok();
        facts.runqueue_clock = match &sched_offsets {
            Ok(_) => {
                "run-queue waits from the kernel's sched_info stamps (no sched_wakeup programs)"
                    .to_owned()
            }
            Err(e) if e.is_empty() => String::new(),
            Err(e) => format!("run-queue waits timed from sched_wakeup: {e}"),
        };
        // Classic tracepoints: record offsets from tracefs, when mounted.
        let tp_offsets = if facts.tracefs {
            tracepoint_offsets()
        } else {
            Err("tracefs is not mounted".to_owned())
        };
        let mut ebpf = None;
        if needs_ebpf {
            raise_memlock();
            let mut loader = EbpfLoader::new();
            loader.btf(btf.as_ref());
            if let Ok(offsets) = &tp_offsets {
                loader.override_global(agent_common::tracepoint::GLOBAL_OFFSETS, offsets, true);
            }
            if let Ok(offsets) = &tcp_offsets {
                loader.override_global(agent_common::tcp::GLOBAL_OFFSETS, offsets, true);
            }
            if let Ok(offsets) = &sched_offsets {
                loader.override_global(agent_common::sched::GLOBAL_OFFSETS, offsets, true);
            }
            loader.map_max_entries(agent_common::tcp::MAP_PEERS, cfg.tcp.max_peers);
            loader.map_max_entries(agent_common::tcp::MAP_TRACKED, tracked_slots);
            loader.map_max_entries(
                agent_common::tcp::MAP_RTT_PEERS,
                if cfg.tcp.rtt_per_peer {
                    cfg.tcp
                        .max_peers
                        .saturating_mul(agent_common::tcp::RTT_PEER_BUCKETS_PER_PEER)
                } else {
                    1
                },
            );
            match loader.load(OBJECT) {
                Ok(e) => ebpf = Some(e),
                Err(e) => {
                    let mut msg = error_chain(&e);
                    if msg.contains("Operation not permitted") {
                        msg.push_str(
                            " (Perch needs CAP_BPF and CAP_PERFMON to load its programs; \
                             without them every family uses its fallback)",
                        );
                    }
                    warn!(error = %msg, "eBPF object not loaded; every family falls back");
                    facts.object_error = Some(msg);
                }
            }
        }

        for rule in RULES {
            let requested = mode(rule.family);
            for v in rule.variants {
                let status = if matches!(requested, Mode::Off | Mode::Procfs) {
                    HookStatus::NotTried(format!("mode = {}", mode_name(requested)))
                } else if cfg.skip_hooks.contains(&v.hook) {
                    HookStatus::NotTried(format!("{} is in probes.skip_hooks", v.hook))
                } else if let Some(err) = &facts.object_error {
                    HookStatus::NotTried(format!("eBPF object not loaded: {err}"))
                } else if v.needs_btf && btf.is_none() {
                    HookStatus::NotTried(format!(
                        "kernel BTF not available at {}",
                        gate::kernel::BTF_PATH
                    ))
                } else if let (Family::Tcp, Err(e)) = (rule.family, &tcp_offsets) {
                    HookStatus::NotTried(e.clone())
                } else if let (Hook::Tracepoint, Err(e)) = (v.hook, &tp_offsets) {
                    HookStatus::NotTried(e.clone())
                } else if let Some(ebpf) = ebpf.as_mut() {
                    load_variant(ebpf, v, btf.as_ref())
                } else {
                    HookStatus::NotTried("eBPF object not loaded".into())
                };
                facts.hooks.insert((rule.family, v.hook), status);
            }
        }

        let mut attached = BTreeMap::new();
        let mut iters = BTreeMap::new();
        let plan = loop {
            let plan = gate::plan(&facts, mode)?;
            let mut replan = false;
            for fp in &plan.families {
                let (Source::Ebpf, Some(hook)) = (fp.source, fp.hook) else {
                    continue;
                };
                if attached.contains_key(&fp.family) {
                    continue;
                }
                let variant = variant(fp.family, hook);
                let ebpf = ebpf
                    .as_mut()
                    .expect("a variant loaded, so the object exists");
                match attach_variant(ebpf, variant, facts.sched_info) {
                    Ok(linked) => {
                        attached.insert(fp.family, (hook, SystemTime::now()));
                        iters.extend(linked);
                    }
                    Err(e) => {
                        warn!(family = %fp.family, %hook, error = %e, "attach failed; planning the family again");
                        facts.hooks.insert((fp.family, hook), HookStatus::Failed(e));
                        replan = true;
                    }
                }
            }
            if !replan {
                break plan;
            }
        };

        // Unload what the plan does not use.
        if let Some(ebpf) = ebpf.as_mut() {
            for rule in RULES {
                for v in rule.variants {
                    let in_use = attached.get(&rule.family).map(|(h, _)| *h) == Some(v.hook);
                    for p in v.programs {
                        if in_use && p.used(facts.sched_info) {
                            continue;
                        }
                        if let Some(prog) = ebpf.program_mut(p.program) {
                            let _ = unload(prog);
                        }
                    }
                }
            }
        }
        info!(plan = %plan.summary(), kernel = %facts.release, btf = facts.btf, "probes ready");
        Ok(Probes {
            ebpf,
            facts,
            plan,
            attached,
            iters,
        })
    }

    /// The source planned for `family`.
    pub fn source(&self, family: Family) -> Source {
        self.plan
            .get(family)
            .map(|p| p.source)
            .unwrap_or(Source::Off)
    }

    /// When `family`'s programs were attached, if they are.
    pub fn attached_at(&self, family: Family) -> Option<SystemTime> {
        self.attached.get(&family).map(|(_, t)| *t)
    }

    /// Takes a map out of the object for a collector to own.
    pub fn take_map(&mut self, name: &str) -> Option<aya::maps::Map> {
        self.ebpf.as_mut()?.take_map(name)
    }

    /// Takes the linked iterator of `program` (a [`Run::Iter`] program of an
    /// attached variant) for a collector to run.
    pub fn take_iter(&mut self, program: &str) -> Option<iter::IterLink> {
        self.iters.remove(program)
    }

    /// Run time and count of every attached program. Zero unless
    /// `kernel.bpf_stats_enabled` is set.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        let Some(ebpf) = self.ebpf.as_ref() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (family, (hook, _)) in &self.attached {
            for p in variant(*family, *hook).programs_used(self.facts.sched_info) {
                let Some(info) = ebpf.program(p.program).and_then(|prog| prog.info().ok()) else {
                    continue;
                };
                out.push(ProgramStats {
                    family: *family,
                    program: p.program,
                    run_time: info.run_time(),
                    run_count: info.run_count(),
                });
            }
        }
        out
    }
}

/// Record offsets of the classic tracepoints the programs read, from the
/// kernel's own format files.
fn tracepoint_offsets() -> Result<agent_common::tracepoint::TpOffsets, String> {
    use crate::procfs::tracefs;
    let root = tracefs::mount().ok_or("tracefs is not mounted")?;
    let off = |event: &str, field: &str| {
        tracefs::field_offset(&root, event, field)
            .map_err(|e| format!("tracepoint record layout: {e}"))
    };
    Ok(agent_common::tracepoint::TpOffsets {
        switch_prev_pid: off("sched/sched_switch", "prev_pid")?,
        switch_prev_state: off("sched/sched_switch", "prev_state")?,
        switch_next_pid: off("sched/sched_switch", "next_pid")?,
        wakeup_pid: off("sched/sched_wakeup", "pid")?,
        softirq_vec: off("irq/softirq_exit", "vec")?,
        _pad: 0,
    })
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Auto => "auto",
        Mode::Ebpf => "ebpf",
        Mode::Procfs => "procfs",
        Mode::Off => "off",
    }
}

fn variant(family: Family, hook: Hook) -> &'static gate::rules::Variant {
    gate::rules::rule(family)
        .and_then(|r| r.variants.iter().find(|v| v.hook == hook))
        .expect("the plan only picks variants from the rules")
}

/// Loads every program of a variant; the verifier's verdict is the test.
fn load_variant(ebpf: &mut Ebpf, v: &gate::rules::Variant, btf: Option<&Btf>) -> HookStatus {
    for p in v.programs {
        let Some(prog) = ebpf.program_mut(p.program) else {
            return HookStatus::Failed(format!("program {} missing from the object", p.program));
        };
        let r = match (v.hook, prog) {
            (_, Program::Iter(prog)) if p.run == Run::Iter => match btf {
                Some(btf) => prog.load(p.target, btf),
                None => return HookStatus::NotTried("no kernel BTF".into()),
            },
            (Hook::TpBtf, Program::BtfTracePoint(prog)) => match btf {
                Some(btf) => prog.load(p.target, btf),
                None => return HookStatus::NotTried("no kernel BTF".into()),
            },
            (Hook::RawTp, Program::RawTracePoint(prog)) => prog.load(),
            (Hook::Tracepoint, Program::TracePoint(prog)) => prog.load(),
            (hook, _) => {
                return HookStatus::Failed(format!("program {} is not a {hook} program", p.program))
            }
        };
        if let Err(e) = r {
            return HookStatus::Failed(format!("load {}: {}", p.program, program_error(&e)));
        }
    }
    HookStatus::Ok
}

/// Attaches every program of a variant the kernel needs (see
/// [`gate::rules::ProgramSpec::used`]), in the variant's order, or none: on
/// failure the ones already attached are detached again. Returns the linked
/// iterators, each already run once.
fn attach_variant(
    ebpf: &mut Ebpf,
    v: &gate::rules::Variant,
    sched_info: bool,
) -> Result<Vec<(&'static str, iter::IterLink)>, String> {
    let mut done = Vec::new();
    let mut linked = Vec::new();
    for p in v.programs_used(sched_info) {
        match attach_one(ebpf, p) {
            Ok(Some(link)) => linked.push((p.program, link)),
            Ok(None) => {}
            Err(e) => {
                for name in done {
                    if let Some(prog) = ebpf.program_mut(name) {
                        let _ = unload(prog);
                    }
                }
                return Err(format!("attach {} to {}: {e}", p.program, p.target));
            }
        }
        done.push(p.program);
    }
    Ok(linked)
}

/// Attaches one program; an iterator is linked and run once (returned).
fn attach_one(
    ebpf: &mut Ebpf,
    p: &gate::rules::ProgramSpec,
) -> Result<Option<iter::IterLink>, String> {
    let perr = |e: ProgramError| program_error(&e);
    match ebpf.program_mut(p.program) {
        Some(Program::BtfTracePoint(prog)) => prog.attach().map(|_| None).map_err(perr),
        Some(Program::RawTracePoint(prog)) => prog.attach(p.target).map(|_| None).map_err(perr),
        Some(Program::TracePoint(prog)) => {
            let (cat, name) = p.target.split_once('/').unwrap_or(("", p.target));
            prog.attach(cat, name).map(|_| None).map_err(perr)
        }
        Some(Program::Iter(prog)) => {
            let fd = prog.fd().map_err(perr)?;
            let link = iter::IterLink::link(fd.as_fd()).map_err(|e| e.to_string())?;
            link.run(&mut Vec::new()).map_err(|e| e.to_string())?;
            Ok(Some(link))
        }
        _ => Err(program_error(&ProgramError::NotLoaded)),
    }
}

/// Unloading also detaches every link of the program.
fn unload(prog: &mut Program) -> Result<(), ProgramError> {
    match prog {
        Program::BtfTracePoint(p) => p.unload(),
        Program::RawTracePoint(p) => p.unload(),
        Program::TracePoint(p) => p.unload(),
        Program::Iter(p) => p.unload(),
        _ => Ok(()),
    }
}

/// The kernel's message, compact: the errno and the verifier's last lines.
fn program_error(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("processed "))
                .collect();
            let tail = tail[tail.len().saturating_sub(2)..].join(" | ");
            if tail.is_empty() {
                format!("{io_error}")
            } else {
                format!("{io_error}; verifier: {tail}")
            }
        }
        other => error_chain(other),
    }
}

/// An error and its sources, skipping a source whose text the message
/// already contains (aya often repeats its source in its own message).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s
}

/// Below 5.11 BPF memory is charged to `RLIMIT_MEMLOCK`; from 5.11 on it is
/// charged to the memory cgroup and the limit does not matter. Without
/// `CAP_SYS_RESOURCE` raising it fails: a warning, not an error.
fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK (needed only before Linux 5.11)"
        );
    }
}
