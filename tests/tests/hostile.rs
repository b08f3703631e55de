//! Hostile conditions (issue 10), against the real binary: what is under
//! `agent.proc_root` and at the config path is not trusted, SIGHUP never
//! kills the agent, and a broken stderr never panics it. Each test is
//! named after the finding it answers and asserts what must be true.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use perch_tests::perch::{free_port, http_get, only, parse_prometheus, sum};
use perch_tests::perch_bin;

/// A proc root whose entries link to the real `/proc`, except `loadavg`
/// (cpu family), a FIFO with no writer, and `softirqs` (softirq family), a
/// link to `/dev/zero`.
fn hostile_proc_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir("/proc").expect("listing /proc") {
        let name = entry.expect("entry").file_name();
        let name = name.to_string_lossy();
        // Process directories are not needed and come and go.
        if name.bytes().all(|b| b.is_ascii_digit()) || name == "loadavg" || name == "softirqs" {
            continue;
        }
        std::os::unix::fs::symlink(Path::new("/proc").join(&*name), dir.path().join(&*name))
            .unwrap_or_else(|e| panic!("linking /proc/{name}: {e}"));
    }
    let fifo = dir.path().join("loadavg");
    let c = std::ffi::CString::new(fifo.to_str().expect("utf-8 path")).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("softirqs")).expect("link");
    dir
}

/// Waits for `child` up to `limit`; kills it and panics on timeout.
fn wait_within(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Collects stderr lines of a child on a thread of their own.
fn capture_stderr(child: &mut Child) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let out = lines.clone();
    let stderr = child.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            out.lock().unwrap().push(line);
        }
    });
    lines
}

/// Waits up to 20 s for a captured line containing every needle.
fn wait_for_line(lines: &Mutex<Vec<String>>, needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(l) = lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| needles.iter().all(|n| l.contains(n)))
        {
            return l.clone();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "no log line with {needles:?}:\n{}",
        lines.lock().unwrap().join("\n")
    );
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn wait_healthy(addr: std::net::SocketAddr, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok((200, _)) = http_get(addr, "/healthz") {
            return;
        }
        if let Some(s) = child.try_wait().expect("try_wait") {
            panic!("perch run exited before it was healthy: {s}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("perch run was not healthy within 20 s");
}

/// Finding: "a FIFO, or a link to /dev/zero, under agent.proc_root: the
/// FIFO stalled all collection forever; /dev/zero reached 7 GB RSS". Now
/// both are refused before a byte is read, counted, and collection ends.
#[test]
fn fifo_or_dev_zero_under_proc_root_is_refused_and_counted() {
    let root = hostile_proc_root();
    let mut args = vec!["collect", "--format", "json", "--duration", "1s"];
    args.extend(only(&["cpu", "softirq"]));
    args.extend(["--probe", "softirq=procfs"]);
    let started = Instant::now();
    let mut child = Command::new(perch_bin())
        .args(&args)
        .env("PERCH_PROC_ROOT", root.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning perch collect");
    let log = capture_stderr(&mut child);
    let mut stdout = child.stdout.take().expect("stdout");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).expect("stdout");
        s
    });
    let status = wait_within(&mut child, Duration::from_secs(60), "perch collect");
    let took = started.elapsed();
    let out = out.join().expect("stdout reader");
    let log = log.lock().unwrap().join("\n");
    assert!(status.success(), "perch collect: {status}\n{log}");
    let snap: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("JSON: {e}\n{out}"));
    for component in ["cpu", "softirq"] {
        let n = sum(
            &snap,
            "perch.collector.errors",
            &[
                ("perch.component", component),
                ("error.type", "not_regular_file"),
            ],
        );
        assert!(n >= 1.0, "{component}: not_regular_file not counted\n{log}");
    }
    assert!(log.contains("loadavg: not a regular file (FIFO)"), "{log}");
    assert!(
        log.contains("softirqs: not a regular file (character device)"),
        "{log}"
    );
    let rss = sum(&snap, "perch.process.memory.rss", &[]);
    assert!(rss < 256.0 * 1024.0 * 1024.0, "RSS {rss} bytes");
    eprintln!(
        "perch collect over a hostile proc root: {:.1} s, RSS {:.0} MiB",
        took.as_secs_f64(),
        rss / 1048576.0
    );
}

/// The same root under `perch run`: every interval counts the refusals,
/// and SIGTERM ends the agent promptly (it never completed with the FIFO).
#[test]
fn fifo_under_proc_root_does_not_stall_run_or_sigterm() {
    let root = hostile_proc_root();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen = addr.to_string();
    let mut args = vec!["run", "--interval", "1", "--listen", listen.as_str()];
    args.extend(only(&["cpu", "softirq"]));
    args.extend(["--probe", "softirq=procfs"]);
    let mut child = Command::new(perch_bin())
        .args(&args)
        .env("PERCH_PROC_ROOT", root.path())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning perch run");
    wait_healthy(addr, &mut child);
    let deadline = Instant::now() + Duration::from_secs(10);
    let count = loop {
        let (code, body) = http_get(addr, "/metrics").expect("scrape");
        assert_eq!(code, 200);
        let n: f64 = parse_prometheus(&body)
            .iter()
            .filter(|(k, _)| {
                k.starts_with("perch_collector_errors") && k.contains("not_regular_file")
            })
            .map(|(_, v)| v)
            .sum();
        if n >= 4.0 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(count >= 4.0, "refusals counted over 2+ intervals: {count}");
    let stopped = Instant::now();
    signal(&child, libc::SIGTERM);
    let status = wait_within(
        &mut child,
        Duration::from_secs(10),
        "perch run after SIGTERM",
    );
    assert!(status.success(), "{status}");
    eprintln!(
        "perch run: {count} refusals counted, exit {:.2} s after SIGTERM",
        stopped.elapsed().as_secs_f64()
    );
}

/// Finding: "SIGHUP during a collector outage: exit 129, no log line, no
/// reload". Now SIGHUP reloads: the log level changes live, other changed
/// keys are named as needing a restart, an invalid file is refused naming
/// file, line and key, and the agent runs on throughout.
#[test]
fn sighup_reloads_and_never_kills() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("perch.toml");
    let write = |text: &str| std::fs::write(&cfg, text).expect("writing config");
    write("[agent]\nlog_level = \"info\"\ninterval_secs = 1\n");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen = addr.to_string();
    let cfg_arg = cfg.display().to_string();
    let mut args = vec![
        "run",
        "--config",
        cfg_arg.as_str(),
        "--listen",
        listen.as_str(),
    ];
    args.extend(only(&["cpu"]));
    let mut child = Command::new(perch_bin())
        .args(&args)
        .env_remove("PERCH_LOG_LEVEL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning perch run");
    let log = capture_stderr(&mut child);
    wait_healthy(addr, &mut child);

    // A live key and a restart key.
    write("[agent]\nlog_level = \"debug\"\ninterval_secs = 2\n");
    signal(&child, libc::SIGHUP);
    wait_for_line(&log, &["agent.log_level applied", "debug"]);
    wait_for_line(&log, &["need a restart", "agent.interval_secs"]);
    assert!(
        child.try_wait().unwrap().is_none(),
        "perch exited on SIGHUP"
    );
    assert_eq!(http_get(addr, "/healthz").expect("healthz").0, 200);

    // An invalid file: refused, naming file, line and key.
    write("[agent]\nlog_level = \"debug\"\ninterval_secs = 0\n");
    signal(&child, libc::SIGHUP);
    let line = wait_for_line(&log, &["new configuration refused"]);
    assert!(
        line.contains(&format!("{}:3: agent.interval_secs", cfg.display())),
        "{line}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "perch exited on SIGHUP"
    );
    assert_eq!(http_get(addr, "/healthz").expect("healthz").0, 200);

    // The level takes effect: at `error`, INFO lines stop.
    write("[agent]\nlog_level = \"error\"\ninterval_secs = 1\n");
    signal(&child, libc::SIGHUP);
    let reloads = |log: &Mutex<Vec<String>>| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("SIGHUP: reloading"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads(&log) < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(reloads(&log), 3);
    std::thread::sleep(Duration::from_millis(500));
    signal(&child, libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        child.try_wait().unwrap().is_none(),
        "perch exited on SIGHUP"
    );
    signal(&child, libc::SIGTERM);
    let status = wait_within(
        &mut child,
        Duration::from_secs(10),
        "perch run after SIGTERM",
    );
    assert!(status.success(), "{status}");
    std::thread::sleep(Duration::from_millis(200));
    let log = log.lock().unwrap();
    let text = log.join("\n");
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("SIGHUP: reloading"))
            .count(),
        3,
        "the 4th SIGHUP logged at INFO under log_level=error:\n{text}"
    );
    assert!(
        !text.contains("stopping"),
        "INFO after log_level=error:\n{text}"
    );
}

/// Finding: "stderr becomes a broken pipe: panic, exit 101, nothing
/// flushed". Now log lines that cannot be written are dropped; SIGTERM
/// gives the normal exit.
#[test]
fn broken_stderr_pipe_does_not_panic() {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen = addr.to_string();
    let mut args = vec!["run", "--interval", "1", "--listen", listen.as_str()];
    args.extend(only(&["cpu"]));
    let mut child = Command::new(perch_bin())
        .args(&args)
        .env("PERCH_LOG_LEVEL", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning perch run");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        if line.expect("stderr").contains("serving /metrics") {
            break;
        }
    }
    // The reader goes away: every later write is EPIPE.
    drop(lines);
    // Log lines after the close: a reload writes several at INFO.
    signal(&child, libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "perch died writing to a closed stderr"
    );
    assert_eq!(http_get(addr, "/healthz").expect("healthz").0, 200);
    // The lost lines are counted (published at the next collection).
    let deadline = Instant::now() + Duration::from_secs(5);
    let dropped = loop {
        let (_, body) = http_get(addr, "/metrics").expect("scrape");
        let n = parse_prometheus(&body)
            .iter()
            .filter(|(k, _)| k.starts_with("perch_log_lines_dropped"))
            .map(|(_, v)| *v)
            .sum::<f64>();
        if n >= 1.0 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(dropped >= 1.0, "perch.log.lines.dropped: {dropped}");
    eprintln!("broken stderr: {dropped} log lines dropped and counted");
    signal(&child, libc::SIGTERM);
    let status = wait_within(
        &mut child,
        Duration::from_secs(10),
        "perch run after SIGTERM",
    );
    assert_eq!(status.code(), Some(0), "{status}");
}

/// Findings: "validate hangs on a FIFO path" and "a 50 MB config takes
/// 800 MB to validate". Both are refused at once, with the reason.
#[test]
fn validate_refuses_a_fifo_and_an_oversized_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let big = dir.path().join("big.toml");
    let mut text = String::from("[agent]\n");
    while text.len() < 50 << 20 {
        text.push_str("# padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&big, &text).expect("writing big config");
    for (path, want) in [
        (&fifo, "a FIFO, not a regular file"),
        (&big, "larger than 1048576 bytes"),
    ] {
        let started = Instant::now();
        let mut child = Command::new(perch_bin())
            .args(["validate", "--config"])
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning perch validate");
        let log = capture_stderr(&mut child);
        let status = wait_within(&mut child, Duration::from_secs(10), "perch validate");
        std::thread::sleep(Duration::from_millis(100));
        let log = log.lock().unwrap().join("\n");
        assert!(!status.success(), "{}: accepted", path.display());
        assert!(
            log.contains(&path.display().to_string()) && log.contains(want),
            "{log}"
        );
        // The cause once, not repeated by the error chain.
        assert_eq!(log.matches(want).count(), 1, "{log}");
        eprintln!(
            "perch validate {}: refused in {:.0} ms",
            path.display(),
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
}

/// `perch validate` checks the environment the agent would read, as the
/// agent does at start-up: each bad value is refused naming the variable,
/// and a header's value (a credential, often) never reaches the log.
#[test]
fn validate_refuses_bad_environment_values_naming_the_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("perch.toml");
    std::fs::write(&cfg, "").expect("writing config");
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "hello\n").expect("writing ca");
    let not_pem = not_pem.to_str().expect("utf-8 path").to_owned();
    for (var, value, want) in [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:99999",
            "port `99999`",
        ),
        (
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            "http://:4318",
            "has no host",
        ),
        (
            "OTEL_EXPORTER_OTLP_INSECURE",
            "maybe",
            "expected true or false",
        ),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", not_pem.as_str(), "no PEM"),
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "authorization: s3cr3t",
            "is not key=value",
        ),
        ("PERCH_INTERVAL", "10", "did you mean PERCH_INTERVAL_SECS?"),
        ("PERCH_PROBES_FOO_MODE", "procfs", "unknown variable"),
    ] {
        let out = Command::new(perch_bin())
            .args(["validate", "--config"])
            .arg(&cfg)
            .env(var, value)
            .output()
            .expect("running perch validate");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value}: accepted");
        assert!(
            err.contains(&format!("environment variable {var}")) && err.contains(want),
            "{var}={value}: {err}"
        );
        assert!(!err.contains("s3cr3t"), "{err}");
    }
    let out = Command::new(perch_bin())
        .args(["validate", "--config"])
        .arg(&cfg)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317")
        .output()
        .expect("running perch validate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("environment: ok (OTEL_EXPORTER_OTLP_ENDPOINT)"),
        "{stdout}"
    );
}

/// The same for a one-shot command's output: `perch collect | head -c 0`
/// is an error naming stdout, not a panic (exit 101).
#[test]
fn closed_stdout_is_an_error_not_a_panic() {
    let mut args = vec!["collect", "--duration", "1s"];
    args.extend(only(&["cpu"]));
    let mut child = Command::new(perch_bin())
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning perch collect");
    drop(child.stdout.take());
    let log = capture_stderr(&mut child);
    let status = wait_within(&mut child, Duration::from_secs(30), "perch collect");
    std::thread::sleep(Duration::from_millis(100));
    let log = log.lock().unwrap().join("\n");
    assert_eq!(status.code(), Some(1), "{status}\n{log}");
    assert!(
        log.contains("perch: error: writing to stdout: Broken pipe"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}
