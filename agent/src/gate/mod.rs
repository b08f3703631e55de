//! The kernel gate: what this kernel supports, and per family, where its
//! metrics come from.
//!
//! Support is found by trying: [`crate::probes`] loads every program of every
//! eBPF variant and records what the kernel said. [`plan`] is a pure function
//! from those facts and the configured modes to a [`Plan`]; a table of cases
//! tests it. When an attach later fails, the failure is recorded in the facts
//! and the family is planned again, so one rule decides everything.

pub mod kernel;
mod mode;
pub mod rules;

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

pub use crate::families::Family;
pub use mode::Mode;
pub use rules::{Hook, Rule};

/// What the kernel said about one eBPF variant of one family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "error", rename_all = "snake_case")]
pub enum HookStatus {
    /// Every program of the variant loaded; attached if the plan uses it.
    Ok,
    /// Loading or attaching failed; the kernel's message.
    Failed(String),
    /// Not tried, and why (e.g. no BTF for a `tp_btf` variant).
    NotTried(String),
}

/// A program the verifier refused, with its log as the kernel wrote it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerifierLog {
    pub family: Family,
    pub hook: Hook,
    pub program: &'static str,
    pub log: String,
}

/// Facts about the running kernel.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KernelFacts {
    /// `uname -r`.
    pub release: String,
    /// Parsed from the release, for display only: no decision uses it.
    pub version: Option<(u32, u32, u32)>,
    /// Kernel BTF is available: `/sys/kernel/btf/vmlinux`, or the file
    /// `probes.btf_path` names.
    pub btf: bool,
    /// Where the BTF in use was read from.
    pub btf_source: Option<String>,
    /// The whole verifier log of each program the kernel refused
    /// (`perch features --verifier-log`).
    pub verifier_logs: Vec<VerifierLog>,
    /// tracefs is mounted (classic tracepoints need it).
    pub tracefs: bool,
    /// Generic program-type support, by probing the kernel (informational).
    pub program_types: BTreeMap<String, HookStatus>,
    /// Map-type support, by probing the kernel.
    pub map_types: BTreeMap<String, HookStatus>,
    /// Why the eBPF object could not be loaded at all, if it could not.
    pub object_error: Option<String>,
    /// Per family and variant: did its programs load (and attach)?
    #[serde(serialize_with = "ser_hooks")]
    pub hooks: BTreeMap<(Family, Hook), HookStatus>,
    /// The agent runs in the host's (initial) pid namespace; `None` when
    /// `/proc/self/ns/pid` cannot be read. Outside it, a task iterator
    /// sees only the tasks of the agent's namespace.
    pub host_pid_namespace: Option<bool>,
    /// `agent.proc_root` shows the host's pid namespace (its pid 1 is the
    /// host's init); `None` when unknown.
    pub host_proc: Option<bool>,
    /// What the agent's placement costs, in words (logged at start-up,
    /// shown by `perch features`).
    pub warnings: Vec<String>,
    /// Programs the families' preparation leaves unattached on this
    /// kernel ([`crate::families::Prepared::unused_programs`]).
    pub unused_programs: BTreeSet<&'static str>,
    /// Per family and variant, a note the plan appends to its reason
    /// ([`crate::families::Prepared::notes`]).
    #[serde(serialize_with = "ser_notes")]
    pub notes: BTreeMap<(Family, Hook), String>,
}

fn ser_notes<S: serde::Serializer>(
    notes: &BTreeMap<(Family, Hook), String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(notes.len()))?;
    for ((family, hook), note) in notes {
        #[derive(Serialize)]
        struct Row<'a> {
            family: Family,
            hook: Hook,
            note: &'a str,
        }
        seq.serialize_element(&Row {
            family: *family,
            hook: *hook,
            note,
        })?;
    }
    seq.end()
}

fn ser_hooks<S: serde::Serializer>(
    hooks: &BTreeMap<(Family, Hook), HookStatus>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(hooks.len()))?;
    for ((family, hook), status) in hooks {
        #[derive(Serialize)]
        struct Row<'a> {
            family: Family,
            hook: Hook,
            #[serde(flatten)]
            status: &'a HookStatus,
        }
        seq.serialize_element(&Row {
            family: *family,
            hook: *hook,
            status,
        })?;
    }
    seq.end()
}

/// Where a family's metrics come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Ebpf,
    Procfs,
    Off,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Ebpf => "ebpf",
            Source::Procfs => "procfs",
            Source::Off => "off",
        }
    }
}

/// The decision for one family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FamilyPlan {
    pub family: Family,
    /// The configured mode.
    pub requested: Mode,
    pub source: Source,
    /// The eBPF variant, when `source` is `Ebpf`.
    pub hook: Option<Hook>,
    /// What the source reads (`tp_btf sched_switch, ...` or `/proc/stat`).
    pub reads: String,
    /// Why, in words.
    pub reason: String,
}

/// The decision for every family, in [`Family::ALL`] order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub families: Vec<FamilyPlan>,
}

impl Plan {
    pub fn get(&self, family: Family) -> Option<&FamilyPlan> {
        self.families.iter().find(|p| p.family == family)
    }

    /// One line summarising the plan, for the start-up log.
    pub fn summary(&self) -> String {
        self.families
            .iter()
            .map(|p| match p.hook {
                Some(h) => format!("{}={}({})", p.family, p.source.name(), h),
                None => format!("{}={}", p.family, p.source.name()),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A configured mode that this kernel or build cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// `mode = "ebpf"` for a family whose metrics come only from procfs.
    #[error("probes.{family}.mode = \"ebpf\": the {family} family has no eBPF source ({fallback}); use auto, procfs or off")]
    NoEbpfVariant {
        family: Family,
        fallback: &'static str,
    },
    /// `mode = "ebpf"` and no variant loads on this kernel.
    #[error("probes.{family}.mode = \"ebpf\" but no eBPF variant works on this kernel: {reasons}")]
    EbpfUnavailable { family: Family, reasons: String },
    /// `mode = "procfs"` for a family with no fallback.
    #[error("probes.{family}.mode = \"procfs\": the {family} family has no procfs fallback")]
    NoFallback { family: Family },
}

/// Decides, per family, the source to use.
pub fn plan(facts: &KernelFacts, mode: impl Fn(Family) -> Mode) -> Result<Plan, PlanError> {
    let families = Family::ALL
        .iter()
        .map(|&family| plan_family(facts, family, mode(family)))
        .collect::<Result<_, _>>()?;
    Ok(Plan { families })
}

fn plan_family(
    facts: &KernelFacts,
    family: Family,
    requested: Mode,
) -> Result<FamilyPlan, PlanError> {
    let rule = family.rule();
    let mut out = FamilyPlan {
        family,
        requested,
        source: Source::Off,
        hook: None,
        reads: String::new(),
        reason: String::new(),
    };
    let fallback = |out: &mut FamilyPlan, reason: String| -> Result<(), PlanError> {
        let reads = rule.fallback.ok_or(PlanError::NoFallback { family })?;
        out.source = Source::Procfs;
        out.reads = reads.to_owned();
        out.reason = reason;
        Ok(())
    };

    // The first variant whose programs loaded, and why the others did not.
    let mut failures = Vec::new();
    let mut usable = None;
    for v in rule.variants {
        match facts.hooks.get(&(family, v.hook)) {
            Some(HookStatus::Ok) => {
                usable = Some(v);
                break;
            }
            Some(HookStatus::Failed(e)) => failures.push(format!("{}: {e}", v.hook)),
            Some(HookStatus::NotTried(e)) => failures.push(format!("{}: not tried: {e}", v.hook)),
            None => failures.push(format!("{}: not probed", v.hook)),
        }
    }
    let failures = failures.join("; ");

    match requested {
        Mode::Off => out.reason = "disabled by config".into(),
        Mode::Procfs => fallback(&mut out, "forced by config".into())?,
        Mode::Ebpf | Mode::Auto if rule.variants.is_empty() => {
            if requested == Mode::Ebpf {
                return Err(PlanError::NoEbpfVariant {
                    family,
                    fallback: rule.fallback.unwrap_or("none"),
                });
            }
            fallback(
                &mut out,
                format!(
                    "procfs is the only source, and it loses {}",
                    rule.fallback_loses
                ),
            )?;
        }
        Mode::Ebpf | Mode::Auto => match usable {
            Some(v) => {
                out.source = Source::Ebpf;
                out.hook = Some(v.hook);
                out.reads = v
                    .programs_used(&facts.unused_programs)
                    .map(|p| p.describe(v.hook))
                    .collect::<Vec<_>>()
                    .join(", ");
                out.reason = if failures.is_empty() {
                    format!("{} programs load and attach", v.hook)
                } else {
                    format!("{} programs load and attach (skipped {failures})", v.hook)
                };
                if let Some(note) = facts.notes.get(&(family, v.hook)) {
                    out.reason = format!("{}; {note}", out.reason);
                }
            }
            None if requested == Mode::Ebpf => {
                return Err(PlanError::EbpfUnavailable {
                    family,
                    reasons: failures,
                })
            }
            None => fallback(
                &mut out,
                format!(
                    "no eBPF variant works ({failures}); the fallback loses {}",
                    rule.fallback_loses
                ),
            )?,
        },
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(hooks: &[(Family, Hook, HookStatus)]) -> KernelFacts {
        KernelFacts {
            hooks: hooks
                .iter()
                .map(|(f, h, s)| ((*f, *h), s.clone()))
                .collect(),
            ..KernelFacts::default()
        }
    }

    fn failed(msg: &str) -> HookStatus {
        HookStatus::Failed(msg.into())
    }

    /// (case, hooks, family, mode) -> expected (source, hook) or error.
    #[test]
    fn plan_table() {
        use Family::*;
        use Hook::*;
        type Expect = Result<(Source, Option<Hook>), &'static str>;
        type Case<'a> = (
            &'a str,
            &'a [(Family, Hook, HookStatus)],
            Family,
            Mode,
            Expect,
        );
        let all_ok = [
            (Sched, TpBtf, HookStatus::Ok),
            (Sched, RawTp, HookStatus::Ok),
            (Softirq, TpBtf, HookStatus::Ok),
            (Softirq, RawTp, HookStatus::Ok),
        ];
        let btf_fails = [
            (Sched, TpBtf, failed("EPERM")),
            (Sched, RawTp, HookStatus::Ok),
        ];
        let nothing_loads = [
            (Sched, TpBtf, HookStatus::NotTried("no BTF".into())),
            (Sched, RawTp, failed("invalid argument")),
            (Softirq, TpBtf, failed("EPERM")),
            (Softirq, RawTp, failed("EPERM")),
        ];
        // A 5.4 kernel with tracefs: prev_state is not a tp_btf/raw_tp
        // argument before 5.18, so only the classic tracepoint loads.
        let pre_5_18 = [
            (
                Sched,
                TpBtf,
                failed("invalid bpf_context access off=24 size=8"),
            ),
            (Sched, RawTp, failed("attach: invalid argument")),
            (Sched, Tracepoint, HookStatus::Ok),
        ];
        let pre_5_18_no_tracefs = [
            (
                Sched,
                TpBtf,
                failed("invalid bpf_context access off=24 size=8"),
            ),
            (Sched, RawTp, failed("attach: invalid argument")),
            (
                Sched,
                Tracepoint,
                HookStatus::NotTried("tracefs is not mounted".into()),
            ),
        ];
        let drops_ok = [
            (Drops, TpBtf, HookStatus::Ok),
            (Drops, RawTp, HookStatus::Ok),
        ];
        let drops_old_kernel = [
            (Drops, TpBtf, failed("invalid bpf_context access off=16")),
            (Drops, RawTp, failed("attach: invalid argument")),
        ];
        let drops_raw_only = [
            (Drops, TpBtf, failed("EPERM")),
            (Drops, RawTp, HookStatus::Ok),
        ];
        let tcp_ok = [(Tcp, TpBtf, HookStatus::Ok), (Tcp, RawTp, HookStatus::Ok)];
        // What probes records when the struct offsets could not be read.
        let no_offsets = || {
            HookStatus::NotTried("struct offsets need kernel BTF at /sys/kernel/btf/vmlinux".into())
        };
        let tcp_no_offsets = [(Tcp, TpBtf, no_offsets()), (Tcp, RawTp, no_offsets())];
        let cases: &[Case] = &[
            (
                "before 5.18 the classic tracepoint serves sched",
                &pre_5_18,
                Sched,
                Mode::Auto,
                Ok((Source::Ebpf, Some(Tracepoint))),
            ),
            (
                "before 5.18 without tracefs: procfs",
                &pre_5_18_no_tracefs,
                Sched,
                Mode::Auto,
                Ok((Source::Procfs, None)),
            ),
            (
                "auto prefers tp_btf",
                &all_ok,
                Sched,
                Mode::Auto,
                Ok((Source::Ebpf, Some(TpBtf))),
            ),
            (
                "auto falls to raw_tp",
                &btf_fails,
                Sched,
                Mode::Auto,
                Ok((Source::Ebpf, Some(RawTp))),
            ),
            (
                "auto falls to procfs",
                &nothing_loads,
                Sched,
                Mode::Auto,
                Ok((Source::Procfs, None)),
            ),
            (
                "auto, no facts at all",
                &[],
                Softirq,
                Mode::Auto,
                Ok((Source::Procfs, None)),
            ),
            (
                "ebpf forced and works",
                &btf_fails,
                Sched,
                Mode::Ebpf,
                Ok((Source::Ebpf, Some(RawTp))),
            ),
            (
                "ebpf forced, nothing loads",
                &nothing_loads,
                Sched,
                Mode::Ebpf,
                Err("no eBPF variant works"),
            ),
            (
                "procfs forced",
                &all_ok,
                Sched,
                Mode::Procfs,
                Ok((Source::Procfs, None)),
            ),
            ("off", &all_ok, Softirq, Mode::Off, Ok((Source::Off, None))),
            (
                "cpu auto is procfs",
                &all_ok,
                Cpu,
                Mode::Auto,
                Ok((Source::Procfs, None)),
            ),
            (
                "cpu ebpf is an error",
                &all_ok,
                Cpu,
                Mode::Ebpf,
                Err("has no eBPF source"),
            ),
            ("cpu off", &all_ok, Cpu, Mode::Off, Ok((Source::Off, None))),
            (
                "tcp auto prefers tp_btf",
                &tcp_ok,
                Tcp,
                Mode::Auto,
                Ok((Source::Ebpf, Some(TpBtf))),
            ),
            (
                "tcp without BTF offsets falls to procfs",
                &tcp_no_offsets,
                Tcp,
                Mode::Auto,
                Ok((Source::Procfs, None)),
            ),
            (
                "tcp ebpf forced without BTF offsets",
                &tcp_no_offsets,
                Tcp,
                Mode::Ebpf,
                Err("struct offsets need kernel BTF"),
            ),
            (
                "tcp procfs forced",
                &tcp_ok,
                Tcp,
                Mode::Procfs,
                Ok((Source::Procfs, None)),
            ),
            (
                "interfaces auto is sysfs",
                &all_ok,
                Interfaces,
                Mode::Auto,
                Ok((Source::Procfs, None)),
            ),
            (
                "interfaces ebpf is an error",
                &all_ok,
                Interfaces,
                Mode::Ebpf,
                Err("has no eBPF source"),
            ),
            (
                "connections auto is sock_diag/procfs",
                &all_ok,
                Connections,
                Mode::Auto,
                Ok((Source::Procfs, None)),
            ),
            (
                "connections ebpf is an error",
                &all_ok,
                Connections,
                Mode::Ebpf,
                Err("has no eBPF source"),
            ),
            (
                "connections procfs forced",
                &all_ok,
                Connections,
                Mode::Procfs,
                Ok((Source::Procfs, None)),
            ),
            (
                "drops auto prefers tp_btf",
                &drops_ok,
                Drops,
                Mode::Auto,
                Ok((Source::Ebpf, Some(TpBtf))),
            ),
            (
                "drops: pre-5.17 tp_btf fails, raw_tp fails to attach",
                &drops_old_kernel,
                Drops,
                Mode::Auto,
                Ok((Source::Procfs, None)),
            ),
            (
                "drops: tp_btf EPERM, raw_tp works",
                &drops_raw_only,
                Drops,
                Mode::Auto,
                Ok((Source::Ebpf, Some(RawTp))),
            ),
            (
                "drops ebpf forced on a pre-5.17 kernel",
                &drops_old_kernel,
                Drops,
                Mode::Ebpf,
                Err("no eBPF variant works"),
            ),
            (
                "drops procfs forced",
                &drops_ok,
                Drops,
                Mode::Procfs,
                Ok((Source::Procfs, None)),
            ),
        ];
        for (case, hooks, family, mode, expect) in cases {
            let f = facts(hooks);
            let got = plan(&f, |fam| if fam == *family { *mode } else { Mode::Auto });
            match (got, expect) {
                (Ok(p), Ok((source, hook))) => {
                    let fp = p.get(*family).expect("family planned");
                    assert_eq!((fp.source, fp.hook), (*source, *hook), "{case}: {fp:?}");
                    assert!(!fp.reason.is_empty(), "{case}: empty reason");
                }
                (Err(e), Err(needle)) => {
                    assert!(e.to_string().contains(needle), "{case}: {e}")
                }
                (got, expect) => panic!("{case}: got {got:?}, expected {expect:?}"),
            }
        }
    }

    #[test]
    fn reasons_carry_the_kernel_message() {
        let f = facts(&[
            (
                Family::Sched,
                Hook::TpBtf,
                failed("permission denied (EPERM)"),
            ),
            (
                Family::Sched,
                Hook::RawTp,
                failed("verifier: invalid bpf_context access"),
            ),
        ]);
        let p = plan(&f, |_| Mode::Auto).unwrap();
        let s = p.get(Family::Sched).unwrap();
        assert_eq!(s.source, Source::Procfs);
        assert!(
            s.reason.contains("tp_btf: permission denied (EPERM)"),
            "{}",
            s.reason
        );
        assert!(
            s.reason
                .contains("raw_tp: verifier: invalid bpf_context access"),
            "{}",
            s.reason
        );
        assert!(s.reason.contains("run-queue latency"), "{}", s.reason);

        let err = plan(&f, |fam| {
            if fam == Family::Sched {
                Mode::Ebpf
            } else {
                Mode::Auto
            }
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("probes.sched.mode"), "{msg}");
        assert!(msg.contains("EPERM"), "{msg}");
    }
}
