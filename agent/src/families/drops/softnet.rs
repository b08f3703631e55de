//! `/proc/net/softnet_stat`: per-CPU receive-path counters of the
//! `softnet_data` backlog (`net/core/net-procfs.c`), one row per *online*
//! CPU, every column `%08x` hex.
//!
//! Columns grew over time; missing ones read as 0:
//!
//! | index | column                 | since                                   |
//! |-------|------------------------|-----------------------------------------|
//! | 0     | processed              | 2.6                                     |
//! | 1     | dropped (backlog full) | 2.6                                     |
//! | 2     | time_squeeze           | 2.6                                     |
//! | 3-7   | 0 (was fastroute)      | 2.6                                     |
//! | 8     | cpu_collision, now 0   | 2.6 (no longer counted since ~4.8)      |
//! | 9     | received_rps           | 2.6.35 (RPS)                            |
//! | 10    | flow_limit_count       | 3.11 (commit 99bbc7074190)              |
//! | 11    | backlog_len            | 5.10 (commit 7d58e6555870)              |
//! | 12    | cpu id                 | 5.10 (same commit)                      |
//! | 13-14 | input/process qlen     | 6.4 (commit 59da2d7b0e99)               |
//!
//! So a row has 9 (2.6.x), 10, 11, 13 or 15 columns; distribution kernels
//! backport (RHEL 8.5's 4.18 prints 13). Before the cpu id column, offline
//! CPUs are skipped without a trace and the row index is not the CPU
//! number once a CPU is offline: [`parse_softnet_stat_online`] maps rows to
//! the online CPU list for those kernels.
//!
//! The counters are `unsigned int` in the kernel: they wrap at 2^32.

use crate::sources::{hex_u64, ProcError};

const FILE: &str = "/proc/net/softnet_stat";

/// Fewest columns of any kernel's rows (2.6.x).
const MIN_COLUMNS: usize = 9;

/// Index of the cpu id column (5.10+).
const CPU_COLUMN: usize = 12;

/// One row of `/proc/net/softnet_stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SoftnetStat {
    /// Logical CPU number: column 12 where present, else the row index
    /// (or the online CPU it maps to, see [`parse_softnet_stat_online`]).
    pub cpu: u32,
    /// Packets taken off the backlog and processed.
    pub processed: u64,
    /// Packets dropped because the backlog was full (`netdev_max_backlog`).
    pub dropped: u64,
    /// `net_rx_action` runs that stopped with work left (budget or time).
    pub time_squeeze: u64,
    /// Times this CPU was woken by an inter-processor interrupt for RPS.
    pub received_rps: u64,
    /// Packets dropped by the flow limit.
    pub flow_limit_count: u64,
    /// Packets queued in the backlog when read (a gauge; 0 before 5.10).
    pub backlog_len: u64,
}

/// Parse the text of `/proc/net/softnet_stat`. The CPU of each row is the
/// cpu id column (5.10+) or the row index.
///
/// Every row must have the same number of columns, at least 9; a row with
/// fewer than the others is a truncated read.
pub fn parse_softnet_stat(text: &str) -> Result<Vec<SoftnetStat>, ProcError> {
    let rows = parse_rows(text)?;
    rows.into_iter()
        .enumerate()
        .map(|(index, (lineno, cols))| {
            let cpu = match cols.get(CPU_COLUMN) {
                Some(&id) => id,
                None => index as u64,
            };
            row(lineno, &cols, cpu)
        })
        .collect()
}

/// Like [`parse_softnet_stat`], but for rows without a cpu id column the
/// `n`th row is labelled with `online[n]`, the `n`th online CPU (from
/// `/sys/devices/system/cpu/online`, see [`super::cpulist`]). The kernel
/// prints rows for online CPUs in ascending order, so this is exact unless a
/// CPU went on- or offline between the two reads; a row count that differs
/// from `online.len()` is reported as malformed rather than guessed at.
pub fn parse_softnet_stat_online(
    text: &str,
    online: &[u32],
) -> Result<Vec<SoftnetStat>, ProcError> {
    let rows = parse_rows(text)?;
    let has_id = rows.first().is_some_and(|(_, c)| c.len() > CPU_COLUMN);
    if !has_id && rows.len() != online.len() {
        let last = rows.last().map_or(1, |(l, _)| *l);
        return Err(ProcError::malformed(
            FILE,
            last,
            format!(
                "{} rows but {} online CPUs (a CPU went on- or offline between reads?)",
                rows.len(),
                online.len()
            ),
        ));
    }
    rows.into_iter()
        .zip(0..)
        .map(|((lineno, cols), index)| {
            let cpu = match cols.get(CPU_COLUMN) {
                Some(&id) => id,
                None => u64::from(online[index]),
            };
            row(lineno, &cols, cpu)
        })
        .collect()
}

/// Split into `(line number, hex columns)`, checking column counts.
fn parse_rows(text: &str) -> Result<Vec<(usize, Vec<u64>)>, ProcError> {
    let mut rows: Vec<(usize, Vec<u64>)> = Vec::new();
    for (idx, line) in text.lines().enumerate() {
        let lineno = idx + 1;
        if line.trim().is_empty() {
            continue;
        }
        let cols = line
            .split_ascii_whitespace()
            .enumerate()
            .map(|(i, tok)| hex_u64(tok, FILE, lineno, &format!("column {i}")))
            .collect::<Result<Vec<u64>, ProcError>>()?;
        if cols.len() < MIN_COLUMNS {
            return Err(ProcError::malformed(
                FILE,
                lineno,
                format!("{} columns, expected at least {MIN_COLUMNS}", cols.len()),
            ));
        }
        if let Some((first_line, first)) = rows.first() {
            if first.len() != cols.len() {
                return Err(ProcError::malformed(
                    FILE,
                    lineno,
                    format!(
                        "{} columns, line {first_line} has {}",
                        cols.len(),
                        first.len()
                    ),
                ));
            }
        }
        rows.push((lineno, cols));
    }
    if rows.is_empty() {
        return Err(ProcError::missing(FILE, "any CPU row"));
    }
    Ok(rows)
}

fn row(lineno: usize, cols: &[u64], cpu: u64) -> Result<SoftnetStat, ProcError> {
    let col = |i: usize| cols.get(i).copied().unwrap_or(0);
    let cpu = u32::try_from(cpu)
        .map_err(|_| ProcError::malformed(FILE, lineno, format!("cpu id {cpu} out of range")))?;
    Ok(SoftnetStat {
        cpu,
        processed: col(0),
        dropped: col(1),
        time_squeeze: col(2),
        received_rps: col(9),
        flow_limit_count: col(10),
        backlog_len: col(11),
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

    /// (cpu, processed, dropped, time_squeeze, received_rps, flow_limit_count, backlog_len)
    fn s(v: (u32, u64, u64, u64, u64, u64, u64)) -> SoftnetStat {
        SoftnetStat {
            cpu: v.0,
            processed: v.1,
            dropped: v.2,
            time_squeeze: v.3,
            received_rps: v.4,
            flow_limit_count: v.5,
            backlog_len: v.6,
        }
    }

    #[test]
    fn fixtures() {
        type Row = (u32, u64, u64, u64, u64, u64, u64);
        let cases: &[(&str, &str, &[Row])] = &[
            (
                "linux-6.18 (captured): 15 columns",
                fixture!("linux-6.18/net_softnet_stat"),
                &[(0, 0x14, 0, 0, 0, 0, 0), (1, 0x36d9, 0, 0, 0, 0, 0)],
            ),
            (
                "5.10: 13 columns, cpu1 offline, ids from column 12",
                fixture!("formats/softnet_stat-5.10"),
                &[
                    (0, 0xc0ffee, 2, 9, 0, 1, 0),
                    (2, 0xbeef00, 0, 0xa, 3, 0, 4),
                    (3, 0xabcd, 1, 0, 0, 0, 0),
                ],
            ),
            (
                "4.19: 11 columns, cpu1 offline: rows labelled by index",
                fixture!("formats/softnet_stat-4.19"),
                &[
                    (0, 0xc0ffee, 2, 9, 0, 1, 0),
                    (1, 0xbeef00, 0, 0xa, 3, 0, 0),
                    (2, 0xabcd, 1, 0, 0, 0, 0),
                ],
            ),
            (
                "3.10: 10 columns, no flow limit",
                fixture!("formats/softnet_stat-3.10"),
                &[(0, 0x7fffffff, 5, 0x1f, 0x11, 0, 0), (1, 0xffffffff, 0, 0x20, 0x22, 0, 0)],
            ),
            (
                "2.6.32: 9 columns, cpu_collision ignored",
                fixture!("formats/softnet_stat-2.6.32"),
                &[(0, 0x1a2b3c, 0x10, 3, 0, 0, 0), (1, 0x0f00ba, 0, 1, 0, 0, 0)],
            ),
            (
                "cpu id is hex: 0000000b is cpu 11",
                "00000001 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 0000000b\n",
                &[(11, 1, 0, 0, 0, 0, 0)],
            ),
        ];
        for (case, text, want) in cases {
            let want: Vec<SoftnetStat> = want.iter().copied().map(s).collect();
            assert_eq!(
                parse_softnet_stat(text).unwrap_or_else(|e| panic!("{case}: {e}")),
                want,
                "{case}"
            );
        }
    }

    #[test]
    fn online_mapping() {
        let online = [0, 2, 3];
        // Pre-5.10: rows become cpus 0, 2, 3.
        let got =
            parse_softnet_stat_online(fixture!("formats/softnet_stat-4.19"), &online).unwrap();
        assert_eq!(got.iter().map(|r| r.cpu).collect::<Vec<_>>(), [0, 2, 3]);
        assert_eq!(got[1].received_rps, 3);
        // 5.10+: the cpu id column wins, the list is not consulted.
        let got = parse_softnet_stat_online(fixture!("formats/softnet_stat-5.10"), &[7]).unwrap();
        assert_eq!(got.iter().map(|r| r.cpu).collect::<Vec<_>>(), [0, 2, 3]);
        // Hotplug between reads: refuse to guess.
        assert_err(
            "row/online mismatch",
            parse_softnet_stat_online(fixture!("formats/softnet_stat-4.19"), &[0, 1]),
            FILE,
            Want::Malformed(3, "3 rows but 2 online CPUs"),
        );
    }

    #[test]
    fn bad_input() {
        let cases: &[(&str, &str, Want)] = &[
            (
                "empty file",
                fixture!("odd/empty"),
                Want::Missing("any CPU row"),
            ),
            (
                "truncated last row",
                fixture!("odd/softnet-truncated"),
                Want::Malformed(2, "3 columns, expected at least 9"),
            ),
            (
                "rows of different widths",
                "0 0 0 0 0 0 0 0 0 0 0\n0 0 0 0 0 0 0 0 0 0\n",
                Want::Malformed(2, "10 columns, line 1 has 11"),
            ),
            (
                "garbage",
                "0000001g 0 0 0 0 0 0 0 0\n",
                Want::Malformed(1, "column 0: invalid number \"0000001g\""),
            ),
            (
                "0x prefix",
                "0 0x1 0 0 0 0 0 0 0\n",
                Want::Malformed(1, "column 1"),
            ),
        ];
        for (case, text, want) in cases {
            assert_err(case, parse_softnet_stat(text), FILE, *want);
        }
    }

    #[test]
    fn live_proc_net_softnet_stat() {
        let text = std::fs::read_to_string("/proc/net/softnet_stat")
            .expect("reading /proc/net/softnet_stat");
        let online = online_cpus();
        let rows =
            parse_softnet_stat_online(&text, &online).expect("parsing /proc/net/softnet_stat");
        let ids: Vec<u32> = rows.iter().map(|r| r.cpu).collect();
        assert_eq!(ids, online);
        assert!(
            rows.iter().any(|r| r.processed > 0),
            "no packet processed since boot? {rows:?}"
        );
    }
}
