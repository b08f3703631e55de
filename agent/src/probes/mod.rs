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

pub mod caps;
#[cfg(test)]
mod contract;
pub mod iter;
pub mod verifier;

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::time::{Duration, SystemTime};

use aya::programs::{Program, ProgramError};
use aya::{Btf, Ebpf, EbpfLoader};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::families::{BtfCell, PrepareCtx, Prepared};
use crate::gate::rules::{Run, Variant};
use crate::gate::{self, Family, Hook, HookStatus, KernelFacts, Mode, Plan, Source};
use crate::sources::btf::VMLINUX;

/// The eBPF object built from `agent-ebpf` by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/perch.bpf.o"));

/// Errors that stop start-up: only a configured mode that cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The plan could not honour a forced mode; names the family and the
    /// kernel's reason.
    #[error(transparent)]
    Plan(#[from] gate::PlanError),
    /// `probes.btf_path` names a file that is not usable BTF.
    #[error("probes.btf_path: {0}")]
    BtfFile(String),
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
    /// Kernel BTF, parsed at most once, shared by the families' preparation
    /// and collectors; dropped by [`Probes::finish`].
    pub(crate) btf: BtfCell,
    /// The configured mode of each family.
    modes: BTreeMap<Family, Mode>,
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
    /// configured mode cannot be honoured (e.g. `mode = "ebpf"` and nothing
    /// loads). Call [`Probes::finish`] once the collectors are built.
    pub fn start(config: &Config) -> Result<Probes, ProbeError> {
        let cfg = &config.probes;
        let modes: BTreeMap<Family, Mode> = Family::ALL.iter().map(|&f| (f, cfg.mode(f))).collect();
        let mut facts = gate::kernel::detect();
        placement(&mut facts, &config.agent.proc_root);
        let needs_ebpf = Family::ALL.iter().any(|&f| {
            cfg.wants_ebpf(f)
                && f.rule()
                    .variants
                    .iter()
                    .any(|v| !cfg.skip_hooks.contains(&v.hook))
        });
        let btf = match &cfg.btf_path {
            // Asked for by name: a file that is not BTF is an error.
            Some(path) => {
                let data = crate::sources::btf::read_btf_file(path)
                    .map_err(|e| ProbeError::BtfFile(e.to_string()))?;
                let btf = Btf::parse(&data, aya::Endianness::default()).map_err(|e| {
                    ProbeError::BtfFile(format!("{}: {}", path.display(), error_chain(&e)))
                })?;
                facts.btf = true;
                facts.btf_source = Some(path.display().to_string());
                Some(btf)
            }
            None if facts.btf => match Btf::from_sys_fs() {
                Ok(b) => {
                    facts.btf_source = Some(VMLINUX.to_owned());
                    Some(b)
                }
                Err(e) => {
                    warn!(error = %e, path = VMLINUX, "kernel BTF unreadable; tp_btf variants disabled");
                    facts.btf = false;
                    None
                }
            },
            None => None,
        };

        // Each family that may run on eBPF says what its programs need.
        let shared_btf = BtfCell::new(cfg.btf_path.clone());
        let tracefs = if facts.tracefs {
            crate::sources::tracefs::mount()
        } else {
            None
        };
        let prepare_ctx = PrepareCtx {
            config: &config.probes,
            proc_root: &config.agent.proc_root,
            sys_root: &config.agent.sys_root,
            host_pid_namespace: facts.host_pid_namespace,
            btf: &shared_btf,
            tracefs: tracefs.as_deref(),
        };
        let prepared: BTreeMap<Family, Prepared> = Family::ALL
            .iter()
            .filter(|&&f| cfg.wants_ebpf(f) && !f.rule().variants.is_empty())
            .map(|&f| (f, f.unit().prepare(&prepare_ctx)))
            .collect();
        for (&family, p) in &prepared {
            facts
                .unused_programs
                .extend(p.unused_programs.iter().copied());
            for (hook, note) in &p.notes {
                facts.notes.insert((family, *hook), note.clone());
            }
        }

        let mut ebpf = None;
        if needs_ebpf {
            raise_memlock();
            let mut loader = EbpfLoader::new();
            loader.btf(btf.as_ref());
            for p in prepared.values() {
                for (name, bytes) in &p.globals {
                    loader.override_global(name, bytes.as_slice(), true);
                }
                for (name, size) in &p.map_sizes {
                    loader.map_max_entries(name, *size);
                }
            }
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

        for &family in Family::ALL {
            let requested = modes[&family];
            for v in family.rule().variants {
                let refused = prepared.get(&family).and_then(|p| p.refused.get(&v.hook));
                let status = if matches!(requested, Mode::Off | Mode::Procfs) {
                    HookStatus::NotTried(format!("mode = {requested}"))
                } else if cfg.skip_hooks.contains(&v.hook) {
                    HookStatus::NotTried(format!("{} is in probes.skip_hooks", v.hook))
                } else if let Some(err) = &facts.object_error {
                    HookStatus::NotTried(format!("eBPF object not loaded: {err}"))
                } else if v.needs_btf && btf.is_none() {
                    HookStatus::NotTried(format!(
                        "kernel BTF not available at {VMLINUX} (probes.btf_path can name a BTF file for this kernel)"
                    ))
                } else if let Some(why) = refused {
                    HookStatus::NotTried(why.clone())
                } else if let Some(ebpf) = ebpf.as_mut() {
                    let mut logs = Vec::new();
                    let status = load_variant(ebpf, v, btf.as_ref(), &mut logs);
                    for (program, log) in logs {
                        debug!(%family, hook = %v.hook, program, log = %log, "verifier log of a refused program");
                        facts.verifier_logs.push(gate::VerifierLog {
                            family,
                            hook: v.hook,
                            program,
                            log,
                        });
                    }
                    status
                } else {
                    HookStatus::NotTried("eBPF object not loaded".into())
                };
                facts.hooks.insert((family, v.hook), status);
            }
        }
        drop(prepared);

        let mut probes = Probes {
            ebpf,
            plan: Plan {
                families: Vec::new(),
            },
            facts,
            attached: BTreeMap::new(),
            iters: BTreeMap::new(),
            btf: shared_btf,
            modes,
        };
        probes.plan_and_attach()?;
        Ok(probes)
    }

    /// Plans, and attaches the planned variants not attached yet; a failed
    /// attach is recorded and the family planned again.
    fn plan_and_attach(&mut self) -> Result<(), ProbeError> {
        loop {
            let modes = &self.modes;
            let plan = gate::plan(&self.facts, |f| modes[&f])?;
            let mut replan = false;
            for fp in &plan.families {
                let (Source::Ebpf, Some(hook)) = (fp.source, fp.hook) else {
                    continue;
                };
                if self.attached.get(&fp.family).map(|(h, _)| *h) == Some(hook) {
                    continue;
                }
                let variant = variant(fp.family, hook);
                let ebpf = self
                    .ebpf
                    .as_mut()
                    .expect("a variant loaded, so the object exists");
                match attach_variant(ebpf, variant, &self.facts.unused_programs) {
                    Ok(linked) => {
                        self.attached.insert(fp.family, (hook, SystemTime::now()));
                        self.iters.extend(linked);
                    }
                    Err(e) => {
                        warn!(family = %fp.family, %hook, error = %e, "attach failed; planning the family again");
                        self.facts
                            .hooks
                            .insert((fp.family, hook), HookStatus::Failed(e));
                        replan = true;
                    }
                }
            }
            if !replan {
                self.plan = plan;
                return Ok(());
            }
        }
    }

    /// `family`'s collector cannot use its attached `hook` variant (a map
    /// missing or of the wrong shape): the variant is marked failed with
    /// `reason`, its programs unloaded, and the family planned again.
    pub fn refuse(&mut self, family: Family, hook: Hook, reason: String) -> Result<(), ProbeError> {
        self.facts
            .hooks
            .insert((family, hook), HookStatus::Failed(reason));
        if let Some(ebpf) = self.ebpf.as_mut() {
            for p in variant(family, hook).programs {
                if let Some(prog) = ebpf.program_mut(p.program) {
                    let _ = unload(prog);
                }
            }
        }
        self.attached.remove(&family);
        self.plan_and_attach()
    }

    /// `family` cannot be collected at all: it is planned off, with `reason`.
    pub fn turn_off(&mut self, family: Family, reason: String) {
        if let Some(fp) = self.plan.families.iter_mut().find(|p| p.family == family) {
            fp.source = Source::Off;
            fp.hook = None;
            fp.reads = String::new();
            fp.reason = reason;
        }
    }

    /// After the collectors are built: unloads every program the plan does
    /// not use, drops the shared kernel BTF, and logs the plan.
    pub fn finish(&mut self) {
        if let Some(ebpf) = self.ebpf.as_mut() {
            for &family in Family::ALL {
                for v in family.rule().variants {
                    let in_use = self.attached.get(&family).map(|(h, _)| *h) == Some(v.hook);
                    for p in v.programs {
                        if in_use && !self.facts.unused_programs.contains(p.program) {
                            continue;
                        }
                        if let Some(prog) = ebpf.program_mut(p.program) {
                            let _ = unload(prog);
                        }
                    }
                }
            }
        }
        self.btf = BtfCell::default();
        info!(plan = %self.plan.summary(), kernel = %self.facts.release, btf = self.facts.btf, "probes ready");
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
            for p in variant(*family, *hook).programs_used(&self.facts.unused_programs) {
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

/// `kernel.bpf_stats_enabled`: whether the kernel counts program runs and
/// their time (it costs two clock reads per run, so hosts leave it off;
/// `sysctl kernel.bpf_stats_enabled=1` turns it on). `None`: unreadable.
pub fn bpf_stats_enabled() -> Option<bool> {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .ok()
        .map(|v| v.trim() != "0")
}

/// Where the agent runs: the host's pid namespace or not, and whether
/// `proc_root` is the host's `/proc`. What either costs is said once, here,
/// and the families that lose something say it in their plan.
fn placement(facts: &mut KernelFacts, proc_root: &std::path::Path) {
    facts.host_pid_namespace =
        gate::kernel::is_init_pid_ns(std::path::Path::new("/proc/self/ns/pid"));
    // Reading pid 1's namespace needs ptrace rights over it (CAP_SYS_PTRACE,
    // which the agent does not hold); in the host's pid namespace, a
    // `proc_root` whose `self` is this process is that namespace's /proc.
    facts.host_proc = gate::kernel::is_init_pid_ns(&proc_root.join("1/ns/pid")).or_else(|| {
        (facts.host_pid_namespace == Some(true)).then(|| {
            std::fs::read_link(proc_root.join("self"))
                .ok()
                .is_some_and(|p| p.as_os_str() == std::process::id().to_string().as_str())
        })
    });
    if facts.host_pid_namespace == Some(false) {
        facts.warnings.push(
            "not in the host's pid namespace: BPF task iterators see only this namespace's \
             processes, so the tcp family's socket walk misses other processes' open \
             connections until they close (run with the host's pid namespace, hostPID: true)"
                .to_owned(),
        );
    }
    if facts.host_proc == Some(false) {
        facts.warnings.push(format!(
            "agent.proc_root ({}) is not the host's /proc (its pid 1 is not the host's init): \
             mount the host's /proc there (/host/proc in the DaemonSet)",
            proc_root.display()
        ));
    }
    for w in &facts.warnings {
        warn!(warning = %w, "placement");
    }
}

fn variant(family: Family, hook: Hook) -> &'static Variant {
    family
        .rule()
        .variants
        .iter()
        .find(|v| v.hook == hook)
        .expect("the plan only picks variants from the rules")
}

/// Loads every program of a variant; the verifier's verdict is the test.
/// A refused program's whole verifier log goes to `logs`.
fn load_variant(
    ebpf: &mut Ebpf,
    v: &Variant,
    btf: Option<&Btf>,
    logs: &mut Vec<(&'static str, String)>,
) -> HookStatus {
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
            if let ProgramError::LoadError { verifier_log, .. } = &e {
                let log = verifier_log.to_string();
                if !log.trim().is_empty() {
                    logs.push((p.program, log));
                }
            }
            return HookStatus::Failed(format!("load {}: {}", p.program, program_error(&e)));
        }
    }
    HookStatus::Ok
}

/// Attaches every program of a variant the kernel needs (those not in
/// `unused`), in the variant's order, or none: on failure the ones already
/// attached are detached again. Returns the linked iterators, each already
/// run once.
fn attach_variant(
    ebpf: &mut Ebpf,
    v: &Variant,
    unused: &std::collections::BTreeSet<&'static str>,
) -> Result<Vec<(&'static str, iter::IterLink)>, String> {
    let mut done = Vec::new();
    let mut linked = Vec::new();
    for p in v.programs_used(unused) {
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
        Some(Program::RawTracePoint(prog)) => prog
            .attach(p.target)
            .map(|_| None)
            .map_err(|e| raw_tp_error(&e)),
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

/// A `raw_tp` attach refused with `EINVAL` has one usual cause, which the
/// errno alone does not say: the program reads more arguments than the
/// tracepoint passes on this kernel (`bpf_probe_register()` checks the
/// verifier's `max_ctx_offset` against `num_args * 8`).
fn raw_tp_error(e: &ProgramError) -> String {
    let text = program_error(e);
    match e {
        ProgramError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EINVAL) => {
            format!(
                "{text} (the program reads more tracepoint arguments than this kernel's \
                 tracepoint passes: an argument added in a later kernel)"
            )
        }
        _ => text,
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

/// The kernel's message, compact: the errno and the verifier's reason
/// ([`verifier::summarize`]: its error line, the failing instruction and the
/// source line, not the statistics the log ends with).
fn program_error(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let reason = verifier::summarize(&verifier_log.to_string());
            if reason.is_empty() {
                format!("{io_error}")
            } else {
                format!("{io_error}; verifier: {reason}")
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

#[cfg(test)]
mod tests {
    use super::{program_error, raw_tp_error};
    use aya::programs::ProgramError;
    use aya::sys::SyscallError;

    fn attach_failed(errno: i32) -> ProgramError {
        ProgramError::SyscallError(SyscallError {
            call: "bpf_raw_tracepoint_open",
            io_error: std::io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn raw_tp_einval_says_why() {
        let e = raw_tp_error(&attach_failed(libc::EINVAL));
        assert!(
            e.contains("(os error 22)") && e.contains("more tracepoint arguments"),
            "{e}"
        );
        let other = attach_failed(libc::ENOENT);
        assert_eq!(raw_tp_error(&other), program_error(&other));
    }
}
