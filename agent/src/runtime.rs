//! The agent's run loop: collect every interval on a thread of its own,
//! pass the snapshot through the pipeline, publish it for `/metrics` and hand
//! it to the OTLP exporter without waiting.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tracing::{error, info, warn};

use crate::collectors;
use crate::collectors::worker::{Missed, Worker};
use crate::config::Config;
use crate::gate::{Family, Plan};
use crate::model::{Metric, Snapshot};
use crate::pipeline::memory::MemoryGauge;
use crate::pipeline::Pipeline;
use crate::probes::Probes;
use crate::selfmetrics::SelfMetrics;
use crate::state::Shared;

/// Probes, collectors and pipeline: everything one collection needs.
pub struct Agent {
    probes: Probes,
    /// One thread per collector, in [`Family::ALL`] order.
    workers: Vec<Worker>,
    /// The family of each worker (same order), for readiness.
    collector_families: Vec<Family>,
    /// How long a collection waits for each family: [`collection_deadline`].
    deadline: Duration,
    pipeline: Pipeline,
    /// Collectors whose last collection failed (logged once per episode).
    failing: std::collections::BTreeSet<&'static str>,
    pub shared: Arc<Shared>,
    /// The memory limiter's state: the pipeline writes it, the exporter
    /// reads it.
    pub memory: MemoryGauge,
}

impl Agent {
    /// Probes the kernel, plans, attaches and builds the collectors. Fails
    /// only when a configured mode cannot be honoured or `/proc` is unreadable.
    pub fn start(cfg: &Config) -> anyhow::Result<Agent> {
        let mut probes = Probes::start(cfg)?;
        let proc = crate::sources::Root::new(&cfg.agent.proc_root);
        let boot = collectors::boot_time(&proc)
            .with_context(|| format!("reading {}", cfg.agent.proc_root.display()))?;
        let sys = crate::sources::Root::new(&cfg.agent.sys_root);
        let collectors =
            crate::families::build_collectors(&cfg.probes, proc, sys, &mut probes, boot)?;
        probes.finish();
        // Attached: give up what reading the maps does not need, before any
        // thread exists that would keep them (capabilities are per thread).
        let capabilities = crate::probes::caps::drop_after_attach(cfg.agent.drop_capabilities);
        if capabilities.held != capabilities.kept {
            let kept = if capabilities.kept.is_empty() {
                "none".to_owned()
            } else {
                capabilities.kept.join(",")
            };
            info!(
                %kept,
                held = %capabilities.held.join(","),
                reason = %capabilities.reason,
                "capabilities dropped after attach"
            );
        } else if !capabilities.held.is_empty() {
            info!(kept = %capabilities.kept.join(","), reason = %capabilities.reason, "capabilities kept");
        }
        // build_collectors makes one collector per family the final plan
        // does not turn off, in Family::ALL order.
        let collector_families: Vec<Family> = Family::ALL
            .iter()
            .copied()
            .filter(|f| {
                probes
                    .plan
                    .get(*f)
                    .is_some_and(|p| p.source != crate::gate::Source::Off)
            })
            .collect();
        debug_assert_eq!(collector_families.len(), collectors.len());
        let workers = collectors
            .into_iter()
            .map(Worker::spawn)
            .collect::<Result<Vec<_>, _>>()
            .context("spawning the collector threads")?;
        let selfm = Arc::new(SelfMetrics::new());
        for fp in &probes.plan.families {
            selfm.set(
                crate::catalogue::PROBE_STATE,
                "1 for the source each metric family uses (ebpf, procfs or off), with the eBPF hook.",
                "",
                vec![
                    ("perch.family", fp.family.name().into()),
                    ("perch.probe.source", fp.source.name().into()),
                    ("perch.probe.hook", fp.hook.map(|h| h.name()).unwrap_or("none").into()),
                ],
                1.0,
            );
        }
        let memory = MemoryGauge::default();
        let mut pipeline = Pipeline::new(&cfg.pipeline, selfm.clone(), memory.clone());
        if let Some(source) = cfg
            .probes
            .containers
            .kubelet()
            .map_err(anyhow::Error::msg)?
        {
            let url = source.url.clone();
            let names = crate::families::containers::kubelet::spawn(source, selfm.clone())
                .context("spawning the kubelet metadata thread")?;
            tracing::info!(%url, "pod and container names from the kubelet");
            pipeline = pipeline.with_k8s_names(names);
        }
        let mut shared = Shared::new(
            selfm,
            probes.plan.clone(),
            probes.facts.clone(),
            cfg.interval(),
            cfg.pipeline.max_series_per_metric,
            memory.clone(),
        );
        shared.capabilities = capabilities;
        shared.classic = cfg.export.classic_layout()?;
        let shared = Arc::new(shared);
        Ok(Agent {
            probes,
            workers,
            collector_families,
            deadline: collection_deadline(cfg.interval()),
            pipeline,
            failing: Default::default(),
            shared,
            memory,
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.probes.plan
    }

    /// Runs every collector once, then the pipeline; publishes the result.
    pub fn collect(&mut self) -> Arc<Snapshot> {
        let started = Instant::now();
        let now = SystemTime::now();
        let selfm = &self.shared.selfm;
        let mut metrics: Vec<Metric> = Vec::new();
        let count_error = |component: &'static str, kind: &'static str| {
            selfm.add(
                crate::catalogue::COLLECTOR_ERRORS,
                "Collections a collector (or a part of one) could not complete, by component \
                 and error type.",
                "{error}",
                vec![
                    ("perch.component", component.into()),
                    ("error.type", kind.into()),
                ],
                1,
            );
        };
        // All families collect at once, each on its thread; each is waited
        // for until the same deadline.
        for w in &mut self.workers {
            w.ask(now);
        }
        let deadline = started + self.deadline;
        for (i, w) in self.workers.iter_mut().enumerate() {
            let name = w.name();
            let failing = self.failing.contains(name);
            let outcome = w.wait(deadline);
            if let Ok(o) = &outcome {
                for (component, kind) in &o.partial {
                    count_error(component, kind);
                }
            }
            let (kind, message) = match outcome {
                Ok(o) => {
                    metrics.extend(o.metrics);
                    match o.result {
                        Ok(()) => {
                            if let Some(f) = self.collector_families.get(i) {
                                self.shared.mark_produced(*f);
                            }
                            if failing {
                                self.failing.remove(name);
                                info!(component = name, "collector recovered");
                            }
                            continue;
                        }
                        Err(e) => (e.kind(), e.to_string()),
                    }
                }
                Err(Missed::Deadline) => (
                    Missed::Deadline.kind(),
                    format!(
                        "did not finish within {:?} (a read or map walk is stuck)",
                        self.deadline
                    ),
                ),
                Err(Missed::Panicked) => (
                    Missed::Panicked.kind(),
                    "its thread panicked; the family stays without metrics until restart"
                        .to_owned(),
                ),
            };
            // Logged when a collector starts failing, counted every time.
            if !failing {
                error!(component = name, error.type = kind, error = %message, "collector failed; its metrics are missing from this interval, others go on");
                self.failing.insert(name);
            }
            count_error(name, kind);
        }
        self.record_probe_stats();
        selfm.set(
            crate::catalogue::COLLECTION_DURATION,
            "Wall time of the last collection (all collectors).",
            "s",
            Vec::new(),
            started.elapsed().as_secs_f64(),
        );
        record_process(selfm);
        selfm.set(
            crate::catalogue::READY,
            "1 while GET /readyz answers 200, 0 while it answers 503.",
            // No unit: a state, not a ratio (Prometheus would append `_ratio`).
            "",
            Vec::new(),
            if self.shared.readiness_now().is_ok() {
                1.0
            } else {
                0.0
            },
        );
        metrics.extend(selfm.metrics(now));
        let metrics = collectors::merge_same_name(metrics);
        let snapshot = Arc::new(self.pipeline.process(Snapshot { time: now, metrics }));
        *self.shared.last.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), snapshot.clone()));
        snapshot
    }

    /// Run counts and times of the attached programs, only while the host
    /// has `kernel.bpf_stats_enabled=1`: with it off the kernel counts
    /// nothing, and zeros would read as measured. `/status` says which.
    fn record_probe_stats(&self) {
        let selfm = &self.shared.selfm;
        if crate::probes::bpf_stats_enabled() != Some(true) {
            return;
        }
        for s in self.probes.program_stats() {
            let attrs = vec![
                ("perch.family", s.family.name().into()),
                ("perch.bpf.program", s.program.into()),
            ];
            selfm.set_total(
                crate::catalogue::BPF_PROGRAM_RUN_COUNT,
                "Runs of each attached BPF program (needs sysctl kernel.bpf_stats_enabled=1).",
                "{run}",
                attrs.clone(),
                s.run_count,
            );
            selfm.set(
                crate::catalogue::BPF_PROGRAM_RUN_TIME,
                "Total run time of each attached BPF program (needs kernel.bpf_stats_enabled=1).",
                "s",
                attrs,
                s.run_time.as_secs_f64(),
            );
        }
    }
}

/// The agent's own process metrics, as every Prometheus client exposes
/// them: CPU time, resident and virtual memory, open and maximum file
/// descriptors, start time. From `/proc/self/stat`, `/proc/self/fd` and
/// `getrlimit`; a value that cannot be read is left out, not zeroed.
fn record_process(selfm: &SelfMetrics) {
    use crate::catalogue as m;
    if let Some(p) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| parse_self_stat(&t))
    {
        let ticks = crate::sources::stat::USER_HZ as f64;
        selfm.set_counter(
            m::PROCESS_CPU_TIME,
            "CPU time used by the agent since it started (user + system).",
            "s",
            Vec::new(),
            (p.utime + p.stime) as f64 / ticks,
        );
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        selfm.set(
            m::PROCESS_MEMORY_USAGE,
            "Resident set size of the agent (what the memory limiter compares).",
            "By",
            Vec::new(),
            (p.rss_pages * page) as f64,
        );
        selfm.set(
            m::PROCESS_MEMORY_VIRTUAL,
            "Virtual memory size of the agent.",
            "By",
            Vec::new(),
            p.vsize as f64,
        );
        if let Ok(btime) = crate::sources::stat::parse_stat(
            &std::fs::read_to_string("/proc/stat").unwrap_or_default(),
        )
        .map(|s| s.btime)
        {
            selfm.set(
                m::PROCESS_START_TIME,
                "Start time of the agent, seconds since the Unix epoch.",
                "s",
                Vec::new(),
                btime as f64 + p.starttime as f64 / ticks,
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        selfm.set(
            m::PROCESS_OPEN_FDS,
            "File descriptors the agent has open.",
            "{file_descriptor}",
            Vec::new(),
            fds.count().saturating_sub(1) as f64, // the directory's own fd
        );
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        selfm.set(
            m::PROCESS_MAX_FDS,
            "The agent's limit on open file descriptors (RLIMIT_NOFILE).",
            "{file_descriptor}",
            Vec::new(),
            lim.rlim_cur as f64,
        );
    }
}

/// The fields of `/proc/self/stat` the process metrics use.
#[derive(Debug, PartialEq, Eq)]
struct SelfStat {
    utime: u64,
    stime: u64,
    starttime: u64,
    vsize: u64,
    rss_pages: u64,
}

/// Parses `/proc/<pid>/stat` (man 5 proc): fields after the parenthesised
/// command name, which may itself hold spaces and parentheses.
fn parse_self_stat(text: &str) -> Option<SelfStat> {
    let rest = text.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // 1-based field n is f[n - 3]: the pid and the name come first.
    let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(SelfStat {
        utime: num(14)?,
        stime: num(15)?,
        starttime: num(22)?,
        vsize: num(23)?,
        rss_pages: num(24)?,
    })
}

/// Log lines `main`'s stderr writer could not write (`EPIPE` once the
/// reader is gone). The writer lives in `main`, which owns the subscriber;
/// the run loop publishes the count as `perch.log.lines.dropped`.
pub static LOG_LINES_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn record_log_drops(selfm: &SelfMetrics) {
    selfm.set_total(
        crate::catalogue::LOG_LINES_DROPPED,
        "Log lines that could not be written to stderr; the agent goes on.",
        "{line}",
        Vec::new(),
        LOG_LINES_DROPPED.load(std::sync::atomic::Ordering::Relaxed),
    );
}

/// Sets the running log filter (`agent.log_level`); made by `main`, which
/// owns the subscriber.
pub type SetLogLevel = Box<dyn Fn(&str) -> anyhow::Result<()> + Send + Sync>;

/// What SIGHUP needs from `main`.
pub struct Reload {
    /// Builds the configuration as start-up did (file, then env, then CLI,
    /// validated), with the file's text.
    pub load: Box<dyn Fn() -> anyhow::Result<(Config, String)> + Send + Sync>,
    /// Applies a new `agent.log_level`.
    pub set_log_level: SetLogLevel,
    /// The file's text at start-up (empty without a file).
    pub text: String,
}

/// The stop and reload signals, held blocked from the first moment of
/// `perch run`: set on the start-up thread before any other thread exists,
/// so that every thread inherits the mask. [`run`] installs the handlers
/// and then unblocks them on its own thread, which takes them all from
/// there: a signal sent during start-up waits instead of taking SIGHUP's
/// default action (exit 129, queued batches lost).
pub struct HeldSignals(nix::sys::signal::SigSet);

impl HeldSignals {
    pub fn block() -> anyhow::Result<HeldSignals> {
        use nix::sys::signal::{SigSet, Signal};
        let mut set = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            set.add(s);
        }
        set.thread_block()
            .context("blocking SIGTERM, SIGINT and SIGHUP during start-up")?;
        Ok(HeldSignals(set))
    }

    fn release(self) -> anyhow::Result<()> {
        self.0
            .thread_unblock()
            .context("unblocking SIGTERM, SIGINT and SIGHUP")
    }
}

/// `perch run`: serves, collects and exports until SIGINT or SIGTERM.
/// SIGHUP reloads the config ([`reload_config`]) and never stops the agent.
/// `agent` was started (attached, capabilities dropped) and `listener`
/// bound before the async runtime's threads existed. Must be polled on the
/// thread that blocked `held` (`Runtime::block_on` does).
pub async fn run(
    cfg: Config,
    reload: Reload,
    mut agent: Agent,
    listener: std::net::TcpListener,
    held: HeldSignals,
) -> anyhow::Result<()> {
    let mut signals = Signals::install()?;
    held.release()?;
    // Start-up parsed the kernel's BTF (megabytes) and freed it; give that
    // heap back to the kernel so the steady-state RSS is the agent's own.
    // SAFETY: malloc_trim only releases free memory held by glibc's malloc.
    unsafe { libc::malloc_trim(0) };
    let shared = agent.shared.clone();
    let exporter = crate::exporters::otlp::OtlpExporter::start(
        &cfg.export,
        shared.selfm.clone(),
        agent.memory.clone(),
    )?;
    let exporter = exporter.map(Arc::new);
    if let (Some(e), Some(endpoint)) = (&exporter, &cfg.export.endpoint) {
        let _ = shared.exporter.set(crate::state::ExporterHandle::new(
            e,
            endpoint.clone(),
            match cfg.export.protocol {
                crate::config::export::Protocol::Grpc => "grpc",
                _ => "http/protobuf",
            }
            .into(),
        ));
    }

    let listener = tokio::net::TcpListener::from_std(listener)
        .with_context(|| format!("listening on {} (agent.listen)", cfg.agent.listen))?;
    info!(listen = %cfg.agent.listen, interval_secs = cfg.interval().as_secs_f64(), "serving /metrics and /healthz");
    let server = tokio::spawn(crate::server::serve(listener, shared.clone()));

    // Collection runs on its own thread: it never waits on export or HTTP.
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let interval = cfg.interval();
    let exp = exporter.clone();
    let collector = std::thread::Builder::new()
        .name("perch-collect".into())
        .spawn(move || {
            let mut next = Instant::now();
            loop {
                record_log_drops(&agent.shared.selfm);
                let snapshot = agent.collect();
                if let Some(e) = &exp {
                    e.submit(snapshot);
                }
                next += interval;
                let now = Instant::now();
                if next < now {
                    // A collection overran the interval: skip, don't burst.
                    next = now + interval;
                }
                match stop_rx.recv_timeout(next - now) {
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    _ => break agent,
                }
            }
        })
        .context("spawning the collection thread")?;

    let mut running = cfg.clone();
    let stop = loop {
        match signals.next().await {
            Received::Stop(name) => break name,
            Received::Hangup => reload_config(&reload, &mut running),
        }
    };
    info!(
        signal = stop,
        "stopping: flushing the last interval and detaching probes"
    );
    let _ = stop_tx.send(());
    let agent = tokio::task::spawn_blocking(move || collector.join())
        .await
        .ok()
        .and_then(|r| r.ok());
    if let Some(mut agent) = agent {
        record_log_drops(&agent.shared.selfm);
        let last = agent.collect();
        if let Some(e) = &exporter {
            e.submit(last);
        }
        drop(agent); // detaches and unloads every program
    } else {
        error!("the collection thread panicked");
    }
    if let Some(e) = exporter.and_then(|e| Arc::try_unwrap(e).ok()) {
        e.shutdown(Duration::from_secs(5)).await;
    }
    server.abort();
    Ok(())
}

/// The signals the agent handles.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

/// What [`Signals::next`] received.
enum Received {
    /// SIGTERM or SIGINT (named): stop.
    Stop(&'static str),
    /// SIGHUP: reload.
    Hangup,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing a SIGHUP handler")?,
        })
    }

    async fn next(&mut self) -> Received {
        tokio::select! {
            _ = self.term.recv() => Received::Stop("SIGTERM"),
            _ = self.int.recv() => Received::Stop("SIGINT"),
            _ = self.hup.recv() => Received::Hangup,
        }
    }
}

/// SIGHUP: reads and validates the configuration again. `agent.log_level`
/// is applied live; every other key that changed is named in one WARN line
/// as needing a restart, and keeps its running value (probes are attached,
/// the listener bound and the exporter started with it). An invalid file
/// is refused with one ERROR line naming file, line and key, and the agent
/// goes on with `running`, which is updated only by what was applied.
///
/// Reading the file blocks this task briefly: it is a capped regular file
/// opened non-blocking (`config::read_config_file`).
fn reload_config(reload: &Reload, running: &mut Config) {
    info!("SIGHUP: reloading the configuration");
    let (new, text) = match (reload.load)() {
        Ok(v) => v,
        Err(e) => {
            error!(
                error = format!("{e:#}"),
                "SIGHUP: new configuration refused; still running on the previous one"
            );
            return;
        }
    };
    if new.agent.log_level != running.agent.log_level {
        match (reload.set_log_level)(&new.agent.log_level) {
            Ok(()) => {
                info!(old = %running.agent.log_level, new = %new.agent.log_level, "SIGHUP: agent.log_level applied");
                running.agent.log_level = new.agent.log_level.clone();
            }
            Err(e) => {
                error!(error = format!("{e:#}"), level = %new.agent.log_level, "SIGHUP: agent.log_level could not be applied; keeping the previous one");
            }
        }
    }
    // What else changed, by the file's keys (env and CLI cannot change
    // within one process); compared with the start-up text, so a key that
    // still waits for a restart is named again at every SIGHUP.
    let mut rest = new;
    rest.agent.log_level = running.agent.log_level.clone();
    let mut keys = crate::config::changed_keys(&reload.text, &text);
    keys.retain(|k| k != "agent.log_level");
    if rest != *running {
        if keys.is_empty() {
            keys.push("(values from the environment or defaults)".to_owned());
        }
        warn!(keys = keys.join(", "), "SIGHUP: these keys changed and need a restart to take effect; they keep their running values");
    } else {
        info!("SIGHUP: configuration reloaded; nothing else changed");
    }
}

/// How long one collection waits for each family: 80 % of the interval, so
/// a family that hangs neither delays the next collection nor holds up the
/// others (they run at the same time, each on its thread). Reads are
/// non-blocking and capped ([`crate::sources::Root`]); this bounds what
/// those bounds cannot, such as a map walk the kernel makes slow.
pub fn collection_deadline(interval: Duration) -> Duration {
    interval.mul_f64(0.8)
}

/// `perch collect`: attach, wait `window`, collect once.
pub fn collect_window(cfg: &Config, window: Duration) -> anyhow::Result<(Arc<Snapshot>, Plan)> {
    let mut agent = Agent::start(cfg)?;
    std::thread::sleep(window);
    let snap = agent.collect();
    Ok((snap, agent.plan().clone()))
}

/// The family list, for help texts.
pub fn family_names() -> String {
    Family::ALL
        .iter()
        .map(|f| f.name())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_stat_fields() {
        // A command name with spaces and a parenthesis, as the kernel prints it.
        let text = "4242 (perch (x) y) S 1 4242 4242 0 -1 4194560 1200 0 3 0 \
                    150 75 0 0 20 0 4 0 987654 123456789 2345 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 17642 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_self_stat(text),
            Some(SelfStat {
                utime: 150,
                stime: 75,
                starttime: 987654,
                vsize: 123456789,
                rss_pages: 2345,
            })
        );
        assert_eq!(parse_self_stat("4242 (perch) S 1"), None);
        let live = std::fs::read_to_string("/proc/self/stat").unwrap();
        let me = parse_self_stat(&live).expect("this process's stat parses");
        assert!(
            me.rss_pages > 0 && me.vsize >= me.rss_pages * 4096,
            "{me:?}"
        );
    }
}
