//! Least privilege and failure paths, against the real kernel:
//! - as `nobody` with only CAP_BPF and CAP_PERFMON (what deploy/ grants),
//!   every eBPF family loads;
//! - with no capability at all, the object cannot load: every family falls
//!   back with the kernel's reason, the agent still collects, and a forced
//!   `ebpf` mode is a start-up error naming the family and the reason.

use std::process::Command;

use perch_tests::perch_bin;

/// A copy of `perch` that uid 65534 can execute wherever the checkout lives
/// (a clone under /root is not traversable by `nobody`).
fn public_perch() -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static COPY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("perch-priv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
        let bin = dir.join("perch");
        std::fs::copy(perch_bin(), &bin).expect("copying perch");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))
            .expect("chmod perch");
        bin
    })
    .clone()
}

/// `perch ARGS` as uid/gid 65534 with exactly `caps` (setpriv, util-linux).
fn perch_as_nobody(caps: &[&str], args: &[&str]) -> std::process::Output {
    let set = if caps.is_empty() {
        "-all".to_owned()
    } else {
        format!(
            "-all,{}",
            caps.iter()
                .map(|c| format!("+{c}"))
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--bounding-set={set}"));
    if !caps.is_empty() {
        cmd.arg(format!("--ambient-caps={set}"));
    }
    cmd.arg(public_perch())
        .args(args)
        .output()
        .expect("setpriv (util-linux)")
}

fn plan(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "perch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn source_of(v: &serde_json::Value, family: &str) -> (String, String) {
    let f = perch_tests::perch::plan_entry(v, family);
    (
        f["source"].as_str().unwrap_or_default().to_owned(),
        f["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

#[test]
fn cap_bpf_and_cap_perfmon_are_enough() {
    let _serial = perch_tests::kernel::privileged();
    let out = perch_as_nobody(&["bpf", "perfmon"], &["features", "--json"]);
    let v = plan(&out);
    assert!(
        v["kernel"]["object_error"].is_null(),
        "{}",
        v["kernel"]["object_error"]
    );
    for family in ["sched", "softirq", "tcp", "drops"] {
        let (source, reason) = source_of(&v, family);
        assert_eq!(
            source, "ebpf",
            "{family} as nobody+CAP_BPF+CAP_PERFMON: {reason}"
        );
        // The preferred variant, not a fallback one: for tcp that is the
        // socket-counter design, whose walk reads every process's files.
        let hook = perch_tests::perch::plan_entry(&v, family)["hook"]
            .as_str()
            .unwrap_or("none")
            .to_owned();
        assert_eq!(
            hook, "tp_btf",
            "{family} as nobody+CAP_BPF+CAP_PERFMON: {reason}"
        );
    }
}

#[test]
fn without_capabilities_every_family_falls_back_and_collection_goes_on() {
    let _serial = perch_tests::kernel::privileged();
    let out = perch_as_nobody(&[], &["collect", "--duration", "300ms", "--format", "json"]);
    let v = plan(&out);
    for family in ["sched", "softirq", "tcp", "drops"] {
        let (source, reason) = source_of(&v, family);
        assert_eq!(source, "procfs", "{family}: {reason}");
        assert!(
            reason.contains("Operation not permitted") && reason.contains("CAP_BPF"),
            "{family}: the reason should carry the kernel's error and the fix: {reason}"
        );
    }
    let names: Vec<&str> = v["metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    for m in [
        "system.cpu.time",
        "perch.cpu.context_switches",
        "perch.cpu.softirq.count",
        "perch.tcp.retransmits",
    ] {
        assert!(
            names.contains(&m),
            "{m} missing from the fallback snapshot: {names:?}"
        );
    }
}

#[test]
fn forced_ebpf_without_capabilities_is_a_startup_error() {
    let _serial = perch_tests::kernel::privileged();
    let out = perch_as_nobody(
        &[],
        &["collect", "--duration", "100ms", "--probe", "sched=ebpf"],
    );
    assert!(
        !out.status.success(),
        "forced ebpf must not start without CAP_BPF"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("probes.sched.mode = \"ebpf\"") && err.contains("Operation not permitted"),
        "the error should name the family and the kernel's reason: {err}"
    );
}

/// As `nobody` with CAP_BPF and CAP_PERFMON, the TCP walk still sees every
/// process's sockets: a loopback connection held by this (root) test
/// process, older than the agent, is adopted, and exactly the N bytes it
/// moves during `perch collect` are counted on both ends.
#[test]
fn the_tcp_walk_counts_other_users_sockets_as_nobody() {
    use std::io::{Read, Write};
    let _serial = perch_tests::kernel::privileged();
    const N: usize = 77_777;
    // Below the ephemeral range: the role of a socket older than the agent
    // is inferred from which end is on an ephemeral port.
    let (l, port) = (20_000..32_000)
        .find_map(|p| Some((std::net::TcpListener::bind(("127.0.0.1", p)).ok()?, p)))
        .expect("a free port below the ephemeral range");
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (mut s, _) = l.accept().expect("accept");
    let mover = std::thread::spawn(move || {
        // Past the agent's start-up, when the walk has adopted both ends.
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let w = std::thread::spawn(move || c.write_all(&[1u8; N]).map(|_| c));
        let mut buf = vec![0u8; N];
        s.read_exact(&mut buf).expect("read");
        (w.join().expect("writer").expect("write"), s)
    });
    let out = perch_as_nobody(
        &["bpf", "perfmon"],
        &[
            "collect",
            "--duration",
            "3s",
            "--format",
            "json",
            "--probe",
            "tcp=ebpf",
        ],
    );
    let v = plan(&out);
    let _ends = mover.join().expect("mover");
    let port = port.to_string();
    let io = |role: &str, dir: &str| {
        perch_tests::perch::sum(
            &v,
            "perch.tcp.io",
            &[
                ("network.peer.address", "127.0.0.1"),
                ("server.port", &port),
                ("perch.tcp.role", role),
                ("network.io.direction", dir),
            ],
        )
    };
    assert_eq!(io("client", "transmit"), N as f64, "client transmit");
    assert_eq!(io("server", "receive"), N as f64, "server receive");
    let adopted = perch_tests::perch::sum(&v, "perch.tcp.sockets.adopted", &[]);
    assert!(
        adopted >= 2.0,
        "adopted {adopted}: the connection's two ends at least"
    );
}

/// Outside the host's pid namespace (a pod without `hostPID`), the agent
/// says what that costs: a start-up warning, and the tcp family's reason
/// names the socket walk's blind spot. In the host's namespace it says
/// nothing of the kind.
#[test]
fn outside_the_host_pid_namespace_the_plan_says_what_is_lost() {
    let _serial = perch_tests::kernel::privileged();
    let features = |cmd: &mut Command| -> serde_json::Value {
        let out = cmd.output().expect("perch features");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("features JSON")
    };
    let tcp_reason = |v: &serde_json::Value| {
        v["plan"]["families"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["family"] == "tcp")
            .map(|p| p["reason"].as_str().unwrap_or_default().to_owned())
            .unwrap()
    };
    let host = features(Command::new(perch_bin()).args(["features", "--json"]));
    assert_eq!(host["kernel"]["host_pid_namespace"], true, "{host}");
    assert_eq!(host["kernel"]["host_proc"], true, "{host}");
    assert!(!tcp_reason(&host).contains("pid namespace"), "{host}");

    let pod = features(
        Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "--"])
            .arg(perch_bin())
            .args(["features", "--json"]),
    );
    assert_eq!(pod["kernel"]["host_pid_namespace"], false, "{pod}");
    assert_eq!(pod["kernel"]["host_proc"], false, "{pod}");
    let warnings = pod["kernel"]["warnings"].to_string();
    assert!(warnings.contains("pid namespace"), "{warnings}");
    assert!(warnings.contains("hostPID"), "{warnings}");
    let reason = tcp_reason(&pod);
    assert!(
        reason.contains("outside the host's pid namespace"),
        "tcp reason: {reason}"
    );
}

/// The same placement is on `/readyz`: a pod without hostPID is ready, and
/// says what it loses on a `warning:` line.
#[test]
fn readyz_names_the_placement_warning() {
    let _serial = perch_tests::kernel::privileged();
    let agent = perch_tests::perch::Agent::start_cmd(
        |run| {
            let mut cmd = Command::new("unshare");
            cmd.args(["--pid", "--fork", "--kill-child", "--mount-proc", "--"])
                .arg(perch_bin())
                .args(run);
            cmd
        },
        &["--interval", "1s"],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let body = loop {
        let (code, body) = agent.get("/readyz").expect("/readyz");
        if code == 200 {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "never ready: {body}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    assert!(body.starts_with("ready\n"), "{body}");
    assert!(
        body.contains("warning: not in the host's pid namespace"),
        "{body}"
    );
    let (_, host) = perch_tests::perch::Agent::start(&["--interval", "1s"])
        .get("/readyz")
        .expect("/readyz");
    assert!(!host.contains("warning:"), "on the host: {host}");
}

/// `/proc/<pid>/task/*/status` capability masks of every thread of `pid`:
/// (thread name, CapPrm, CapEff, CapAmb, NoNewPrivs).
fn thread_caps(pid: u32) -> Vec<(String, u64, u64, u64, bool)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let t = t.expect("task").path();
        let Ok(status) = std::fs::read_to_string(t.join("status")) else {
            continue; // exited meanwhile
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(str::trim)
                .unwrap_or_else(|| panic!("{k} missing from {}", t.display()))
                .to_owned()
        };
        let mask = |k: &str| u64::from_str_radix(&field(k), 16).expect("hex mask");
        out.push((
            field("Name:"),
            mask("CapPrm:"),
            mask("CapEff:"),
            mask("CapAmb:"),
            field("NoNewPrivs:") == "1",
        ));
    }
    out
}

/// `CAP_*` names -> mask (the two this agent may keep).
fn mask_of(names: &[serde_json::Value]) -> u64 {
    names
        .iter()
        .map(|n| match n.as_str() {
            Some("CAP_BPF") => 1u64 << 39,
            Some("CAP_SYS_ADMIN") => 1 << 21,
            other => panic!("unexpected capability kept: {other:?}"),
        })
        .sum()
}

/// After attach every thread of the agent holds only what map reads still
/// need on this kernel (nothing from 6.5 on; CAP_BPF before), CAP_PERFMON
/// never, no ambient set, and no_new_privs; and the eBPF counters still
/// move. Run as the unit runs it (nobody with ambient CAP_BPF and
/// CAP_PERFMON) and as the DaemonSet does (uid 0, bounding set of the two).
#[test]
fn capabilities_are_dropped_after_attach_on_every_thread() {
    let _serial = perch_tests::kernel::privileged();
    let root = tempfile::tempdir().expect("tempdir");
    let as_unit = |run: &[&str]| {
        let set = "-all,+bpf,+perfmon";
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args([format!("--inh-caps={set}"), format!("--bounding-set={set}")])
            .arg(format!("--ambient-caps={set}"))
            .arg(public_perch())
            .args(run);
        cmd
    };
    let unit = perch_tests::perch::Agent::start_cmd(as_unit, &["--interval", "1s"]);
    let daemonset =
        perch_tests::perch::Agent::start_as_daemonset(root.path(), &["--interval", "1s"]);
    for (how, agent) in [("unit", &unit), ("daemonset", &daemonset)] {
        let status: serde_json::Value =
            serde_json::from_str(&agent.get("/status").expect("/status").1).expect("JSON");
        let caps = &status["capabilities"];
        let held: Vec<&str> = caps["held"]
            .as_array()
            .expect("held")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(held, ["CAP_PERFMON", "CAP_BPF"], "{how}: {caps}");
        let kept = mask_of(caps["kept"].as_array().expect("kept"));
        let threads = thread_caps(agent.pid());
        eprintln!(
            "{how}: kept {} ({}), {} threads",
            caps["kept"],
            caps["reason"],
            threads.len()
        );
        assert!(threads.len() >= 8, "{how}: {threads:?}");
        for (name, prm, eff, amb, nnp) in &threads {
            assert_eq!(
                (*prm, *eff, *amb, *nnp),
                (kept, kept, 0, true),
                "{how}: thread {name} (CapPrm, CapEff, CapAmb, NoNewPrivs)"
            );
        }
        // Kernel-side counting is still read: context switches grow.
        let switches = |s: &std::collections::BTreeMap<String, f64>| -> f64 {
            s.iter()
                .filter(|(k, _)| k.starts_with("perch_cpu_context_switches_total{"))
                .map(|(_, v)| v)
                .sum()
        };
        let s0 = agent.scrape();
        std::thread::sleep(std::time::Duration::from_millis(2200));
        let s1 = agent.scrape();
        assert!(
            s1.contains_key(
                "perch_probe_state{perch_family=\"sched\",perch_probe_source=\"ebpf\",perch_probe_hook=\"tp_btf\"}"
            ),
            "{how}: sched is not on eBPF"
        );
        assert!(
            switches(&s1) > switches(&s0),
            "{how}: context switches did not grow after the drop"
        );
        let (code, body) = agent.get("/readyz").expect("/readyz");
        assert_eq!(code, 200, "{how}: {body}");
    }
    assert!(unit.stop(), "unit-style perch did not exit cleanly");
    assert!(
        daemonset.stop(),
        "daemonset-style perch did not exit cleanly"
    );
}

/// `agent.drop_capabilities = false` keeps what the agent was given.
#[test]
fn drop_capabilities_false_keeps_them() {
    let _serial = perch_tests::kernel::privileged();
    let root = tempfile::tempdir().expect("tempdir");
    let cfg = root.path().join("perch.toml");
    std::fs::write(&cfg, "[agent]\ndrop_capabilities = false\n").expect("config");
    let agent = perch_tests::perch::Agent::start_as_daemonset(
        root.path(),
        &["--interval", "1s", "--config", cfg.to_str().expect("utf-8")],
    );
    let both = (1u64 << 38) | (1 << 39);
    for (name, prm, eff, _, _) in thread_caps(agent.pid()) {
        assert_eq!((prm, eff), (both, both), "thread {name}");
    }
    assert!(agent.stop());
}
