//! Builds `agent-ebpf` for the BPF target and embeds the object in `perch`.
//!
//! Two routes (README, "Building the kernel side"):
//! - `debian` (default): Debian's `rustc-web` with the prebuilt `core` for
//!   `bpfel-unknown-none` (apt `libstd-rust-web-dev-bpf`) and `bpf-linker`
//!   built against the same LLVM. No nightly, no `-Z build-std`.
//! - `nightly`: rustup nightly with `rust-src` and `-Z build-std=core`, the
//!   standard aya route for users outside Debian.
//!
//! Set `PERCH_EBPF_ROUTE`, `PERCH_EBPF_CARGO`, `PERCH_EBPF_RUSTC` and
//! `BPF_LINKER` to override. `aya-build` is not used: its default runs
//! `rustup run nightly`, which does not fit the Debian route.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const ENV_ROUTE: &str = "PERCH_EBPF_ROUTE";
const ENV_CARGO: &str = "PERCH_EBPF_CARGO";
const ENV_RUSTC: &str = "PERCH_EBPF_RUSTC";
const ENV_LINKER: &str = "BPF_LINKER";
const TARGET: &str = "bpfel-unknown-none";

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.parent().context("agent/ has a parent")?;
    let ebpf_dir = root.join("agent-ebpf");
    for p in [
        "agent-ebpf/src",
        "agent-ebpf/Cargo.toml",
        "agent-ebpf/Cargo.lock",
        "agent-common/src",
    ] {
        println!("cargo::rerun-if-changed={}", root.join(p).display());
    }
    for v in [ENV_ROUTE, ENV_CARGO, ENV_RUSTC, ENV_LINKER] {
        println!("cargo::rerun-if-env-changed={v}");
    }

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("bpf");
    let linker = find_linker()?;
    let route = env::var(ENV_ROUTE).unwrap_or_else(|_| "debian".into());

    let mut cmd = match route.as_str() {
        "debian" => {
            let cargo = env::var(ENV_CARGO).unwrap_or_else(|_| "/usr/bin/cargo".into());
            let rustc = env::var(ENV_RUSTC).unwrap_or_else(|_| "/usr/bin/rustc".into());
            for tool in [&cargo, &rustc] {
                if !Path::new(tool).exists() {
                    bail!(
                        "the eBPF toolchain is missing: {tool} not found. Run `cargo xtask setup` \
                         (installs Debian's rustc-web, libstd-rust-web-dev-bpf and bpf-linker), or \
                         set {ENV_ROUTE}=nightly to build with rustup nightly and -Z build-std"
                    );
                }
            }
            let mut cmd = Command::new(&cargo);
            clean_env(&mut cmd);
            cmd.env("RUSTC", &rustc)
                // aya-ebpf uses one unstable feature (inline asm for BPF);
                // this unlocks it for that crate alone.
                .env("RUSTC_BOOTSTRAP", "aya_ebpf")
                .arg("build");
            cmd
        }
        "nightly" => {
            let mut cmd = Command::new(env::var(ENV_CARGO).unwrap_or_else(|_| "cargo".into()));
            clean_env(&mut cmd);
            cmd.args(["+nightly", "build", "-Z", "build-std=core"]);
            cmd
        }
        other => bail!("{ENV_ROUTE}={other}: expected `debian` or `nightly`"),
    };
    cmd.current_dir(&ebpf_dir)
        .args(["--release", "--locked", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        // Keep BTF in the object: aya needs it for BTF maps and tp_btf.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    let status = cmd
        .status()
        .with_context(|| format!("running the eBPF build: {cmd:?}"))?;
    if !status.success() {
        bail!("building agent-ebpf failed ({status}); the command was {cmd:?}");
    }
    let object = target_dir.join(TARGET).join("release").join("perch");
    let out = PathBuf::from(env::var("OUT_DIR")?).join("perch.bpf.o");
    std::fs::copy(&object, &out)
        .with_context(|| format!("copying {} to {}", object.display(), out.display()))?;
    Ok(())
}

/// The outer build's variables must not leak into the nested one.
fn clean_env(cmd: &mut Command) {
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let leaks = (key.starts_with("CARGO") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTUP")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS";
        if leaks {
            cmd.env_remove(key);
        }
    }
}

fn find_linker() -> Result<PathBuf> {
    if let Some(p) = env::var_os(ENV_LINKER) {
        return Ok(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).map(|d| d.join("bpf-linker")).collect())
        .unwrap_or_default();
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = cargo_home {
        candidates.push(home.join("bin").join("bpf-linker"));
    }
    candidates.into_iter().find(|p| p.is_file()).context(
        "bpf-linker not found (looked in $BPF_LINKER, $PATH and $CARGO_HOME/bin). \
         Run `cargo xtask setup`, which builds it against Debian's LLVM 22",
    )
}
