//! Giving capabilities up once the programs are attached.
//!
//! Loading and attaching need CAP_BPF and CAP_PERFMON (CAP_NET_ADMIN for
//! `cgroup_skb`, CAP_SYS_ADMIN before 5.8). After that the agent only reads
//! maps through file descriptors it holds, walks sockets through an
//! iterator link it holds, and reads `/proc` and `/sys`. So, like
//! ebpf_exporter, Perch drops every capability after attach
//! (`agent.drop_capabilities`, default true), with one exception the kernel
//! decides: before Linux 6.5, with `kernel.unprivileged_bpf_disabled` set
//! (the default of every distribution), every `bpf(2)` command, a map
//! lookup included, needs CAP_BPF (or CAP_SYS_ADMIN). Which case this kernel
//! is, is asked of the kernel itself: a thread that has dropped everything
//! makes a map lookup on no map, which fails with EBADF where only the file
//! descriptor matters and with EPERM where the capability is checked first.
//!
//! Capabilities belong to threads, not to processes: the drop must happen
//! on the start-up thread before any other thread exists (they inherit it).
//! [`crate::runtime::Agent::start`] calls it before it spawns the collector
//! threads, and `perch run` starts the async runtime only after.

use serde::Serialize;

/// Capability numbers (`include/uapi/linux/capability.h`) with their names.
const NAMES: &[(u32, &str)] = &[
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (2, "CAP_DAC_READ_SEARCH"),
    (3, "CAP_FOWNER"),
    (4, "CAP_FSETID"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
    (8, "CAP_SETPCAP"),
    (9, "CAP_LINUX_IMMUTABLE"),
    (10, "CAP_NET_BIND_SERVICE"),
    (11, "CAP_NET_BROADCAST"),
    (12, "CAP_NET_ADMIN"),
    (13, "CAP_NET_RAW"),
    (14, "CAP_IPC_LOCK"),
    (15, "CAP_IPC_OWNER"),
    (16, "CAP_SYS_MODULE"),
    (17, "CAP_SYS_RAWIO"),
    (18, "CAP_SYS_CHROOT"),
    (19, "CAP_SYS_PTRACE"),
    (20, "CAP_SYS_PACCT"),
    (21, "CAP_SYS_ADMIN"),
    (22, "CAP_SYS_BOOT"),
    (23, "CAP_SYS_NICE"),
    (24, "CAP_SYS_RESOURCE"),
    (25, "CAP_SYS_TIME"),
    (26, "CAP_SYS_TTY_CONFIG"),
    (27, "CAP_MKNOD"),
    (28, "CAP_LEASE"),
    (29, "CAP_AUDIT_WRITE"),
    (30, "CAP_AUDIT_CONTROL"),
    (31, "CAP_SETFCAP"),
    (32, "CAP_MAC_OVERRIDE"),
    (33, "CAP_MAC_ADMIN"),
    (34, "CAP_SYSLOG"),
    (35, "CAP_WAKE_ALARM"),
    (36, "CAP_BLOCK_SUSPEND"),
    (37, "CAP_AUDIT_READ"),
    (38, "CAP_PERFMON"),
    (39, "CAP_BPF"),
    (40, "CAP_CHECKPOINT_RESTORE"),
];
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's capability sets, as 64-bit masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

/// The calling thread's sets (`capget(2)`).
pub fn current() -> std::io::Result<Sets> {
    let mut hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two `Data` for version 3, which `data` holds.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let join = |f: fn(&Data) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    Ok(Sets {
        effective: join(|d| d.effective),
        permitted: join(|d| d.permitted),
        inheritable: join(|d| d.inheritable),
    })
}

/// Sets the calling thread's effective and permitted sets to `keep`, its
/// inheritable set to nothing, and clears its ambient set.
fn restrict_to(keep: u64) -> std::io::Result<()> {
    let mut hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    let word = |m: u64, i: u32| (m >> (32 * i)) as u32;
    let data = [0, 1].map(|i| Data {
        effective: word(keep, i),
        permitted: word(keep, i),
        inheritable: 0,
    });
    // SAFETY: capset reads two `Data` for version 3, which `data` holds.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Lowering permitted lowers the ambient set too; say so explicitly.
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// Names of the capabilities in `mask`, lowest first.
pub fn names(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|b| mask & (1u64 << b) != 0)
        .map(|b| {
            NAMES
                .iter()
                .find(|(n, _)| *n == b)
                .map(|(_, s)| (*s).to_owned())
                .unwrap_or_else(|| format!("cap_{b}"))
        })
        .collect()
}

/// Whether this kernel checks CAP_BPF on every `bpf(2)` command: asked on a
/// thread of its own that has dropped every capability (capabilities are
/// per thread, so this one keeps its own). `None` when it cannot tell.
fn bpf_needs_capability() -> Option<bool> {
    std::thread::scope(|s| {
        s.spawn(|| {
            restrict_to(0).ok()?;
            // BPF_MAP_LOOKUP_ELEM (1) on map fd u32::MAX, which is no file.
            let mut attr = [0u64; 4];
            attr[0] = u64::from(u32::MAX);
            // SAFETY: bpf reads `size` bytes of `attr`, which it holds.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    1,
                    attr.as_mut_ptr(),
                    std::mem::size_of_val(&attr),
                )
            };
            let errno = std::io::Error::last_os_error().raw_os_error();
            match (r, errno) {
                (-1, Some(libc::EPERM)) => Some(true),
                (-1, Some(libc::EBADF)) => Some(false),
                _ => None,
            }
        })
        .join()
        .ok()
        .flatten()
    })
}

/// What start-up did with the capabilities, for `/status` and the log.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    /// `agent.drop_capabilities`.
    pub drop_after_attach: bool,
    /// Held before the drop (permitted set).
    pub held: Vec<String>,
    /// Held after it.
    pub kept: Vec<String>,
    /// Why what is kept is kept, or why nothing was dropped.
    pub reason: String,
}

/// Drops the calling thread's capabilities but what reading the attached
/// programs' maps still needs on this kernel. Call it before any other
/// thread is spawned. Never fails the agent: a failed drop is reported.
pub fn drop_after_attach(enabled: bool) -> Report {
    let held = match current() {
        Ok(s) => s.permitted,
        Err(e) => {
            return Report {
                drop_after_attach: enabled,
                reason: format!("capget failed: {e}; capabilities left as they are"),
                ..Report::default()
            }
        }
    };
    let mut report = Report {
        drop_after_attach: enabled,
        held: names(held),
        kept: names(held),
        reason: String::new(),
    };
    if !enabled {
        report.reason = "agent.drop_capabilities = false".to_owned();
        return report;
    }
    if held == 0 {
        report.reason = "none held".to_owned();
        return report;
    }
    let bpf_admin = (1u64 << CAP_BPF) | (1u64 << CAP_SYS_ADMIN);
    let (keep, reason) = match bpf_needs_capability() {
        Some(false) => (
            0,
            "this kernel checks only file descriptors on map reads".to_owned(),
        ),
        Some(true) | None => {
            // CAP_BPF where the kernel has it, else CAP_SYS_ADMIN (< 5.8).
            let keep = if held & (1 << CAP_BPF) != 0 {
                1 << CAP_BPF
            } else {
                held & bpf_admin
            };
            (
                keep,
                format!(
                    "{} kept: this kernel checks it on every bpf(2) command, map reads \
                     included (before Linux 6.5, with kernel.unprivileged_bpf_disabled set)",
                    names(keep).join(", ")
                ),
            )
        }
    };
    match restrict_to(keep) {
        Ok(()) => {
            // No exec may raise them again (setuid or file capabilities).
            // SAFETY: prctl with integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            report.kept = names(keep);
            report.reason = reason;
        }
        Err(e) => report.reason = format!("capset failed: {e}; capabilities left as they are"),
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_kernels() {
        assert_eq!(names((1 << 38) | (1 << 39)), ["CAP_PERFMON", "CAP_BPF"]);
        assert_eq!(names(1 << 21), ["CAP_SYS_ADMIN"]);
        assert_eq!(names(1 << 50), ["cap_50"]);
        assert!(names(0).is_empty());
        for (i, (n, _)) in NAMES.iter().enumerate() {
            assert_eq!(*n as usize, i, "NAMES is dense and ordered");
        }
    }

    /// A thread of its own drops everything; the test thread keeps its set.
    #[test]
    fn a_drop_stays_on_its_thread() {
        let before = current().unwrap();
        let after = std::thread::spawn(|| {
            restrict_to(0).unwrap();
            current().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(after.effective, 0);
        assert_eq!(after.permitted, 0);
        assert_eq!(current().unwrap(), before);
    }
}
