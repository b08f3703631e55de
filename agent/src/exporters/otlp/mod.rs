//! OTLP push exporter (in progress).
