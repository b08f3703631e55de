//! The `connections` collector.
//!
//! - Sources, by mode:
//!   - `auto`: netlink `sock_diag` dumps ([`crate::sources::netlink`], 3.3+; UDP
//!     needs `udp_diag`). A table whose dump fails (no `udp_diag`: `ENOENT`;
//!     netlink refused by a seccomp profile) is read from `/proc/net/<table>`
//!     instead, with one warning naming the table and the reason.
//!   - `procfs`: `/proc/net/{tcp,tcp6,udp,udp6}` only.
//!   - `ebpf` is refused by the gate: the family has no eBPF source.
//!
//!   sock_diag is preferred because it is binary and skips formatting every
//!   socket as text: on a host with 100k sockets `/proc/net/tcp` costs tens
//!   of milliseconds of CPU per read.
//! - Oldest kernel: any (`/proc/net/tcp` since 2.2; sock_diag for UDP 3.3).
//!
//! States are the OpenTelemetry lower-case TCP names
//! ([`tcp_state_name`]); request sockets (`TCP_NEW_SYN_RECV`) count as
//! `syn_recv` and bound-but-inactive sockets (`TCP_BOUND_INACTIVE`, which
//! only sock_diag lists) are not connections and are skipped. UDP has no
//! connection states: an unconnected socket (the kernel's `TCP_CLOSE`) is
//! `none`, a `connect()`ed one (`TCP_ESTABLISHED`) is `established`. Every
//! TCP state and both UDP states are reported, zero included, so a state
//! that empties reads 0 rather than going stale.

use std::collections::BTreeMap;
use std::time::SystemTime;

use tracing::{info, warn};

use crate::collectors::{CollectError, Collector};
use crate::gate::Mode;
use crate::model::{Metric, Number, NumberPoint};
use crate::sources::netlink::{SockDiag, Table, TABLES};
use crate::sources::{ProcError, Root};

use super::net_sockets::{parse_net_sockets, tcp_state_name, TCP_CLOSE, TCP_ESTABLISHED};

const METRIC: &str = crate::catalogue::CONNECTIONS;

/// The TCP states always reported.
const TCP_STATES: [&str; 11] = [
    "established",
    "syn_sent",
    "syn_recv",
    "fin_wait_1",
    "fin_wait_2",
    "time_wait",
    "close",
    "close_wait",
    "last_ack",
    "listen",
    "closing",
];

/// The UDP states always reported.
const UDP_STATES: [&str; 2] = ["none", "established"];

/// The `network.connection.state` of a socket of `transport` in kernel
/// state `state`; `None` for sockets that are not reported.
pub fn state_name(transport: &str, state: u8) -> Option<&'static str> {
    if transport == "udp" {
        return match state {
            TCP_CLOSE => Some("none"),
            TCP_ESTABLISHED => Some("established"),
            _ => None,
        };
    }
    tcp_state_name(state)
}

fn transport(table: Table) -> &'static str {
    if table.protocol == libc::IPPROTO_UDP as u8 {
        "udp"
    } else {
        "tcp"
    }
}

/// Counts by (transport, state), every reported state present.
pub type Counts = BTreeMap<(&'static str, &'static str), u64>;

fn empty_counts() -> Counts {
    let mut c = Counts::new();
    for s in TCP_STATES {
        c.insert(("tcp", s), 0);
    }
    for s in UDP_STATES {
        c.insert(("udp", s), 0);
    }
    c
}

/// Adds the sockets of one table, given their kernel states.
pub fn count_states(counts: &mut Counts, table: Table, states: impl IntoIterator<Item = u8>) {
    let t = transport(table);
    for st in states {
        if let Some(name) = state_name(t, st) {
            *counts.entry((t, name)).or_insert(0) += 1;
        }
    }
}

pub struct ConnectionsCollector {
    proc: Root,
    /// `None` in procfs mode, or once the socket could not be opened.
    diag: Option<SockDiag>,
    use_netlink: bool,
    /// Tables whose dump failed once: read from procfs from then on.
    procfs_tables: Vec<&'static str>,
}

impl ConnectionsCollector {
    pub fn new(proc: Root, requested: Mode) -> Self {
        let use_netlink = requested != Mode::Procfs;
        let diag = if use_netlink {
            match SockDiag::open() {
                Ok(d) => {
                    info!(
                        source = "sock_diag",
                        "connections: counting sockets over netlink"
                    );
                    Some(d)
                }
                Err(e) => {
                    warn!(error = %e, fallback = "/proc/net/{tcp,tcp6,udp,udp6}", "connections: netlink unavailable; reading procfs");
                    None
                }
            }
        } else {
            info!(
                source = "procfs",
                "connections: counting sockets from /proc/net"
            );
            None
        };
        Self {
            proc,
            diag,
            use_netlink,
            procfs_tables: Vec::new(),
        }
    }

    /// Whether `table` is read over netlink (for tests and logs).
    pub fn netlink_for(&self, table: &str) -> bool {
        self.use_netlink && self.diag.is_some() && !self.procfs_tables.contains(&table)
    }

    fn read_procfs(&self, table: Table) -> Result<Vec<u8>, ProcError> {
        let rel = format!("net/{}", table.name);
        let text = match self.proc.read(&rel) {
            Ok(t) => t,
            // No IPv6 in this kernel: the tables do not exist, and there are
            // no such sockets.
            Err(ProcError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && table.name.ends_with('6') =>
            {
                return Ok(Vec::new())
            }
            Err(e) => return Err(e),
        };
        let file = self.proc.path(&rel).display().to_string();
        Ok(parse_net_sockets(&text, &file)?
            .into_iter()
            .map(|s| s.state)
            .collect())
    }

    /// Counts every table.
    pub fn counts(&mut self) -> Result<Counts, ProcError> {
        let mut counts = empty_counts();
        for table in TABLES {
            let states = if self.netlink_for(table.name) {
                let diag = self.diag.as_mut().expect("netlink_for checked it");
                match diag.states(table) {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(table = table.name, error = %e, fallback = %self.proc.path(&format!("net/{}", table.name)).display(), "connections: sock_diag dump failed; reading procfs for this table from now on");
                        self.procfs_tables.push(table.name);
                        self.read_procfs(table)?
                    }
                }
            } else {
                self.read_procfs(table)?
            };
            count_states(&mut counts, table, states);
        }
        Ok(counts)
    }
}

impl Collector for ConnectionsCollector {
    fn name(&self) -> &'static str {
        "connections"
    }

    fn collect(&mut self, now: SystemTime, out: &mut Vec<Metric>) -> Result<(), CollectError> {
        let counts = self.counts()?;
        let points = counts
            .into_iter()
            .map(|((transport, state), n)| NumberPoint {
                attributes: vec![
                    ("network.transport", transport.into()),
                    ("network.connection.state", state.into()),
                ],
                start_time: None,
                time: now,
                value: Number::Int(i64::try_from(n).unwrap_or(i64::MAX)),
            })
            .collect();
        out.push(Metric::gauge(
            METRIC,
            "Sockets by transport and state (TCP and UDP, IPv4 and IPv6), \
                          in the agent's network namespace.",
            "{connection}",
            points,
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn state_names() {
        let cases: &[(&str, u8, Option<&str>)] = &[
            ("tcp", 1, Some("established")),
            ("tcp", 10, Some("listen")),
            ("tcp", 12, Some("syn_recv")),
            ("tcp", 6, Some("time_wait")),
            ("tcp", 7, Some("close")),
            ("tcp", 13, None),
            ("tcp", 0, None),
            ("udp", 7, Some("none")),
            ("udp", 1, Some("established")),
            ("udp", 10, None),
        ];
        for &(t, s, want) in cases {
            assert_eq!(state_name(t, s), want, "{t} {s}");
        }
    }

    #[test]
    fn counts_every_state_zero_included() {
        let mut c = empty_counts();
        count_states(&mut c, TABLES[0], [10, 1, 1, 12, 13]);
        count_states(&mut c, TABLES[1], [10]);
        count_states(&mut c, TABLES[2], [7, 7, 1]);
        assert_eq!(c.len(), 13);
        assert_eq!(c[&("tcp", "listen")], 2);
        assert_eq!(c[&("tcp", "established")], 2);
        assert_eq!(c[&("tcp", "syn_recv")], 1);
        assert_eq!(c[&("tcp", "closing")], 0);
        assert_eq!(c[&("udp", "none")], 2);
        assert_eq!(c[&("udp", "established")], 1);
        assert_eq!(c.values().sum::<u64>(), 8, "TCP_BOUND_INACTIVE skipped");
    }

    /// procfs mode on the captured 6.18 tables; a missing tcp6/udp6 (no
    /// IPv6) reads as no sockets, a missing tcp is an error.
    #[test]
    fn procfs_tables() {
        let tmp = tempfile::tempdir().unwrap();
        let net = tmp.path().join("net");
        fs::create_dir_all(&net).unwrap();
        let fixtures = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/procfs/linux-6.18"
        );
        for t in ["tcp", "udp"] {
            fs::copy(format!("{fixtures}/{t}"), net.join(t)).unwrap();
        }
        let mut c = ConnectionsCollector::new(Root::new(tmp.path()), Mode::Procfs);
        assert!(!c.netlink_for("tcp"));
        let got = c.counts().unwrap();
        // Compare with a count straight from the fixture text.
        let tcp = fs::read_to_string(format!("{fixtures}/tcp")).unwrap();
        let rows: Vec<&str> = tcp
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .collect();
        let listen = rows
            .iter()
            .filter(|l| l.split_whitespace().nth(3) == Some("0A"))
            .count() as u64;
        assert_eq!(got[&("tcp", "listen")], listen);
        let tcp_total: u64 = got
            .iter()
            .filter(|((t, _), _)| *t == "tcp")
            .map(|(_, n)| n)
            .sum();
        assert_eq!(tcp_total, rows.len() as u64);
        let udp = fs::read_to_string(format!("{fixtures}/udp")).unwrap();
        let udp_rows = udp.lines().skip(1).filter(|l| !l.trim().is_empty()).count() as u64;
        let udp_total: u64 = got
            .iter()
            .filter(|((t, _), _)| *t == "udp")
            .map(|(_, n)| n)
            .sum();
        assert_eq!(udp_total, udp_rows);

        fs::remove_file(net.join("tcp")).unwrap();
        assert!(matches!(c.counts(), Err(ProcError::Io { .. })));
    }

    /// Both sources agree on this process's namespace, for a listener and a
    /// connected UDP socket the test holds (other sockets of the host may
    /// come and go between reads, so only lower bounds are compared there).
    /// In `auto` mode a table is read over netlink exactly when the kernel
    /// dumps it: on a kernel without `udp_diag` the UDP tables fall back to
    /// `/proc/net/udp{,6}`, and the UDP socket is still counted.
    #[test]
    fn live_netlink_and_procfs_see_our_sockets() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        u.connect(l.local_addr().unwrap()).unwrap();
        let mut nl = ConnectionsCollector::new(Root::proc(), Mode::Auto);
        let mut pf = ConnectionsCollector::new(Root::proc(), Mode::Procfs);
        assert!(nl.netlink_for("tcp"));
        let a = nl.counts().unwrap();
        let b = pf.counts().unwrap();
        for c in [&a, &b] {
            assert!(c[&("tcp", "listen")] >= 1, "{c:?}");
            assert!(c[&("udp", "established")] >= 1, "{c:?}");
        }
        let mut diag = SockDiag::open().expect("sock_diag socket");
        for t in TABLES {
            let dump = diag.states(t);
            assert_eq!(
                nl.netlink_for(t.name),
                dump.is_ok(),
                "{}: auto mode reads netlink iff the kernel dumps the table ({:?})",
                t.name,
                dump.err()
            );
        }
        drop((l, u));
    }
}
