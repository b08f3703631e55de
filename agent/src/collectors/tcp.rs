//! TCP family: per-peer payload bytes and retransmits, connection lifecycle,
//! connect duration and smoothed RTT.
//!
//! - Hooks (kernel side `agent-ebpf/src/tcp.rs`): `inet_sock_set_state`,
//!   `sock_send_length`, `sock_recv_length`, `tcp_retransmit_skb`, as
//!   `tp_btf` or `raw_tp`; struct offsets from kernel BTF
//!   ([`crate::probes::btf`]).
//! - Metrics (eBPF):
//!   - `perch.tcp.io{network.peer.address, server.port, perch.tcp.role,
//!     network.io.direction}`: payload bytes as returned by the `sendmsg` /
//!     `recvmsg` family of syscalls (`ret > 0`, `MSG_PEEK` excluded). No
//!     headers, no retransmitted bytes; bytes still in a socket buffer when
//!     the socket is torn down are not counted on the receive side.
//!   - `perch.tcp.retransmits{network.peer.address, server.port,
//!     perch.tcp.role}`: retransmitted segments, as `RetransSegs` counts.
//!   - `perch.tcp.connections.opened{perch.tcp.role}`,
//!     `perch.tcp.connections.failed{error.type = refused|timeout|reset}`.
//!   - `perch.tcp.connect.duration` (SYN sent to established) and
//!     `perch.tcp.rtt` (smoothed RTT sampled every 100 ms of activity per
//!     socket), histograms in seconds; `perch.tcp.rtt` per peer with
//!     `probes.tcp.rtt_per_peer`.
//!   - Self: `perch.bpf.map.full{perch.bpf.map}` (failed inserts: the bytes
//!     of a peer that did not fit are in the `network.peer.address="_OTHER"`
//!     series, never lost), `perch.bpf.map.entries{perch.bpf.map}`.
//! - Fallback (procfs): `/proc/net/snmp` `Tcp`, for the agent's network
//!   namespace and host-wide within it: `RetransSegs` ->
//!   `perch.tcp.retransmits{}`, `ActiveOpens`/`PassiveOpens` ->
//!   `perch.tcp.connections.opened{perch.tcp.role}`, `AttemptFails` ->
//!   `perch.tcp.connections.failed{error.type="attempt_failed"}` (refused and
//!   timed-out connects together, plus server handshakes that failed),
//!   `EstabResets` -> `{error.type="reset"}`. No `perch.tcp.io`, no
//!   histograms.
//! - Oldest kernel: 6.3 for eBPF, any for procfs.
//!
//! Peer series are keyed by remote address, the server's port and the role;
//! the client's ephemeral port is never an attribute. IPv4-mapped IPv6
//! peers are reported as IPv4, merged with the IPv4 series.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::SystemTime;

use agent_common::{hist, tcp as c};
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};

use crate::gate::{Family, Source};
use crate::model::{Attributes, Data, HistogramPoint, Metric, Number, NumberPoint, StartTimes};
use crate::probes::Probes;
use crate::procfs::{snmp, ProcError, ProcRoot};

use super::{online_cpus, CollectError, Collector};

const IO: &str = "perch.tcp.io";
const RETRANS: &str = "perch.tcp.retransmits";
const OPENED: &str = "perch.tcp.connections.opened";
const FAILED: &str = "perch.tcp.connections.failed";
const CONNECT: &str = "perch.tcp.connect.duration";
const RTT: &str = "perch.tcp.rtt";
const MAP_FULL: &str = "perch.bpf.map.full";
const MAP_ENTRIES: &str = "perch.bpf.map.entries";

const IO_DESC: &str = "TCP payload bytes per peer, server port and role, as returned by \
                       send/recv syscalls (no headers, no retransmissions).";
const RETRANS_DESC: &str = "Retransmitted TCP segments.";
const OPENED_DESC: &str = "TCP connections established, by role.";
const FAILED_DESC: &str = "TCP connections that failed: connects refused or timed out, \
                           established connections reset.";

/// The overflow peer: bytes of peers that did not fit the kernel map.
pub const OVERFLOW_PEER: &str = "_OTHER";

struct Maps {
    peers: PerCpuHashMap<MapData, c::PeerKey, c::PeerValue>,
    counters: PerCpuArray<MapData, u64>,
    connect: PerCpuArray<MapData, u64>,
    rtt: PerCpuArray<MapData, u64>,
    rtt_peers: Option<PerCpuHashMap<MapData, c::RttKey, u64>>,
    max_peers: u32,
}

/// Reads the TCP maps, or `/proc/net/snmp` in procfs mode.
pub struct TcpCollector {
    proc: ProcRoot,
    maps: Option<Maps>,
    starts: StartTimes,
    bounds: Arc<[f64]>,
}

/// A peer as exported: address text, server port, role name.
type Peer = (String, u16, &'static str);

/// The remote address of `key` as text; v4-mapped IPv6 as IPv4.
pub fn peer_address(key: &c::PeerKey) -> String {
    let ip = if key.family == 4 {
        IpAddr::V4(Ipv4Addr::new(
            key.addr[0],
            key.addr[1],
            key.addr[2],
            key.addr[3],
        ))
    } else {
        let v6 = Ipv6Addr::from(key.addr);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    };
    ip.to_string()
}

/// `perch.tcp.role` of a kernel role byte.
pub fn role_name(role: u8) -> &'static str {
    if role == c::ROLE_SERVER {
        "server"
    } else {
        "client"
    }
}

impl TcpCollector {
    pub fn new(
        proc: ProcRoot,
        boot: SystemTime,
        source: Source,
        rtt_per_peer: bool,
        max_peers: u32,
        probes: &mut Probes,
    ) -> Option<Self> {
        let maps = match source {
            Source::Off => return None,
            Source::Procfs => None,
            Source::Ebpf => {
                let peers = PerCpuHashMap::try_from(probes.take_map(c::MAP_PEERS)?).ok()?;
                let counters = PerCpuArray::try_from(probes.take_map(c::MAP_COUNTERS)?).ok()?;
                let connect = PerCpuArray::try_from(probes.take_map(c::MAP_CONNECT_HIST)?).ok()?;
                let rtt = PerCpuArray::try_from(probes.take_map(c::MAP_RTT_HIST)?).ok()?;
                let rtt_peers = if rtt_per_peer {
                    Some(PerCpuHashMap::try_from(probes.take_map(c::MAP_RTT_PEERS)?).ok()?)
                } else {
                    None
                };
                Some(Maps {
                    peers,
                    counters,
                    connect,
                    rtt,
                    rtt_peers,
                    max_peers,
                })
            }
        };
        let start = match &maps {
            Some(_) => probes.attached_at(Family::Tcp)?,
            None => boot,
        };
        Some(Self {
            proc,
            maps,
            starts: StartTimes::new(start),
            bounds: super::sched::runq_bounds(),
        })
    }

    fn sum(
        &mut self,
        name: &'static str,
        attributes: Attributes,
        v: u64,
        now: SystemTime,
    ) -> NumberPoint {
        let start = self.starts.observe(name, &attributes, v as f64, now);
        NumberPoint {
            attributes,
            start_time: Some(start),
            time: now,
            value: Number::Int(v as i64),
        }
    }

    fn hist(
        &mut self,
        name: &'static str,
        attributes: Attributes,
        counts: Vec<u64>,
        sum_ns: u64,
        now: SystemTime,
    ) -> HistogramPoint {
        let count: u64 = counts.iter().sum();
        let start = self.starts.observe(name, &attributes, count as f64, now);
        HistogramPoint {
            attributes,
            start_time: start,
            time: now,
            count,
            sum: sum_ns as f64 / 1e9,
            bounds: self.bounds.clone(),
            bucket_counts: counts,
        }
    }

    fn collect_ebpf(&mut self, now: SystemTime, out: &mut Vec<Metric>) -> Result<(), CollectError> {
        let Some(maps) = &self.maps else {
            return Ok(());
        };
        let cpus = online_cpus();
        let slots = {
            let mut v = vec![0u64; c::COUNTER_SLOTS as usize];
            for (slot, total) in v.iter_mut().enumerate() {
                let values = maps
                    .counters
                    .get(&(slot as u32), 0)
                    .map_err(|e| CollectError::map(c::MAP_COUNTERS, e))?;
                *total = cpus
                    .iter()
                    .map(|c| values.get(*c as usize).copied().unwrap_or(0))
                    .sum();
            }
            v
        };
        let read_hist = |map: &PerCpuArray<MapData, u64>, name: &'static str| {
            let mut counts = vec![0u64; hist::BUCKETS as usize];
            for (b, count) in counts.iter_mut().enumerate() {
                let values = map
                    .get(&(b as u32), 0)
                    .map_err(|e| CollectError::map(name, e))?;
                *count = cpus
                    .iter()
                    .map(|c| values.get(*c as usize).copied().unwrap_or(0))
                    .sum();
            }
            Ok::<_, CollectError>(counts)
        };
        let connect = read_hist(&maps.connect, c::MAP_CONNECT_HIST)?;
        let rtt = read_hist(&maps.rtt, c::MAP_RTT_HIST)?;

        // Peers: summed over CPUs, v4-mapped folded into IPv4.
        let mut peers: BTreeMap<Peer, c::PeerValue> = BTreeMap::new();
        let mut peer_entries = 0u64;
        for item in maps.peers.iter() {
            let (key, values) = item.map_err(|e| CollectError::map(c::MAP_PEERS, e))?;
            peer_entries += 1;
            let e = peers
                .entry((peer_address(&key), key.server_port, role_name(key.role)))
                .or_default();
            for v in values.iter() {
                e.tx_bytes += v.tx_bytes;
                e.rx_bytes += v.rx_bytes;
                e.retrans_segs += v.retrans_segs;
            }
        }
        let mut rtt_peers: BTreeMap<Peer, (Vec<u64>, u64)> = BTreeMap::new();
        let mut rtt_peer_entries = 0u64;
        if let Some(map) = &maps.rtt_peers {
            for item in map.iter() {
                let (key, values) = item.map_err(|e| CollectError::map(c::MAP_RTT_PEERS, e))?;
                rtt_peer_entries += 1;
                let total: u64 = values.iter().sum();
                let e = rtt_peers
                    .entry((
                        peer_address(&key.peer),
                        key.peer.server_port,
                        role_name(key.peer.role),
                    ))
                    .or_insert_with(|| (vec![0; hist::BUCKETS as usize], 0));
                if key.bucket == c::RTT_SUM_BUCKET {
                    e.1 += total;
                } else if let Some(b) = e.0.get_mut(key.bucket as usize) {
                    *b += total;
                }
            }
        }
        let max_peers = maps.max_peers;
        let has_rtt_peers = maps.rtt_peers.is_some();

        let mut io = Vec::with_capacity(peers.len() * 2 + 4);
        let mut retrans = Vec::with_capacity(peers.len() + 2);
        for ((addr, port, role), v) in &peers {
            for (dir, n) in [("transmit", v.tx_bytes), ("receive", v.rx_bytes)] {
                let attrs: Attributes = vec![
                    ("network.peer.address", addr.clone().into()),
                    ("server.port", (*port).into()),
                    ("perch.tcp.role", (*role).into()),
                    ("network.io.direction", dir.into()),
                ];
                io.push(self.sum(IO, attrs, n, now));
            }
            let attrs: Attributes = vec![
                ("network.peer.address", addr.clone().into()),
                ("server.port", (*port).into()),
                ("perch.tcp.role", (*role).into()),
            ];
            retrans.push(self.sum(RETRANS, attrs, v.retrans_segs, now));
        }
        // Overflow series, once anything overflowed.
        if slots[c::SLOT_PEERS_FULL as usize] > 0 {
            for (role, tx, rx, re) in [
                (
                    "client",
                    c::SLOT_OVF_TX_CLIENT,
                    c::SLOT_OVF_RX_CLIENT,
                    c::SLOT_OVF_RETRANS_CLIENT,
                ),
                (
                    "server",
                    c::SLOT_OVF_TX_SERVER,
                    c::SLOT_OVF_RX_SERVER,
                    c::SLOT_OVF_RETRANS_SERVER,
                ),
            ] {
                for (dir, slot) in [("transmit", tx), ("receive", rx)] {
                    let attrs: Attributes = vec![
                        ("network.peer.address", OVERFLOW_PEER.into()),
                        ("perch.tcp.role", role.into()),
                        ("network.io.direction", dir.into()),
                    ];
                    io.push(self.sum(IO, attrs, slots[slot as usize], now));
                }
                let attrs: Attributes = vec![
                    ("network.peer.address", OVERFLOW_PEER.into()),
                    ("perch.tcp.role", role.into()),
                ];
                retrans.push(self.sum(RETRANS, attrs, slots[re as usize], now));
            }
        }
        out.push(Metric {
            name: IO,
            description: IO_DESC,
            unit: "By",
            data: Data::Sum {
                monotonic: true,
                points: io,
            },
        });
        out.push(Metric {
            name: RETRANS,
            description: RETRANS_DESC,
            unit: "{segment}",
            data: Data::Sum {
                monotonic: true,
                points: retrans,
            },
        });

        let mut opened = Vec::new();
        for (role, slot) in [
            ("client", c::SLOT_OPENED_CLIENT),
            ("server", c::SLOT_OPENED_SERVER),
        ] {
            opened.push(self.sum(
                OPENED,
                vec![("perch.tcp.role", role.into())],
                slots[slot as usize],
                now,
            ));
        }
        out.push(Metric {
            name: OPENED,
            description: OPENED_DESC,
            unit: "{connection}",
            data: Data::Sum {
                monotonic: true,
                points: opened,
            },
        });
        let mut failed = Vec::new();
        for (kind, slot) in [
            ("refused", c::SLOT_FAILED_REFUSED),
            ("timeout", c::SLOT_FAILED_TIMEOUT),
            ("reset", c::SLOT_FAILED_RESET),
        ] {
            failed.push(self.sum(
                FAILED,
                vec![("error.type", kind.into())],
                slots[slot as usize],
                now,
            ));
        }
        out.push(Metric {
            name: FAILED,
            description: FAILED_DESC,
            unit: "{connection}",
            data: Data::Sum {
                monotonic: true,
                points: failed,
            },
        });

        let p = self.hist(
            CONNECT,
            Vec::new(),
            connect,
            slots[c::SLOT_CONNECT_SUM_NS as usize],
            now,
        );
        out.push(Metric {
            name: CONNECT,
            description: "Time from a client's SYN to the connection being established.",
            unit: "s",
            data: Data::Histogram { points: vec![p] },
        });
        let mut rtt_points = vec![self.hist(
            RTT,
            Vec::new(),
            rtt,
            slots[c::SLOT_RTT_SUM_NS as usize],
            now,
        )];
        for ((addr, port, role), (counts, sum)) in rtt_peers {
            let attrs: Attributes = vec![
                ("network.peer.address", addr.into()),
                ("server.port", port.into()),
                ("perch.tcp.role", role.into()),
            ];
            rtt_points.push(self.hist(RTT, attrs, counts, sum, now));
        }
        out.push(Metric {
            name: RTT,
            description: "Smoothed TCP round-trip time, sampled at most every 100 ms per socket \
                          while it sends or receives, over the connection's whole life.",
            unit: "s",
            data: Data::Histogram { points: rtt_points },
        });

        let mut full = Vec::new();
        let mut maps_full = vec![
            (c::MAP_PEERS, c::SLOT_PEERS_FULL),
            (c::MAP_SOCKS, c::SLOT_SOCKS_FULL),
        ];
        if has_rtt_peers {
            maps_full.push((c::MAP_RTT_PEERS, c::SLOT_RTT_PEERS_FULL));
        }
        for (map, slot) in maps_full {
            full.push(self.sum(
                MAP_FULL,
                vec![("perch.bpf.map", map.into())],
                slots[slot as usize],
                now,
            ));
        }
        out.push(Metric {
            name: MAP_FULL,
            description: "Inserts into a bounded BPF map that failed because it was full; \
                          what they carried went to an overflow series or is named in the docs.",
            unit: "{insert}",
            data: Data::Sum {
                monotonic: true,
                points: full,
            },
        });
        let mut entries = vec![gauge(c::MAP_PEERS, peer_entries, max_peers, now)];
        if has_rtt_peers {
            entries.push(gauge(c::MAP_RTT_PEERS, rtt_peer_entries, 0, now));
        }
        out.push(Metric {
            name: MAP_ENTRIES,
            description: "Entries in a bounded BPF map.",
            unit: "{entry}",
            data: Data::Gauge { points: entries },
        });
        Ok(())
    }

    fn collect_procfs(
        &mut self,
        now: SystemTime,
        out: &mut Vec<Metric>,
    ) -> Result<(), CollectError> {
        let text = self.proc.read("net/snmp")?;
        let s = snmp::parse_snmp(&text, "net/snmp")?;
        let tcp = s.get("Tcp").ok_or_else(|| ProcError::Missing {
            file: "net/snmp".into(),
            what: "the Tcp lines".into(),
        })?;
        let get = |name: &str| -> Result<u64, CollectError> {
            tcp.get(name).map(|v| (*v).max(0) as u64).ok_or_else(|| {
                CollectError::Proc(ProcError::Missing {
                    file: "net/snmp".into(),
                    what: format!("Tcp {name}"),
                })
            })
        };
        let (rs, ao, po, af, er) = (
            get("RetransSegs")?,
            get("ActiveOpens")?,
            get("PassiveOpens")?,
            get("AttemptFails")?,
            get("EstabResets")?,
        );
        let p = self.sum(RETRANS, Vec::new(), rs, now);
        out.push(Metric {
            name: RETRANS,
            description: RETRANS_DESC,
            unit: "{segment}",
            data: Data::Sum {
                monotonic: true,
                points: vec![p],
            },
        });
        let opened = vec![
            self.sum(OPENED, vec![("perch.tcp.role", "client".into())], ao, now),
            self.sum(OPENED, vec![("perch.tcp.role", "server".into())], po, now),
        ];
        out.push(Metric {
            name: OPENED,
            description: OPENED_DESC,
            unit: "{connection}",
            data: Data::Sum {
                monotonic: true,
                points: opened,
            },
        });
        let failed = vec![
            self.sum(
                FAILED,
                vec![("error.type", "attempt_failed".into())],
                af,
                now,
            ),
            self.sum(FAILED, vec![("error.type", "reset".into())], er, now),
        ];
        out.push(Metric {
            name: FAILED,
            description: FAILED_DESC,
            unit: "{connection}",
            data: Data::Sum {
                monotonic: true,
                points: failed,
            },
        });
        Ok(())
    }
}

fn gauge(map: &'static str, v: u64, capacity: u32, now: SystemTime) -> NumberPoint {
    let mut attributes: Attributes = vec![("perch.bpf.map", map.into())];
    if capacity > 0 {
        attributes.push(("perch.bpf.map.capacity", capacity.into()));
    }
    NumberPoint {
        attributes,
        start_time: None,
        time: now,
        value: Number::Int(v as i64),
    }
}

impl Collector for TcpCollector {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn collect(&mut self, now: SystemTime, out: &mut Vec<Metric>) -> Result<(), CollectError> {
        let r = if self.maps.is_some() {
            self.collect_ebpf(now, out)
        } else {
            self.collect_procfs(now, out)
        };
        self.starts.end_collection(now);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(addr: [u8; 16], family: u8, role: u8) -> c::PeerKey {
        c::PeerKey {
            addr,
            server_port: 443,
            family,
            role,
        }
    }

    #[test]
    fn peer_addresses() {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[10, 231, 7, 2]);
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[192, 0, 2, 1]);
        let v6: [u8; 16] = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        let lo6: [u8; 16] = Ipv6Addr::LOCALHOST.octets();
        let cases = [
            ("ipv4", key(v4, 4, c::ROLE_CLIENT), "10.231.7.2"),
            (
                "v4-mapped folds to ipv4",
                key(mapped, 6, c::ROLE_CLIENT),
                "192.0.2.1",
            ),
            ("ipv6", key(v6, 6, c::ROLE_SERVER), "2001:db8::1"),
            ("ipv6 loopback", key(lo6, 6, c::ROLE_SERVER), "::1"),
        ];
        for (case, k, want) in cases {
            assert_eq!(peer_address(&k), want, "{case}");
        }
        assert_eq!(role_name(c::ROLE_CLIENT), "client");
        assert_eq!(role_name(c::ROLE_SERVER), "server");
    }

    fn procfs_collector(dir: &std::path::Path) -> TcpCollector {
        TcpCollector {
            proc: ProcRoot::new(dir),
            maps: None,
            starts: StartTimes::new(SystemTime::UNIX_EPOCH),
            bounds: super::super::sched::runq_bounds(),
        }
    }

    fn value(m: &[Metric], name: &str, attr: Option<(&str, &str)>) -> i64 {
        let Some(Metric {
            data: Data::Sum { points, .. },
            ..
        }) = m.iter().find(|x| x.name == name)
        else {
            panic!("{name} missing");
        };
        let p = points
            .iter()
            .find(|p| match attr {
                None => p.attributes.is_empty(),
                Some((k, v)) => p
                    .attributes
                    .iter()
                    .any(|(ak, av)| *ak == k && av.to_string() == v),
            })
            .unwrap_or_else(|| panic!("{name} {attr:?} missing"));
        match p.value {
            Number::Int(i) => i,
            Number::Double(d) => d as i64,
        }
    }

    #[test]
    fn procfs_maps_snmp_counters() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net")).unwrap();
        std::fs::write(
            dir.path().join("net/snmp"),
            "Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors\n\
             Tcp: 1 200 120000 -1 53 21 7 3 4 1000 900 17 0 12 0\n",
        )
        .unwrap();
        let mut col = procfs_collector(dir.path());
        let mut out = Vec::new();
        col.collect(SystemTime::UNIX_EPOCH, &mut out).unwrap();
        let cases = [
            (RETRANS, None, 17),
            (OPENED, Some(("perch.tcp.role", "client")), 53),
            (OPENED, Some(("perch.tcp.role", "server")), 21),
            (FAILED, Some(("error.type", "attempt_failed")), 7),
            (FAILED, Some(("error.type", "reset")), 3),
        ];
        for (name, attr, want) in cases {
            assert_eq!(value(&out, name, attr), want, "{name} {attr:?}");
        }
        assert!(
            out.iter().all(|m| m.name != IO),
            "no perch.tcp.io in procfs mode"
        );
    }

    #[test]
    fn procfs_missing_counter_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net")).unwrap();
        std::fs::write(
            dir.path().join("net/snmp"),
            "Tcp: ActiveOpens PassiveOpens\nTcp: 1 2\n",
        )
        .unwrap();
        let mut col = procfs_collector(dir.path());
        let e = col
            .collect(SystemTime::UNIX_EPOCH, &mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("Tcp RetransSegs"), "{e}");
        let dir2 = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir2.path().join("net")).unwrap();
        std::fs::write(dir2.path().join("net/snmp"), "Udp: InDatagrams\nUdp: 5\n").unwrap();
        let e = procfs_collector(dir2.path())
            .collect(SystemTime::UNIX_EPOCH, &mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("Tcp lines"), "{e}");
    }
}
