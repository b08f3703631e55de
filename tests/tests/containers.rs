//! The containers family against real cgroups (issue 14): cgroups named as
//! the kubelet and containerd name them, a CPU-bound workload inside, and
//! the agent's figures against the cgroup's own counters, read after the
//! workload has exited (so they no longer move and must match exactly).
//!
//! This host is hybrid: the CPU controllers are on cgroup v1 (`cpuacct`,
//! `cpu`), and a cgroup2 hierarchy without controllers is mounted at
//! `/sys/fs/cgroup/unified` (its `cpu.stat` has usage, not throttling).
//! v1 is tested with throttling, v2 with usage.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use perch_tests::perch::{collect, only, points};

const UID: &str = "5d0e7a9c-3b1f-4c2d-9e8a-7b6c5d4e3f2a";
const ID_A: &str = "aa1b3c2d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c";
const ID_B: &str = "bb1b3c2d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c";
const ID_C: &str = "cc1b3c2d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c";
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
    let pod = pod_slice("burstable");
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

/// Pod `UID`'s cgroup as the kubelet's systemd driver names it: the
/// guaranteed form for `qos = ""`, else `kubepods-<qos>-pod<uid>.slice`
/// under its QoS slice.
fn pod_slice(qos: &str) -> String {
    let u_ = UID.replace('-', "_");
    if qos.is_empty() {
        format!("/kubepods.slice/kubepods-pod{u_}.slice")
    } else {
        format!("/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u_}.slice")
    }
}

/// The cgroup2 mount: `/sys/fs/cgroup` on a v2 host, `unified` on a hybrid
/// one (where systemd places every task too).
fn cgroup2() -> Option<PathBuf> {
    let root = Path::new(CGROUP);
    [root.to_owned(), root.join("unified")]
        .into_iter()
        .find(|d| d.join("cgroup.controllers").exists())
}

/// Processes killed when dropped (a failed assertion leaves no busy loop
/// behind).
struct Procs(Vec<std::process::Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `cmd` (a shell command) with its process in cgroup `dir` from its
/// first instruction.
fn spawn_in(dir: &Path, cmd: &str) -> std::process::Child {
    Command::new("sh")
        .args([
            "-c",
            &format!("echo $$ > '{}/cgroup.procs' && exec {cmd}", dir.display()),
        ])
        .spawn()
        .expect("sh")
}

/// `run_delay` (ns) of a task: the run-queue time the kernel itself summed
/// (`/proc/<pid>/schedstat`, second field; `CONFIG_SCHED_INFO`).
fn run_delay(pid: u32) -> u64 {
    read(Path::new(&format!("/proc/{pid}/schedstat")))
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("schedstat run_delay")
}

/// Containers `ids[0]` and `ids[1]` (cgroups `dirs`) run busy loops that
/// share CPU 0 while `ids[2]` sleeps; the agent, on `clock`, must show each
/// loop's waits summing to what the kernel counted in its task's
/// `run_delay`, and no waits for the sleeper.
fn compete(dirs: &[PathBuf; 3], ids: [&str; 3], clock: &str) -> serde_json::Value {
    // The sleeper sleeps from before the agent attaches to after it detaches.
    let idle = Procs(vec![spawn_in(&dirs[2], "sleep 30")]);
    std::thread::sleep(Duration::from_millis(200));
    let cfg = perch_tests::perch::ConfigFile::new(&format!(
        "[probes.sched]\nrunqueue_clock = \"{clock}\"\nrunqueue_per_cgroup = true\n"
    ));
    let mut args = only(&["sched"]);
    args.extend_from_slice(&["--config", cfg.path()]);
    let (snap, delays) = collect(&args, Duration::from_millis(2500), || {
        let busy = "taskset -c 0 sh -c 'while :; do :; done'";
        let pair = Procs(vec![spawn_in(&dirs[0], busy), spawn_in(&dirs[1], busy)]);
        std::thread::sleep(Duration::from_millis(1500));
        let delays = [run_delay(pair.0[0].id()), run_delay(pair.0[1].id())];
        drop(pair);
        delays
    });
    drop(idle);
    let hist = |id: &str| -> Option<(u64, f64)> {
        let pts = of(&snap, "perch.container.runqueue.latency", id);
        assert!(pts.len() <= 1, "one series per container: {pts:?}");
        pts.first().map(|p| {
            perch_tests::perch::check_exponential_at(p, 1);
            assert_eq!(p["attributes"]["k8s.pod.uid"], UID);
            (p["count"].as_u64().unwrap(), p["sum"].as_f64().unwrap())
        })
    };
    for (id, delay) in ids.iter().zip(delays) {
        let (count, sum) = hist(id).unwrap_or_else(|| panic!("no histogram for {id}"));
        let delay = delay as f64 / 1e9;
        eprintln!(
            "clock {clock}: container {}…{}: {count} waits, {sum:.3} s; its task's run_delay {delay:.3} s",
            &id[..2],
            &id[60..]
        );
        assert!(count >= 10, "{count} waits for a CPU shared 2 ways");
        assert!(delay > 0.2, "the kernel counted only {delay} s of waiting");
        // The same waits the kernel summed, give or take the wait in
        // flight when run_delay was read and what accrued until the kill.
        assert!(
            (sum - delay).abs() <= 0.05 * delay + 0.02,
            "{sum} s recorded vs run_delay {delay} s"
        );
    }
    match hist(ids[2]) {
        None => {}
        Some((count, _)) => assert_eq!(count, 0, "the sleeping container waited"),
    }
    eprintln!("clock {clock}: the idle container has no waits");
    snap
}

/// Two containers whose busy loops share CPU 0 wait for it, and their
/// per-container run-queue histograms say so, summing to what the kernel
/// counted in the tasks' `run_delay`; a container whose task sleeps
/// throughout waits not at all. Both clocks: the kernel's stamps and the
/// wake-up clock.
#[test]
fn runqueue_per_container_shows_competing_waits_and_no_idle_ones() {
    let _serial = perch_tests::kernel::privileged();
    let Some(v2) = cgroup2() else {
        eprintln!("skipped: this kernel has no cgroup2 hierarchy mounted (per-cgroup ids)");
        return;
    };
    let pod = pod_slice("");
    for clock in ["auto", "wakeup"] {
        let ids = [ID_A, ID_B, ID_C];
        let mut made = Cgroups(Vec::new());
        let dirs = ids.map(|id| made.create(&v2, &format!("{pod}/cri-containerd-{id}.scope")));
        let _ = compete(&dirs, ids, clock);
    }
}

/// Two containers whose cgroup ids map to the same slot of the kernel's
/// per-CPU front array: one holds the slot, the other's waits go to the
/// per-CPU hash. Both histograms must still match the kernel's `run_delay`.
#[test]
fn runqueue_per_container_is_exact_when_two_cgroups_share_a_slot() {
    let _serial = perch_tests::kernel::privileged();
    let Some(v2) = cgroup2() else {
        eprintln!("skipped: this kernel has no cgroup2 hierarchy mounted (per-cgroup ids)");
        return;
    };
    let pod = pod_slice("burstable");
    let mut made = Cgroups(Vec::new());
    // Cgroups until two ids collide (about 20 for 256 slots), named as
    // containerd names them; the others are removed at the end.
    let mut by_slot: std::collections::HashMap<u32, (String, PathBuf)> = Default::default();
    let mut pair = None;
    for k in 0..2000u32 {
        let id = format!("{:04x}{:060x}", 0xd00d, k);
        let dir = made.create(&v2, &format!("{pod}/cri-containerd-{id}.scope"));
        let slot = agent_common::sched::cgroup_front_slot(std::fs::metadata(&dir).unwrap().ino());
        if let Some(first) = by_slot.insert(slot, (id.clone(), dir.clone())) {
            pair = Some((first, (id, dir)));
            break;
        }
    }
    let ((id_a, dir_a), (id_b, dir_b)) = pair.expect("no two of 2 000 cgroup ids share a slot");
    eprintln!(
        "containers …{} and …{} share front slot {}",
        &id_a[60..],
        &id_b[60..],
        agent_common::sched::cgroup_front_slot(std::fs::metadata(&dir_a).unwrap().ino())
    );
    let dir_c = made.create(&v2, &format!("{pod}/cri-containerd-{ID_C}.scope"));
    let snap = compete(&[dir_a, dir_b, dir_c], [&id_a, &id_b, ID_C], "auto");
    let in_hash = perch_tests::perch::sum(
        &snap,
        "perch.bpf.map.entries",
        &[("perch.bpf.map", "SCHED_CGROUP_RUNQ")],
    );
    assert!(
        in_hash > 0.0,
        "the colliding container's waits are not in the hash"
    );
}

/// VmRSS of a process, bytes.
fn rss(pid: u32) -> u64 {
    perch_tests::bench::process_cpu_rss(pid).1 * 1024
}

/// `perch.bpf.map.entries` of the per-cgroup run-queue maps: front slots
/// and hash entries holding live cgroups.
fn live_entries(agent: &perch_tests::perch::Agent) -> f64 {
    let s = agent.scrape();
    let of = |map: &str| {
        s.iter()
            .find(|(k, _)| k.starts_with("perch_bpf_map_entries{") && k.contains(map))
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("perch_bpf_map_entries of {map}"))
    };
    of("\"SCHED_CGROUP_RUNQ\"") + of("\"SCHED_CGROUP_FRONT\"")
}

/// Scraped series whose name starts with `prefix` and that name container
/// `id`.
fn series_of(agent: &perch_tests::perch::Agent, prefix: &str, id: &str) -> usize {
    agent
        .scrape()
        .keys()
        .filter(|k| k.starts_with(prefix) && k.contains(&format!("container_id=\"{id}\"")))
        .count()
}

/// Series of the per-container run-queue histogram naming `id`.
fn runq_series(agent: &perch_tests::perch::Agent, id: &str) -> usize {
    series_of(agent, "perch_container_runqueue_latency_seconds_count{", id)
}

/// Containers come and go: 1 000 short-lived container cgroups, each with a
/// process that waits for a CPU. Their kernel map entries are reclaimed (the
/// map's entries return to their baseline), their series end, a removed
/// long-lived container's series ends, and the agent's memory does not grow
/// with churn.
#[test]
fn churn_reclaims_map_entries_and_ends_series() {
    let _serial = perch_tests::kernel::privileged();
    let Some(v2) = cgroup2() else {
        eprintln!("skipped: this kernel has no cgroup2 hierarchy mounted (per-cgroup ids)");
        return;
    };
    let pod = pod_slice("burstable");
    let mut long = Cgroups(Vec::new());
    let dir = long.create(&v2, &format!("{pod}/cri-containerd-{ID_A}.scope"));
    let cfg = perch_tests::perch::ConfigFile::new("[probes.sched]\nrunqueue_per_cgroup = true\n");
    let mut args = only(&["sched"]);
    args.extend_from_slice(&["--interval", "1s", "--config", cfg.path()]);
    let agent = perch_tests::perch::Agent::start(&args);
    // A long-lived container that waits: two loops on one CPU.
    let busy = "taskset -c 0 sh -c 'while :; do :; done'";
    let loops = Procs(vec![spawn_in(&dir, busy), spawn_in(&dir, busy)]);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        runq_series(&agent, ID_A),
        1,
        "the long-lived container's series"
    );
    let baseline = live_entries(&agent);

    let hash = perch_tests::bpftool::map_of(agent.pid(), "SCHED_CGROUP_RUNQ");
    let front = perch_tests::bpftool::map_of(agent.pid(), "SCHED_CGROUP_FRONT");
    let gone = perch_tests::bpftool::map_of(agent.pid(), "SCHED_CGROUP_GONE");
    // Kernel entries holding one of `ids` that the agent has not released:
    // hash entries, and front slots (per CPU) not listed as gone (a listed
    // slot is free for the next cgroup that maps there).
    let entries_of = |ids: &std::collections::HashSet<u64>| {
        let listed: std::collections::HashSet<u64> = perch_tests::bpftool::keys(gone)
            .iter()
            .map(perch_tests::bpftool::leading_u64)
            .collect();
        let in_hash = perch_tests::bpftool::keys(hash)
            .iter()
            .filter(|k| ids.contains(&perch_tests::bpftool::leading_u64(k)))
            .count();
        let in_front = perch_tests::bpftool::per_cpu_leading_u64(front)
            .into_iter()
            .filter(|id| ids.contains(id) && !listed.contains(id))
            .count();
        in_hash + in_front
    };
    let churn = |round: u32| {
        let mut ids = std::collections::HashSet::new();
        let mut during = 0;
        for batch in 0..50u32 {
            let mut made = Cgroups(Vec::new());
            let mut children = Vec::new();
            for k in 0..20u32 {
                let id = format!("{:016x}{:048x}", round, batch * 20 + k);
                let d = made.create(&v2, &format!("{pod}/cri-containerd-{id}.scope"));
                ids.insert(std::fs::metadata(&d).unwrap().ino());
                // Waits for CPU 0 behind the loops, then exits.
                children.push(spawn_in(
                    &d,
                    "taskset -c 0 sh -c 'i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done'",
                ));
            }
            for mut c in children {
                assert!(c.wait().unwrap().success());
            }
            made.remove();
            if batch == 25 {
                during = entries_of(&ids);
            }
        }
        (ids, during)
    };
    let (ids_one, during_one) = churn(1);
    std::thread::sleep(Duration::from_millis(3000));
    let (left_one, entries_one, rss_one) =
        (entries_of(&ids_one), live_entries(&agent), rss(agent.pid()));
    let (ids_two, during_two) = churn(2);
    std::thread::sleep(Duration::from_millis(3000));
    let (left_two, entries_two, rss_two) =
        (entries_of(&ids_two), live_entries(&agent), rss(agent.pid()));
    eprintln!(
        "SCHED_CGROUP_RUNQ: entries of churned cgroups mid-churn {during_one} / {during_two}, \
         3 s after {left_one} / {left_two}; live entries (front slots and hash): {baseline} \
         before, {entries_one} after 1 000 cgroups, {entries_two} after 2 000; agent RSS \
         {:.1} MB after 1 000, {:.1} MB after 2 000",
        rss_one as f64 / 1e6,
        rss_two as f64 / 1e6
    );
    assert!(
        during_one > 0 && during_two > 0,
        "the churned cgroups never waited: the test cannot see reclaim"
    );
    assert_eq!(
        (left_one, left_two),
        (0, 0),
        "map entries of removed cgroups were not reclaimed"
    );
    for after in [entries_one, entries_two] {
        assert!(
            after <= baseline + 2.0,
            "live map entries {after} after churn, {baseline} before"
        );
    }
    assert!(
        rss_two <= rss_one + 2_000_000,
        "RSS grew from {rss_one} to {rss_two} bytes over 1 000 more cgroups"
    );
    let left: usize = agent
        .scrape()
        .keys()
        .filter(|k| {
            k.starts_with("perch_container_runqueue_latency_seconds_count{")
                && (k.contains("container_id=\"0000000000000001")
                    || k.contains("container_id=\"0000000000000002"))
        })
        .count();
    assert_eq!(left, 0, "series of removed containers are still exported");

    // The long-lived container goes: its series ends.
    drop(loops);
    long.remove();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(runq_series(&agent, ID_A), 0, "a removed container's series");
    assert!(agent.stop(), "perch exited uncleanly");
}

/// A Python TCP peer on loopback, started in cgroup `dir`: the server
/// (`port`, one connection) prints `got <n>` once it has read `n` bytes and
/// keeps the connection open until the client closes; the client sends `n`
/// bytes and holds the connection open for `hold` s, so that a sampler
/// (procfs mode) sees it at the end of the window.
fn tcp_peer(dir: &Path, server: bool, port: u16, n: usize, hold: u32) -> std::process::Child {
    let script = if server {
        format!(
            "import socket,sys\n\
             l=socket.socket(); l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             l.bind(('127.0.0.1',{port})); l.listen(1); print('ready',flush=True)\n\
             c,_=l.accept(); got=0; said=False\n\
             while True:\n\
             \x20   b=c.recv(65536)\n\
             \x20   if not b: break\n\
             \x20   got+=len(b)\n\
             \x20   if got>={n} and not said: print('got',got,flush=True); said=True\n"
        )
    } else {
        format!(
            "import socket,time\n\
             s=socket.create_connection(('127.0.0.1',{port})); s.sendall(b'x'*{n})\n\
             time.sleep({hold}); s.close()\n"
        )
    };
    Command::new("sh")
        .args([
            "-c",
            &format!(
                "echo $$ > '{}/cgroup.procs' && exec python3 -c \"$0\"",
                dir.display()
            ),
            &script,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3")
}

/// Reads lines of `child`'s stdout until one starts with `prefix`.
fn wait_line(child: &mut std::process::Child, prefix: &str) -> String {
    use std::io::BufRead;
    let out = child.stdout.as_mut().expect("piped stdout");
    let mut r = std::io::BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line).expect("reading the peer's stdout");
        assert!(n > 0, "the peer exited before printing {prefix:?}");
        if line.starts_with(prefix) {
            return line.trim().to_owned();
        }
    }
}

/// `perch.tcp.io` and the connection counters carry the container of the
/// socket (`probes.tcp.per_cgroup`): a client in container A sends N bytes
/// over loopback to a server in container B of the same pod; the client's
/// transmit series carries A, the server's receive series B, both exactly
/// N bytes, with no share left without a container; in eBPF mode the
/// connection counted opened once per side, in each side's container.
/// Both eBPF designs and the sock_diag fallback.
#[test]
fn tcp_bytes_and_connections_carry_the_socket_container() {
    let _serial = perch_tests::kernel::privileged();
    let Some(v2) = cgroup2() else {
        eprintln!("skipped: this kernel has no cgroup2 hierarchy mounted (socket cgroup ids)");
        return;
    };
    const N: usize = 1_234_567;
    let pod = pod_slice("burstable");
    let cfg = perch_tests::perch::ConfigFile::new("[probes.tcp]\nper_cgroup = true\n");
    let modes: [(&str, &[&str]); 3] = [
        ("ebpf (tp_btf, socket counters)", &["--probe", "tcp=ebpf"]),
        (
            "ebpf (raw_tp, per I/O)",
            &["--probe", "tcp=ebpf", "--skip-hook", "tp_btf"],
        ),
        ("procfs (sock_diag sampler)", &["--probe", "tcp=procfs"]),
    ];
    for (i, (mode, extra)) in modes.into_iter().enumerate() {
        let mut made = Cgroups(Vec::new());
        let client_dir = made.create(&v2, &format!("{pod}/cri-containerd-{ID_A}.scope"));
        let server_dir = made.create(&v2, &format!("{pod}/cri-containerd-{ID_B}.scope"));
        let port = 21000 + (std::process::id() % 5000) as u16 + i as u16;
        let mut args = only(&["tcp"]);
        args.extend_from_slice(&["--config", cfg.path()]);
        args.extend_from_slice(extra);
        let (snap, _peers) = collect(&args, Duration::from_millis(3000), || {
            let mut server = tcp_peer(&server_dir, true, port, N, 0);
            wait_line(&mut server, "ready");
            let client = tcp_peer(&client_dir, false, port, N, 8);
            let got = wait_line(&mut server, "got");
            assert_eq!(got, format!("got {N}"), "the workload itself");
            // Killed (and their cgroups emptied) once the window is over.
            Procs(vec![server, client])
        });
        drop(_peers);
        let port_s = port.to_string();
        let io = |role: &str, dir: &str| -> Vec<&serde_json::Value> {
            points(&snap, "perch.tcp.io")
                .into_iter()
                .filter(|p| {
                    let a = &p["attributes"];
                    a["server.port"].as_i64() == Some(port as i64)
                        && a["perch.tcp.role"] == role
                        && a["network.io.direction"] == dir
                })
                .collect()
        };
        for (side, role, dir, id) in [
            ("client", "client", "transmit", ID_A),
            ("server", "server", "receive", ID_B),
        ] {
            let pts = io(role, dir);
            let mine: Vec<_> = pts
                .iter()
                .copied()
                .filter(|p| p["attributes"]["container.id"] == id)
                .collect();
            assert_eq!(
                total(&mine),
                N as f64,
                "{mode}: the {side}'s {dir} bytes in its container's series: {pts:?}"
            );
            assert_eq!(
                total(&pts),
                N as f64,
                "{mode}: no {side} bytes outside its container: {pts:?}"
            );
            for p in &mine {
                let a = &p["attributes"];
                assert_eq!(a["k8s.pod.uid"], UID, "{mode}: {p}");
                assert_eq!(a["perch.k8s.qos_class"], "burstable", "{mode}: {p}");
            }
        }
        eprintln!("{mode}: {N} B sent from container A and received in container B, on port {port_s}, each in its container's series");
        if mode.starts_with("ebpf") {
            for (role, id) in [("client", ID_A), ("server", ID_B)] {
                let opened: f64 = total(
                    &of(&snap, "perch.tcp.connections.opened", id)
                        .into_iter()
                        .filter(|p| p["attributes"]["perch.tcp.role"] == role)
                        .collect::<Vec<_>>(),
                );
                assert_eq!(
                    opened, 1.0,
                    "{mode}: {role} connections opened in its container"
                );
            }
        }
    }
}

/// The cgroup id in a `TCP_PEERS` or `TCP_CGROUP_CONNS` key as bpftool
/// shows it: a `cgroup` member (BTF) or raw bytes at `byte_off`.
fn key_cgroup(k: &serde_json::Value, byte_off: usize) -> u64 {
    use perch_tests::bpftool::number;
    if let Some(w) = k.get("cgroup").and_then(|c| c.as_array()) {
        return number(&w[0]) | number(&w[1]) << 32;
    }
    let bytes = k.as_array().expect("a key as bytes");
    (0..8).fold(0, |a, i| a | number(&bytes[byte_off + i]) << (8 * i))
}

/// Scraped series of any `perch_tcp_*` metric naming container `id`.
fn tcp_series(agent: &perch_tests::perch::Agent, id: &str) -> usize {
    series_of(agent, "perch_tcp_", id)
}

/// Containers that talk TCP come and go (`probes.tcp.per_cgroup`, socket
/// counters): 300 short-lived container cgroups, each with one connection
/// to a server on the host. Once they are removed, their `TCP_PEERS` and
/// `TCP_CGROUP_CONNS` entries are deleted, their series end, and a
/// long-lived container's series goes on.
#[test]
fn tcp_churn_reclaims_cgroup_entries_and_ends_series() {
    let _serial = perch_tests::kernel::privileged();
    let Some(v2) = cgroup2() else {
        eprintln!("skipped: this kernel has no cgroup2 hierarchy mounted (socket cgroup ids)");
        return;
    };
    let pod = pod_slice("");
    let port = 26000 + (std::process::id() % 5000) as u16;
    let cfg = perch_tests::perch::ConfigFile::new(
        "[probes.tcp]\nper_cgroup = true\nrtt_per_peer = true\n",
    );
    let mut args = only(&["tcp"]);
    args.extend_from_slice(&[
        "--interval",
        "1s",
        "--probe",
        "tcp=ebpf",
        "--config",
        cfg.path(),
    ]);
    let agent = perch_tests::perch::Agent::start(&args);
    let peers = perch_tests::bpftool::map_of(agent.pid(), "TCP_PEERS");
    let conns = perch_tests::bpftool::map_of(agent.pid(), "TCP_CGROUP_CONNS");
    let rtts = perch_tests::bpftool::map_of(agent.pid(), "TCP_RTT_PEERS");
    // A server on the host, in this test's own cgroup: reads each
    // connection to its end.
    let server_script = format!(
        "import socket\n\
         l=socket.socket(); l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         l.bind(('127.0.0.1',{port})); l.listen(64); print('ready',flush=True)\n\
         while True:\n\
         \x20   c,_=l.accept()\n\
         \x20   while c.recv(65536): pass\n\
         \x20   c.close()\n"
    );
    let mut server = Command::new("python3")
        .args(["-c", &server_script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    wait_line(&mut server, "ready");
    let _server = Procs(vec![server]);
    let send = format!(
        "python3 -c \"import socket; s=socket.create_connection(('127.0.0.1',{port})); \
         s.sendall(b'x'*1000); s.close()\""
    );
    let mut long = Cgroups(Vec::new());
    let long_dir = long.create(&v2, &format!("{pod}/cri-containerd-{ID_C}.scope"));
    assert!(spawn_in(&long_dir, &send).wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        tcp_series(&agent, ID_C) > 0,
        "the long-lived container's series"
    );

    let held = |ids: &std::collections::HashSet<u64>| {
        let p = perch_tests::bpftool::keys(peers)
            .iter()
            .filter(|k| ids.contains(&key_cgroup(k, 20)))
            .count();
        let c = perch_tests::bpftool::keys(conns)
            .iter()
            .filter(|k| ids.contains(&key_cgroup(k, 0)))
            .count();
        let r = perch_tests::bpftool::keys(rtts)
            .iter()
            .filter(|k| ids.contains(&key_cgroup(k, 20)))
            .count();
        (p, c, r)
    };
    let mut ids = std::collections::HashSet::new();
    let mut names = Vec::new();
    let mut during = (0, 0, 0);
    for batch in 0..15u32 {
        let mut made = Cgroups(Vec::new());
        let mut children = Vec::new();
        for k in 0..20u32 {
            let id = format!("{:064x}", 0xd00d_0000u64 + u64::from(batch * 20 + k));
            let d = made.create(&v2, &format!("{pod}/cri-containerd-{id}.scope"));
            ids.insert(std::fs::metadata(&d).unwrap().ino());
            children.push(spawn_in(&d, &send));
            names.push(id);
        }
        for mut c in children {
            assert!(c.wait().unwrap().success());
        }
        if batch == 7 {
            // Let a collection see the live ones.
            std::thread::sleep(Duration::from_millis(1500));
            during = held(&ids);
        }
        made.remove();
    }
    std::thread::sleep(Duration::from_millis(3500));
    let left = held(&ids);
    let series_left: usize = names.iter().map(|id| tcp_series(&agent, id)).sum();
    eprintln!(
        "entries of 300 churned containers (TCP_PEERS, TCP_CGROUP_CONNS, TCP_RTT_PEERS): \
         {during:?} mid-churn, {left:?} 3.5 s after; their series left: {series_left}; the \
         long-lived container's series: {}",
        tcp_series(&agent, ID_C)
    );
    assert!(
        during.0 > 0 && during.1 > 0 && during.2 > 0,
        "the churned containers' entries were never seen: {during:?}"
    );
    assert_eq!(left, (0, 0, 0), "kernel entries of removed cgroups");
    assert_eq!(series_left, 0, "series of removed cgroups");
    assert!(
        tcp_series(&agent, ID_C) > 0,
        "the long-lived container goes on"
    );
    // Remove the long-lived one too: its series end.
    long.remove();
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(
        tcp_series(&agent, ID_C),
        0,
        "a removed container's series end"
    );
}

/// A kubelet stand-in on loopback: answers every `GET /pods` with `body`
/// (or, `stall`, accepts and never answers); remembers the last
/// `Authorization` header and counts requests.
struct FakeKubelet {
    port: u16,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    auth: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl FakeKubelet {
    fn start(body: String, stall: bool) -> Self {
        use std::io::{BufRead, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().unwrap().port();
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let auth = std::sync::Arc::new(std::sync::Mutex::new(None));
        let (r, a) = (requests.clone(), auth.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if stall {
                    held.push(c);
                    continue;
                }
                let mut reader = std::io::BufReader::new(c.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    if let Some(v) = line
                        .strip_prefix("authorization: ")
                        .or(line.strip_prefix("Authorization: "))
                    {
                        *a.lock().unwrap() = Some(v.trim().to_owned());
                    }
                    line.clear();
                }
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakeKubelet {
            port,
            requests,
            auth,
        }
    }
}

/// Pod names from the kubelet (`probes.containers.kubelet_url`): with a
/// kubelet (a stand-in serving a real-shaped pod list) a container's
/// `container.cpu.time` carries its pod, namespace and container names,
/// and the service-account token went as a bearer header. With the kubelet
/// refusing connections, the same series has ids only and the failures are
/// counted; with one that accepts and never answers, collection does not
/// wait for it.
#[test]
fn kubelet_names_pods_and_containers_and_its_failure_degrades_to_ids() {
    let _serial = perch_tests::kernel::privileged();
    let Some(v2) = cgroup2() else {
        eprintln!("skipped: this kernel has no cgroup2 hierarchy mounted");
        return;
    };
    let mut made = Cgroups(Vec::new());
    made.create(
        &v2,
        &format!("{}/cri-containerd-{ID_A}.scope", pod_slice("")),
    );
    let pods = format!(
        r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{}},"items":[
          {{"metadata":{{"name":"web-0","namespace":"shop","uid":"{UID}"}},
            "spec":{{"containers":[{{"name":"app","image":"app:1"}}]}},
            "status":{{"phase":"Running","containerStatuses":[
              {{"name":"app","ready":true,"containerID":"containerd://{ID_A}"}}]}}}}]}}"#
    );
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "s3cret-token\n").unwrap();
    let run = |port: u16| {
        let cfg = perch_tests::perch::ConfigFile::new(&format!(
            "[probes.containers]\nhierarchy = \"v2\"\nkubelet_url = \"http://127.0.0.1:{port}\"\n\
             kubelet_token_file = \"{}\"\nkubelet_refresh_secs = 5\n",
            token.path().display()
        ));
        let mut args = only(&["containers"]);
        args.extend_from_slice(&["--config", cfg.path()]);
        collect(&args, Duration::from_millis(1500), || ()).0
    };
    let attr = |p: &serde_json::Value, k: &str| p["attributes"][k].as_str().map(str::to_owned);

    let kubelet = FakeKubelet::start(pods, false);
    let snap = run(kubelet.port);
    let pts = of(&snap, "container.cpu.time", ID_A);
    assert!(!pts.is_empty(), "the container's series");
    for p in &pts {
        assert_eq!(attr(p, "k8s.pod.name").as_deref(), Some("web-0"), "{p}");
        assert_eq!(
            attr(p, "k8s.namespace.name").as_deref(),
            Some("shop"),
            "{p}"
        );
        assert_eq!(attr(p, "k8s.container.name").as_deref(), Some("app"), "{p}");
    }
    assert_eq!(
        kubelet.auth.lock().unwrap().as_deref(),
        Some("Bearer s3cret-token")
    );
    assert_eq!(
        perch_tests::perch::sum(&snap, "perch.k8s.metadata.pods", &[]),
        1.0
    );
    eprintln!(
        "kubelet up: {} request(s), container.cpu.time of {}… named web-0 / shop / app",
        kubelet.requests.load(std::sync::atomic::Ordering::SeqCst),
        &ID_A[..8]
    );

    // Refused: ids only, and counted.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let snap = run(port);
    let pts = of(&snap, "container.cpu.time", ID_A);
    assert!(
        !pts.is_empty(),
        "the container's series, without the kubelet"
    );
    for p in &pts {
        assert_eq!(attr(p, "k8s.pod.uid").as_deref(), Some(UID));
        assert!(
            attr(p, "k8s.pod.name").is_none(),
            "no name without the kubelet: {p}"
        );
    }
    let errors = perch_tests::perch::sum(
        &snap,
        "perch.k8s.metadata.errors",
        &[("error.type", "request")],
    );
    assert!(errors >= 1.0, "refused refreshes counted: {errors}");

    // Stalled (accepts, never answers; the request times out after 5 s):
    // the collection does not wait.
    let stalled = FakeKubelet::start(String::new(), true);
    let snap = run(stalled.port);
    assert!(!of(&snap, "container.cpu.time", ID_A).is_empty());
    let took = points(&snap, "perch.collection.duration")
        .first()
        .and_then(|p| p["value"].as_f64())
        .expect("perch.collection.duration");
    assert!(
        stalled.requests.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the stalled kubelet was asked"
    );
    // Well under the 5 s the stalled request takes to time out.
    assert!(
        took < 2.5,
        "a collection took {took} s with the kubelet stalled"
    );
    eprintln!("kubelet refused: ids only, {errors} error(s) counted; stalled: collection took {took:.3} s");
}
