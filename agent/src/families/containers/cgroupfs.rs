//! cgroupfs: where the CPU controllers are mounted, and their files'
//! formats. Pure parsers, tested on fixtures; the walk is in `collector.rs`.
//!
//! - cgroup v2 (`cgroup2` at `/sys/fs/cgroup`, or at `/sys/fs/cgroup/unified`
//!   on a hybrid host): `cpu.stat` (`usage_usec`, `user_usec`, `system_usec`
//!   always; `nr_periods`, `nr_throttled`, `throttled_usec` with the `cpu`
//!   controller) and `cpu.max` (`<quota|max> <period>`, µs).
//! - cgroup v1 (`cpu`, `cpuacct`, often co-mounted as `cpu,cpuacct`):
//!   `cpuacct.usage` (ns), `cpuacct.stat` (`user`/`system` in USER_HZ
//!   ticks), `cpu.stat` (`nr_periods`, `nr_throttled`, `throttled_time` ns),
//!   `cpu.cfs_quota_us` (`-1`: none) and `cpu.cfs_period_us`.

use std::path::{Path, PathBuf};

use crate::sources::ProcError;

/// CPU accounting of one cgroup, in the kernel's units converted to ns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuUsage {
    /// Total CPU time (v2 `usage_usec`, v1 `cpuacct.usage`), ns.
    pub usage_ns: u64,
    /// User and system time, ns, when the kernel splits them.
    pub user_ns: Option<u64>,
    pub system_ns: Option<u64>,
}

/// CFS bandwidth control of one cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Throttling {
    /// Enforcement periods that elapsed with a quota set.
    pub periods: u64,
    /// Periods in which the cgroup used up its quota and was throttled.
    pub throttled_periods: u64,
    /// Time the cgroup's tasks were throttled, ns.
    pub throttled_ns: u64,
}

/// `cpu.max` or `cpu.cfs_quota_us` + `cpu.cfs_period_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// CPU time allowed per period, µs; None when unlimited.
    pub quota_us: Option<u64>,
    pub period_us: u64,
}

fn malformed(file: &str, line: usize, reason: impl Into<String>) -> ProcError {
    ProcError::Malformed {
        file: file.to_owned(),
        line,
        reason: reason.into(),
    }
}

/// `key value` lines: the values of `keys` (None when a key is absent).
/// Unknown keys are skipped (kernels add them); a known key with a value
/// that is not a number is an error naming the line.
fn keyed<const N: usize>(
    text: &str,
    file: &str,
    keys: [&str; N],
) -> Result<[Option<u64>; N], ProcError> {
    let mut out = [None; N];
    for (i, line) in text.lines().enumerate() {
        let mut it = line.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            if line.trim().is_empty() {
                continue;
            }
            return Err(malformed(
                file,
                i + 1,
                format!("expected `key value`, got {line:?}"),
            ));
        };
        if let Some(pos) = keys.iter().position(|want| *want == k) {
            let n = v
                .parse()
                .map_err(|_| malformed(file, i + 1, format!("{k}: {v:?} is not a number")))?;
            out[pos] = Some(n);
        }
    }
    Ok(out)
}

/// v2 `cpu.stat`: usage, and throttling when the `cpu` controller is on.
pub fn parse_cpu_stat_v2(text: &str) -> Result<(CpuUsage, Option<Throttling>), ProcError> {
    let [usage, user, system, periods, throttled, throttled_us] = keyed(
        text,
        "cpu.stat",
        [
            "usage_usec",
            "user_usec",
            "system_usec",
            "nr_periods",
            "nr_throttled",
            "throttled_usec",
        ],
    )?;
    let usage = usage.ok_or_else(|| malformed("cpu.stat", 1, "no usage_usec line"))?;
    let us = |v: Option<u64>| v.map(|v| v.saturating_mul(1000));
    let throttling = match (periods, throttled, throttled_us) {
        (Some(p), Some(t), Some(tu)) => Some(Throttling {
            periods: p,
            throttled_periods: t,
            throttled_ns: tu.saturating_mul(1000),
        }),
        _ => None,
    };
    Ok((
        CpuUsage {
            usage_ns: usage.saturating_mul(1000),
            user_ns: us(user),
            system_ns: us(system),
        },
        throttling,
    ))
}

/// v2 `cpu.max`: `max 100000` or `50000 100000`.
pub fn parse_cpu_max(text: &str) -> Result<Limit, ProcError> {
    let mut it = text.split_whitespace();
    let (Some(q), Some(p), None) = (it.next(), it.next(), it.next()) else {
        return Err(malformed(
            "cpu.max",
            1,
            format!("expected `<quota|max> <period>`, got {:?}", text.trim()),
        ));
    };
    let period_us = p
        .parse()
        .map_err(|_| malformed("cpu.max", 1, format!("period {p:?} is not a number")))?;
    let quota_us =
        match q {
            "max" => None,
            q => Some(q.parse().map_err(|_| {
                malformed("cpu.max", 1, format!("quota {q:?} is not a number or max"))
            })?),
        };
    Ok(Limit {
        quota_us,
        period_us,
    })
}

/// v1 `cpuacct.stat`: (user, system) in USER_HZ ticks.
pub fn parse_cpuacct_stat(text: &str) -> Result<(u64, u64), ProcError> {
    let [user, system] = keyed(text, "cpuacct.stat", ["user", "system"])?;
    match (user, system) {
        (Some(u), Some(s)) => Ok((u, s)),
        _ => Err(malformed(
            "cpuacct.stat",
            1,
            "expected user and system lines",
        )),
    }
}

/// v1 `cpu.stat`.
pub fn parse_cpu_stat_v1(text: &str) -> Result<Throttling, ProcError> {
    let [p, t, tt] = keyed(
        text,
        "cpu.stat",
        ["nr_periods", "nr_throttled", "throttled_time"],
    )?;
    match (p, t, tt) {
        (Some(periods), Some(throttled_periods), Some(throttled_ns)) => Ok(Throttling {
            periods,
            throttled_periods,
            throttled_ns,
        }),
        _ => Err(malformed(
            "cpu.stat",
            1,
            "expected nr_periods, nr_throttled and throttled_time",
        )),
    }
}

/// A single number file (`cpuacct.usage`, `cpu.cfs_period_us`).
pub fn parse_number(text: &str, file: &str) -> Result<u64, ProcError> {
    let t = text.trim();
    t.parse()
        .map_err(|_| malformed(file, 1, format!("{t:?} is not a number")))
}

/// v1 `cpu.cfs_quota_us`: `-1` is no limit.
pub fn parse_cfs_quota(text: &str) -> Result<Option<u64>, ProcError> {
    let t = text.trim();
    let q: i64 = t
        .parse()
        .map_err(|_| malformed("cpu.cfs_quota_us", 1, format!("{t:?} is not a number")))?;
    Ok(u64::try_from(q).ok())
}

/// Which hierarchy to read (`probes.containers.hierarchy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hierarchy {
    /// v2 on a v2 host; v1 `cpuacct`/`cpu` on a v1 or hybrid host.
    #[default]
    Auto,
    /// cgroup v1 `cpuacct` (and `cpu` for throttling).
    V1,
    /// cgroup v2 (on a hybrid host its `unified` mount: usage only, the CPU
    /// controller being on v1).
    V2,
}

/// The cgroup hierarchies that account CPU on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v2: one hierarchy.
    V2 { root: PathBuf },
    /// cgroup v1 (or hybrid): the `cpuacct` and `cpu` hierarchies (often the
    /// same directory).
    V1 {
        cpuacct: PathBuf,
        cpu: Option<PathBuf>,
    },
}

impl Layout {
    /// Finds the hierarchies under `cgroup_root` (`/sys/fs/cgroup`, or the
    /// host's under `/host/sys`). v2 when the root is a cgroup2 hierarchy
    /// (it has `cgroup.controllers`); else v1 `cpuacct` (with `cpu`) when
    /// mounted, which on a hybrid host is where the CPU controllers are;
    /// else the hybrid host's `unified` cgroup2 hierarchy (usage only).
    pub fn discover(cgroup_root: &Path, want: Hierarchy) -> Result<Layout, String> {
        let unified = cgroup_root.join("unified");
        if want == Hierarchy::V2 && unified.join("cgroup.controllers").is_file() {
            return Ok(Layout::V2 { root: unified });
        }
        if want != Hierarchy::V1 && cgroup_root.join("cgroup.controllers").is_file() {
            return Ok(Layout::V2 {
                root: cgroup_root.to_owned(),
            });
        }
        let first = |names: &[&str], file: &str| {
            names
                .iter()
                .map(|n| cgroup_root.join(n))
                .find(|p| p.join(file).is_file())
        };
        if want != Hierarchy::V2 {
            if let Some(cpuacct) =
                first(&["cpuacct", "cpu,cpuacct", "cpuacct,cpu"], "cpuacct.usage")
            {
                let cpu = first(&["cpu", "cpu,cpuacct", "cpuacct,cpu"], "cpu.cfs_period_us");
                return Ok(Layout::V1 { cpuacct, cpu });
            }
        }
        if want == Hierarchy::Auto && unified.join("cgroup.controllers").is_file() {
            return Ok(Layout::V2 { root: unified });
        }
        Err(match want {
            Hierarchy::V1 => format!(
                "{}: no cgroup v1 cpuacct controller (cpuacct/cpuacct.usage)",
                cgroup_root.display()
            ),
            Hierarchy::V2 => format!(
                "{}: no cgroup2 hierarchy (cgroup.controllers, or unified/cgroup.controllers)",
                cgroup_root.display()
            ),
            Hierarchy::Auto => format!(
                "{}: no cgroup2 hierarchy (cgroup.controllers) and no cgroup v1 cpuacct \
                 controller (cpuacct/cpuacct.usage)",
                cgroup_root.display()
            ),
        })
    }

    /// The hierarchy walked for cgroup paths: the one with the usage.
    pub fn walk_root(&self) -> &Path {
        match self {
            Layout::V2 { root } => root,
            Layout::V1 { cpuacct, .. } => cpuacct,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_cpu_stat_with_and_without_the_cpu_controller() {
        let full = "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n\
                    core_sched.force_idle_usec 0\nnr_periods 40\nnr_throttled 12\n\
                    throttled_usec 345678\nnr_bursts 0\nburst_usec 0\n";
        let (u, t) = parse_cpu_stat_v2(full).unwrap();
        assert_eq!(u.usage_ns, 1_500_000_000);
        assert_eq!(
            (u.user_ns, u.system_ns),
            (Some(1_000_000_000), Some(500_000_000))
        );
        assert_eq!(
            t,
            Some(Throttling {
                periods: 40,
                throttled_periods: 12,
                throttled_ns: 345_678_000
            })
        );
        let (u, t) = parse_cpu_stat_v2("usage_usec 7\nuser_usec 4\nsystem_usec 3\n").unwrap();
        assert_eq!(u.usage_ns, 7000);
        assert_eq!(t, None);
    }

    #[test]
    fn bad_content_names_the_file_and_line() {
        let e = parse_cpu_stat_v2("usage_usec 1\nuser_usec x\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cpu.stat: line 2: user_usec: \"x\" is not a number"
        );
        assert!(parse_cpu_stat_v2("user_usec 1\n")
            .unwrap_err()
            .to_string()
            .contains("no usage_usec"));
        assert!(parse_cpu_stat_v2("usage_usec\n").is_err());
        assert!(parse_cpu_stat_v2("").is_err());
        assert!(parse_cpu_stat_v1("nr_periods 1\n").is_err());
        assert!(parse_cpuacct_stat("user 1\n").is_err());
        assert!(parse_number("12a", "cpuacct.usage").is_err());
        assert!(parse_cfs_quota("none").is_err());
    }

    #[test]
    fn limits() {
        assert_eq!(
            parse_cpu_max("max 100000\n").unwrap(),
            Limit {
                quota_us: None,
                period_us: 100_000
            }
        );
        assert_eq!(
            parse_cpu_max("50000 100000\n").unwrap(),
            Limit {
                quota_us: Some(50_000),
                period_us: 100_000
            }
        );
        for bad in ["", "max", "1 2 3", "x 100000", "50000 y"] {
            assert!(parse_cpu_max(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_cfs_quota("-1\n").unwrap(), None);
        assert_eq!(parse_cfs_quota("25000\n").unwrap(), Some(25_000));
    }

    #[test]
    fn v1_files() {
        assert_eq!(
            parse_cpuacct_stat("user 250\nsystem 125\n").unwrap(),
            (250, 125)
        );
        assert_eq!(
            parse_cpu_stat_v1("nr_periods 10\nnr_throttled 3\nthrottled_time 987654321\n").unwrap(),
            Throttling {
                periods: 10,
                throttled_periods: 3,
                throttled_ns: 987_654_321
            }
        );
        assert_eq!(
            parse_number("123456789\n", "cpuacct.usage").unwrap(),
            123_456_789
        );
    }

    #[test]
    fn discovery() {
        let d = tempfile::tempdir().unwrap();
        assert!(Layout::discover(d.path(), Hierarchy::Auto).is_err());
        assert!(Layout::discover(d.path(), Hierarchy::V2).is_err());
        std::fs::create_dir_all(d.path().join("cpu,cpuacct")).unwrap();
        std::fs::write(d.path().join("cpu,cpuacct/cpuacct.usage"), "0\n").unwrap();
        std::fs::write(d.path().join("cpu,cpuacct/cpu.cfs_period_us"), "100000\n").unwrap();
        assert_eq!(
            Layout::discover(d.path(), Hierarchy::Auto).unwrap(),
            Layout::V1 {
                cpuacct: d.path().join("cpu,cpuacct"),
                cpu: Some(d.path().join("cpu,cpuacct"))
            }
        );
        // A hybrid host: v1 by default, its unified v2 mount when asked.
        std::fs::create_dir_all(d.path().join("unified")).unwrap();
        std::fs::write(d.path().join("unified/cgroup.controllers"), "\n").unwrap();
        assert!(matches!(
            Layout::discover(d.path(), Hierarchy::Auto).unwrap(),
            Layout::V1 { .. }
        ));
        assert_eq!(
            Layout::discover(d.path(), Hierarchy::V2).unwrap(),
            Layout::V2 {
                root: d.path().join("unified")
            }
        );
        std::fs::write(d.path().join("cgroup.controllers"), "cpu io\n").unwrap();
        assert_eq!(
            Layout::discover(d.path(), Hierarchy::Auto).unwrap(),
            Layout::V2 {
                root: d.path().to_owned()
            }
        );
    }
}
