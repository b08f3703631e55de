//! `bpftool`, for tests that read the agent's kernel maps themselves.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

/// `bpftool`'s JSON number for a key or value: a number, a decimal or hex
/// string, or (maps without BTF) an array of `"0xNN"` bytes, little-endian.
pub fn number(v: &serde_json::Value) -> u64 {
    match v {
        serde_json::Value::Number(n) => n.as_u64().expect("an unsigned number"),
        serde_json::Value::String(s) => match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).expect("hex"),
            None => s.parse().expect("decimal"),
        },
        serde_json::Value::Array(bytes) => bytes.iter().rev().fold(0u64, |acc, b| {
            let b = b.as_str().expect("a byte string");
            let b = u8::from_str_radix(b.trim_start_matches("0x"), 16).expect("a hex byte");
            (acc << 8) | u64::from(b)
        }),
        other => panic!("unexpected bpftool number {other}"),
    }
}

/// `bpftool ARGS` parsed as JSON; an error when it fails or prints nothing
/// (as `map show name` does for a name no map has yet).
pub fn try_bpftool(args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new("/usr/sbin/bpftool")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("bpftool {args:?}: {e}"));
    if !out.status.success() || out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Err(format!(
            "bpftool {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("bpftool {args:?} JSON: {e}"))
}

/// The id of the map named `name` held by process `pid`: other agents
/// (other test binaries) may have maps of that name loaded at the same time,
/// so the map is the one among them whose id is in the `map_id:` lines of
/// the agent's `/proc/<pid>/fdinfo` (this bpftool reports no `pids`).
/// `bpftool map show name` prints one match as an object, several as an
/// array, and nothing (exit 0) for none while the agent is still loading.
pub fn map_of(pid: u32, name: &str) -> u32 {
    // The kernel keeps 15 bytes of a map name (BPF_OBJ_NAME_LEN).
    let name = &name[..name.len().min(15)];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // One match is an object, several an array.
        let shown = try_bpftool(&["-j", "map", "show", "name", name]);
        let named: BTreeSet<u32> = match &shown {
            Ok(serde_json::Value::Array(maps)) => maps.iter().collect(),
            Ok(one) => vec![one],
            Err(_) => Vec::new(),
        }
        .into_iter()
        .filter_map(|m| m["id"].as_u64())
        .map(|id| id as u32)
        .collect();
        let mut held = BTreeSet::new();
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
            for fd in fds.filter_map(Result::ok) {
                let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
                held.extend(
                    info.lines()
                        .filter_map(|l| l.strip_prefix("map_id:"))
                        .filter_map(|id| id.trim().parse::<u32>().ok()),
                );
            }
        }
        let ours: Vec<u32> = named.intersection(&held).copied().collect();
        match ours[..] {
            [id] => return id,
            [] if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            _ => panic!(
                "perch (pid {pid}) holds {name} maps {ours:?} \
                 (maps of that name: {named:?})"
            ),
        }
    }
}

/// The first 8 bytes of a key or value of `bpftool -j` (an array of
/// `"0xNN"` bytes, little-endian, or a number): e.g. the `u64` a struct key
/// starts with.
pub fn leading_u64(v: &serde_json::Value) -> u64 {
    match v {
        serde_json::Value::Array(bytes) => number(&serde_json::Value::Array(
            bytes.iter().take(8).cloned().collect(),
        )),
        other => number(other),
    }
}

/// The elements of map `id` (`bpftool -j map dump id`): each with `key`,
/// and `value` or (per-CPU maps) `values`, `[{"cpu": N, "value": ...}]`.
pub fn dump(id: u32) -> Vec<serde_json::Value> {
    let dump = try_bpftool(&["-j", "map", "dump", "id", &id.to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    dump.as_array()
        .expect("bpftool dump: an array")
        .iter()
        .map(|e| e.get("formatted").unwrap_or(e).clone())
        .collect()
}

/// The keys of map `id`.
pub fn keys(id: u32) -> Vec<serde_json::Value> {
    dump(id).into_iter().map(|e| e["key"].clone()).collect()
}

/// The leading `u64` of every CPU's value of every element of per-CPU map
/// `id` (e.g. the id field a per-CPU array's slots start with).
pub fn per_cpu_leading_u64(id: u32) -> Vec<u64> {
    dump(id)
        .iter()
        .flat_map(|e| {
            e["values"]
                .as_array()
                .expect("a per-CPU map")
                .iter()
                .map(|v| leading_u64(&v["value"]))
                .collect::<Vec<_>>()
        })
        .collect()
}
