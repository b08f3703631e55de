//! procfs mode: `/proc/net/snmp` host counters and the sock_diag sampler's
//! per-peer bytes and RTT.

use super::*;

impl TcpCollector {
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
            self.sampler_errors += 1;
        }
        let Ok(forgotten) = result else {
            return;
        };
        let st = &sampler.state;
        // Socket cgroups: labels only. The sampler holds the totals; a
        // removed cgroup's series end when it forgets their peer.
        if let Some(cg) = self.cgroups.as_mut() {
            let held: HashSet<u64> = st.peers().map(|(p, _)| p.cgroup).collect();
            cg.resolve(&held, &held);
        }
        let mut cgroups = self.cgroups.as_mut();
        let mut id = |p: &sd::PeerId| -> Peer {
            let cgroup = label_of(cgroups.as_deref_mut(), p.cgroup);
            (p.addr.to_string(), p.server_port, role_name(p.role), cgroup)
        };
        let peers: BTreeMap<Peer, (u64, u64)> = st
            .peers()
            .map(|(p, t)| (id(&p), (t.tx_bytes, t.rx_bytes)))
            .collect();
        let overflow = st.overflow().map(|o| o.map(|t| (t.tx_bytes, t.rx_bytes)));
        let rtt = st.rtt().clone();
        let rtt_peers: BTreeMap<Peer, sd::Hist> =
            st.rtt_peers().map(|(p, h)| (id(&p), h.clone())).collect();
        let forgotten_n = st.forgotten();
        let io = io_points(
            &mut self.sampler_starts,
            &peers,
            overflow,
            self.cgroups.as_ref(),
            now,
        );
        out.push(Metric::counter(IO, IO_SAMPLED_DESC, "By", io));
        let mut points = vec![hist_point(
            &mut self.sampler_starts,
            RTT,
            Vec::new(),
            rtt.counts,
            rtt.sum_ns,
            now,
        )];
        for (peer, h) in rtt_peers {
            let attrs = peer_attributes(&peer, self.cgroups.as_ref());
            points.push(hist_point(
                &mut self.sampler_starts,
                RTT,
                attrs,
                h.counts,
                h.sum_ns,
                now,
            ));
        }
        out.push(Metric::histogram(RTT, RTT_DESC, "s", points));
        let p = number_point(
            &mut self.sampler_starts,
            FORGOTTEN,
            Vec::new(),
            forgotten_n,
            now,
        );
        out.push(Metric::counter(
            FORGOTTEN,
            "Peers idle for an hour whose totals were dropped: their series ended.",
            "{peer}",
            vec![p],
        ));
        if !forgotten.is_empty() {
            let present: HashSet<String> = peers.keys().map(series_id).collect();
            retain_peers(&mut self.sampler_starts, &present);
        }
        if let Some(cg) = self.cgroups.as_mut() {
            let used: HashSet<&str> = peers.keys().map(|p| p.3.as_str()).collect();
            cg.retain_labels(&used);
        }
        self.sampler_starts.end_collection(now);
    }

    pub(super) fn collect_procfs(
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
        out.push(Metric::counter(RETRANS, RETRANS_DESC, "{segment}", vec![p]));
        let opened = vec![
            self.sum(OPENED, vec![("perch.tcp.role", "client".into())], ao, now),
            self.sum(OPENED, vec![("perch.tcp.role", "server".into())], po, now),
        ];
        out.push(Metric::counter(OPENED, OPENED_DESC, "{connection}", opened));
        let failed = vec![
            self.sum(
                FAILED,
                vec![("error.type", "attempt_failed".into())],
                af,
                now,
            ),
            self.sum(FAILED, vec![("error.type", "reset".into())], er, now),
        ];
        out.push(Metric::counter(FAILED, FAILED_DESC, "{connection}", failed));
        self.collect_sampler(now, out);
        Ok(())
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
            sampler_errors: 0,
            cgroups: None,
            removed: HashMap::new(),
            conn_removed: BTreeMap::new(),
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
