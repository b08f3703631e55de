//! The `interfaces` collector.
//!
//! - Source: `/sys/class/net/<if>/statistics/*` (preferred: one interface's
//!   files are read only when it passes the include/exclude patterns, so a
//!   node with hundreds of excluded veths costs a directory listing), or
//!   `/proc/net/dev` when the sysfs directory is absent (sysfs not mounted in
//!   the agent's container). Both show the agent's network namespace.
//!
//! An interface re-created under the same name gets a new start time: with
//! sysfs the interface index is read too, and a changed index drops the old
//! series' start times; with `/proc/net/dev` a counter that goes down is
//! detected as a reset by [`StartTimes`]. Series of interfaces that vanished
//! are forgotten, so a returning interface starts afresh and churning veths
//! do not grow memory.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::time::SystemTime;

use crate::collectors::{CollectError, Collector};
use crate::model::{AttrValue, Attributes, Data, Metric, Number, NumberPoint, StartTimes};
use crate::sources::{ProcError, Root};

use super::net_dev::{parse_net_dev, IfStats};
use super::sysfs_net::{read_interface_dir, read_small, CLASS_NET};
use super::Config as InterfacesProbeConfig;

/// Attribute: interface name.
pub const ATTR_INTERFACE: &str = "network.interface.name";
/// Attribute: `receive` or `transmit`.
pub const ATTR_DIRECTION: &str = "network.io.direction";

/// The four metrics: (name, unit, description, receive field, transmit field).
type Field = fn(&IfStats) -> u64;
const METRICS: [(&str, &str, &str, Field, Field); 4] = [
    (
        crate::catalogue::NETWORK_IO,
        "By",
        "Bytes received and sent by each network interface (device counters, \
         link-layer frames as the driver counts them).",
        |s| s.rx_bytes,
        |s| s.tx_bytes,
    ),
    (
        crate::catalogue::NETWORK_PACKETS,
        "{packet}",
        "Packets received and sent by each network interface.",
        |s| s.rx_packets,
        |s| s.tx_packets,
    ),
    (
        crate::catalogue::NETWORK_ERRORS,
        "{error}",
        "Receive and transmit errors of each network interface (all kinds).",
        |s| s.rx_errors,
        |s| s.tx_errors,
    ),
    (
        crate::catalogue::NETWORK_DROPPED,
        "{packet}",
        "Packets dropped by each network interface (receive: no buffer, \
         unknown protocol, ...; transmit: queue or driver drops). From \
         /proc/net/dev the receive figure also holds missed frames.",
        |s| s.rx_dropped,
        |s| s.tx_dropped,
    ),
];

/// One interface: name, index (sysfs only), counters.
type IfRow = (String, Option<u64>, IfStats);

/// Where the counters were read from, for tests and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfSource {
    /// `/sys/class/net/*/statistics`.
    Sysfs,
    /// `/proc/net/dev`.
    ProcNetDev,
}

pub struct InterfacesCollector {
    proc: Root,
    sys: Root,
    filter: InterfacesProbeConfig,
    starts: StartTimes,
    /// Interface index by name, from sysfs, to detect re-creation.
    ifindex: BTreeMap<String, u64>,
    last_source: Option<IfSource>,
}

impl InterfacesCollector {
    pub fn new(proc: Root, sys: Root, boot: SystemTime, filter: InterfacesProbeConfig) -> Self {
        Self {
            proc,
            sys,
            filter,
            // Counters count from the device's creation; for the interfaces
            // present at start-up boot time is the known lower bound.
            starts: StartTimes::new(boot),
            ifindex: BTreeMap::new(),
            last_source: None,
        }
    }

    /// The source of the last collection.
    pub fn last_source(&self) -> Option<IfSource> {
        self.last_source
    }

    /// Reads the interfaces that pass the filter, with their index where
    /// known. `Ok(None)` when `/sys/class/net` does not exist.
    fn read_sysfs(&self) -> Result<Option<Vec<IfRow>>, ProcError> {
        let dir = self.sys.path(CLASS_NET);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ProcError::Io {
                    path: dir.display().to_string(),
                    source: e,
                })
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| ProcError::Io {
                path: dir.display().to_string(),
                source: e,
            })?;
            // A name that is not UTF-8 is kept, escaped as /proc/net/dev's
            // reader escapes it; the path is opened by its bytes.
            let name = crate::sources::name_from_os(&entry.file_name());
            if !self.filter.matches(&name) {
                continue;
            }
            // Only directories (through their symlink) are interfaces:
            // `bonding_masters` is a plain file.
            match std::fs::metadata(entry.path()) {
                Ok(m) if m.is_dir() => names.push((name, entry.path())),
                _ => continue,
            }
        }
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for (name, path) in names {
            let index = read_small(&path.join("ifindex"))
                .ok()
                .flatten()
                .and_then(|t| t.trim().parse::<u64>().ok());
            if let Some(stats) = read_interface_dir(&path)? {
                out.push((name, index, stats));
            }
        }
        Ok(Some(out))
    }

    fn read(&mut self) -> Result<Vec<IfRow>, ProcError> {
        if let Some(v) = self.read_sysfs()? {
            self.last_source = Some(IfSource::Sysfs);
            return Ok(v);
        }
        let all = parse_net_dev(&self.proc.read("net/dev")?)?;
        self.last_source = Some(IfSource::ProcNetDev);
        Ok(all
            .into_iter()
            .filter(|(n, _)| self.filter.matches(n))
            .map(|(n, s)| (n, None, s))
            .collect())
    }
}

impl Collector for InterfacesCollector {
    fn name(&self) -> &'static str {
        "interfaces"
    }

    fn collect(&mut self, now: SystemTime, out: &mut Vec<Metric>) -> Result<(), CollectError> {
        let ifs = self.read()?;
        let present: BTreeSet<String> = ifs.iter().map(|(n, _, _)| n.clone()).collect();
        // Re-created (new index) or vanished interfaces: forget their series.
        let mut stale: BTreeSet<String> = self
            .ifindex
            .keys()
            .filter(|n| !present.contains(*n))
            .cloned()
            .collect();
        for (name, index, _) in &ifs {
            if let Some(index) = index {
                if let Some(old) = self.ifindex.insert(name.clone(), *index) {
                    if old != *index {
                        stale.insert(name.clone());
                    }
                }
            }
        }
        self.ifindex.retain(|n, _| present.contains(n));
        self.starts.retain(|_, attrs| match interface_of(attrs) {
            Some(n) => present.contains(n) && !stale.contains(n),
            None => true,
        });
        for (name, unit, description, rx, tx) in METRICS {
            let mut points = Vec::with_capacity(ifs.len() * 2);
            for (ifname, _, stats) in &ifs {
                for (direction, value) in [("receive", rx(stats)), ("transmit", tx(stats))] {
                    let attributes: Attributes = vec![
                        (ATTR_INTERFACE, ifname.as_str().into()),
                        (ATTR_DIRECTION, direction.into()),
                    ];
                    let start = self.starts.observe(name, &attributes, value as f64, now);
                    points.push(NumberPoint {
                        attributes,
                        start_time: Some(start),
                        time: now,
                        value: Number::Int(i64::try_from(value).unwrap_or(i64::MAX)),
                    });
                }
            }
            out.push(Metric {
                name,
                description,
                unit,
                data: Data::Sum {
                    monotonic: true,
                    points,
                },
            });
        }
        self.starts.end_collection(now);
        Ok(())
    }
}

fn interface_of(attrs: &Attributes) -> Option<&str> {
    attrs.iter().find_map(|(k, v)| match (k, v) {
        (&ATTR_INTERFACE, AttrValue::Str(s)) => Some(s.as_str()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::Path;
    use std::time::Duration;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    const FILES: [&str; 8] = [
        "rx_bytes",
        "rx_packets",
        "rx_errors",
        "rx_dropped",
        "tx_bytes",
        "tx_packets",
        "tx_errors",
        "tx_dropped",
    ];

    fn write_if(root: &Path, name: &str, index: u64, v: [u64; 8]) {
        let dir = root.join(CLASS_NET).join(name);
        fs::create_dir_all(dir.join("statistics")).unwrap();
        fs::write(dir.join("ifindex"), format!("{index}\n")).unwrap();
        for (f, x) in FILES.iter().zip(v) {
            fs::write(dir.join("statistics").join(f), format!("{x}\n")).unwrap();
        }
    }

    fn filter(include: &[&str], exclude: &[&str]) -> InterfacesProbeConfig {
        InterfacesProbeConfig {
            include: include.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            ..InterfacesProbeConfig::default()
        }
    }

    /// (metric, interface, direction) -> (value, start).
    fn index(out: &[Metric]) -> BTreeMap<(String, String, String), (i64, SystemTime)> {
        let mut m = BTreeMap::new();
        for metric in out {
            let Data::Sum { monotonic, points } = &metric.data else {
                panic!("{} is not a sum", metric.name);
            };
            assert!(monotonic, "{}", metric.name);
            for p in points {
                let attr = |k: &str| {
                    p.attributes
                        .iter()
                        .find(|(n, _)| *n == k)
                        .map(|(_, v)| v.to_string())
                        .unwrap()
                };
                let Number::Int(v) = p.value else {
                    panic!("not an integer")
                };
                m.insert(
                    (
                        metric.name.to_owned(),
                        attr(ATTR_INTERFACE),
                        attr(ATTR_DIRECTION),
                    ),
                    (v, p.start_time.unwrap()),
                );
            }
        }
        m
    }

    fn key(m: &str, i: &str, d: &str) -> (String, String, String) {
        (m.to_owned(), i.to_owned(), d.to_owned())
    }

    #[test]
    fn sysfs_values_filter_and_recreation() {
        let tmp = tempfile::tempdir().unwrap();
        write_if(tmp.path(), "eth0", 2, [1000, 10, 1, 2, 500, 5, 3, 4]);
        write_if(tmp.path(), "veth7", 9, [1, 1, 1, 1, 1, 1, 1, 1]);
        write_if(tmp.path(), "lo", 1, [7, 7, 0, 0, 7, 7, 0, 0]);
        fs::write(tmp.path().join("class/net/bonding_masters"), "\n").unwrap();
        let mut c = InterfacesCollector::new(
            Root::new("/nonexistent"),
            Root::new(tmp.path()),
            t(100),
            filter(&["*"], &["veth*"]),
        );
        let mut out = Vec::new();
        c.collect(t(200), &mut out).unwrap();
        assert_eq!(c.last_source(), Some(IfSource::Sysfs));
        let got = index(&out);
        let cases = [
            (crate::catalogue::NETWORK_IO, "eth0", "receive", 1000),
            (crate::catalogue::NETWORK_IO, "eth0", "transmit", 500),
            (crate::catalogue::NETWORK_PACKETS, "eth0", "receive", 10),
            (crate::catalogue::NETWORK_PACKETS, "eth0", "transmit", 5),
            (crate::catalogue::NETWORK_ERRORS, "eth0", "receive", 1),
            (crate::catalogue::NETWORK_ERRORS, "eth0", "transmit", 3),
            (crate::catalogue::NETWORK_DROPPED, "eth0", "receive", 2),
            (crate::catalogue::NETWORK_DROPPED, "eth0", "transmit", 4),
            (crate::catalogue::NETWORK_IO, "lo", "transmit", 7),
        ];
        for (m, i, d, v) in cases {
            assert_eq!(got.get(&key(m, i, d)), Some(&(v, t(100))), "{m} {i} {d}");
        }
        // 4 metrics x 2 interfaces x 2 directions: veth7 and bonding_masters are out.
        assert_eq!(got.len(), 16, "{got:?}");
        assert!(!got.keys().any(|(_, i, _)| i == "veth7"));

        // eth0 re-created (new index) with larger counters; lo unchanged.
        fs::remove_dir_all(tmp.path().join("class/net/eth0")).unwrap();
        write_if(tmp.path(), "eth0", 12, [2000, 20, 2, 3, 900, 9, 3, 4]);
        let mut out = Vec::new();
        c.collect(t(210), &mut out).unwrap();
        let got = index(&out);
        assert_eq!(
            got[&key(crate::catalogue::NETWORK_IO, "eth0", "receive")],
            (2000, t(200)),
            "a new index means a new start time even though the counter grew"
        );
        assert_eq!(
            got[&key(crate::catalogue::NETWORK_IO, "lo", "receive")],
            (7, t(100))
        );

        // lo vanishes, then comes back: a fresh start time.
        fs::remove_dir_all(tmp.path().join("class/net/lo")).unwrap();
        let mut out = Vec::new();
        c.collect(t(220), &mut out).unwrap();
        assert_eq!(index(&out).len(), 8);
        write_if(tmp.path(), "lo", 1, [8, 8, 0, 0, 8, 8, 0, 0]);
        let mut out = Vec::new();
        c.collect(t(230), &mut out).unwrap();
        let got = index(&out);
        assert_eq!(
            got[&key(crate::catalogue::NETWORK_IO, "lo", "receive")],
            (8, t(220))
        );
        assert_eq!(
            got[&key(crate::catalogue::NETWORK_IO, "eth0", "receive")],
            (2000, t(200))
        );
    }

    #[test]
    fn falls_back_to_proc_net_dev_without_sysfs() {
        let tmp = tempfile::tempdir().unwrap();
        let proc = tmp.path().join("proc");
        fs::create_dir_all(proc.join("net")).unwrap();
        let dev = "Inter-|   Receive                                                |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
            lo:    9127     127    0    0    0     0          0         0     9127     127    0    0    0     0       0          0\n  \
            eth0: 456919637   13934    1    5    0     0          0         0   754200    8097    2    6    0     0       0          0\n";
        fs::write(proc.join("net/dev"), dev).unwrap();
        let mut c = InterfacesCollector::new(
            Root::new(&proc),
            Root::new(tmp.path().join("nosys")),
            t(100),
            filter(&["eth*"], &[]),
        );
        let mut out = Vec::new();
        c.collect(t(200), &mut out).unwrap();
        assert_eq!(c.last_source(), Some(IfSource::ProcNetDev));
        let got = index(&out);
        assert_eq!(got.len(), 8, "lo is not included: {got:?}");
        let cases = [
            (crate::catalogue::NETWORK_IO, "receive", 456919637),
            (crate::catalogue::NETWORK_IO, "transmit", 754200),
            (crate::catalogue::NETWORK_PACKETS, "receive", 13934),
            (crate::catalogue::NETWORK_ERRORS, "transmit", 2),
            (crate::catalogue::NETWORK_DROPPED, "receive", 5),
            (crate::catalogue::NETWORK_DROPPED, "transmit", 6),
        ];
        for (m, d, v) in cases {
            assert_eq!(got[&key(m, "eth0", d)], (v, t(100)), "{m} {d}");
        }
        // A counter going down (re-created under the same name) is a reset.
        let dev2 = dev.replace("456919637", "100");
        fs::write(proc.join("net/dev"), dev2).unwrap();
        let mut out = Vec::new();
        c.collect(t(210), &mut out).unwrap();
        assert_eq!(
            index(&out)[&key(crate::catalogue::NETWORK_IO, "eth0", "receive")],
            (100, t(200))
        );
    }
}
