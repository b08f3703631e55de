//! eBPF mode: closed sockets' totals from `TCP_PEERS`, live sockets from
//! the walk, host counters and histograms from the per-CPU arrays.

use super::*;
use crate::collectors::map_entries_point;

/// What [`TcpCollector::push_map_health`] reports besides the counter slots.
#[derive(Clone, Copy)]
struct MapHealth {
    /// The socket-counter design (else per I/O).
    sockets: bool,
    has_rtt_peers: bool,
    max_peers: u32,
    peer_entries: u64,
    rtt_peer_entries: u64,
}

impl TcpCollector {
    pub(super) fn collect_ebpf(
        &mut self,
        now: SystemTime,
        out: &mut Vec<Metric>,
    ) -> Result<(), CollectError> {
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
        let connect = read_summed(&maps.connect, exp::SLOTS, c::MAP_CONNECT_HIST, &cpus)?;
        let rtt = read_summed(&maps.rtt, exp::SLOTS, c::MAP_RTT_HIST, &cpus)?;

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
                    .or_insert_with(|| (vec![0; exp::SLOTS as usize], 0));
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
        out.push(Metric::counter(
            IO,
            if sockets { IO_DESC } else { IO_SYSCALL_DESC },
            "By",
            io,
        ));
        out.push(Metric::counter(RETRANS, RETRANS_DESC, "{segment}", retrans));

        self.push_lifecycle(&slots, connect, rtt, rtt_peers, now, out);
        let health = MapHealth {
            sockets,
            has_rtt_peers,
            max_peers,
            peer_entries,
            rtt_peer_entries,
        };
        self.push_map_health(&slots, &health, now, out);
        if !forgotten.is_empty() {
            let present: HashSet<String> =
                peers.keys().map(|(a, p, r)| series_id(a, *p, r)).collect();
            retain_peers(&mut self.starts, &present);
        }
        Ok(())
    }

    /// Connections opened and failed, the connect-duration and RTT
    /// histograms.
    fn push_lifecycle(
        &mut self,
        slots: &[u64],
        connect: Vec<u64>,
        rtt: Vec<u64>,
        rtt_peers: BTreeMap<Peer, (Vec<u64>, u64)>,
        now: SystemTime,
        out: &mut Vec<Metric>,
    ) {
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
        out.push(Metric::counter(OPENED, OPENED_DESC, "{connection}", opened));
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
        out.push(Metric::counter(FAILED, FAILED_DESC, "{connection}", failed));

        let p = self.hist(
            CONNECT,
            Vec::new(),
            connect,
            slots[c::SLOT_CONNECT_SUM_NS as usize],
            now,
        );
        out.push(Metric::histogram(
            CONNECT,
            "Time from a client's SYN to the connection being established.",
            "s",
            vec![p],
        ));
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
        out.push(Metric::histogram(RTT, RTT_DESC, "s", rtt_points));
    }

    /// The bounded maps' failed inserts and fill, peer churn, and the
    /// socket-counter design's adopted and untracked sockets.
    fn push_map_health(
        &mut self,
        slots: &[u64],
        h: &MapHealth,
        now: SystemTime,
        out: &mut Vec<Metric>,
    ) {
        let MapHealth {
            sockets,
            has_rtt_peers,
            max_peers,
            peer_entries,
            rtt_peer_entries,
        } = *h;
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
        out.push(crate::collectors::map_insert_failures(full));
        let mut entries = vec![map_entries_point(
            c::MAP_PEERS,
            peer_entries,
            max_peers,
            now,
        )];
        if has_rtt_peers {
            let capacity = max_peers.saturating_mul(c::RTT_PEER_BUCKETS_PER_PEER);
            entries.push(map_entries_point(
                c::MAP_RTT_PEERS,
                rtt_peer_entries,
                capacity,
                now,
            ));
        }
        out.push(crate::collectors::map_entries(entries));
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
    }
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
