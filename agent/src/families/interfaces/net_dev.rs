//! `/proc/net/dev`: per-interface traffic counters of the reader's network
//! namespace. The procfs fallback for the network I/O family; see
//! [`super::sysfs_net`] for the sysfs equivalent.
//!
//! Two header lines (recognised by their `|`), then one line per interface:
//! the name, a `:`, then 16 counters (8 receive, 8 transmit). 2.6 kernels
//! (2.6.32 of CentOS 6, for one) printed `"%6s:%8lu"`, so a receive byte
//! count of 8 digits or more is glued to the colon (`eth0:4046496815`); 3.10
//! prints `"%6s: %7llu"` (commit 2d13bafeba24). Names longer than 6
//! characters start the line with no blanks (`enp0s31f6: 3096...`). Old
//! kernels accepted `:` inside a name (`eth0:1`; `dev_valid_name` rejects it
//! now), so the name ends at the *last* colon of the line: the counters never
//! contain one.
//!
//! The `drop` column is `rx_dropped + rx_missed_errors`, which sysfs keeps
//! apart; the two sources differ there when a NIC reports missed frames.

use crate::sources::{dec_u64, ProcError};

const FILE: &str = "/proc/net/dev";

/// Counters of one interface, since it was created. 64-bit on 64-bit
/// kernels; 32-bit kernels and old drivers keep `unsigned long` counters,
/// which wrap at 2^32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IfStats {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Receive errors (all kinds).
    pub rx_errors: u64,
    /// Received packets dropped (in `/proc/net/dev`, plus missed errors).
    pub rx_dropped: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Transmit errors (all kinds).
    pub tx_errors: u64,
    /// Packets dropped on transmit.
    pub tx_dropped: u64,
}

/// Number of counters after the name.
const COLUMNS: usize = 16;

/// Column names, for error messages.
const NAMES: [&str; COLUMNS] = [
    "rx bytes",
    "rx packets",
    "rx errs",
    "rx drop",
    "rx fifo",
    "rx frame",
    "rx compressed",
    "rx multicast",
    "tx bytes",
    "tx packets",
    "tx errs",
    "tx drop",
    "tx fifo",
    "tx colls",
    "tx carrier",
    "tx compressed",
];

/// Parse the text of `/proc/net/dev` into `(interface, counters)` in file
/// order. At least one header line is required; a line with fewer than 16
/// counters (a truncated read) is malformed, extra trailing columns are
/// ignored.
pub fn parse_net_dev(text: &str) -> Result<Vec<(String, IfStats)>, ProcError> {
    let mut saw_header = false;
    let mut out = Vec::new();
    for (idx, line) in text.lines().enumerate() {
        let lineno = idx + 1;
        if line.trim().is_empty() {
            continue;
        }
        if line.contains('|') {
            saw_header = true;
            continue;
        }
        let Some((name, counters)) = line.rsplit_once(':') else {
            return Err(ProcError::malformed(
                FILE,
                lineno,
                "expected \"name: counters\"",
            ));
        };
        let name = name.trim();
        if name.is_empty() {
            return Err(ProcError::malformed(FILE, lineno, "empty interface name"));
        }
        let mut v = [0u64; COLUMNS];
        let mut n = 0;
        for (slot, (tok, what)) in v
            .iter_mut()
            .zip(counters.split_ascii_whitespace().zip(NAMES))
        {
            *slot = dec_u64(tok, FILE, lineno, &format!("{name}: {what}"))?;
            n += 1;
        }
        if n < COLUMNS {
            return Err(ProcError::malformed(
                FILE,
                lineno,
                format!("{name}: {n} counters, expected {COLUMNS}"),
            ));
        }
        out.push((
            name.to_owned(),
            IfStats {
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errors: v[2],
                rx_dropped: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errors: v[10],
                tx_dropped: v[11],
            },
        ));
    }
    if !saw_header {
        return Err(ProcError::missing(FILE, "the header lines"));
    }
    Ok(out)
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

    /// `IfStats` from (rx bytes, packets, errs, drop, tx bytes, packets, errs, drop).
    fn st(v: [u64; 8]) -> IfStats {
        let [rx_bytes, rx_packets, rx_errors, rx_dropped, tx_bytes, tx_packets, tx_errors, tx_dropped] =
            v;
        IfStats {
            rx_bytes,
            rx_packets,
            rx_errors,
            rx_dropped,
            tx_bytes,
            tx_packets,
            tx_errors,
            tx_dropped,
        }
    }

    fn rows(r: &[(&str, [u64; 8])]) -> Vec<(String, IfStats)> {
        r.iter().map(|(n, v)| (n.to_string(), st(*v))).collect()
    }

    /// (case, file text, expected rows)
    type Case = (&'static str, String, Vec<(String, IfStats)>);

    #[test]
    fn good_input() {
        let hdr = "Inter-|   Receive |  Transmit\n face |bytes packets|bytes packets\n";
        let cases: Vec<Case> = vec![
            (
                "linux-6.18 (captured)",
                fixture!("linux-6.18/net_dev").to_owned(),
                rows(&[
                    ("lo", [9127, 127, 0, 0, 9127, 127, 0, 0]),
                    ("ifb0", [0; 8]),
                    ("ifb1", [0; 8]),
                    ("eth0", [456919637, 13934, 0, 0, 754200, 8097, 0, 0]),
                ]),
            ),
            (
                "2.6.32: glued eth0:4046496815, a name with a colon",
                fixture!("formats/net_dev-2.6.32").to_owned(),
                rows(&[
                    ("lo", [9477513, 53050, 0, 0, 9477513, 53050, 0, 0]),
                    (
                        "eth0",
                        [4046496815, 27661328, 3, 17, 61800195044, 32419766, 1, 5],
                    ),
                    ("eth1", [0; 8]),
                    ("eth0:1", [12345678, 4321, 0, 0, 87654321, 1234, 0, 0]),
                ]),
            ),
            (
                "names longer than 6 characters",
                fixture!("odd/net_dev-long-names").to_owned(),
                rows(&[
                    (
                        "enp0s31f6",
                        [
                            30961759505,
                            35569059,
                            0,
                            694524,
                            20341346741,
                            29169231,
                            0,
                            0,
                        ],
                    ),
                    ("lo", [8883814369, 4766739, 0, 0, 8883814369, 4766739, 0, 0]),
                    ("virbr0-nic", [0; 8]),
                ]),
            ),
            ("header only", hdr.to_owned(), vec![]),
            (
                "column positions",
                format!("{hdr}  x0: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17\n"),
                rows(&[("x0", [1, 2, 3, 4, 9, 10, 11, 12])]),
            ),
        ];
        for (case, text, want) in &cases {
            assert_eq!(
                &parse_net_dev(text).unwrap_or_else(|e| panic!("{case}: {e}")),
                want,
                "{case}"
            );
        }
    }

    #[test]
    fn bad_input() {
        let hdr = "Inter-|   Receive |  Transmit\n face |bytes packets|bytes packets\n";
        let truncated =
            &fixture!("linux-6.18/net_dev")[..fixture!("linux-6.18/net_dev").len() - 30];
        let cases: Vec<(&str, String, Want)> = vec![
            (
                "empty file",
                fixture!("odd/empty").to_owned(),
                Want::Missing("header lines"),
            ),
            (
                "no header",
                "  lo: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n".to_owned(),
                Want::Missing("header lines"),
            ),
            (
                "truncated last line",
                truncated.to_owned(),
                Want::Malformed(6, "eth0: 12 counters, expected 16"),
            ),
            (
                "garbage",
                fixture!("odd/net_dev-garbage").to_owned(),
                Want::Malformed(6, "eth0: rx bytes: invalid number \"4569I9637\""),
            ),
            (
                "no colon",
                format!("{hdr}  lo 1 2 3\n"),
                Want::Malformed(3, "name: counters"),
            ),
            (
                "no name",
                format!("{hdr}  : 1 2 3\n"),
                Want::Malformed(3, "empty interface name"),
            ),
        ];
        for (case, text, want) in &cases {
            assert_err(case, parse_net_dev(text), FILE, *want);
        }
    }

    #[test]
    fn live_proc_net_dev() {
        let text = std::fs::read_to_string("/proc/net/dev").expect("reading /proc/net/dev");
        let ifs = parse_net_dev(&text).expect("parsing /proc/net/dev");
        // Every network namespace has a loopback device.
        assert!(ifs.iter().any(|(n, _)| n == "lo"), "{ifs:?}");
        for (name, st) in &ifs {
            assert!(
                st.rx_packets <= st.rx_bytes && st.tx_packets <= st.tx_bytes,
                "{name}: {st:?}"
            );
        }
    }
}
