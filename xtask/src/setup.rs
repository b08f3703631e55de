//! `cargo xtask setup`: install what is missing, idempotently.
//!
//! - apt: Debian's `rustc-web` route for the eBPF crate (see
//!   README, "Building the kernel side"), and with `--test` the workload and
//!   peer tools the tests drive.
//! - bpf-linker, built against the LLVM major that `/usr/bin/rustc` uses.
//! - with `--test`: a Python venv at `tests/.venv` from `tests/requirements.txt`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cargo, root, sh, Result};

/// The eBPF route's toolchain: Debian's rustc-web.
pub const EBPF_CARGO: &str = "/usr/bin/cargo";
pub const EBPF_RUSTC: &str = "/usr/bin/rustc";
/// bpf-linker release, pinned: 0.13.0 offers features llvm-21/22/23.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM: &[u32] = &[21, 22, 23];

const APT_BUILD: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-clippy",
];
const APT_TEST: &[&str] = &[
    "stress-ng",
    "iperf3",
    "iproute2",
    "iptables",
    "python3-venv",
    "bpftool",
    "prometheus",
    // `cargo xtask bench export` compares series with node_exporter's.
    "prometheus-node-exporter",
    "procps",
    // `cargo xtask kernels` (issue 12): boots Debian kernels under qemu with
    // a busybox initramfs built with cpio; 6.12's modules are xz-compressed.
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
];

pub fn setup(with_tests: bool) -> Result<()> {
    if !Path::new("/usr/bin/apt-get").exists() || !Path::new("/etc/debian_version").exists() {
        return Err(
            "this setup installs Debian packages and found no apt-get. On other \
                    distributions build the kernel side the standard aya way: rustup nightly \
                    with rust-src, `cargo install bpf-linker`, and PERCH_EBPF_ROUTE=nightly \
                    (README, \"Building the kernel side\")"
                .into(),
        );
    }
    let mut want: Vec<String> = APT_BUILD.iter().map(|s| s.to_string()).collect();
    if with_tests {
        want.extend(APT_TEST.iter().map(|s| s.to_string()));
    }
    apt_install(&want)?;
    let llvm = rustc_llvm_major()?;
    if !BPF_LINKER_LLVM.contains(&llvm) {
        return Err(format!(
            "/usr/bin/rustc uses LLVM {llvm}, and bpf-linker {BPF_LINKER_VERSION} supports LLVM \
             {BPF_LINKER_LLVM:?}: move BPF_LINKER_VERSION in xtask/src/setup.rs to a release \
             with an llvm-{llvm} feature"
        ));
    }
    apt_install(&[format!("llvm-{llvm}-dev")])?;
    install_bpf_linker(llvm)?;
    if with_tests {
        python_venv()?;
        install_cargo_deb()?;
    }
    eprintln!("xtask: setup complete");
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt_install(pkgs: &[String]) -> Result<()> {
    let missing: Vec<&String> = pkgs.iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::is_root() {
        return Err(format!(
            "apt packages missing: {missing:?}; run setup as root to install them"
        ));
    }
    eprintln!("xtask: installing apt packages: {missing:?}");
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
}

/// The LLVM major version of Debian's rustc (`LLVM version: 22.1.8`).
fn rustc_llvm_major() -> Result<u32> {
    let out = Command::new(EBPF_RUSTC)
        .arg("-vV")
        .output()
        .map_err(|e| format!("{EBPF_RUSTC} -vV: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .ok_or_else(|| format!("no `LLVM version:` line in `{EBPF_RUSTC} -vV`:\n{text}"))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

pub fn bpf_linker_path() -> PathBuf {
    std::env::var_os("BPF_LINKER")
        .map(PathBuf::from)
        .unwrap_or_else(|| cargo_home().join("bin").join("bpf-linker"))
}

/// Installs bpf-linker unless one linked against `libLLVM.so.<llvm>` exists.
fn install_bpf_linker(llvm: u32) -> Result<()> {
    let path = bpf_linker_path();
    if path.exists() {
        let ldd = Command::new("ldd")
            .arg(&path)
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        if String::from_utf8_lossy(&ldd).contains(&format!("libLLVM.so.{llvm}")) {
            return Ok(());
        }
        eprintln!(
            "xtask: {} is not linked against LLVM {llvm}; rebuilding it",
            path.display()
        );
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} (about a minute)"
    );
    sh(cargo()
        .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}"))
        .args(["install", "--locked", "--force"])
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{llvm}")))
}

/// cargo-deb, pinned, for `cargo xtask package deb`.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

pub fn cargo_deb_path() -> PathBuf {
    cargo_bin("cargo-deb")
}

/// A binary `cargo install` put in `$CARGO_HOME/bin`.
pub fn cargo_bin(name: &str) -> PathBuf {
    cargo_home().join("bin").join(name)
}

/// Installs cargo-deb unless that version is there (about a minute and a
/// half on 2 cores).
pub fn install_cargo_deb() -> Result<()> {
    let have = Command::new(cargo_deb_path())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION))
        .unwrap_or(false);
    if have {
        return Ok(());
    }
    eprintln!("xtask: building cargo-deb {CARGO_DEB_VERSION} (for `cargo xtask package deb`)");
    sh(cargo()
        .args(["install", "--locked", "--force"])
        .arg(format!("cargo-deb@{CARGO_DEB_VERSION}")))
}

/// Creates `tests/.venv` and installs `tests/requirements.txt` when it changed.
fn python_venv() -> Result<()> {
    let venv = root().join("tests/.venv");
    let req = root().join("tests/requirements.txt");
    if !req.exists() {
        return Ok(());
    }
    let wanted = std::fs::read_to_string(&req).map_err(|e| format!("{}: {e}", req.display()))?;
    let stamp = venv.join(".perch-requirements");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(());
    }
    // Debian's python3 with the venv module (apt python3-venv), by absolute
    // path: a pyenv shim on PATH may lack it.
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    eprintln!("xtask: creating {} from {}", venv.display(), req.display());
    // --clear: a venv left by another interpreter (e.g. pyenv) is rebuilt.
    sh(Command::new(python)
        .args(["-m", "venv", "--clear"])
        .arg(&venv))?;
    sh(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&req))?;
    std::fs::write(&stamp, wanted).map_err(|e| format!("{}: {e}", stamp.display()))
}

/// Environment for commands run with the eBPF toolchain.
pub struct EbpfEnv {
    pub cargo: PathBuf,
    pub linker: PathBuf,
}

pub fn ebpf_env() -> Result<EbpfEnv> {
    let linker = bpf_linker_path();
    if !linker.exists() {
        return Err(format!(
            "{} missing: run `cargo xtask setup`",
            linker.display()
        ));
    }
    Ok(EbpfEnv {
        cargo: PathBuf::from(EBPF_CARGO),
        linker,
    })
}

impl EbpfEnv {
    /// `cargo clippy` on `agent-ebpf` for the BPF target, with Debian's
    /// clippy (apt rust-web-clippy), which matches its rustc.
    pub fn clippy(&self) -> Command {
        let mut cmd = Command::new(&self.cargo);
        for (key, _) in std::env::vars_os() {
            let Some(key) = key.to_str() else { continue };
            if (key.starts_with("CARGO") && key != "CARGO_HOME")
                || key.starts_with("RUSTC")
                || key.starts_with("RUSTUP")
                || key == "RUSTFLAGS"
            {
                cmd.env_remove(key);
            }
        }
        // /usr/bin first, so `cargo clippy` finds Debian's cargo-clippy and
        // clippy-driver rather than rustup's proxies.
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("/usr/bin:{path}"))
            .env("RUSTC", EBPF_RUSTC)
            .env("RUSTC_BOOTSTRAP", "aya_ebpf")
            .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &self.linker)
            .args([
                "clippy",
                "--manifest-path",
                "agent-ebpf/Cargo.toml",
                "--release",
                "--locked",
            ])
            .args(["--target", "bpfel-unknown-none", "--target-dir"])
            .arg(root().join("target/bpf-clippy"))
            .args(["--", "-D", "warnings"]);
        cmd
    }
}
