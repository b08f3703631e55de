//! Perch's chores: `cargo xtask setup | run | test | bench <cpu|net|export>`.
//!
//! Dependency-free on purpose: `setup` must build on a fresh machine before
//! anything else is installed. Each step says what it does; a failing step
//! stops with the command that failed.

mod bench;
mod fuzz;
mod kernels;
mod setup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

pub type Result<T> = std::result::Result<T, String>;

const USAGE: &str = "\
usage: cargo xtask <command>

  setup [--test]      install what is missing: apt packages, bpf-linker
                      (and with --test: the test tools and tests/.venv)
  run [-- ARGS]       setup, build in release mode, run `perch run ARGS` (as root)
  test                setup --test, then fmt, clippy (userspace and eBPF),
                      build, unit and privileged integration tests, the
                      kernel matrix, and 30 s of fuzzing per target
  bench cpu|net|export
                      benchmarks (see docs/performance.md)
  kernels             boot Debian's 5.10, 6.1 and 6.12 kernels under qemu, run
                      perch in each, check its figures, write docs/kernels.md
  fuzz [--secs N] [TARGET...]
                      run the fuzz targets in fuzz/ for N s each (30)
  package deb         build target/debian/perch_<version>_<arch>.deb
                      (release binary, stripped; unit, config, docs)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("setup") => setup::setup(args.iter().any(|a| a == "--test")),
        Some("run") => run(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("bench") => bench::bench(&args[1..]),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        Some("kernels") => setup::setup(true).and_then(|()| kernels::kernels(&args[1..])),
        Some("package") if args.get(1).map(String::as_str) == Some("deb") => setup::setup(false)
            .and_then(|()| setup::install_cargo_deb())
            .and_then(|()| package_deb()),
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}

/// Prints and runs a command in the workspace root; fails on non-zero exit.
pub fn sh(cmd: &mut Command) -> Result<()> {
    cmd.current_dir(root());
    eprintln!("xtask: $ {}", show(cmd));
    let status = cmd.status().map_err(|e| format!("{}: {e}", show(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed ({status})", show(cmd)))
    }
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub fn is_root() -> bool {
    // Effective uid from /proc: no libc dependency.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn run(args: &[String]) -> Result<()> {
    setup::setup(false)?;
    sh(cargo().args(["build", "--release", "-p", "perch-agent", "--bin", "perch"]))?;
    if !is_root() {
        eprintln!(
            "xtask: note: not root. Perch needs CAP_BPF and CAP_PERFMON to load its programs; \
             without them every family uses its procfs fallback (see `perch features`)."
        );
    }
    let extra: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    let mut cmd = Command::new(root().join("target/release/perch"));
    cmd.arg("run").args(extra);
    sh(&mut cmd)
}

/// Builds the release binary and the Debian package from it.
fn package_deb() -> Result<()> {
    sh(cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "perch-agent",
        "--bin",
        "perch",
    ]))?;
    sh(Command::new(setup::cargo_deb_path()).args([
        "deb",
        "-p",
        "perch-agent",
        "--no-build",
        "--strip",
        "--output",
        "target/debian/perch.deb",
    ]))?;
    eprintln!("xtask: built target/debian/perch.deb");
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    setup::setup(true)?;
    if !is_root() {
        return Err(
            "the test suite loads real BPF programs and creates network namespaces: \
                    run it as root (CI does)"
                .into(),
        );
    }
    let ebpf = setup::ebpf_env()?;
    sh(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // Debian's cargo-web ships no rustfmt; the host rustfmt formats the
    // eBPF sources the same way.
    sh(cargo().args([
        "fmt",
        "--manifest-path",
        "agent-ebpf/Cargo.toml",
        "--",
        "--check",
    ]))?;
    sh(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    sh(&mut ebpf.clippy())?;
    sh(cargo().args(["build", "--workspace", "--bins", "--locked"]))?;
    // tests/tests/package.rs installs it.
    package_deb()?;
    let mut t = cargo();
    // Every test binary runs, so one failure does not hide the others.
    t.args(["test", "--workspace", "--locked", "--no-fail-fast"]);
    if !args.is_empty() {
        t.args(args);
    }
    sh(&mut t)?;
    // The kernel matrix: Debian's 5.10, 6.1 and 6.12 under qemu (about
    // 2 minutes under TCG), checked and written to docs/kernels.md.
    kernels::kernels(&[])?;
    // Every parser of untrusted input, under libFuzzer for a short budget
    // each (docs/fuzzing.md has longer runs).
    sh(cargo().args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"]))?;
    fuzz::fuzz(&["--secs".to_owned(), "30".to_owned()])
}
