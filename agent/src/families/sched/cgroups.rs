//! Per-cgroup run-queue latency (`probes.sched.runqueue_per_cgroup`):
//! `perch.container.runqueue.latency`, one histogram per container, pod
//! cgroup or host cgroup, at scale 1, from what `sched_switch` fills: each
//! cgroup's slot of the per-CPU `SCHED_CGROUP_FRONT` array, and for a cgroup
//! whose slot another live cgroup holds on that CPU, the sparse
//! `SCHED_CGROUP_RUNQ` hash keyed by (cgroup v2 id, bucket).
//!
//! Each collection reads the maps, then resolves their ids ([`CgroupIds`]:
//! a walk of the cgroup2 mount when one is new, else a `stat` of each), so
//! an id not found is a cgroup that is gone (or past the walk's bounds). Such a cgroup's counts are read one last
//! time and added to its series as that series' removed part; its hash
//! entries are deleted, and its front slots listed in `SCHED_CGROUP_GONE`,
//! where the program finds them and takes them over for the next cgroup
//! that maps there (userspace cannot write one CPU's copy of a per-CPU slot
//! without racing the others; an id leaves the list once no CPU holds it).
//! So the maps hold live cgroups only, and a cgroup nested in a
//! container, or a service folded into its slice, that goes away does not
//! make its series go backwards. A series whose cgroups are all gone gets
//! one final point and is forgotten. Waits of cgroups that lived and died
//! between two walks, never seen by name, go to the `unattributed` series
//! (`perch.cgroup = "unattributed"`). Waits that did not fit the map are
//! in the overflow series (`otel.metric.overflow`), counted in
//! `perch.bpf.map.insert_failures`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::SystemTime;

use agent_common::sched::{self as c, CgroupFront, CgroupSlot, CgroupWait};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap};

use crate::collectors::{read_slot, CollectError};
use crate::families::containers::{attributes, cgroup_path::Attribution, ids::CgroupIds};
use crate::model::{Buckets, Exponential, HistogramPoint, Metric, NumberPoint, StartTimes};

const NAME: &str = crate::catalogue::CONTAINER_RUNQUEUE_LATENCY;
/// `perch.cgroup` of the waits of cgroups never seen by the walk.
pub const UNATTRIBUTED: &str = "unattributed";

/// Counts by [`c::cgroup_bucket`], and their sum (ns).
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
        let count: u64 = self.slots.values().sum();
        let zeros = self.slots.get(&0).copied().unwrap_or(0);
        let buckets = self
            .slots
            .iter()
            .filter(|(b, _)| **b > 0)
            .map(|(b, n)| (c::cgroup_bucket_index(*b), *n));
        HistogramPoint {
            start_time: starts.observe(NAME, &attributes, count as f64, now),
            attributes,
            time: now,
            count,
            sum: self.sum_ns as f64 / 1e9,
            buckets: Buckets::Exponential(Exponential::from_sparse_at(
                c::CGROUP_SCALE,
                zeros,
                buckets,
            )),
        }
    }
}

/// A series: its attribution and the waits of its cgroups already gone.
struct Series {
    attribution: Attribution,
    removed: Waits,
}

/// The kernel maps the per-cgroup histograms live in.
pub struct Maps {
    pub front: PerCpuArray<MapData, CgroupFront>,
    pub map: PerCpuHashMap<MapData, CgroupSlot, CgroupWait>,
    pub gone_map: BpfHashMap<MapData, u64, u8>,
    pub overflow: PerCpuArray<MapData, u64>,
}

pub struct CgroupRunq {
    front: PerCpuArray<MapData, CgroupFront>,
    map: PerCpuHashMap<MapData, CgroupSlot, CgroupWait>,
    gone_map: BpfHashMap<MapData, u64, u8>,
    /// Removed cgroups whose front slots were read for the last time (their
    /// counts are in their series): skipped from then on, until no CPU's
    /// slot holds them. `true` once listed in `gone_map` (a full map is
    /// retried each collection).
    gone: HashMap<u64, bool>,
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
    /// Front slots (over every CPU) holding a live cgroup.
    pub front: u64,
    pub front_capacity: u32,
    pub gone: u64,
}

impl CgroupRunq {
    pub fn new(maps: Maps, capacity: u32, ids: CgroupIds, attached_at: SystemTime) -> Self {
        let Maps {
            front,
            map,
            gone_map,
            overflow,
        } = maps;
        Self {
            front,
            map,
            gone_map,
            gone: HashMap::new(),
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
        let mut in_front: HashMap<u64, u64> = HashMap::new();
        let mut still_gone = HashSet::new();
        let cpus = crate::collectors::online_cpus().len();
        for n in 0..c::CGROUP_FRONT_SLOTS {
            let values = self
                .front
                .get(&n, 0)
                .map_err(|e| CollectError::map(c::MAP_CGROUP_FRONT, e))?;
            for v in values.iter().filter(|v| v.id != 0) {
                if self.gone.contains_key(&v.id) {
                    still_gone.insert(v.id);
                    continue;
                }
                *in_front.entry(v.id).or_default() += 1;
                let w = &mut by_id.entry(v.id).or_default().0;
                for (b, n) in v.counts.iter().enumerate().filter(|(_, n)| **n > 0) {
                    *w.slots.entry(b as u32).or_default() += n;
                }
                w.sum_ns += v.sum_ns;
            }
        }
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
        let removed: HashMap<u64, Attribution> = self
            .ids
            .resolve(by_id.keys().copied())
            .into_iter()
            .collect();

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
        // Ids no CPU's slot holds any more leave the list.
        self.gone.retain(|id, listed| {
            let keep = still_gone.contains(id);
            if !keep && *listed {
                let _ = self.gone_map.remove(id);
            }
            keep
        });
        // Gone cgroups' front slots: skipped from now on, and listed for the
        // program to take over.
        let mut front_live = 0u64;
        for (id, copies) in in_front {
            if self.ids.get(id).is_some() {
                front_live += copies;
            } else {
                self.gone.insert(id, false);
            }
        }
        let mut unlisted = 0usize;
        for (id, listed) in self.gone.iter_mut().filter(|(_, l)| !**l) {
            *listed = self.gone_map.insert(*id, 0, 0).is_ok();
            unlisted += usize::from(!*listed);
        }
        if unlisted > 0 {
            tracing::warn!(
                map = c::MAP_CGROUP_GONE,
                slots = unlisted,
                "sched: removed cgroups' run-queue slots not released (map full); retrying"
            );
        }

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
        for s in 0..c::CGROUP_BUCKETS as u32 {
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
            front: front_live,
            front_capacity: c::CGROUP_FRONT_SLOTS * cpus as u32,
            gone: self.gone.len() as u64,
        })
    }
}

/// The self-metric points of the maps, for the collector's shared metrics:
/// the insert failures, and the entries of each map.
pub fn map_points(
    f: &MapFigures,
    attached_at: SystemTime,
    now: SystemTime,
) -> (NumberPoint, Vec<NumberPoint>) {
    (
        crate::collectors::map_insert_failure_point(
            c::MAP_CGROUP_RUNQ,
            f.insert_failures,
            attached_at,
            now,
        ),
        vec![
            crate::collectors::map_entries_point(c::MAP_CGROUP_RUNQ, f.entries, f.capacity, now),
            crate::collectors::map_entries_point(
                c::MAP_CGROUP_FRONT,
                f.front,
                f.front_capacity,
                now,
            ),
            crate::collectors::map_entries_point(
                c::MAP_CGROUP_GONE,
                f.gone,
                c::CGROUP_GONE_ENTRIES,
                now,
            ),
        ],
    )
}
