//! The kernel's own counters, read directly (not through Perch's parsers),
//! as the reference the agent's figures are compared with.

/// `/proc/stat` `ctxt`: context switches since boot.
pub fn ctxt() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").expect("reading /proc/stat");
    s.lines()
        .find_map(|l| l.strip_prefix("ctxt "))
        .and_then(|v| v.trim().parse().ok())
        .expect("ctxt in /proc/stat")
}

/// `/proc/stat` columns of `cpuN` (or `cpu` for `None`), in ticks.
pub fn cpu_ticks(cpu: Option<usize>) -> Vec<u64> {
    let want = match cpu {
        Some(n) => format!("cpu{n} "),
        None => "cpu ".to_owned(),
    };
    let s = std::fs::read_to_string("/proc/stat").expect("reading /proc/stat");
    let line = s.lines().find(|l| l.starts_with(&want)).expect("cpu line");
    line.split_whitespace()
        .skip(1)
        .map(|v| v.parse().expect("tick"))
        .collect()
}

/// `/proc/softirqs`: vector (lower-case) -> count per CPU.
pub fn softirqs() -> Vec<(String, Vec<u64>)> {
    let s = std::fs::read_to_string("/proc/softirqs").expect("reading /proc/softirqs");
    s.lines()
        .skip(1)
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?.trim_end_matches(':').to_lowercase();
            Some((name, it.map(|v| v.parse().expect("count")).collect()))
        })
        .collect()
}

/// Number of online CPUs.
pub fn online_cpus() -> usize {
    let s = std::fs::read_to_string("/proc/stat").expect("reading /proc/stat");
    s.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count()
}

/// `kernel.bpf_stats_enabled` for benchmarks: saved, switched with
/// [`BpfStats::set`], and restored on drop (also on panic).
pub struct BpfStats(String);

impl BpfStats {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";
    pub fn save() -> Self {
        BpfStats(std::fs::read_to_string(Self::PATH).unwrap_or_else(|_| "0".into()))
    }
    pub fn set(&self, on: bool) {
        std::fs::write(Self::PATH, if on { "1" } else { "0" })
            .expect("setting kernel.bpf_stats_enabled");
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.0.trim());
    }
}

/// Runs a shell command and panics with its output when it fails.
pub fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails the test (never skips) when not root, and serialises privileged
/// tests within a test binary: they compare host-wide kernel counters, which
/// another test's workload would disturb. Hold the guard for the whole test.
#[must_use = "hold the guard for the whole test"]
pub fn privileged() -> std::sync::MutexGuard<'static, ()> {
    require_root();
    crate::serial()
}

/// Fails the test (never skips) when not root: privileged tests must run.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "privileged test: needs root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN) to load programs; run `cargo xtask test` as root"
    );
}

/// Samples `/proc/stat ctxt` every ~2 ms with wall-clock stamps, so a test
/// can read the kernel's count at the exact instants perch reports (its
/// attach time and its collection time), whatever else runs on the host.
pub struct CtxtSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(std::time::SystemTime, u64)>>,
}

impl CtxtSampler {
    pub fn start() -> CtxtSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                samples.push((std::time::SystemTime::now(), ctxt()));
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            samples
        });
        CtxtSampler { stop, thread }
    }

    /// Stops sampling and returns the samples, oldest first.
    pub fn finish(self) -> Samples {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        Samples(self.thread.join().expect("sampler thread"))
    }
}

/// Stamped `ctxt` samples.
pub struct Samples(pub Vec<(std::time::SystemTime, u64)>);

impl Samples {
    /// `ctxt` at `t`, interpolated linearly between the two samples around it.
    pub fn at(&self, t: std::time::SystemTime) -> f64 {
        let s = &self.0;
        let i = s.partition_point(|(ts, _)| *ts <= t);
        assert!(i > 0 && i < s.len(), "{t:?} is outside the sampled span");
        let (t0, c0) = s[i - 1];
        let (t1, c1) = s[i];
        let span = t1.duration_since(t0).unwrap_or_default().as_secs_f64();
        let into = t.duration_since(t0).unwrap_or_default().as_secs_f64();
        let frac = if span > 0.0 { into / span } else { 0.0 };
        c0 as f64 + (c1 - c0) as f64 * frac
    }

    /// The largest gap between two samples, in `ctxt` counts: the reading's
    /// own uncertainty.
    pub fn max_step(&self) -> u64 {
        self.0
            .windows(2)
            .map(|w| w[1].1 - w[0].1)
            .max()
            .unwrap_or(0)
    }
}

/// Threads alive on the host now (`/proc/<pid>/task/*`).
pub fn live_threads() -> usize {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_dir(e.path().join("task")).ok())
        .map(Iterator::count)
        .sum()
}

/// Mounts tracefs at /sys/kernel/tracing while any guard lives if it is
/// not mounted (classic tracepoints need it), and unmounts it after the last
/// guard goes. Guards are counted process-wide: tests of one binary run in
/// parallel, and one test's unmount must not pull tracefs from under another.
pub struct Tracefs(());

/// Live guards, and whether the first of them mounted tracefs.
static TRACEFS: std::sync::Mutex<(usize, bool)> = std::sync::Mutex::new((0, false));

impl Tracefs {
    pub fn ensure() -> Tracefs {
        let mut state = TRACEFS.lock().unwrap_or_else(|e| e.into_inner());
        if state.0 == 0 {
            let mounted = |p: &str| std::path::Path::new(p).join("events").is_dir();
            state.1 = !(mounted("/sys/kernel/tracing") || mounted("/sys/kernel/debug/tracing"));
            if state.1 {
                sh("mount -t tracefs nodev /sys/kernel/tracing");
            }
        }
        state.0 += 1;
        Tracefs(())
    }
}

impl Drop for Tracefs {
    fn drop(&mut self) {
        let mut state = TRACEFS.lock().unwrap_or_else(|e| e.into_inner());
        state.0 -= 1;
        if state.0 == 0 && state.1 {
            let _ = std::process::Command::new("umount")
                .arg("/sys/kernel/tracing")
                .status();
            state.1 = false;
        }
    }
}
