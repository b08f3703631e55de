//! `[export]` and `[pipeline]` configuration. (Owned by the OTLP export work.)

use serde::Deserialize;

/// `[export]`: where and how to push OTLP.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {}

/// `[pipeline]`: label hygiene and cardinality.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {}
