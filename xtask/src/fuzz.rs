//! `cargo xtask fuzz [--secs N] [TARGET...]`: builds the cargo-fuzz targets
//! in `fuzz/` (one per parser of untrusted input) and runs each for N
//! seconds (default 30), then prints the runs per target. A crash fails
//! with the target's name; libFuzzer leaves the input under
//! `fuzz/artifacts/<target>/`, to become a unit test.
//!
//! On the machine's stable toolchain: `RUSTC_BOOTSTRAP=1` for cargo-fuzz's
//! `-Z` flags and `--sanitizer none` (the coverage instrumentation is
//! stable; AddressSanitizer's runtime is not shipped with stable, and the
//! parsers are safe Rust, where a sanitizer finds little a panic does not).

use std::process::Command;

use crate::{root, sh, Result};

/// cargo-fuzz, pinned.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn cargo_fuzz() -> Command {
    let mut c = crate::cargo();
    c.arg("fuzz").env("RUSTC_BOOTSTRAP", "1");
    c
}

fn install() -> Result<()> {
    let have = Command::new(crate::setup::cargo_bin("cargo-fuzz"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION))
        .unwrap_or(false);
    if have {
        return Ok(());
    }
    sh(crate::cargo()
        .args(["install", "--locked", "--force"])
        .arg(format!("cargo-fuzz@{CARGO_FUZZ_VERSION}")))
}

pub fn fuzz(args: &[String]) -> Result<()> {
    let mut secs = 30u64;
    let mut only = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => {
                secs = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--secs takes a whole number of seconds")?
            }
            t => only.push(t.to_owned()),
        }
    }
    crate::setup::setup(false)?;
    install()?;
    let dir = root().join("fuzz");
    sh(cargo_fuzz()
        .current_dir(&dir)
        .args(["build", "--sanitizer", "none", "-O"]))?;
    let list = cargo_fuzz()
        .current_dir(&dir)
        .arg("list")
        .output()
        .map_err(|e| format!("cargo fuzz list: {e}"))?;
    let targets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::to_owned)
        .filter(|t| only.is_empty() || only.contains(t))
        .collect();
    if targets.is_empty() {
        return Err("no fuzz targets (cargo fuzz list printed none)".into());
    }
    let mut table = Vec::new();
    for t in &targets {
        let corpus = dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
        eprintln!("xtask: fuzzing {t} for {secs} s");
        let out = cargo_fuzz()
            .current_dir(&dir)
            .args(["run", "--sanitizer", "none", "-O", t])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .output()
            .map_err(|e| format!("cargo fuzz run {t}: {e}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "fuzz target {t} crashed (input under fuzz/artifacts/{t}/):\n{}",
                tail.join("\n")
            ));
        }
        let runs = log
            .lines()
            .filter_map(|l| l.strip_prefix("Done "))
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|n| n.parse::<u64>().ok())
            .next_back()
            .unwrap_or(0);
        table.push((t.clone(), runs));
    }
    println!("fuzz target            runs in {secs} s   crashes");
    for (t, runs) in &table {
        println!("{t:<22} {runs:>14}   0");
    }
    Ok(())
}
