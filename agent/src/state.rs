//! What the collection thread publishes and the HTTP server reads: the
//! last snapshot, the plan, the kernel facts, which families have produced,
//! and a handle on the exporter. Both sides depend on this module, never on
//! each other.
//!
//! Locks here are held only to copy a value or clone an `Arc` out, so a
//! request never makes the collection thread wait (and the reverse).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::exporters::otlp::OtlpExporter;
use crate::gate::{Family, KernelFacts, Plan, Source};
use crate::model::Snapshot;
use crate::pipeline::memory::{MemoryGauge, MemoryState};
use crate::selfmetrics::SelfMetrics;

/// State shared between the collection thread and the HTTP server.
#[derive(Debug)]
pub struct Shared {
    pub selfm: Arc<SelfMetrics>,
    pub plan: Plan,
    pub facts: KernelFacts,
    pub interval: Duration,
    /// When the agent started (for `/status` uptime).
    pub started: Instant,
    /// `[pipeline] max_series_per_metric`, for `/status`.
    pub max_series_per_metric: usize,
    /// The memory limiter's state (written by the pipeline).
    pub memory: MemoryGauge,
    /// Per enabled family (source not `off`): has its collector succeeded
    /// at least once? Set by the collection thread.
    pub produced: Vec<(Family, AtomicBool)>,
    /// The last snapshot, after the pipeline.
    pub last: Mutex<Option<(Instant, Arc<Snapshot>)>>,
    /// The OTLP exporter, once started (unset when export is disabled).
    pub exporter: OnceLock<ExporterHandle>,
    /// What start-up did with the capabilities after attach.
    pub capabilities: crate::probes::caps::Report,
    /// The classic histogram layout of `/metrics` text
    /// (`export.histogram_bounds`).
    pub classic: crate::histogram::ClassicLayout,
}

/// What `/status` and `/readyz` know about the OTLP exporter. The exporter
/// is held weakly: shutdown needs the only strong reference.
#[derive(Debug)]
pub struct ExporterHandle {
    pub endpoint: String,
    pub protocol: String,
    exporter: Weak<OtlpExporter>,
    last_success: Arc<Mutex<Option<Instant>>>,
}

impl ExporterHandle {
    /// Watches the exporter's delivery counter to learn the time of the
    /// last success (the exporter does not keep one). Needs a tokio runtime.
    pub fn new(exporter: &Arc<OtlpExporter>, endpoint: String, protocol: String) -> Self {
        let last_success = Arc::new(Mutex::new(None));
        let mut delivered = exporter.delivered();
        let ls = last_success.clone();
        // Ends when the exporter (the watch sender) is dropped.
        tokio::spawn(async move {
            while delivered.changed().await.is_ok() {
                *ls.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            }
        });
        Self {
            endpoint,
            protocol,
            exporter: Arc::downgrade(exporter),
            last_success,
        }
    }

    /// The exporter's last error (None after a success or once it stopped).
    pub fn last_error(&self) -> Option<String> {
        self.exporter.upgrade().and_then(|e| e.last_error())
    }

    /// Time since the last delivered batch, if any.
    pub fn last_success_age(&self) -> Option<Duration> {
        self.last_success
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
    }
}

/// The export circuit breaker's states, as the exporter publishes them in
/// `perch.export.circuit.state`.
pub fn circuit_name(v: Option<f64>) -> Option<&'static str> {
    Some(match v? as u8 {
        0 => "closed",
        1 => "open",
        2 => "half_open",
        _ => "unknown",
    })
}

impl Shared {
    /// Shared state for a plan; `produced` lists every family the plan
    /// does not turn off.
    pub fn new(
        selfm: Arc<SelfMetrics>,
        plan: Plan,
        facts: KernelFacts,
        interval: Duration,
        max_series_per_metric: usize,
        memory: MemoryGauge,
    ) -> Self {
        let produced = plan
            .families
            .iter()
            .filter(|f| f.source != Source::Off)
            .map(|f| (f.family, AtomicBool::new(false)))
            .collect();
        Self {
            selfm,
            plan,
            facts,
            interval,
            started: Instant::now(),
            max_series_per_metric,
            memory,
            produced,
            last: Mutex::new(None),
            exporter: OnceLock::new(),
            capabilities: Default::default(),
            classic: Default::default(),
        }
    }

    /// The last snapshot and its age.
    pub fn last(&self) -> Option<(Duration, Arc<Snapshot>)> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref().map(|(t, s)| (t.elapsed(), s.clone()))
    }

    /// Records that `family`'s collector succeeded.
    pub fn mark_produced(&self, family: Family) {
        if let Some((_, p)) = self.produced.iter().find(|(f, _)| *f == family) {
            p.store(true, Ordering::Relaxed);
        }
    }

    /// Whether `family` has produced (None: not enabled).
    pub fn has_produced(&self, family: Family) -> Option<bool> {
        self.produced
            .iter()
            .find(|(f, _)| *f == family)
            .map(|(_, p)| p.load(Ordering::Relaxed))
    }

    /// Live: a collection finished within two intervals.
    pub fn healthy(&self) -> bool {
        self.last()
            .is_some_and(|(age, _)| age < self.interval * HEALTHY_WITHIN_INTERVALS)
    }

    /// Ready, or the one-line reason why not: the gate has run (always
    /// true once this state exists) and a collection finished, every
    /// enabled family has produced, and the exporter is not in permanent
    /// failure: the memory limiter at its hard limit (every snapshot is
    /// refused) or the circuit breaker open.
    pub fn readiness(&self) -> Result<(), String> {
        if self.last().is_none() {
            return Err("no collection has finished yet".into());
        }
        self.readiness_now()
    }

    /// [`Shared::readiness`] without the "a collection finished" check:
    /// what the collection thread publishes as `perch.ready` while it
    /// finishes a collection.
    pub fn readiness_now(&self) -> Result<(), String> {
        let waiting: Vec<&str> = self
            .produced
            .iter()
            .filter(|(_, p)| !p.load(Ordering::Relaxed))
            .map(|(f, _)| f.name())
            .collect();
        if !waiting.is_empty() {
            return Err(format!(
                "families that have not produced yet: {}",
                waiting.join(", ")
            ));
        }
        if self.memory.get() == MemoryState::Hard {
            return Err(
                "memory limiter at its hard limit: the exporter refuses every snapshot".into(),
            );
        }
        if let Some(exp) = self.exporter.get() {
            let circuit = self
                .selfm
                .value(crate::catalogue::EXPORT_CIRCUIT_STATE, &Vec::new());
            if circuit_name(circuit) == Some("open") {
                let why = exp
                    .last_error()
                    .unwrap_or_else(|| "no error recorded".into());
                return Err(format!(
                    "export circuit open ({}): {}",
                    exp.endpoint,
                    why.replace('\n', " ")
                ));
            }
        }
        Ok(())
    }
}

/// `/healthz` answers 200 while the last collection is younger than this
/// many intervals.
pub const HEALTHY_WITHIN_INTERVALS: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::{FamilyPlan, Mode};

    fn shared(sources: &[(Family, Source)]) -> Shared {
        let plan = Plan {
            families: sources
                .iter()
                .map(|(family, source)| FamilyPlan {
                    family: *family,
                    requested: Mode::default(),
                    source: *source,
                    hook: None,
                    reads: String::new(),
                    reason: String::new(),
                })
                .collect(),
        };
        Shared::new(
            Arc::new(SelfMetrics::new()),
            plan,
            KernelFacts::default(),
            Duration::from_secs(10),
            2000,
            MemoryGauge::default(),
        )
    }

    fn publish(s: &Shared, age: Duration) {
        let snap = Arc::new(Snapshot {
            time: std::time::SystemTime::now(),
            metrics: Vec::new(),
        });
        let at = Instant::now()
            .checked_sub(age)
            .expect("monotonic clock past age");
        *s.last.lock().unwrap() = Some((at, snap));
    }

    #[test]
    fn health_needs_a_collection_within_two_intervals() {
        let s = shared(&[]);
        assert!(!s.healthy(), "no collection yet");
        publish(&s, Duration::from_secs(1));
        assert!(s.healthy());
        publish(&s, Duration::from_secs(19));
        assert!(s.healthy());
        publish(&s, Duration::from_secs(21));
        assert!(!s.healthy(), "older than two 10 s intervals");
    }

    #[test]
    fn readiness_reasons_in_order() {
        let s = shared(&[
            (Family::ALL[0], Source::Procfs),
            (Family::ALL[1], Source::Off),
        ]);
        let err = s.readiness().unwrap_err();
        assert_eq!(err, "no collection has finished yet");
        publish(&s, Duration::ZERO);
        let err = s.readiness().unwrap_err();
        assert_eq!(
            err,
            format!(
                "families that have not produced yet: {}",
                Family::ALL[0].name()
            )
        );
        // A family turned off is never waited for.
        assert_eq!(s.has_produced(Family::ALL[1]), None);
        s.mark_produced(Family::ALL[0]);
        assert_eq!(s.readiness(), Ok(()));
        s.memory.set(MemoryState::Hard);
        assert!(s.readiness().unwrap_err().contains("hard limit"));
        s.memory.set(MemoryState::Soft);
        assert_eq!(s.readiness(), Ok(()), "shedding detail is still ready");
    }

    #[test]
    fn circuit_names() {
        assert_eq!(circuit_name(None), None);
        assert_eq!(circuit_name(Some(0.0)), Some("closed"));
        assert_eq!(circuit_name(Some(1.0)), Some("open"));
        assert_eq!(circuit_name(Some(2.0)), Some("half_open"));
    }
}
