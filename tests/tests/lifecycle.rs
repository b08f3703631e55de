//! Start and stop: while perch runs its programs are loaded and attached;
//! after SIGTERM nothing of it is left in the kernel (no program, no pin).

use std::collections::BTreeMap;
use std::process::Command;

use perch_tests::perch::Agent;

/// Loaded BPF programs, `id -> name` (`bpftool prog show --json`; the name
/// is the full one from BTF, or the kernel's 15 characters).
fn loaded_programs() -> BTreeMap<u64, String> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .expect("bpftool (apt bpftool; `cargo xtask setup --test` installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v.as_array()
        .expect("array")
        .iter()
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_owned())))
        .collect()
}

/// Programs that appeared since `before` (another agent on the host, if
/// any, keeps its own).
fn new_since(before: &BTreeMap<u64, String>) -> BTreeMap<u64, String> {
    loaded_programs()
        .into_iter()
        .filter(|(id, _)| !before.contains_key(id))
        .collect()
}

#[test]
fn sigterm_detaches_and_unloads_everything() {
    let _serial = perch_tests::kernel::privileged();
    let before = loaded_programs();
    let agent = Agent::start(&["--interval", "1s"]);
    let ours = new_since(&before);
    let names: Vec<&String> = ours.values().collect();
    let same = |a: &str, b: &str| a.get(..15).unwrap_or(a) == b.get(..15).unwrap_or(b);
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
    assert!(
        !names
            .iter()
            .any(|n| n.ends_with("_raw") || same(n, "sched_switch_raw")),
        "unused raw_tp variants stay loaded: {names:?}"
    );
    assert!(agent.stop(), "perch did not exit cleanly on SIGTERM");
    let now = loaded_programs();
    let left: Vec<&String> = ours
        .iter()
        .filter(|(id, _)| now.contains_key(id))
        .map(|(_, n)| n)
        .collect();
    assert!(left.is_empty(), "left loaded after SIGTERM: {left:?}");
    let pinned = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(pinned, 0, "something is pinned under /sys/fs/bpf");
}
