//! The agent's run loop: collect every interval on a thread of its own,
//! pass the snapshot through the pipeline, publish it for `/metrics` and hand
//! it to the OTLP exporter without waiting.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tracing::{error, info};

use crate::collectors::{self, Collector};
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
    collectors: Vec<Box<dyn Collector>>,
    /// The family of each collector (same order), for readiness.
    collector_families: Vec<Family>,
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
        let pipeline = Pipeline::new(&cfg.pipeline, selfm.clone(), memory.clone());
        let shared = Arc::new(Shared::new(
            selfm,
            probes.plan.clone(),
            probes.facts.clone(),
            cfg.interval(),
            cfg.pipeline.max_series_per_metric,
            memory.clone(),
        ));
        Ok(Agent {
            probes,
            collectors,
            collector_families,
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
        for (i, c) in self.collectors.iter_mut().enumerate() {
            let failing = self.failing.contains(c.name());
            let result = c.collect(now, &mut metrics);
            for (component, kind) in c.take_partial_errors() {
                count_error(component, kind);
            }
            if result.is_ok() {
                if let Some(f) = self.collector_families.get(i) {
                    self.shared.mark_produced(*f);
                }
            }
            match result {
                Ok(()) if failing => {
                    self.failing.remove(c.name());
                    info!(component = c.name(), "collector recovered");
                }
                Ok(()) => {}
                Err(e) => {
                    // Logged when a collector starts failing, counted every time.
                    if !failing {
                        error!(component = c.name(), error.type = e.kind(), error = %e, "collector failed; its metrics are missing from this interval, others go on");
                        self.failing.insert(c.name());
                    }
                    count_error(c.name(), e.kind());
                }
            }
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

    fn record_probe_stats(&self) {
        let selfm = &self.shared.selfm;
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

/// The agent's own CPU time and RSS, from `/proc/self/stat`.
fn record_process(selfm: &SelfMetrics) {
    let Ok(text) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the parenthesised command name; utime/stime are 14/15,
    // rss (pages) is 24 (1-based, man 5 proc).
    let Some(rest) = text.rsplit_once(')').map(|(_, r)| r) else {
        return;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let ticks = crate::sources::stat::USER_HZ as f64;
    selfm.set(
        crate::catalogue::PROCESS_CPU_TIME,
        "CPU time used by the agent since it started (user + system).",
        "s",
        Vec::new(),
        (num(14) + num(15)) as f64 / ticks,
    );
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    selfm.set(
        crate::catalogue::PROCESS_MEMORY_RSS,
        "Resident set size of the agent.",
        "By",
        Vec::new(),
        (num(24) * page) as f64,
    );
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let mut agent = Agent::start(&cfg)?;
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

    let listener = tokio::net::TcpListener::bind(cfg.agent.listen)
        .await
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

    shutdown_signal().await;
    info!("stopping: flushing the last interval and detaching probes");
    let _ = stop_tx.send(());
    let agent = tokio::task::spawn_blocking(move || collector.join())
        .await
        .ok()
        .and_then(|r| r.ok());
    if let Some(mut agent) = agent {
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

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
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
