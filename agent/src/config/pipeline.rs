//! `[pipeline]`: what happens to a snapshot before any exporter.

use serde::Deserialize;

use super::export::ExportConfigError;

/// `[pipeline]`: label hygiene, cardinality, adaptive detail, memory limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Attribute keys removed from every series; the series they split are
    /// merged (values added), so totals stay exact.
    pub deny_attributes: Vec<String>,
    /// Port attributes whose ephemeral values (>= `ephemeral_port_min`) are
    /// replaced by `"ephemeral"`, so ephemeral ports never leave the agent.
    pub ephemeral_port_attributes: Vec<String>,
    /// First ephemeral port (Linux `ip_local_port_range` default: 32768).
    pub ephemeral_port_min: u16,
    /// Series per metric, overflow series included. Points past the cap fold
    /// into one series with `otel.metric.overflow=true`.
    pub max_series_per_metric: usize,
    /// Per-peer series kept in reduced detail (the busiest peers of each
    /// metric); default 10 % of the cap.
    pub detail_top_k: usize,
    /// Error ratio above which full per-peer detail is exported.
    pub detail_enter_ratio: f64,
    /// Error ratio below which detail goes back to reduced, after
    /// `detail_exit_intervals` intervals in a row (hysteresis).
    pub detail_exit_ratio: f64,
    /// Healthy intervals in a row needed to leave full detail.
    pub detail_exit_intervals: u32,
    /// Intervals a series may be absent before its state is forgotten.
    pub series_ttl_intervals: u32,
    /// Resident memory above which detail series are shed (folded).
    pub memory_soft_limit_bytes: u64,
    /// Resident memory above which new data is refused (not exported).
    pub memory_hard_limit_bytes: u64,
}

/// The default deny list: keys that identify a request, a user or a process.
pub const DEFAULT_DENY_ATTRIBUTES: &[&str] = &[
    "user_id",
    "user.id",
    "request_id",
    "request.id",
    "trace_id",
    "span_id",
    "session_id",
    "session.id",
    "pid",
    "process.pid",
    "thread.id",
    "client.port",
    "source.port",
    "network.local.port",
];

/// Port attributes checked for ephemeral values by default. `server.port`
/// is not among them: Perch sets it to the listening side's port by
/// construction (never a client's), and services do listen above 32767.
/// Add it to fold high server ports anyway.
pub const DEFAULT_EPHEMERAL_PORT_ATTRIBUTES: &[&str] = &["network.peer.port", "destination.port"];

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            deny_attributes: DEFAULT_DENY_ATTRIBUTES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ephemeral_port_attributes: DEFAULT_EPHEMERAL_PORT_ATTRIBUTES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ephemeral_port_min: 32768,
            max_series_per_metric: 2000,
            detail_top_k: 200,
            detail_enter_ratio: 0.02,
            detail_exit_ratio: 0.01,
            detail_exit_intervals: 3,
            series_ttl_intervals: 10,
            // Below the 128 MiB that deploy/ grants the process, so the
            // agent sheds and refuses before the kernel's OOM killer acts.
            // Steady RSS is about 9 MB; a 10-minute outage at 100x the
            // normal point rate peaked at 88.5 MiB (docs/performance.md).
            memory_soft_limit_bytes: 96 * 1024 * 1024,
            memory_hard_limit_bytes: 112 * 1024 * 1024,
        }
    }
}

impl PipelineConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ExportConfigError> {
        let range = |key, value: String, reason: &str| {
            Err(ExportConfigError::Range {
                key,
                value,
                reason: reason.to_owned(),
            })
        };
        if self.max_series_per_metric < 2 {
            return range(
                "pipeline.max_series_per_metric",
                self.max_series_per_metric.to_string(),
                "must be at least 2 (one series plus the overflow series)",
            );
        }
        if self.detail_top_k >= self.max_series_per_metric {
            return range(
                "pipeline.detail_top_k",
                self.detail_top_k.to_string(),
                "must be below max_series_per_metric",
            );
        }
        for (key, v) in [
            ("pipeline.detail_enter_ratio", self.detail_enter_ratio),
            ("pipeline.detail_exit_ratio", self.detail_exit_ratio),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return range(key, v.to_string(), "must be within 0..=1");
            }
        }
        if self.detail_exit_ratio > self.detail_enter_ratio {
            return range(
                "pipeline.detail_exit_ratio",
                self.detail_exit_ratio.to_string(),
                "must not exceed detail_enter_ratio (hysteresis)",
            );
        }
        if self.memory_soft_limit_bytes > self.memory_hard_limit_bytes {
            return range(
                "pipeline.memory_soft_limit_bytes",
                self.memory_soft_limit_bytes.to_string(),
                "must not exceed memory_hard_limit_bytes",
            );
        }
        if self.series_ttl_intervals == 0 {
            return range(
                "pipeline.series_ttl_intervals",
                "0".into(),
                "must be at least 1",
            );
        }
        Ok(())
    }
}
