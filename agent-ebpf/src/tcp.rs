//! TCP family: per-peer payload bytes and retransmits, connection lifecycle
//! (opened, failed by cause), connect duration and smoothed RTT.
//!
//! - Hooks, each as `tp_btf` (preferred) or `raw_tp`, sharing one body:
//!   - `inet_sock_set_state(sk, oldstate, newstate)` (4.16, "net:
//!     tracepoint: replace tcp_set_state tracepoint with
//!     inet_sock_set_state tracepoint"): the lifecycle. `CLOSE -> SYN_SENT` starts a client
//!     (peer, server port, SYN time remembered per socket);
//!     `SYN_SENT -> ESTABLISHED` counts a client open and its connect
//!     duration; `SYN_RECV -> ESTABLISHED` a server open;
//!     `SYN_SENT -> CLOSE` a failed connect, classified by `sk_err`
//!     (`ECONNREFUSED`: a reset answered the SYN; any other error: the SYN
//!     retries ran out or an ICMP error was last; none: the application gave
//!     up, not counted); `ESTABLISHED|CLOSE_WAIT -> CLOSE` a reset, the same
//!     transitions as the kernel's `EstabResets`.
//!   - `sock_send_length(sk, ret, flags)` / `sock_recv_length(sk, ret, flags)`
//!     (6.3, "net: sock: add tracepoint for send recv length"): payload bytes as the syscall returned
//!     them (`ret > 0`; `MSG_PEEK` reads are not consumed and not counted).
//!     They also sample the smoothed RTT (`tcp_sock.srtt_us`) at most every
//!     [`c::RTT_SAMPLE_INTERVAL_NS`] per socket (paced in jiffies), so a long connection gives
//!     samples all through its life.
//!   - `tcp_retransmit_skb(sk, skb[, err])` (4.15): retransmitted segments,
//!     `tcp_skb_pcount(skb)`, as `RetransSegs` counts them. Since the
//!     tracepoint gained `err` it also fires for retransmits that were not
//!     sent; those are skipped (userspace tells from BTF whether `err` exists).
//! - Maps: `TCP_PEERS` (per-CPU hash, bounded by `probes.tcp.max_peers`),
//!   `TCP_SOCKS` (hash, per live socket), `TCP_COUNTERS`, `TCP_CONNECT_HIST`,
//!   `TCP_RTT_HIST` (per-CPU arrays), `TCP_RTT_PEERS` (per-CPU hash).
//!   Nothing goes through a ring buffer: every event is aggregated here.
//! - Metrics: `perch.tcp.io`, `perch.tcp.retransmits`, `perch.tcp.rtt`,
//!   `perch.tcp.connections.opened`, `perch.tcp.connections.failed`,
//!   `perch.tcp.connect.duration`.
//! - Fallback: `/proc/net/snmp` `Tcp` counters (no per-peer data).
//! - Oldest kernel: 6.3 (`sock_send_length`); struct offsets come from BTF.
//!
//! Only sockets with `sk_protocol == IPPROTO_TCP` in `AF_INET`/`AF_INET6`
//! count (the socket-length tracepoints fire for every socket; MPTCP
//! sockets are `IPPROTO_MPTCP`). A full map never loses a byte silently: the
//! bytes of a peer that does not fit go to overflow counters, and the failed
//! insert is counted.

use crate::kmem::field;
use agent_common::{
    hist,
    tcp::{self as c, PeerKey, PeerValue, RttKey, SockState, TcpOffsets},
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
    programs::{BtfTracePointContext, RawTracePointContext},
};

/// Filled in by userspace from kernel BTF (`.rodata`: the verifier sees
/// constants and prunes branches this kernel cannot take).
#[unsafe(no_mangle)]
static TCP_OFFSETS: TcpOffsets = TcpOffsets {
    valid: 0,
    sk_family: 0,
    sk_state: 0,
    sk_protocol: 0,
    sk_daddr: 0,
    sk_v6_daddr: 0,
    sk_dport: 0,
    sk_num: 0,
    sk_err: 0,
    tcp_srtt_us: 0,
    skb_gso_segs: 0,
    retrans_has_err: 0,
    rtt_per_peer: 0,
    ephemeral_lo: 0,
    ephemeral_hi: 0,
    rtt_interval_jiffies: 0,
    _pad: 0,
};

#[map(name = "TCP_PEERS")]
static TCP_PEERS: PerCpuHashMap<PeerKey, PeerValue> =
    PerCpuHashMap::with_max_entries(c::PEERS_DEFAULT_ENTRIES, 0);

#[map(name = "TCP_SOCKS")]
static TCP_SOCKS: HashMap<u64, SockState> = HashMap::with_max_entries(c::SOCKS_ENTRIES, 0);

#[map(name = "TCP_COUNTERS")]
static TCP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(c::COUNTER_SLOTS, 0);

#[map(name = "TCP_CONNECT_HIST")]
static TCP_CONNECT_HIST: PerCpuArray<u64> = PerCpuArray::with_max_entries(hist::BUCKETS, 0);

#[map(name = "TCP_RTT_HIST")]
static TCP_RTT_HIST: PerCpuArray<u64> = PerCpuArray::with_max_entries(hist::BUCKETS, 0);

#[map(name = "TCP_RTT_PEERS")]
static TCP_RTT_PEERS: PerCpuHashMap<RttKey, u64> = PerCpuHashMap::with_max_entries(1, 0);

// include/net/tcp_states.h
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const TCP_CLOSE_WAIT: i32 = 8;

const IPPROTO_TCP: u16 = 6;
const MSG_PEEK: u64 = 2;
const ECONNREFUSED: i32 = 111;

/// One field of [`TCP_OFFSETS`], read so the compiler cannot fold the
/// all-zero initializer.
macro_rules! off {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&TCP_OFFSETS.$field) }
    };
}

#[inline(always)]
fn add(map: &PerCpuArray<u64>, slot: u32, v: u64) {
    if let Some(p) = map.get_ptr_mut(slot) {
        // Per-CPU slot: only this CPU writes it, with preemption disabled.
        unsafe { *p += v };
    }
}

/// The address family of `sk` if it is a TCP socket of an inet family.
#[inline(always)]
fn tcp_family<const BTF: bool>(sk: u64) -> Option<u16> {
    if off!(valid) == 0 || sk == 0 {
        return None;
    }
    let family: u16 = field::<_, BTF>(sk, off!(sk_family))?;
    if family != c::AF_INET && family != c::AF_INET6 {
        return None;
    }
    match field::<u16, BTF>(sk, off!(sk_protocol)) {
        Some(IPPROTO_TCP) => Some(family),
        _ => None,
    }
}

/// The peer key of `sk` (of address `family`) for `role`, or `None` if a
/// read failed.
#[inline(always)]
fn sock_key<const BTF: bool>(sk: u64, family: u16, role: u8) -> Option<PeerKey> {
    let mut key = PeerKey {
        addr: [0; 16],
        server_port: 0,
        family: 4,
        role,
    };
    if family == c::AF_INET6 {
        let base = off!(sk_v6_daddr);
        let mut i = 0;
        while i < 4 {
            let w: u32 = field::<_, BTF>(sk, base + 4 * i as u32)?;
            key.addr[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
            i += 1;
        }
        key.family = 6;
    } else {
        // Network order in memory: keep the bytes as they are.
        let a: u32 = field::<_, BTF>(sk, off!(sk_daddr))?;
        key.addr[..4].copy_from_slice(&a.to_ne_bytes());
    }
    key.server_port = if role == c::ROLE_CLIENT {
        u16::from_be(field::<_, BTF>(sk, off!(sk_dport))?)
    } else {
        field::<_, BTF>(sk, off!(sk_num))?
    };
    Some(key)
}

/// The key of a socket whose handshake was not seen: role from its ports.
#[inline(always)]
fn inferred_key<const BTF: bool>(sk: u64, family: u16) -> Option<PeerKey> {
    let local: u16 = field::<_, BTF>(sk, off!(sk_num))?;
    let remote = u16::from_be(field::<_, BTF>(sk, off!(sk_dport))?);
    let role = c::infer_role(local, remote, off!(ephemeral_lo), off!(ephemeral_hi));
    sock_key::<BTF>(sk, family, role)
}

#[inline(always)]
fn new_state(key: PeerKey, inferred: u32, syn_sent_ns: u64, last_rtt_jiffies: u64) -> SockState {
    SockState {
        key,
        inferred,
        syn_sent_ns,
        last_rtt_jiffies,
    }
}

/// Adds to the peer's counters, or to the overflow slots when the map is full.
#[inline(always)]
fn add_peer(key: &PeerKey, tx: u64, rx: u64, retrans: u64) {
    if let Some(v) = TCP_PEERS.get_ptr_mut(key) {
        // Per-CPU value: only this CPU writes it.
        unsafe {
            (*v).tx_bytes += tx;
            (*v).rx_bytes += rx;
            (*v).retrans_segs += retrans;
        }
        return;
    }
    let val = PeerValue {
        tx_bytes: tx,
        rx_bytes: rx,
        retrans_segs: retrans,
    };
    if TCP_PEERS.insert(key, val, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Another CPU may have inserted the key meanwhile.
    if let Some(v) = TCP_PEERS.get_ptr_mut(key) {
        unsafe {
            (*v).tx_bytes += tx;
            (*v).rx_bytes += rx;
            (*v).retrans_segs += retrans;
        }
        return;
    }
    add(&TCP_COUNTERS, c::SLOT_PEERS_FULL, 1);
    let client = key.role == c::ROLE_CLIENT;
    let (stx, srx, sre) = if client {
        (
            c::SLOT_OVF_TX_CLIENT,
            c::SLOT_OVF_RX_CLIENT,
            c::SLOT_OVF_RETRANS_CLIENT,
        )
    } else {
        (
            c::SLOT_OVF_TX_SERVER,
            c::SLOT_OVF_RX_SERVER,
            c::SLOT_OVF_RETRANS_SERVER,
        )
    };
    add(&TCP_COUNTERS, stx, tx);
    add(&TCP_COUNTERS, srx, rx);
    add(&TCP_COUNTERS, sre, retrans);
}

/// `inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)`
#[inline(always)]
fn on_set_state<const BTF: bool>(sk: u64, old: i32, new: i32) -> u32 {
    let Some(family) = tcp_family::<BTF>(sk) else {
        return 0;
    };
    match (old, new) {
        (TCP_CLOSE, TCP_SYN_SENT) => {
            if let Some(key) = sock_key::<BTF>(sk, family, c::ROLE_CLIENT) {
                let now = unsafe { bpf_ktime_get_ns() };
                if TCP_SOCKS.insert(sk, new_state(key, 0, now, 0), 0).is_err() {
                    add(&TCP_COUNTERS, c::SLOT_SOCKS_FULL, 1);
                }
            }
        }
        (TCP_SYN_SENT, TCP_ESTABLISHED) => {
            add(&TCP_COUNTERS, c::SLOT_OPENED_CLIENT, 1);
            if let Some(st) = TCP_SOCKS.get_ptr_mut(sk) {
                let start = unsafe { (*st).syn_sent_ns };
                let now = unsafe { bpf_ktime_get_ns() };
                if start != 0 && now >= start {
                    let d = now - start;
                    add(&TCP_CONNECT_HIST, hist::bucket_index(d), 1);
                    add(&TCP_COUNTERS, c::SLOT_CONNECT_SUM_NS, d);
                }
                unsafe { (*st).syn_sent_ns = 0 };
            }
        }
        (TCP_SYN_RECV, TCP_ESTABLISHED) => {
            add(&TCP_COUNTERS, c::SLOT_OPENED_SERVER, 1);
            if let Some(key) = sock_key::<BTF>(sk, family, c::ROLE_SERVER) {
                if TCP_SOCKS.insert(sk, new_state(key, 0, 0, 0), 0).is_err() {
                    add(&TCP_COUNTERS, c::SLOT_SOCKS_FULL, 1);
                }
            }
        }
        (TCP_SYN_SENT, TCP_CLOSE) => {
            match field::<i32, BTF>(sk, off!(sk_err)) {
                Some(ECONNREFUSED) => add(&TCP_COUNTERS, c::SLOT_FAILED_REFUSED, 1),
                Some(0) | None => {}
                Some(_) => add(&TCP_COUNTERS, c::SLOT_FAILED_TIMEOUT, 1),
            }
            let _ = TCP_SOCKS.remove(sk);
        }
        (TCP_ESTABLISHED | TCP_CLOSE_WAIT, TCP_CLOSE) => {
            add(&TCP_COUNTERS, c::SLOT_FAILED_RESET, 1);
            let _ = TCP_SOCKS.remove(sk);
        }
        (_, TCP_CLOSE) => {
            let _ = TCP_SOCKS.remove(sk);
        }
        _ => {}
    }
    0
}

/// Records the smoothed RTT of `sk` in the host-wide histogram (and the
/// peer's, when enabled).
#[inline(always)]
fn sample_rtt(sk: u64, key: &PeerKey) {
    let Some(srtt8) = crate::kmem::read::<u32>(sk, off!(tcp_srtt_us)) else {
        return;
    };
    // srtt_us holds 8 x the smoothed RTT in µs; 0 before the first sample.
    if srtt8 == 0 {
        return;
    }
    let ns = (srtt8 as u64 >> 3) * 1000;
    let bucket = hist::bucket_index(ns);
    add(&TCP_RTT_HIST, bucket, 1);
    add(&TCP_COUNTERS, c::SLOT_RTT_SUM_NS, ns);
    if off!(rtt_per_peer) != 0 {
        add_rtt_peer(&RttKey { peer: *key, bucket }, 1);
        add_rtt_peer(
            &RttKey {
                peer: *key,
                bucket: c::RTT_SUM_BUCKET,
            },
            ns,
        );
    }
}

/// Adds `v` to a `TCP_RTT_PEERS` entry, counting a failed insert.
#[inline(always)]
fn add_rtt_peer(rk: &RttKey, v: u64) {
    if let Some(p) = TCP_RTT_PEERS.get_ptr_mut(rk) {
        unsafe { *p += v };
    } else if TCP_RTT_PEERS.insert(rk, v, BPF_NOEXIST as u64).is_err() {
        if let Some(p) = TCP_RTT_PEERS.get_ptr_mut(rk) {
            unsafe { *p += v };
        } else {
            add(&TCP_COUNTERS, c::SLOT_RTT_PEERS_FULL, 1);
        }
    }
}

/// `sock_send_length` / `sock_recv_length(struct sock *sk, int ret, int flags)`
#[inline(always)]
fn on_io<const BTF: bool>(sk: u64, ret: u64, flags: u64, rx: bool) -> u32 {
    let ret = ret as i32;
    if ret <= 0 || (rx && flags & MSG_PEEK != 0) || off!(valid) == 0 || sk == 0 {
        return 0;
    }
    // Only TCP sockets are ever inserted into TCP_SOCKS, so a hit skips the
    // protocol check: the common path is two hash lookups and no helper
    // but `bpf_jiffies64` (a load of the kernel's `jiffies_64`; a clock read
    // would cost about 35 ns on a KVM guest, and `bpf_ktime_get_coarse_ns`
    // is refused to tracing programs). RTT sampling needs only tick
    // resolution.
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
            let Some(family) = tcp_family::<BTF>(sk) else {
                return 0;
            };
            let Some(key) = inferred_key::<BTF>(sk, family) else {
                return 0;
            };
            // A socket that predates the agent. Remember it unless it is
            // already closed (its CLOSE transition, which removes entries,
            // is past).
            if field::<u8, BTF>(sk, off!(sk_state)) != Some(TCP_CLOSE as u8) {
                if TCP_SOCKS.insert(sk, new_state(key, 1, 0, now), 0).is_ok() {
                    sample = true;
                } else {
                    add(&TCP_COUNTERS, c::SLOT_SOCKS_FULL, 1);
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
fn on_retransmit<const BTF: bool>(sk: u64, skb: u64, err: u64) -> u32 {
    if off!(retrans_has_err) != 0 && err as i32 != 0 {
        return 0;
    }
    // `tcp_skb_cb` lives in `sk_buff.cb`, inside the argument's BTF type:
    // a direct load on `tp_btf`.
    let segs = match field::<u16, BTF>(skb, off!(skb_gso_segs)) {
        Some(0) | None => 1,
        Some(n) => n as u64,
    };
    let key = match TCP_SOCKS.get_ptr(sk) {
        Some(st) => unsafe { (*st).key },
        None => match tcp_family::<BTF>(sk).and_then(|f| inferred_key::<BTF>(sk, f)) {
            Some(k) => k,
            None => return 0,
        },
    };
    add_peer(&key, 0, 0, segs);
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tcp_state_btf(ctx: BtfTracePointContext) -> u32 {
    on_set_state::<true>(
        ctx.arg(0),
        ctx.arg::<u64>(1) as i32,
        ctx.arg::<u64>(2) as i32,
    )
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn tcp_state_raw(ctx: RawTracePointContext) -> u32 {
    on_set_state::<false>(
        ctx.arg(0),
        ctx.arg::<u64>(1) as i32,
        ctx.arg::<u64>(2) as i32,
    )
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn tcp_send_btf(ctx: BtfTracePointContext) -> u32 {
    on_io::<true>(ctx.arg(0), ctx.arg(1), ctx.arg(2), false)
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn tcp_send_raw(ctx: RawTracePointContext) -> u32 {
    on_io::<false>(ctx.arg(0), ctx.arg(1), ctx.arg(2), false)
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn tcp_recv_btf(ctx: BtfTracePointContext) -> u32 {
    on_io::<true>(ctx.arg(0), ctx.arg(1), ctx.arg(2), true)
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn tcp_recv_raw(ctx: RawTracePointContext) -> u32 {
    on_io::<false>(ctx.arg(0), ctx.arg(1), ctx.arg(2), true)
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retx_btf(ctx: BtfTracePointContext) -> u32 {
    let err = if off!(retrans_has_err) != 0 {
        ctx.arg(2)
    } else {
        0
    };
    on_retransmit::<true>(ctx.arg(0), ctx.arg(1), err)
}

#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn tcp_retx_raw(ctx: RawTracePointContext) -> u32 {
    let err = if off!(retrans_has_err) != 0 {
        ctx.arg(2)
    } else {
        0
    };
    on_retransmit::<false>(ctx.arg(0), ctx.arg(1), err)
}
