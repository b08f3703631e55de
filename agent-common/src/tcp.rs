//! TCP family: per-peer bytes and retransmits, connection lifecycle, connect
//! duration and smoothed RTT.
//!
//! Kernel structs are read at offsets userspace finds in the running kernel's
//! BTF and hands to the programs in [`TcpOffsets`] (Rust has no CO-RE field
//! relocations). The programs do nothing until `valid` is set.
//!
//! Two kernel-side designs share these maps:
//! - **Socket counters** (`tp_btf`, 5.11+): the kernel's own per-socket
//!   counters (`tcp_sock.bytes_sent`, `bytes_retrans`, `bytes_received`,
//!   `total_retrans`) are read when a connection closes and, for live ones,
//!   by a walk over every open file (`iter/task_file`) at each collection.
//!   No program runs per send, receive or retransmit.
//! - **Per-I/O** (`raw_tp`, 6.3+): programs on `sock_send_length`,
//!   `sock_recv_length` and `tcp_retransmit_skb` add to [`MAP_PEERS`] as
//!   the events happen, with [`MAP_SOCKS`] remembering each socket's key.

use crate::contract::{GlobalSpec, MapSpec};

/// Per-CPU hash: [`PeerKey`] -> [`PeerValue`]. Its size comes from
/// `probes.tcp.max_peers` (the loader overrides [`PEERS_DEFAULT_ENTRIES`]).
pub const MAP_PEERS: &str = "TCP_PEERS";
/// Hash (per-I/O design): socket pointer -> [`SockState`], one entry per
/// TCP socket seen connecting, accepted, or doing I/O; removed when the
/// socket closes.
pub const MAP_SOCKS: &str = "TCP_SOCKS";
/// Array of [`TrackedSlot`] (socket-counter design), used as an
/// open-addressed table keyed by socket pointer: one entry per TCP socket
/// seen connecting or accepted, or found established by the walk; removed
/// when the socket closes. The key is a pointer, not a small integer, and a
/// BPF hash map insert (one per connection) costs about 300 ns on the
/// reference VM against a few array loads. Sized from
/// `probes.tcp.max_sockets`; a failed insert is counted in
/// [`SLOT_SOCKS_FULL`].
pub const MAP_TRACKED: &str = "TCP_TRACKED";
/// Per-CPU array of one `u64`: scratch space the socket-counter programs use
/// to turn a socket pointer into a number.
pub const MAP_SCRATCH: &str = "TCP_SCRATCH";
/// Per-CPU array of `u64` counters, indexed by the `SLOT_*` constants.
pub const MAP_COUNTERS: &str = "TCP_COUNTERS";
/// Per-CPU array of `u64` bucket counts of the connect duration in ns,
/// indexed by [`crate::exp::slot`].
pub const MAP_CONNECT_HIST: &str = "TCP_CONNECT_HIST";
/// Per-CPU array of `u64` bucket counts of the smoothed RTT in ns, host-wide.
pub const MAP_RTT_HIST: &str = "TCP_RTT_HIST";
/// Per-CPU hash: [`RttKey`] -> sample count, the sparse per-peer RTT
/// histogram (`probes.tcp.rtt_per_peer`). One entry when the option is off.
pub const MAP_RTT_PEERS: &str = "TCP_RTT_PEERS";
/// Per-CPU hash: [`ConnKey`] -> count, the connection counters
/// (`SLOT_OPENED_*`, `SLOT_FAILED_*`) of each socket cgroup
/// (`probes.tcp.per_cgroup`). One entry when the option is off; the
/// loader sizes it to [`CGROUP_CONNS_PER_CGROUP`] per cgroup the
/// containers family walks. An event whose insert fails is counted in the
/// host-wide `TCP_COUNTERS` slot instead, and in [`SLOT_CGROUP_CONNS_FULL`].
pub const MAP_CGROUP_CONNS: &str = "TCP_CGROUP_CONNS";

/// Global (`.rodata`) holding [`TcpOffsets`].
pub const GLOBAL_OFFSETS: &str = "TCP_OFFSETS";

/// Every map of the family's kernel side, both designs ([`crate::contract`]).
pub const MAPS: &[MapSpec] = &[
    MapSpec::per_cpu_hash::<PeerKey, PeerValue>(MAP_PEERS, PEERS_DEFAULT_ENTRIES),
    // Keyed by socket pointer.
    MapSpec::hash::<u64, SockState>(MAP_SOCKS, SOCKS_ENTRIES),
    MapSpec::array::<TrackedSlot>(MAP_TRACKED, TRACKED_DEFAULT_SLOTS),
    MapSpec::per_cpu_array::<u64>(MAP_SCRATCH, 1),
    MapSpec::per_cpu_array::<u64>(MAP_COUNTERS, COUNTER_SLOTS),
    MapSpec::per_cpu_array::<u64>(MAP_CONNECT_HIST, crate::exp::SLOTS),
    MapSpec::per_cpu_array::<u64>(MAP_RTT_HIST, crate::exp::SLOTS),
    // One entry in the object; the loader sizes it (see the map's doc).
    MapSpec::per_cpu_hash::<RttKey, u64>(MAP_RTT_PEERS, 1),
    // One entry in the object; the loader sizes it (see the map's doc).
    MapSpec::per_cpu_hash::<ConnKey, u64>(MAP_CGROUP_CONNS, 1),
];

/// Every global of the family's kernel side that userspace overrides.
pub const GLOBALS: &[GlobalSpec] = &[GlobalSpec::of::<TcpOffsets>(GLOBAL_OFFSETS)];

/// Client connections established (`SYN_SENT -> ESTABLISHED`).
pub const SLOT_OPENED_CLIENT: u32 = 0;
/// Server connections established (`SYN_RECV -> ESTABLISHED`).
pub const SLOT_OPENED_SERVER: u32 = 1;
/// Connects answered with a reset (`SYN_SENT -> CLOSE`, `sk_err = ECONNREFUSED`).
pub const SLOT_FAILED_REFUSED: u32 = 2;
/// Connects that gave up (`SYN_SENT -> CLOSE` with any other error: the
/// SYN retries ran out, `sk_err = ETIMEDOUT`, or an ICMP error was last).
pub const SLOT_FAILED_TIMEOUT: u32 = 3;
/// Established connections reset (`ESTABLISHED|CLOSE_WAIT -> CLOSE`), the
/// same transitions the kernel's `EstabResets` counts.
pub const SLOT_FAILED_RESET: u32 = 4;
/// Inserts into `TCP_PEERS` that failed (map full): their bytes and
/// retransmits went to the `SLOT_OVF_*` slots instead.
pub const SLOT_PEERS_FULL: u32 = 5;
/// Inserts into `TCP_SOCKS` that failed (map full): those sockets' role was
/// inferred from ports and their RTT was not sampled. In the socket-counter
/// design, inserts into `TCP_TRACKED` that failed: those sockets are not
/// counted (and show up again in [`SLOT_CLOSED_UNTRACKED`] when they close).
pub const SLOT_SOCKS_FULL: u32 = 6;
/// Sum of every connect duration in `TCP_CONNECT_HIST`, ns.
pub const SLOT_CONNECT_SUM_NS: u32 = 7;
/// Sum of every RTT sample in `TCP_RTT_HIST`, ns.
pub const SLOT_RTT_SUM_NS: u32 = 8;
/// Inserts into `TCP_RTT_PEERS` that failed (map full): those samples are
/// only in the host-wide histogram.
pub const SLOT_RTT_PEERS_FULL: u32 = 9;
/// Overflow: bytes sent by client sockets whose peer did not fit `TCP_PEERS`.
pub const SLOT_OVF_TX_CLIENT: u32 = 10;
/// Overflow: bytes received by client sockets.
pub const SLOT_OVF_RX_CLIENT: u32 = 11;
/// Overflow: bytes sent by server sockets.
pub const SLOT_OVF_TX_SERVER: u32 = 12;
/// Overflow: bytes received by server sockets.
pub const SLOT_OVF_RX_SERVER: u32 = 13;
/// Overflow: retransmitted segments of client sockets.
pub const SLOT_OVF_RETRANS_CLIENT: u32 = 14;
/// Overflow: retransmitted segments of server sockets.
pub const SLOT_OVF_RETRANS_SERVER: u32 = 15;
/// Established sockets that closed untracked (socket-counter design):
/// neither seen starting nor found by the walk, e.g. a socket older than
/// the agent that its process had already closed, or one whose
/// `TCP_SOCKS` insert failed. Their bytes are not counted.
pub const SLOT_CLOSED_UNTRACKED: u32 = 16;
/// Sockets older than the agent that the walk started tracking (their
/// counters count from that moment; role inferred from ports).
pub const SLOT_ADOPTED: u32 = 17;
/// Inserts into `TCP_CGROUP_CONNS` that failed (map full): those
/// connection events are in the host-wide slots, without a cgroup.
pub const SLOT_CGROUP_CONNS_FULL: u32 = 18;
/// Number of slots in `TCP_COUNTERS`.
pub const COUNTER_SLOTS: u32 = 19;

/// Connection-counter slots a cgroup may hold in [`MAP_CGROUP_CONNS`]:
/// opened by role and failed by cause.
pub const CGROUP_CONNS_PER_CGROUP: u32 = 5;

/// [`PeerKey::role`]: this host opened the connection.
pub const ROLE_CLIENT: u8 = 0;
/// [`PeerKey::role`]: this host accepted the connection.
pub const ROLE_SERVER: u8 = 1;

/// `AF_INET`.
pub const AF_INET: u16 = 2;
/// `AF_INET6`.
pub const AF_INET6: u16 = 10;

/// Default size of `TCP_PEERS` in the object; the loader sets it from
/// `probes.tcp.max_peers`.
pub const PEERS_DEFAULT_ENTRIES: u32 = 4096;
/// Bound of `TCP_SOCKS`. The key is a socket pointer, not a small integer,
/// hence a hash. It holds one entry per live TCP socket the programs have
/// seen; 65536 covers a busy proxy. A failed insert is counted in
/// [`SLOT_SOCKS_FULL`] and loses only role certainty and RTT samples for that
/// socket: its bytes are still counted.
pub const SOCKS_ENTRIES: u32 = 65536;
/// RTT samples per peer bucket kept when `rtt_per_peer` is on: the loader
/// sizes `TCP_RTT_PEERS` to `max_peers * RTT_PEER_BUCKETS_PER_PEER`. A peer's
/// RTT spans a few adjacent buckets; 8 cover a spread of 2x (scale 3).
pub const RTT_PEER_BUCKETS_PER_PEER: u32 = 8;
/// Minimum time between two RTT samples of one socket: the smoothed RTT is
/// read on send/recv at most once per interval per socket, so a long
/// connection contributes a sample every 100 ms it is active, not one per
/// packet and not only one at close.
pub const RTT_SAMPLE_INTERVAL_NS: u64 = 100_000_000;

/// Key of `TCP_PEERS`: the remote address, the listening side's port, the
/// role and, with `probes.tcp.per_cgroup`, the socket's cgroup. The
/// client's ephemeral port is never part of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    /// Remote address: IPv4 in the first 4 bytes (network order, the rest
    /// zero) or IPv6 (possibly v4-mapped; userspace folds those into IPv4).
    pub addr: [u8; 16],
    /// The server's port, host order: the remote port for a client socket,
    /// the local port for a server socket.
    pub server_port: u16,
    /// 4 or 6.
    pub family: u8,
    /// [`ROLE_CLIENT`] or [`ROLE_SERVER`].
    pub role: u8,
    /// The cgroup v2 id of the socket's cgroup (`sk->sk_cgrp_data`: the
    /// cgroup of the task that created it; an accepted socket inherits its
    /// listener's), low word first ([`split_cgroup`]); 0 when
    /// `per_cgroup` is off or the cgroup could not be read. Two words keep
    /// the key 4-aligned, without padding.
    pub cgroup: [u32; 2],
}
const _: () = assert!(core::mem::size_of::<PeerKey>() == 28);

/// A cgroup id as two words, low first: [`PeerKey::cgroup`], [`ConnKey::cgroup`].
#[inline(always)]
pub const fn split_cgroup(id: u64) -> [u32; 2] {
    [id as u32, (id >> 32) as u32]
}

/// The id [`split_cgroup`] split.
#[inline(always)]
pub const fn join_cgroup(w: [u32; 2]) -> u64 {
    w[0] as u64 | (w[1] as u64) << 32
}

impl PeerKey {
    /// The socket's cgroup v2 id, 0 if none.
    pub const fn cgroup_id(&self) -> u64 {
        join_cgroup(self.cgroup)
    }
}

/// Key of [`MAP_CGROUP_CONNS`]: a cgroup and one `TCP_COUNTERS` slot
/// (`SLOT_OPENED_*`, `SLOT_FAILED_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// [`split_cgroup`] of the socket's cgroup v2 id.
    pub cgroup: [u32; 2],
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<ConnKey>() == 12);

/// Value of `TCP_PEERS` (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerValue {
    /// Payload bytes returned by `sendmsg` (`sock_send_length`, `ret > 0`).
    pub tx_bytes: u64,
    /// Payload bytes returned by `recvmsg` (`sock_recv_length`, `ret > 0`,
    /// not `MSG_PEEK`).
    pub rx_bytes: u64,
    /// Retransmitted segments (`tcp_retransmit_skb`, `tcp_skb_pcount`).
    pub retrans_segs: u64,
}
const _: () = assert!(core::mem::size_of::<PeerValue>() == 24);

/// Value of `TCP_SOCKS`: what the programs remember about one socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// The socket's peer key.
    pub key: PeerKey,
    /// 1 when the role was inferred from ports (the socket predates the
    /// agent), 0 when seen connecting or being accepted.
    pub inferred: u32,
    /// `bpf_ktime_get_ns` at `SYN_SENT`, 0 once established or for servers.
    pub syn_sent_ns: u64,
    /// `bpf_jiffies64` at the last RTT sample, 0 before the first.
    pub last_rtt_jiffies: u64,
}
const _: () = assert!(core::mem::size_of::<SockState>() == 48);

/// [`SockAcct::flags`]: the socket reached `TCP_CLOSE` and its counters were
/// folded into [`MAP_PEERS`]; the live iterator skips it from then on.
pub const SOCK_CLOSED: u32 = 1;
/// [`SockAcct::flags`]: the socket predates the agent; its role was
/// inferred from its ports and its counters count from its adoption.
pub const SOCK_ADOPTED: u32 = 2;

/// Value of [`MAP_TRACKED`]: one tracked socket.
///
/// A socket's contribution to its peer is its kernel counters minus `base`
/// ([`PeerValue`] fields: payload bytes sent once, payload bytes received,
/// retransmitted segments). While it lives, the walk reports that
/// difference at each collection; at `TCP_CLOSE` the state program sets
/// [`SOCK_CLOSED`], adds it to [`MAP_PEERS`] and deletes the entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockAcct {
    /// The socket's peer key (the local port is gone by `TCP_CLOSE`, so it
    /// is taken when the socket starts).
    pub key: PeerKey,
    /// [`SOCK_CLOSED`], [`SOCK_ADOPTED`].
    pub flags: u32,
    /// `bpf_ktime_get_ns` at `SYN_SENT`; 0 once established or for servers.
    pub syn_sent_ns: u64,
    /// `bpf_iter_meta.session_id` of the walk that last reported the socket:
    /// a socket open in several file descriptors is reported once per walk.
    pub session: u64,
    /// The counters when tracking started: zero for a socket seen from its
    /// start, the current values for an adopted one.
    pub base: PeerValue,
    /// The counters at the walk's last visit (RTT is sampled only for
    /// sockets that moved data since). Written by the walk only.
    pub seen: PeerValue,
}
const _: () = assert!(core::mem::size_of::<SockAcct>() == 96);

/// One slot of [`MAP_TRACKED`] (an array used as an open-addressed table):
/// `sk` is 0 (never used), 1 (freed) or the tracked socket's pointer;
/// `owner` repeats the pointer, written with the value before `sk`, so a
/// reader can tell a slot two CPUs raced for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedSlot {
    pub sk: u64,
    pub owner: u64,
    pub acct: SockAcct,
}
const _: () = assert!(core::mem::size_of::<TrackedSlot>() == 112);

/// Default number of [`MAP_TRACKED`] slots (a power of two); the loader sets
/// it from `probes.tcp.max_sockets` (twice that, rounded up).
pub const TRACKED_DEFAULT_SLOTS: u32 = 65536;
/// Slots of [`MAP_TRACKED`] a socket may occupy: two runs of
/// [`TRACKED_RUN`] consecutive slots, at two independent places
/// ([`tracked_slot`]).
pub const TRACKED_PROBES: u32 = 2 * TRACKED_RUN;
/// Consecutive slots probed at each of a socket's two places.
pub const TRACKED_RUN: u32 = 16;

/// The hash [`tracked_slot`] places the socket at address `sk` by.
/// Sockets are slab objects at least 64-byte aligned, so the low bits say
/// nothing; MurmurHash3's 64-bit finalizer mixes the rest. Computed once
/// per lookup, not per probe.
#[inline(always)]
pub const fn tracked_hash(sk: u64) -> u64 {
    crate::fmix64(sk >> 6)
}

/// The `i`-th slot (`i < TRACKED_PROBES`) a socket of [`tracked_hash`]
/// `hash` may occupy in a [`MAP_TRACKED`] of `mask + 1` slots:
/// `TRACKED_RUN` slots from the hash's low half, then as many from its high
/// half. One run of linear probing at half load overflows for about one
/// socket in 200 (clusters); two independent runs both overflow about as
/// often as the square of that.
#[inline(always)]
pub const fn tracked_slot(hash: u64, mask: u32, i: u32) -> u32 {
    let (run, step) = if i < TRACKED_RUN {
        (hash as u32, i)
    } else {
        ((hash >> 32) as u32, i - TRACKED_RUN)
    };
    run.wrapping_add(step) & mask
}

/// One live socket's contribution, written by the walk (`bpf_seq_write`)
/// for every tracked socket that is not closed and has a non-zero
/// contribution.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveRecord {
    pub key: PeerKey,
    /// Explicit padding.
    pub _pad: u32,
    /// Counters minus [`SockAcct::base`].
    pub value: PeerValue,
}
const _: () = assert!(core::mem::size_of::<LiveRecord>() == 56);

/// [`RttKey::bucket`] of the entry holding the sum of a peer's RTT samples
/// in ns (the histogram's exact sum) instead of a bucket count.
pub const RTT_SUM_BUCKET: u32 = u32::MAX;

/// Key of `TCP_RTT_PEERS`: a peer and one RTT histogram bucket (or
/// [`RTT_SUM_BUCKET`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RttKey {
    pub peer: PeerKey,
    /// [`crate::exp::slot`] of the RTT in ns.
    pub bucket: u32,
}
const _: () = assert!(core::mem::size_of::<RttKey>() == 32);

/// Byte offsets of the kernel fields the programs read, from the running
/// kernel's BTF, plus switches computed from BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOffsets {
    /// Non-zero once userspace filled the offsets in.
    pub valid: u32,
    /// `sock.__sk_common.skc_family` (`u16`).
    pub sk_family: u32,
    /// `sock.__sk_common.skc_state` (`u8`).
    pub sk_state: u32,
    /// `sock.sk_protocol` (`u16`, a plain field since 5.6).
    pub sk_protocol: u32,
    /// `sock.__sk_common.skc_daddr` (`__be32`).
    pub sk_daddr: u32,
    /// `sock.__sk_common.skc_v6_daddr` (`struct in6_addr`).
    pub sk_v6_daddr: u32,
    /// `sock.__sk_common.skc_dport` (`__be16`).
    pub sk_dport: u32,
    /// `sock.__sk_common.skc_num` (`u16`, host order).
    pub sk_num: u32,
    /// `sock.sk_err` (`int`).
    pub sk_err: u32,
    /// `tcp_sock.srtt_us` (`u32`, smoothed RTT in µs << 3).
    pub tcp_srtt_us: u32,
    /// `sk_buff.cb` plus `tcp_skb_cb.tcp_gso_segs` (`u16`): the segment
    /// count of a (GSO) skb, `tcp_skb_pcount()`.
    pub skb_gso_segs: u32,
    /// Non-zero when `tcp_retransmit_skb` has its `err` argument (6.18 BTF
    /// shows `(sk, skb, err)`; older kernels fire only on success).
    pub retrans_has_err: u32,
    /// Non-zero: also feed `TCP_RTT_PEERS`.
    pub rtt_per_peer: u32,
    /// `net.ipv4.ip_local_port_range`, used to infer the role of sockets
    /// that predate the agent.
    pub ephemeral_lo: u32,
    /// Upper end of the range, inclusive.
    pub ephemeral_hi: u32,
    /// [`RTT_SAMPLE_INTERVAL_NS`] in jiffies (at least 1): the programs pace
    /// RTT samples with `bpf_jiffies64()`, a load of a kernel global, rather
    /// than `bpf_ktime_get_ns()`, a clock read (about 35 ns on a KVM guest).
    pub rtt_interval_jiffies: u32,
    /// `tcp_sock.total_retrans` (`u32`): segments retransmitted, counted
    /// where the kernel counts `RetransSegs`.
    pub tcp_total_retrans: u32,
    /// `tcp_sock.bytes_sent` (`u64`): payload bytes transmitted, with
    /// retransmissions.
    pub tcp_bytes_sent: u32,
    /// `tcp_sock.bytes_retrans` (`u64`): payload bytes retransmitted.
    pub tcp_bytes_retrans: u32,
    /// `tcp_sock.bytes_received` (`u64`): sequence space received in order,
    /// payload plus 1 for a received FIN.
    pub tcp_bytes_received: u32,
    /// `sock.sk_flags` (`unsigned long`): bit `SOCK_DONE` is set by
    /// `tcp_fin()` when the peer's FIN arrives.
    pub sk_flags: u32,
    /// `socket.sk` (`struct sock *`), for the walk.
    pub socket_sk: u32,
    /// [`MAP_TRACKED`]'s slot count minus one (a power of two minus one).
    pub tracked_mask: u32,
    /// `tcp_sock.tcp_mstamp` (`u64`, µs of `CLOCK_MONOTONIC`): the time the
    /// kernel stamped the segment it is processing.
    pub tcp_mstamp: u32,
    /// Non-zero where the kernel has no `bpf_sock_from_file` (before 5.11):
    /// the walk finds the socket itself, through the three offsets below.
    pub no_sock_from_file: u32,
    /// `file.f_inode` (`struct inode *`).
    pub file_f_inode: u32,
    /// `inode.i_mode` (`umode_t`, `u16`): `S_IFSOCK` for a socket.
    pub inode_i_mode: u32,
    /// `file.private_data` (`void *`): the `struct socket` of a socket file.
    pub file_private_data: u32,
    /// Non-zero: key peers and connection counters by the socket's cgroup
    /// (`probes.tcp.per_cgroup`, on kernels whose `sock_cgroup_data` holds
    /// a plain `struct cgroup *`, 5.15+).
    pub per_cgroup: u32,
    /// `sock.sk_cgrp_data.cgroup` (`struct cgroup *`).
    pub sk_cgroup: u32,
    /// `cgroup.kn` (`struct kernfs_node *`).
    pub cgroup_kn: u32,
    /// `kernfs_node.id` (`u64`, the cgroup v2 id).
    pub kn_id: u32,
}
const _: () = assert!(core::mem::size_of::<TcpOffsets>() == 128);

/// [`RTT_SAMPLE_INTERVAL_NS`] in ticks of `tick_ns` ns (the kernel's
/// jiffy, `1e9 / CONFIG_HZ`), rounded up, at least 1.
pub const fn rtt_interval_jiffies(tick_ns: u64) -> u32 {
    if tick_ns == 0 {
        return 1;
    }
    let j = RTT_SAMPLE_INTERVAL_NS.div_ceil(tick_ns);
    if j == 0 {
        1
    } else if j > u32::MAX as u64 {
        u32::MAX
    } else {
        j as u32
    }
}

/// Infers the role of a socket whose handshake was not seen, from its local
/// and remote ports (host order): the side on an ephemeral port is the
/// client; if both or neither are, the lower port is taken as the server's.
#[inline(always)]
pub const fn infer_role(local: u16, remote: u16, eph_lo: u32, eph_hi: u32) -> u8 {
    let l = local as u32;
    let r = remote as u32;
    let local_eph = l >= eph_lo && l <= eph_hi;
    let remote_eph = r >= eph_lo && r <= eph_hi;
    if local_eph != remote_eph {
        // Exactly one side is ephemeral: that side is the client.
        if local_eph {
            ROLE_CLIENT
        } else {
            ROLE_SERVER
        }
    } else if local < remote {
        ROLE_SERVER
    } else {
        ROLE_CLIENT
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), Copy, with no padding and no pointers.
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::PeerValue {}
    unsafe impl aya::Pod for super::SockState {}
    unsafe impl aya::Pod for super::RttKey {}
    unsafe impl aya::Pod for super::TcpOffsets {}
    unsafe impl aya::Pod for super::SockAcct {}
    unsafe impl aya::Pod for super::TrackedSlot {}
    unsafe impl aya::Pod for super::LiveRecord {}
    unsafe impl aya::Pod for super::ConnKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtt_interval_in_jiffies() {
        // HZ=250 (4 ms), 1000, 100, 300 (3.333 ms rounds up), and nonsense.
        assert_eq!(rtt_interval_jiffies(4_000_000), 25);
        assert_eq!(rtt_interval_jiffies(1_000_000), 100);
        assert_eq!(rtt_interval_jiffies(10_000_000), 10);
        assert_eq!(rtt_interval_jiffies(3_333_333), 31);
        assert_eq!(rtt_interval_jiffies(0), 1);
        assert_eq!(rtt_interval_jiffies(u64::MAX), 1);
    }

    /// At the default load (32768 sockets in 65536 slots), sockets laid out
    /// as the slab allocator lays out `tcp_sock`s (2 432-byte objects, 13 to
    /// a 32 KiB slab, slabs scattered over the direct map) find a slot among
    /// their [`TRACKED_PROBES`] (at most one in 10 000 does not).
    #[test]
    fn tracked_table_fits_its_default_load() {
        let mask = TRACKED_DEFAULT_SLOTS - 1;
        let mut used = [false; TRACKED_DEFAULT_SLOTS as usize];
        let (mut failed, mut placed) = (0u32, 0u32);
        // A fixed pseudo-random sequence of slab pages (xorshift).
        let mut x = 0x2545_f491_4f6c_dd1du64;
        while placed + failed < TRACKED_DEFAULT_SLOTS / 2 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let slab = 0xffff_8880_0000_0000u64 + (x % (1 << 22)) * 32768;
            for obj in 0..13u64 {
                let sk = slab + obj * 2432;
                let hash = tracked_hash(sk);
                match (0..TRACKED_PROBES)
                    .map(|i| tracked_slot(hash, mask, i) as usize)
                    .find(|&s| !used[s])
                {
                    Some(s) => {
                        used[s] = true;
                        placed += 1;
                    }
                    None => failed += 1,
                }
            }
        }
        assert!(
            failed * 10_000 <= placed,
            "{failed} of {} sockets found no slot",
            placed + failed
        );
    }

    #[test]
    fn cgroup_ids_split_and_join() {
        for id in [0u64, 1, 0x1_0000_0000, 0xdead_beef_cafe_f00d, u64::MAX] {
            assert_eq!(join_cgroup(split_cgroup(id)), id, "{id:#x}");
        }
        assert_eq!(split_cgroup(0x1_0000_0002), [2, 1], "low word first");
        let key = PeerKey {
            cgroup: split_cgroup(77),
            ..PeerKey::default()
        };
        assert_eq!(key.cgroup_id(), 77);
    }

    #[test]
    fn role_inference() {
        let (lo, hi) = (32768, 60999);
        let cases = [
            ("local ephemeral", 40000, 443, ROLE_CLIENT),
            ("remote ephemeral", 8080, 40000, ROLE_SERVER),
            ("both ephemeral: lower is server", 33000, 34000, ROLE_SERVER),
            (
                "both ephemeral: higher local is client",
                34000,
                33000,
                ROLE_CLIENT,
            ),
            ("neither: lower local is server", 22, 1022, ROLE_SERVER),
            ("neither: higher local is client", 5000, 80, ROLE_CLIENT),
            ("lower bound is ephemeral", 32768, 80, ROLE_CLIENT),
            ("upper bound is ephemeral", 80, 60999, ROLE_SERVER),
            ("just above the range is not", 61000, 80, ROLE_CLIENT),
            ("just above the range, server side", 80, 61000, ROLE_SERVER),
        ];
        for (case, local, remote, want) in cases {
            assert_eq!(infer_role(local, remote, lo, hi), want, "{case}");
        }
    }
}
