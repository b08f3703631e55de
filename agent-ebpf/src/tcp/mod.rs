//! TCP family: per-peer payload bytes and retransmits, connection lifecycle
//! (opened, failed by cause), connect duration and smoothed RTT.
//!
//! Two designs, one per variant (userspace picks, see `gate/rules.rs`):
//! - [`sockets`] (`tp_btf` and BPF iterators, 5.11+): one program on
//!   `inet_sock_set_state` and nothing per send, receive or retransmit.
//!   Bytes and retransmits are the kernel's own per-socket counters, read
//!   at close and, for live sockets, by an iterator at each collection.
//! - [`io`] (`raw_tp`, 6.3+): programs on `inet_sock_set_state`,
//!   `sock_send_length`, `sock_recv_length` and `tcp_retransmit_skb` count
//!   as the events happen. For kernels that refuse the first design.
//!
//! This module holds what both share: the struct offsets, the aggregate
//! maps (`TCP_PEERS`, `TCP_COUNTERS`, the histograms), the peer key and the
//! lifecycle transitions.
//!
//! - Metrics: `perch.tcp.io`, `perch.tcp.retransmits`, `perch.tcp.rtt`,
//!   `perch.tcp.connections.opened`, `perch.tcp.connections.failed`,
//!   `perch.tcp.connect.duration`.
//! - Fallback: `/proc/net/snmp` `Tcp` counters and a netlink `sock_diag`
//!   sampler (userspace).
//! - Oldest kernel: 5.11 ([`sockets`]); struct offsets come from BTF.
//!
//! Only sockets with `sk_protocol == IPPROTO_TCP` in `AF_INET`/`AF_INET6`
//! count (MPTCP sockets are `IPPROTO_MPTCP`; their TCP subflows count). A
//! full map never loses a byte silently: the bytes of a peer that does not
//! fit go to overflow counters, and the failed insert is counted.

pub mod io;
pub mod sockets;
mod tracked;

use crate::kmem::field;
use agent_common::{
    exp,
    tcp::{self as c, ConnKey, PeerKey, PeerValue, RttKey, TcpOffsets},
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap},
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
    tcp_total_retrans: 0,
    tcp_bytes_sent: 0,
    tcp_bytes_retrans: 0,
    tcp_bytes_received: 0,
    sk_flags: 0,
    socket_sk: 0,
    tracked_mask: 0,
    tcp_mstamp: 0,
    no_sock_from_file: 0,
    file_f_inode: 0,
    inode_i_mode: 0,
    file_private_data: 0,
    per_cgroup: 0,
    sk_cgroup: 0,
    cgroup_kn: 0,
    kn_id: 0,
};

#[map]
static TCP_PEERS: PerCpuHashMap<PeerKey, PeerValue> =
    PerCpuHashMap::with_max_entries(c::PEERS_DEFAULT_ENTRIES, 0);

#[map]
static TCP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(c::COUNTER_SLOTS, 0);

#[map]
static TCP_CONNECT_HIST: PerCpuArray<u64> = PerCpuArray::with_max_entries(exp::SLOTS, 0);

#[map]
static TCP_RTT_HIST: PerCpuArray<u64> = PerCpuArray::with_max_entries(exp::SLOTS, 0);

#[map]
static TCP_RTT_PEERS: PerCpuHashMap<RttKey, u64> = PerCpuHashMap::with_max_entries(1, 0);

#[map]
static TCP_CGROUP_CONNS: PerCpuHashMap<ConnKey, u64> = PerCpuHashMap::with_max_entries(1, 0);

// include/net/tcp_states.h
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_FIN_WAIT2: i32 = 5;
const TCP_CLOSE: i32 = 7;
const TCP_CLOSE_WAIT: i32 = 8;
const TCP_LAST_ACK: i32 = 9;
const TCP_CLOSING: i32 = 11;

const IPPROTO_TCP: u16 = 6;
const ECONNREFUSED: i32 = 111;

/// One field of [`TCP_OFFSETS`], read so the compiler cannot fold the
/// all-zero initializer.
macro_rules! off {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&crate::tcp::TCP_OFFSETS.$field) }
    };
}
pub(crate) use off;

#[inline(always)]
fn add(map: &PerCpuArray<u64>, slot: u32, v: u64) {
    if let Some(p) = map.get_ptr_mut(slot) {
        // Per-CPU slot: only this CPU writes it, with preemption disabled.
        unsafe { *p += v };
    }
}

/// Counts one event in a `TCP_COUNTERS` slot.
#[inline(always)]
fn count(slot: u32) {
    add(&TCP_COUNTERS, slot, 1);
}

/// The cgroup v2 id of `sk`'s cgroup (`sk->sk_cgrp_data.cgroup->kn->id`,
/// three loads; `bpf_get_current_cgroup_id` would name whoever runs, and
/// most state changes run in softirq), or 0 when `per_cgroup` is off or a
/// read failed.
#[inline(always)]
fn sock_cgroup<const BTF: bool>(sk: u64) -> u64 {
    if off!(per_cgroup) == 0 {
        return 0;
    }
    field::<u64, BTF>(sk, off!(sk_cgroup))
        .filter(|cgrp| *cgrp != 0)
        .and_then(|cgrp| field::<u64, BTF>(cgrp, off!(cgroup_kn)))
        .filter(|kn| *kn != 0)
        .and_then(|kn| field::<u64, BTF>(kn, off!(kn_id)))
        .unwrap_or(0)
}

/// Counts one connection event (`SLOT_OPENED_*`, `SLOT_FAILED_*`) of
/// `sk`: in its cgroup's entry of `TCP_CGROUP_CONNS` with `per_cgroup`,
/// else (or when that map is full, counted) in the host-wide slot.
#[inline(always)]
fn count_conn<const BTF: bool>(sk: u64, slot: u32) {
    let id = sock_cgroup::<BTF>(sk);
    if id == 0 {
        count(slot);
        return;
    }
    let key = ConnKey {
        cgroup: c::split_cgroup(id),
        slot,
    };
    if !add_to(&TCP_CGROUP_CONNS, &key, 1) {
        count(c::SLOT_CGROUP_CONNS_FULL);
        count(slot);
    }
}

/// Adds `v` to the per-CPU `u64` entry `key` of `map`, inserting it if
/// absent (or finding it inserted meanwhile by another CPU); `false` when
/// the map is full.
#[inline(always)]
fn add_to<K>(map: &PerCpuHashMap<K, u64>, key: &K, v: u64) -> bool {
    let bump = |p: *mut u64| {
        // SAFETY: a per-CPU value: only this CPU writes it.
        unsafe { *p += v };
        true
    };
    if let Some(p) = map.get_ptr_mut(key) {
        return bump(p);
    }
    if map.insert(key, v, BPF_NOEXIST as u64).is_ok() {
        return true;
    }
    map.get_ptr_mut(key).is_some_and(bump)
}

/// Whether a socket in `state` has been established (and so may have moved
/// data): the states from `ESTABLISHED` to the end of a close.
#[inline(always)]
fn was_established(state: i32) -> bool {
    matches!(
        state,
        TCP_ESTABLISHED
            | TCP_FIN_WAIT1
            | TCP_FIN_WAIT2
            | TCP_CLOSE_WAIT
            | TCP_LAST_ACK
            | TCP_CLOSING
    )
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
        cgroup: c::split_cgroup(sock_cgroup::<BTF>(sk)),
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

/// Adds to the peer's counters, or to the overflow slots when the map is full.
#[inline(always)]
fn add_peer(key: &PeerKey, tx: u64, rx: u64, retrans: u64) {
    let bump = |v: *mut PeerValue| {
        // SAFETY: a per-CPU value of TCP_PEERS: only this CPU writes it.
        unsafe {
            (*v).tx_bytes += tx;
            (*v).rx_bytes += rx;
            (*v).retrans_segs += retrans;
        }
    };
    if let Some(v) = TCP_PEERS.get_ptr_mut(key) {
        bump(v);
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
        bump(v);
        return;
    }
    count(c::SLOT_PEERS_FULL);
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

/// Records one smoothed-RTT sample (`srtt_us` as the kernel keeps it, 8 x
/// the RTT in µs) in the host-wide histogram, and the peer's when enabled.
#[inline(always)]
fn record_rtt(srtt8: u32, key: &PeerKey) {
    // 0 before the first RTT measurement.
    if srtt8 == 0 {
        return;
    }
    let ns = (srtt8 as u64 >> 3) * 1000;
    let bucket = crate::histogram::slot(ns);
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
    if !add_to(&TCP_RTT_PEERS, rk, v) {
        count(c::SLOT_RTT_PEERS_FULL);
    }
}

/// Records a connect duration (SYN sent at `start` ns, established now).
#[inline(always)]
fn record_connect(start: u64, now: u64) {
    if start != 0 && now >= start {
        let d = now - start;
        add(&TCP_CONNECT_HIST, crate::histogram::slot(d), 1);
        add(&TCP_COUNTERS, c::SLOT_CONNECT_SUM_NS, d);
    }
}

/// Counts a failed connect (`SYN_SENT -> CLOSE`) by `sk_err`:
/// `ECONNREFUSED` is a reset answering the SYN; any other error means the
/// SYN retries ran out or an ICMP error was last; none means the
/// application gave up, which is not counted.
#[inline(always)]
fn count_failed_connect<const BTF: bool>(sk: u64) {
    match field::<i32, BTF>(sk, off!(sk_err)) {
        Some(ECONNREFUSED) => count_conn::<BTF>(sk, c::SLOT_FAILED_REFUSED),
        Some(0) | None => {}
        Some(_) => count_conn::<BTF>(sk, c::SLOT_FAILED_TIMEOUT),
    }
}
