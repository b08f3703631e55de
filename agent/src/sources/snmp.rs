//! `/proc/net/snmp` and `/proc/net/netstat`: protocol counters (RFC 1213
//! MIB-II and Linux extensions), as pairs of lines:
//!
//! ```text
//! Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens ...
//! Tcp: 1 200 120000 -1 53 ...
//! ```
//!
//! Names come from the file itself, so counters added by newer kernels
//! (`Ip OutTransmits`, `Tcp InCsumErrors`, ...) appear without code changes,
//! and missing ones are simply absent. Values are signed: `Tcp MaxConn` is
//! -1 ("no limit", RFC 2012). `/proc/net/snmp6` has another format and is
//! not handled here.

use std::collections::BTreeMap;

use super::ProcError;

/// Counters by protocol then name: `snmp["Tcp"]["RetransSegs"]`,
/// `netstat["TcpExt"]["TCPTimeouts"]`.
pub type Snmp = BTreeMap<String, BTreeMap<String, i64>>;

/// Parse `/proc/net/snmp` or `/proc/net/netstat` text; `file` names it in
/// errors.
///
/// Malformed: a line without `Proto:`, a values line whose prefix differs
/// from its header's, a count mismatch between the two, a value that is not
/// a decimal `i64`, or a protocol seen twice. Missing: no line pair at all,
/// or a header with no values line after it (a truncated read).
pub fn parse_snmp(text: &str, file: &str) -> Result<Snmp, ProcError> {
    let mut out = Snmp::new();
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty());
    while let Some((hdr_no, hdr)) = lines.next() {
        let (proto, names) = split_proto(hdr, file, hdr_no)?;
        let Some((val_no, vals)) = lines.next() else {
            return Err(ProcError::missing(
                file,
                format!("the values line for {proto}"),
            ));
        };
        let (vproto, values) = split_proto(vals, file, val_no)?;
        if vproto != proto {
            return Err(ProcError::malformed(
                file,
                val_no,
                format!("values line is for {vproto}, expected {proto} (header at line {hdr_no})"),
            ));
        }
        let names: Vec<&str> = names.split_ascii_whitespace().collect();
        let values: Vec<&str> = values.split_ascii_whitespace().collect();
        if names.len() != values.len() {
            return Err(ProcError::malformed(
                file,
                val_no,
                format!("{proto}: {} values for {} names", values.len(), names.len()),
            ));
        }
        let mut counters = BTreeMap::new();
        for (name, value) in names.into_iter().zip(values) {
            let v = parse_i64(value).ok_or_else(|| {
                ProcError::malformed(
                    file,
                    val_no,
                    format!("{proto} {name}: invalid number {value:?}"),
                )
            })?;
            counters.insert(name.to_owned(), v);
        }
        if out.insert(proto.to_owned(), counters).is_some() {
            return Err(ProcError::malformed(
                file,
                hdr_no,
                format!("{proto} appears twice"),
            ));
        }
    }
    if out.is_empty() {
        return Err(ProcError::missing(
            file,
            "any \"Proto: names\" / \"Proto: values\" line pair",
        ));
    }
    Ok(out)
}

/// Split `"Tcp: a b c"` into `("Tcp", " a b c")`.
fn split_proto<'a>(
    line: &'a str,
    file: &str,
    lineno: usize,
) -> Result<(&'a str, &'a str), ProcError> {
    match line.split_once(':') {
        Some((proto, rest)) if !proto.trim().is_empty() && !proto.contains(char::is_whitespace) => {
            Ok((proto, rest))
        }
        _ => Err(ProcError::malformed(
            file,
            lineno,
            "expected \"Proto: ...\"",
        )),
    }
}

/// A decimal `i64`, optionally negative (no `+`, which the kernel never prints).
fn parse_i64(tok: &str) -> Option<i64> {
    if tok.starts_with('+') {
        return None;
    }
    tok.parse().ok()
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

    /// (proto, name, value) triples that must be present.
    type Spot = (&'static str, &'static str, i64);

    /// (case, file text, counters per protocol, spot checks)
    type Case = (
        &'static str,
        &'static str,
        &'static [(&'static str, usize)],
        &'static [Spot],
    );

    #[test]
    fn good_input() {
        let cases: &[Case] = &[
            (
                "linux-6.18 snmp (captured)",
                fixture!("linux-6.18/net_snmp"),
                &[
                    ("Ip", 20),
                    ("Icmp", 29),
                    ("IcmpMsg", 1),
                    ("Tcp", 15),
                    ("Udp", 9),
                    ("UdpLite", 9),
                ],
                &[
                    ("Ip", "Forwarding", 2),
                    ("Ip", "DefaultTTL", 64),
                    ("Ip", "InReceives", 14023),
                    ("Ip", "OutTransmits", 8178),
                    ("Icmp", "InDestUnreachs", 1),
                    ("IcmpMsg", "InType3", 1),
                    ("Tcp", "MaxConn", -1),
                    ("Tcp", "RtoMax", 120000),
                    ("Tcp", "ActiveOpens", 80),
                    ("Tcp", "RetransSegs", 0),
                    ("Tcp", "InSegs", 13923),
                    ("Tcp", "InCsumErrors", 0),
                    ("Udp", "InDatagrams", 126),
                    ("Udp", "MemErrors", 0),
                ],
            ),
            (
                "linux-6.18 netstat (captured)",
                fixture!("linux-6.18/net_netstat"),
                &[("TcpExt", 135), ("IpExt", 18), ("MPTcpExt", 76)],
                &[
                    ("TcpExt", "TW", 21),
                    ("TcpExt", "TCPTimeouts", 2),
                    ("TcpExt", "TCPHPHits", 148),
                    ("TcpExt", "TCPOrigDataSent", 1550),
                    ("TcpExt", "TCPAODroppedIcmps", 0),
                    ("IpExt", "InOctets", 456731099),
                    ("IpExt", "InNoECTPkts", 14023),
                ],
            ),
            (
                "2.6.32 snmp: older counter sets",
                fixture!("formats/net_snmp-2.6.32"),
                &[
                    ("Ip", 19),
                    ("Icmp", 26),
                    ("IcmpMsg", 6),
                    ("Tcp", 14),
                    ("Udp", 6),
                    ("UdpLite", 6),
                ],
                &[
                    ("Ip", "Forwarding", 1),
                    ("Ip", "FragCreates", 0),
                    ("Ip", "OutNoRoutes", 8),
                    ("Tcp", "MaxConn", -1),
                    ("Tcp", "RetransSegs", 3456),
                    ("Tcp", "OutRsts", 8901),
                    ("Udp", "NoPorts", 789),
                    ("IcmpMsg", "OutType3", 1025),
                ],
            ),
        ];
        for (case, text, sizes, spots) in cases {
            let got = parse_snmp(text, "f").unwrap_or_else(|e| panic!("{case}: {e}"));
            let got_sizes: Vec<(&str, usize)> =
                got.iter().map(|(p, m)| (p.as_str(), m.len())).collect();
            let mut want_sizes = sizes.to_vec();
            want_sizes.sort();
            assert_eq!(got_sizes, want_sizes, "{case}");
            for (proto, name, value) in *spots {
                assert_eq!(
                    got.get(*proto).and_then(|m| m.get(*name)),
                    Some(value),
                    "{case}: {proto} {name}"
                );
            }
        }
        // Counters a newer kernel added are absent on an older one.
        let old = parse_snmp(fixture!("formats/net_snmp-2.6.32"), "f").unwrap();
        assert_eq!(old["Tcp"].get("InCsumErrors"), None);
        assert_eq!(old["Ip"].get("OutTransmits"), None);
    }

    #[test]
    fn bad_input() {
        let cases: &[(&str, &str, Want)] = &[
            (
                "empty file",
                fixture!("odd/empty"),
                Want::Missing("line pair"),
            ),
            (
                "count mismatch",
                fixture!("odd/snmp-count-mismatch"),
                Want::Malformed(4, "Tcp: 3 values for 4 names"),
            ),
            (
                "prefix mismatch",
                fixture!("odd/snmp-prefix-mismatch"),
                Want::Malformed(2, "values line is for Icmp, expected Ip (header at line 1)"),
            ),
            (
                "truncated after a header",
                fixture!("odd/snmp-truncated"),
                Want::Missing("values line for Tcp"),
            ),
            (
                "garbage value",
                fixture!("odd/snmp-garbage"),
                Want::Malformed(2, "Udp NoPorts: invalid number \"1O\""),
            ),
            (
                "no colon",
                "Ip Forwarding\nIp 1\n",
                Want::Malformed(1, "expected \"Proto: ...\""),
            ),
            (
                "duplicate proto",
                "Ip: A\nIp: 1\nTcp: B\nTcp: 2\nIp: C\nIp: 3\n",
                Want::Malformed(5, "Ip appears twice"),
            ),
            (
                "overflow",
                "Ip: A\nIp: 9223372036854775808\n",
                Want::Malformed(2, "Ip A: invalid number"),
            ),
        ];
        for (case, text, want) in cases {
            assert_err(
                case,
                parse_snmp(text, "/proc/net/snmp"),
                "/proc/net/snmp",
                *want,
            );
        }
    }

    #[test]
    fn live_proc_net_snmp_and_netstat() {
        let text = std::fs::read_to_string("/proc/net/snmp").expect("reading /proc/net/snmp");
        let snmp = parse_snmp(&text, "/proc/net/snmp").expect("parsing /proc/net/snmp");
        assert_eq!(snmp["Tcp"]["MaxConn"], -1);
        assert_eq!(snmp["Tcp"]["RtoAlgorithm"], 1);
        assert!(snmp["Ip"]["DefaultTTL"] > 0);
        for proto in ["Ip", "Icmp", "Tcp", "Udp"] {
            assert!(snmp.contains_key(proto), "{proto} missing");
        }
        let text = std::fs::read_to_string("/proc/net/netstat").expect("reading /proc/net/netstat");
        let netstat = parse_snmp(&text, "/proc/net/netstat").expect("parsing /proc/net/netstat");
        assert!(netstat["TcpExt"].contains_key("TCPTimeouts"));
        assert!(netstat["IpExt"].contains_key("InOctets"));
    }
}
