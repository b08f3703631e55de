//! `/proc/loadavg`: `0.35 0.41 0.23 1/83 9715`, the 1, 5 and 15 minute load
//! averages, runnable/total scheduling entities, and the last PID allocated.
//! The format is unchanged since 2.6.

use crate::sources::{dec_u64, ProcError};

const FILE: &str = "/proc/loadavg";

/// Parsed `/proc/loadavg`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LoadAvg {
    /// 1-minute load average.
    pub one: f64,
    /// 5-minute load average.
    pub five: f64,
    /// 15-minute load average.
    pub fifteen: f64,
    /// Runnable tasks now (`nr_running()`).
    pub runnable: u64,
    /// Tasks (threads) that exist now.
    pub total: u64,
    /// The PID most recently allocated in the reader's PID namespace.
    pub last_pid: u64,
}

/// Parse the text of `/proc/loadavg`: one line of exactly five fields.
pub fn parse_loadavg(text: &str) -> Result<LoadAvg, ProcError> {
    let Some(line) = text.lines().next().filter(|l| !l.trim().is_empty()) else {
        return Err(ProcError::missing(FILE, "the load average line"));
    };
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    let &[one, five, fifteen, tasks, last_pid] = fields.as_slice() else {
        return Err(ProcError::malformed(
            FILE,
            1,
            format!("expected 5 fields, found {}", fields.len()),
        ));
    };
    let Some((runnable, total)) = tasks.split_once('/') else {
        return Err(ProcError::malformed(
            FILE,
            1,
            format!("field 4: expected runnable/total, found {tasks:?}"),
        ));
    };
    Ok(LoadAvg {
        one: load(one, "1-minute load")?,
        five: load(five, "5-minute load")?,
        fifteen: load(fifteen, "15-minute load")?,
        runnable: dec_u64(runnable, FILE, 1, "runnable tasks")?,
        total: dec_u64(total, FILE, 1, "total tasks")?,
        last_pid: dec_u64(last_pid, FILE, 1, "last pid")?,
    })
}

/// A load average: a finite, non-negative decimal (`f64::from_str` would
/// also take `inf`, `NaN` and `-1`).
fn load(tok: &str, what: &str) -> Result<f64, ProcError> {
    match tok.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 && !tok.starts_with(['+', '-']) => Ok(v),
        _ => Err(ProcError::malformed(
            FILE,
            1,
            format!("{what}: invalid number {tok:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::testutil::{assert_err, Want};

    macro_rules! fixture {
        ($p:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/procfs/",
                $p
            ))
        };
    }

    #[test]
    fn good_input() {
        let cases: &[(&str, &str, LoadAvg)] = &[
            (
                "linux-6.18 (captured)",
                fixture!("linux-6.18/loadavg"),
                LoadAvg {
                    one: 0.18,
                    five: 0.44,
                    fifteen: 0.30,
                    runnable: 1,
                    total: 89,
                    last_pid: 13183,
                },
            ),
            (
                "busy host, no trailing newline",
                "123.45 99.00 0.00 57/12345 4194303",
                LoadAvg {
                    one: 123.45,
                    five: 99.0,
                    fifteen: 0.0,
                    runnable: 57,
                    total: 12345,
                    last_pid: 4194303,
                },
            ),
        ];
        for (case, text, want) in cases {
            assert_eq!(
                parse_loadavg(text).unwrap_or_else(|e| panic!("{case}: {e}")),
                *want,
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
                Want::Missing("load average line"),
            ),
            ("blank line", "\n", Want::Missing("load average line")),
            (
                "garbage",
                fixture!("odd/loadavg-garbage"),
                Want::Malformed(1, "5-minute load: invalid number \"zero\""),
            ),
            (
                "truncated",
                "0.35 0.41 0.23 1/8",
                Want::Malformed(1, "expected 5 fields, found 4"),
            ),
            (
                "no slash",
                "0.35 0.41 0.23 183 9715\n",
                Want::Malformed(1, "runnable/total"),
            ),
            (
                "NaN",
                "NaN 0.41 0.23 1/83 9715\n",
                Want::Malformed(1, "1-minute load"),
            ),
            (
                "negative",
                "0.35 -0.41 0.23 1/83 9715\n",
                Want::Malformed(1, "5-minute load"),
            ),
            (
                "inf",
                "0.35 0.41 inf 1/83 9715\n",
                Want::Malformed(1, "15-minute load"),
            ),
            (
                "bad total",
                "0.35 0.41 0.23 1/x 9715\n",
                Want::Malformed(1, "total tasks: invalid number \"x\""),
            ),
        ];
        for (case, text, want) in cases {
            assert_err(case, parse_loadavg(text), FILE, *want);
        }
    }

    #[test]
    fn live_proc_loadavg() {
        let text = std::fs::read_to_string("/proc/loadavg").expect("reading /proc/loadavg");
        let l = parse_loadavg(&text).expect("parsing /proc/loadavg");
        // This test's own thread is runnable and counted.
        assert!(l.runnable >= 1 && l.total >= l.runnable, "{l:?}");
        assert!(l.last_pid > 0, "{l:?}");
        assert!(l.one >= 0.0 && l.five >= 0.0 && l.fifteen >= 0.0, "{l:?}");
    }
}
