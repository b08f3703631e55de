//! Start and stop: while perch runs, the programs of its planned variants
//! are loaded and attached, and no others; after SIGTERM nothing of it is
//! left in the kernel: no program, no map, no pin.
//!
//! "Of it" means the BPF objects the agent's own process holds, read from
//! its file descriptors (`/proc/<pid>/fdinfo`), not whatever is loaded or
//! pinned on the host: another tool's programs, maps or pins neither fail
//! this test nor hide a leak of Perch's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use perch::families::Family;
use perch_tests::perch::Agent;
use serde_json::Value;

/// `bpftool ARGS --json`, parsed.
fn bpftool(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .args(args)
        .arg("--json")
        .output()
        .expect("bpftool (apt bpftool; `cargo xtask setup --test` installs it)");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

/// Loaded BPF programs, `id -> name` (`bpftool prog show`; the name is the
/// full one from BTF, or the kernel's 15 characters).
fn loaded_programs() -> BTreeMap<u64, String> {
    bpftool(&["prog", "show"])
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_owned())))
        .collect()
}

/// Ids of the BPF maps in the kernel (`bpftool map show`).
fn loaded_maps() -> BTreeSet<u64> {
    bpftool(&["map", "show"])
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|m| m["id"].as_u64())
        .collect()
}

/// The BPF objects a process holds.
#[derive(Debug, Default)]
struct Held {
    /// Programs: its program fds, and the programs of its link fds.
    programs: BTreeSet<u64>,
    maps: BTreeSet<u64>,
}

/// What `pid` holds, from its fds: `anon_inode:bpf-prog` and
/// `anon_inode:bpf_link` fds show a `prog_id` in their fdinfo,
/// `anon_inode:bpf-map` fds a `map_id`.
fn held_by(pid: u32) -> Held {
    let mut held = Held::default();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the agent's fds");
    for fd in fds {
        let fd = fd.expect("fd entry");
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue; // closed meanwhile
        };
        let (set, key) = match target.to_string_lossy().as_ref() {
            "anon_inode:bpf-prog" | "anon_inode:bpf_link" => (&mut held.programs, "prog_id:"),
            "anon_inode:bpf-map" => (&mut held.maps, "map_id:"),
            _ => continue,
        };
        let info = format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy());
        let Ok(text) = std::fs::read_to_string(&info) else {
            continue; // closed meanwhile
        };
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {info}:\n{text}"));
        set.insert(id);
    }
    held
}

/// Every file under the host's bpffs mounts (`/proc/self/mountinfo`), where
/// a pin would be; /sys/fs/bpf is only the usual one.
fn pinned_files() -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mut todo: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next() == Some("bpf")).then(|| PathBuf::from(mount_point))
        })
        .collect();
    let mut files = Vec::new();
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(e.path()),
                Ok(_) => files.push(e.path()),
                Err(_) => {}
            }
        }
    }
    files
}

/// The program or map a pinned file keeps alive: `("prog", id)` for a
/// pinned program or link (its program), `("map", id)` for a map.
fn pinned_object(path: &Path) -> Option<(&'static str, u64)> {
    for (kind, object, key) in [
        ("prog", "prog", "id"),
        ("map", "map", "id"),
        ("link", "prog", "prog_id"),
    ] {
        let out = Command::new("bpftool")
            .args([kind, "show", "pinned"])
            .arg(path)
            .arg("--json")
            .output()
            .expect("bpftool");
        if !out.status.success() {
            continue;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        if let Some(id) = v[key].as_u64() {
            return Some((object, id));
        }
    }
    None
}

/// The programs the running agent should hold: those of the variant its
/// plan chose for each eBPF family (`/features`), less the ones its kernel
/// facts list as unused.
fn planned_programs(agent: &Agent) -> BTreeSet<&'static str> {
    let (code, body) = agent.get("/features").expect("GET /features");
    assert_eq!(code, 200, "{body}");
    let features: Value = serde_json::from_str(&body).expect("/features JSON");
    let unused: BTreeSet<&str> = features["kernel"]["unused_programs"]
        .as_array()
        .expect("kernel.unused_programs")
        .iter()
        .map(|p| p.as_str().expect("program name"))
        .collect();
    let mut want = BTreeSet::new();
    for fp in features["plan"]["families"].as_array().expect("plan") {
        if fp["source"] != "ebpf" {
            continue;
        }
        let name = fp["family"].as_str().expect("family");
        let family = Family::from_name(name).unwrap_or_else(|| panic!("family {name}"));
        let hook = fp["hook"].as_str().expect("an eBPF family has a hook");
        let variant = family
            .rule()
            .variants
            .iter()
            .find(|v| v.hook.name() == hook)
            .unwrap_or_else(|| panic!("{name} has no {hook} variant"));
        want.extend(
            variant
                .programs
                .iter()
                .map(|p| p.program)
                .filter(|p| !unused.contains(p)),
        );
    }
    want
}

#[test]
fn sigterm_detaches_and_unloads_everything() {
    let _serial = perch_tests::kernel::privileged();
    let agent = Agent::start(&["--interval", "1s"]);
    let held = held_by(agent.pid());
    let loaded = loaded_programs();
    let names: Vec<&String> = held
        .programs
        .iter()
        .map(|id| {
            loaded
                .get(id)
                .unwrap_or_else(|| panic!("program {id} the agent holds is not loaded"))
        })
        .collect();
    // bpftool shows the full name where the program has BTF, else the
    // kernel's first 15 characters. A 15-character name may be cut, and
    // matches any name it begins; comparing every name on 15 characters
    // would confuse drops_kfree_skb_btf with drops_kfree_skb_raw.
    const KERNEL_NAME: usize = 15;
    let same = |shown: &str, rule: &str| {
        shown == rule || (shown.len() == KERNEL_NAME && rule.starts_with(shown))
    };
    // Only the planned variant of each eBPF family stays loaded.
    for name in ["sched_switch_btf", "softirq_entry_btf"] {
        assert!(
            names.iter().any(|n| same(n, name)),
            "{name} not loaded while running: {names:?}"
        );
    }
    // With the kernel's sched_info stamps (CONFIG_SCHED_INFO, which this
    // kernel has) the wake-up programs are not needed, and not kept.
    assert!(
        !names.iter().any(|n| n.starts_with("sched_wakeup")),
        "wake-up programs stay loaded though sched_switch reads sched_info: {names:?}"
    );
    // No program that only a raw_tp variant uses (an iterator such as
    // tcp_walk is shared by every variant of its family), by the agent's
    // own rules rather than a name suffix that a 15-character name may
    // have lost.
    let raw: Vec<&str> = Family::ALL
        .iter()
        .flat_map(|f| {
            let variants = f.rule().variants;
            let in_other = |name: &str| {
                variants
                    .iter()
                    .filter(|v| v.hook.name() != "raw_tp")
                    .any(|v| v.programs.iter().any(|p| p.program == name))
            };
            variants
                .iter()
                .filter(|v| v.hook.name() == "raw_tp")
                .flat_map(|v| v.programs.iter().map(|p| p.program))
                .filter(move |p| !in_other(p))
        })
        .collect();
    assert!(!raw.is_empty(), "no raw_tp variant in the rules");
    assert!(
        !names.iter().any(|n| raw.iter().any(|r| same(n, r))),
        "unused raw_tp variants stay loaded: {names:?}"
    );
    // Exactly the planned programs, each once.
    let want = planned_programs(&agent);
    let unplanned: Vec<&&String> = names
        .iter()
        .filter(|n| !want.iter().any(|w| same(n, w)))
        .collect();
    let missing: Vec<&&str> = want
        .iter()
        .filter(|w| !names.iter().any(|n| same(n, w)))
        .collect();
    assert!(
        unplanned.is_empty() && missing.is_empty() && names.len() == want.len(),
        "the agent's programs {names:?} are not its plan's {want:?}: \
         unplanned {unplanned:?}, missing {missing:?}"
    );
    assert!(
        !held.maps.is_empty(),
        "the agent holds no map while its programs run"
    );

    assert!(agent.stop(), "perch did not exit cleanly on SIGTERM");
    // The kernel frees a map whose last reference is gone from a workqueue
    // (`bpf_map_free_deferred`), and a program after an RCU grace period:
    // the ids can outlive the process by some milliseconds on a loaded
    // machine. Anything still there after 5 s is a leak (a pin, an fd
    // passed to another process).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now = loaded_programs();
        let progs: Vec<&String> = held.programs.iter().filter_map(|id| now.get(id)).collect();
        let maps = loaded_maps();
        let left: Vec<&u64> = held.maps.iter().filter(|id| maps.contains(id)).collect();
        if progs.is_empty() && left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left loaded 5 s after SIGTERM: programs {progs:?}, map ids {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A pin keeps its object alive, so the two checks above would already
    // catch one; this names where it is.
    let pins: Vec<(PathBuf, &str, u64)> = pinned_files()
        .into_iter()
        .filter_map(|p| {
            let (kind, id) = pinned_object(&p)?;
            let ours = match kind {
                "prog" => held.programs.contains(&id),
                _ => held.maps.contains(&id),
            };
            ours.then_some((p, kind, id))
        })
        .collect();
    assert!(pins.is_empty(), "the agent's objects pinned: {pins:?}");
}
