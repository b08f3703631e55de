//! Metric families: each one a folder, all of them registered in one list.
//!
//! A family is the unit that is switched between eBPF, procfs and off. Its
//! folder holds everything that is specific to it:
//!
//! - its **rule** (`RULE`): the eBPF variants in order of preference, the
//!   programs of each, the oldest kernel, and the fallback with what it
//!   loses (the types are in [`crate::gate::rules`]);
//! - its **config** section (`Config`, `[probes.<name>]`), which
//!   implements [`Section`];
//! - its **preparation** ([`Unit::prepare`]): struct offsets from kernel
//!   BTF, map sizes, globals for the programs, variants it cannot offer;
//! - its **collector(s)** ([`Unit::build`]), and the procfs parsers only it
//!   uses; parsers shared by several families are in [`crate::sources`].
//!
//! The kernel side has one module per family in `agent-ebpf/src/` and one
//! in `agent-common/src/`. Generic code (gate, probes, runtime, config)
//! goes through [`Family::unit`] and never matches on a family.
//! `docs/adding-a-family.md` walks through adding one.

pub mod connections;
pub mod containers;
pub mod cpu;
pub mod drops;
pub mod interfaces;
pub mod sched;
pub mod softirq;
pub mod tcp;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::collectors::Collector;
use crate::gate::rules::{Hook, Rule};
use crate::gate::{FamilyPlan, Mode, Source};
use crate::probes::{iter::IterLink, Probes};
use crate::sources::btf::KernelBtf;
use crate::sources::{ProcError, Root};

/// The registry: `Variant => module`. The module is the family's name in
/// config (`[probes.<module>]`), metrics (`perch.family`), the CLI and the
/// plan. This macro writes [`Family`], [`ProbesConfig`] and the dispatch
/// from one to the other, so a new family is one line here.
macro_rules! registry {
    ($( $(#[doc = $doc:literal])* $variant:ident => $module:ident, )*) => {
        /// A metric family.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum Family {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl Family {
            /// Every family, in registry order (the order of the plan).
            pub const ALL: &'static [Family] = &[$(Family::$variant),*];

            /// The family's name (`sched`), as in `[probes.sched]`.
            pub fn name(self) -> &'static str {
                match self {
                    $( Family::$variant => stringify!($module), )*
                }
            }

            /// The family's implementation.
            pub fn unit(self) -> &'static dyn Unit {
                match self {
                    $( Family::$variant => &$module::UNIT, )*
                }
            }
        }

        /// `[probes]`: hooks never to use, and one table per family, named
        /// as [`Family::name`].
        #[derive(Debug, Clone, PartialEq, Default, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct ProbesConfig {
            /// Hook types never to use, e.g. `["tp_btf"]` to run every family
            /// on its `raw_tp` variant (a workaround for a kernel whose BTF
            /// tracepoints misbehave, and how the tests exercise every
            /// variant). A family left with no variant falls back to procfs,
            /// and the plan says why.
            pub skip_hooks: Vec<Hook>,
            /// A BTF file to read struct layouts and attach targets from in
            /// place of `/sys/kernel/btf/vmlinux`: for kernels built without
            /// `CONFIG_DEBUG_INFO_BTF` (a BTFhub file) or whose BTF is not
            /// visible (one extracted from the same kernel). Absolute.
            pub btf_path: Option<std::path::PathBuf>,
            $( $(#[doc = $doc])* pub $module: $module::Config, )*
        }

        impl ProbesConfig {
            /// The `[probes.<family>]` table.
            pub fn section(&self, family: Family) -> &dyn Section {
                match family {
                    $( Family::$variant => &self.$module, )*
                }
            }

            /// The `[probes.<family>]` table, for overrides.
            pub fn section_mut(&mut self, family: Family) -> &mut dyn Section {
                match family {
                    $( Family::$variant => &mut self.$module, )*
                }
            }
        }
    };
}

registry! {
    /// `system.cpu.time`, `system.cpu.load_average.*` (procfs in every mode).
    Cpu => cpu,
    /// Context switches, run-queue latency, scheduler wait time.
    Sched => sched,
    /// Softirq time and counts.
    Softirq => softirq,
    /// Interface byte, packet, error and drop counters.
    Interfaces => interfaces,
    /// Connection counts by state.
    Connections => connections,
    /// Per-peer TCP bytes, retransmits, RTT, connection lifecycle.
    Tcp => tcp,
    /// Packet drops with the kernel's drop reason.
    Drops => drops,
    /// CPU time and throttling per container and host cgroup (cgroupfs).
    Containers => containers,
}

impl Family {
    /// The family's compatibility rule.
    pub fn rule(self) -> &'static Rule {
        self.unit().rule()
    }

    /// The family named `name`.
    pub fn from_name(name: &str) -> Option<Family> {
        Family::ALL.iter().copied().find(|f| f.name() == name)
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl ProbesConfig {
    /// The mode configured for `family`.
    pub fn mode(&self, family: Family) -> Mode {
        self.section(family).mode()
    }

    /// Sets the mode of `family` (CLI and env overrides). Not validated
    /// here; call [`Config::validate`] afterwards.
    pub fn set_mode(&mut self, family: Family, mode: Mode) {
        self.section_mut(family).set_mode(mode);
    }

    /// Whether `family` may run on eBPF (`auto` or `ebpf`).
    pub fn wants_ebpf(&self, family: Family) -> bool {
        matches!(self.mode(family), Mode::Auto | Mode::Ebpf)
    }
}

/// A family's `[probes.<family>]` table.
pub trait Section: std::fmt::Debug {
    /// The configured mode.
    fn mode(&self) -> Mode;
    /// Overrides the mode.
    fn set_mode(&mut self, mode: Mode);
    /// Checks the family's own options. An error is `(key, message)`, the
    /// key relative to the table (`max_peers`, `include[2]`).
    fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}

/// A family with no options besides its mode.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// `auto` (eBPF where it loads, else procfs), `ebpf` (eBPF or a start-up
    /// error), `procfs` (fallback source only) or `off`. Default `auto`.
    pub mode: Mode,
}

impl Section for ProbeConfig {
    fn mode(&self) -> Mode {
        self.mode
    }
    fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }
}

/// One family: its rule, how it prepares the kernel side, and how it builds
/// its collector.
pub trait Unit: Sync {
    /// The compatibility rule.
    fn rule(&self) -> &'static Rule;

    /// Runs before the object is loaded, only when the family may use eBPF:
    /// what the programs need (globals, map sizes) and which variants it
    /// cannot offer on this kernel, and why. The default needs nothing.
    fn prepare(&self, _ctx: &PrepareCtx<'_>) -> Prepared {
        Prepared::default()
    }

    /// Builds the collector for the planned source (`ebpf` or `procfs`;
    /// never called for `off`). In eBPF mode every map and iterator it
    /// takes must be there with the expected type and size: an error makes
    /// the gate plan the family again, onto its fallback.
    fn build(&self, ctx: &mut BuildCtx<'_>) -> Result<Box<dyn Collector>, BuildError>;
}

/// What [`Unit::prepare`] sees.
pub struct PrepareCtx<'a> {
    /// `[probes]`: every family's section.
    pub config: &'a ProbesConfig,
    /// `agent.proc_root`.
    pub proc_root: &'a Path,
    /// `agent.sys_root`.
    pub sys_root: &'a Path,
    /// Whether the agent runs in the host's pid namespace (`None`: unknown).
    pub host_pid_namespace: Option<bool>,
    /// Kernel BTF, parsed once on first use and shared by every family.
    pub btf: &'a BtfCell,
    /// The mounted tracefs, if any.
    pub tracefs: Option<&'a Path>,
}

/// What a family needs from the loader, and what it cannot offer.
#[derive(Debug, Default)]
pub struct Prepared {
    /// `.rodata` globals to override, by name, as bytes of the shared
    /// `agent-common` struct (see [`Prepared::global`]).
    pub globals: Vec<(&'static str, Vec<u8>)>,
    /// Map sizes (`max_entries`) to override, by map name.
    pub map_sizes: Vec<(&'static str, u32)>,
    /// Variants not to try on this kernel, and why (e.g. no struct offsets).
    pub refused: BTreeMap<Hook, String>,
    /// Programs of the family's variants that stay unattached (e.g. the
    /// wake-up programs where `sched_switch` reads the kernel's stamps).
    pub unused_programs: Vec<&'static str>,
    /// A note appended to the plan's reason when that variant is used.
    pub notes: BTreeMap<Hook, String>,
}

impl Prepared {
    /// Adds a global from a shared `repr(C)` struct.
    pub fn global<T: aya::Pod>(&mut self, name: &'static str, value: &T) {
        // SAFETY: `T: Pod` is plain old data with no padding, so every
        // byte of it is initialized.
        let bytes = unsafe {
            std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
        };
        self.globals.push((name, bytes.to_vec()));
    }

    /// Refuses every variant of `rule` that `hook_filter` accepts.
    pub fn refuse_all(&mut self, rule: &Rule, why: &str, hook_filter: impl Fn(Hook) -> bool) {
        for v in rule.variants.iter().filter(|v| hook_filter(v.hook)) {
            self.refused.insert(v.hook, why.to_owned());
        }
    }

    /// Sets the plan's note of every variant of `rule` that `hook_filter`
    /// accepts.
    pub fn note_all(&mut self, rule: &Rule, note: &str, hook_filter: impl Fn(Hook) -> bool) {
        for v in rule.variants.iter().filter(|v| hook_filter(v.hook)) {
            self.notes.insert(v.hook, note.to_owned());
        }
    }
}

/// Kernel BTF, parsed at most once per start-up and shared by every family
/// that reads struct offsets or enums from it: `probes.btf_path` when set,
/// else `/sys/kernel/btf/vmlinux`.
#[derive(Default)]
pub struct BtfCell {
    /// `probes.btf_path`.
    file: Option<std::path::PathBuf>,
    cell: OnceLock<Result<KernelBtf, String>>,
}

impl BtfCell {
    /// Reads `file` when set, else the kernel's own BTF.
    pub fn new(file: Option<std::path::PathBuf>) -> Self {
        BtfCell {
            file,
            cell: OnceLock::new(),
        }
    }

    /// The parsed kernel BTF, or why there is none.
    pub fn get(&self) -> Result<&KernelBtf, String> {
        self.cell
            .get_or_init(|| {
                match &self.file {
                    Some(f) => KernelBtf::from_file(f),
                    None => KernelBtf::from_sys_fs(),
                }
                .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// What [`Unit::build`] sees.
pub struct BuildCtx<'a> {
    /// `[probes]`: every family's section.
    pub config: &'a ProbesConfig,
    /// The family's decision.
    pub plan: FamilyPlan,
    pub proc: Root,
    pub sys: Root,
    /// Boot time: the start of counters the kernel keeps since boot.
    pub boot: SystemTime,
    pub(crate) probes: &'a mut Probes,
}

impl BuildCtx<'_> {
    /// The planned source.
    pub fn source(&self) -> Source {
        self.plan.source
    }

    /// Takes map `name` out of the object, typed: a missing map, or one of
    /// another type or key/value size than `T`, is an error.
    pub fn map<T>(&mut self, name: &'static str) -> Result<T, BuildError>
    where
        T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .probes
            .take_map(name)
            .ok_or(BuildError::MissingMap { name })?;
        T::try_from(map).map_err(|e| BuildError::Map {
            name,
            message: e.to_string(),
        })
    }

    /// When the family's programs were attached: the start time of its
    /// kernel-side counters.
    pub fn attached_at(&self) -> Result<SystemTime, BuildError> {
        self.probes
            .attached_at(self.plan.family)
            .ok_or(BuildError::NotAttached {
                family: self.plan.family,
            })
    }

    /// The linked iterator `program`, when the attached variant has one.
    pub fn iter(&mut self, program: &str) -> Option<IterLink> {
        self.probes.take_iter(program)
    }

    /// Kernel BTF, shared with the other families (parsed at most once).
    pub fn btf(&self) -> Result<&KernelBtf, String> {
        self.probes.btf.get()
    }
}

/// Why a collector could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The object has no map of that name (renamed on one side only).
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    /// The map exists but its type or key/value size is not what the
    /// collector reads.
    #[error("map {name}: {message}")]
    Map { name: &'static str, message: String },
    /// The plan says eBPF but the family's programs are not attached.
    #[error("the {family} programs are not attached")]
    NotAttached { family: Family },
    /// A file the collector needs at start could not be read.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// What the collector reads does not exist on this host (the reason).
    #[error("{0}")]
    Unavailable(String),
}

/// Builds one collector per planned family. A collector that cannot be
/// built from the attached programs is an error that re-plans its family
/// onto the next variant or the fallback, with the reason in the plan (so
/// in `perch features`, the log and `perch.probe.state`); a fallback that
/// cannot be built leaves the family off, with the reason. Fails only when
/// a forced `ebpf` mode can no longer be honoured.
pub fn build_collectors(
    config: &ProbesConfig,
    proc: Root,
    sys: Root,
    probes: &mut Probes,
    boot: SystemTime,
) -> Result<Vec<Box<dyn Collector>>, crate::probes::ProbeError> {
    build_collectors_with(config, proc, sys, probes, boot, Family::unit)
}

/// [`build_collectors`] with each family's implementation from `unit`
/// (tests put a broken collector in a family's place).
fn build_collectors_with(
    config: &ProbesConfig,
    proc: Root,
    sys: Root,
    probes: &mut Probes,
    boot: SystemTime,
    unit: impl Fn(Family) -> &'static dyn Unit,
) -> Result<Vec<Box<dyn Collector>>, crate::probes::ProbeError> {
    let mut out = Vec::new();
    for &family in Family::ALL {
        while let Some(plan) = probes.plan.get(family).cloned() {
            if plan.source == Source::Off {
                break;
            }
            let source = plan.source;
            let hook = plan.hook;
            let mut ctx = BuildCtx {
                config,
                plan,
                proc: proc.clone(),
                sys: sys.clone(),
                boot,
                probes,
            };
            match unit(family).build(&mut ctx) {
                Ok(c) => {
                    out.push(c);
                    break;
                }
                Err(e) => match (source, hook) {
                    (Source::Ebpf, Some(hook)) => {
                        tracing::error!(%family, %hook, error = %e, "collector cannot read the attached programs; planning the family again");
                        probes.refuse(family, hook, format!("collector: {e}"))?;
                    }
                    _ => {
                        tracing::error!(%family, error = %e, "collector cannot start; the family is off");
                        probes.turn_off(family, format!("collector cannot start: {e}"));
                        break;
                    }
                },
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::HookStatus;
    use aya::maps::{HashMap, MapData, PerCpuArray};

    /// The sched family, with a collector that asks for a map the object
    /// does not have (a rename on one side only).
    struct RenamedMap;
    impl Unit for RenamedMap {
        fn rule(&self) -> &'static Rule {
            &sched::RULE
        }
        fn build(&self, ctx: &mut BuildCtx<'_>) -> Result<Box<dyn Collector>, BuildError> {
            if ctx.source() == Source::Ebpf {
                ctx.map::<PerCpuArray<MapData, u64>>("SCHED_COUNTERS_RENAMED")?;
            }
            sched::UNIT.build(ctx)
        }
    }
    static RENAMED_MAP: RenamedMap = RenamedMap;

    /// The sched family, reading its counters as a hash (a retyped map).
    struct RetypedMap;
    impl Unit for RetypedMap {
        fn rule(&self) -> &'static Rule {
            &sched::RULE
        }
        fn build(&self, ctx: &mut BuildCtx<'_>) -> Result<Box<dyn Collector>, BuildError> {
            if ctx.source() == Source::Ebpf {
                ctx.map::<HashMap<MapData, u32, u64>>(agent_common::sched::MAP_COUNTERS)?;
            }
            sched::UNIT.build(ctx)
        }
    }
    static RETYPED_MAP: RetypedMap = RetypedMap;

    /// A collector that cannot read its attached programs' maps is not
    /// dropped silently: the family is planned again, down to procfs, with
    /// the reason in the plan (what `perch features` and
    /// `perch.probe.state` show). Loads the real object: needs CAP_BPF.
    #[test]
    fn a_broken_collector_replans_its_family_onto_the_fallback() {
        for (case, broken, needle) in [
            (
                "renamed map",
                &RENAMED_MAP as &'static dyn Unit,
                "map SCHED_COUNTERS_RENAMED is missing from the eBPF object",
            ),
            ("retyped map", &RETYPED_MAP, "map SCHED_COUNTERS: "),
        ] {
            let mut config = crate::config::Config::default();
            for &f in Family::ALL {
                if f != Family::Sched {
                    config.probes.set_mode(f, Mode::Off);
                }
            }
            let mut probes = Probes::start(&config).expect("auto never fails to plan");
            assert!(
                probes.facts.object_error.is_none(),
                "{case}: this test loads the real eBPF object and needs CAP_BPF and \
                 CAP_PERFMON: {:?}",
                probes.facts.object_error
            );
            assert_eq!(
                probes.plan.get(Family::Sched).unwrap().source,
                Source::Ebpf,
                "{case}: sched should start on eBPF here"
            );
            let boot = SystemTime::UNIX_EPOCH;
            let unit = |f: Family| if f == Family::Sched { broken } else { f.unit() };
            let (proc, sys) = (Root::proc(), Root::sys());
            let collectors =
                build_collectors_with(&config.probes, proc, sys, &mut probes, boot, unit).unwrap();
            probes.finish();
            let plan = probes.plan.get(Family::Sched).unwrap();
            assert_eq!(plan.source, Source::Procfs, "{case}: {plan:?}");
            assert_eq!(collectors.len(), 1, "{case}: the procfs collector is built");
            let refused: Vec<&HookStatus> = probes
                .facts
                .hooks
                .iter()
                .filter(|((f, _), _)| *f == Family::Sched)
                .map(|(_, s)| s)
                .collect();
            assert!(
                refused
                    .iter()
                    .any(|s| matches!(s, HookStatus::Failed(e) if e.contains(needle))),
                "{case}: {refused:?}"
            );
            assert!(plan.reason.contains(needle), "{case}: {}", plan.reason);
            assert!(
                probes.attached_at(Family::Sched).is_none(),
                "{case}: still attached"
            );
        }
    }

    /// The registry and the rules agree, and every family has a config
    /// section and a section in docs/metrics.md.
    #[test]
    fn every_family_has_a_rule_a_config_section_and_docs() {
        let docs = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"));
        let mut cfg = ProbesConfig::default();
        for &f in Family::ALL {
            assert_eq!(Family::from_name(f.name()), Some(f));
            let rule = f.rule();
            assert!(
                rule.fallback.is_some() || !rule.variants.is_empty(),
                "{f}: its rule has neither an eBPF variant nor a fallback"
            );
            // The section exists and is this family's own.
            cfg.set_mode(f, Mode::Off);
            assert_eq!(cfg.mode(f), Mode::Off, "{f}");
            let others_untouched = Family::ALL
                .iter()
                .filter(|o| **o != f)
                .all(|o| cfg.mode(*o) == Mode::Auto);
            assert!(others_untouched, "{f}: set_mode reached another family");
            cfg.set_mode(f, Mode::Auto);
            // Parsing `[probes.<name>]` reaches it.
            let text = format!("[probes.{f}]\nmode = \"off\"\n");
            let parsed: crate::config::Config = toml::from_str(&text).expect("section parses");
            assert_eq!(parsed.probes.mode(f), Mode::Off, "{f}");
            // docs/metrics.md has a section naming the family.
            let heading = format!("family (`{f}`)");
            assert!(
                docs.lines()
                    .any(|l| l.starts_with("## ") && l.ends_with(&heading)),
                "{f}: docs/metrics.md has no `## ... {heading}` section"
            );
        }
    }
}
