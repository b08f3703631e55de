//! Running the real `perch` binary: one-shot `perch collect` and a long-lived
//! `perch run` scraped over HTTP.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ::perch::families::Family;
use serde_json::Value;

use crate::perch_bin;

/// Runs `perch collect --format json` over `window`, running `during` once
/// the programs are attached. Returns the JSON snapshot and `during`'s result.
pub fn collect<T>(args: &[&str], window: Duration, during: impl FnOnce() -> T) -> (Value, T) {
    let mut cmd = Command::new(perch_bin());
    cmd.args(["collect", "--format", "json", "--duration"])
        .arg(format!("{}ms", window.as_millis()))
        .args(args);
    collect_with(cmd, during)
}

/// Runs a prepared `perch collect --format json` command (e.g. wrapped in
/// `ip netns exec`), running `during` once the programs are attached.
///
/// stdout is drained on its own thread: a snapshot larger than the pipe
/// buffer would otherwise block perch while we wait on stderr.
pub fn collect_with<T>(mut cmd: Command, during: impl FnOnce() -> T) -> (Value, T) {
    let mut child = cmd
        .env("PERCH_LOG_LEVEL", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning perch collect");
    let mut stdout = child.stdout.take().expect("stdout");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout
            .read_to_string(&mut s)
            .expect("reading perch's stdout");
        s
    });
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut log = String::new();
    // Wait for attach: the start-up summary line.
    for line in lines.by_ref() {
        let line = line.expect("reading perch's stderr");
        log.push_str(&line);
        log.push('\n');
        if line.contains("probes ready") {
            break;
        }
    }
    let result = during();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    log.push_str(&rest.join("\n"));
    let out = out.join().expect("stdout reader");
    let status = child.wait().expect("waiting for perch");
    assert!(status.success(), "perch collect failed: {status}\n{log}");
    let v: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("perch's JSON: {e}\n{out}"));
    (v, result)
}

/// The points of metric `name` in a JSON snapshot.
pub fn points<'a>(snapshot: &'a Value, name: &str) -> Vec<&'a Value> {
    snapshot["metrics"]
        .as_array()
        .expect("metrics array")
        .iter()
        .filter(|m| m["name"] == name)
        .flat_map(|m| m["points"].as_array().expect("points").iter())
        .collect()
}

/// Checks one kernel histogram point of `perch collect --format json`
/// against itself: the kernel's scale, `count` = zeros + buckets, only the
/// populated range (both ends non-zero), and the exact sum's mean inside
/// the populated buckets (OTel bucket `i` is `(2^(i/8), 2^((i+1)/8)]` s).
/// Returns the mean.
pub fn check_exponential(point: &Value) -> f64 {
    check_exponential_at(point, 3)
}

/// [`check_exponential`] at `scale` (the per-cgroup histograms have 1).
pub fn check_exponential_at(point: &Value, scale: i32) -> f64 {
    assert_eq!(point["scale"], scale, "the histogram's scale: {point}");
    let per_power = f64::from(1u32 << scale);
    let count = point["count"].as_u64().expect("count");
    let counts: Vec<u64> = point["bucket_counts"]
        .as_array()
        .expect("bucket_counts")
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect();
    let zeros = point["zero_count"].as_u64().expect("zero_count");
    assert_eq!(
        count,
        zeros + counts.iter().sum::<u64>(),
        "count is the zero count plus the sum of the buckets: {point}"
    );
    assert!(count > 0, "an empty histogram: {point}");
    if zeros < count {
        assert!(
            counts.first() > Some(&0) && counts.last() > Some(&0),
            "only the populated range is exported: {counts:?}"
        );
    }
    let mean = point["sum"].as_f64().expect("sum") / count as f64;
    let offset = point["offset"].as_i64().expect("offset") as f64;
    let lowest = if zeros > 0 {
        0.0
    } else {
        2f64.powf(offset / per_power)
    };
    let highest = 2f64.powf((offset + counts.len() as f64) / per_power);
    assert!(
        lowest <= mean && mean <= highest,
        "mean {mean} s outside the populated buckets [{lowest}, {highest}] s"
    );
    mean
}

/// Sum of the values of metric `name` whose attributes match every `(k, v)`.
pub fn sum(snapshot: &Value, name: &str, filter: &[(&str, &str)]) -> f64 {
    points(snapshot, name)
        .into_iter()
        .filter(|p| {
            filter.iter().all(|(k, v)| {
                let a = &p["attributes"][*k];
                match a.as_str() {
                    Some(s) => s == *v,
                    None => a.as_i64().is_some_and(|i| v.parse::<i64>() == Ok(i)),
                }
            })
        })
        .map(|p| p["value"].as_f64().expect("numeric value"))
        .sum()
}

/// The plan's entry for `family` (in a snapshot, or in `perch features
/// --json`): `source`, `hook`, `reason`, ...
pub fn plan_entry<'a>(snapshot: &'a Value, family: &str) -> &'a Value {
    snapshot["plan"]["families"]
        .as_array()
        .expect("plan")
        .iter()
        .find(|f| f["family"] == family)
        .unwrap_or_else(|| panic!("family {family} not in plan"))
}

/// The source the plan chose for `family`.
pub fn source(snapshot: &Value, family: &str) -> String {
    plan_entry(snapshot, family)["source"]
        .as_str()
        .expect("source")
        .to_owned()
}

/// `--probe FAMILY=off` for every family of the agent but those in `keep`,
/// so that a test runs only the families it checks (quicker, and quiet on
/// the host). The families are the agent's own registry,
/// [`perch::families::Family::ALL`], so a new family needs no test edit.
/// Panics on a name in `keep` that is not a family: a typo would otherwise
/// turn the family under test off too.
pub fn only(keep: &[&str]) -> Vec<&'static str> {
    static OFF: OnceLock<Vec<(&'static str, String)>> = OnceLock::new();
    let off = OFF.get_or_init(|| {
        Family::ALL
            .iter()
            .map(|f| (f.name(), format!("{}=off", f.name())))
            .collect()
    });
    for k in keep {
        assert!(
            off.iter().any(|(name, _)| name == k),
            "`{k}` is not a family: {:?}",
            off.iter().map(|(name, _)| name).collect::<Vec<_>>()
        );
    }
    off.iter()
        .filter(|(name, _)| !keep.contains(name))
        .flat_map(|(_, arg)| ["--probe", arg.as_str()])
        .collect()
}

/// A config file for `--config`, holding `toml`; removed when dropped.
pub struct ConfigFile(tempfile::NamedTempFile);

impl ConfigFile {
    pub fn new(toml: &str) -> ConfigFile {
        let f = tempfile::NamedTempFile::new().expect("temp config");
        std::fs::write(f.path(), toml).expect("write config");
        ConfigFile(f)
    }

    /// The path, as the argument of `--config`.
    pub fn path(&self) -> &str {
        self.0.path().to_str().expect("utf-8 temp path")
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A running `perch run`; stopped with SIGTERM when dropped.
pub struct Agent {
    child: Child,
    pub addr: SocketAddr,
}

/// `perch ARGS` run the way the DaemonSet runs it (deploy/kubernetes):
/// uid 0 in a mount namespace of its own, with the host's `/proc` and
/// `/sys` bind-mounted under `/host` (here: a directory of the test's; `/sys`
/// with its sub-mounts, as the DaemonSet mounts `/sys/fs/cgroup` there too) and
/// used as `agent.proc_root`/`sys_root`, and every capability dropped but
/// CAP_BPF and CAP_PERFMON (the bounding set: what a container with
/// `drop: [ALL]`, `add: [BPF, PERFMON]` gets). The pod shares the host's
/// pid and network namespaces (`hostPID`, `hostNetwork`), so this does too.
pub fn daemonset_command(root: &std::path::Path, args: &[&str]) -> Command {
    let (proc, sys) = (root.join("host/proc"), root.join("host/sys"));
    std::fs::create_dir_all(&proc).expect("mount point");
    std::fs::create_dir_all(&sys).expect("mount point");
    let script = r#"set -e
mount --make-rprivate /
mount --bind /proc "$PERCH_PROC_ROOT"
mount --rbind /sys "$PERCH_SYS_ROOT"
exec setpriv --bounding-set=-all,+bpf,+perfmon --inh-caps=-all -- "$@""#;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--", "sh", "-c", script, "perch-daemonset"])
        .arg(perch_bin())
        .args(args)
        .env("PERCH_PROC_ROOT", &proc)
        .env("PERCH_SYS_ROOT", &sys);
    cmd
}

impl Agent {
    pub fn start(args: &[&str]) -> Agent {
        Self::start_cmd(
            |run| {
                let mut cmd = Command::new(perch_bin());
                cmd.args(run);
                cmd
            },
            args,
        )
    }

    /// As [`Agent::start`], run as the DaemonSet runs it
    /// ([`daemonset_command`]) with its mount points under `root`.
    pub fn start_as_daemonset(root: &std::path::Path, args: &[&str]) -> Agent {
        Self::start_cmd(|run| daemonset_command(root, run), args)
    }

    /// As [`Agent::start`], with the command built by `command` from the
    /// `perch` arguments (a wrapper such as `unshare`).
    pub fn start_cmd(command: impl FnOnce(&[&str]) -> Command, args: &[&str]) -> Agent {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let listen = addr.to_string();
        let mut run = vec!["run", "--listen", &listen];
        run.extend_from_slice(args);
        let child = command(&run)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning perch run");
        let agent = Agent { child, addr };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok((200, _)) = agent.get("/healthz") {
                return agent;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("perch run {args:?} was not healthy within 20 s");
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET `path`: (status, body).
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.addr, path)
    }

    /// Scrapes `/metrics` into `series -> value` (series = name{labels}).
    pub fn scrape(&self) -> BTreeMap<String, f64> {
        let (code, body) = self.get("/metrics").expect("scraping /metrics");
        assert_eq!(code, 200, "{body}");
        parse_prometheus(&body)
    }

    /// Sends SIGTERM and waits; returns whether it exited cleanly.
    pub fn stop(mut self) -> bool {
        self.terminate()
    }

    fn terminate(&mut self) -> bool {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        false
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// A minimal HTTP/1.1 GET (no client dependency), the body as text.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let (code, _, body) = http_get_bytes(addr, path, None)?;
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// A minimal HTTP/1.1 GET with an optional `Accept` header that keeps the
/// body as bytes (protobuf): (status, content type, body).
pub fn http_get_bytes(
    addr: SocketAddr,
    path: &str,
    accept: Option<&str>,
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    // A response cut before the end of its headers is all head, no body.
    let (head, body) = match resp.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(split) => (&resp[..split], resp[split + 4..].to_vec()),
        None => (&resp[..], Vec::new()),
    };
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    let mut body = body;
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
                .unwrap_or(0);
            rest = &rest[eol + 2..];
            if n == 0 || rest.len() < n {
                break;
            }
            out.extend_from_slice(&rest[..n]);
            rest = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
        }
        body = out;
    }
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type:"))
        .unwrap_or("")
        .trim()
        .to_owned();
    Ok((code, content_type, body))
}

/// Prometheus text -> `series -> value`; comments skipped.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let v = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().ok()?,
            };
            Some((series.to_owned(), v))
        })
        .collect()
}
