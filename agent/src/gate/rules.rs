//! The shape of a compatibility rule: per family, the eBPF variants in
//! order of preference, the programs each needs, and the fallback. Each
//! family's rule is the `RULE` constant in its folder
//! (`agent/src/families/<name>/mod.rs`); [`crate::families::Family::rule`]
//! finds it.
//!
//! Preference is `tp_btf` > `raw_tp` > tracepoint. `tp_btf` (5.5, commit
//! ac4414b5ca47) gives typed arguments checked by the verifier against BTF;
//! `raw_tp` (4.17, commit c4f6699dfcb8) has the same arguments without BTF;
//! classic tracepoints need tracefs mounted, which is not the default on every
//! host. `min_kernel` documents where a variant first works; the gate never
//! decides from it: it loads the programs and believes the kernel.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// How an eBPF program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    /// BTF-typed raw tracepoint (`BPF_PROG_TYPE_TRACING`, `BPF_TRACE_RAW_TP`).
    TpBtf,
    /// Raw tracepoint (`BPF_PROG_TYPE_RAW_TRACEPOINT`).
    RawTp,
    /// Classic tracepoint through tracefs (`BPF_PROG_TYPE_TRACEPOINT`).
    Tracepoint,
    /// cgroup socket buffer program (`BPF_PROG_TYPE_CGROUP_SKB`).
    CgroupSkb,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::TpBtf => "tp_btf",
            Hook::RawTp => "raw_tp",
            Hook::Tracepoint => "tracepoint",
            Hook::CgroupSkb => "cgroup_skb",
        }
    }
}

impl std::str::FromStr for Hook {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Hook::TpBtf, Hook::RawTp, Hook::Tracepoint, Hook::CgroupSkb]
            .into_iter()
            .find(|h| h.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown hook `{s}`, expected one of tp_btf, raw_tp, tracepoint, cgroup_skb"
                )
            })
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a program of a variant runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Run {
    /// Attached to its target with the variant's hook, for the agent's life.
    Hook,
    /// A BPF iterator (`BPF_TRACE_ITER`, 5.8) over its target (`task_file`,
    /// ...): linked and run once when the variant is attached, then run by
    /// the family's collector at each collection.
    Iter,
}

/// One program of a variant: its name in the object and what it attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProgramSpec {
    /// Function name in `agent-ebpf`.
    pub program: &'static str,
    /// Tracepoint name (`tp_btf`, `raw_tp`), `category/name` (tracepoint),
    /// or the iterator's target (`task_file`).
    pub target: &'static str,
    /// Attached to a hook, or run as an iterator.
    pub run: Run,
}

impl ProgramSpec {
    /// `hook target` or `iter/target`, as the plan shows it.
    pub fn describe(&self, hook: Hook) -> String {
        match self.run {
            Run::Hook => format!("{hook} {}", self.target),
            Run::Iter => format!("iter/{}", self.target),
        }
    }
}

/// One way to serve a family from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Variant {
    pub hook: Hook,
    pub programs: &'static [ProgramSpec],
    /// Oldest kernel this variant works on (documentation only).
    pub min_kernel: (u32, u32),
    /// Whether it needs kernel BTF (`/sys/kernel/btf/vmlinux`).
    pub needs_btf: bool,
}

impl Variant {
    /// The programs attached, leaving out those the family's preparation
    /// left `unused` ([`crate::families::Prepared::unused_programs`]).
    pub fn programs_used<'a>(
        &self,
        unused: &'a BTreeSet<&'static str>,
    ) -> impl Iterator<Item = &'static ProgramSpec> + 'a {
        let programs: &'static [ProgramSpec] = self.programs;
        programs.iter().filter(move |p| !unused.contains(p.program))
    }
}

/// The rule for one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// eBPF variants, most preferred first. Empty: procfs is the only source.
    pub variants: &'static [Variant],
    /// What the fallback reads, or `None` when there is none.
    pub fallback: Option<&'static str>,
    /// What the fallback cannot provide, shown in the plan.
    pub fallback_loses: &'static str,
}

/// A program attached to its hook.
pub const fn p(program: &'static str, target: &'static str) -> ProgramSpec {
    ProgramSpec {
        program,
        target,
        run: Run::Hook,
    }
}

/// An iterator program (see [`Run::Iter`]).
pub const fn iter(program: &'static str, target: &'static str) -> ProgramSpec {
    ProgramSpec {
        run: Run::Iter,
        ..p(program, target)
    }
}
