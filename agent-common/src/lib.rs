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

/// MurmurHash3's 64-bit finalizer: spreads keys whose bits say little
/// (sequential ids, aligned pointers) over a table's slots.
#[inline(always)]
pub const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}
