//! The userspace side of the TCP family's bounded per-peer map: idle
//! entries are evicted into a base table so the kernel map keeps room, and
//! the exported totals never go down; plus how a peer key is exported.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use agent_common::tcp as c;

/// The overflow peer: bytes of peers that did not fit the kernel map.
pub const OVERFLOW_PEER: &str = crate::catalogue::OTHER_PEER;

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

    /// Drops every key `pred` selects, whatever its state: their series
    /// end. Returns the dropped keys that still have a kernel entry (the
    /// caller deletes those).
    pub fn drop_where(&mut self, mut pred: impl FnMut(&K) -> bool) -> Vec<K> {
        let mut in_kernel = Vec::new();
        self.entries.retain(|k, t| {
            if !pred(k) {
                return true;
            }
            if t.kernel.is_some() {
                in_kernel.push(*k);
            }
            false
        });
        in_kernel
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

/// A peer as exported: address text, server port, role name, and the
/// `perch.cgroup` of its sockets with `probes.tcp.per_cgroup` ("" without;
/// see [`super::cgroups`]).
pub type Peer = (String, u16, &'static str, String);

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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(addr: [u8; 16], family: u8, role: u8) -> c::PeerKey {
        c::PeerKey {
            addr,
            server_port: 443,
            family,
            role,
            cgroup: [0; 2],
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

    #[test]
    fn drop_where_ends_keys_whatever_their_state() {
        let t0 = SystemTime::UNIX_EPOCH;
        let mut t: PeerTable<u32, u64> = PeerTable::new(2, Duration::from_secs(60));
        t.observe([(1, 10), (2, 20), (3, 30)], t0);
        // Key 3 leaves the kernel map; its total stays in the base table.
        t.observe([(1, 11), (2, 20)], t0);
        let mut in_kernel = t.drop_where(|k| *k != 2);
        in_kernel.sort();
        assert_eq!(in_kernel, vec![1], "1 was in the kernel, 3 no longer");
        let left: Vec<(u32, u64)> = t.totals().map(|(k, v)| (*k, v)).collect();
        assert_eq!(left, vec![(2, 20)]);
        assert_eq!(t.forgotten(), 0, "dropping is not forgetting an idle peer");
    }
}
