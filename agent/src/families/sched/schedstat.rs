//! `/proc/schedstat`: per-CPU run time, run-queue wait time and timeslices.
//! The procfs fallback for run-queue latency: the wait time is the sum of
//! the time every task spent runnable but not running on that CPU.
//!
//! Present only with `CONFIG_SCHEDSTATS` (many distribution kernels, not
//! all). The file is versioned (`Documentation/scheduler/sched-stats.rst`):
//!
//! - 15: dropped three `sched_yield` counters from the cpu line of 14, which
//!   now reads `cpu<N>` plus 9 fields;
//! - 16: reordered the idle-type columns of `domain` lines;
//! - 17: split `lb_imbalance` in `domain` lines and added the domain name.
//!
//! The cpu line is the same in 15, 16 and 17: `yld_count 0 sched_count
//! sched_goidle ttwu_count ttwu_local rq_cpu_time run_delay pcount`, whose
//! last three are what this module reads. Versions below 15 are rejected.
//! A newer version is accepted as long as its cpu lines keep the 9-field
//! shape: the version number tracks any format change, so far always in the
//! `domain` lines, which are ignored; a changed cpu line is still an error
//! rather than misread numbers.
//!
//! Only online CPUs get a line.

use crate::sources::{dec_u64, ProcError};

const FILE: &str = "/proc/schedstat";

/// The oldest schedstat version whose cpu line this module reads.
pub const MIN_VERSION: u64 = 15;

/// Fields after `cpu<N>` on a cpu line, versions 15 to 17.
const CPU_FIELDS: usize = 9;

/// One CPU's line of `/proc/schedstat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuSchedstat {
    /// Logical CPU number.
    pub cpu: u32,
    /// Time tasks ran on this CPU, ns (`rq_cpu_time`).
    pub run_time_ns: u64,
    /// Time tasks waited on this CPU's run queue, ns (`run_delay`).
    pub wait_time_ns: u64,
    /// Timeslices run on this CPU (`pcount`).
    pub timeslices: u64,
}

/// Parse the text of `/proc/schedstat`: the `version` line must come before
/// any cpu line; `timestamp` and `domain` lines are ignored.
pub fn parse_schedstat(text: &str) -> Result<Vec<CpuSchedstat>, ProcError> {
    let mut version = None;
    let mut out = Vec::new();
    for (idx, line) in text.lines().enumerate() {
        let lineno = idx + 1;
        let mut fields = line.split_ascii_whitespace();
        let Some(key) = fields.next() else { continue };
        if key == "version" {
            let tok = fields.next().unwrap_or("");
            let v = dec_u64(tok, FILE, lineno, "version")?;
            if v < MIN_VERSION {
                return Err(ProcError::malformed(
                    FILE,
                    lineno,
                    format!(
                        "unsupported schedstat version {v}: Perch reads version {MIN_VERSION} \
                         and later (older versions come from 2.6-era kernels)"
                    ),
                ));
            }
            version = Some(v);
            continue;
        }
        let Some(suffix) = key.strip_prefix("cpu") else {
            continue;
        };
        let Some(v) = version else {
            return Err(ProcError::missing(
                FILE,
                "the version line before the cpu lines",
            ));
        };
        let cpu = u32::try_from(dec_u64(suffix, FILE, lineno, "cpu number")?).map_err(|_| {
            ProcError::malformed(FILE, lineno, format!("cpu number {suffix} out of range"))
        })?;
        let nums: Vec<&str> = fields.collect();
        let &[_, _, _, _, _, _, run, wait, slices] = nums.as_slice() else {
            return Err(ProcError::malformed(
                FILE,
                lineno,
                format!(
                    "schedstat version {v}: cpu line has {} fields, expected {CPU_FIELDS}",
                    nums.len()
                ),
            ));
        };
        out.push(CpuSchedstat {
            cpu,
            run_time_ns: dec_u64(run, FILE, lineno, "run time")?,
            wait_time_ns: dec_u64(wait, FILE, lineno, "wait time")?,
            timeslices: dec_u64(slices, FILE, lineno, "timeslices")?,
        });
    }
    if version.is_none() {
        return Err(ProcError::missing(FILE, "the version line"));
    }
    Ok(out)
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

    fn s(cpu: u32, run_time_ns: u64, wait_time_ns: u64, timeslices: u64) -> CpuSchedstat {
        CpuSchedstat {
            cpu,
            run_time_ns,
            wait_time_ns,
            timeslices,
        }
    }

    #[test]
    fn versions() {
        // The three fixtures share their cpu lines; only the domain lines differ.
        let want = vec![
            s(0, 190373218434, 11876540912, 5533101),
            s(1, 185002113377, 10987654321, 5012345),
            s(2, 201234567890, 12345678901, 5789012),
            s(3, 176543210987, 9876543210, 4876543),
        ];
        let cases: &[(&str, &str)] = &[
            ("v15 (4.19 layout)", fixture!("formats/schedstat-v15")),
            ("v16", fixture!("formats/schedstat-v16")),
            (
                "v17 (named domains, 45 domain fields)",
                fixture!("formats/schedstat-v17"),
            ),
        ];
        for (case, text) in cases {
            assert_eq!(
                parse_schedstat(text).unwrap_or_else(|e| panic!("{case}: {e}")),
                want,
                "{case}"
            );
        }
    }

    #[test]
    fn other_good_input() {
        let cases: &[(&str, &str, Vec<CpuSchedstat>)] = &[
            (
                "uniprocessor: no domain lines, cpu0 only",
                "version 15\ntimestamp 4294967296\ncpu0 0 0 10 5 7 7 1000 200 30\n",
                vec![s(0, 1000, 200, 30)],
            ),
            (
                "cpu1 offline",
                "version 15\ntimestamp 1\ncpu0 0 0 1 1 1 1 10 20 30\ndomain0 5 0\ncpu2 0 0 1 1 1 1 40 50 60\n",
                vec![s(0, 10, 20, 30), s(2, 40, 50, 60)],
            ),
            (
                "future version with the same cpu line",
                "version 18\ntimestamp 1\ncpu0 0 0 1 1 1 1 10 20 30\ndomain0 new-format whatever\n",
                vec![s(0, 10, 20, 30)],
            ),
        ];
        for (case, text, want) in cases {
            assert_eq!(
                &parse_schedstat(text).unwrap_or_else(|e| panic!("{case}: {e}")),
                want,
                "{case}"
            );
        }
    }

    #[test]
    fn bad_input() {
        let cases: &[(&str, &str, Want)] = &[
            (
                "empty file",
                fixture!("odd/empty"),
                Want::Missing("the version line"),
            ),
            (
                "version 14 (2.6.20 era)",
                fixture!("odd/schedstat-v14"),
                Want::Malformed(1, "unsupported schedstat version 14"),
            ),
            (
                "truncated cpu line",
                fixture!("odd/schedstat-truncated"),
                Want::Malformed(3, "cpu line has 8 fields, expected 9"),
            ),
            (
                "very short cpu line",
                "version 15\ncpu0 1\n",
                Want::Malformed(2, "cpu line has 1 fields"),
            ),
            (
                "future version, longer cpu line",
                "version 18\ncpu0 0 0 1 1 1 1 10 20 30 40\n",
                Want::Malformed(2, "version 18: cpu line has 10 fields"),
            ),
            (
                "cpu line before version",
                "timestamp 1\ncpu0 0 0 1 1 1 1 10 20 30\nversion 15\n",
                Want::Missing("version line before the cpu lines"),
            ),
            (
                "garbage version",
                "version fifteen\n",
                Want::Malformed(1, "version: invalid number \"fifteen\""),
            ),
            (
                "garbage number",
                "version 15\ncpu0 0 0 1 1 1 1 10 2O 30\n",
                Want::Malformed(2, "wait time: invalid number \"2O\""),
            ),
            (
                "garbage cpu number",
                "version 15\ncpuX 0 0 1 1 1 1 10 20 30\n",
                Want::Malformed(2, "cpu number"),
            ),
        ];
        for (case, text, want) in cases {
            assert_err(case, parse_schedstat(text), FILE, *want);
        }
    }

    /// With `/proc/schedstat` (`CONFIG_SCHEDSTATS=y`): the live file parses,
    /// one line per online CPU. Without it: the kernel really lacks
    /// `CONFIG_SCHEDSTATS`, and the agent's sched collector, built the way
    /// the agent builds it, does what the module header of
    /// `families/sched/collector.rs` documents for procfs mode on such a
    /// kernel: context switches from `/proc/stat`, no wait time. (The eBPF
    /// fallback, wait time from the run-queue latency sums, needs the
    /// programs loaded: `tests/tests/cpu.rs` `scheduler_wait_time`.)
    #[test]
    fn live_proc_schedstat() {
        let text = match std::fs::read_to_string("/proc/schedstat") {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return no_schedstat_procfs_mode();
            }
            Err(e) => panic!("reading /proc/schedstat: {e}"),
        };
        let cpus = parse_schedstat(&text).expect("parsing /proc/schedstat");
        let ids: Vec<u32> = cpus.iter().map(|c| c.cpu).collect();
        assert_eq!(ids, online_cpus());
        assert!(
            cpus.iter().any(|c| c.run_time_ns > 0 && c.timeslices > 0),
            "{cpus:?}"
        );
    }

    /// The no-`/proc/schedstat` half of [`live_proc_schedstat`].
    fn no_schedstat_procfs_mode() {
        use crate::config::Config;
        use crate::families::{build_collectors, Family};
        use crate::gate::Mode;
        use crate::model::{Data, Number};
        use crate::probes::Probes;
        use crate::sources::{stat::parse_stat, Root};

        // kernel/sched/core.c registers this sysctl under the same
        // CONFIG_SCHEDSTATS as /proc/schedstat (kernel/sched/stats.c): both
        // absent means the kernel option is off, not a missing or odd /proc.
        assert!(
            !std::path::Path::new("/proc/sys/kernel/sched_schedstats").exists(),
            "/proc/schedstat is absent but kernel.sched_schedstats exists: \
             CONFIG_SCHEDSTATS is on, so /proc/schedstat should be there"
        );
        let mut cfg = Config::default();
        for &f in Family::ALL {
            cfg.probes.set_mode(f, Mode::Off);
        }
        cfg.probes.set_mode(Family::Sched, Mode::Procfs);
        let mut probes = Probes::start(&cfg).expect("planning sched in procfs mode");
        let boot = crate::collectors::boot_time(&Root::proc()).expect("boot time");
        let mut collectors =
            build_collectors(&cfg.probes, Root::proc(), Root::sys(), &mut probes, boot)
                .expect("building");
        assert_eq!(
            collectors.iter().map(|c| c.name()).collect::<Vec<_>>(),
            ["sched"]
        );
        let ctxt = || {
            parse_stat(&std::fs::read_to_string("/proc/stat").unwrap())
                .unwrap()
                .ctxt
        };
        let before = ctxt();
        let mut out = Vec::new();
        collectors[0]
            .collect(std::time::SystemTime::now(), &mut out)
            .expect("collecting sched in procfs mode");
        let after = ctxt();
        let names: Vec<&str> = out.iter().map(|m| m.name).collect();
        assert_eq!(
            names,
            [crate::catalogue::CONTEXT_SWITCHES],
            "procfs mode without /proc/schedstat: context switches only, no wait time"
        );
        let Data::Sum { points, .. } = &out[0].data else {
            panic!("{:?}", out[0].data)
        };
        let [point] = points.as_slice() else {
            panic!("one host-wide point: {points:?}")
        };
        let Number::Int(v) = point.value else {
            panic!("{point:?}")
        };
        let v = u64::try_from(v).expect("non-negative");
        assert!(
            (before..=after).contains(&v),
            "/proc/stat ctxt {before} <= {v} <= {after}"
        );
        assert!(point.attributes.is_empty(), "{point:?}");
    }
}
