//! The contract between Perch's kernel programs (`agent-ebpf`) and its userspace
//! daemon (`agent`).
//!
//! Everything here is `no_std` and shared byte for byte by both sides: map
//! names, slot indexes, map sizes and the histogram bucketing. [`contract`]
//! lists every map and global the kernel object must define. Shared structs
//! are `#[repr(C)]`, `Copy`, pointer-free and padded explicitly, with a size
//! assertion each.
#![no_std]

pub mod contract;
pub mod drops;
pub mod exp;
pub mod sched;
pub mod softirq;
pub mod tcp;
