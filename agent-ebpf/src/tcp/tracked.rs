//! The socket-counter design's table of tracked sockets: open addressing
//! over a preallocated array, keyed by socket pointer.
//!
//! A BPF hash map insert costs about 300 ns on the reference VM (bucket
//! lock, element allocation), and every connection needs one; an array
//! slot costs a lookup. A socket lives in one of [`PROBES`] consecutive
//! slots from its hash; a freed slot becomes a tombstone, reused by later
//! inserts. A lookup stops at an empty slot and never probes more than
//! [`PROBES`] slots, so a miss is bounded too.
//!
//! Without a compare-and-swap (Rust has none on the BPF target), two CPUs
//! may claim the same free slot at once. Each writer stores the value (with
//! its socket as `owner`) before the key and reads the key back; a reader
//! accepts a slot only if key and owner both name its socket. A lost race
//! leaves the loser's socket untracked (it tries the next slot first; if it
//! still loses, the socket is counted in `SLOT_SOCKS_FULL`), never a slot
//! whose value belongs to another socket, except for a value torn between
//! two writers within the same few nanoseconds.

use agent_common::tcp::{self as c, SockAcct, TrackedSlot};
use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};

use super::off;

/// Slots probed from a socket's hash.
const PROBES: u32 = 8;
/// A slot that held a socket that closed.
const TOMBSTONE: u64 = 1;

#[map(name = "TCP_TRACKED")]
static TCP_TRACKED: Array<TrackedSlot> = Array::with_max_entries(c::TRACKED_DEFAULT_SLOTS, 0);

/// Scratch slot for [`id`].
#[map(name = "TCP_SCRATCH")]
static TCP_SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `sk` as a plain number. The verifier tracks a socket pointer as a
/// pointer and refuses arithmetic on it (and a partial read of its stack
/// copy); a copy stored in a map reads back as a number (storing a pointer
/// in a map needs `CAP_PERFMON`, which the agent needs anyway).
#[inline(always)]
pub fn id(sk: u64) -> u64 {
    match TCP_SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, written and read back in one run.
        Some(p) => unsafe {
            core::ptr::write_volatile(p, sk);
            core::ptr::read_volatile(p)
        },
        None => 0,
    }
}

/// The first slot of socket `id`'s probe sequence.
#[inline(always)]
fn home(id: u64) -> u32 {
    // Sockets are cache-line aligned slab objects: drop the low bits, mix.
    let h = (id >> 6).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 32) as u32 & off!(tracked_mask)
}

#[inline(always)]
fn slot(i: u32) -> Option<&'static mut TrackedSlot> {
    // SAFETY: a value of TCP_TRACKED, valid for the program's run.
    TCP_TRACKED.get_ptr_mut(i).map(|p| unsafe { &mut *p })
}

/// The socket's entry, if tracked.
#[inline(always)]
pub fn get(sk: u64) -> Option<&'static mut SockAcct> {
    let sk = id(sk);
    if sk <= TOMBSTONE {
        return None;
    }
    let h = home(sk);
    let mask = off!(tracked_mask);
    for i in 0..PROBES {
        let s = slot((h + i) & mask)?;
        let key = unsafe { core::ptr::read_volatile(&s.sk) };
        if key == sk && s.owner == sk {
            return Some(&mut s.acct);
        }
        if key == 0 {
            return None;
        }
    }
    None
}

/// What [`put`] did.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// `sk` took a slot.
    Added,
    /// `sk` was tracked already (and its entry was replaced, if asked).
    Found,
    /// No slot of its probe sequence was free.
    Full,
}

/// Tracks `sk` with `acct`: replaces its entry when `replace`, else keeps
/// an existing one.
#[inline(always)]
pub fn put(sk: u64, acct: &SockAcct, replace: bool) -> Put {
    let sk = id(sk);
    if sk <= TOMBSTONE {
        return Put::Full;
    }
    let h = home(sk);
    let mask = off!(tracked_mask);
    for i in 0..PROBES {
        let Some(s) = slot((h + i) & mask) else {
            return Put::Full;
        };
        let key = unsafe { core::ptr::read_volatile(&s.sk) };
        if key == sk && s.owner == sk {
            if replace {
                s.acct = *acct;
            }
            return Put::Found;
        }
        if key == 0 || key == TOMBSTONE {
            s.acct = *acct;
            s.owner = sk;
            unsafe {
                core::ptr::write_volatile(&mut s.sk, sk);
                if core::ptr::read_volatile(&s.sk) == sk {
                    return Put::Added;
                }
            }
        }
    }
    Put::Full
}

/// Forgets `sk`.
#[inline(always)]
pub fn remove(sk: u64) {
    let sk = id(sk);
    if sk <= TOMBSTONE {
        return;
    }
    let h = home(sk);
    let mask = off!(tracked_mask);
    for i in 0..PROBES {
        let Some(s) = slot((h + i) & mask) else {
            return;
        };
        let key = unsafe { core::ptr::read_volatile(&s.sk) };
        if key == sk {
            unsafe { core::ptr::write_volatile(&mut s.sk, TOMBSTONE) };
            return;
        }
        if key == 0 {
            return;
        }
    }
}
