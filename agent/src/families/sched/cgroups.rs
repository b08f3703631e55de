//! Per-cgroup run-queue latency (`probes.sched.runqueue_per_cgroup`):
//! `perch.container.runqueue.latency`, one histogram per container, pod
//! cgroup or host cgroup, from the sparse `SCHED_CGROUP_RUNQ` map that
//! `sched_switch` fills keyed by (cgroup v2 id, bucket).
//!
//! Each collection reads the map, then walks the cgroup2 mount
//! ([`CgroupIds`]), so an id the walk does not find is a cgroup that is gone
//! (or past the walk's bounds). Such a cgroup's entries are read one last
//! time, added to its series as that series' removed part, and deleted from
//! the map: the map holds live cgroups only, and a cgroup nested in a
//! container, or a service folded into its slice, that goes away does not
//! make its series go backwards. A series whose cgroups are all gone gets
//! one final point and is forgotten. Waits of cgroups that lived and died
//! between two walks, never seen by name, go to the `unattributed` series
//! (`perch.cgroup = "unattributed"`). Waits that did not fit the map are
//! in the overflow series (`otel.metric.overflow`), counted in
//! `perch.bpf.map.insert_failures`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::SystemTime;

use agent_common::{
    exp,
    sched::{self as c, CgroupSlot, CgroupWait},
};
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};

use crate::collectors::{read_slot, CollectError};
use crate::families::containers::{attributes, cgroup_path::Attribution, ids::CgroupIds};
use crate::model::{Buckets, Exponential, HistogramPoint, Metric, NumberPoint, StartTimes};

const NAME: &str = crate::catalogue::CONTAINER_RUNQUEUE_LATENCY;
/// `perch.cgroup` of the waits of cgroups never seen by the walk.
pub const UNATTRIBUTED: &str = "unattributed";

/// Bucket counts by map slot, and their sum (ns).
#[derive(Debug, Default, Clone)]
struct Waits {
    slots: BTreeMap<u32, u64>,
    sum_ns: u64,
}

impl Waits {
    fn add(&mut self, o: &Waits) {
        for (s, n) in &o.slots {
            *self.slots.entry(*s).or_default() += n;
        }
        self.sum_ns += o.sum_ns;
    }

    fn point(
        &self,
        starts: &mut StartTimes,
        attributes: crate::model::Attributes,
        now: SystemTime,
    ) -> HistogramPoint {
        let mut dense = vec![0u64; exp::SLOTS as usize];
        for (s, n) in &self.slots {
            if let Some(d) = dense.get_mut(*s as usize) {
                *d += n;
            }
        }
        let count: u64 = dense.iter().sum();
        HistogramPoint {
            start_time: starts.observe(NAME, &attributes, count as f64, now),
            attributes,
            time: now,
            count,
            sum: self.sum_ns as f64 / 1e9,
            buckets: Buckets::Exponential(Exponential::from_slots(&dense)),
        }
    }
}

/// A series: its attribution and the waits of its cgroups already gone.
struct Series {
    attribution: Attribution,
    removed: Waits,
}

pub struct CgroupRunq {
    map: PerCpuHashMap<MapData, CgroupSlot, CgroupWait>,
    overflow: PerCpuArray<MapData, u64>,
    capacity: u32,
    ids: CgroupIds,
    /// By `perch.cgroup`: series with a removed part.
    series: HashMap<String, Series>,
    unattributed: Waits,
    starts: StartTimes,
}

/// What one collection adds to the shared self-metrics.
pub struct MapFigures {
    pub entries: u64,
    pub capacity: u32,
    pub insert_failures: u64,
}

impl CgroupRunq {
    pub fn new(
        map: PerCpuHashMap<MapData, CgroupSlot, CgroupWait>,
        overflow: PerCpuArray<MapData, u64>,
        capacity: u32,
        ids: CgroupIds,
        attached_at: SystemTime,
    ) -> Self {
        Self {
            map,
            overflow,
            capacity,
            ids,
            series: HashMap::new(),
            unattributed: Waits::default(),
            starts: StartTimes::new(attached_at),
        }
    }

    pub fn collect(
        &mut self,
        counters: &PerCpuArray<MapData, u64>,
        now: SystemTime,
        out: &mut Vec<Metric>,
    ) -> Result<MapFigures, CollectError> {
        // Read first, walk second: an id the walk then misses is gone.
        let mut by_id: HashMap<u64, (Waits, Vec<CgroupSlot>)> = HashMap::new();
        let mut entries = 0u64;
        for item in self.map.iter() {
            let (key, values) = item.map_err(|e| CollectError::map(c::MAP_CGROUP_RUNQ, e))?;
            entries += 1;
            let (count, sum) = values
                .iter()
                .fold((0u64, 0u64), |(n, s), v| (n + v.count, s + v.sum_ns));
            let e = by_id.entry(key.cgroup).or_default();
            *e.0.slots.entry(key.slot).or_default() += count;
            e.0.sum_ns += sum;
            e.1.push(key);
        }
        let removed: HashMap<u64, Attribution> = self.ids.refresh().into_iter().collect();

        let mut live: BTreeMap<String, (Attribution, Waits)> = BTreeMap::new();
        let mut dead_keys = Vec::new();
        for (id, (waits, keys)) in by_id {
            if let Some(a) = self.ids.get(id) {
                let e = live
                    .entry(a.cgroup.clone())
                    .or_insert_with(|| (a.clone(), Waits::default()));
                e.1.add(&waits);
                continue;
            }
            // Gone: its waits become its series' removed part.
            match removed.get(&id) {
                Some(a) => self
                    .series
                    .entry(a.cgroup.clone())
                    .or_insert_with(|| Series {
                        attribution: a.clone(),
                        removed: Waits::default(),
                    })
                    .removed
                    .add(&waits),
                None => self.unattributed.add(&waits),
            }
            dead_keys.extend(keys);
        }
        for key in &dead_keys {
            // Already gone (a race with nothing) is fine.
            let _ = self.map.remove(key);
        }
        entries = entries.saturating_sub(dead_keys.len() as u64);

        // Series still backed by a live cgroup.
        let alive: HashSet<&str> = self.ids.cgroups().collect();
        let mut points = Vec::with_capacity(live.len() + self.series.len() + 2);
        for (cgroup, (a, waits)) in &mut live {
            if let Some(s) = self.series.get(cgroup) {
                waits.add(&s.removed);
            }
            points.push(waits.point(&mut self.starts, attributes(a), now));
        }
        // Removed parts with no live entry this time: the series' final
        // point when none of its cgroups is left, else its running total.
        let mut ended = Vec::new();
        for (cgroup, s) in &self.series {
            if !live.contains_key(cgroup) {
                points.push(
                    s.removed
                        .point(&mut self.starts, attributes(&s.attribution), now),
                );
            }
            if !alive.contains(cgroup.as_str()) {
                ended.push(cgroup.clone());
            }
        }
        for cgroup in ended {
            self.series.remove(&cgroup);
        }
        if !self.unattributed.slots.is_empty() {
            let attrs = vec![("perch.cgroup", UNATTRIBUTED.into())];
            points.push(self.unattributed.point(&mut self.starts, attrs, now));
        }
        let mut ovf = Waits::default();
        for s in 0..exp::SLOTS {
            let n: u64 = read_slot(&self.overflow, s, c::MAP_CGROUP_OVF)?
                .iter()
                .sum();
            if n > 0 {
                ovf.slots.insert(s, n);
            }
        }
        let insert_failures: u64 = read_slot(counters, c::SLOT_CGROUP_FULL, c::MAP_COUNTERS)?
            .iter()
            .sum();
        if !ovf.slots.is_empty() {
            ovf.sum_ns = read_slot(counters, c::SLOT_CGROUP_OVF_SUM_NS, c::MAP_COUNTERS)?
                .iter()
                .sum();
            let attrs = crate::pipeline::cardinality::overflow_attributes();
            points.push(ovf.point(&mut self.starts, attrs, now));
        }
        self.starts.end_collection(now);
        out.push(Metric::histogram(
            NAME,
            "Time tasks spent runnable on a run queue before running, by the cgroup \
             (container, pod or host cgroup) of the task that waited.",
            "s",
            points,
        ));
        Ok(MapFigures {
            entries,
            capacity: self.capacity,
            insert_failures,
        })
    }
}

/// The self-metric points of the map, for the collector's shared metrics.
pub fn map_points(
    f: &MapFigures,
    attached_at: SystemTime,
    now: SystemTime,
) -> (NumberPoint, NumberPoint) {
    (
        crate::collectors::map_insert_failure_point(
            c::MAP_CGROUP_RUNQ,
            f.insert_failures,
            attached_at,
            now,
        ),
        crate::collectors::map_entries_point(c::MAP_CGROUP_RUNQ, f.entries, f.capacity, now),
    )
}
