//! The sender task: one request at a time from the queue (disk first),
//! with retry, backoff, the circuit breaker and the outcome counters.

use super::*;

/// Buckets of `perch.export.duration`, seconds: 1 ms to the 10 s default
/// timeout and past it (`timeout_ms` can be raised to 60 s).
const EXPORT_DURATION_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub(super) struct Sender {
    pub(super) shared: Arc<Shared>,
    pub(super) transport: Transport,
    pub(super) backoff: Backoff,
    pub(super) circuit: Circuit,
    pub(super) max_server_delay: Duration,
    /// Distinct error messages already logged (bounded).
    pub(super) logged: HashSet<String>,
    pub(super) endpoint: String,
}

impl Sender {
    fn closing(&self) -> bool {
        self.shared.closing.load(Ordering::SeqCst)
    }

    /// The next batch: the disk queue first (it holds the oldest data).
    fn next(&self) -> Option<Source> {
        let mut q = lock(&self.shared.queue);
        while let Some(r) = q.disk.as_mut().and_then(|d| d.peek()) {
            match r {
                Ok(b) => {
                    return Some(Source::Disk {
                        seq: b.seq,
                        body: b.body,
                        points: b.points,
                    })
                }
                Err(e) => {
                    // The points in a corrupt file are unknown: count it as
                    // one lost batch through a dedicated counter.
                    tracing::error!(error = %e, "skipping unreadable OTLP disk queue file");
                    self.shared.selfm.add(
                        crate::catalogue::EXPORT_DISK_CORRUPT,
                        "On-disk queue files set aside as corrupt or unreadable",
                        "{file}",
                        vec![],
                        1,
                    );
                }
            }
        }
        let item = q.items.pop_front()?;
        q.bytes -= item.body.len() as u64;
        q.inflight = Some((item.body.len() as u64, item.points));
        Some(Source::Mem(item))
    }

    /// The batch is done with (delivered or refused for good).
    fn finish(&self, src: &Source) {
        let mut q = lock(&self.shared.queue);
        // The collector answered: new batches may wait in memory again.
        q.outage = false;
        match src {
            Source::Mem(_) => q.inflight = None,
            Source::Disk { seq, .. } => {
                if let Some(d) = q.disk.as_mut() {
                    d.remove(*seq);
                }
            }
        }
        self.shared.publish_queue(&mut q);
    }

    /// The batch must be tried again later. With a disk queue the batch,
    /// and every batch encoded until the collector answers again, is
    /// written to disk first: a SIGKILL during an outage then loses no
    /// encoded batch.
    fn requeue(&self, src: Source) {
        let mut q = lock(&self.shared.queue);
        q.outage = true;
        if let Source::Mem(item) = src {
            q.inflight = None;
            if q.disk.is_some() {
                // Undelivered data goes to disk so a restart keeps it, and
                // (outage set) so does everything queued behind it.
                self.shared.overflow(&mut q, item);
                self.shared.enforce(&mut q);
            } else {
                q.bytes += item.body.len() as u64;
                q.items.push_front(item);
                self.shared.enforce(&mut q);
            }
        }
        self.shared.publish_queue(&mut q);
    }

    fn log_once(&mut self, level: tracing::Level, msg: &str) {
        if self.logged.len() >= 64 || !self.logged.insert(msg.to_owned()) {
            return;
        }
        if level == tracing::Level::ERROR {
            tracing::error!(endpoint = %self.endpoint, error = %msg, "OTLP export refused by the collector; data dropped");
        } else {
            tracing::warn!(endpoint = %self.endpoint, error = %msg, "OTLP export failed; will retry");
        }
    }

    fn set_circuit(&self) {
        self.shared.selfm.set(
            crate::catalogue::EXPORT_CIRCUIT_STATE,
            "Export circuit breaker: 0 closed, 1 open, 2 half-open",
            "1",
            vec![],
            f64::from(self.circuit.state() as u8),
        );
    }

    fn request(&self, outcome: &'static str, took: Duration) {
        self.shared.selfm.add(
            crate::catalogue::EXPORT_REQUESTS,
            "Export requests by outcome (success, retryable, rejected)",
            "{request}",
            vec![("outcome", outcome.into())],
            1,
        );
        self.shared.selfm.observe(
            crate::catalogue::EXPORT_DURATION,
            "Time from sending an export request to its outcome, by outcome",
            "s",
            EXPORT_DURATION_BOUNDS,
            vec![("outcome", outcome.into())],
            took.as_secs_f64(),
        );
    }

    /// Sleeps for `d` (a backoff, a server's delay, an open circuit).
    /// New batches do not cut it short; shutdown does, down to 100 ms
    /// steps, so the final flush can still try within its timeout.
    async fn wait(&self, d: Duration) {
        let deadline = Instant::now() + d;
        loop {
            let step = if self.closing() {
                deadline.min(Instant::now() + Duration::from_millis(100))
            } else {
                deadline
            };
            tokio::select! {
                _ = tokio::time::sleep_until(step) => {
                    if step >= deadline || self.closing() {
                        return;
                    }
                }
                _ = self.shared.wake_sender.notified() => {
                    if self.closing() {
                        return;
                    }
                }
            }
        }
    }

    pub(super) async fn run(mut self) {
        loop {
            if let Err(until) = self.circuit.allow(std::time::Instant::now()) {
                let d = until.saturating_duration_since(std::time::Instant::now());
                self.wait(d).await;
                if self.closing() && self.circuit.state() == CircuitState::Open {
                    // Shutdown with the collector gone: keep data for disk.
                    return;
                }
                continue;
            }
            let Some(src) = self.next() else {
                if self.closing() && self.shared.encoder_done.load(Ordering::SeqCst) {
                    return;
                }
                self.shared.wake_sender.notified().await;
                continue;
            };
            self.set_circuit();
            let started = Instant::now();
            let body = src.body();
            let body_len = body.len() as u64;
            let (class, truncated) = self.transport.send(body).await;
            if truncated {
                self.shared.selfm.add(
                    crate::catalogue::EXPORT_RESPONSE_TRUNCATED,
                    "Collector responses cut off at 64 KiB; the rest was not read",
                    "{response}",
                    vec![],
                    1,
                );
                tracing::warn!(
                    endpoint = %self.endpoint,
                    max_bytes = transport::MAX_RESPONSE_BYTES,
                    "OTLP collector response larger than the cap; the rest was discarded"
                );
            }
            match class {
                Class::Ok { rejected, message } => {
                    self.request("success", started.elapsed());
                    self.circuit.success();
                    self.set_circuit();
                    self.backoff.reset();
                    self.shared.set_error(None);
                    let points = src.points();
                    let accepted = points.saturating_sub(rejected);
                    self.shared.selfm.add(
                        crate::catalogue::EXPORT_POINTS_SENT,
                        "Points accepted by the collector",
                        "{point}",
                        vec![],
                        accepted,
                    );
                    self.shared.selfm.add(
                        crate::catalogue::EXPORT_BYTES_SENT,
                        "Encoded protobuf bytes accepted by the collector (before compression)",
                        "By",
                        vec![],
                        body_len,
                    );
                    if rejected > 0 {
                        self.shared.dropped(reason::PARTIAL, rejected.min(points));
                        self.log_once(
                            tracing::Level::ERROR,
                            &format!("partial success: {message}"),
                        );
                    }
                    self.finish(&src);
                    tracing::trace!(
                        points,
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "batch delivered"
                    );
                    self.shared.delivered.send_modify(|n| *n += 1);
                }
                Class::Permanent { reason: why } => {
                    self.request("rejected", started.elapsed());
                    // The collector answered: it is up, the data is bad.
                    self.circuit.success();
                    self.set_circuit();
                    self.shared.dropped(reason::REJECTED, src.points());
                    self.log_once(tracing::Level::ERROR, &why);
                    self.shared.set_error(Some(why));
                    self.finish(&src);
                }
                Class::Retryable { delay, reason: why } => {
                    self.request("retryable", started.elapsed());
                    self.shared.selfm.add(
                        crate::catalogue::EXPORT_RETRIES,
                        "Requests that failed in a retryable way and will be retried",
                        "{request}",
                        vec![],
                        1,
                    );
                    self.log_once(tracing::Level::WARN, &why);
                    self.shared.set_error(Some(why));
                    let opened = self.circuit.failure(std::time::Instant::now());
                    self.set_circuit();
                    if opened {
                        tracing::warn!(endpoint = %self.endpoint, "OTLP circuit breaker open: collector keeps failing");
                    }
                    self.requeue(src);
                    let backoff = self.backoff.next_delay();
                    let server = delay.map(|d| d.min(self.max_server_delay));
                    let d = server.map_or(backoff, |s| s.max(backoff));
                    if self.closing() && lock(&self.shared.queue).disk.is_some() {
                        // Shutdown against a failing collector: the rest
                        // goes to disk in shutdown().
                        return;
                    }
                    self.wait(d).await;
                }
            }
        }
    }
}
