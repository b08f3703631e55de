//! The socket-counter design's table of tracked sockets: open addressing
//! over a preallocated array, keyed by socket pointer.
//!
//! A BPF hash map insert costs about 300 ns on the reference VM (bucket
//! lock, element allocation), and every connection needs one; an array
//! slot costs a lookup. A socket lives in one of the [`c::TRACKED_PROBES`]
//! slots [`c::tracked_slot`] names for it, tried in order; a freed slot
//! becomes a tombstone, reused by later inserts, and never empty again, so
//! a lookup can stop at the first empty slot: a socket is never stored past
//! a slot that was empty when it was inserted.
//!
//! Without a compare-and-swap (Rust has none on the BPF target), two CPUs
//! may claim the same free slot at once. Each writer stores the value (with
//! its socket as `owner`) before the key and reads the key back; a reader
//! accepts a slot only if key and owner both name its socket. The loser of
//! such a race either sees the other key and takes its next slot, or does
//! not see it and is left untracked: counted when it closes
//! (`SLOT_CLOSED_UNTRACKED`), its bytes missing. What the scheme cannot rule
//! out is a value torn between two writers within the same few nanoseconds.
//! Both need two sockets whose probe sequences meet, starting within
//! nanoseconds of each other.

use agent_common::tcp::{self as c, SockAcct, TrackedSlot};
use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};

use super::off;

/// A slot that held a socket that closed.
const TOMBSTONE: u64 = 1;

#[map]
static TCP_TRACKED: Array<TrackedSlot> = Array::with_max_entries(c::TRACKED_DEFAULT_SLOTS, 0);

/// Scratch slot for [`id`].
#[map]
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

/// The slots socket `id` may occupy, in probe order: its hash and the
/// table's mask, read once per lookup.
#[derive(Clone, Copy)]
struct Probe {
    hash: u64,
    mask: u32,
}

impl Probe {
    #[inline(always)]
    fn of(id: u64) -> Self {
        Probe {
            hash: c::tracked_hash(id),
            mask: off!(tracked_mask),
        }
    }

    /// The `i`-th slot ([`c::tracked_slot`]).
    #[inline(always)]
    fn slot(self, i: u32) -> Option<&'static mut TrackedSlot> {
        let n = c::tracked_slot(self.hash, self.mask, i);
        // SAFETY: a value of TCP_TRACKED, valid for the program's run.
        TCP_TRACKED.get_ptr_mut(n).map(|p| unsafe { &mut *p })
    }
}

/// The socket's slot, if it is tracked.
#[inline(always)]
pub fn get(sk: u64) -> Option<&'static mut TrackedSlot> {
    let id = id(sk);
    if id <= TOMBSTONE {
        return None;
    }
    find(id)
}

/// The slot of socket `id` (from [`id`]), looked for up to the first empty
/// slot.
#[inline(always)]
fn find(id: u64) -> Option<&'static mut TrackedSlot> {
    let probe = Probe::of(id);
    for i in 0..c::TRACKED_PROBES {
        let s = probe.slot(i)?;
        // SAFETY: this slot of TCP_TRACKED.
        let key = unsafe { core::ptr::read_volatile(&s.sk) };
        if key == id && s.owner == id {
            return Some(s);
        }
        if key == 0 {
            return None;
        }
    }
    None
}

/// Whether `s` (from [`get`]) still holds socket `sk`: the state program
/// on another CPU may have freed it, and another socket taken it, while a
/// walk read it.
#[inline(always)]
pub fn holds(s: &TrackedSlot, sk: u64) -> bool {
    let id = id(sk);
    // SAFETY: a slot of TCP_TRACKED.
    unsafe { core::ptr::read_volatile(&s.sk) == id && core::ptr::read_volatile(&s.owner) == id }
}

/// Frees a slot [`get`] returned: the socket is no longer tracked.
#[inline(always)]
pub fn free(s: &mut TrackedSlot) {
    // SAFETY: a slot of TCP_TRACKED.
    unsafe { core::ptr::write_volatile(&mut s.sk, TOMBSTONE) };
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
/// an existing one. An existing entry is looked for along the whole probe
/// sequence first (it may lie past a tombstone), then the first free slot
/// is claimed.
#[inline(always)]
pub fn put(sk: u64, acct: &SockAcct, replace: bool) -> Put {
    let id = id(sk);
    if id <= TOMBSTONE {
        return Put::Full;
    }
    if let Some(s) = find(id) {
        if replace {
            s.acct = *acct;
        }
        return Put::Found;
    }
    let probe = Probe::of(id);
    for i in 0..c::TRACKED_PROBES {
        let Some(s) = probe.slot(i) else {
            return Put::Full;
        };
        // SAFETY: this slot of TCP_TRACKED.
        let key = unsafe { core::ptr::read_volatile(&s.sk) };
        if key == 0 || key == TOMBSTONE {
            s.acct = *acct;
            s.owner = id;
            // SAFETY: this slot of TCP_TRACKED; the read back tells whether
            // another CPU claimed it at the same time.
            unsafe {
                core::ptr::write_volatile(&mut s.sk, id);
                if core::ptr::read_volatile(&s.sk) == id {
                    return Put::Added;
                }
            }
        }
    }
    Put::Full
}
