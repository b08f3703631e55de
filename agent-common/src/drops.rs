//! Drops family: packets freed by `kfree_skb` with the kernel's drop reason.

use crate::contract::MapSpec;

/// Per-CPU array of `u64` drop counts, indexed by drop reason (the value of
/// `enum skb_drop_reason`), plus [`SLOT_SUBSYSTEM`] and [`SLOT_OVERFLOW`].
/// Reason numbers differ between kernels (values are inserted mid-enum):
/// userspace names them from the running kernel's BTF, never from a table.
pub const MAP_COUNTS: &str = "DROPS_BY_REASON";

/// Core reasons counted one slot each: `0..MAX_REASONS`. Linux 6.18 has
/// `SKB_DROP_REASON_MAX = 128`; twice that leaves room for the reasons
/// kernels keep adding.
pub const MAX_REASONS: u32 = 256;
/// Reasons of a subsystem (`reason & SUBSYS_MASK != 0`, 6.4+, commit
/// 071c0fc6fb91: mac80211, openvswitch, ...), counted together: their
/// numbering lives in per-subsystem enums.
pub const SLOT_SUBSYSTEM: u32 = MAX_REASONS;
/// Core reasons at or above [`MAX_REASONS`] (a future kernel), counted
/// together rather than lost.
pub const SLOT_OVERFLOW: u32 = MAX_REASONS + 1;
/// Number of slots in [`MAP_COUNTS`].
pub const SLOTS: u32 = MAX_REASONS + 2;

/// Every map of the family's kernel side ([`crate::contract`]).
pub const MAPS: &[MapSpec] = &[MapSpec::per_cpu_array::<u64>(MAP_COUNTS, SLOTS)];

/// `SKB_DROP_REASON_SUBSYS_MASK`: the high 16 bits name a subsystem.
pub const SUBSYS_MASK: u32 = 0xffff_0000;

/// The slot counting `reason`.
#[inline(always)]
pub fn slot(reason: u32) -> u32 {
    if reason & SUBSYS_MASK != 0 {
        SLOT_SUBSYSTEM
    } else if reason < MAX_REASONS {
        reason
    } else {
        SLOT_OVERFLOW
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots() {
        let cases = [
            (0, 0),
            (2, 2),
            (12, 12),
            (MAX_REASONS - 1, MAX_REASONS - 1),
            (MAX_REASONS, SLOT_OVERFLOW),
            (0xffff, SLOT_OVERFLOW),
            (0x1_0001, SLOT_SUBSYSTEM),
            (0xffff_ffff, SLOT_SUBSYSTEM),
        ];
        for (reason, want) in cases {
            assert_eq!(slot(reason), want, "{reason:#x}");
        }
        const { assert!(SLOT_OVERFLOW < SLOTS && SLOT_SUBSYSTEM < SLOTS) };
    }
}
