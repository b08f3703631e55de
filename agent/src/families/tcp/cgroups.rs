//! `probes.tcp.per_cgroup`: the socket cgroup of `perch.tcp.io`,
//! `perch.tcp.retransmits` and the connection counters, as `container.id`,
//! `k8s.pod.uid`, `perch.k8s.qos_class` and `perch.cgroup` (the same
//! attribution as the containers family's).
//!
//! The kernel keys peers and connection counts by the socket's cgroup v2
//! id (`sk->sk_cgrp_data`). Each collection the ids in the maps are
//! resolved ([`CgroupIds`]: a walk of the cgroup2 mount when one is new,
//! else a `stat` of each). Several cgroups may fold into one series (a
//! container's nested cgroups, the services of a slice at `host_depth` 1).
//!
//! A removed cgroup with no open socket left is dropped: the collector
//! moves its totals to its series' removed part (held in userspace, per
//! series, so a series never goes backwards), deletes its kernel entries
//! and forgets its id. Once no live cgroup has its series (`perch.cgroup`)
//! and no open socket is in one of them, that series gets its final point
//! and ends. Ids that no walk found (a cgroup that lived and died between
//! two walks, or one past the walk's bounds) are dropped the same way
//! into `perch.cgroup = "unattributed"`, a series that does not end; id 0
//! (no cgroup read) goes to the series without cgroup attributes.

use std::collections::{HashMap, HashSet};

use crate::families::containers::{attributes, cgroup_path::Attribution, ids::CgroupIds};
use crate::model::Attributes;

/// `perch.cgroup` of sockets whose cgroup was gone before a walk saw it.
pub const UNATTRIBUTED: &str = "unattributed";

/// What [`SocketCgroups::resolve`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Removed cgroups with no open socket: their totals move to their
    /// series' removed part, their keys and kernel entries go.
    pub drop: HashSet<u64>,
    /// Series (`perch.cgroup`) of those with no live cgroup left: they get
    /// their final point in this collection and end.
    pub ended: HashSet<String>,
}

pub struct SocketCgroups {
    ids: CgroupIds,
    /// Removed cgroups the agent still holds totals of.
    gone: HashMap<u64, Attribution>,
    /// Ids no walk found (see the module docs).
    unknown: HashSet<u64>,
    /// By `perch.cgroup`: the attribution of every label handed out.
    labels: HashMap<String, Attribution>,
}

impl SocketCgroups {
    pub fn new(ids: CgroupIds) -> Self {
        Self {
            ids,
            gone: HashMap::new(),
            unknown: HashSet::new(),
            labels: HashMap::new(),
        }
    }

    /// Makes the ids of this collection's keys current (`held`: every id
    /// the agent holds totals of; `open`: those with an open socket).
    pub fn resolve(&mut self, held: &HashSet<u64>, open: &HashSet<u64>) -> Resolved {
        // Forget what is no longer held.
        self.gone.retain(|id, _| held.contains(id));
        self.unknown.retain(|id| held.contains(id));
        let asked: Vec<u64> = held
            .iter()
            .copied()
            .filter(|id| *id != 0 && !self.gone.contains_key(id) && !self.unknown.contains(id))
            .collect();
        for (id, a) in self.ids.resolve(asked.iter().copied()) {
            self.gone.insert(id, a);
        }
        for id in asked {
            if self.ids.get(id).is_none() && !self.gone.contains_key(&id) {
                self.unknown.insert(id);
            }
        }
        // A series lives on while a cgroup of it lives, or a socket is
        // open in one of its removed cgroups.
        let mut alive: HashSet<&str> = self.ids.cgroups().collect();
        alive.extend(
            self.gone
                .iter()
                .filter(|(id, _)| open.contains(id))
                .map(|(_, a)| a.cgroup.as_str()),
        );
        let mut r = Resolved::default();
        for (id, a) in self.gone.iter().filter(|(id, _)| !open.contains(id)) {
            r.drop.insert(*id);
            if !alive.contains(a.cgroup.as_str()) {
                r.ended.insert(a.cgroup.clone());
            }
        }
        // Not found by a walk made since they appeared: gone too (or past
        // the walk's bounds); their totals stay in the unattributed series.
        r.drop
            .extend(self.unknown.iter().filter(|id| !open.contains(id)));
        r
    }

    /// The `perch.cgroup` series label of `id` ("" for 0).
    pub fn label(&mut self, id: u64) -> String {
        if id == 0 {
            return String::new();
        }
        let Some(a) = self.ids.get(id).or_else(|| self.gone.get(&id)) else {
            return UNATTRIBUTED.to_owned();
        };
        if !self.labels.contains_key(&a.cgroup) {
            self.labels.insert(a.cgroup.clone(), a.clone());
        }
        a.cgroup.clone()
    }

    /// Drops the labels no series uses (`used`).
    pub fn retain_labels(&mut self, used: &HashSet<&str>) {
        self.labels.retain(|l, _| used.contains(l.as_str()));
    }

    /// Cgroups known, as of the last walk.
    pub fn known(&self) -> usize {
        self.ids.len()
    }
}

/// The `perch.cgroup` series label of `id` where socket cgroups are on,
/// else "".
pub fn label_of(cgroups: Option<&mut SocketCgroups>, id: u64) -> String {
    cgroups.map_or_else(String::new, |cg| cg.label(id))
}

/// The attributes a series label stands for, given the labels'
/// attributions: none for "", `perch.cgroup` alone for
/// [`UNATTRIBUTED`].
pub fn label_attributes(labels: &SocketCgroups, label: &str) -> Attributes {
    if label.is_empty() {
        return Vec::new();
    }
    match labels.labels.get(label) {
        Some(a) => attributes(a),
        None => vec![("perch.cgroup", label.to_owned().into())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::containers::ids::testutil::{fake_cgroup2, ino, ID};

    /// A container's nested cgroup goes while the container lives: its
    /// series (the container's) goes on. The container goes: its ids end
    /// once no socket is open in them. An id never walked is unattributed.
    #[test]
    fn removed_cgroups_end_when_their_series_has_no_live_cgroup() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fake_cgroup2(root);
        let ctr = root.join(format!("system.slice/docker-{ID}.scope"));
        let nested = ctr.join("init");
        std::fs::create_dir_all(&nested).unwrap();
        let (ctr_id, nested_id) = (ino(&ctr), ino(&nested));
        let mut cg = SocketCgroups::new(CgroupIds::new(root.to_owned(), 1, 100));
        let held: HashSet<u64> = [0, ctr_id, nested_id, 999_999_999].into();
        let none = HashSet::new();
        let r = cg.resolve(&held, &none);
        assert_eq!(r.drop, [999_999_999].into(), "never walked: gone");
        assert!(r.ended.is_empty());
        let label = format!("/system.slice/docker-{ID}.scope");
        assert_eq!(
            cg.label(nested_id),
            label,
            "nested folds into its container"
        );
        assert_eq!(cg.label(ctr_id), label);
        assert_eq!(cg.label(0), "");
        assert_eq!(cg.label(999_999_999), UNATTRIBUTED);
        let attrs = label_attributes(&cg, &label);
        assert!(
            attrs
                .iter()
                .any(|(k, v)| *k == "container.id" && v.to_string() == ID),
            "{attrs:?}"
        );
        assert!(label_attributes(&cg, "").is_empty());

        std::fs::remove_dir(&nested).unwrap();
        let held: HashSet<u64> = [0, ctr_id, nested_id].into();
        let r = cg.resolve(&held, &none);
        assert_eq!(r.drop, [nested_id].into());
        assert!(
            r.ended.is_empty(),
            "the container lives: its series goes on"
        );
        assert_eq!(cg.label(nested_id), label, "a removed id keeps its label");

        std::fs::remove_dir(&ctr).unwrap();
        let open: HashSet<u64> = [ctr_id].into();
        let r = cg.resolve(&held, &open);
        assert_eq!(
            r.drop,
            [nested_id].into(),
            "a socket is still open in the container's own cgroup"
        );
        assert!(r.ended.is_empty(), "and keeps the series going");
        let r = cg.resolve(&held, &none);
        assert_eq!(r.drop, [ctr_id, nested_id].into());
        assert_eq!(r.ended, [label.clone()].into());
        let held: HashSet<u64> = [0].into();
        assert_eq!(
            cg.resolve(&held, &none),
            Resolved::default(),
            "no longer held: forgotten"
        );
        assert_eq!(cg.label(ctr_id), UNATTRIBUTED);
    }
}
