//! The Debian package as an operator installs it: `dpkg -i` of the
//! `target/debian/perch.deb` that `cargo xtask package deb` (run by
//! `cargo xtask test`) builds, then the installed paths work, the unit is
//! valid, and `dpkg --purge` leaves nothing behind.
//!
//! Privileged and machine-wide: it installs the package on this machine
//! (CI's is disposable) and refuses to run where a `perch` package is
//! already installed, rather than replace it.

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn installed() -> bool {
    run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "perch"]))
        .1
        .contains("install ok installed")
}

/// Purges the package when the test ends, whatever happened.
struct Purge;
impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "perch"]).output();
    }
}

#[test]
fn deb_installs_runs_and_purges_cleanly() {
    let _serial = perch_tests::kernel::privileged();
    let deb = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian/perch.deb");
    assert!(
        deb.exists(),
        "{} is missing: `cargo xtask package deb` builds it (`cargo xtask test` does first)",
        deb.display()
    );
    assert!(
        !installed(),
        "a perch package is already installed on this machine; this test installs and \
         purges its own and will not replace it"
    );
    let _purge = Purge;
    let (ok, out) = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(ok, "dpkg -i: {out}");
    assert!(installed());

    // What the package ships, where the unit expects it.
    for path in [
        "/usr/bin/perch",
        "/etc/perch/perch.toml",
        "/usr/lib/systemd/system/perch.service",
        "/usr/share/doc/perch/README.md",
        "/usr/share/doc/perch/metrics.md",
    ] {
        assert!(Path::new(path).exists(), "{path} not installed");
    }
    let (_, conffiles) = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "perch"]));
    assert!(
        conffiles.contains("/etc/perch/perch.toml"),
        "the config is not a conffile: {conffiles}"
    );
    // The binary is stripped: no DWARF sections left.
    let (_, sections) = run(Command::new("readelf").args(["-S", "/usr/bin/perch"]));
    assert!(
        !sections.contains(".debug_info"),
        "/usr/bin/perch is not stripped"
    );

    // The unit's ExecStartPre, and the plan, from the installed paths.
    let (ok, out) =
        run(Command::new("/usr/bin/perch").args(["validate", "--config", "/etc/perch/perch.toml"]));
    assert!(ok, "perch validate: {out}");
    let (ok, out) = run(Command::new("/usr/bin/perch").args([
        "features",
        "--json",
        "--config",
        "/etc/perch/perch.toml",
    ]));
    assert!(ok, "perch features: {out}");
    let json_start = out.find('{').expect("features JSON");
    let v: serde_json::Value =
        serde_json::from_str(&out[json_start..out.rfind('}').unwrap() + 1]).expect("JSON");
    let sched = v["plan"]["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["family"] == "sched")
        .unwrap();
    assert_eq!(
        sched["source"], "ebpf",
        "the installed (stripped) binary loads its programs: {sched}"
    );

    // The unit as installed passes systemd's own checks.
    let (ok, out) =
        run(Command::new("systemd-analyze")
            .args(["verify", "/usr/lib/systemd/system/perch.service"]));
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify: {out}");
    let (_, out) = run(Command::new("systemd-analyze").args([
        "security",
        "--offline=yes",
        "/usr/lib/systemd/system/perch.service",
    ]));
    let score: f64 = out
        .lines()
        .find_map(|l| l.split("Overall exposure level for perch.service: ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in: {out}"));
    eprintln!("systemd-analyze security exposure: {score}");
    assert!(
        score <= 2.0,
        "exposure {score} (docs/deploying.md says 1.8)"
    );

    // Remove keeps the conffile; purge removes everything.
    let (ok, out) = run(Command::new("dpkg").args(["--remove", "perch"]));
    assert!(ok, "dpkg --remove: {out}");
    assert!(!Path::new("/usr/bin/perch").exists());
    assert!(
        Path::new("/etc/perch/perch.toml").exists(),
        "remove dropped the conffile"
    );
    let (ok, out) = run(Command::new("dpkg").args(["--purge", "perch"]));
    assert!(ok, "dpkg --purge: {out}");
    for path in [
        "/etc/perch/perch.toml",
        "/usr/lib/systemd/system/perch.service",
    ] {
        assert!(!Path::new(path).exists(), "{path} left after purge");
    }
    assert!(!installed());
}
