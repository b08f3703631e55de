//! OTLP push exporter.
//!
//! ```text
//! submit(Arc<Snapshot>) ──▶ pending (≤ max_pending_snapshots, drop oldest)
//!                              │ encoder task: Snapshot → Batch bytes (encode.rs)
//!                              ▼
//!                          queue (≤ queue.max_bytes, drop oldest or spill to disk.rs)
//!                              │ sender task: one request at a time, in order
//!                              ▼
//!                          transport.rs (gRPC | HTTP) ──▶ collector
//! ```
//!
//! Collection never waits on export: `submit` only pushes a pointer under
//! a mutex. The sender classifies each outcome (retry.rs): success,
//! retryable (backoff with jitter, honouring `Retry-After` / `RetryInfo`,
//! circuit breaker) or permanent (dropped, counted, logged once per
//! distinct message). Every point that does not reach the collector is
//! counted in `perch.export.points.dropped{reason}`.
//!
//! Hostile collectors: responses are read up to 64 KiB
//! (`transport::MAX_RESPONSE_BYTES`), never buffered past it. With a disk
//! queue, from the first retryable failure until the collector answers
//! again every batch goes to disk as soon as it is encoded, so a SIGKILL
//! during an outage loses at most the snapshots not yet encoded.

pub mod disk;
pub mod encode;
pub mod resource;
pub mod retry;
mod sender;
pub mod transport;

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::export::{ExportConfig, ExportConfigError};
use crate::model::{Data, Snapshot};
use crate::pipeline::memory::{MemoryGauge, MemoryState};
use crate::selfmetrics::SelfMetrics;

use disk::{DiskError, DiskQueue};
use encode::Encoder;
use retry::{Backoff, Circuit, CircuitState, Class};
use sender::Sender;
use transport::Transport;

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The `[export]` configuration is invalid.
    #[error("invalid [export] configuration: {0}")]
    Config(#[from] ExportConfigError),
    /// The endpoint or a client setting cannot be used.
    #[error("OTLP endpoint {endpoint}: {reason}")]
    Endpoint {
        /// The configured endpoint.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A TLS file (CA, client certificate or key) cannot be read.
    #[error("OTLP TLS file {path}: {reason}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The error.
        reason: String,
    },
    /// The on-disk queue directory cannot be used.
    #[error("OTLP disk queue: {0}")]
    Disk(#[from] DiskError),
    /// `start` was called outside a tokio runtime.
    #[error("the OTLP exporter must be started inside a tokio runtime")]
    NoRuntime,
}

/// Reasons in `perch.export.points.dropped{reason}`.
pub mod reason {
    /// The in-memory queue (or the pending snapshots) was full: oldest dropped.
    pub const QUEUE_FULL: &str = "queue_full";
    /// The collector refused the data for good (400, INVALID_ARGUMENT...).
    pub const REJECTED: &str = "rejected";
    /// The collector accepted the request but refused these points.
    pub const PARTIAL: &str = "partial_success";
    /// Memory over the hard limit: new data refused.
    pub const MEMORY: &str = "memory_limit";
    /// Still queued when the shutdown timeout ran out.
    pub const SHUTDOWN: &str = "shutdown";
    /// The on-disk queue was full: oldest files dropped.
    pub const DISK_FULL: &str = "disk_full";
    /// A corrupt on-disk queue file was set aside.
    pub const DISK_CORRUPT: &str = "disk_corrupt";
}

struct Item {
    body: Bytes,
    points: u64,
}

/// Where the batch being sent came from.
enum Source {
    Mem(Item),
    Disk { seq: u64, body: Bytes, points: u64 },
}

impl Source {
    fn body(&self) -> Bytes {
        match self {
            Source::Mem(i) => i.body.clone(),
            Source::Disk { body, .. } => body.clone(),
        }
    }
    fn points(&self) -> u64 {
        match self {
            Source::Mem(i) => i.points,
            Source::Disk { points, .. } => *points,
        }
    }
}

struct Queue {
    items: VecDeque<Item>,
    bytes: u64,
    /// The in-memory batch being sent (counts against the bound).
    inflight: Option<(u64, u64)>,
    max_bytes: u64,
    disk: Option<DiskQueue>,
    /// The last request failed in a retryable way (until the collector
    /// answers again). With a disk queue, batches then go to disk as soon
    /// as they are encoded instead of waiting in memory.
    outage: bool,
}

struct Shared {
    selfm: Arc<SelfMetrics>,
    pending: Mutex<VecDeque<Arc<Snapshot>>>,
    max_pending: usize,
    queue: Mutex<Queue>,
    wake_encoder: Notify,
    wake_sender: Notify,
    closing: AtomicBool,
    encoder_done: AtomicBool,
    last_error: Mutex<Option<String>>,
    delivered: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Points in a snapshot (what a dropped snapshot loses).
pub fn snapshot_points(s: &Snapshot) -> u64 {
    s.metrics
        .iter()
        .map(|m| match &m.data {
            Data::Sum { points, .. } | Data::Gauge { points } => points.len() as u64,
            Data::Histogram { points } => points.len() as u64,
        })
        .sum()
}

impl Shared {
    fn dropped(&self, reason: &'static str, points: u64) {
        if points == 0 {
            return;
        }
        self.selfm.add(
            crate::catalogue::EXPORT_POINTS_DROPPED,
            "Points that did not reach the collector, by reason",
            "{point}",
            vec![("reason", reason.into())],
            points,
        );
    }

    fn publish_queue(&self, q: &mut Queue) {
        if let Some(removed) = q.disk.as_mut().map(DiskQueue::take_corrupt_removed) {
            if removed > 0 {
                self.selfm.add(
                    crate::catalogue::EXPORT_DISK_CORRUPT_REMOVED,
                    "Corrupt on-disk queue files deleted (past the count or age bound)",
                    "{file}",
                    vec![],
                    removed,
                );
            }
        }
        let mem = q.bytes + q.inflight.map_or(0, |(b, _)| b);
        self.selfm.set(
            crate::catalogue::EXPORT_QUEUE_BYTES,
            "Encoded bytes waiting in memory for the collector",
            "By",
            vec![],
            mem as f64,
        );
        self.selfm.set(
            crate::catalogue::EXPORT_QUEUE_BATCHES,
            "Batches waiting in memory for the collector",
            "{batch}",
            vec![],
            q.items.len() as f64,
        );
        if let Some(d) = &q.disk {
            self.selfm.set(
                crate::catalogue::EXPORT_DISK_BYTES,
                "Bytes in the on-disk export queue",
                "By",
                vec![],
                d.bytes() as f64,
            );
        }
    }

    /// Keeps the memory queue within its bound: the oldest batches go to
    /// disk when there is one, or are dropped.
    fn enforce(&self, q: &mut Queue) {
        if q.outage {
            // During an outage memory holds nothing a crash could lose. A
            // batch the disk cannot take stays in memory, within the bound.
            while let (Some(old), Some(d)) = (q.items.front(), q.disk.as_mut()) {
                match d.push(&old.body, old.points) {
                    Ok(dropped) => {
                        self.dropped(reason::DISK_FULL, dropped);
                        if let Some(old) = q.items.pop_front() {
                            q.bytes -= old.body.len() as u64;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot write the on-disk export queue; batches stay in memory");
                        break;
                    }
                }
            }
        }
        let inflight = q.inflight.map_or(0, |(b, _)| b);
        while q.bytes + inflight > q.max_bytes {
            let Some(old) = q.items.pop_front() else {
                break;
            };
            q.bytes -= old.body.len() as u64;
            self.overflow(q, old);
        }
    }

    fn overflow(&self, q: &mut Queue, item: Item) {
        match &mut q.disk {
            Some(d) => match d.push(&item.body, item.points) {
                Ok(dropped) => self.dropped(reason::DISK_FULL, dropped),
                Err(e) => {
                    tracing::error!(error = %e, "cannot write the on-disk export queue; batch dropped");
                    self.dropped(reason::QUEUE_FULL, item.points);
                }
            },
            None => self.dropped(reason::QUEUE_FULL, item.points),
        }
    }

    fn set_error(&self, e: Option<String>) {
        *lock(&self.last_error) = e;
    }
}

/// The OTLP exporter: an encoder task and a sender task.
pub struct OtlpExporter {
    shared: Arc<Shared>,
    /// The memory limiter's state, written by the pipeline.
    memory: MemoryGauge,
    encoder: JoinHandle<()>,
    sender: JoinHandle<()>,
}

impl std::fmt::Debug for OtlpExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpExporter").finish_non_exhaustive()
    }
}

impl OtlpExporter {
    /// Starts the export tasks on the current tokio runtime. Returns None
    /// (after saying so once) when no endpoint is configured.
    /// New snapshots are refused while `memory` is at the hard limit.
    pub fn start(
        cfg: &ExportConfig,
        selfm: Arc<SelfMetrics>,
        memory: MemoryGauge,
    ) -> Result<Option<Self>, ExportError> {
        let attrs = resource::attributes(cfg, Path::new("/"), |k| std::env::var(k).ok());
        Self::start_with_resource(cfg, selfm, memory, attrs)
    }

    /// As [`OtlpExporter::start`], with the resource attributes given
    /// (a container reading the host's files under `/host`, tests).
    pub fn start_with_resource(
        cfg: &ExportConfig,
        selfm: Arc<SelfMetrics>,
        memory: MemoryGauge,
        resource_attributes: Vec<(String, String)>,
    ) -> Result<Option<Self>, ExportError> {
        let Some(endpoint) = cfg.endpoint.clone() else {
            tracing::info!(
                "OTLP export disabled: no endpoint configured ([export] endpoint, \
                 OTEL_EXPORTER_OTLP_ENDPOINT or --otlp-endpoint); /metrics is still served"
            );
            return Ok(None);
        };
        cfg.validate()?;
        let rt = tokio::runtime::Handle::try_current().map_err(|_| ExportError::NoRuntime)?;
        let transport = Transport::new(cfg, &endpoint)?;
        let disk = match &cfg.queue.dir {
            Some(d) => {
                let q = DiskQueue::open(d, cfg.queue.disk_max_bytes)?;
                if !q.is_empty() {
                    tracing::info!(
                        dir = %d.display(),
                        batches = q.len(),
                        bytes = q.bytes(),
                        "OTLP disk queue holds undelivered batches; sending them first"
                    );
                }
                Some(q)
            }
            None => None,
        };
        let encoder = Encoder::new(
            resource::resource(&resource_attributes),
            cfg.temporality,
            cfg.batch.max_points,
            usize::try_from(cfg.batch.max_bytes).unwrap_or(usize::MAX),
        )
        .with_histograms(encode::HistogramExport::from_config(cfg));
        let shared = Arc::new(Shared {
            selfm,
            pending: Mutex::new(VecDeque::new()),
            max_pending: cfg.queue.max_pending_snapshots.max(1),
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                inflight: None,
                max_bytes: cfg.queue.max_bytes,
                disk,
                outage: false,
            }),
            wake_encoder: Notify::new(),
            wake_sender: Notify::new(),
            closing: AtomicBool::new(false),
            encoder_done: AtomicBool::new(false),
            last_error: Mutex::new(None),
            delivered: watch::channel(0).0,
        });
        {
            let mut q = lock(&shared.queue);
            shared.publish_queue(&mut q);
        }
        shared.selfm.set(
            crate::catalogue::EXPORT_CIRCUIT_STATE,
            "Export circuit breaker: 0 closed, 1 open, 2 half-open",
            "1",
            vec![],
            0.0,
        );
        let sender = Sender {
            shared: shared.clone(),
            transport,
            backoff: Backoff::new(
                Duration::from_millis(cfg.retry.initial_backoff_ms),
                Duration::from_millis(cfg.retry.max_backoff_ms),
            ),
            circuit: Circuit::new(
                cfg.circuit.failure_threshold,
                Duration::from_millis(cfg.circuit.half_open_after_ms),
            ),
            max_server_delay: Duration::from_millis(cfg.retry.max_server_delay_ms),
            logged: HashSet::new(),
            endpoint: endpoint.clone(),
        };
        tracing::info!(
            endpoint = %endpoint,
            protocol = ?cfg.protocol,
            compression = ?cfg.compression,
            temporality = ?cfg.temporality,
            "OTLP export enabled"
        );
        let encoder = rt.spawn(encoder_task(shared.clone(), encoder));
        let sender = rt.spawn(sender.run());
        Ok(Some(Self {
            shared,
            memory,
            encoder,
            sender,
        }))
    }

    /// Queues a snapshot for export. Never blocks on the network: past
    /// `max_pending_snapshots` the oldest pending one is dropped (counted).
    pub fn submit(&self, snapshot: Arc<Snapshot>) {
        if self.memory.get() == MemoryState::Hard {
            self.shared
                .dropped(reason::MEMORY, snapshot_points(&snapshot));
            return;
        }
        let dropped = {
            let mut p = lock(&self.shared.pending);
            let mut dropped = 0;
            while p.len() >= self.shared.max_pending {
                if let Some(old) = p.pop_front() {
                    dropped += snapshot_points(&old);
                }
            }
            p.push_back(snapshot);
            dropped
        };
        self.shared.dropped(reason::QUEUE_FULL, dropped);
        self.shared.wake_encoder.notify_one();
    }

    /// The last export error (None after a success): for health reporting.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.shared.last_error).clone()
    }

    /// Counts delivered batches; tests and the benchmark wait on it.
    pub fn delivered(&self) -> watch::Receiver<u64> {
        self.shared.delivered.subscribe()
    }

    /// Flushes what is queued within `timeout`, then stops. What is left is
    /// written to the disk queue when there is one, or counted as dropped.
    pub async fn shutdown(self, timeout: Duration) {
        let shared = self.shared;
        shared.closing.store(true, Ordering::SeqCst);
        shared.wake_encoder.notify_one();
        shared.wake_sender.notify_one();
        let deadline = Instant::now() + timeout;
        let mut encoder = self.encoder;
        let mut sender = self.sender;
        // A handle that timed out has not completed: abort, then reap it.
        if tokio::time::timeout_at(deadline, &mut encoder)
            .await
            .is_err()
        {
            encoder.abort();
            let _ = encoder.await;
        }
        if tokio::time::timeout_at(deadline, &mut sender)
            .await
            .is_err()
        {
            sender.abort();
            let _ = sender.await;
        }
        // Leftovers: pending snapshots were never encoded; queued batches
        // (and one that was in flight) were not acknowledged.
        let pending: u64 = lock(&shared.pending)
            .drain(..)
            .map(|s| snapshot_points(&s))
            .sum();
        shared.dropped(reason::SHUTDOWN, pending);
        let mut q = lock(&shared.queue);
        let mut lost = q.inflight.take().map_or(0, |(_, p)| p);
        let items: Vec<Item> = q.items.drain(..).collect();
        q.bytes = 0;
        let mut spilled = 0;
        for item in items {
            match &mut q.disk {
                Some(d) => match d.push(&item.body, item.points) {
                    Ok(dropped) => {
                        spilled += 1;
                        shared.dropped(reason::DISK_FULL, dropped);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot write the on-disk export queue at shutdown");
                        lost += item.points;
                    }
                },
                None => lost += item.points,
            }
        }
        shared.dropped(reason::SHUTDOWN, lost);
        shared.publish_queue(&mut q);
        if lost + pending > 0 {
            tracing::error!(
                points = lost + pending,
                "OTLP shutdown timeout: points not delivered"
            );
        }
        if spilled > 0 {
            tracing::info!(batches = spilled, "OTLP queue written to disk at shutdown");
        }
    }
}

async fn encoder_task(shared: Arc<Shared>, mut encoder: Encoder) {
    loop {
        let next = lock(&shared.pending).pop_front();
        let Some(snapshot) = next else {
            if shared.closing.load(Ordering::SeqCst) {
                break;
            }
            shared.wake_encoder.notified().await;
            continue;
        };
        let batches = encoder.encode(&snapshot);
        drop(snapshot);
        {
            let mut q = lock(&shared.queue);
            for b in batches {
                q.bytes += b.body.len() as u64;
                q.items.push_back(Item {
                    body: b.body,
                    points: b.points,
                });
            }
            shared.enforce(&mut q);
            shared.publish_queue(&mut q);
        }
        shared.wake_sender.notify_one();
    }
    shared.encoder_done.store(true, Ordering::SeqCst);
    shared.wake_sender.notify_one();
}
