//! What the collection thread publishes and the HTTP server reads: the
//! last snapshot, the plan and the kernel facts. Both sides depend on this
//! module, never on each other.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::gate::{KernelFacts, Plan};
use crate::model::Snapshot;
use crate::selfmetrics::SelfMetrics;

/// State shared between the collection thread and the HTTP server.
#[derive(Debug)]
pub struct Shared {
    pub selfm: Arc<SelfMetrics>,
    pub plan: Plan,
    pub facts: KernelFacts,
    pub interval: Duration,
    /// The last snapshot, after the pipeline.
    pub last: Mutex<Option<(Instant, Arc<Snapshot>)>>,
}

impl Shared {
    /// The last snapshot and its age.
    pub fn last(&self) -> Option<(Duration, Arc<Snapshot>)> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref().map(|(t, s)| (t.elapsed(), s.clone()))
    }
}
