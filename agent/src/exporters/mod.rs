//! Exporters: Prometheus text for `/metrics`, and OTLP push.

pub mod json;
pub mod otlp;
pub mod prometheus;
