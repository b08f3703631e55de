//! `cargo xtask kernels`: the kernel matrix (issue 12).
//!
//! Fetches Debian's own cloud kernels with apt from a private apt
//! configuration under `target/kernels/apt` (never the machine's), builds an
//! initramfs with the release `perch`, its libraries, busybox, the workload
//! and iptables-legacy with each kernel's netfilter modules, boots each
//! kernel with qemu (KVM when `/dev/kvm` opens, else TCG), and hands the
//! serial console logs to `tests/kernels/report.py`, which checks the
//! figures and writes `docs/kernels.md`. A package that cannot be fetched,
//! a boot that does not finish, or a wrong figure is a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{root, sh, Result};

/// (label, apt-cache pattern of the package name): the newest match.
const KERNELS: &[(&str, &str)] = &[
    (
        "5.10 (bullseye)",
        r"^linux-image-5\.10\.0-[0-9]+-cloud-amd64$",
    ),
    (
        "6.1 (bookworm)",
        r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$",
    ),
    (
        "6.12 (bookworm)",
        r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64$",
    ),
];

const SOURCES: &str = "\
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian-security bookworm-security main
deb http://deb.debian.org/debian bullseye main
deb http://deb.debian.org/debian-security bullseye-security main
";

/// A boot that has not powered off by then failed.
const BOOT_TIMEOUT_SECS: u32 = 300;

fn dir() -> PathBuf {
    root().join("target/kernels")
}

/// apt-get / apt-cache with the private configuration.
fn apt(tool: &str) -> Command {
    let d = dir().join("apt");
    let mut c = Command::new(tool);
    for (k, v) in [
        ("Dir::Etc::sourcelist", d.join("sources.list")),
        ("Dir::Etc::sourceparts", PathBuf::from("-")),
        ("Dir::State", d.join("state")),
        ("Dir::State::status", d.join("state/status")),
        ("Dir::Cache", d.join("cache")),
    ] {
        c.arg("-o").arg(format!("{k}={}", v.display()));
    }
    c.args(["-o", "APT::Architecture=amd64", "-o", "Debug::NoLocking=1"]);
    c
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{}: {e}", crate::show(cmd)))?;
    if !out.status.success() {
        return Err(format!("`{}` failed ({})", crate::show(cmd), out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Orders Debian versions like `sort -V` does for these names: digit runs
/// by value, the rest bytewise.
fn version_key(s: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let text_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (text, tail) = rest.split_at(text_end);
        let num_end = tail
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (num, tail) = tail.split_at(num_end);
        out.push((num.parse().unwrap_or(0), text.to_owned()));
        rest = tail;
    }
    out
}

/// The newest package matching `pattern`, fetched and unpacked; its vmlinuz.
fn fetch(pattern: &str) -> Result<PathBuf> {
    let names = output(apt("apt-cache").args(["search", "--names-only", pattern]))?;
    let newest = names
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .max_by_key(|n| version_key(n))
        .ok_or_else(|| format!("no package matches {pattern}: the kernel cannot be fetched"))?
        .to_owned();
    let unpacked = dir().join("unpacked").join(&newest);
    let release = newest.trim_start_matches("linux-image-");
    let vmlinuz = unpacked.join(format!("boot/vmlinuz-{release}"));
    if vmlinuz.exists() {
        return Ok(vmlinuz);
    }
    let debs = dir().join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| format!("{}: {e}", debs.display()))?;
    // apt-get download writes to its working directory, which sh() sets.
    let mut get = apt("apt-get");
    get.arg("download").arg(&newest).current_dir(&debs);
    eprintln!("xtask: (in {}) $ {}", debs.display(), crate::show(&get));
    let status = get.status().map_err(|e| format!("apt-get: {e}"))?;
    if !status.success() {
        return Err(format!(
            "apt-get download {newest} failed ({status}): the kernel cannot be fetched"
        ));
    }
    let deb = std::fs::read_dir(&debs)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{newest}_")))
        })
        .ok_or_else(|| format!("apt-get download {newest} left no .deb"))?;
    std::fs::create_dir_all(&unpacked).map_err(|e| format!("{}: {e}", unpacked.display()))?;
    sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    if !vmlinuz.exists() {
        return Err(format!("{} has no {}", deb.display(), vmlinuz.display()));
    }
    Ok(vmlinuz)
}

/// The libraries `bin` loads, from `ldd`.
fn libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(bin))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect())
}

/// The netfilter modules of the guests' loss rule, in load order (each
/// needs only earlier ones), copied from each kernel's package.
const LOSS_MODULES: &[&str] = &[
    "x_tables",
    "ip_tables",
    "iptable_filter",
    "xt_tcpudp",
    "xt_statistic",
];

/// iptables-legacy (apt iptables): the rule's tool, and the extensions it
/// loads with dlopen (so `ldd` does not list them): `-p tcp`, `-m
/// statistic`, `-j DROP`.
const IPTABLES: &str = "/usr/sbin/xtables-legacy-multi";
const XT_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";
const XT_EXTENSIONS: &[&str] = &["libxt_tcp.so", "libxt_statistic.so", "libxt_standard.so"];

/// `name.ko` (or `.ko.xz`, decompressed) from an unpacked kernel package,
/// written to `to`.
fn copy_module(unpacked: &Path, release: &str, name: &str, to: &Path) -> Result<()> {
    let tree = unpacked.join("lib/modules").join(release).join("kernel");
    let mut stack = vec![tree.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
            let path = e.map_err(|e| e.to_string())?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if file == format!("{name}.ko") {
                return std::fs::copy(&path, to)
                    .map(|_| ())
                    .map_err(|e| format!("{}: {e}", path.display()));
            }
            if file == format!("{name}.ko.xz") {
                let out =
                    std::fs::File::create(to).map_err(|e| format!("{}: {e}", to.display()))?;
                return sh(Command::new("xz").arg("-dc").arg(&path).stdout(out));
            }
        }
    }
    Err(format!(
        "{name}.ko is not in {} (built in? the guests' loss rule loads it as a module)",
        tree.display()
    ))
}

/// target/kernels/initrd.gz: busybox, the stripped release perch and its
/// libraries, the workload (tests/kernels/blast.rs), iptables-legacy and,
/// for each kernel (`(release, unpacked package)`), the loss rule's
/// modules under /lib/modules/RELEASE/, tests/kernels/init as /init.
fn initramfs(kernels: &[(String, PathBuf)]) -> Result<PathBuf> {
    let staging = dir().join("initramfs");
    let _ = std::fs::remove_dir_all(&staging);
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "run"] {
        std::fs::create_dir_all(staging.join(d)).map_err(|e| e.to_string())?;
    }
    let copy = |from: &Path, to: &Path| -> Result<()> {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        std::fs::copy(from, to)
            .map(|_| ())
            .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
    };
    copy(Path::new("/bin/busybox"), &staging.join("bin/busybox"))?;
    let perch = root().join("target/release/perch");
    sh(Command::new("strip")
        .arg("-o")
        .arg(staging.join("perch"))
        .arg(&perch))?;
    // A file at its own path under the staging root.
    let copy_in = |from: &Path| copy(from, &staging.join(from.strip_prefix("/").unwrap_or(from)));
    for lib in libraries(&perch)? {
        copy_in(&lib)?;
    }
    copy(Path::new(IPTABLES), &staging.join("xtables-legacy-multi"))?;
    for lib in libraries(Path::new(IPTABLES))? {
        copy_in(&lib)?;
    }
    for ext in XT_EXTENSIONS {
        copy_in(&Path::new(XT_DIR).join(ext))?;
    }
    for (release, unpacked) in kernels {
        let to = staging.join("lib/modules").join(release);
        std::fs::create_dir_all(&to).map_err(|e| format!("{}: {e}", to.display()))?;
        for m in LOSS_MODULES {
            copy_module(unpacked, release, m, &to.join(format!("{m}.ko")))?;
        }
    }
    copy(&root().join("tests/kernels/init"), &staging.join("init"))?;
    // The workload, static (the guest has only perch's libraries).
    sh(Command::new("rustc")
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
        ])
        .arg(root().join("tests/kernels/blast.rs"))
        .arg("-o")
        .arg(staging.join("blast")))?;
    let out = dir().join("initrd.gz");
    let script = format!(
        "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
        staging.display(),
        out.display()
    );
    sh(Command::new("sh").args(["-c", &script]))?;
    Ok(out)
}

fn kvm_works() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Boots `vmlinuz` with the initramfs; returns the console log's path.
/// KVM first where `/dev/kvm` opens; if qemu fails there (a VM without
/// nested virtualisation aborts at the first vCPU), TCG.
fn boot(label: &str, vmlinuz: &Path, initrd: &Path) -> Result<PathBuf> {
    let log = dir().join(format!(
        "{}.log",
        label.split_whitespace().next().unwrap_or(label)
    ));
    let accels: &[&str] = if kvm_works() {
        &["kvm", "tcg"]
    } else {
        &["tcg"]
    };
    let mut last = String::new();
    for accel in accels {
        let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = Command::new("timeout");
        cmd.arg(BOOT_TIMEOUT_SECS.to_string())
            .arg("qemu-system-x86_64")
            .args(["-m", "1024", "-smp", "2", "-nographic", "-no-reboot"])
            // Single-threaded TCG: with one host thread per vCPU, the
            // kernel's live code patching (text_poke, as attaching a
            // tracepoint does) raced another vCPU here once: an int3 Oops
            // in handle_softirqs on 6.12. One thread runs both vCPUs in
            // turn and keeps them coherent.
            .args([
                "-accel",
                if *accel == "tcg" {
                    "tcg,thread=single"
                } else {
                    accel
                },
            ]);
        if *accel == "kvm" {
            cmd.args(["-cpu", "host"]);
        }
        cmd.arg("-kernel")
            .arg(vmlinuz)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::null());
        let started = std::time::Instant::now();
        eprintln!("xtask: $ {}", crate::show(&cmd));
        match cmd.status() {
            Ok(s) if s.success() => {
                eprintln!(
                    "xtask: {label}: booted and ran in {:.1} s ({accel})",
                    started.elapsed().as_secs_f64()
                );
                return Ok(log);
            }
            Ok(s) => last = format!("qemu ({accel}) failed ({s}); console in {}", log.display()),
            Err(e) => last = format!("qemu: {e}"),
        }
        eprintln!("xtask: {label}: {last}");
    }
    Err(last)
}

pub fn kernels(_args: &[String]) -> Result<()> {
    let apt_dir = dir().join("apt");
    for d in ["state/lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(apt_dir.join(d)).map_err(|e| e.to_string())?;
    }
    std::fs::write(apt_dir.join("sources.list"), SOURCES).map_err(|e| e.to_string())?;
    std::fs::write(apt_dir.join("state/status"), "").map_err(|e| e.to_string())?;
    sh(apt("apt-get").args(["update", "-qq"]))?;
    sh(crate::cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "perch-agent",
        "--bin",
        "perch",
    ]))?;
    let mut fetched = Vec::new();
    for (label, pattern) in KERNELS {
        fetched.push((*label, fetch(pattern)?));
    }
    // vmlinuz is UNPACKED/boot/vmlinuz-RELEASE.
    let trees: Vec<(String, PathBuf)> = fetched
        .iter()
        .map(|(_, vmlinuz)| {
            let name = vmlinuz.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let release = name.trim_start_matches("vmlinuz-").to_owned();
            let unpacked = vmlinuz
                .parent()
                .and_then(Path::parent)
                .unwrap_or(Path::new("/"));
            (release, unpacked.to_owned())
        })
        .collect();
    let initrd = initramfs(&trees)?;
    let mut report = Command::new("python3");
    report
        .arg(root().join("tests/kernels/report.py"))
        .arg("--write")
        .arg(root().join("docs/kernels.md"));
    for (label, vmlinuz) in &fetched {
        let log = boot(label, vmlinuz, &initrd)?;
        report.arg(format!("{label}={}", log.display()));
    }
    sh(&mut report)
}

#[cfg(test)]
mod tests {
    use super::version_key;

    #[test]
    fn versions_sort_by_value() {
        let mut v = [
            "linux-image-6.12.9+deb12-cloud-amd64",
            "linux-image-6.12.118+deb12-cloud-amd64",
            "linux-image-6.12.100+deb12-cloud-amd64",
        ];
        v.sort_by_key(|s| version_key(s));
        assert_eq!(v[2], "linux-image-6.12.118+deb12-cloud-amd64");
        assert_eq!(v[0], "linux-image-6.12.9+deb12-cloud-amd64");
    }
}
