//! TCP family: per-peer payload bytes and retransmits, connection lifecycle,
//! connect duration and smoothed RTT.
//!
//! - Hooks (kernel side `agent-ebpf/src/tcp/`), two designs:
//!   - socket counters (`tp_btf`, preferred, 5.11+): `inet_sock_set_state`
//!     and a walk of every open file (`iter/task_file`) that this collector
//!     runs at each collection ([`super::tcp_walk`]). Nothing runs per I/O.
//!   - per I/O (`raw_tp`, 6.3+): `inet_sock_set_state`, `sock_send_length`,
//!     `sock_recv_length`, `tcp_retransmit_skb`.
//!
//!   Struct offsets come from kernel BTF ([`crate::probes::btf`]).
//! - Metrics (eBPF):
//!   - `perch.tcp.io{network.peer.address, server.port, perch.tcp.role,
//!     network.io.direction}`: payload bytes. Socket counters: sent once
//!     (`bytes_sent - bytes_retrans`) and received in order
//!     (`bytes_received`, FIN taken out), from the kernel's per-socket
//!     counters, closed sockets exactly and open ones as of the collection.
//!     Per I/O: as returned by the `sendmsg` / `recvmsg` family of syscalls
//!     (`ret > 0`, `MSG_PEEK` excluded). No headers, no retransmitted bytes.
//!   - `perch.tcp.retransmits{network.peer.address, server.port,
//!     perch.tcp.role}`: retransmitted segments, as `RetransSegs` counts.
//!   - `perch.tcp.connections.opened{perch.tcp.role}`,
//!     `perch.tcp.connections.failed{error.type = refused|timeout|reset}`.
//!   - `perch.tcp.connect.duration` (SYN sent to established) and
//!     `perch.tcp.rtt` (smoothed RTT: socket counters, once per collection a
//!     socket moved data in and once at its close; per I/O, every 100 ms of
//!     activity per socket), histograms in seconds; `perch.tcp.rtt` per
//!     peer with `probes.tcp.rtt_per_peer`.
//!   - Self: `perch.bpf.map.full{perch.bpf.map}` (failed inserts: the bytes
//!     of a peer that did not fit are in the `network.peer.address="_OTHER"`
//!     series, never lost), `perch.bpf.map.entries{perch.bpf.map}`,
//!     `perch.tcp.peers.evicted`, `perch.tcp.peers.forgotten`; socket
//!     counters also `perch.tcp.sockets.adopted` and
//!     `perch.tcp.sockets.untracked`.
//! - Fallback (procfs): `/proc/net/snmp` `Tcp`, for the agent's network
//!   namespace and host-wide within it: `RetransSegs` ->
//!   `perch.tcp.retransmits{}`, `ActiveOpens`/`PassiveOpens` ->
//!   `perch.tcp.connections.opened{perch.tcp.role}`, `AttemptFails` ->
//!   `perch.tcp.connections.failed{error.type="attempt_failed"}` (refused and
//!   timed-out connects together, plus server handshakes that failed),
//!   `EstabResets` -> `{error.type="reset"}`. Plus the netlink `sock_diag`
//!   sampler ([`super::tcp_sockdiag`]): per-peer `perch.tcp.io` from
//!   `tcp_info` byte counters and `perch.tcp.rtt` from `tcpi_rtt`, sampled
//!   once per interval (connections that open and close between two samples
//!   are missed). No connect-duration histogram.
//! - Oldest kernel: 5.11 for eBPF (6.3 for the per-I/O variant), any for
//!   procfs (4.1 for the sampler's byte counters).
//!
//! Idle peers are evicted from `TCP_PEERS` so the bounded map keeps room for
//! new peers: see [`PeerTable`].
//!
//! Peer series are keyed by remote address, the server's port and the role;
//! the client's ephemeral port is never an attribute. IPv4-mapped IPv6
//! peers are reported as IPv4, merged with the IPv4 series.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agent_common::{hist, tcp as c};
use aya::maps::{MapData, MapError, PerCpuArray, PerCpuHashMap};
use aya::sys::SyscallError;

use crate::gate::{Family, Source};
use crate::model::{Attributes, Data, HistogramPoint, Metric, Number, NumberPoint, StartTimes};
use crate::probes::Probes;
use crate::procfs::{snmp, ProcError, ProcRoot};

use super::tcp_sockdiag::{self as sd, PeerSampler, Sampler};
use super::tcp_walk::{self, Floor, Walk};
use super::{online_cpus, CollectError, Collector};

const IO: &str = "perch.tcp.io";
const RETRANS: &str = "perch.tcp.retransmits";
const OPENED: &str = "perch.tcp.connections.opened";
const FAILED: &str = "perch.tcp.connections.failed";
const CONNECT: &str = "perch.tcp.connect.duration";
const RTT: &str = "perch.tcp.rtt";
const MAP_FULL: &str = "perch.bpf.map.full";
const MAP_ENTRIES: &str = "perch.bpf.map.entries";
const EVICTED: &str = "perch.tcp.peers.evicted";
const FORGOTTEN: &str = "perch.tcp.peers.forgotten";
const ADOPTED: &str = "perch.tcp.sockets.adopted";
const UNTRACKED: &str = "perch.tcp.sockets.untracked";
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

/// The overflow peer: bytes of peers that did not fit the kernel map.
pub const OVERFLOW_PEER: &str = "_OTHER";

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
    proc: ProcRoot,
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

/// Cumulative counters of one map entry (summed over CPUs).
pub trait Counters: Copy + Default + PartialEq + std::fmt::Debug {
    /// Adds `o` to `self`, field by field.
    fn add(&mut self, o: &Self);
    /// Some field of `self` is below the same field of `o`: not a
    /// continuation of `o` (the entry was re-created).
    fn below(&self, o: &Self) -> bool;
}

impl Counters for c::PeerValue {
    fn add(&mut self, o: &Self) {
        self.tx_bytes += o.tx_bytes;
        self.rx_bytes += o.rx_bytes;
        self.retrans_segs += o.retrans_segs;
    }
    fn below(&self, o: &Self) -> bool {
        self.tx_bytes < o.tx_bytes
            || self.rx_bytes < o.rx_bytes
            || self.retrans_segs < o.retrans_segs
    }
}

impl Counters for u64 {
    fn add(&mut self, o: &Self) {
        *self += *o;
    }
    fn below(&self, o: &Self) -> bool {
        self < o
    }
}

/// What [`PeerTable::evict`]'s `take` did with one kernel entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take<V> {
    /// Read it (this value, summed over CPUs) and deleted it.
    Removed(V),
    /// Read it and found it changed since the last collection: kept.
    Changed(V),
    /// It was not in the map any more.
    Gone,
    /// Reading or deleting failed: kept, tried again next collection.
    Kept,
}

#[derive(Debug, Clone, Copy)]
struct Tracked<V> {
    /// Totals of the entry's evicted incarnations.
    base: V,
    /// The kernel entry's value at the last collection; `None` while the
    /// entry is not in the kernel map.
    kernel: Option<V>,
    /// Collections in a row the kernel value did not change.
    idle: u32,
    /// When the total last changed.
    last_change: SystemTime,
    /// Seen in this collection's read of the map.
    seen: bool,
}

/// The userspace side of an evicting kernel map of cumulative counters.
///
/// Each collection the map is read ([`PeerTable::observe`]); an entry
/// unchanged for `evict_after` collections in a row is deleted from the
/// kernel map and its value added to its key's `base`
/// ([`PeerTable::evict`]). The exported total of a key is `base` plus the
/// kernel entry's current value, so when the peer comes back (the kernel
/// re-inserts it from zero) the series continues from where it was, with
/// the same start time. A key with no kernel entry and no change for
/// `forget_after` is dropped ([`PeerTable::forget`]): its series ends.
///
/// Race: the kernel adds to an entry through a pointer, without the map's
/// lock, so a delete cannot be atomic with the programs. `take` re-reads an
/// idle entry just before deleting it and keeps it if it changed; what the
/// programs add between that read and the delete (a window of one syscall,
/// a few µs, on an entry that was idle for `evict_after` intervals) is lost.
/// The exported total still never goes down: the read value is at least the
/// last one exported.
#[derive(Debug)]
pub struct PeerTable<K, V> {
    evict_after: u32,
    forget_after: Duration,
    entries: HashMap<K, Tracked<V>>,
    evicted: u64,
    forgotten: u64,
}

impl<K: Copy + Eq + Hash, V: Counters> PeerTable<K, V> {
    pub fn new(evict_after: u32, forget_after: Duration) -> Self {
        Self {
            evict_after,
            forget_after,
            entries: HashMap::new(),
            evicted: 0,
            forgotten: 0,
        }
    }

    /// Records this collection's kernel entries (values summed over CPUs).
    pub fn observe(&mut self, kernel: impl IntoIterator<Item = (K, V)>, now: SystemTime) {
        for t in self.entries.values_mut() {
            t.seen = false;
        }
        for (k, v) in kernel {
            let t = self.entries.entry(k).or_insert(Tracked {
                base: V::default(),
                kernel: None,
                idle: 0,
                last_change: now,
                seen: false,
            });
            t.seen = true;
            Self::update(t, v, now);
        }
        for t in self.entries.values_mut() {
            if !t.seen {
                // Deleted by someone else (or by a take that failed after
                // deleting): keep what was last read.
                if let Some(prev) = t.kernel.take() {
                    t.base.add(&prev);
                }
            }
        }
    }

    /// A new kernel value `v` for `t`.
    fn update(t: &mut Tracked<V>, v: V, now: SystemTime) {
        match t.kernel {
            Some(prev) if v == prev => t.idle = t.idle.saturating_add(1),
            Some(prev) => {
                if v.below(&prev) {
                    // Re-created without us, counting from zero again: what
                    // was read before is kept.
                    t.base.add(&prev);
                }
                t.idle = 0;
                t.last_change = now;
            }
            None => {
                // New, or back after an eviction (counting from zero).
                t.idle = 0;
                if v != V::default() {
                    t.last_change = now;
                }
            }
        }
        t.kernel = Some(v);
    }

    /// Evicts the entries idle for `evict_after` collections: `take(key,
    /// last)` re-reads the kernel entry and deletes it if it still equals
    /// `last`. Returns how many were evicted.
    pub fn evict(&mut self, now: SystemTime, mut take: impl FnMut(&K, &V) -> Take<V>) -> usize {
        let mut n = 0;
        for (k, t) in self.entries.iter_mut() {
            let Some(last) = t.kernel else { continue };
            if t.idle < self.evict_after {
                continue;
            }
            match take(k, &last) {
                Take::Removed(v) => {
                    if v.below(&last) {
                        t.base.add(&last);
                    }
                    t.base.add(&v);
                    t.kernel = None;
                    n += 1;
                }
                Take::Changed(v) => Self::update(t, v, now),
                Take::Gone => {
                    t.base.add(&last);
                    t.kernel = None;
                }
                Take::Kept => {}
            }
        }
        self.evicted += n as u64;
        n
    }

    /// Drops the keys with no kernel entry whose total has not changed for
    /// `forget_after`; returns them.
    pub fn forget(&mut self, now: SystemTime) -> Vec<K> {
        let mut gone = Vec::new();
        let after = self.forget_after;
        self.entries.retain(|k, t| {
            let idle = now.duration_since(t.last_change).unwrap_or_default();
            let keep = t.kernel.is_some() || idle < after;
            if !keep {
                gone.push(*k);
            }
            keep
        });
        self.forgotten += gone.len() as u64;
        gone
    }

    /// The exported totals: base plus the kernel value, per key.
    pub fn totals(&self) -> impl Iterator<Item = (&K, V)> + '_ {
        self.entries.iter().map(|(k, t)| {
            let mut v = t.base;
            if let Some(kv) = &t.kernel {
                v.add(kv);
            }
            (k, v)
        })
    }

    /// Keys with an entry in the kernel map.
    pub fn in_kernel(&self) -> usize {
        self.entries.values().filter(|t| t.kernel.is_some()).count()
    }

    /// Entries evicted so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Keys forgotten so far.
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }
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
                // Linked only when the socket-counter variant is attached.
                let walk = probes.take_iter(tcp_walk::PROGRAM).map(Walk::new);
                Some(Maps {
                    peers,
                    counters,
                    connect,
                    rtt,
                    rtt_peers,
                    max_peers,
                    walk,
                })
            }
        };
        let start = match &maps {
            Some(_) => probes.attached_at(Family::Tcp)?,
            None => boot,
        };
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
        Some(Self {
            proc,
            maps,
            table: PeerTable::new(EVICT_AFTER_INTERVALS, FORGET_AFTER),
            floor: Floor::default(),
            sampler_starts: StartTimes::new(SystemTime::now()),
            sampler_errors: (SystemTime::now(), 0),
            sampler,
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
            Some(w) => tcp_walk::by_key(&w.run()?),
            None => HashMap::new(),
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
                name: "perch.collector.errors",
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

    /// One collection of a [`PeerTable`] test: the kernel map before it
    /// (key, value), what the map holds when `take` re-reads an idle entry
    /// (None: as read), and the totals, kernel entries and eviction count
    /// after it.
    struct Step {
        case: &'static str,
        at: u64,
        kernel: Vec<(u8, u64)>,
        on_take: Option<(u8, Take<u64>)>,
        totals: Vec<(u8, u64)>,
        in_kernel: usize,
        evicted: u64,
    }

    fn run_table(evict_after: u32, forget_after: u64, steps: Vec<Step>) {
        let mut t: PeerTable<u8, u64> =
            PeerTable::new(evict_after, Duration::from_secs(forget_after));
        let mut last_totals: HashMap<u8, u64> = HashMap::new();
        for st in steps {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(st.at);
            t.observe(st.kernel.iter().copied(), now);
            let mut took = Vec::new();
            t.evict(now, |k, last| {
                took.push(*k);
                match st.on_take {
                    Some((key, r)) if key == *k => r,
                    _ => Take::Removed(*last),
                }
            });
            t.forget(now);
            let mut got: Vec<(u8, u64)> = t.totals().map(|(k, v)| (*k, v)).collect();
            got.sort();
            assert_eq!(got, st.totals, "{}: totals", st.case);
            assert_eq!(t.in_kernel(), st.in_kernel, "{}: kernel entries", st.case);
            assert_eq!(t.evicted(), st.evicted, "{}: evicted", st.case);
            // Monotonic while a key lives.
            for (k, v) in &got {
                if let Some(prev) = last_totals.get(k) {
                    assert!(v >= prev, "{}: key {k} went from {prev} to {v}", st.case);
                }
            }
            last_totals = got.into_iter().collect();
        }
    }

    #[test]
    fn peer_table_evict_return_forget() {
        let s =
            |case, at, kernel: Vec<(u8, u64)>, totals: Vec<(u8, u64)>, in_kernel, evicted| Step {
                case,
                at,
                kernel,
                on_take: None,
                totals,
                in_kernel,
                evicted,
            };
        run_table(
            2,
            100,
            vec![
                s(
                    "new peers",
                    0,
                    vec![(1, 10), (2, 5)],
                    vec![(1, 10), (2, 5)],
                    2,
                    0,
                ),
                s(
                    "1 idle once, 2 grows",
                    10,
                    vec![(1, 10), (2, 7)],
                    vec![(1, 10), (2, 7)],
                    2,
                    0,
                ),
                s(
                    "1 idle twice: evicted, total kept",
                    20,
                    vec![(1, 10), (2, 9)],
                    vec![(1, 10), (2, 9)],
                    1,
                    1,
                ),
                s(
                    "1 absent from the kernel: still exported",
                    30,
                    vec![(2, 11)],
                    vec![(1, 10), (2, 11)],
                    1,
                    1,
                ),
                s(
                    "1 returns from zero: the series goes on",
                    40,
                    vec![(1, 3), (2, 12)],
                    vec![(1, 13), (2, 12)],
                    2,
                    1,
                ),
                s(
                    "1 grows",
                    50,
                    vec![(1, 4), (2, 13)],
                    vec![(1, 14), (2, 13)],
                    2,
                    1,
                ),
                s(
                    "1 idle once",
                    60,
                    vec![(1, 4), (2, 14)],
                    vec![(1, 14), (2, 14)],
                    2,
                    1,
                ),
                s(
                    "1 evicted again, base 14",
                    70,
                    vec![(1, 4), (2, 15)],
                    vec![(1, 14), (2, 15)],
                    1,
                    2,
                ),
                s(
                    "99 s after its last change: kept",
                    149,
                    vec![(2, 16)],
                    vec![(1, 14), (2, 16)],
                    1,
                    2,
                ),
                s(
                    "100 s: forgotten, the series ends",
                    150,
                    vec![(2, 17)],
                    vec![(2, 17)],
                    1,
                    2,
                ),
                s(
                    "1 comes back after that: a new series from zero",
                    160,
                    vec![(1, 2), (2, 18)],
                    vec![(1, 2), (2, 18)],
                    2,
                    2,
                ),
            ],
        );
    }

    #[test]
    fn peer_table_races_and_resets() {
        let step = |case,
                    at,
                    kernel: Vec<(u8, u64)>,
                    on_take,
                    totals: Vec<(u8, u64)>,
                    in_kernel,
                    evicted| Step {
            case,
            at,
            kernel,
            on_take,
            totals,
            in_kernel,
            evicted,
        };
        run_table(
            1,
            1000,
            vec![
                step("new", 0, vec![(1, 10)], None, vec![(1, 10)], 1, 0),
                step(
                    "idle, but it changed before the delete: kept, total follows",
                    10,
                    vec![(1, 10)],
                    Some((1, Take::Changed(12))),
                    vec![(1, 12)],
                    1,
                    0,
                ),
                step(
                    "idle, the delete fails: kept",
                    20,
                    vec![(1, 12)],
                    Some((1, Take::Kept)),
                    vec![(1, 12)],
                    1,
                    0,
                ),
                step(
                    "idle, gone already: what was read is kept",
                    30,
                    vec![(1, 12)],
                    Some((1, Take::Gone)),
                    vec![(1, 12)],
                    0,
                    0,
                ),
                step("back", 40, vec![(1, 5)], None, vec![(1, 17)], 1, 0),
                step(
                    "re-created behind our back (value went down): no reset",
                    50,
                    vec![(1, 2)],
                    None,
                    vec![(1, 19)],
                    1,
                    0,
                ),
                step(
                    "vanished without an eviction: last value kept",
                    60,
                    vec![],
                    None,
                    vec![(1, 19)],
                    0,
                    0,
                ),
                step(
                    "a zero-valued new entry is not a change",
                    70,
                    vec![(2, 0)],
                    None,
                    vec![(1, 19), (2, 0)],
                    1,
                    0,
                ),
                step(
                    "idle zero entry: evicted",
                    80,
                    vec![(2, 0)],
                    None,
                    vec![(1, 19), (2, 0)],
                    0,
                    1,
                ),
            ],
        );
    }

    fn procfs_collector(dir: &std::path::Path) -> TcpCollector {
        TcpCollector {
            proc: ProcRoot::new(dir),
            maps: None,
            table: PeerTable::new(EVICT_AFTER_INTERVALS, FORGET_AFTER),
            floor: Floor::default(),
            sampler: None,
            starts: StartTimes::new(SystemTime::UNIX_EPOCH),
            sampler_starts: StartTimes::new(SystemTime::UNIX_EPOCH),
            sampler_errors: (SystemTime::UNIX_EPOCH, 0),
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
