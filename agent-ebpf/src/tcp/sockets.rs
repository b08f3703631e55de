//! TCP, socket-counter design: the `tp_btf` variant (5.11+), preferred.
//!
//! Nothing runs per send, receive or retransmit. The kernel already counts,
//! per socket, what the family reports, exactly where it counts its own
//! MIB counters: `tcp_sock.bytes_sent` and `bytes_retrans` (payload put on
//! the wire, and the part of it that was a retransmission),
//! `bytes_received` (sequence space received in order), `total_retrans`
//! (segments, next to `RetransSegs`). Those are read:
//! - at `TCP_CLOSE`, by [`tcp_state_btf`], which adds the socket's final
//!   contribution to `TCP_PEERS` (so a connection that opens and closes
//!   between two collections is counted exactly);
//! - for live sockets, by [`tcp_walk`], which userspace runs at each
//!   collection and which writes one [`LiveRecord`] per tracked socket.
//!
//! A socket's contribution is payload bytes sent once (`bytes_sent -
//! bytes_retrans`), payload bytes received (`bytes_received`, minus 1 once
//! the peer's FIN arrived: `tcp_fin()` sets `SOCK_DONE`) and retransmitted
//! segments, minus the values when tracking began ([`SockAcct::base`]).
//!
//! - Hooks:
//!   - `tp_btf/inet_sock_set_state` (tracepoint 4.16, `tp_btf` 5.5,
//!     `bpf_skc_to_tcp_sock` 5.9): starts tracking at `CLOSE -> SYN_SENT`
//!     (client; SYN time) and `SYN_RECV -> ESTABLISHED` (server), counts
//!     opens, failed connects and the connect duration, folds the counters
//!     at `TCP_CLOSE`.
//!   - `iter/task_file` (5.8) with `bpf_sock_from_file` (5.11, commit
//!     4f19cab76136): every open file of every process, so every network
//!     namespace. Reports live tracked sockets, samples the smoothed RTT
//!     (`srtt_us`) of each that moved data since the last walk (a long
//!     connection gives a sample every interval it is active, not only one
//!     at close), and adopts established sockets it does not know (older
//!     than the agent: role inferred from ports, counted from then on).
//!     Userspace runs it once at attach time, so the sockets open at
//!     start-up count from then.
//! - Maps: `TCP_TRACKED` ([`super::tracked`], keyed by socket pointer);
//!   the aggregates are in [`super`].
//! - Oldest kernel: 5.11.
//!
//! Concurrency. The state program runs with the socket locked (owned, or
//! under its spinlock in softirq); the walk does not lock. A socket that
//! closes during a walk must not count twice: the close sets
//! [`c::SOCK_CLOSED`] before it adds to `TCP_PEERS`, userspace reads
//! `TCP_PEERS` before it starts the walk, and the walk skips closed
//! entries. The worst case is a socket missing from one collection.

use core::{ffi::c_void, mem::size_of, ptr};

use super::tracked::{self, Put};
use super::{
    add_peer, count, count_conn, count_failed_connect, inferred_key, off, record_connect,
    record_rtt, sock_key, tcp_family, was_established, TCP_CLOSE, TCP_CLOSE_WAIT, TCP_ESTABLISHED,
    TCP_SYN_RECV, TCP_SYN_SENT,
};
use crate::kmem::field;
use agent_common::tcp::{self as c, LiveRecord, PeerValue, SockAcct};
use aya_ebpf::{
    bindings::seq_file,
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_seq_write, bpf_skc_to_tcp_sock, bpf_sock_from_file},
    },
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

/// `tp_btf` and iterator arguments are BTF-typed: struct fields are plain
/// loads the verifier checks ([`crate::kmem::field`] with `BTF = true`).
const BTF: bool = true;

/// `enum sock_flags`: `SOCK_DEAD`, then `SOCK_DONE` (unchanged since 2.6).
const SOCK_DONE_BIT: u64 = 1;

/// `sk` as a `struct tcp_sock *` (0 if it is not a full TCP socket): the
/// counters lie past `struct sock`, where a load through `sk` is refused.
#[inline(always)]
fn tcp_sock(sk: u64) -> u64 {
    // The helper refuses a pointer that may be NULL.
    if sk == 0 {
        return 0;
    }
    // SAFETY: the helper checks the socket's type and returns NULL if wrong.
    unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) as u64 }
}

/// The socket's counters as the family counts them (module docs). With
/// `BTF`, `tp` is a `struct tcp_sock` pointer the verifier knows and the
/// fields are plain loads; without, it is an address read through
/// `bpf_probe_read_kernel` (the walk's socket pointer is untrusted, and the
/// counters lie past `struct sock`).
///
/// The walk reads a socket the kernel may be updating on another CPU, so
/// the order of the reads matters: each pair is read so that a concurrent
/// update can only make the value low for one collection, never high (the
/// collector never lets an exported total go down, so a high one would
/// stay). The kernel adds to `bytes_retrans` before it transmits (and adds
/// to `bytes_sent`): `bytes_sent` is read first. It adds the FIN to
/// `bytes_received` before `tcp_fin()` sets `SOCK_DONE`: `bytes_received`
/// is read first.
#[inline(always)]
fn counters<const T: bool>(tp: u64) -> PeerValue {
    let ld64 = |o: u32| field::<u64, T>(tp, o).unwrap_or(0);
    let sent = ld64(off!(tcp_bytes_sent));
    let retrans = ld64(off!(tcp_bytes_retrans));
    let received = ld64(off!(tcp_bytes_received));
    let fin = (ld64(off!(sk_flags)) >> SOCK_DONE_BIT) & 1;
    PeerValue {
        tx_bytes: sent.saturating_sub(retrans),
        rx_bytes: received.saturating_sub(fin),
        retrans_segs: field::<u32, T>(tp, off!(tcp_total_retrans)).unwrap_or(0) as u64,
    }
}

#[inline(always)]
fn minus(a: &PeerValue, b: &PeerValue) -> PeerValue {
    PeerValue {
        tx_bytes: a.tx_bytes.saturating_sub(b.tx_bytes),
        rx_bytes: a.rx_bytes.saturating_sub(b.rx_bytes),
        retrans_segs: a.retrans_segs.saturating_sub(b.retrans_segs),
    }
}

#[inline(always)]
fn is_zero(v: &PeerValue) -> bool {
    v.tx_bytes == 0 && v.rx_bytes == 0 && v.retrans_segs == 0
}

/// Whether the socket moved data since the iterator last looked.
#[inline(always)]
fn moved(cur: &PeerValue, seen: &PeerValue) -> bool {
    cur.tx_bytes != seen.tx_bytes || cur.rx_bytes != seen.rx_bytes
}

/// Starts tracking a socket seen from its start (its counters are zero).
#[inline(always)]
fn track(sk: u64, family: u16, role: u8, syn_sent_ns: u64) {
    let Some(key) = sock_key::<BTF>(sk, family, role) else {
        return;
    };
    let st = SockAcct {
        key,
        flags: 0,
        syn_sent_ns,
        session: 0,
        base: PeerValue::default(),
        seen: PeerValue::default(),
    };
    // Replaces: a socket reused after `connect(AF_UNSPEC)`, or an address
    // reused by a new socket, starts over.
    if tracked::put(sk, &st, true) == Put::Full {
        count(c::SLOT_SOCKS_FULL);
    }
}

/// At `TCP_CLOSE` from `old`: adds the socket's final contribution to its
/// peer, once, a last RTT sample if it moved data since the walk last saw
/// it, and forgets the socket.
#[inline(always)]
fn close(sk: u64, old: i32) {
    let Some(slot) = tracked::get(sk) else {
        if was_established(old) {
            count(c::SLOT_CLOSED_UNTRACKED);
        }
        return;
    };
    let st = &mut slot.acct;
    // Closed first, then folded (module docs).
    st.flags |= c::SOCK_CLOSED;
    let tp = tcp_sock(sk);
    if tp != 0 {
        let cur = counters::<BTF>(tp);
        let d = minus(&cur, &st.base);
        if !is_zero(&d) {
            add_peer(&st.key, d.tx_bytes, d.rx_bytes, d.retrans_segs);
        }
        if moved(&cur, &st.seen) {
            record_rtt(
                field::<u32, BTF>(tp, off!(tcp_srtt_us)).unwrap_or(0),
                &st.key,
            );
        }
    }
    tracked::free(slot);
}

/// `inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)`
#[inline(always)]
fn on_set_state(sk: u64, old: i32, new: i32) -> u32 {
    // Half the transitions of a connection (to FIN_WAIT1, FIN_WAIT2,
    // CLOSE_WAIT, LAST_ACK, CLOSING, and a child's first SYN_RECV) matter
    // to nobody: leave before reading the socket.
    if !matches!(new, TCP_ESTABLISHED | TCP_CLOSE | TCP_SYN_SENT) {
        return 0;
    }
    let Some(family) = tcp_family::<BTF>(sk) else {
        return 0;
    };
    match (old, new) {
        (TCP_CLOSE, TCP_SYN_SENT) => {
            track(sk, family, c::ROLE_CLIENT, unsafe { bpf_ktime_get_ns() });
        }
        // A socket restored in TCP repair mode (`tcp_finish_connect`
        // without a handshake): tracked, not counted as opened.
        (TCP_CLOSE, TCP_ESTABLISHED) => track(sk, family, c::ROLE_CLIENT, 0),
        (TCP_SYN_SENT, TCP_ESTABLISHED) => {
            count_conn::<BTF>(sk, c::SLOT_OPENED_CLIENT);
            if let Some(st) = tracked::get(sk).map(|s| &mut s.acct) {
                // `tcp_mstamp` (µs, CLOCK_MONOTONIC like bpf_ktime_get_ns)
                // was refreshed for the SYN-ACK being processed: "now",
                // without a clock read.
                let tp = tcp_sock(sk);
                if tp != 0 {
                    let now_us = field::<u64, BTF>(tp, off!(tcp_mstamp)).unwrap_or(0);
                    record_connect(st.syn_sent_ns, now_us * 1000);
                }
                st.syn_sent_ns = 0;
            }
        }
        (TCP_SYN_RECV, TCP_ESTABLISHED) => {
            count_conn::<BTF>(sk, c::SLOT_OPENED_SERVER);
            track(sk, family, c::ROLE_SERVER, 0);
        }
        (TCP_SYN_SENT, TCP_CLOSE) => {
            count_failed_connect::<BTF>(sk);
            close(sk, old);
        }
        (TCP_ESTABLISHED | TCP_CLOSE_WAIT, TCP_CLOSE) => {
            count_conn::<BTF>(sk, c::SLOT_FAILED_RESET);
            close(sk, old);
        }
        (_, TCP_CLOSE) => close(sk, old),
        _ => {}
    }
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tcp_state_btf(ctx: BtfTracePointContext) -> u32 {
    on_set_state(
        ctx.arg(0),
        ctx.arg::<u64>(1) as i32,
        ctx.arg::<u64>(2) as i32,
    )
}

/// Pointer field `i` of an iterator's context (`struct bpf_iter__*`, each
/// member 8 bytes).
#[inline(always)]
fn ctx_field(ctx: *mut c_void, i: usize) -> u64 {
    // SAFETY: the verifier checks every context load against the
    // iterator's context type.
    unsafe { ptr::read_volatile(ctx.cast::<u64>().add(i)) }
}

/// `iter/task_file`: `struct bpf_iter__task_file { meta; task; fd; file; }`.
/// Run by userspace at each collection (and once at attach time).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn tcp_walk(ctx: *mut c_void) -> i32 {
    let meta = ctx_field(ctx, 0);
    let file = ctx_field(ctx, 3);
    if file == 0 {
        return 0;
    }
    if off!(no_sock_from_file) == 0 {
        // SAFETY: NULL unless the file is a socket.
        let sock = unsafe { bpf_sock_from_file(file as *mut _) } as u64;
        if sock == 0 {
            return 0;
        }
        // `socket->sk`: readable with plain loads inside `struct sock`, but
        // untrusted, so helpers refuse it and `tcp_sock` fields go through
        // `bpf_probe_read_kernel`.
        walk_sock::<BTF>(meta, field::<u64, BTF>(sock, off!(socket_sk)).unwrap_or(0))
    } else {
        // Before 5.11 there is no `bpf_sock_from_file` (the verifier of
        // such a kernel never sees the call: the branch is a `.rodata`
        // constant). The kernel's own test: a socket's inode is S_IFSOCK,
        // and its `file->private_data` is the `struct socket`. The pointer
        // is untrusted, so the socket is read with `bpf_probe_read_kernel`.
        let inode = field::<u64, BTF>(file, off!(file_f_inode)).unwrap_or(0);
        if inode == 0 {
            return 0;
        }
        let mode = field::<u16, BTF>(inode, off!(inode_i_mode)).unwrap_or(0);
        if mode & S_IFMT != S_IFSOCK {
            return 0;
        }
        let sock = field::<u64, BTF>(file, off!(file_private_data)).unwrap_or(0);
        if sock == 0 {
            return 0;
        }
        let sk = crate::kmem::read::<u64>(sock, off!(socket_sk)).unwrap_or(0);
        if sk == 0 {
            return 0;
        }
        walk_sock::<false>(meta, sk)
    }
}

/// `S_IFMT` and `S_IFSOCK` (`include/uapi/linux/stat.h`).
const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

/// The walk's work for one socket `sk`; with `B`, `sk` is a BTF-typed
/// pointer (plain loads), without, an address read through the helper.
#[inline(always)]
fn walk_sock<const B: bool>(meta: u64, sk: u64) -> i32 {
    let Some(family) = tcp_family::<B>(sk) else {
        return 0;
    };
    let state = field::<u8, B>(sk, off!(sk_state)).unwrap_or(0) as i32;
    if !was_established(state) {
        if state == TCP_CLOSE {
            // An entry a walk adopted while the socket was closing: the new
            // state is stored after the tracepoint, so a walk in between saw
            // an established socket the state program had just forgotten.
            // Only adopted entries: a fresh one from `track` sees CLOSE for
            // the same reason until `SYN_SENT` is stored.
            if let Some(slot) = tracked::get(sk) {
                if slot.acct.flags & c::SOCK_ADOPTED != 0 {
                    tracked::free(slot);
                }
            }
        }
        return 0;
    }
    // `bpf_iter_meta { seq; session_id; seq_num; }`
    let session = field::<u64, BTF>(meta, 8).unwrap_or(0);
    let cur = counters::<false>(sk);
    let Some(slot) = tracked::get(sk) else {
        adopt::<B>(sk, family, session, cur);
        return 0;
    };
    let st = &mut slot.acct;
    // Closed, or already reported through another descriptor of this walk.
    if st.flags & c::SOCK_CLOSED != 0 || st.session == session {
        return 0;
    }
    st.session = session;
    if moved(&cur, &st.seen) {
        if let Some(srtt8) = crate::kmem::read::<u32>(sk, off!(tcp_srtt_us)) {
            record_rtt(srtt8, &st.key);
        }
        st.seen = cur;
    }
    let rec = LiveRecord {
        key: st.key,
        _pad: 0,
        value: minus(&cur, &st.base),
    };
    // Closed (and the slot reused) while this ran: the next walk, or the
    // fold, counts it.
    if is_zero(&rec.value) || !tracked::holds(slot, sk) {
        return 0;
    }
    // `bpf_iter_meta.seq` is its first member.
    let seq = field::<u64, BTF>(meta, 0).unwrap_or(0) as *mut seq_file;
    // SAFETY: `rec` lives on the stack for the call.
    unsafe {
        bpf_seq_write(
            seq,
            ptr::from_ref(&rec).cast(),
            size_of::<LiveRecord>() as u32,
        )
    };
    0
}

/// Starts tracking an established socket the walk found untracked: it
/// predates the agent (or its start was missed), so it counts from now.
#[inline(always)]
fn adopt<const B: bool>(sk: u64, family: u16, session: u64, now: PeerValue) {
    let Some(key) = inferred_key::<B>(sk, family) else {
        return;
    };
    let st = SockAcct {
        key,
        flags: c::SOCK_ADOPTED,
        syn_sent_ns: 0,
        session,
        base: now,
        seen: now,
    };
    // Keeps an entry the state program may have made meanwhile.
    match tracked::put(sk, &st, false) {
        Put::Added => count(c::SLOT_ADOPTED),
        Put::Found => {}
        Put::Full => count(c::SLOT_SOCKS_FULL),
    }
}
