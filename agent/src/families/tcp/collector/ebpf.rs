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
    /// `TCP_CGROUP_CONNS` entries, with `probes.tcp.per_cgroup`.
    conn_entries: Option<u64>,
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
        // Per-cgroup connection counts, summed over CPUs.
        let mut conns: Vec<(c::ConnKey, u64)> = Vec::new();
        if let Some(map) = &maps.conns {
            for item in map.iter() {
                let (key, values) = item.map_err(|e| CollectError::map(c::MAP_CGROUP_CONNS, e))?;
                conns.push((key, values.iter().sum()));
            }
        }
        // Socket cgroups: removed ones with no open socket move to their
        // series' removed part (module `cgroups`).
        let mut ended = HashSet::new();
        let mut dropped = HashSet::new();
        if let Some(cg) = self.cgroups.as_mut() {
            let open: HashSet<u64> = live.keys().map(c::PeerKey::cgroup_id).collect();
            let mut held: HashSet<u64> = self.table.totals().map(|(k, _)| k.cgroup_id()).collect();
            held.extend(conns.iter().map(|(k, _)| c::join_cgroup(k.cgroup)));
            held.extend(&open);
            let r = cg.resolve(&held, &open);
            if !r.drop.is_empty() {
                let mut totals = HashMap::new();
                for (k, v) in self.table.totals() {
                    if r.drop.contains(&k.cgroup_id()) {
                        totals.insert(*k, v);
                    }
                }
                for k in self.table.drop_where(|k| r.drop.contains(&k.cgroup_id())) {
                    // Already gone (evicted meanwhile) is fine.
                    let _ = maps.peers.remove(&k);
                }
                for (k, v) in totals {
                    let peer = (
                        peer_address(&k),
                        k.server_port,
                        role_name(k.role),
                        cg.label(k.cgroup_id()),
                    );
                    self.removed.entry(peer).or_default().add(&v);
                }
                if let Some(map) = maps.conns.as_mut() {
                    conns.retain(|(k, n)| {
                        let id = c::join_cgroup(k.cgroup);
                        if !r.drop.contains(&id) {
                            return true;
                        }
                        let _ = map.remove(k);
                        *self.conn_removed.entry((cg.label(id), k.slot)).or_default() += n;
                        false
                    });
                }
            }
            ended = r.ended;
            dropped = r.drop;
        }
        let peer_entries = self.table.in_kernel() as u64;
        let mut peers: BTreeMap<Peer, c::PeerValue> = BTreeMap::new();
        for (key, v) in self.table.totals().chain(live.iter().map(|(k, v)| (k, *v))) {
            let cgroup = label_of(self.cgroups.as_mut(), key.cgroup_id());
            peers
                .entry((
                    peer_address(key),
                    key.server_port,
                    role_name(key.role),
                    cgroup,
                ))
                .or_default()
                .add(&v);
        }
        for (peer, v) in &self.removed {
            peers.entry(peer.clone()).or_default().add(v);
        }
        if sockets {
            self.floor.apply(&mut peers);
        }
        let mut rtt_peers: BTreeMap<Peer, (Vec<u64>, u64)> = BTreeMap::new();
        let mut rtt_peer_entries = 0u64;
        if let Some(map) = maps.rtt_peers.as_mut() {
            // A dropped cgroup's samples are read one last time, then its
            // entries deleted: a series several cgroups fold into then
            // restarts (a new start time), one that ends is gone.
            let mut dead = Vec::new();
            for item in map.iter() {
                let (key, values) = item.map_err(|e| CollectError::map(c::MAP_RTT_PEERS, e))?;
                if dropped.contains(&key.peer.cgroup_id()) {
                    dead.push(key);
                } else {
                    rtt_peer_entries += 1;
                }
                let total: u64 = values.iter().sum();
                let cgroup = label_of(self.cgroups.as_mut(), key.peer.cgroup_id());
                let e = rtt_peers
                    .entry((
                        peer_address(&key.peer),
                        key.peer.server_port,
                        role_name(key.peer.role),
                        cgroup,
                    ))
                    .or_insert_with(|| (vec![0; exp::SLOTS as usize], 0));
                if key.bucket == c::RTT_SUM_BUCKET {
                    e.1 += total;
                } else if let Some(b) = e.0.get_mut(key.bucket as usize) {
                    *b += total;
                }
            }
            for key in dead {
                let _ = map.remove(&key);
            }
        }
        // Connection counts by (series, slot): kernel entries plus the
        // removed parts.
        let mut conn_series = self.conn_removed.clone();
        for (k, n) in &conns {
            let cgroup = label_of(self.cgroups.as_mut(), c::join_cgroup(k.cgroup));
            *conn_series.entry((cgroup, k.slot)).or_default() += n;
        }
        let max_peers = maps.max_peers;
        let has_rtt_peers = maps.rtt_peers.is_some();
        let conn_entries = maps.conns.as_ref().map(|_| conns.len() as u64);

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
        let io = io_points(
            &mut self.starts,
            &io_peers,
            overflow,
            self.cgroups.as_ref(),
            now,
        );
        let mut retrans = Vec::with_capacity(peers.len() + 2);
        for (peer, v) in &peers {
            let attrs = peer_attributes(peer, self.cgroups.as_ref());
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

        self.push_lifecycle(&slots, &conn_series, connect, rtt, rtt_peers, now, out);
        let health = MapHealth {
            sockets,
            has_rtt_peers,
            max_peers,
            peer_entries,
            rtt_peer_entries,
            conn_entries,
        };
        self.push_map_health(&slots, &health, now, out);
        // Series of removed cgroups had their final point: they end.
        if !ended.is_empty() {
            let is_ended = |p: &Peer| ended.contains(&p.3);
            self.removed.retain(|p, _| !is_ended(p));
            self.floor.forget(is_ended);
            peers.retain(|p, _| !is_ended(p));
            self.conn_removed.retain(|(l, _), _| !ended.contains(l));
            let conn_ended = |_: &str, attrs: &Attributes| {
                attrs
                    .iter()
                    .any(|(k, v)| *k == "perch.cgroup" && ended.contains(&v.to_string()))
            };
            self.starts.retain(|name, attrs| {
                !((name == OPENED || name == FAILED) && conn_ended(name, attrs))
            });
        }
        if !forgotten.is_empty() || !ended.is_empty() {
            let present: HashSet<String> = peers.keys().map(series_id).collect();
            retain_peers(&mut self.starts, &present);
        }
        if let Some(cg) = self.cgroups.as_mut() {
            let mut used: HashSet<&str> = peers.keys().map(|p| p.3.as_str()).collect();
            used.extend(conn_series.keys().map(|(l, _)| l.as_str()));
            cg.retain_labels(&used);
        }
        Ok(())
    }

    /// Connections opened and failed, the connect-duration and RTT
    /// histograms.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site, each argument a different read of this collection"
    )]
    fn push_lifecycle(
        &mut self,
        slots: &[u64],
        conn_series: &BTreeMap<(String, u32), u64>,
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
            for ((cgroup, _), n) in conn_series.iter().filter(|((_, s), _)| *s == slot) {
                let mut attrs: Attributes = vec![("perch.tcp.role", role.into())];
                attrs.extend(self.cgroup_attributes(cgroup));
                opened.push(self.sum(OPENED, attrs, *n, now));
            }
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
            for ((cgroup, _), n) in conn_series.iter().filter(|((_, s), _)| *s == slot) {
                let mut attrs: Attributes = vec![("error.type", kind.into())];
                attrs.extend(self.cgroup_attributes(cgroup));
                failed.push(self.sum(FAILED, attrs, *n, now));
            }
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
        for (peer, (counts, sum)) in rtt_peers {
            let attrs = peer_attributes(&peer, self.cgroups.as_ref());
            rtt_points.push(self.hist(RTT, attrs, counts, sum, now));
        }
        out.push(Metric::histogram(RTT, RTT_DESC, "s", rtt_points));
    }

    /// The attributes of a socket-cgroup series label.
    fn cgroup_attributes(&self, cgroup: &str) -> Attributes {
        match &self.cgroups {
            Some(cg) => label_attributes(cg, cgroup),
            None => Vec::new(),
        }
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
            conn_entries,
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
        if conn_entries.is_some() {
            maps_full.push((c::MAP_CGROUP_CONNS, c::SLOT_CGROUP_CONNS_FULL));
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
        if let Some(n) = conn_entries {
            entries.push(map_entries_point(c::MAP_CGROUP_CONNS, n, max_peers, now));
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
