//! `/proc/stat`: CPU time per state (total and per online CPU), context
//! switches, boot time, forks and the run queue.
//!
//! The cpu columns grew over time (dates from proc(5)); missing trailing
//! columns read as 0:
//!
//! | columns | kernel  | added                               |
//! |---------|---------|-------------------------------------|
//! | 4       | 2.4     | user nice system idle               |
//! | 5       | 2.5.41  | iowait                              |
//! | 7       | 2.6.0   | irq softirq                         |
//! | 8       | 2.6.11  | steal                               |
//! | 9       | 2.6.24  | guest                               |
//! | 10      | 2.6.33  | guest_nice                          |
//!
//! Per-CPU lines exist only for online CPUs (`for_each_online_cpu` in
//! `fs/proc/stat.c`), so `cpu0, cpu2, cpu3` with `cpu1` offline is normal;
//! the total line still counts every possible CPU's past ticks.

use super::{dec_u64, ProcError};

const FILE: &str = "/proc/stat";

/// Ticks per second of the cpu columns (`USER_HZ`).
///
/// The kernel converts to `USER_HZ` whatever its internal `HZ`
/// (`cputime64_to_clock_t` / `nsec_to_clock_t`). `include/asm-generic/param.h`
/// sets it to 100 for every architecture except alpha, where it equals `HZ`
/// (1024 by default); alpha is not a target Perch builds for.
/// [`clock_ticks`] asks the C library (`sysconf(_SC_CLK_TCK)`), which reads it
/// from the ELF auxiliary vector the kernel passes at exec.
pub const USER_HZ: u64 = 100;

/// `sysconf(_SC_CLK_TCK)`: the `USER_HZ` of the running kernel, or
/// [`USER_HZ`] if the call fails (it cannot on Linux).
pub fn clock_ticks() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(v)) => u64::try_from(v).ok().filter(|&v| v > 0).unwrap_or(USER_HZ),
        _ => USER_HZ,
    }
}

/// Time spent per CPU state, in [`USER_HZ`] ticks since boot.
///
/// `guest` and `guest_nice` are already included in `user` and `nice`
/// (`account_guest_time`), so sums must leave them out: see
/// [`CpuTicks::total`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTicks {
    /// Normal-priority user mode (includes `guest`).
    pub user: u64,
    /// Niced user mode (includes `guest_nice`).
    pub nice: u64,
    /// Kernel mode.
    pub system: u64,
    /// Idle.
    pub idle: u64,
    /// Idle with I/O outstanding (unreliable on multi-CPU hosts; see proc(5)).
    pub iowait: u64,
    /// Servicing hard interrupts.
    pub irq: u64,
    /// Servicing softirqs.
    pub softirq: u64,
    /// Stolen by the hypervisor.
    pub steal: u64,
    /// Running a guest's vCPU.
    pub guest: u64,
    /// Running a niced guest's vCPU.
    pub guest_nice: u64,
}

/// Column names, in file order; used in error messages.
const COLUMNS: [&str; 10] = [
    "user",
    "nice",
    "system",
    "idle",
    "iowait",
    "irq",
    "softirq",
    "steal",
    "guest",
    "guest_nice",
];

impl CpuTicks {
    /// All ticks, without double-counting guest time.
    pub fn total(&self) -> u64 {
        self.user
            + self.nice
            + self.system
            + self.idle
            + self.iowait
            + self.irq
            + self.softirq
            + self.steal
    }
}

/// Parsed `/proc/stat`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stat {
    /// The `cpu` line: all CPUs together.
    pub total: CpuTicks,
    /// `cpuN` lines, in file order (ascending), online CPUs only.
    pub cpus: Vec<(u32, CpuTicks)>,
    /// Context switches since boot.
    pub ctxt: u64,
    /// Boot time, seconds since the epoch.
    pub btime: u64,
    /// Forks since boot.
    pub processes: u64,
    /// Runnable tasks now.
    pub procs_running: u64,
    /// Tasks blocked on I/O now.
    pub procs_blocked: u64,
}

/// Parse the text of `/proc/stat`.
///
/// Required: the `cpu` line and `ctxt`, `btime`, `processes`,
/// `procs_running`, `procs_blocked` (all present since 2.6.0, so a missing
/// one means a truncated read). A cpu line with fewer than 4 columns is
/// malformed; columns past the 10th (none yet) are ignored. Unknown lines
/// (`intr`, `softirq`, future ones) are ignored.
pub fn parse_stat(text: &str) -> Result<Stat, ProcError> {
    let mut total = None;
    let mut cpus = Vec::new();
    let mut singles: [(&str, Option<u64>); 5] = [
        ("ctxt", None),
        ("btime", None),
        ("processes", None),
        ("procs_running", None),
        ("procs_blocked", None),
    ];
    for (idx, line) in text.lines().enumerate() {
        let lineno = idx + 1;
        let mut fields = line.split_ascii_whitespace();
        let Some(key) = fields.next() else { continue };
        if let Some(suffix) = key.strip_prefix("cpu") {
            if suffix.is_empty() {
                total = Some(cpu_columns(fields, lineno)?);
            } else if suffix.bytes().all(|b| b.is_ascii_digit()) {
                let n =
                    u32::try_from(dec_u64(suffix, FILE, lineno, "cpu number")?).map_err(|_| {
                        ProcError::malformed(
                            FILE,
                            lineno,
                            format!("cpu number {suffix} out of range"),
                        )
                    })?;
                cpus.push((n, cpu_columns(fields, lineno)?));
            }
            // Any other `cpu...` key is not a CPU line: ignored like other unknowns.
            continue;
        }
        if let Some((name, slot)) = singles.iter_mut().find(|(name, _)| *name == key) {
            let (Some(value), None) = (fields.next(), fields.next()) else {
                return Err(ProcError::malformed(
                    FILE,
                    lineno,
                    format!("{name}: expected exactly one value"),
                ));
            };
            *slot = Some(dec_u64(value, FILE, lineno, name)?);
        }
    }
    let total = total.ok_or_else(|| ProcError::missing(FILE, "the \"cpu\" total line"))?;
    let [ctxt, btime, processes, procs_running, procs_blocked] =
        singles.map(|(name, v)| v.ok_or_else(|| ProcError::missing(FILE, format!("\"{name}\""))));
    Ok(Stat {
        total,
        cpus,
        ctxt: ctxt?,
        btime: btime?,
        processes: processes?,
        procs_running: procs_running?,
        procs_blocked: procs_blocked?,
    })
}

fn cpu_columns<'a>(
    fields: impl Iterator<Item = &'a str>,
    lineno: usize,
) -> Result<CpuTicks, ProcError> {
    let mut v = [0u64; 10];
    let mut n = 0;
    for (slot, (tok, name)) in v.iter_mut().zip(fields.zip(COLUMNS)) {
        *slot = dec_u64(tok, FILE, lineno, name)?;
        n += 1;
    }
    if n < 4 {
        return Err(ProcError::malformed(
            FILE,
            lineno,
            format!("cpu line has {n} columns, expected at least 4"),
        ));
    }
    let [user, nice, system, idle, iowait, irq, softirq, steal, guest, guest_nice] = v;
    Ok(CpuTicks {
        user,
        nice,
        system,
        idle,
        iowait,
        irq,
        softirq,
        steal,
        guest,
        guest_nice,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::testutil::{assert_err, online_cpus, Want};

    macro_rules! fixture {
        ($p:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/procfs/",
                $p
            ))
        };
    }

    fn t(v: [u64; 10]) -> CpuTicks {
        let [user, nice, system, idle, iowait, irq, softirq, steal, guest, guest_nice] = v;
        CpuTicks {
            user,
            nice,
            system,
            idle,
            iowait,
            irq,
            softirq,
            steal,
            guest,
            guest_nice,
        }
    }

    #[test]
    fn fixtures() {
        let cases: &[(&str, &str, Stat)] = &[
            (
                "linux-6.18 (captured, 2 CPUs)",
                fixture!("linux-6.18/stat"),
                Stat {
                    total: t([28553, 0, 7307, 202899, 668, 0, 81, 17, 0, 0]),
                    cpus: vec![
                        (0, t([13454, 0, 3331, 102750, 146, 0, 10, 9, 0, 0])),
                        (1, t([15098, 0, 3976, 100149, 522, 0, 70, 8, 0, 0])),
                    ],
                    ctxt: 591470,
                    btime: 1795317874,
                    processes: 13183,
                    procs_running: 1,
                    procs_blocked: 0,
                },
            ),
            (
                "2.6.32: 9 columns, guest_nice absent",
                fixture!("formats/stat-2.6.32"),
                Stat {
                    total: t([321579, 4304, 120079, 36056145, 36799, 16, 9896, 0, 0, 0]),
                    cpus: vec![
                        (0, t([81342, 1201, 30211, 9012345, 10233, 12, 4021, 0, 0, 0])),
                        (1, t([79001, 998, 29876, 9015002, 8876, 3, 1988, 0, 0, 0])),
                        (2, t([83456, 1102, 31002, 9010021, 9901, 1, 2011, 0, 0, 0])),
                        (3, t([77780, 1003, 28990, 9018777, 7789, 0, 1876, 0, 0, 0])),
                    ],
                    ctxt: 91827364,
                    btime: 1325376000,
                    processes: 412345,
                    procs_running: 3,
                    procs_blocked: 1,
                },
            ),
            (
                "2.6.18: 8 columns, no guest, no softirq line",
                fixture!("formats/stat-2.6.18"),
                Stat {
                    total: t([243457, 1489, 89679, 17535432, 4346, 67, 1345, 21, 0, 0]),
                    cpus: vec![
                        (0, t([123456, 789, 45678, 8765432, 2345, 67, 890, 12, 0, 0])),
                        (1, t([120001, 700, 44001, 8770000, 2001, 0, 455, 9, 0, 0])),
                    ],
                    ctxt: 55443322,
                    btime: 1199145600,
                    processes: 98765,
                    procs_running: 1,
                    procs_blocked: 0,
                },
            ),
            (
                "cpu1 offline",
                fixture!("odd/stat-offline-cpu1"),
                Stat {
                    total: t([16000, 30, 6400, 290000, 800, 0, 115, 16, 0, 0]),
                    cpus: vec![
                        (0, t([5000, 10, 2000, 90000, 300, 0, 40, 5, 0, 0])),
                        (2, t([5100, 0, 2100, 89000, 250, 0, 35, 6, 0, 0])),
                        (3, t([4900, 20, 1900, 91000, 200, 0, 30, 4, 0, 0])),
                    ],
                    ctxt: 777,
                    btime: 1700000000,
                    processes: 4242,
                    procs_running: 2,
                    procs_blocked: 0,
                },
            ),
            (
                "2.4-style 4 columns, extra future column ignored, unknown lines",
                "cpu  1 2 3 4\ncpu0 1 2 3 4 5 6 7 8 9 10 11\ncpufreq 9\nfoo bar\n\nctxt 5\nbtime 6\nprocesses 7\nprocs_running 8\nprocs_blocked 9\n",
                Stat {
                    total: t([1, 2, 3, 4, 0, 0, 0, 0, 0, 0]),
                    cpus: vec![(0, t([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))],
                    ctxt: 5,
                    btime: 6,
                    processes: 7,
                    procs_running: 8,
                    procs_blocked: 9,
                },
            ),
        ];
        for (case, text, want) in cases {
            let got = parse_stat(text).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(&got, want, "{case}");
        }
    }

    #[test]
    fn bad_input() {
        let cases: &[(&str, &str, Want)] = &[
            (
                "empty file",
                fixture!("odd/empty"),
                Want::Missing("\"cpu\" total line"),
            ),
            (
                "truncated in a cpu line",
                fixture!("odd/stat-truncated"),
                Want::Malformed(3, "3 columns, expected at least 4"),
            ),
            (
                "garbage ctxt",
                fixture!("odd/stat-garbage"),
                Want::Malformed(5, "ctxt: invalid number \"59l470\""),
            ),
            (
                "garbage column",
                "cpu  1 2 3 4\ncpu0 1 x 3 4\n",
                Want::Malformed(2, "nice: invalid number \"x\""),
            ),
            (
                "negative",
                "cpu  1 -2 3 4\n",
                Want::Malformed(1, "nice: invalid number \"-2\""),
            ),
            (
                "no ctxt",
                "cpu  1 2 3 4\nbtime 1\n",
                Want::Missing("\"ctxt\""),
            ),
            (
                "no procs_blocked",
                "cpu  1 2 3 4\nctxt 1\nbtime 1\nprocesses 1\nprocs_running 1\n",
                Want::Missing("\"procs_blocked\""),
            ),
            (
                "ctxt without value",
                "cpu  1 2 3 4\nctxt\n",
                Want::Malformed(2, "exactly one value"),
            ),
            (
                "ctxt with two values",
                "cpu  1 2 3 4\nctxt 1 2\n",
                Want::Malformed(2, "exactly one value"),
            ),
            (
                "cpu number overflow",
                "cpu4294967296 1 2 3 4\n",
                Want::Malformed(1, "out of range"),
            ),
        ];
        for (case, text, want) in cases {
            assert_err(case, parse_stat(text), FILE, *want);
        }
    }

    #[test]
    fn total_leaves_guest_out() {
        let c = t([10, 20, 30, 40, 50, 60, 70, 80, 5, 6]);
        assert_eq!(c.total(), 10 + 20 + 30 + 40 + 50 + 60 + 70 + 80);
    }

    #[test]
    fn clock_ticks_is_user_hz() {
        // Every architecture this builds for uses the asm-generic USER_HZ.
        assert_eq!(clock_ticks(), USER_HZ);
    }

    #[test]
    fn live_proc_stat() {
        let text = std::fs::read_to_string("/proc/stat").expect("reading /proc/stat");
        let stat = parse_stat(&text).expect("parsing /proc/stat");
        assert!(stat.ctxt > 0, "{stat:?}");
        assert!(stat.processes > 0 && stat.procs_running >= 1, "{stat:?}");
        // Booted after 2020-01-01 and before now.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after epoch")
            .as_secs();
        assert!(
            stat.btime > 1_577_836_800 && stat.btime <= now,
            "btime {}",
            stat.btime
        );
        let ids: Vec<u32> = stat.cpus.iter().map(|(n, _)| *n).collect();
        assert_eq!(ids, online_cpus());
        // The total is at least the sum of the online CPUs (it also counts
        // CPUs that went offline), and was read first, so each column can
        // only trail the per-CPU sum by the ticks that passed during the read.
        let busy: u64 = stat.cpus.iter().map(|(_, c)| c.total()).sum();
        assert!(
            stat.total.total() + 100 * stat.cpus.len() as u64 >= busy,
            "{stat:?}"
        );
        assert!(stat.total.total() > 0);
    }
}
