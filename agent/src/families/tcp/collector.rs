//! The `tcp` collector: kernel maps and the socket walk in eBPF mode,
//! `/proc/net/snmp` and the sock_diag sampler in procfs mode.

use std::collections::{BTreeMap, HashMap, HashSet};

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agent_common::{hist, tcp as c};
use aya::maps::{MapData, MapError, PerCpuArray, PerCpuHashMap};
use aya::sys::SyscallError;

use crate::collectors::{online_cpus, read_summed, CollectError, Collector};
use crate::families::{BuildCtx, BuildError};
use crate::gate::Source;
use crate::model::{Attributes, Data, HistogramPoint, Metric, Number, NumberPoint, StartTimes};
use crate::sources::{snmp, ProcError, Root};

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
const MAP_ENTRIES: &str = crate::catalogue::BPF_MAP_ENTRIES;
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
    /// Failed sock_diag samples since start (counted in
    /// `perch.collector.errors{perch.component="tcp.sockdiag"}`).
    sampler_errors: (SystemTime, u64),
    bounds: Arc<[f64]>,
}

impl TcpCollector {
    pub fn new(ctx: &mut BuildCtx<'_>) -> Result<Self, BuildError> {
        let source = ctx.source();
        let rtt_per_peer = ctx.config.probes.tcp.rtt_per_peer;
        let max_peers = ctx.config.probes.tcp.max_peers;
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
                let state = PeerSampler::new(max_peers, rtt_per_peer, FORGET_AFTER);
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
            sampler_errors: (SystemTime::now(), 0),
            sampler,
            starts: StartTimes::new(start),
            bounds: crate::families::sched::runq_bounds(),
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
        hist_point(
            &mut self.starts,
            &self.bounds,
            name,
            attributes,
            counts,
            sum_ns,
            now,
        )
    }

    fn collect_ebpf(&mut self, now: SystemTime, out: &mut Vec<Metric>) -> Result<(), CollectError> {
        let Some(maps) = self.maps.as_mut() else {
            return Ok(());
        };
        // Closed sockets' totals (TCP_PEERS) first, then the walk of the
        // live ones: in that order a socket closing meanwhile is never
        // counted twice (see `tcp_walk`).
        let mut kernel = Vec::new();
        for item in maps.peers.iter() {
            let (key, values) = item.map_err(|e| CollectError::map(c::MAP_PEERS, e))?;
            let mut v = c::PeerValue::default();
            for x in values.iter() {
                v.add(x);
            }
            kernel.push((key, v));
        }
        let sockets = maps.walk.is_some();
        let live = match maps.walk.as_mut() {
            Some(w) => walk::by_key(&w.run()?),
            None => HashMap::new(),
        };
        let cpus = online_cpus();
        let slots = read_summed(&maps.counters, c::COUNTER_SLOTS, c::MAP_COUNTERS, &cpus)?;
        let connect = read_summed(&maps.connect, hist::BUCKETS, c::MAP_CONNECT_HIST, &cpus)?;
        let rtt = read_summed(&maps.rtt, hist::BUCKETS, c::MAP_RTT_HIST, &cpus)?;

        // Peers: summed over CPUs; idle ones evicted into the base table;
        // v4-mapped folded into IPv4; live sockets added.
        self.table.observe(kernel, now);
        let peers_map = &mut maps.peers;
        let mut failures = 0u32;
        self.table.evict(now, |k, last| {
            let t = take_peer(peers_map, k, last);
            failures += u32::from(t == Take::Kept);
            t
        });
        if failures > 0 {
            tracing::warn!(
                map = c::MAP_PEERS,
                entries = failures,
                "tcp: idle peers could not be evicted; retrying next interval"
            );
        }
        let forgotten = self.table.forget(now);
        let peer_entries = self.table.in_kernel() as u64;
        let mut peers: BTreeMap<Peer, c::PeerValue> = BTreeMap::new();
        for (key, v) in self.table.totals().chain(live.iter().map(|(k, v)| (k, *v))) {
            peers
                .entry((peer_address(key), key.server_port, role_name(key.role)))
                .or_default()
                .add(&v);
        }
        if sockets {
            self.floor.apply(&mut peers);
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

        let io_peers: BTreeMap<Peer, (u64, u64)> = peers
            .iter()
            .map(|(p, v)| (p.clone(), (v.tx_bytes, v.rx_bytes)))
            .collect();
        let overflow = (slots[c::SLOT_PEERS_FULL as usize] > 0).then(|| {
            [
                (
                    slots[c::SLOT_OVF_TX_CLIENT as usize],
                    slots[c::SLOT_OVF_RX_CLIENT as usize],
                ),
                (
                    slots[c::SLOT_OVF_TX_SERVER as usize],
                    slots[c::SLOT_OVF_RX_SERVER as usize],
                ),
            ]
        });
        let io = io_points(&mut self.starts, &io_peers, overflow, now);
        let mut retrans = Vec::with_capacity(peers.len() + 2);
        for ((addr, port, role), v) in &peers {
            let attrs: Attributes = vec![
                ("network.peer.address", addr.clone().into()),
                ("server.port", (*port).into()),
                ("perch.tcp.role", (*role).into()),
            ];
            retrans.push(self.sum(RETRANS, attrs, v.retrans_segs, now));
        }
        // Overflow series, once anything overflowed.
        if overflow.is_some() {
            for (role, re) in [
                ("client", c::SLOT_OVF_RETRANS_CLIENT),
                ("server", c::SLOT_OVF_RETRANS_SERVER),
            ] {
                let attrs: Attributes = vec![
                    ("network.peer.address", OVERFLOW_PEER.into()),
                    ("perch.tcp.role", role.into()),
                ];
                retrans.push(self.sum(RETRANS, attrs, slots[re as usize], now));
            }
        }
        out.push(Metric {
            name: IO,
            description: if sockets { IO_DESC } else { IO_SYSCALL_DESC },
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
            description: RTT_DESC,
            unit: "s",
            data: Data::Histogram { points: rtt_points },
        });

        let mut full = Vec::new();
        let socks_map = if sockets {
            c::MAP_TRACKED
        } else {
            c::MAP_SOCKS
        };
        let mut maps_full = vec![
            (c::MAP_PEERS, c::SLOT_PEERS_FULL),
            (socks_map, c::SLOT_SOCKS_FULL),
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
        let (evicted, forgotten_n) = (self.table.evicted(), self.table.forgotten());
        self.push_peer_churn(evicted, forgotten_n, now, out);
        if sockets {
            for (name, slot, description) in [
                (
                    ADOPTED,
                    c::SLOT_ADOPTED,
                    "Established TCP sockets older than the agent that it started counting \
                     (from that moment; role inferred from the ports).",
                ),
                (
                    UNTRACKED,
                    c::SLOT_CLOSED_UNTRACKED,
                    "Established TCP sockets that closed without having been counted (e.g. older \
                     than the agent and already without an open file): their bytes are missing.",
                ),
            ] {
                self.push_count(
                    name,
                    description,
                    "{socket}",
                    slots[slot as usize],
                    now,
                    out,
                );
            }
        }
        if !forgotten.is_empty() {
            let present: HashSet<String> =
                peers.keys().map(|(a, p, r)| series_id(a, *p, r)).collect();
            retain_peers(&mut self.starts, &present);
        }
        Ok(())
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

    /// The sock_diag sampler's per-peer `perch.tcp.io` and `perch.tcp.rtt`.
    fn collect_sampler(&mut self, now: SystemTime, out: &mut Vec<Metric>) {
        let Some(sampler) = self.sampler.as_mut() else {
            return;
        };
        let result = sampler.sample(now);
        if let Err(e) = &result {
            // The snmp counters are still exported; per-peer data of this
            // interval comes with the next sample (the socket counters are
            // cumulative), so this is a warning, and it is counted.
            tracing::warn!(error = %e, "tcp: sock_diag sample failed; per-peer data delayed to the next interval");
            self.sampler_errors.1 += 1;
        }
        if self.sampler_errors.1 > 0 {
            out.push(Metric {
                name: crate::catalogue::COLLECTOR_ERRORS,
                description:
                    "Collections a collector could not complete, by component and error type.",
                unit: "{error}",
                data: Data::Sum {
                    monotonic: true,
                    points: vec![NumberPoint {
                        attributes: vec![
                            ("perch.component", "tcp.sockdiag".into()),
                            ("error.type", "netlink".into()),
                        ],
                        start_time: Some(self.sampler_errors.0),
                        time: now,
                        value: Number::Int(self.sampler_errors.1 as i64),
                    }],
                },
            });
        }
        let Ok(forgotten) = result else {
            return;
        };
        let st = &sampler.state;
        let id =
            |p: &sd::PeerId| -> Peer { (p.addr.to_string(), p.server_port, role_name(p.role)) };
        let peers: BTreeMap<Peer, (u64, u64)> = st
            .peers()
            .map(|(p, t)| (id(&p), (t.tx_bytes, t.rx_bytes)))
            .collect();
        let overflow = st.overflow().map(|o| o.map(|t| (t.tx_bytes, t.rx_bytes)));
        let rtt = st.rtt().clone();
        let rtt_peers: BTreeMap<Peer, sd::Hist> =
            st.rtt_peers().map(|(p, h)| (id(&p), h.clone())).collect();
        let forgotten_n = st.forgotten();
        let io = io_points(&mut self.sampler_starts, &peers, overflow, now);
        out.push(Metric {
            name: IO,
            description: IO_SAMPLED_DESC,
            unit: "By",
            data: Data::Sum {
                monotonic: true,
                points: io,
            },
        });
        let mut points = vec![hist_point(
            &mut self.sampler_starts,
            &self.bounds,
            RTT,
            Vec::new(),
            rtt.counts,
            rtt.sum_ns,
            now,
        )];
        for ((addr, port, role), h) in rtt_peers {
            let attrs: Attributes = vec![
                ("network.peer.address", addr.into()),
                ("server.port", port.into()),
                ("perch.tcp.role", role.into()),
            ];
            points.push(hist_point(
                &mut self.sampler_starts,
                &self.bounds,
                RTT,
                attrs,
                h.counts,
                h.sum_ns,
                now,
            ));
        }
        out.push(Metric {
            name: RTT,
            description: RTT_DESC,
            unit: "s",
            data: Data::Histogram { points },
        });
        let p = number_point(
            &mut self.sampler_starts,
            FORGOTTEN,
            Vec::new(),
            forgotten_n,
            now,
        );
        out.push(Metric {
            name: FORGOTTEN,
            description: "Peers idle for an hour whose totals were dropped: their series ended.",
            unit: "{peer}",
            data: Data::Sum {
                monotonic: true,
                points: vec![p],
            },
        });
        if !forgotten.is_empty() {
            let present: HashSet<String> =
                peers.keys().map(|(a, p, r)| series_id(a, *p, r)).collect();
            retain_peers(&mut self.sampler_starts, &present);
        }
        self.sampler_starts.end_collection(now);
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
        self.collect_sampler(now, out);
        Ok(())
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

/// A cumulative histogram point (bucket counts in [`hist`] buckets, sum in
/// ns), its start time from `starts`.
fn hist_point(
    starts: &mut StartTimes,
    bounds: &Arc<[f64]>,
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
        bounds: bounds.clone(),
        bucket_counts: counts,
    }
}

/// `perch.tcp.io` points: two per peer (transmit, receive), and the
/// overflow series (client, server) when given.
fn io_points(
    starts: &mut StartTimes,
    peers: &BTreeMap<Peer, (u64, u64)>,
    overflow: Option<[(u64, u64); 2]>,
    now: SystemTime,
) -> Vec<NumberPoint> {
    let mut io = Vec::with_capacity(peers.len() * 2 + 4);
    for ((addr, port, role), (tx, rx)) in peers {
        for (dir, n) in [("transmit", *tx), ("receive", *rx)] {
            let attrs: Attributes = vec![
                ("network.peer.address", addr.clone().into()),
                ("server.port", (*port).into()),
                ("perch.tcp.role", (*role).into()),
                ("network.io.direction", dir.into()),
            ];
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

/// Identity of a per-peer series, for [`retain_peers`].
fn series_id(addr: &str, port: u16, role: &str) -> String {
    format!("{addr}|{port}|{role}")
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
                present.contains(&format!("{a}|{p}|{r}"))
            }
            _ => true,
        }
    });
}

/// Re-reads the kernel entry `k` and deletes it if it still equals `last`.
fn take_peer(
    map: &mut PerCpuHashMap<MapData, c::PeerKey, c::PeerValue>,
    k: &c::PeerKey,
    last: &c::PeerValue,
) -> Take<c::PeerValue> {
    let cur = match map.get(k, 0) {
        Ok(values) => {
            let mut v = c::PeerValue::default();
            for x in values.iter() {
                v.add(x);
            }
            v
        }
        Err(MapError::KeyNotFound) => return Take::Gone,
        Err(e) => {
            tracing::debug!(map = c::MAP_PEERS, error = %e, "tcp: reading an idle peer failed");
            return Take::Kept;
        }
    };
    if cur != *last {
        return Take::Changed(cur);
    }
    match map.remove(k) {
        Ok(()) => Take::Removed(cur),
        Err(MapError::SyscallError(SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Take::Gone
        }
        Err(e) => {
            tracing::debug!(map = c::MAP_PEERS, error = %e, "tcp: deleting an idle peer failed");
            Take::Kept
        }
    }
}

fn gauge(map: &'static str, v: u64, capacity: u32, now: SystemTime) -> NumberPoint {
    let mut attributes: Attributes = vec![("perch.bpf.map", map.into())];
    if capacity > 0 {
        attributes.push((crate::catalogue::BPF_MAP_CAPACITY, capacity.into()));
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

    fn procfs_collector(dir: &std::path::Path) -> TcpCollector {
        TcpCollector {
            proc: Root::new(dir),
            maps: None,
            table: PeerTable::new(EVICT_AFTER_INTERVALS, FORGET_AFTER),
            floor: Floor::default(),
            sampler: None,
            starts: StartTimes::new(SystemTime::UNIX_EPOCH),
            sampler_starts: StartTimes::new(SystemTime::UNIX_EPOCH),
            sampler_errors: (SystemTime::UNIX_EPOCH, 0),
            bounds: crate::families::sched::runq_bounds(),
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
