//! Configuration (in progress).
pub mod export;
