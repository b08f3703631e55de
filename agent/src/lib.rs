//! Perch, an eBPF host agent.
//!
//! The data path, stage by stage:
//!
//! ```text
//! families (one folder each: rule, config, preparation, collector)
//!    │ registry
//!    ▼
//! gate ──plan──▶ probes (kernel programs, per family)
//!                  │ maps
//!                  ▼
//!          collectors (read maps, procfs, sysfs) ──▶ model::Snapshot
//!                  │
//!                  ▼
//!          pipeline (deny list, series cap, adaptive detail)
//!                  │
//!                  ▼
//!          exporters (Prometheus `/metrics`, OTLP push) + selfmetrics
//! ```

pub mod catalogue;
pub mod collectors;
pub mod config;
pub mod exporters;
pub mod families;
pub mod gate;
pub mod histogram;
pub mod model;
pub mod pipeline;
pub mod probes;
pub mod range;
pub mod runtime;
pub mod selfmetrics;
pub mod server;
pub mod sources;
pub mod state;
