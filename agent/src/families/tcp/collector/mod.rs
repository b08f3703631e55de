//! The `tcp` collector: one struct, two sources. Its eBPF half
//! ([`ebpf`]: kernel maps and the socket walk) and its procfs half
//! ([`procfs`]: `/proc/net/snmp` and the sock_diag sampler) share the
//! series bookkeeping below.

mod ebpf;
mod procfs;

use std::collections::{BTreeMap, HashMap, HashSet};

use std::time::{Duration, SystemTime};

use agent_common::{exp, tcp as c};
use aya::maps::{MapData, MapError, PerCpuArray, PerCpuHashMap};
use aya::sys::SyscallError;

use crate::collectors::{online_cpus, read_summed, CollectError, Collector};
use crate::families::{BuildCtx, BuildError};
use crate::gate::Source;
use crate::model::{
    Attributes, Buckets, Data, Exponential, HistogramPoint, Metric, Number, NumberPoint, StartTimes,
};
use crate::sources::{snmp, ProcError, Root};

use super::cgroups::{label_attributes, label_of, SocketCgroups};
use super::peers::{peer_address, role_name, Counters, Peer, PeerTable, Take, OVERFLOW_PEER};
use super::sampler::{self as sd, PeerSampler, Sampler};
use super::walk::{self, Floor, Walk};

const IO: &str = crate::catalogue::TCP_IO;
const RETRANS: &str = crate::catalogue::TCP_RETRANSMITS;
const OPENED: &str = crate::catalogue::TCP_OPENED;
const FAILED: &str = crate::catalogue::TCP_FAILED;
const CONNECT: &str = crate::catalogue::TCP_CONNECT_DURATION;
const RTT: &str = crate::catalogue::TCP_RTT;
const MAP_FULL: &str = crate::catalogue::BPF_MAP_INSERT_FAILURES;
const EVICTED: &str = crate::catalogue::TCP_PEERS_EVICTED;
const FORGOTTEN: &str = crate::catalogue::TCP_PEERS_FORGOTTEN;
const ADOPTED: &str = crate::catalogue::TCP_SOCKETS_ADOPTED;
const UNTRACKED: &str = crate::catalogue::TCP_SOCKETS_UNTRACKED;
const RTT_DESC: &str = "Smoothed TCP round-trip time, sampled over each connection's whole life \
                        (not only at close).";

/// Collections in a row without any change after which a peer's entry is
/// evicted from `TCP_PEERS` (its totals move to the userspace base table).
/// 6 is a minute at the default 10 s interval: long enough that a peer
/// talking every few intervals keeps its entry (an eviction costs two
/// syscalls and, if the peer comes back, a kernel re-insert), short enough
/// that a map sized for the peers active at once is not filled by peers
/// that left.
pub const EVICT_AFTER_INTERVALS: u32 = 6;
/// Idle time after which an evicted peer's totals are forgotten: its series
/// ends, and a later return starts a new series with a new start time. Bounds
/// the userspace table by the peers seen in the last hour.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

const IO_DESC: &str = "TCP payload bytes per peer, server port and role: sent (each byte once, \
                       retransmissions excluded) and received in order, from the kernel's \
                       per-socket counters.";
const IO_SYSCALL_DESC: &str = "TCP payload bytes per peer, server port and role, as returned by \
                               send/recv syscalls (no headers, no retransmissions).";
const IO_SAMPLED_DESC: &str = "TCP payload bytes per peer, server port and role: acknowledged by \
                               the peer (transmit) or received in order (receive), sampled from \
                               tcp_info once per interval (connections closed between samples \
                               are missed).";
const RETRANS_DESC: &str = "Retransmitted TCP segments.";
const OPENED_DESC: &str = "TCP connections established, by role.";
const FAILED_DESC: &str = "TCP connections that failed: connects refused or timed out, \
                           established connections reset.";

struct Maps {
    peers: PerCpuHashMap<MapData, c::PeerKey, c::PeerValue>,
    counters: PerCpuArray<MapData, u64>,
    connect: PerCpuArray<MapData, u64>,
    rtt: PerCpuArray<MapData, u64>,
    rtt_peers: Option<PerCpuHashMap<MapData, c::RttKey, u64>>,
    /// `TCP_CGROUP_CONNS`, with `probes.tcp.per_cgroup`.
    conns: Option<PerCpuHashMap<MapData, c::ConnKey, u64>>,
    max_peers: u32,
    /// The socket-counter design's walk of live sockets; `None` for the
    /// per-I/O design, where `TCP_PEERS` holds everything.
    walk: Option<Walk>,
}

/// Reads the TCP maps, or `/proc/net/snmp` and the sock_diag sampler in
/// procfs mode.
pub struct TcpCollector {
    proc: Root,
    maps: Option<Maps>,
    table: PeerTable<c::PeerKey, c::PeerValue>,
    /// Exported per-peer totals never go down (see [`tcp_walk`]).
    floor: Floor<Peer>,
    sampler: Option<Sampler>,
    starts: StartTimes,
    /// Start times of the sampler's series: it counts from its own start,
    /// not from boot like `/proc/net/snmp`.
    sampler_starts: StartTimes,
    /// Failed sock_diag samples not yet counted by the run loop.
    sampler_errors: u64,
    /// Socket cgroups, with `probes.tcp.per_cgroup` where it runs.
    cgroups: Option<SocketCgroups>,
    /// Per-peer totals of removed cgroups whose series goes on (another
    /// cgroup of the same container or slice lives).
    removed: HashMap<Peer, c::PeerValue>,
    /// The same for connection counts, by (`perch.cgroup`, slot).
    conn_removed: BTreeMap<(String, u32), u64>,
}

impl TcpCollector {
    pub fn new(ctx: &mut BuildCtx<'_>) -> Result<Self, BuildError> {
        let source = ctx.source();
        let rtt_per_peer = ctx.config.tcp.rtt_per_peer;
        let max_peers = ctx.config.tcp.max_peers;
        let per_cgroup = super::socket_cgroups(ctx);
        let maps = match source {
            Source::Ebpf => Some(Maps {
                peers: ctx.map(c::MAP_PEERS)?,
                counters: ctx.map(c::MAP_COUNTERS)?,
                connect: ctx.map(c::MAP_CONNECT_HIST)?,
                rtt: ctx.map(c::MAP_RTT_HIST)?,
                rtt_peers: if rtt_per_peer {
                    Some(ctx.map(c::MAP_RTT_PEERS)?)
                } else {
                    None
                },
                conns: if per_cgroup.is_some() {
                    Some(ctx.map(c::MAP_CGROUP_CONNS)?)
                } else {
                    None
                },
                max_peers,
                // Linked only when the socket-counter variant is attached.
                walk: ctx.iter(walk::PROGRAM).map(Walk::new),
            }),
            _ => None,
        };
        let start = match &maps {
            Some(_) => ctx.attached_at()?,
            None => ctx.boot,
        };
        let proc = ctx.proc.clone();
        let sampler = match source {
            Source::Procfs => {
                let state = PeerSampler::new(max_peers, rtt_per_peer, FORGET_AFTER)
                    .per_cgroup(per_cgroup.is_some());
                match Sampler::start(state, SystemTime::now()) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!(error = %e, "tcp: sock_diag sampler unavailable; no per-peer data in procfs mode");
                        None
                    }
                }
            }
            _ => None,
        };
        Ok(Self {
            proc,
            maps,
            table: PeerTable::new(EVICT_AFTER_INTERVALS, FORGET_AFTER),
            floor: Floor::default(),
            sampler_starts: StartTimes::new(SystemTime::now()),
            sampler_errors: 0,
            sampler,
            starts: StartTimes::new(start),
            cgroups: per_cgroup,
            removed: HashMap::new(),
            conn_removed: BTreeMap::new(),
        })
    }

    fn sum(
        &mut self,
        name: &'static str,
        attributes: Attributes,
        v: u64,
        now: SystemTime,
    ) -> NumberPoint {
        number_point(&mut self.starts, name, attributes, v, now)
    }

    fn hist(
        &mut self,
        name: &'static str,
        attributes: Attributes,
        counts: Vec<u64>,
        sum_ns: u64,
        now: SystemTime,
    ) -> HistogramPoint {
        hist_point(&mut self.starts, name, attributes, counts, sum_ns, now)
    }

    /// `perch.tcp.peers.evicted` and `perch.tcp.peers.forgotten`.
    fn push_peer_churn(
        &mut self,
        evicted: u64,
        forgotten: u64,
        now: SystemTime,
        out: &mut Vec<Metric>,
    ) {
        self.push_count(
            EVICTED,
            "Idle peers whose kernel entry was deleted to make room; their totals \
             are kept and their series go on.",
            "{peer}",
            evicted,
            now,
            out,
        );
        self.push_count(
            FORGOTTEN,
            "Peers idle for an hour whose totals were dropped: their series ended.",
            "{peer}",
            forgotten,
            now,
            out,
        );
    }

    /// A monotonic counter of one series without attributes.
    fn push_count(
        &mut self,
        name: &'static str,
        description: &'static str,
        unit: &'static str,
        v: u64,
        now: SystemTime,
        out: &mut Vec<Metric>,
    ) {
        let p = self.sum(name, Vec::new(), v, now);
        out.push(Metric {
            name,
            description,
            unit,
            data: Data::Sum {
                monotonic: true,
                points: vec![p],
            },
        });
    }
}

/// A cumulative point of `name`, its start time from `starts`.
fn number_point(
    starts: &mut StartTimes,
    name: &'static str,
    attributes: Attributes,
    v: u64,
    now: SystemTime,
) -> NumberPoint {
    let start = starts.observe(name, &attributes, v as f64, now);
    NumberPoint {
        attributes,
        start_time: Some(start),
        time: now,
        value: Number::Int(v as i64),
    }
}

/// A cumulative histogram point (counts per [`agent_common::exp::slot`],
/// sum in ns), its start time from `starts`.
fn hist_point(
    starts: &mut StartTimes,
    name: &'static str,
    attributes: Attributes,
    counts: Vec<u64>,
    sum_ns: u64,
    now: SystemTime,
) -> HistogramPoint {
    let count: u64 = counts.iter().sum();
    let start = starts.observe(name, &attributes, count as f64, now);
    HistogramPoint {
        attributes,
        start_time: start,
        time: now,
        count,
        sum: sum_ns as f64 / 1e9,
        buckets: Buckets::Exponential(Exponential::from_slots(&counts)),
    }
}

/// `perch.tcp.io` points: two per peer (transmit, receive), and the
/// overflow series (client, server) when given.
fn io_points(
    starts: &mut StartTimes,
    peers: &BTreeMap<Peer, (u64, u64)>,
    overflow: Option<[(u64, u64); 2]>,
    cgroups: Option<&SocketCgroups>,
    now: SystemTime,
) -> Vec<NumberPoint> {
    let mut io = Vec::with_capacity(peers.len() * 2 + 4);
    for (peer, (tx, rx)) in peers {
        for (dir, n) in [("transmit", *tx), ("receive", *rx)] {
            let mut attrs = peer_attributes(peer, cgroups);
            attrs.push(("network.io.direction", dir.into()));
            io.push(number_point(starts, IO, attrs, n, now));
        }
    }
    if let Some(o) = overflow {
        for (role, (tx, rx)) in [("client", o[0]), ("server", o[1])] {
            for (dir, n) in [("transmit", tx), ("receive", rx)] {
                let attrs: Attributes = vec![
                    ("network.peer.address", OVERFLOW_PEER.into()),
                    ("perch.tcp.role", role.into()),
                    ("network.io.direction", dir.into()),
                ];
                io.push(number_point(starts, IO, attrs, n, now));
            }
        }
    }
    io
}

/// The attributes of a peer's series: address, server port, role, and its
/// socket cgroup's with `probes.tcp.per_cgroup`.
fn peer_attributes(peer: &Peer, cgroups: Option<&SocketCgroups>) -> Attributes {
    let (addr, port, role, cgroup) = peer;
    let mut attrs: Attributes = vec![
        ("network.peer.address", addr.clone().into()),
        ("server.port", (*port).into()),
        ("perch.tcp.role", (*role).into()),
    ];
    if let Some(cg) = cgroups {
        attrs.extend(label_attributes(cg, cgroup));
    }
    attrs
}

/// Identity of a per-peer series, for [`retain_peers`].
fn series_id(peer: &Peer) -> String {
    let (addr, port, role, cgroup) = peer;
    format!("{addr}|{port}|{role}|{cgroup}")
}

/// Forgets the start times of per-peer series not in `present`, so that a
/// forgotten peer that returns starts a new series with a new start time.
fn retain_peers(starts: &mut StartTimes, present: &HashSet<String>) {
    starts.retain(|_, attrs| {
        let get = |k: &str| {
            attrs
                .iter()
                .find(|(ak, _)| *ak == k)
                .map(|(_, v)| v.to_string())
        };
        match (
            get("network.peer.address"),
            get("server.port"),
            get("perch.tcp.role"),
        ) {
            (Some(a), Some(p), Some(r)) if a != OVERFLOW_PEER => {
                let cgroup = get("perch.cgroup").unwrap_or_default();
                present.contains(&format!("{a}|{p}|{r}|{cgroup}"))
            }
            _ => true,
        }
    });
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

    fn take_partial_errors(&mut self) -> Vec<(&'static str, &'static str)> {
        let n = std::mem::take(&mut self.sampler_errors) as usize;
        vec![("tcp.sockdiag", "netlink"); n]
    }
}
