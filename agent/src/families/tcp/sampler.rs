//! netlink `sock_diag` per-peer sampler: the tcp family's per-peer source
//! when its tracepoints are missing (procfs mode).
//!
//! - Source: each interval, a `NETLINK_SOCK_DIAG` dump of the agent
//!   namespace's TCP sockets (IPv4 and IPv6) with `INET_DIAG_INFO`
//!   (`struct tcp_info`, [`crate::sources::netlink::SockDiag::tcp_socks`]). Needs
//!   `tcp_diag` (`CONFIG_INET_TCP_DIAG`) and, for the byte counters,
//!   `tcpi_bytes_acked`/`tcpi_bytes_received` (4.1).
//! - Metrics (emitted by [`super::TcpCollector`]):
//!   - `perch.tcp.io{network.peer.address, server.port, perch.tcp.role,
//!     network.io.direction}`: `transmit` from `tcpi_bytes_acked` (payload
//!     the peer acknowledged), `receive` from `tcpi_bytes_received`
//!     (payload received in order), the SYN and FIN sequence numbers taken
//!     out.
//!   - `perch.tcp.rtt`: `tcpi_rtt` (smoothed RTT), one sample per socket
//!     per interval in which the socket moved bytes; per peer with
//!     `probes.tcp.rtt_per_peer`.
//! - Oldest kernel: 4.1 for the byte counters; any kernel with `tcp_diag`
//!   for the RTT.
//!
//! Counters are cumulative per socket, so the sampler remembers each
//! socket's last values (by its cookie) and adds the deltas to per-peer
//! totals. Its limits, named in the docs:
//! - what a socket did between its last sample and its close is lost, and a
//!   connection that opens and closes between two samples is not seen at
//!   all (the eBPF hooks see every byte);
//! - sockets present at start-up count from then, like the eBPF counters;
//! - bytes are counted when acknowledged (transmit) or received in order
//!   (receive), not when the application sends or reads them: data still
//!   unacknowledged or unread at a sample shows up at a later one.
//!
//! Role: a socket whose local port has a listener in the dump is the
//! server's end (`server.port` = local port); any other socket is a client
//! (`server.port` = remote port). Retransmits stay host-level from
//! `/proc/net/snmp` (exact, closed sockets included): `tcpi_total_retrans`
//! would lose the retransmits of every socket that closed between samples.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::SystemTime;

use agent_common::exp;

use crate::sources::netlink::{DiagError, SockDiag, TcpInfo, TcpSock, TABLES};

/// `TCP_LISTEN` (`include/net/tcp_states.h`).
const LISTEN: u8 = 10;
/// States after our FIN was acknowledged (`FIN_WAIT2`, `TIME_WAIT`): one
/// sequence number of `tcpi_bytes_acked` is the FIN.
const OUR_FIN_ACKED: [u8; 2] = [5, 6];
/// States after the peer's FIN arrived (`TIME_WAIT`, `CLOSE_WAIT`,
/// `LAST_ACK`, `CLOSING`): one sequence number of `tcpi_bytes_received` is
/// the FIN.
const THEIR_FIN_RECEIVED: [u8; 4] = [6, 8, 9, 11];

/// [`PeerId::role`] of the connecting side.
pub const CLIENT: u8 = agent_common::tcp::ROLE_CLIENT;
/// [`PeerId::role`] of the accepting side.
pub const SERVER: u8 = agent_common::tcp::ROLE_SERVER;

/// A per-peer series: remote address (v4-mapped IPv6 as IPv4), the
/// server's port, the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId {
    pub addr: IpAddr,
    pub server_port: u16,
    pub role: u8,
    /// The socket's cgroup v2 id with `probes.tcp.per_cgroup`, else 0.
    pub cgroup: u64,
}

/// Cumulative per-peer totals, payload bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// A histogram of ns in [`exp::slot`] slots, with its exact sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hist {
    pub counts: Vec<u64>,
    pub sum_ns: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Self {
            counts: vec![0; exp::SLOTS as usize],
            sum_ns: 0,
        }
    }
}

impl Hist {
    fn record(&mut self, ns: u64) {
        if let Some(c) = self.counts.get_mut(exp::slot(ns) as usize) {
            *c += 1;
        }
        self.sum_ns += ns;
    }
}

/// What the sampler remembers about a live socket.
#[derive(Debug, Clone, Copy)]
struct SockLast {
    peer: PeerId,
    payload: Totals,
}

#[derive(Debug, Clone, Copy)]
struct PeerState {
    totals: Totals,
    last_change: SystemTime,
}

/// The per-peer state of the sampler, fed one dump at a time. Pure: the
/// netlink socket is in [`Sampler`].
#[derive(Debug)]
pub struct PeerSampler {
    max_peers: usize,
    rtt_per_peer: bool,
    /// Key peers by the socket's cgroup too.
    per_cgroup: bool,
    forget_after: std::time::Duration,
    primed: bool,
    socks: HashMap<u64, SockLast>,
    peers: HashMap<PeerId, PeerState>,
    /// Totals of peers that did not fit `max_peers`, by role.
    overflow: [Totals; 2],
    overflowed: bool,
    rtt: Hist,
    rtt_peers: HashMap<PeerId, Hist>,
    forgotten: u64,
}

/// Payload bytes of one socket's `tcp_info`: the SYN and FIN sequence
/// numbers taken out.
pub fn payload(role: u8, state: u8, info: &TcpInfo) -> Totals {
    let syn = u64::from(role == CLIENT);
    let fin_out = u64::from(OUR_FIN_ACKED.contains(&state));
    let fin_in = u64::from(THEIR_FIN_RECEIVED.contains(&state));
    Totals {
        tx_bytes: info.bytes_acked.saturating_sub(syn + fin_out),
        rx_bytes: info.bytes_received.saturating_sub(fin_in),
    }
}

fn unmap(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
        v4 => v4,
    }
}

impl PeerSampler {
    pub fn new(max_peers: u32, rtt_per_peer: bool, forget_after: std::time::Duration) -> Self {
        Self {
            max_peers: max_peers as usize,
            rtt_per_peer,
            per_cgroup: false,
            forget_after,
            primed: false,
            socks: HashMap::new(),
            peers: HashMap::new(),
            overflow: [Totals::default(); 2],
            overflowed: false,
            rtt: Hist::default(),
            rtt_peers: HashMap::new(),
            forgotten: 0,
        }
    }

    /// Keys peers by the socket's cgroup too (`probes.tcp.per_cgroup`).
    pub fn per_cgroup(mut self, on: bool) -> Self {
        self.per_cgroup = on;
        self
    }

    /// Feeds one complete dump (every TCP table) taken at `now`. The first
    /// dump only records where each socket stands: bytes moved before the
    /// sampler started are not counted. Returns the peers forgotten (idle
    /// longer than the forget time, no live socket): their series end.
    pub fn feed(&mut self, socks: &[TcpSock], now: SystemTime) -> Vec<PeerId> {
        let listening: HashSet<u16> = socks
            .iter()
            .filter(|s| s.state == LISTEN)
            .map(|s| s.local_port)
            .collect();
        let mut seen: HashSet<u64> = HashSet::with_capacity(self.socks.len());
        for s in socks {
            let Some(info) = s.info.filter(|_| s.state != LISTEN) else {
                continue;
            };
            seen.insert(s.cookie);
            let (peer, last) = match self.socks.get(&s.cookie) {
                Some(l) => (l.peer, Some(l.payload)),
                None => {
                    let server = listening.contains(&s.local_port);
                    let peer = PeerId {
                        addr: unmap(s.remote),
                        server_port: if server { s.local_port } else { s.remote_port },
                        role: if server { SERVER } else { CLIENT },
                        cgroup: if self.per_cgroup { s.cgroup } else { 0 },
                    };
                    (peer, None)
                }
            };
            let cur = payload(peer.role, s.state, &info);
            // A socket first seen after start-up counts from zero; one that
            // was there at the first dump counts from where it stood.
            let base = match last {
                Some(l) => l,
                None if self.primed => Totals::default(),
                None => cur,
            };
            let d = Totals {
                tx_bytes: cur.tx_bytes.saturating_sub(base.tx_bytes),
                rx_bytes: cur.rx_bytes.saturating_sub(base.rx_bytes),
            };
            self.socks.insert(
                s.cookie,
                SockLast {
                    peer,
                    // Never go back: a FIN taken out after the fact must
                    // not make the next delta count bytes twice.
                    payload: Totals {
                        tx_bytes: cur.tx_bytes.max(base.tx_bytes),
                        rx_bytes: cur.rx_bytes.max(base.rx_bytes),
                    },
                },
            );
            if d == Totals::default() {
                continue;
            }
            self.add(peer, d, now);
            if info.rtt_us > 0 {
                let ns = u64::from(info.rtt_us) * 1000;
                self.rtt.record(ns);
                if self.rtt_per_peer && self.peers.contains_key(&peer) {
                    self.rtt_peers.entry(peer).or_default().record(ns);
                }
            }
        }
        self.socks.retain(|cookie, _| seen.contains(cookie));
        self.primed = true;
        self.forget(now)
    }

    fn add(&mut self, peer: PeerId, d: Totals, now: SystemTime) {
        let full = self.peers.len() >= self.max_peers;
        match self.peers.get_mut(&peer) {
            Some(p) => {
                p.totals.tx_bytes += d.tx_bytes;
                p.totals.rx_bytes += d.rx_bytes;
                p.last_change = now;
            }
            None if !full => {
                self.peers.insert(
                    peer,
                    PeerState {
                        totals: d,
                        last_change: now,
                    },
                );
            }
            None => {
                let o = &mut self.overflow[usize::from(peer.role == SERVER)];
                o.tx_bytes += d.tx_bytes;
                o.rx_bytes += d.rx_bytes;
                self.overflowed = true;
            }
        }
    }

    /// Forgets peers with no live socket whose totals have not changed for
    /// the forget time.
    fn forget(&mut self, now: SystemTime) -> Vec<PeerId> {
        let live: HashSet<PeerId> = self.socks.values().map(|s| s.peer).collect();
        let mut gone = Vec::new();
        self.peers.retain(|id, p| {
            let idle = now.duration_since(p.last_change).unwrap_or_default();
            let keep = live.contains(id) || idle < self.forget_after;
            if !keep {
                gone.push(*id);
            }
            keep
        });
        for id in &gone {
            self.rtt_peers.remove(id);
        }
        self.forgotten += gone.len() as u64;
        gone
    }

    /// Cumulative totals per peer.
    pub fn peers(&self) -> impl Iterator<Item = (PeerId, Totals)> + '_ {
        self.peers.iter().map(|(id, p)| (*id, p.totals))
    }

    /// Overflow totals (client, server), once a peer did not fit.
    pub fn overflow(&self) -> Option<[Totals; 2]> {
        self.overflowed.then_some(self.overflow)
    }

    /// The host-wide RTT histogram.
    pub fn rtt(&self) -> &Hist {
        &self.rtt
    }

    /// Per-peer RTT histograms (with `rtt_per_peer`).
    pub fn rtt_peers(&self) -> impl Iterator<Item = (PeerId, &Hist)> + '_ {
        self.rtt_peers.iter().map(|(id, h)| (*id, h))
    }

    /// Peers forgotten so far.
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// Live sockets tracked.
    pub fn sockets(&self) -> usize {
        self.socks.len()
    }
}

/// The sampler: a `NETLINK_SOCK_DIAG` socket and [`PeerSampler`].
#[derive(Debug)]
pub struct Sampler {
    diag: SockDiag,
    pub state: PeerSampler,
}

impl Sampler {
    /// Opens the netlink socket and takes the first dump (the baseline).
    pub fn start(state: PeerSampler, now: SystemTime) -> Result<Self, DiagError> {
        let mut s = Self {
            diag: SockDiag::open()?,
            state,
        };
        s.sample(now)?;
        Ok(s)
    }

    /// Dumps every TCP socket and feeds the dump; returns the peers
    /// forgotten. A failed dump feeds nothing (sockets are not taken for
    /// closed on a partial view).
    pub fn sample(&mut self, now: SystemTime) -> Result<Vec<PeerId>, DiagError> {
        let mut socks = Vec::new();
        for t in TABLES
            .iter()
            .filter(|t| t.protocol == libc::IPPROTO_TCP as u8)
        {
            socks.extend(self.diag.tcp_socks(*t)?);
        }
        Ok(self.state.feed(&socks, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn sock(cookie: u64, state: u8, local: u16, remote: u16, acked: u64, rcvd: u64) -> TcpSock {
        TcpSock {
            state,
            local_port: local,
            remote_port: remote,
            local: "10.0.0.1".parse().unwrap(),
            remote: "10.0.0.2".parse().unwrap(),
            cookie,
            inode: 1,
            cgroup: 0,
            info: Some(TcpInfo {
                bytes_acked: acked,
                bytes_received: rcvd,
                rtt_us: 250,
                total_retrans: 0,
            }),
        }
    }

    fn listener(port: u16) -> TcpSock {
        TcpSock {
            state: LISTEN,
            local_port: port,
            remote_port: 0,
            remote: "0.0.0.0".parse().unwrap(),
            info: None,
            ..sock(99, LISTEN, port, 0, 0, 0)
        }
    }

    fn peer(role: u8, port: u16) -> PeerId {
        PeerId {
            addr: "10.0.0.2".parse().unwrap(),
            server_port: port,
            role,
            cgroup: 0,
        }
    }

    fn totals(s: &PeerSampler) -> Vec<(PeerId, Totals)> {
        let mut v: Vec<_> = s.peers().collect();
        v.sort_by_key(|(p, _)| *p);
        v
    }

    #[test]
    fn payload_takes_syn_and_fin_out() {
        let info = |a, r| TcpInfo {
            bytes_acked: a,
            bytes_received: r,
            rtt_us: 1,
            total_retrans: 0,
        };
        let cases = [
            ("client established", CLIENT, 1, info(1001, 7), (1000, 7)),
            ("server established", SERVER, 1, info(7, 1000), (7, 1000)),
            ("client syn-sent", CLIENT, 2, info(0, 0), (0, 0)),
            (
                "client fin-wait2: our FIN acked",
                CLIENT,
                5,
                info(1002, 7),
                (1000, 7),
            ),
            (
                "server close-wait: their FIN in",
                SERVER,
                8,
                info(7, 1001),
                (7, 1000),
            ),
            ("server last-ack", SERVER, 9, info(7, 1001), (7, 1000)),
            ("client closing", CLIENT, 11, info(1001, 8), (1000, 7)),
        ];
        for (case, role, state, i, (tx, rx)) in cases {
            assert_eq!(
                payload(role, state, &i),
                Totals {
                    tx_bytes: tx,
                    rx_bytes: rx
                },
                "{case}"
            );
        }
    }

    /// Table: a sequence of dumps and the per-peer totals after each.
    #[test]
    fn deltas_per_socket_add_up_per_peer() {
        type Step = (&'static str, Vec<TcpSock>, Vec<(PeerId, (u64, u64))>);
        let steps: Vec<Step> = vec![
            (
                "baseline: a socket already open counts from here",
                vec![listener(80), sock(1, 1, 40000, 443, 5001, 300)],
                vec![],
            ),
            (
                "it moves 100 bytes; a new client socket to 443 moved 50",
                vec![
                    listener(80),
                    sock(1, 1, 40000, 443, 5101, 300),
                    sock(2, 1, 40001, 443, 51, 0),
                ],
                vec![(peer(CLIENT, 443), (150, 0))],
            ),
            (
                "a server socket on the listening port (peer's port is ephemeral)",
                vec![
                    listener(80),
                    sock(1, 1, 40000, 443, 5101, 300),
                    sock(2, 1, 40001, 443, 51, 0),
                    sock(3, 1, 80, 50000, 0, 20),
                ],
                vec![(peer(CLIENT, 443), (150, 0)), (peer(SERVER, 80), (0, 20))],
            ),
            (
                "socket 2 closed (gone); 1 gets its FIN acked: no byte counted",
                vec![
                    listener(80),
                    sock(1, 5, 40000, 443, 5102, 300),
                    sock(3, 8, 80, 50000, 0, 21),
                ],
                vec![(peer(CLIENT, 443), (150, 0)), (peer(SERVER, 80), (0, 20))],
            ),
            (
                "a new socket reusing cookie 2 counts from zero",
                vec![listener(80), sock(2, 1, 40002, 443, 11, 4)],
                vec![(peer(CLIENT, 443), (160, 4)), (peer(SERVER, 80), (0, 20))],
            ),
        ];
        let mut s = PeerSampler::new(16, true, Duration::from_secs(3600));
        for (i, (case, dump, want)) in steps.into_iter().enumerate() {
            s.feed(&dump, t(i as u64 * 10));
            let mut want: Vec<(PeerId, Totals)> = want
                .into_iter()
                .map(|(p, (tx, rx))| {
                    (
                        p,
                        Totals {
                            tx_bytes: tx,
                            rx_bytes: rx,
                        },
                    )
                })
                .collect();
            want.sort_by_key(|(p, _)| *p);
            assert_eq!(totals(&s), want, "{case}");
        }
        // RTT: one sample per socket per interval with bytes moved:
        // 2 (step 2) + 1 (step 3) + 1 (step 5).
        assert_eq!(s.rtt().counts.iter().sum::<u64>(), 4);
        assert_eq!(s.rtt().sum_ns, 4 * 250_000);
        let per_peer: u64 = s
            .rtt_peers()
            .map(|(_, h)| h.counts.iter().sum::<u64>())
            .sum();
        assert_eq!(per_peer, 4);
        assert_eq!(s.sockets(), 1);
    }

    #[test]
    fn peers_beyond_the_bound_go_to_overflow_and_idle_ones_are_forgotten() {
        let mut s = PeerSampler::new(1, false, Duration::from_secs(60));
        s.feed(&[], t(0));
        let mut other = sock(2, 1, 40001, 8080, 31, 0);
        other.remote = "10.0.0.3".parse().unwrap();
        s.feed(&[sock(1, 1, 40000, 443, 11, 0), other], t(10));
        assert_eq!(
            totals(&s),
            vec![(
                peer(CLIENT, 443),
                Totals {
                    tx_bytes: 10,
                    rx_bytes: 0
                }
            )]
        );
        assert_eq!(
            s.overflow(),
            Some([
                Totals {
                    tx_bytes: 30,
                    rx_bytes: 0
                },
                Totals::default()
            ])
        );
        // Closed, idle 59 s: kept.
        assert!(s.feed(&[], t(69)).is_empty());
        assert_eq!(s.peers().count(), 1);
        // Idle 60 s: forgotten, its series ends.
        assert_eq!(s.feed(&[], t(70)), vec![peer(CLIENT, 443)]);
        assert_eq!(s.peers().count(), 0);
        assert_eq!(s.forgotten(), 1);
        // A peer with a live but idle socket is never forgotten.
        s.feed(&[sock(5, 1, 40005, 443, 2, 0)], t(80));
        assert!(s.feed(&[sock(5, 1, 40005, 443, 2, 0)], t(500)).is_empty());
        assert_eq!(s.peers().count(), 1);
    }

    #[test]
    fn v4_mapped_peers_are_ipv4() {
        let mut s = PeerSampler::new(16, false, Duration::from_secs(60));
        s.feed(&[], t(0));
        let mut x = sock(1, 1, 40000, 443, 3, 0);
        x.remote = "::ffff:10.0.0.2".parse().unwrap();
        s.feed(&[x], t(1));
        assert_eq!(totals(&s)[0].0, peer(CLIENT, 443));
    }
}
