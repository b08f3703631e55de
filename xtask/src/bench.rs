//! `cargo xtask bench <cpu|net|export> [ARGS]`: builds release binaries and
//! runs the benchmark binaries in `tests/src/bin/`. Results and the command
//! lines that produced them are recorded in docs/performance.md.

use crate::{cargo, sh, Result};

pub fn bench(args: &[String]) -> Result<()> {
    let (which, rest) = args
        .split_first()
        .ok_or("usage: cargo xtask bench <cpu|net|export> [ARGS]")?;
    let bin = match which.as_str() {
        "cpu" => "bench_cpu",
        "net" => "bench_net",
        "export" => "bench_export",
        other => return Err(format!("unknown benchmark `{other}`: cpu, net or export")),
    };
    crate::setup::setup(true)?;
    if !crate::is_root() {
        return Err("benchmarks load BPF programs and enable kernel BPF stats: run as root".into());
    }
    sh(cargo().args(["build", "--release", "-p", "perch-agent", "--bin", "perch"]))?;
    let perch = crate::root().join("target/release/perch");
    sh(cargo()
        .env("PERCH_BIN", perch)
        .args([
            "run",
            "--release",
            "-q",
            "-p",
            "perch-tests",
            "--bin",
            bin,
            "--",
        ])
        .args(rest))
}
