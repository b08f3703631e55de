//! Test support shared by the integration tests: locate and run `perch`,
//! drive workloads, read the kernel's own counters.

use std::path::PathBuf;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Serialises the tests of one test binary that must not share the machine
/// with each other: kernel-counter comparisons, and timing-sensitive export
/// fault tests (short intervals and scripted delays on a 2-core machine).
/// Hold the guard for the whole test.
#[must_use = "hold the guard for the whole test"]
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

static ASYNC_SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// [`serial`] for async tests, whose guard lives across `.await`s.
pub async fn serial_async() -> tokio::sync::MutexGuard<'static, ()> {
    ASYNC_SERIAL.lock().await
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `perch` binary built by `cargo build` (the test command builds it
/// before running the tests). Panics with the fix when it is missing.
pub fn perch_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PERCH_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join("perch");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "no perch binary under {}: run `cargo build -p perch-agent` first (cargo xtask test does)",
        target.display()
    );
}

pub mod bench;
pub mod bpftool;
pub mod kernel;
pub mod netns;
pub mod netperch;
pub mod otlp_receiver;
pub mod perch;
pub mod workload;
