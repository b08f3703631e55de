//! The containers family against real cgroups (issue 14): cgroups named as
//! the kubelet and containerd name them, a CPU-bound workload inside, and
//! the agent's figures against the cgroup's own counters, read after the
//! workload has exited (so they no longer move and must match exactly).
//!
//! This host is hybrid: the CPU controllers are on cgroup v1 (`cpuacct`,
//! `cpu`), and a cgroup2 hierarchy without controllers is mounted at
//! `/sys/fs/cgroup/unified` (its `cpu.stat` has usage, not throttling).
//! v1 is tested with throttling, v2 with usage.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use perch_tests::perch::{collect, only, points};

const UID: &str = "5d0e7a9c-3b1f-4c2d-9e8a-7b6c5d4e3f2a";
const ID_A: &str = "aa1b3c2d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c";
const ID_B: &str = "bb1b3c2d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c";
const CGROUP: &str = "/sys/fs/cgroup";

/// Directories created by a test, removed deepest first when dropped.
struct Cgroups(Vec<PathBuf>);

impl Cgroups {
    fn create(&mut self, root: &Path, rel: &str) -> PathBuf {
        let mut p = root.to_owned();
        for c in rel.trim_start_matches('/').split('/') {
            p.push(c);
            if !p.exists() {
                std::fs::create_dir(&p)
                    .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", p.display()));
                self.0.push(p.clone());
            }
        }
        p
    }

    fn remove(&mut self) {
        while let Some(p) = self.0.pop() {
            let _ = std::fs::remove_dir(&p);
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Runs `stress-ng --cpu 1` for `secs` with its process in every cgroup of
/// `dirs` (one per hierarchy) from its first instruction, and waits for it.
fn burn_in(dirs: &[&Path], secs: f64) {
    let mut script = String::new();
    for d in dirs {
        script.push_str(&format!("echo $$ > '{}/cgroup.procs' && ", d.display()));
    }
    script.push_str(&format!(
        "exec stress-ng --cpu 1 --cpu-method int64 --timeout {secs}s --quiet"
    ));
    let status = Command::new("sh")
        .args(["-c", &script])
        .status()
        .expect("stress-ng (apt stress-ng; cargo xtask setup --test installs it)");
    assert!(status.success(), "the workload failed: {status}");
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {text}"))
}

/// The agent's points of `metric` for container `id`.
fn of<'a>(snap: &'a serde_json::Value, metric: &str, id: &str) -> Vec<&'a serde_json::Value> {
    points(snap, metric)
        .into_iter()
        .filter(|p| p["attributes"]["container.id"] == id)
        .collect()
}

fn total(points: &[&serde_json::Value]) -> f64 {
    points
        .iter()
        .map(|p| p["value"].as_f64().expect("value"))
        .sum()
}

fn snapshot(extra: &[&str]) -> serde_json::Value {
    let mut args = only(&["containers"]);
    args.extend_from_slice(extra);
    collect(&args, Duration::from_millis(300), || ()).0
}

#[test]
fn v1_cpu_time_and_throttling_match_the_cgroups_counters() {
    let _serial = perch_tests::kernel::privileged();
    let cpuacct = Path::new(CGROUP).join("cpuacct");
    let cpu = Path::new(CGROUP).join("cpu");
    if !cpuacct.join("cpuacct.usage").exists() || !cpu.join("cpu.cfs_period_us").exists() {
        eprintln!("skipped: this kernel has no cgroup v1 cpuacct and cpu controllers mounted (a v2-only host)");
        return;
    }
    let u_ = UID.replace('-', "_");
    let pod = format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u_}.slice");
    let a = format!("{pod}/cri-containerd-{ID_A}.scope");
    let b = format!("{pod}/cri-containerd-{ID_B}.scope");
    let mut made = Cgroups(Vec::new());
    let (acct_a, cpu_a) = (made.create(&cpuacct, &a), made.create(&cpu, &a));
    let (acct_b, cpu_b) = (made.create(&cpuacct, &b), made.create(&cpu, &b));
    // B may use 20 % of a CPU: 20 ms per 100 ms period.
    std::fs::write(cpu_b.join("cpu.cfs_period_us"), "100000").unwrap();
    std::fs::write(cpu_b.join("cpu.cfs_quota_us"), "20000").unwrap();
    burn_in(&[&acct_a, &cpu_a], 1.5);
    burn_in(&[&acct_b, &cpu_b], 1.5);

    let snap = snapshot(&[]);
    // A: CPU time, exactly the cgroup's (it no longer moves).
    let usage_a = field(&read(&acct_a.join("cpuacct.usage")), "") as f64 / 1e9;
    let pts = of(&snap, "container.cpu.time", ID_A);
    let got = total(&pts);
    eprintln!("container A: container.cpu.time {got:.6} s, cpuacct.usage {usage_a:.6} s");
    assert!(usage_a > 0.5, "the workload ran {usage_a} s of CPU");
    assert!(
        (got - usage_a).abs() <= 1e-6,
        "{got} s vs cpuacct.usage {usage_a} s"
    );
    let modes: Vec<&str> = pts
        .iter()
        .map(|p| p["attributes"]["cpu.mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["user", "system"]);
    let user = pts[0]["value"].as_f64().unwrap();
    assert!(
        user > 0.9 * got,
        "a CPU-bound loop is user time: {user} of {got} s"
    );
    for p in &pts {
        assert_eq!(p["attributes"]["k8s.pod.uid"], UID);
        assert_eq!(p["attributes"]["perch.k8s.qos_class"], "burstable");
        assert_eq!(p["attributes"]["perch.cgroup"], a.as_str());
    }
    assert!(
        of(&snap, "perch.container.cpu.quota", ID_A).is_empty(),
        "A has no quota"
    );

    // B: throttled, and the figures are cpu.stat's.
    let stat_b = read(&cpu_b.join("cpu.stat"));
    let (nr, ns) = (
        field(&stat_b, "nr_throttled"),
        field(&stat_b, "throttled_time"),
    );
    let periods = total(&of(&snap, "perch.container.cpu.throttled.periods", ID_B));
    let time = total(&of(&snap, "perch.container.cpu.throttled.time", ID_B));
    let usage_b = total(&of(&snap, "container.cpu.time", ID_B));
    eprintln!(
        "container B (quota 20 ms / 100 ms): {periods} throttled periods (cpu.stat {nr}), \
         {time:.6} s throttled (cpu.stat {:.6} s), {usage_b:.3} s of CPU in 1.5 s",
        ns as f64 / 1e9
    );
    assert!(nr >= 5, "the quota throttled only {nr} periods");
    assert_eq!(periods, nr as f64);
    assert!((time - ns as f64 / 1e9).abs() <= 1e-9);
    assert!(usage_b < 0.5, "B ran {usage_b} s of CPU under a 20 % quota");
    assert_eq!(total(&of(&snap, "perch.container.cpu.quota", ID_B)), 0.02);
    assert_eq!(total(&of(&snap, "perch.container.cpu.period", ID_B)), 0.1);

    // Removed: the series end.
    made.remove();
    let snap = snapshot(&[]);
    for id in [ID_A, ID_B] {
        assert!(
            of(&snap, "container.cpu.time", id).is_empty(),
            "{id} still reported"
        );
    }
}

#[test]
fn v2_cpu_time_matches_cpu_stat() {
    let _serial = perch_tests::kernel::privileged();
    let root = Path::new(CGROUP);
    let v2 = if root.join("cgroup.controllers").exists() {
        root.to_owned()
    } else if root.join("unified/cgroup.controllers").exists() {
        root.join("unified")
    } else {
        eprintln!("skipped: this kernel has no cgroup2 hierarchy mounted");
        return;
    };
    // The cgroupfs driver's layout, with a bare container id.
    let rel = format!("/kubepods/besteffort/pod{UID}/{ID_A}");
    let mut made = Cgroups(Vec::new());
    let dir = made.create(&v2, &rel);
    burn_in(&[&dir], 1.0);
    let cfg = perch_tests::perch::ConfigFile::new("[probes.containers]\nhierarchy = \"v2\"\n");
    let snap = snapshot(&["--config", cfg.path()]);
    let stat = read(&dir.join("cpu.stat"));
    let usage = field(&stat, "usage_usec") as f64 / 1e6;
    let pts = of(&snap, "container.cpu.time", ID_A);
    let got = total(&pts);
    eprintln!("v2 container: container.cpu.time {got:.6} s, cpu.stat usage_usec {usage:.6} s");
    assert!(usage > 0.3, "the workload ran {usage} s of CPU");
    // user_usec and system_usec are each rounded to the µs.
    assert!(
        (got - usage).abs() <= 2e-6,
        "{got} s vs usage_usec {usage} s"
    );
    for p in &pts {
        assert_eq!(p["attributes"]["k8s.pod.uid"], UID);
        assert_eq!(p["attributes"]["perch.k8s.qos_class"], "besteffort");
    }
}
