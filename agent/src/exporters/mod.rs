//! Exporters: Prometheus text for `/metrics`, and OTLP push.

pub mod prometheus;
