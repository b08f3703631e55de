//! Kernel facts that need no program of ours: release, BTF, tracefs, and
//! which program and map types the kernel accepts (probed by loading a
//! trivial program or creating a tiny map, never read from the version).

use std::collections::BTreeMap;
use std::path::Path;

use aya::maps::MapType;
use aya::programs::ProgramType;

use super::{HookStatus, KernelFacts};

/// Reads the facts that do not depend on Perch's own programs.
pub fn detect() -> KernelFacts {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let program_types = [
        // aya probes BPF_PROG_TYPE_TRACING with an fentry attach: it says
        // nothing about tp_btf, which the family probes test directly.
        ("tracing (fentry)", ProgramType::Tracing),
        ("raw_tracepoint", ProgramType::RawTracePoint),
        ("tracepoint", ProgramType::TracePoint),
        ("perf_event", ProgramType::PerfEvent),
        ("cgroup_skb", ProgramType::CgroupSkb),
    ]
    .into_iter()
    .map(|(name, t)| (name.to_owned(), status(aya::sys::is_program_supported(t))))
    .collect::<BTreeMap<_, _>>();
    let map_types = [
        ("ringbuf", MapType::RingBuf),
        ("percpu_array", MapType::PerCpuArray),
        ("hash", MapType::Hash),
        ("lru_hash", MapType::LruHash),
    ]
    .into_iter()
    .map(|(name, t)| (name.to_owned(), status(aya::sys::is_map_supported(t))))
    .collect::<BTreeMap<_, _>>();
    KernelFacts {
        version: parse_release(&release),
        release,
        btf: Path::new(crate::sources::btf::VMLINUX).exists(),
        btf_source: None,
        verifier_logs: Vec::new(),
        tracefs: tracefs_mounted(),
        program_types,
        map_types,
        object_error: None,
        hooks: BTreeMap::new(),
        host_pid_namespace: None,
        host_proc: None,
        warnings: Vec::new(),
        unused_programs: Default::default(),
        notes: BTreeMap::new(),
    }
}

/// `PROC_PID_INIT_INO` (`include/linux/proc_ns.h`): the inode of the
/// initial pid namespace, fixed since 3.8 (commit 98f842e675f9).
const INIT_PID_NS: &str = "pid:[4026531836]";

/// Whether the pid namespace behind `link` (`/proc/self/ns/pid`,
/// `<proc_root>/1/ns/pid`) is the host's; `None` when it cannot be read.
pub fn is_init_pid_ns(link: &Path) -> Option<bool> {
    std::fs::read_link(link)
        .ok()
        .map(|t| t.as_os_str() == INIT_PID_NS)
}

fn status<E: std::fmt::Display>(r: Result<bool, E>) -> HookStatus {
    match r {
        Ok(true) => HookStatus::Ok,
        Ok(false) => HookStatus::Failed("rejected by the kernel".into()),
        Err(e) => HookStatus::Failed(e.to_string()),
    }
}

fn tracefs_mounted() -> bool {
    crate::sources::tracefs::mount().is_some()
}

/// `6.18.0-1-amd64` -> `(6, 18, 0)`. For display: decisions never use it.
pub fn parse_release(release: &str) -> Option<(u32, u32, u32)> {
    let mut nums = release.split(|c: char| !c.is_ascii_digit());
    let major = nums.next()?.parse().ok()?;
    let minor = nums.next()?.parse().ok()?;
    let patch = nums.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    Some((major, minor, patch))
}

#[cfg(test)]
mod tests {
    use super::parse_release;

    #[test]
    fn releases() {
        for (s, v) in [
            ("6.18.0-1-amd64", Some((6, 18, 0))),
            ("5.15.0-105-generic", Some((5, 15, 0))),
            ("4.19.112+", Some((4, 19, 112))),
            ("6.1", Some((6, 1, 0))),
            ("garbage", None),
            ("", None),
        ] {
            assert_eq!(parse_release(s), v, "{s}");
        }
    }
}
