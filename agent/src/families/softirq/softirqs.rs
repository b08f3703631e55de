//! `/proc/softirqs` (since 2.6.31): softirqs raised per vector per CPU.
//!
//! A header names the CPUs (`CPU0 CPU1 ...`, every *possible* CPU, so offline
//! ones are listed too), then one line per vector: `NET_RX: 4909 7837`.
//! Vector names come from the kernel's `softirq_to_name` and are kept as the
//! file spells them, lower-cased: `hi timer net_tx net_rx block irq_poll
//! tasklet sched hrtimer rcu` today; `block_iopoll` before 4.5 renamed it
//! `irq_poll`. Counts are 32-bit in the kernel (`%10u`) and wrap.

use crate::sources::{dec_u64, ProcError};

const FILE: &str = "/proc/softirqs";

/// Parsed `/proc/softirqs`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Softirqs {
    /// Logical CPU numbers, from the header, in column order.
    pub cpus: Vec<u32>,
    /// `(vector, counts)` in file order; vector names lower-cased without
    /// the `:`, each with one count per entry of `cpus`.
    pub vectors: Vec<(String, Vec<u64>)>,
}

/// Parse the text of `/proc/softirqs`. Every vector line must have exactly
/// one count per header CPU.
pub fn parse_softirqs(text: &str) -> Result<Softirqs, ProcError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((hdr_line, header)) = lines.next() else {
        return Err(ProcError::missing(FILE, "the CPU header line"));
    };
    let cpus = header
        .split_ascii_whitespace()
        .map(|tok| {
            let n = tok.strip_prefix("CPU").ok_or_else(|| {
                ProcError::malformed(
                    FILE,
                    hdr_line,
                    format!("header: expected CPU<n>, found {tok:?}"),
                )
            })?;
            u32::try_from(dec_u64(n, FILE, hdr_line, "header cpu number")?).map_err(|_| {
                ProcError::malformed(FILE, hdr_line, format!("cpu number {n} out of range"))
            })
        })
        .collect::<Result<Vec<u32>, ProcError>>()?;
    if cpus.is_empty() {
        return Err(ProcError::malformed(FILE, hdr_line, "header names no CPUs"));
    }
    let mut vectors = Vec::new();
    for (lineno, line) in lines {
        let Some((name, rest)) = line.split_once(':') else {
            return Err(ProcError::malformed(
                FILE,
                lineno,
                "expected \"VECTOR: counts\"",
            ));
        };
        let name = name.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(ProcError::malformed(
                FILE,
                lineno,
                format!("bad vector name {name:?}"),
            ));
        }
        let name = name.to_ascii_lowercase();
        let counts = rest
            .split_ascii_whitespace()
            .map(|tok| dec_u64(tok, FILE, lineno, &name))
            .collect::<Result<Vec<u64>, ProcError>>()?;
        if counts.len() != cpus.len() {
            return Err(ProcError::malformed(
                FILE,
                lineno,
                format!("{name}: {} counts for {} CPUs", counts.len(), cpus.len()),
            ));
        }
        vectors.push((name, counts));
    }
    if vectors.is_empty() {
        return Err(ProcError::missing(FILE, "the vector lines"));
    }
    Ok(Softirqs { cpus, vectors })
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

    fn v(rows: &[(&str, &[u64])]) -> Vec<(String, Vec<u64>)> {
        rows.iter()
            .map(|(n, c)| (n.to_string(), c.to_vec()))
            .collect()
    }

    #[test]
    fn good_input() {
        let cases: Vec<(&str, &str, Softirqs)> = vec![
            (
                "linux-6.18 (captured, 2 CPUs)",
                fixture!("linux-6.18/softirqs"),
                Softirqs {
                    cpus: vec![0, 1],
                    vectors: v(&[
                        ("hi", &[0, 0]),
                        ("timer", &[14603, 15604]),
                        ("net_tx", &[4, 0]),
                        ("net_rx", &[6199, 9740]),
                        ("block", &[0, 59672]),
                        ("irq_poll", &[0, 0]),
                        ("tasklet", &[435, 7]),
                        ("sched", &[25704, 21842]),
                        ("hrtimer", &[0, 0]),
                        ("rcu", &[30355, 32083]),
                    ]),
                },
            ),
            (
                "2.6.32: block_iopoll, 4 CPUs",
                fixture!("formats/softirqs-2.6.32"),
                Softirqs {
                    cpus: vec![0, 1, 2, 3],
                    vectors: v(&[
                        ("hi", &[0, 0, 0, 0]),
                        ("timer", &[2342342, 2123455, 2001234, 1987654]),
                        ("net_tx", &[1234, 12, 5, 3]),
                        ("net_rx", &[987654, 12345, 2345, 456]),
                        ("block", &[45678, 0, 0, 0]),
                        ("block_iopoll", &[0, 0, 0, 0]),
                        ("tasklet", &[123, 0, 0, 1]),
                        ("sched", &[876543, 765432, 654321, 543210]),
                        ("hrtimer", &[0, 0, 0, 0]),
                        ("rcu", &[1234567, 1123456, 1012345, 901234]),
                    ]),
                },
            ),
            (
                "sparse possible CPUs",
                "        CPU0 CPU2 CPU10\n  NET_RX: 1 2 4294967295\n",
                Softirqs {
                    cpus: vec![0, 2, 10],
                    vectors: v(&[("net_rx", &[1, 2, 4294967295])]),
                },
            ),
        ];
        for (case, text, want) in &cases {
            assert_eq!(
                &parse_softirqs(text).unwrap_or_else(|e| panic!("{case}: {e}")),
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
                Want::Missing("CPU header line"),
            ),
            (
                "header only",
                "   CPU0  CPU1\n",
                Want::Missing("vector lines"),
            ),
            (
                "short row",
                fixture!("odd/softirqs-short-row"),
                Want::Malformed(5, "net_rx: 1 counts for 2 CPUs"),
            ),
            (
                "long row",
                "CPU0\nHI: 1 2\n",
                Want::Malformed(2, "hi: 2 counts for 1 CPUs"),
            ),
            (
                "bad header",
                "CPU0 GPU1\nHI: 1 2\n",
                Want::Malformed(1, "expected CPU<n>, found \"GPU1\""),
            ),
            (
                "header is a vector line",
                "  \nHI: 0 0\n",
                Want::Malformed(2, "found \"HI:\""),
            ),
            (
                "no colon",
                "CPU0\nHI 1\n",
                Want::Malformed(2, "VECTOR: counts"),
            ),
            (
                "garbage count",
                "CPU0 CPU1\nTIMER: 12 1x\n",
                Want::Malformed(2, "timer: invalid number \"1x\""),
            ),
        ];
        for (case, text, want) in cases {
            assert_err(case, parse_softirqs(text), FILE, *want);
        }
    }

    #[test]
    fn live_proc_softirqs() {
        let text = std::fs::read_to_string("/proc/softirqs").expect("reading /proc/softirqs");
        let s = parse_softirqs(&text).expect("parsing /proc/softirqs");
        // The header lists possible CPUs: a superset of the online ones.
        for cpu in online_cpus() {
            assert!(s.cpus.contains(&cpu), "cpu{cpu} missing from {:?}", s.cpus);
        }
        let names: Vec<&str> = s.vectors.iter().map(|(n, _)| n.as_str()).collect();
        for want in ["hi", "timer", "net_tx", "net_rx", "sched", "rcu"] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        let timer: u64 = s
            .vectors
            .iter()
            .find(|(n, _)| n == "timer")
            .map(|(_, c)| c.iter().sum())
            .unwrap_or(0);
        assert!(timer > 0, "no timer softirqs since boot?");
    }
}
