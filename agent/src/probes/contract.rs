//! The embedded kernel object ([`OBJECT`]) against what userspace expects
//! of it, checked without a kernel: nothing is loaded.
//!
//! Names are the link between the two sides, and a mismatch would show up
//! only at run time, as a family silently falling back. So:
//! - every map of [`agent_common::contract::CONTRACTS`] is in the object
//!   with its kind, key and value sizes and compiled-in entries, and the
//!   object has no other map;
//! - every global listed there is a `.rodata` symbol of the listed size (a
//!   size mismatch makes `EbpfLoader::override_global` fail the whole
//!   load), and the object has no other global data;
//! - every program family's rule names is in the object, in a section of the
//!   variant's hook and target, and the object has no other program.
//!
//! The object is read with `aya_obj`, the parser `aya` loads it with, and
//! with `object` for the symbol table and section names, which `aya_obj`
//! keeps private.

use std::collections::{BTreeMap, BTreeSet};

use agent_common::contract::{MapKind, CONTRACTS};
use aya_obj::generated::bpf_map_type;
use aya_obj::{EbpfSectionKind, ProgramSection};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};

use super::OBJECT;
use crate::families::Family;
use crate::gate::rules::{Hook, Run, Variant};

fn parse() -> aya_obj::Object {
    aya_obj::Object::parse(OBJECT)
        .unwrap_or_else(|e| panic!("the embedded eBPF object does not parse: {e}"))
}

fn elf() -> object::File<'static> {
    object::File::parse(OBJECT)
        .unwrap_or_else(|e| panic!("the embedded eBPF object is not an ELF file: {e}"))
}

/// Fails with every problem found, one per line.
fn report(what: &str, problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "the eBPF object (agent-ebpf, built by agent/build.rs) and {what} disagree:\n  - {}",
        problems.join("\n  - ")
    );
}

fn kind_name(n: u32) -> String {
    match MapKind::from_u32(n) {
        Some(k) => format!("{k:?} ({n})"),
        None => format!("map type {n}"),
    }
}

/// `MapKind` is valued as the kernel's `enum bpf_map_type`; aya's bindings
/// are generated from the kernel's header.
#[test]
fn map_kinds_are_the_kernels_numbers() {
    for (kind, kernel) in [
        (MapKind::Hash, bpf_map_type::BPF_MAP_TYPE_HASH),
        (MapKind::Array, bpf_map_type::BPF_MAP_TYPE_ARRAY),
        (MapKind::PerCpuHash, bpf_map_type::BPF_MAP_TYPE_PERCPU_HASH),
        (
            MapKind::PerCpuArray,
            bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY,
        ),
    ] {
        assert_eq!(kind as u32, kernel as u32, "{kind:?} is {kernel:?}");
    }
}

#[test]
fn maps_match_the_contract() {
    let obj = parse();
    let mut problems = Vec::new();
    let mut listed = BTreeSet::new();
    for c in CONTRACTS {
        for spec in c.maps {
            let module = c.module;
            listed.insert(spec.name);
            let Some(map) = obj.maps.get(spec.name) else {
                problems.push(format!(
                    "map {}: listed in agent_common::{module}::MAPS, missing from the object \
                     (renamed on one side only?)",
                    spec.name
                ));
                continue;
            };
            let mut differs = |field: &str, want: String, got: String| {
                if want != got {
                    problems.push(format!(
                        "map {}: {field} is {want} in agent_common::{module}::MAPS, {got} in the object",
                        spec.name
                    ));
                }
            };
            differs(
                "kind",
                kind_name(spec.kind as u32),
                kind_name(map.map_type()),
            );
            differs(
                "key size",
                format!("{} bytes", spec.key_size),
                format!("{} bytes", map.key_size()),
            );
            differs(
                "value size",
                format!("{} bytes", spec.value_size),
                format!("{} bytes", map.value_size()),
            );
            differs(
                "max_entries",
                spec.max_entries.to_string(),
                map.max_entries().to_string(),
            );
        }
    }
    for (name, map) in &obj.maps {
        // `.rodata`, `.data` and `.bss` become maps too: their symbols are
        // checked as globals.
        let data = matches!(
            map.section_kind(),
            EbpfSectionKind::Rodata | EbpfSectionKind::Data | EbpfSectionKind::Bss
        );
        if !data && !listed.contains(name.as_str()) {
            problems.push(format!(
                "map {name} ({}, key {} bytes, value {} bytes): in the object, in no \
                 agent_common MAPS (add it to its family's MAPS)",
                kind_name(map.map_type()),
                map.key_size(),
                map.value_size()
            ));
        }
    }
    report("agent_common's MAPS", problems);
}

#[test]
fn globals_match_the_contract() {
    let elf = elf();
    // Named data symbols visible outside their unit, with their section.
    let mut symbols = BTreeMap::new();
    for sym in elf.symbols() {
        if sym.kind() != SymbolKind::Data || !sym.is_global() {
            continue;
        }
        let (Ok(name), Some(index)) = (sym.name(), sym.section_index()) else {
            continue;
        };
        let section = elf
            .section_by_index(index)
            .ok()
            .and_then(|s| s.name().ok().map(str::to_owned))
            .unwrap_or_default();
        symbols.insert(name, (section, sym.size()));
    }
    let mut problems = Vec::new();
    let mut listed = BTreeSet::new();
    for c in CONTRACTS {
        for spec in c.globals {
            let module = c.module;
            listed.insert(spec.name);
            match symbols.get(spec.name) {
                None => problems.push(format!(
                    "global {}: listed in agent_common::{module}::GLOBALS, missing from the \
                     object (renamed, or no longer #[no_mangle]?)",
                    spec.name
                )),
                Some((section, size)) => {
                    if !section.starts_with(".rodata") {
                        problems.push(format!(
                            "global {}: in section `{section}`, not `.rodata` (a `static mut` or \
                             a non-constant initializer? the verifier must see it as constant)",
                            spec.name
                        ));
                    }
                    if *size != u64::from(spec.size) {
                        problems.push(format!(
                            "global {}: {} bytes in agent_common::{module}::GLOBALS, {size} bytes \
                             in the object (override_global would fail the load)",
                            spec.name, spec.size
                        ));
                    }
                }
            }
        }
    }
    for (name, (section, size)) in &symbols {
        let data = [".rodata", ".data", ".bss"]
            .iter()
            .any(|p| section.starts_with(p));
        if data && !listed.contains(name) {
            problems.push(format!(
                "global {name} ({size} bytes in `{section}`): in the object, in no agent_common \
                 GLOBALS"
            ));
        }
    }
    report("agent_common's GLOBALS", problems);
}

/// Where a program of `variant` run as `run` must live: the section kind
/// `aya_obj` gives it, and the section names that attach it to `target`.
fn expected_section(
    variant: &Variant,
    run: Run,
    target: &str,
) -> (fn(&ProgramSection) -> bool, Vec<String>) {
    match (run, variant.hook) {
        (Run::Iter, _) => (
            |s| matches!(s, ProgramSection::Iter { .. }),
            vec![format!("iter/{target}")],
        ),
        (Run::Hook, Hook::TpBtf) => (
            |s| matches!(s, ProgramSection::BtfTracePoint),
            vec![format!("tp_btf/{target}")],
        ),
        (Run::Hook, Hook::RawTp) => (
            |s| matches!(s, ProgramSection::RawTracePoint),
            vec![
                format!("raw_tp/{target}"),
                format!("raw_tracepoint/{target}"),
            ],
        ),
        (Run::Hook, Hook::Tracepoint) => (
            |s| matches!(s, ProgramSection::TracePoint),
            vec![format!("tracepoint/{target}"), format!("tp/{target}")],
        ),
        (Run::Hook, Hook::CgroupSkb) => (
            |s| matches!(s, ProgramSection::CgroupSkb { .. }),
            Vec::new(),
        ),
    }
}

#[test]
fn programs_match_the_rules() {
    let obj = parse();
    let elf = elf();
    let section_name = |index: usize| {
        elf.section_by_index(object::SectionIndex(index))
            .ok()
            .and_then(|s| s.name().ok().map(str::to_owned))
            .unwrap_or_else(|| format!("#{index}"))
    };
    let mut problems = Vec::new();
    let mut named = BTreeSet::new();
    for &family in Family::ALL {
        for v in family.rule().variants {
            for p in v.programs {
                let variant = format!("the {family} {} variant", v.hook);
                named.insert(p.program);
                let Some(prog) = obj.programs.get(p.program) else {
                    problems.push(format!(
                        "program {}: named by {variant} (families/{family}/mod.rs), missing from the object \
                         (renamed on one side only?)",
                        p.program
                    ));
                    continue;
                };
                let section = section_name(prog.section_index);
                let (kind_ok, names) = expected_section(v, p.run, p.target);
                let how = match p.run {
                    Run::Iter => "an iterator".to_owned(),
                    Run::Hook => format!("a {} program", v.hook),
                };
                if !kind_ok(&prog.section) {
                    problems.push(format!(
                        "program {}: {variant} runs it as {how}, the object has it in section \
                         `{section}` ({:?})",
                        p.program, prog.section
                    ));
                } else if !names.is_empty() && !names.contains(&section) {
                    problems.push(format!(
                        "program {}: {variant} attaches it to `{}`, the object has it in section \
                         `{section}` (expected `{}`)",
                        p.program,
                        p.target,
                        names.join("` or `")
                    ));
                }
            }
        }
    }
    for (name, prog) in &obj.programs {
        if !named.contains(name.as_str()) {
            problems.push(format!(
                "program {name} (section `{}`): in the object, named by no variant in \
                 any family's rule (it would never be loaded)",
                section_name(prog.section_index)
            ));
        }
    }
    report("the families' rules", problems);
}
