//! The kernel gate: what this kernel supports, and the plan per family.

mod family;

pub use family::{Family, Mode};
