//! The live half of the TCP family's socket-counter design (`tp_btf`
//! variant, kernel side `agent-ebpf/src/tcp/sockets.rs`).
//!
//! Closed sockets are folded into `TCP_PEERS` by the kernel; live ones are
//! reported by the `tcp_walk` iterator, which this module runs once per
//! collection and parses. A peer's total is what `TCP_PEERS` holds for it
//! plus the live contributions of its open sockets.
//!
//! `TCP_PEERS` is read before the walk runs, and a closing socket is marked
//! closed before its counters are folded, so no socket is counted twice; a
//! socket that closes between the read and the walk is in neither for one
//! collection. [`Floor`] keeps the exported totals from dipping then.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use agent_common::tcp::{LiveRecord, PeerKey, PeerValue};

use crate::probes::iter::IterLink;

use crate::collectors::CollectError;

use super::peers::Counters;

/// The walk's program, as named in the family's rule.
pub const PROGRAM: &str = "tcp_walk";

/// Collections a series may miss before [`Floor`] lets it end: the close
/// race above makes one miss at most; the rest is margin. A series missing
/// for longer has really ended (its peer was forgotten).
pub const CARRY_COLLECTIONS: u32 = 3;

/// The linked walk and its read buffer (kept between collections).
#[derive(Debug)]
pub struct Walk {
    link: IterLink,
    buf: Vec<u8>,
}

impl Walk {
    pub fn new(link: IterLink) -> Self {
        Walk {
            link,
            buf: Vec::new(),
        }
    }

    /// Runs the walk: the live contribution of every tracked open socket.
    pub fn run(&mut self) -> Result<Vec<LiveRecord>, CollectError> {
        self.buf.clear();
        let err = |message: String| CollectError::Iter {
            program: PROGRAM,
            message,
        };
        self.link
            .run(&mut self.buf)
            .map_err(|e| err(e.to_string()))?;
        parse(&self.buf).map_err(err)
    }
}

/// Parses the walk's output: whole [`LiveRecord`]s, nothing else.
pub fn parse(buf: &[u8]) -> Result<Vec<LiveRecord>, String> {
    const N: usize = std::mem::size_of::<LiveRecord>();
    if buf.len() % N != 0 {
        return Err(format!(
            "{} bytes of output is not a whole number of {N}-byte records",
            buf.len()
        ));
    }
    Ok(buf
        .chunks_exact(N)
        .map(|c| {
            // SAFETY: `c` is exactly one record's bytes, written by the
            // kernel side from the same `repr(C)` type; any bit pattern is
            // a valid `LiveRecord` (integers only).
            unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<LiveRecord>()) }
        })
        .collect())
}

/// Sums live records by key.
pub fn by_key(records: &[LiveRecord]) -> HashMap<PeerKey, PeerValue> {
    let mut out: HashMap<PeerKey, PeerValue> = HashMap::new();
    for r in records {
        out.entry(r.key).or_default().add(&r.value);
    }
    out
}

/// Keeps cumulative per-series totals from going down, and carries a series
/// that is briefly absent (see the module docs) at its last value.
#[derive(Debug)]
pub struct Floor<K> {
    last: HashMap<K, (PeerValue, u32)>,
}

impl<K> Default for Floor<K> {
    fn default() -> Self {
        Floor {
            last: HashMap::new(),
        }
    }
}

impl<K: Clone + Eq + Hash + Ord> Floor<K> {
    /// Raises each of `totals` to at least its last value, adds the series
    /// missing for fewer than [`CARRY_COLLECTIONS`] collections, and
    /// remembers the result.
    pub fn apply(&mut self, totals: &mut BTreeMap<K, PeerValue>) {
        for (k, v) in totals.iter_mut() {
            if let Some((prev, _)) = self.last.get(k) {
                v.tx_bytes = v.tx_bytes.max(prev.tx_bytes);
                v.rx_bytes = v.rx_bytes.max(prev.rx_bytes);
                v.retrans_segs = v.retrans_segs.max(prev.retrans_segs);
            }
        }
        let mut carried = Vec::new();
        self.last.retain(|k, (prev, missing)| {
            if totals.contains_key(k) {
                *missing = 0;
                return true;
            }
            *missing += 1;
            if *missing >= CARRY_COLLECTIONS {
                return false;
            }
            carried.push((k.clone(), *prev));
            true
        });
        for (k, v) in totals.iter() {
            self.last
                .entry(k.clone())
                .and_modify(|e| e.0 = *v)
                .or_insert((*v, 0));
        }
        totals.extend(carried);
    }

    /// Forgets the series `pred` selects: ended on purpose, not carried.
    pub fn forget(&mut self, mut pred: impl FnMut(&K) -> bool) {
        self.last.retain(|k, _| !pred(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(tx: u64, rx: u64, re: u64) -> PeerValue {
        PeerValue {
            tx_bytes: tx,
            rx_bytes: rx,
            retrans_segs: re,
        }
    }

    fn rec(port: u16, value: PeerValue) -> LiveRecord {
        LiveRecord {
            key: PeerKey {
                addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                server_port: port,
                family: 4,
                role: 0,
                cgroup: [0; 2],
            },
            _pad: 0,
            value,
        }
    }

    fn bytes(records: &[LiveRecord]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            // SAFETY: a repr(C) struct of integers viewed as its bytes.
            let b = unsafe {
                std::slice::from_raw_parts(
                    std::ptr::from_ref(r).cast::<u8>(),
                    std::mem::size_of::<LiveRecord>(),
                )
            };
            out.extend_from_slice(b);
        }
        out
    }

    #[test]
    fn parses_whole_records_and_sums_by_key() {
        let records = [
            rec(443, v(1, 2, 3)),
            rec(80, v(5, 0, 0)),
            rec(443, v(10, 20, 30)),
        ];
        let parsed = parse(&bytes(&records)).expect("parse");
        assert_eq!(parsed, records);
        let sums = by_key(&parsed);
        assert_eq!(sums.len(), 2);
        assert_eq!(sums[&records[0].key], v(11, 22, 33));
        assert_eq!(sums[&records[1].key], v(5, 0, 0));
        assert!(parse(&[]).expect("empty").is_empty());
    }

    #[test]
    fn refuses_a_partial_record() {
        let mut b = bytes(&[rec(443, v(1, 2, 3))]);
        b.pop();
        let e = parse(&b).expect_err("partial");
        assert!(e.contains("55 bytes"), "{e}");
    }

    #[test]
    fn floor_never_goes_down_and_carries_briefly() {
        let mut f: Floor<&str> = Floor::default();
        let mut t = BTreeMap::from([("a", v(10, 10, 1)), ("b", v(5, 0, 0))]);
        f.apply(&mut t);
        assert_eq!(t["a"], v(10, 10, 1));
        // A socket of `a` closed between the map read and the walk: its
        // bytes are in neither, `a` dips; `b` is missing altogether.
        let mut t = BTreeMap::from([("a", v(4, 12, 1))]);
        f.apply(&mut t);
        assert_eq!(
            t["a"],
            v(10, 12, 1),
            "held at its last value, field by field"
        );
        assert_eq!(t["b"], v(5, 0, 0), "carried");
        // Back with more than before: the real value shows.
        let mut t = BTreeMap::from([("a", v(30, 12, 2)), ("b", v(6, 0, 0))]);
        f.apply(&mut t);
        assert_eq!((t["a"], t["b"]), (v(30, 12, 2), v(6, 0, 0)));
        // Gone for good: carried CARRY_COLLECTIONS - 1 times, then dropped.
        for i in 1..=CARRY_COLLECTIONS {
            let mut t = BTreeMap::from([("a", v(30, 12, 2))]);
            f.apply(&mut t);
            assert_eq!(t.contains_key("b"), i < CARRY_COLLECTIONS, "collection {i}");
        }
    }
}
