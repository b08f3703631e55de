//! What the kernel object must contain, as data: every map and every
//! userspace-overridden global, with its kind and sizes computed from the
//! shared types.
//!
//! The kernel side cannot name these constants where it declares a map
//! (`#[map]` takes only a string literal), so the names are written twice:
//! once here, once as the map's static in `agent-ebpf`. A test in the agent
//! (`agent/src/probes/contract.rs`) parses the built object, without
//! loading it, and checks it against [`CONTRACTS`] and the gate's program
//! rules: a map renamed, retyped or resized on one side only fails there,
//! not at run time.

use core::mem::size_of;

/// A BPF map type, valued as the kernel's `enum bpf_map_type`
/// (`include/uapi/linux/bpf.h`). Only the types Perch uses.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// `BPF_MAP_TYPE_HASH`.
    Hash = 1,
    /// `BPF_MAP_TYPE_ARRAY`.
    Array = 2,
    /// `BPF_MAP_TYPE_PERCPU_HASH`.
    PerCpuHash = 5,
    /// `BPF_MAP_TYPE_PERCPU_ARRAY`.
    PerCpuArray = 6,
}

impl MapKind {
    /// Every kind, for lookups by number.
    pub const ALL: [MapKind; 4] = [
        MapKind::Hash,
        MapKind::Array,
        MapKind::PerCpuHash,
        MapKind::PerCpuArray,
    ];

    /// The kind of the kernel's map type `n`, if Perch uses it.
    pub fn from_u32(n: u32) -> Option<MapKind> {
        Self::ALL.into_iter().find(|k| *k as u32 == n)
    }
}

/// One map the kernel object defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// The map's name in the object: its static's name in `agent-ebpf`, and
    /// the family's `MAP_*` constant.
    pub name: &'static str,
    pub kind: MapKind,
    /// Bytes of the key (`u32` for arrays: the index).
    pub key_size: u32,
    /// Bytes of one value (of one CPU's value for per-CPU maps).
    pub value_size: u32,
    /// Entries compiled into the object. The loader may override it
    /// (`EbpfLoader::map_max_entries`) for maps sized from the config.
    pub max_entries: u32,
}

impl MapSpec {
    /// An array of `V`, indexed by `u32`.
    pub const fn array<V>(name: &'static str, max_entries: u32) -> MapSpec {
        Self::new::<u32, V>(name, MapKind::Array, max_entries)
    }

    /// A per-CPU array of `V`, indexed by `u32`.
    pub const fn per_cpu_array<V>(name: &'static str, max_entries: u32) -> MapSpec {
        Self::new::<u32, V>(name, MapKind::PerCpuArray, max_entries)
    }

    /// A hash `K -> V`.
    pub const fn hash<K, V>(name: &'static str, max_entries: u32) -> MapSpec {
        Self::new::<K, V>(name, MapKind::Hash, max_entries)
    }

    /// A per-CPU hash `K -> V`.
    pub const fn per_cpu_hash<K, V>(name: &'static str, max_entries: u32) -> MapSpec {
        Self::new::<K, V>(name, MapKind::PerCpuHash, max_entries)
    }

    const fn new<K, V>(name: &'static str, kind: MapKind, max_entries: u32) -> MapSpec {
        MapSpec {
            name,
            kind,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries,
        }
    }
}

/// One global the kernel object defines in `.rodata` and userspace
/// overrides at load time (`EbpfLoader::override_global`), which requires
/// the override to have exactly the symbol's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalSpec {
    /// The symbol's name: its `#[no_mangle]` static in `agent-ebpf`.
    pub name: &'static str,
    /// Bytes of the value userspace writes.
    pub size: u32,
}

impl GlobalSpec {
    /// A global holding a `T`.
    pub const fn of<T>(name: &'static str) -> GlobalSpec {
        GlobalSpec {
            name,
            size: size_of::<T>() as u32,
        }
    }
}

/// The maps and globals one module of this crate describes.
#[derive(Clone, Copy, Debug)]
pub struct Contract {
    /// The module: a probe family.
    pub module: &'static str,
    pub maps: &'static [MapSpec],
    pub globals: &'static [GlobalSpec],
}

/// Every module's contract, registered here once: together they list
/// every map and global of the kernel object.
pub const CONTRACTS: &[Contract] = &[
    Contract {
        module: "drops",
        maps: crate::drops::MAPS,
        globals: crate::drops::GLOBALS,
    },
    Contract {
        module: "exp",
        maps: &[],
        globals: crate::exp::GLOBALS,
    },
    Contract {
        module: "sched",
        maps: crate::sched::MAPS,
        globals: crate::sched::GLOBALS,
    },
    Contract {
        module: "softirq",
        maps: crate::softirq::MAPS,
        globals: crate::softirq::GLOBALS,
    },
    Contract {
        module: "tcp",
        maps: crate::tcp::MAPS,
        globals: crate::tcp::GLOBALS,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let mut maps = CONTRACTS.iter().flat_map(|c| c.maps.iter().map(|m| m.name));
        while let Some(a) = maps.next() {
            assert!(maps.clone().all(|b| b != a), "map {a} listed twice");
        }
        let mut globals = CONTRACTS
            .iter()
            .flat_map(|c| c.globals.iter().map(|g| g.name));
        while let Some(a) = globals.next() {
            assert!(globals.clone().all(|b| b != a), "global {a} listed twice");
        }
    }

    #[test]
    fn kinds_round_trip() {
        for k in MapKind::ALL {
            assert_eq!(MapKind::from_u32(k as u32), Some(k));
        }
        assert_eq!(MapKind::from_u32(27), None);
    }
}
