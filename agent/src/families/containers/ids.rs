//! Cgroup v2 ids to attributions: what the kernel-side programs key by
//! (`bpf_get_current_cgroup_id`, a socket's cgroup) turned into
//! `container.id`, `k8s.pod.uid` and `perch.cgroup`.
//!
//! A cgroup v2 id is the inode number of the cgroup's directory in the
//! cgroup2 mount (kernfs node id, 64-bit since 5.5). [`CgroupIds::refresh`]
//! walks the mount, bounded like the containers walk, and keeps
//! id -> attribution; the ids it no longer finds are the cgroups removed
//! since, handed back once so that their series can end with a final point.
//! [`CgroupIds::resolve`] walks only when asked about an id it does not
//! know: a walk costs a `stat` and a directory read per cgroup (37 ms per
//! collection for 2 000 cgroups on the reference VM), checking the ids
//! asked about costs one `stat` each.
//! On a hybrid host the mount is `unified/`, where systemd places every
//! task too; on a v1-only host there is none, and every task is in the
//! default hierarchy's root.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::cgroup_path::{parse_cgroup_path, Attribution};
use super::collector::MAX_DEPTH;

/// The cgroup2 mount under `cgroup_root` (`/sys/fs/cgroup`): itself on a v2
/// host, `unified/` on a hybrid one.
pub fn cgroup2_root(cgroup_root: &Path) -> Result<PathBuf, String> {
    for dir in [cgroup_root.to_owned(), cgroup_root.join("unified")] {
        if dir.join("cgroup.procs").is_file() && dir.join("cgroup.controllers").is_file() {
            return Ok(dir);
        }
    }
    Err(format!(
        "{}: no cgroup2 mount (cgroup.controllers, or unified/cgroup.controllers)",
        cgroup_root.display()
    ))
}

pub struct CgroupIds {
    root: PathBuf,
    host_depth: usize,
    max_cgroups: usize,
    /// id -> (attribution, path below the root).
    by_id: HashMap<u64, (Attribution, String)>,
    /// Cgroups past the walk's bounds or with malformed paths, last walk.
    pub skipped: u64,
}

impl CgroupIds {
    pub fn new(root: PathBuf, host_depth: usize, max_cgroups: usize) -> Self {
        Self {
            root,
            host_depth,
            max_cgroups,
            by_id: HashMap::new(),
            skipped: 0,
        }
    }

    /// The attribution of a live cgroup id, as of the last walk.
    pub fn get(&self, id: u64) -> Option<&Attribution> {
        self.by_id.get(&id).map(|(a, _)| a)
    }

    /// Makes the ids in `asked` current: walks when one is unknown (a new
    /// cgroup), else checks each one's directory still is that cgroup.
    /// Returns the cgroups known before and found gone, as [`Self::refresh`].
    pub fn resolve(&mut self, asked: impl IntoIterator<Item = u64>) -> Vec<(u64, Attribution)> {
        let asked: Vec<u64> = asked.into_iter().collect();
        if asked.iter().any(|id| !self.by_id.contains_key(id)) {
            return self.refresh();
        }
        let mut removed = Vec::new();
        for id in asked {
            let Some((_, rel)) = self.by_id.get(&id) else {
                continue;
            };
            let dir = self.root.join(rel.trim_start_matches('/'));
            if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
                continue;
            }
            if let Some((a, _)) = self.by_id.remove(&id) {
                removed.push((id, a));
            }
        }
        removed
    }

    /// `perch.cgroup` of every cgroup the last walk found (repeats where
    /// several cgroups fold into one).
    pub fn cgroups(&self) -> impl Iterator<Item = &str> + '_ {
        self.by_id.values().map(|(a, _)| a.cgroup.as_str())
    }

    /// Cgroups known, as of the last walk.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Walks the mount again. Returns the cgroups known before and not
    /// found now (removed), with their attribution. A cgroup removed during
    /// the walk is skipped, and an unreadable directory ends only its own
    /// branch (it is counted in [`Self::skipped`] and logged once).
    pub fn refresh(&mut self) -> Vec<(u64, Attribution)> {
        let mut next = HashMap::with_capacity(self.by_id.len());
        let mut skipped = 0u64;
        let mut queue: VecDeque<(PathBuf, String, usize)> = VecDeque::new();
        queue.push_back((self.root.clone(), String::new(), 0));
        let mut seen = 0usize;
        while let Some((dir, rel, depth)) = queue.pop_front() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue; // removed during the walk
            };
            let path = if rel.is_empty() { "/" } else { rel.as_str() };
            match parse_cgroup_path(path, self.host_depth) {
                Ok(a) => {
                    next.insert(meta.ino(), (a, path.to_owned()));
                }
                Err(_) => {
                    skipped += 1;
                    continue;
                }
            }
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "cgroup walk: unreadable");
                    skipped += 1;
                    continue;
                }
            };
            for entry in rd.filter_map(Result::ok) {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let Ok(name) = entry.file_name().into_string() else {
                    skipped += 1;
                    continue;
                };
                if depth >= MAX_DEPTH || seen >= self.max_cgroups {
                    skipped += 1;
                    continue;
                }
                seen += 1;
                queue.push_back((entry.path(), format!("{rel}/{name}"), depth + 1));
            }
        }
        let removed = self
            .by_id
            .drain()
            .filter(|(id, _)| !next.contains_key(id))
            .map(|(id, (a, _))| (id, a))
            .collect();
        self.by_id = next;
        self.skipped = skipped;
        removed
    }
}

/// A cgroup2 mount to test id resolution against: a directory with the
/// mount's marker files, and a directory's id.
#[cfg(test)]
pub(crate) mod testutil {
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    /// A container id, 64 hex.
    pub const ID: &str = "4f1b3c2d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c";

    /// Makes `root` look like a cgroup2 mount (`cgroup2_root` accepts it).
    pub fn fake_cgroup2(root: &Path) {
        std::fs::write(root.join("cgroup.procs"), "").unwrap();
        std::fs::write(root.join("cgroup.controllers"), "").unwrap();
    }

    /// The cgroup id of directory `p`: its inode number.
    pub fn ino(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().ino()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{fake_cgroup2, ino, ID};
    use super::*;

    #[test]
    fn ids_resolve_to_attributions_and_removals_are_reported_once() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fake_cgroup2(root);
        assert_eq!(cgroup2_root(root).unwrap(), root);
        let ctr = root.join(format!("system.slice/docker-{ID}.scope"));
        let nested = ctr.join("init");
        std::fs::create_dir_all(&nested).unwrap();
        let svc = root.join("system.slice/sshd.service");
        std::fs::create_dir_all(&svc).unwrap();

        let mut ids = CgroupIds::new(root.to_owned(), 1, 100);
        assert!(ids.refresh().is_empty());
        assert_eq!(ids.len(), 5, "root, system.slice, sshd, container, init");
        let a = ids.get(ino(&nested)).unwrap();
        assert_eq!(a.container_id.as_deref(), Some(ID), "nested: its container");
        assert_eq!(a.cgroup, format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(ids.get(ino(&svc)).unwrap().cgroup, "/system.slice");
        assert_eq!(ids.get(ino(root)).unwrap().cgroup, "/");

        let svc_id = ino(&svc);
        std::fs::remove_dir(&svc).unwrap();
        let removed = ids.refresh();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].0, svc_id);
        assert_eq!(removed[0].1.cgroup, "/system.slice");
        assert!(ids.refresh().is_empty(), "reported once");
        assert!(ids.get(svc_id).is_none());

        // Asked about known ids: no walk, only their directories checked.
        let ctr_id = ino(&ctr);
        std::fs::create_dir(root.join("late.slice")).unwrap();
        assert!(ids.resolve([ctr_id]).is_empty());
        assert_eq!(ids.len(), 4, "no walk: late.slice not seen yet");
        std::fs::remove_dir(&nested).unwrap();
        let nested_gone = ids.resolve([ino(root), ino(&ctr)]);
        assert!(
            nested_gone.is_empty(),
            "only the ids asked about are checked"
        );
        std::fs::remove_dir(&ctr).unwrap();
        let gone = ids.resolve([ctr_id]);
        assert_eq!(gone.len(), 1, "{gone:?}");
        assert_eq!(gone[0].0, ctr_id);
        // An unknown id: a walk, which finds late.slice.
        let late = ino(&root.join("late.slice"));
        ids.resolve([late]);
        assert_eq!(ids.get(late).unwrap().cgroup, "/late.slice");

        // The bound counts what it leaves out.
        let mut small = CgroupIds::new(root.to_owned(), 1, 1);
        small.refresh();
        assert_eq!(small.len(), 2, "the root and one child");
        assert_eq!(small.skipped, 1);
    }

    #[test]
    fn no_cgroup2_mount_is_an_error_naming_the_path() {
        let d = tempfile::tempdir().unwrap();
        let e = cgroup2_root(d.path()).unwrap_err();
        assert!(e.contains("no cgroup2 mount"), "{e}");
    }
}
