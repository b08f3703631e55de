//! The `containers` collector: walks the CPU cgroup hierarchy every
//! interval, attributes each cgroup by its path, and reads its CPU
//! accounting and bandwidth control.
//!
//! Reported cgroups:
//! - a container's own cgroup (the one named by the runtime; cgroups nested
//!   inside it are the same container and are not walked);
//! - a host cgroup (outside the kubelet's `kubepods*` tree and not a
//!   container) at `host_depth` components, or a shallower one without
//!   children: `system.slice`, `user.slice`, `init.scope`. Its figure
//!   includes every cgroup below it (cgroup accounting is hierarchical), so
//!   with docker's systemd driver `system.slice` includes the containers,
//!   which are also reported on their own.
//!
//! The walk is bounded by depth (16) and by `max_cgroups`; cgroups past the
//! bound are counted in `perch.containers.cgroups.skipped`, not reported.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::collectors::{CollectError, Collector};
use crate::model::{Attributes, Metric, Number, NumberPoint, StartTimes};
use crate::sources::{read_file, ProcError};

use super::cgroup_path::{parse_cgroup_path, Attribution};
use super::cgroupfs::{self, CpuUsage, Layout, Limit, Throttling};

/// Deepest cgroup walked, in components below the root.
pub const MAX_DEPTH: usize = 16;

/// What one reported cgroup reads as.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub attribution: Attribution,
    pub usage: CpuUsage,
    pub throttling: Option<Throttling>,
    pub limit: Option<Limit>,
}

pub struct ContainersCollector {
    layout: Layout,
    host_depth: usize,
    max_cgroups: usize,
    starts: StartTimes,
    skipped: u64,
    /// The last walk's readings, by `perch.cgroup`: a cgroup missing from
    /// the next walk is reported once more from here (its final point),
    /// then forgotten.
    last: std::collections::HashMap<String, Reading>,
    /// Cgroups whose read error was logged (bounded by `max_cgroups`).
    warned: std::collections::HashSet<String>,
}

impl ContainersCollector {
    pub fn new(layout: Layout, host_depth: usize, max_cgroups: usize, boot: SystemTime) -> Self {
        Self {
            layout,
            host_depth,
            max_cgroups,
            starts: StartTimes::new(boot),
            skipped: 0,
            last: std::collections::HashMap::new(),
            warned: std::collections::HashSet::new(),
        }
    }

    /// Walks the hierarchy: the reported cgroups' readings, and how many
    /// cgroups were left out (past the bounds, a malformed path, or
    /// unreadable). A cgroup removed during the walk is skipped silently (it
    /// is gone, not broken); one that cannot be read is left out, counted
    /// and logged (once per cgroup), and the rest are still reported. Only
    /// an unreadable root fails the collection.
    pub fn walk(&mut self) -> Result<(Vec<Reading>, u64), CollectError> {
        let root = self.layout.walk_root().to_owned();
        let mut out = Vec::new();
        let mut skipped = 0u64;
        let mut seen = 0usize;
        let mut queue: VecDeque<(PathBuf, String, usize)> = VecDeque::new();
        queue.push_back((root, String::new(), 0));
        while let Some((dir, rel, depth)) = queue.pop_front() {
            let path = if rel.is_empty() {
                "/".to_owned()
            } else {
                rel.clone()
            };
            let Ok(a) = parse_cgroup_path(&path, self.host_depth) else {
                skipped += 1;
                continue;
            };
            let children = match subdirs(&dir) {
                Ok(c) => c,
                Err(e) if depth == 0 => return Err(e.into()),
                Err(e) => {
                    self.unreadable(&path, &e);
                    skipped += 1;
                    continue;
                }
            };
            let in_kubepods = rel
                .split('/')
                .nth(1)
                .is_some_and(|c| c.starts_with("kubepods"));
            let own_container = a.container_id.is_some() && a.cgroup == path;
            let report = own_container
                || (depth > 0
                    && a.container_id.is_none()
                    && a.pod_uid.is_none()
                    && !in_kubepods
                    && (depth == self.host_depth
                        || (depth < self.host_depth && children.is_empty())));
            if report {
                match self.read(&dir, &rel, a) {
                    Ok(r) => out.push(r),
                    Err(e) if gone(&e) => {}
                    Err(e) => {
                        self.unreadable(&path, &e);
                        skipped += 1;
                    }
                }
            }
            // Below a container only the same container; below a host
            // cgroup, containers may still come (docker's systemd driver).
            if own_container {
                continue;
            }
            if depth >= MAX_DEPTH {
                skipped += children.len() as u64;
                continue;
            }
            for name in children {
                if seen >= self.max_cgroups {
                    skipped += 1;
                    continue;
                }
                seen += 1;
                let child_rel = format!("{rel}/{name}");
                queue.push_back((dir.join(&name), child_rel, depth + 1));
            }
        }
        Ok((out, skipped))
    }

    /// Logs a cgroup that could not be read, once per cgroup.
    fn unreadable(&mut self, path: &str, e: &ProcError) {
        if self.warned.len() < self.max_cgroups && self.warned.insert(path.to_owned()) {
            tracing::warn!(cgroup = path, error = %e, "containers: cgroup left out (counted in perch.containers.cgroups.skipped)");
        }
    }

    fn read(&self, dir: &Path, rel: &str, attribution: Attribution) -> Result<Reading, ProcError> {
        match &self.layout {
            Layout::V2 { .. } => {
                let (usage, throttling) =
                    cgroupfs::parse_cpu_stat_v2(&read_file(&dir.join("cpu.stat"))?)?;
                let limit = match read_file(&dir.join("cpu.max")) {
                    Ok(t) => Some(cgroupfs::parse_cpu_max(&t)?),
                    // No cpu controller here: no limit to report.
                    Err(e) if gone(&e) => None,
                    Err(e) => return Err(e),
                };
                Ok(Reading {
                    attribution,
                    usage,
                    throttling,
                    limit,
                })
            }
            Layout::V1 { cpu, .. } => {
                let usage_ns = cgroupfs::parse_number(
                    &read_file(&dir.join("cpuacct.usage"))?,
                    "cpuacct.usage",
                )?;
                let (user, system) =
                    cgroupfs::parse_cpuacct_stat(&read_file(&dir.join("cpuacct.stat"))?)?;
                // The tick counts give the split, `cpuacct.usage` the exact
                // total (as v2's cpu.stat does): user + system == usage.
                let user_ns = match user + system {
                    0 => usage_ns,
                    ticks => (usage_ns as u128 * user as u128 / ticks as u128) as u64,
                };
                let usage = CpuUsage {
                    usage_ns,
                    user_ns: Some(user_ns),
                    system_ns: Some(usage_ns - user_ns),
                };
                let (mut throttling, mut limit) = (None, None);
                if let Some(cpu) = cpu {
                    let cdir = cpu.join(rel.trim_start_matches('/'));
                    if cdir.is_dir() {
                        throttling = Some(cgroupfs::parse_cpu_stat_v1(&read_file(
                            &cdir.join("cpu.stat"),
                        )?)?);
                        let quota =
                            cgroupfs::parse_cfs_quota(&read_file(&cdir.join("cpu.cfs_quota_us"))?)?;
                        let period = cgroupfs::parse_number(
                            &read_file(&cdir.join("cpu.cfs_period_us"))?,
                            "cpu.cfs_period_us",
                        )?;
                        limit = Some(Limit {
                            quota_us: quota,
                            period_us: period,
                        });
                    }
                }
                Ok(Reading {
                    attribution,
                    usage,
                    throttling,
                    limit,
                })
            }
        }
    }
}

/// The file or directory is gone: a cgroup removed while it was read.
fn gone(e: &ProcError) -> bool {
    matches!(e, ProcError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// Subdirectory names of `dir`, sorted (stable series order); none when
/// `dir` is gone.
fn subdirs(dir: &Path) -> Result<Vec<String>, ProcError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ProcError::Io {
                path: dir.display().to_string(),
                source,
            })
        }
    };
    let mut out: Vec<String> = rd
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    Ok(out)
}

/// The series attributes of a cgroup.
pub fn attributes(a: &Attribution) -> Attributes {
    let mut attrs: Attributes = Vec::with_capacity(4);
    if let Some(id) = &a.container_id {
        attrs.push(("container.id", id.clone().into()));
    }
    if let Some(uid) = &a.pod_uid {
        attrs.push(("k8s.pod.uid", uid.clone().into()));
    }
    if let Some(q) = a.qos {
        attrs.push(("perch.k8s.qos_class", q.as_str().into()));
    }
    attrs.push(("perch.cgroup", a.cgroup.clone().into()));
    attrs
}

impl Collector for ContainersCollector {
    fn name(&self) -> &'static str {
        "containers"
    }

    fn collect(&mut self, now: SystemTime, out: &mut Vec<Metric>) -> Result<(), CollectError> {
        let (mut readings, skipped) = self.walk()?;
        self.skipped += skipped;
        // A removed cgroup's series end with one final point: its last
        // reading (a removed cgroup can no longer be read).
        let mut last: std::collections::HashMap<String, Reading> = readings
            .iter()
            .map(|r| (r.attribution.cgroup.clone(), r.clone()))
            .collect();
        std::mem::swap(&mut last, &mut self.last);
        readings.extend(
            last.into_values()
                .filter(|r| !self.last.contains_key(&r.attribution.cgroup)),
        );
        let mut cpu = Vec::new();
        let (mut periods, mut throttled) = (Vec::new(), Vec::new());
        let (mut quota, mut period) = (Vec::new(), Vec::new());
        let point = |starts: &mut StartTimes, name: &'static str, attrs: Attributes, v: Number| {
            let start = starts.observe(name, &attrs, v.as_f64(), now);
            NumberPoint {
                attributes: attrs,
                start_time: Some(start),
                time: now,
                value: v,
            }
        };
        for r in &readings {
            let base = attributes(&r.attribution);
            let split = match (r.usage.user_ns, r.usage.system_ns) {
                (Some(u), Some(s)) => vec![("user", u), ("system", s)],
                _ => vec![("total", r.usage.usage_ns)],
            };
            for (mode, ns) in split {
                let mut a = base.clone();
                a.push(("cpu.mode", mode.into()));
                cpu.push(point(
                    &mut self.starts,
                    crate::catalogue::CONTAINER_CPU_TIME,
                    a,
                    Number::Double(ns as f64 / 1e9),
                ));
            }
            // Throttling series only where there is a quota, or was one:
            // zeros for every unlimited cgroup would be noise.
            let limited = matches!(
                r.limit,
                Some(Limit {
                    quota_us: Some(_),
                    ..
                })
            );
            if let Some(t) = r.throttling.filter(|t| limited || t.throttled_periods > 0) {
                periods.push(point(
                    &mut self.starts,
                    crate::catalogue::CONTAINER_THROTTLED_PERIODS,
                    base.clone(),
                    Number::Int(t.throttled_periods as i64),
                ));
                throttled.push(point(
                    &mut self.starts,
                    crate::catalogue::CONTAINER_THROTTLED_TIME,
                    base.clone(),
                    Number::Double(t.throttled_ns as f64 / 1e9),
                ));
            }
            if let Some(Limit {
                quota_us: Some(q),
                period_us,
            }) = r.limit
            {
                let gauge = |attrs: Attributes, v: f64| NumberPoint {
                    attributes: attrs,
                    start_time: None,
                    time: now,
                    value: Number::Double(v),
                };
                quota.push(gauge(base.clone(), q as f64 / 1e6));
                period.push(gauge(base.clone(), period_us as f64 / 1e6));
            }
        }
        let skipped_point = point(
            &mut self.starts,
            crate::catalogue::CONTAINER_CGROUPS_SKIPPED,
            Vec::new(),
            Number::Int(self.skipped as i64),
        );
        self.starts.end_collection(now);
        out.push(Metric::counter(
            crate::catalogue::CONTAINER_CPU_TIME,
            "CPU time used by each container (and host cgroup), by mode, from cgroupfs.",
            "s",
            cpu,
        ));
        out.push(Metric::counter(
            crate::catalogue::CONTAINER_THROTTLED_PERIODS,
            "CFS periods in which the cgroup used its whole CPU quota and was throttled.",
            "{period}",
            periods,
        ));
        out.push(Metric::counter(
            crate::catalogue::CONTAINER_THROTTLED_TIME,
            "Time the cgroup's tasks were throttled by its CPU quota.",
            "s",
            throttled,
        ));
        out.push(Metric::gauge(
            crate::catalogue::CONTAINER_CPU_QUOTA,
            "CPU time the cgroup may use per period (cpu.max / cpu.cfs_quota_us); only cgroups with a quota.",
            "s",
            quota,
        ));
        out.push(Metric::gauge(
            crate::catalogue::CONTAINER_CPU_PERIOD,
            "The cgroup's CFS bandwidth period (cpu.max / cpu.cfs_period_us); only cgroups with a quota.",
            "s",
            period,
        ));
        out.push(Metric::counter(
            crate::catalogue::CONTAINER_CGROUPS_SKIPPED,
            "Cgroups not reported because the walk's bounds (depth 16, probes.containers.max_cgroups) were reached, their path was malformed, or they could not be read (logged).",
            "{cgroup}",
            vec![skipped_point],
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1b3c2d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c";
    const UID: &str = "1234abcd-5678-90ef-1234-567890abcdef";

    fn mk(root: &Path, rel: &str, usage_us: u64, throttled: Option<u64>) {
        let d = root.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(&d).unwrap();
        let mut stat = format!(
            "usage_usec {usage_us}\nuser_usec {}\nsystem_usec {}\n",
            usage_us * 3 / 4,
            usage_us - usage_us * 3 / 4
        );
        if let Some(t) = throttled {
            stat.push_str(&format!(
                "nr_periods 100\nnr_throttled {t}\nthrottled_usec {}\n",
                t * 1000
            ));
            std::fs::write(d.join("cpu.max"), "50000 100000\n").unwrap();
        }
        std::fs::write(d.join("cpu.stat"), stat).unwrap();
    }

    /// A collector of the v2 tree at `root`, host depth 1.
    fn v2_collector(root: &Path) -> ContainersCollector {
        ContainersCollector::new(
            Layout::discover(root, super::cgroupfs::Hierarchy::Auto).unwrap(),
            1,
            100,
            SystemTime::UNIX_EPOCH,
        )
    }

    /// One collection's `container.cpu.time` of container `ID`, and the
    /// metrics.
    fn container_cpu(c: &mut ContainersCollector) -> (f64, Vec<Metric>) {
        let mut out = Vec::new();
        c.collect(SystemTime::now(), &mut out).unwrap();
        let cpu = out
            .iter()
            .find(|m| m.name == crate::catalogue::CONTAINER_CPU_TIME)
            .unwrap();
        let crate::model::Data::Sum { points, .. } = &cpu.data else {
            panic!("not a counter")
        };
        let total = points
            .iter()
            .filter(|p| {
                p.attributes
                    .iter()
                    .any(|(k, v)| *k == "container.id" && v.to_string() == ID)
            })
            .map(|p| p.value.as_f64())
            .sum();
        (total, out)
    }

    /// A kubelet (systemd driver) + systemd host tree on cgroup v2.
    #[test]
    fn walks_containers_and_host_slices_once_each() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::write(root.join("cgroup.controllers"), "cpu\n").unwrap();
        mk(root, "/", 999, None);
        let u_ = UID.replace('-', "_");
        let pod =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u_}.slice");
        mk(root, "/kubepods.slice", 500, None);
        mk(root, "/kubepods.slice/kubepods-burstable.slice", 500, None);
        mk(root, &pod, 400, None);
        mk(
            root,
            &format!("{pod}/cri-containerd-{ID}.scope"),
            300,
            Some(7),
        );
        mk(
            root,
            &format!("{pod}/cri-containerd-{ID}.scope/init"),
            1,
            None,
        );
        mk(root, "/system.slice", 200, None);
        mk(root, "/system.slice/sshd.service", 50, None);
        mk(root, "/init.scope", 10, None);
        let layout = Layout::discover(root, super::cgroupfs::Hierarchy::Auto).unwrap();
        let mut c = ContainersCollector::new(layout.clone(), 1, 100, SystemTime::UNIX_EPOCH);
        let (r, skipped) = c.walk().unwrap();
        assert_eq!(skipped, 0);
        let cgroups: Vec<&str> = r.iter().map(|r| r.attribution.cgroup.as_str()).collect();
        assert_eq!(
            cgroups,
            vec![
                "/init.scope",
                "/system.slice",
                &format!("{pod}/cri-containerd-{ID}.scope")
            ],
            "host slices at depth 1 and the container, nothing nested, no kubepods levels"
        );
        let ctr = &r[2];
        assert_eq!(ctr.usage.usage_ns, 300_000);
        assert_eq!(ctr.throttling.unwrap().throttled_periods, 7);
        assert_eq!(ctr.limit.unwrap().quota_us, Some(50_000));
        assert_eq!(ctr.attribution.pod_uid.as_deref(), Some(UID));
        // Depth 2 reports the service instead of its slice.
        let mut c = ContainersCollector::new(layout.clone(), 2, 100, SystemTime::UNIX_EPOCH);
        let (r, _) = c.walk().unwrap();
        let cgroups: Vec<&str> = r.iter().map(|r| r.attribution.cgroup.as_str()).collect();
        assert!(
            cgroups.contains(&"/system.slice/sshd.service"),
            "{cgroups:?}"
        );
        assert!(!cgroups.contains(&"/system.slice"), "{cgroups:?}");
        // The bound counts what it leaves out.
        let mut c = ContainersCollector::new(layout, 1, 2, SystemTime::UNIX_EPOCH);
        let (_, skipped) = c.walk().unwrap();
        assert!(skipped > 0);
    }

    #[test]
    fn metrics_carry_the_attribution() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::write(root.join("cgroup.controllers"), "cpu\n").unwrap();
        mk(
            root,
            &format!("/system.slice/docker-{ID}.scope"),
            2_000_000,
            Some(3),
        );
        let mut c = v2_collector(root);
        let (total, out) = container_cpu(&mut c);
        assert!((total - 2.0).abs() < 1e-9, "{total}");
        let q = out
            .iter()
            .find(|m| m.name == crate::catalogue::CONTAINER_CPU_QUOTA)
            .unwrap();
        let crate::model::Data::Gauge { points } = &q.data else {
            panic!("not a gauge")
        };
        assert_eq!(points[0].value, Number::Double(0.05));
    }

    /// A removed cgroup's series end with one final point, its last
    /// reading; then they are gone.
    #[test]
    fn a_removed_cgroup_gets_one_final_point() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::write(root.join("cgroup.controllers"), "cpu\n").unwrap();
        let rel = format!("/system.slice/docker-{ID}.scope");
        mk(root, &rel, 1_000_000, None);
        let mut c = v2_collector(root);
        let cpu_of = |c: &mut ContainersCollector| container_cpu(c).0;
        assert!((cpu_of(&mut c) - 1.0).abs() < 1e-9);
        std::fs::remove_dir_all(root.join(rel.trim_start_matches('/'))).unwrap();
        assert!((cpu_of(&mut c) - 1.0).abs() < 1e-9, "the final point");
        assert_eq!(cpu_of(&mut c), 0.0, "then no series");
    }

    /// A cgroup with unexpected content is left out, counted and logged;
    /// the others are still reported.
    #[test]
    fn an_unreadable_cgroup_is_skipped_not_fatal() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::write(root.join("cgroup.controllers"), "cpu\n").unwrap();
        mk(root, "/system.slice", 100, None);
        mk(root, "/user.slice", 100, None);
        std::fs::write(root.join("user.slice/cpu.stat"), "usage_usec lots\n").unwrap();
        let mut c = v2_collector(root);
        let (r, skipped) = c.walk().unwrap();
        let cgroups: Vec<&str> = r.iter().map(|r| r.attribution.cgroup.as_str()).collect();
        assert_eq!(cgroups, ["/system.slice"]);
        assert_eq!(skipped, 1);
    }
}
