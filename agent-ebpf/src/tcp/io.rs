//! TCP, per-I/O design: the `raw_tp` variant (6.3+), for kernels that
//! refuse the socket-counter design ([`super::sockets`]).
//!
//! - Hooks, as `raw_tp` (untyped arguments, struct reads through
//!   `bpf_probe_read_kernel` at BTF offsets):
//!   - `inet_sock_set_state(sk, oldstate, newstate)` (4.16, "net:
//!     tracepoint: replace tcp_set_state tracepoint with
//!     inet_sock_set_state tracepoint"): the lifecycle. `CLOSE -> SYN_SENT`
//!     starts a client (peer, server port, SYN time remembered per socket);
//!     `SYN_SENT -> ESTABLISHED` counts a client open and its connect
//!     duration; `SYN_RECV -> ESTABLISHED` a server open; `SYN_SENT ->
//!     CLOSE` a failed connect; `ESTABLISHED|CLOSE_WAIT -> CLOSE` a reset,
//!     the same transitions as the kernel's `EstabResets`.
//!   - `sock_send_length(sk, ret, flags)` / `sock_recv_length(sk, ret, flags)`
//!     (6.3, "net: sock: add tracepoint for send recv length"): payload
//!     bytes as the syscall returned them (`ret > 0`; `MSG_PEEK` reads are
//!     not consumed and not counted). They also sample the smoothed RTT
//!     (`tcp_sock.srtt_us`) at most every [`c::RTT_SAMPLE_INTERVAL_NS`] per
//!     socket (paced in jiffies), so a long connection gives samples all
//!     through its life.
//!   - `tcp_retransmit_skb(sk, skb[, err])` (4.15): retransmitted segments,
//!     `tcp_skb_pcount(skb)`, as `RetransSegs` counts them. Since the
//!     tracepoint gained `err` it also fires for retransmits that were not
//!     sent; those are skipped (userspace tells from BTF whether `err` exists).
//! - Maps: `TCP_SOCKS` (hash, per live socket) here; the aggregates are in
//!   [`super`].
//! - Oldest kernel: 6.3 (`sock_send_length`).
//!
//! Cost: one program run per `sendmsg`/`recvmsg` of every socket on the
//! host, which is why it is the second choice.

use super::{
    add_peer, count, count_conn, count_failed_connect, inferred_key, off, record_connect,
    record_rtt, sock_key, tcp_family, TCP_CLOSE, TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCP_SYN_RECV,
    TCP_SYN_SENT,
};
use crate::kmem::field;
use agent_common::tcp::{self as c, PeerKey, SockState};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::{map, raw_tracepoint},
    maps::HashMap,
    programs::RawTracePointContext,
};

/// `raw_tp` arguments are untyped: struct reads go through
/// `bpf_probe_read_kernel` ([`crate::kmem::field`] with `BTF = false`).
const RAW: bool = false;

/// Allocated as sockets are seen, not preallocated: it holds nothing while
/// the socket-counter variant runs instead.
#[map]
static TCP_SOCKS: HashMap<u64, SockState> =
    HashMap::with_max_entries(c::SOCKS_ENTRIES, BPF_F_NO_PREALLOC);

const MSG_PEEK: u64 = 2;

#[inline(always)]
fn new_state(key: PeerKey, inferred: u32, syn_sent_ns: u64, last_rtt_jiffies: u64) -> SockState {
    SockState {
        key,
        inferred,
        syn_sent_ns,
        last_rtt_jiffies,
    }
}

/// `inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)`
#[inline(always)]
fn on_set_state(sk: u64, old: i32, new: i32) -> u32 {
    let Some(family) = tcp_family::<RAW>(sk) else {
        return 0;
    };
    match (old, new) {
        (TCP_CLOSE, TCP_SYN_SENT) => {
            if let Some(key) = sock_key::<RAW>(sk, family, c::ROLE_CLIENT) {
                let now = unsafe { bpf_ktime_get_ns() };
                if TCP_SOCKS.insert(sk, new_state(key, 0, now, 0), 0).is_err() {
                    count(c::SLOT_SOCKS_FULL);
                }
            }
        }
        (TCP_SYN_SENT, TCP_ESTABLISHED) => {
            count_conn::<RAW>(sk, c::SLOT_OPENED_CLIENT);
            if let Some(st) = TCP_SOCKS.get_ptr_mut(sk) {
                let start = unsafe { (*st).syn_sent_ns };
                record_connect(start, unsafe { bpf_ktime_get_ns() });
                unsafe { (*st).syn_sent_ns = 0 };
            }
        }
        (TCP_SYN_RECV, TCP_ESTABLISHED) => {
            count_conn::<RAW>(sk, c::SLOT_OPENED_SERVER);
            if let Some(key) = sock_key::<RAW>(sk, family, c::ROLE_SERVER) {
                if TCP_SOCKS.insert(sk, new_state(key, 0, 0, 0), 0).is_err() {
                    count(c::SLOT_SOCKS_FULL);
                }
            }
        }
        (TCP_SYN_SENT, TCP_CLOSE) => {
            count_failed_connect::<RAW>(sk);
            let _ = TCP_SOCKS.remove(sk);
        }
        (TCP_ESTABLISHED | TCP_CLOSE_WAIT, TCP_CLOSE) => {
            count_conn::<RAW>(sk, c::SLOT_FAILED_RESET);
            let _ = TCP_SOCKS.remove(sk);
        }
        (_, TCP_CLOSE) => {
            let _ = TCP_SOCKS.remove(sk);
        }
        _ => {}
    }
    0
}

/// Samples the smoothed RTT of `sk` (`tcp_sock.srtt_us` lies past `struct
/// sock`, so it is read with the helper).
#[inline(always)]
fn sample_rtt(sk: u64, key: &PeerKey) {
    if let Some(srtt8) = crate::kmem::read::<u32>(sk, off!(tcp_srtt_us)) {
        record_rtt(srtt8, key);
    }
}

/// `sock_send_length` / `sock_recv_length(struct sock *sk, int ret, int flags)`
#[inline(always)]
fn on_io(sk: u64, ret: u64, flags: u64, rx: bool) -> u32 {
    let ret = ret as i32;
    if ret <= 0 || (rx && flags & MSG_PEEK != 0) || off!(valid) == 0 || sk == 0 {
        return 0;
    }
    // Only TCP sockets are ever inserted into TCP_SOCKS, so a hit skips the
    // protocol check. RTT sampling is paced with `bpf_jiffies64` (a load of
    // the kernel's `jiffies_64`; a clock read costs about 35 ns on a KVM
    // guest): it needs only tick resolution.
    let now = unsafe { bpf_jiffies64() };
    let interval = off!(rtt_interval_jiffies) as u64;
    let mut sample = false;
    let key = match TCP_SOCKS.get_ptr_mut(sk) {
        Some(st) => unsafe {
            if now.wrapping_sub((*st).last_rtt_jiffies) >= interval || (*st).last_rtt_jiffies == 0 {
                (*st).last_rtt_jiffies = now;
                sample = true;
            }
            (*st).key
        },
        None => {
            let Some(family) = tcp_family::<RAW>(sk) else {
                return 0;
            };
            let Some(key) = inferred_key::<RAW>(sk, family) else {
                return 0;
            };
            // A socket that predates the agent. Remember it unless it is
            // already closed (its CLOSE transition, which removes entries,
            // is past).
            if field::<u8, RAW>(sk, off!(sk_state)) != Some(TCP_CLOSE as u8) {
                if TCP_SOCKS.insert(sk, new_state(key, 1, 0, now), 0).is_ok() {
                    sample = true;
                } else {
                    count(c::SLOT_SOCKS_FULL);
                }
            }
            key
        }
    };
    let n = ret as u64;
    if rx {
        add_peer(&key, 0, n, 0);
    } else {
        add_peer(&key, n, 0, 0);
    }
    if sample {
        sample_rtt(sk, &key);
    }
    0
}

/// `tcp_retransmit_skb(const struct sock *sk, const struct sk_buff *skb[, int err])`
#[inline(always)]
fn on_retransmit(sk: u64, skb: u64, err: u64) -> u32 {
    if off!(retrans_has_err) != 0 && err as i32 != 0 {
        return 0;
    }
    // `tcp_skb_cb` lives in `sk_buff.cb`.
    let segs = match field::<u16, RAW>(skb, off!(skb_gso_segs)) {
        Some(0) | None => 1,
        Some(n) => n as u64,
    };
    let key = match TCP_SOCKS.get_ptr(sk) {
        Some(st) => unsafe { (*st).key },
        None => match tcp_family::<RAW>(sk).and_then(|f| inferred_key::<RAW>(sk, f)) {
            Some(k) => k,
            None => return 0,
        },
    };
    add_peer(&key, 0, 0, segs);
    0
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn tcp_state_raw(ctx: RawTracePointContext) -> u32 {
    on_set_state(
        ctx.arg(0),
        ctx.arg::<u64>(1) as i32,
        ctx.arg::<u64>(2) as i32,
    )
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn tcp_send_raw(ctx: RawTracePointContext) -> u32 {
    on_io(ctx.arg(0), ctx.arg(1), ctx.arg(2), false)
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn tcp_recv_raw(ctx: RawTracePointContext) -> u32 {
    on_io(ctx.arg(0), ctx.arg(1), ctx.arg(2), true)
}

#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn tcp_retx_raw(ctx: RawTracePointContext) -> u32 {
    let err = if off!(retrans_has_err) != 0 {
        ctx.arg(2)
    } else {
        0
    };
    on_retransmit(ctx.arg(0), ctx.arg(1), err)
}
