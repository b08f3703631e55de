//! Pipeline: deny list, series cap, adaptive detail. (Placeholder: passes through.)

use crate::model::Snapshot;

/// Transforms snapshots between collection and export.
#[derive(Debug, Default)]
pub struct Pipeline {}

impl Pipeline {
    pub fn process(&mut self, snapshot: Snapshot) -> Snapshot {
        snapshot
    }
}
