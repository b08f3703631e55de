//! Drops family: packets freed by `kfree_skb`, by the kernel's drop reason
//! (5.17+) or, where `kfree_skb` has no reason argument, by L3 protocol.

use crate::contract::{GlobalSpec, MapSpec};

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
/// Without a reason argument (before 5.17, or `probes.drops.by =
/// "protocol"`): drops of IPv4 packets (`skb->protocol == ETH_P_IP`).
pub const SLOT_PROTO_IPV4: u32 = MAX_REASONS + 2;
/// ... of IPv6 packets (`ETH_P_IPV6`).
pub const SLOT_PROTO_IPV6: u32 = MAX_REASONS + 3;
/// ... of any other protocol (ARP, 802.1Q, none set yet, ...).
pub const SLOT_PROTO_OTHER: u32 = MAX_REASONS + 4;
/// ... where the protocol could not be read (no `sk_buff` layout: no BTF).
pub const SLOT_PROTO_UNREAD: u32 = MAX_REASONS + 5;
/// Number of slots in [`MAP_COUNTS`].
pub const SLOTS: u32 = MAX_REASONS + 6;

/// Every map of the family's kernel side ([`crate::contract`]).
pub const MAPS: &[MapSpec] = &[MapSpec::per_cpu_array::<u64>(MAP_COUNTS, SLOTS)];

/// Global (`.rodata`) holding [`DropsConfig`].
pub const GLOBAL_CONFIG: &str = "DROPS_CONFIG";

/// Every global of the family's kernel side that userspace overrides.
pub const GLOBALS: &[GlobalSpec] = &[GlobalSpec::of::<DropsConfig>(GLOBAL_CONFIG)];

/// How `kfree_skb` is read, set by userspace from the running kernel's BTF.
/// The all-zero default reads the reason argument: without BTF userspace
/// cannot tell, and a kernel without the argument refuses the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropsConfig {
    /// Non-zero: `kfree_skb` has no `reason` argument (before 5.17, commit
    /// c504e5c2f964), so count by protocol instead and never read it (the
    /// verifier of such a kernel refuses the access).
    pub no_reason: u32,
    /// Byte offset of `sk_buff.protocol` (`__be16`), from BTF; 0 when
    /// unknown (the field is never first), then drops count in
    /// [`SLOT_PROTO_UNREAD`].
    pub protocol: u32,
}

const _: () = assert!(core::mem::size_of::<DropsConfig>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), only integer fields, no implicit padding.
    unsafe impl aya::Pod for super::DropsConfig {}
}

/// `ETH_P_IP` (`include/uapi/linux/if_ether.h`).
pub const ETH_P_IP: u16 = 0x0800;
/// `ETH_P_IPV6`.
pub const ETH_P_IPV6: u16 = 0x86dd;

/// The slot counting a drop whose `skb->protocol` holds `be` (the field's
/// bytes, network order, read as a native `u16`).
#[inline(always)]
pub fn protocol_slot(be: u16) -> u32 {
    match u16::from_be(be) {
        ETH_P_IP => SLOT_PROTO_IPV4,
        ETH_P_IPV6 => SLOT_PROTO_IPV6,
        _ => SLOT_PROTO_OTHER,
    }
}

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

    #[test]
    fn protocol_slots() {
        // The bytes as they lie in `skb->protocol`: network order.
        let cases = [
            ([0x08, 0x00], SLOT_PROTO_IPV4),
            ([0x86, 0xdd], SLOT_PROTO_IPV6),
            ([0x08, 0x06], SLOT_PROTO_OTHER),
            ([0x00, 0x08], SLOT_PROTO_OTHER),
            ([0, 0], SLOT_PROTO_OTHER),
        ];
        for (bytes, want) in cases {
            assert_eq!(protocol_slot(u16::from_ne_bytes(bytes)), want, "{bytes:x?}");
        }
        // No protocol slot is a reason slot.
        for s in [
            SLOT_PROTO_IPV4,
            SLOT_PROTO_IPV6,
            SLOT_PROTO_OTHER,
            SLOT_PROTO_UNREAD,
        ] {
            assert!(s > SLOT_OVERFLOW && s < SLOTS);
        }
    }
}
