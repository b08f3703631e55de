//! Start and stop: while perch runs its programs are loaded and attached;
//! after SIGTERM nothing of it is left in the kernel (no program, no pin).

use std::process::Command;

use perch_tests::perch::Agent;

/// Names of loaded BPF programs (`bpftool prog show --json`; the kernel
/// keeps 15 characters of a name).
fn loaded_programs() -> Vec<String> {
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
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

/// Programs of ours: every family's programs, as the kernel truncates them.
fn ours(names: &[String]) -> Vec<String> {
    let prefixes = ["sched_", "softirq_", "tcp_", "drops_"];
    names
        .iter()
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p)))
        .cloned()
        .collect()
}

#[test]
fn sigterm_detaches_and_unloads_everything() {
    let _serial = perch_tests::kernel::privileged();
    let before = ours(&loaded_programs());
    assert!(
        before.is_empty(),
        "programs of ours loaded before the test: {before:?}"
    );
    let agent = Agent::start(&["--interval", "1s"]);
    let running = ours(&loaded_programs());
    // Only the planned variant of each eBPF family stays loaded.
    // bpftool prints the full name from BTF, or the kernel's 15 characters.
    let same = |a: &str, b: &str| a.get(..15).unwrap_or(a) == b.get(..15).unwrap_or(b);
    for name in ["sched_switch_btf", "sched_wakeup_btf", "softirq_entry_btf"] {
        assert!(
            running.iter().any(|n| same(n, name)),
            "{name} not loaded while running: {running:?}"
        );
    }
    assert!(
        !running
            .iter()
            .any(|n| same(n, "sched_switch_raw") || n.ends_with("_raw")),
        "unused raw_tp variants stay loaded: {running:?}"
    );
    assert!(agent.stop(), "perch did not exit cleanly on SIGTERM");
    let after = ours(&loaded_programs());
    assert!(after.is_empty(), "left loaded after SIGTERM: {after:?}");
    let pinned = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(pinned, 0, "something is pinned under /sys/fs/bpf");
}
