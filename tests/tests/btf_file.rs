//! `probes.btf_path`: a kernel whose BTF is not visible runs the same
//! variants as with its BTF once it is handed the same BTF as a file; without
//! the file the plan names the missing BTF. A file that is not BTF stops the
//! agent with the cause, whichever form (file, env, CLI) named it.
//!
//! The BTF is hidden the way a kernel without it looks: a tmpfs over
//! `/sys/kernel/btf` in a mount namespace of the test's own.
//!
//! Privileged: run as root (`cargo xtask test`).

use std::process::Command;

use perch_tests::perch::{plan_entry, points};
use perch_tests::perch_bin;

const FAMILIES: [&str; 4] = ["sched", "softirq", "tcp", "drops"];

/// `perch ARGS` with `/sys/kernel/btf` hidden (an empty tmpfs over it).
fn without_kernel_btf(args: &[&str]) -> std::process::Output {
    let script = r#"set -e
mount --make-rprivate /
mount -t tmpfs none /sys/kernel/btf
exec "$@""#;
    Command::new("unshare")
        .args(["--mount", "--", "sh", "-c", script, "hide-btf"])
        .arg(perch_bin())
        .args(args)
        .output()
        .expect("unshare (util-linux)")
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "perch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// (source, hook) per eBPF family.
fn variants(v: &serde_json::Value) -> Vec<(String, String, String)> {
    FAMILIES
        .iter()
        .map(|f| {
            let e = plan_entry(v, f);
            (
                (*f).to_owned(),
                e["source"].as_str().unwrap_or_default().to_owned(),
                e["hook"].as_str().unwrap_or("none").to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_btf_file_stands_in_for_hidden_kernel_btf() {
    let _serial = perch_tests::kernel::privileged();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("vmlinux.btf");
    std::fs::copy("/sys/kernel/btf/vmlinux", &file)
        .expect("this test needs kernel BTF on the host: /sys/kernel/btf/vmlinux");
    let file = file.to_str().expect("utf-8");

    let host = json(
        &Command::new(perch_bin())
            .args(["features", "--json"])
            .output()
            .expect("perch"),
    );
    let hidden = json(&without_kernel_btf(&["features", "--json"]));
    let handed = json(&without_kernel_btf(&[
        "features",
        "--json",
        "--btf-path",
        file,
    ]));
    eprintln!("host:    {:?}", variants(&host));
    eprintln!("hidden:  {:?}", variants(&hidden));
    eprintln!("handed:  {:?}", variants(&handed));

    // Hidden: no tp_btf anywhere, and the reason names the missing BTF and
    // the way out.
    assert_eq!(hidden["kernel"]["btf"], false);
    for (family, _, hook) in variants(&hidden) {
        assert_ne!(hook, "tp_btf", "{family} on tp_btf without BTF");
    }
    let sched_tp_btf = hidden["kernel"]["hooks"]
        .as_array()
        .expect("hooks")
        .iter()
        .find(|h| h["family"] == "sched" && h["hook"] == "tp_btf")
        .map(|h| h.to_string())
        .unwrap_or_default();
    assert!(
        sched_tp_btf.contains("kernel BTF not available")
            && sched_tp_btf.contains("probes.btf_path"),
        "sched tp_btf status without BTF: {sched_tp_btf}"
    );

    // Handed the file: the host's variants, and the source is named.
    assert_eq!(variants(&handed), variants(&host));
    assert_eq!(handed["kernel"]["btf"], true);
    assert_eq!(handed["kernel"]["btf_source"], file);

    // And it counts: a collection with the file has typed context switches
    // and named drop reasons, as on the host.
    let snap = json(&without_kernel_btf(&[
        "collect",
        "--duration",
        "1s",
        "--format",
        "json",
        "--btf-path",
        file,
    ]));
    let switches: f64 = points(&snap, "perch.cpu.context_switches")
        .iter()
        .filter(|p| p["attributes"]["perch.context_switch.type"] == "voluntary")
        .filter_map(|p| p["value"].as_f64())
        .sum();
    assert!(
        switches > 0.0,
        "no voluntary switches counted with the BTF file"
    );
}

/// Files that cannot be BTF: each is refused at start-up, naming the key or
/// variable, the path and the cause.
#[test]
fn a_file_that_is_not_btf_is_refused_with_the_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success(), "mkfifo failed");
    let big = dir.path().join("big.btf");
    let f = std::fs::File::create(&big).expect("create");
    f.set_len(65 << 20).expect("sparse 65 MiB");
    // A small ELF: the shell's `true`.
    let elf = std::path::PathBuf::from("/bin/true");
    let empty = dir.path().join("empty.btf");
    std::fs::write(&empty, b"").expect("write");
    let cases = [
        (
            fifo.to_str().unwrap().to_owned(),
            "not a regular file (FIFO)",
        ),
        (
            big.to_str().unwrap().to_owned(),
            "a kernel's BTF is at most 67108864 bytes",
        ),
        (
            elf.to_str().unwrap().to_owned(),
            "not raw BTF: starts with 0x457f",
        ),
        (
            empty.to_str().unwrap().to_owned(),
            "shorter than a BTF header",
        ),
        (
            dir.path().join("missing").to_str().unwrap().to_owned(),
            "No such file or directory",
        ),
    ];
    for (path, cause) in &cases {
        let out = Command::new(perch_bin())
            .args(["features", "--btf-path", path])
            .output()
            .expect("perch");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{path} was accepted as BTF");
        assert!(
            err.contains("probes.btf_path") && err.contains(path.as_str()) && err.contains(cause),
            "{path}: the error should name the key, the path and `{cause}`: {err}"
        );
    }
    // A relative path is refused before anything is read, naming the form.
    let blank = dir.path().join("blank.toml");
    std::fs::write(&blank, "").expect("write");
    let out = Command::new(perch_bin())
        .args(["validate", "--config", blank.to_str().unwrap()])
        .env("PERCH_PROBES_BTF_PATH", "btf/vmlinux")
        .output()
        .expect("perch");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("PERCH_PROBES_BTF_PATH") && err.contains("absolute"),
        "relative PERCH_PROBES_BTF_PATH: {err}"
    );
    let cfg = dir.path().join("perch.toml");
    std::fs::write(&cfg, "[probes]\nbtf_path = \"vmlinux.btf\"\n").expect("write");
    let out = Command::new(perch_bin())
        .args(["validate", "--config", cfg.to_str().unwrap()])
        .output()
        .expect("perch");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("probes.btf_path") && err.contains("absolute"),
        "relative probes.btf_path: {err}"
    );
}

/// A copy of `btf` in which the first typedef takes the name of the
/// typedef `target`: a loader that looks `target` up by name finds the
/// wrong type id, as with a BTF file of another kernel build.
fn with_first_typedef_named(btf: &[u8], target: &str) -> Vec<u8> {
    let u32_at = |d: &[u8], at: usize| u32::from_le_bytes(d[at..at + 4].try_into().unwrap());
    let hdr_len = u32_at(btf, 4) as usize;
    let (type_off, type_len) = (u32_at(btf, 8) as usize, u32_at(btf, 12) as usize);
    let str_off = u32_at(btf, 16) as usize;
    let strings = hdr_len + str_off;
    let name = |off: u32| {
        let s = &btf[strings + off as usize..];
        std::str::from_utf8(&s[..s.iter().position(|&b| b == 0).unwrap()]).unwrap()
    };
    let (mut at, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
    let (mut first, mut wanted) = (None, None);
    while at < end {
        let info = u32_at(btf, at + 4);
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        if kind == 8 {
            first.get_or_insert(at);
            if name(u32_at(btf, at)) == target {
                wanted = Some(u32_at(btf, at));
            }
        }
        // The kind's data after the 12-byte common header (uapi btf.h).
        at += 12
            + match kind {
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * vlen,
                6 | 13 => 8 * vlen,
                _ => 0,
            };
    }
    let (first, wanted) = (
        first.expect("a typedef"),
        wanted.expect("the target typedef"),
    );
    let mut out = btf.to_vec();
    out[first..first + 4].copy_from_slice(&wanted.to_le_bytes());
    out
}

/// `perch features --verifier-log`: with a BTF file whose type ids are not
/// the running kernel's, the kernel refuses sched's `tp_btf` program; the
/// whole log is printed, the one-line reason names the kernel's complaint,
/// and sched goes on on `raw_tp`.
#[test]
fn verifier_log_prints_the_kernels_whole_refusal() {
    let _serial = perch_tests::kernel::privileged();
    let dir = tempfile::tempdir().expect("tempdir");
    let btf = std::fs::read("/sys/kernel/btf/vmlinux")
        .expect("this test needs kernel BTF on the host: /sys/kernel/btf/vmlinux");
    let file = dir.path().join("other-build.btf");
    std::fs::write(
        &file,
        with_first_typedef_named(&btf, "btf_trace_sched_switch"),
    )
    .expect("write");
    let file = file.to_str().expect("utf-8");

    let out = Command::new(perch_bin())
        .args(["features", "--verifier-log", "sched", "--btf-path", file])
        .output()
        .expect("perch");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        text.contains("=== sched tp_btf sched_switch_btf: verifier log ===")
            && text.contains("points to wrong type name"),
        "the whole log of the refused program: {text}"
    );

    let v = json(
        &Command::new(perch_bin())
            .args(["features", "--json", "--btf-path", file])
            .output()
            .expect("perch"),
    );
    assert_eq!(plan_entry(&v, "sched")["hook"], "raw_tp");
    let status = v["kernel"]["hooks"]
        .as_array()
        .expect("hooks")
        .iter()
        .find(|h| h["family"] == "sched" && h["hook"] == "tp_btf")
        .map(|h| h["error"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    assert!(
        status.contains("points to wrong type name") && status.len() < 600,
        "one-line reason: {status}"
    );
    let logs = v["kernel"]["verifier_logs"]
        .as_array()
        .expect("verifier_logs");
    assert!(
        logs.iter().any(|l| l["program"] == "sched_switch_btf"),
        "verifier_logs in the JSON: {logs:?}"
    );

    // With nothing refused, it says so.
    let out = Command::new(perch_bin())
        .args(["features", "--verifier-log", "all"])
        .output()
        .expect("perch");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("the verifier refused no program of any family"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
