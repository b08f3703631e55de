//! TCP family: per-peer payload bytes and retransmits, connection lifecycle,
//! connect duration and smoothed RTT.
//!
//! - Hooks (kernel side `agent-ebpf/src/tcp/`), two designs:
//!   - socket counters (`tp_btf`, preferred, 5.11+): `inet_sock_set_state`
//!     and a walk of every open file (`iter/task_file`) that this collector
//!     runs at each collection ([`walk`]). Nothing runs per I/O.
//!   - per I/O (`raw_tp`, 6.3+): `inet_sock_set_state`, `sock_send_length`,
//!     `sock_recv_length`, `tcp_retransmit_skb`.
//!
//!   Struct offsets come from kernel BTF ([`offsets`]).
//! - Metrics (eBPF):
//!   - `perch.tcp.io{network.peer.address, server.port, perch.tcp.role,
//!     network.io.direction}`: payload bytes. Socket counters: sent once
//!     (`bytes_sent - bytes_retrans`) and received in order
//!     (`bytes_received`, FIN taken out), from the kernel's per-socket
//!     counters, closed sockets exactly and open ones as of the collection.
//!     Per I/O: as returned by the `sendmsg` / `recvmsg` family of syscalls
//!     (`ret > 0`, `MSG_PEEK` excluded). No headers, no retransmitted bytes.
//!   - `perch.tcp.retransmits{network.peer.address, server.port,
//!     perch.tcp.role}`: retransmitted segments, as `RetransSegs` counts.
//!   - `perch.tcp.connections.opened{perch.tcp.role}`,
//!     `perch.tcp.connections.failed{error.type = refused|timeout|reset}`.
//!   - `perch.tcp.connect.duration` (SYN sent to established) and
//!     `perch.tcp.rtt` (smoothed RTT: socket counters, once per collection a
//!     socket moved data in and once at its close; per I/O, every 100 ms of
//!     activity per socket), histograms in seconds; `perch.tcp.rtt` per
//!     peer with `probes.tcp.rtt_per_peer`.
//!   - Self: `perch.bpf.map.insert_failures{perch.bpf.map}` (failed inserts: the bytes
//!     of a peer that did not fit are in the `network.peer.address="other"`
//!     series, never lost), `perch.bpf.map.entries{perch.bpf.map}`,
//!     `perch.tcp.peers.evicted`, `perch.tcp.peers.forgotten`; socket
//!     counters also `perch.tcp.sockets.adopted` and
//!     `perch.tcp.sockets.untracked`.
//! - Fallback (procfs): `/proc/net/snmp` `Tcp`, for the agent's network
//!   namespace and host-wide within it: `RetransSegs` ->
//!   `perch.tcp.retransmits{}`, `ActiveOpens`/`PassiveOpens` ->
//!   `perch.tcp.connections.opened{perch.tcp.role}`, `AttemptFails` ->
//!   `perch.tcp.connections.failed{error.type="attempt_failed"}` (refused and
//!   timed-out connects together, plus server handshakes that failed),
//!   `EstabResets` -> `{error.type="reset"}`. Plus the netlink `sock_diag`
//!   sampler ([`sampler`]): per-peer `perch.tcp.io` from
//!   `tcp_info` byte counters and `perch.tcp.rtt` from `tcpi_rtt`, sampled
//!   once per interval (connections that open and close between two samples
//!   are missed). No connect-duration histogram.
//! - Oldest kernel: 5.11 for eBPF (6.3 for the per-I/O variant), any for
//!   procfs (4.1 for the sampler's byte counters).
//!
//! Idle peers are evicted from `TCP_PEERS` so the bounded map keeps room for
//! new peers: see [`PeerTable`].
//!
//! Peer series are keyed by remote address, the server's port and the role;
//! the client's ephemeral port is never an attribute. IPv4-mapped IPv6
//! peers are reported as IPv4, merged with the IPv4 series.

pub mod cgroups;
mod collector;
pub mod offsets;
pub mod peers;
pub mod sampler;
pub mod walk;

use std::ops::RangeInclusive;

use serde::Deserialize;

use agent_common::tcp as c;

use crate::gate::rules::{iter, p, Hook, Rule, Variant};
use crate::gate::Mode;

use super::{BuildCtx, BuildError, PrepareCtx, Prepared, Section, Unit};

pub use collector::TcpCollector;
pub use peers::{peer_address, role_name, OVERFLOW_PEER};

pub const RULE: Rule = Rule {
    // Both variants read `struct sock` and `tcp_sock` at offsets from
    // kernel BTF (offsets.rs), so even `raw_tp` needs BTF.
    variants: &[
        // Socket counters (agent-ebpf/src/tcp/sockets.rs): one program
        // per state change and nothing per I/O, plus a walk of every
        // open file at each collection. `bpf_sock_from_file` is 5.11
        // (commit 4f19cab76136), `bpf_skc_to_tcp_sock` 5.9, the
        // `task_file` iterator 5.8.
        Variant {
            hook: Hook::TpBtf,
            programs: &[
                p("tcp_state_btf", "inet_sock_set_state"),
                iter("tcp_walk", "task_file"),
            ],
            min_kernel: (5, 11),
            needs_btf: true,
        },
        // Per I/O (agent-ebpf/src/tcp/io.rs): `sock_send_length` and
        // `sock_recv_length` are 6.3 ("net: sock: add tracepoint for
        // send recv length"), `inet_sock_set_state` 4.16 and
        // `tcp_retransmit_skb` 4.15; `sk_protocol` became a plain field
        // in 5.6.
        Variant {
            hook: Hook::RawTp,
            programs: &[
                p("tcp_state_raw", "inet_sock_set_state"),
                p("tcp_send_raw", "sock_send_length"),
                p("tcp_recv_raw", "sock_recv_length"),
                p("tcp_retx_raw", "tcp_retransmit_skb"),
            ],
            min_kernel: (6, 3),
            needs_btf: true,
        },
    ],
    fallback: Some("/proc/net/snmp Tcp (RetransSegs, ActiveOpens, PassiveOpens, AttemptFails, EstabResets), \
                    plus a netlink sock_diag sampler of tcp_info (per-peer bytes acked/received, RTT) once per interval"),
    fallback_loses: "connections that open and close between two samples (their bytes and RTT), \
                     bytes a socket moved after its last sample, per-peer retransmits, \
                     the connect-duration histogram, and the refused/timeout split of failed connects",
};

/// Allowed values of `probes.tcp.max_peers`: the number of entries of the
/// kernel's per-peer hash map. Below 16 the map is useless; above a million
/// its pre-allocated memory (tens of MiB) outweighs what a host agent should
/// hold.
pub const MAX_PEERS_RANGE: RangeInclusive<u32> = 16..=1_000_000;

/// Allowed values of `probes.tcp.max_sockets`: the TCP sockets the
/// socket-counter design tracks at once. Its table has twice as many slots
/// (rounded up to a power of two) of 112 bytes each, preallocated: 65536
/// sockets take 14.7 MB of kernel memory, charged to the agent's memory
/// cgroup; 4 million would be over 800 MiB.
pub const MAX_SOCKETS_RANGE: RangeInclusive<u32> = 1024..=4_194_304;

/// `[probes.tcp]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `auto`, `ebpf`, `procfs` or `off`. Default `auto`.
    pub mode: Mode,
    /// Export the RTT histogram per remote peer instead of host-wide. One
    /// series set per peer, so it is opt-in. Default `false`.
    pub rtt_per_peer: bool,
    /// Entries of the kernel's per-peer map; peers beyond it are folded
    /// into an overflow series. Range 16..=1000000, default 4096.
    pub max_peers: u32,
    /// TCP sockets the socket-counter design (`tp_btf` variant) tracks at
    /// once, host-wide; a socket beyond it is not counted, and the failed
    /// insert is (`perch.bpf.map.insert_failures{perch.bpf.map="TCP_TRACKED"}`).
    /// Range 1024..=4194304, default 32768 (7.3 MB of kernel memory).
    pub max_sockets: u32,
    /// Also key `perch.tcp.io`, `perch.tcp.retransmits`, `perch.tcp.rtt`
    /// and the connection counters by the socket's cgroup: `container.id`,
    /// `k8s.pod.uid`, `perch.k8s.qos_class` and `perch.cgroup`, as
    /// `[probes.containers]` attributes them. Multiplies the per-peer
    /// series by the containers talking to each peer, so it is opt-in; the
    /// pipeline's series cap bounds it. Needs a cgroup2 mount and, in eBPF
    /// mode, a kernel whose socket holds a plain cgroup pointer (5.15+); in
    /// procfs mode, `INET_DIAG_CGROUP_ID` (5.7+). Default `false`.
    pub per_cgroup: bool,
}

impl Config {
    /// Slots of the socket-counter design's table: twice `max_sockets`,
    /// rounded up to a power of two (the programs mask the hash with it).
    pub fn tracked_slots(&self) -> u32 {
        self.max_sockets.saturating_mul(2).next_power_of_two()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Auto,
            rtt_per_peer: false,
            max_peers: 4096,
            max_sockets: 32768,
            per_cgroup: false,
        }
    }
}

impl Section for Config {
    fn mode(&self) -> Mode {
        self.mode
    }
    fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }
    fn validate(&self) -> Result<(), (String, String)> {
        crate::range::check_range(self.max_peers, &MAX_PEERS_RANGE)
            .map_err(|m| ("max_peers".to_owned(), m))?;
        crate::range::check_range(self.max_sockets, &MAX_SOCKETS_RANGE)
            .map_err(|m| ("max_sockets".to_owned(), m))
    }
}

pub struct Tcp;
pub static UNIT: Tcp = Tcp;

/// The socket-cgroup resolver, with `probes.tcp.per_cgroup` and a cgroup2
/// mount (in eBPF mode `prepare` also needed the kernel's offsets; without
/// them the kernel keys every socket by cgroup 0, the series without
/// cgroup attributes).
fn socket_cgroups(ctx: &BuildCtx<'_>) -> Option<cgroups::SocketCgroups> {
    if !ctx.config.tcp.per_cgroup {
        return None;
    }
    let root = crate::families::containers::ids::cgroup2_root(&ctx.sys.path("fs/cgroup")).ok()?;
    let containers = &ctx.config.containers;
    Some(cgroups::SocketCgroups::new(
        crate::families::containers::ids::CgroupIds::new(
            root,
            containers.host_depth,
            containers.max_cgroups,
        ),
    ))
}

impl Unit for Tcp {
    fn rule(&self) -> &'static Rule {
        &RULE
    }

    fn prepare(&self, ctx: &PrepareCtx<'_>) -> Prepared {
        let cfg = &ctx.config.tcp;
        let mut out = Prepared::default();
        // The socket-counter table is preallocated: full size only when its
        // variant may run.
        let tracked_slots = if ctx.config.skip_hooks.contains(&Hook::TpBtf) {
            1
        } else {
            cfg.tracked_slots()
        };
        // Every variant reads kernel structs at offsets found in BTF;
        // without them none is tried.
        let offsets = ctx
            .btf
            .get()
            .map_err(|e| format!("struct offsets need kernel BTF: {e}"))
            .and_then(|btf| {
                offsets::tcp_offsets(
                    btf,
                    cfg.rtt_per_peer,
                    offsets::ephemeral_range(ctx.proc_root),
                    offsets::tick_ns(),
                    tracked_slots,
                )
                .map_err(|e| format!("struct offsets from kernel BTF: {e}"))
            });
        if ctx.host_pid_namespace == Some(false) {
            // `iter/task_file` walks the tasks of the iterator's pid
            // namespace only (bpf_iter_task uses task_active_pid_ns).
            out.notes.insert(
                Hook::TpBtf,
                "outside the host's pid namespace the socket walk sees only this \
                 namespace's processes: other processes' open connections are counted \
                 only once they close (run with hostPID)"
                    .to_owned(),
            );
        }
        let per_cgroup = if cfg.per_cgroup {
            let got =
                crate::families::containers::ids::cgroup2_root(&ctx.sys_root.join("fs/cgroup"))
                    .map_err(|e| format!("no per-cgroup TCP: {e}"))
                    .and_then(|_| {
                        let btf = ctx.btf.get().map_err(|e| e.to_string())?;
                        offsets::cgroup_offsets(btf).map_err(|e| {
                            format!(
                                "no per-cgroup TCP: the socket's cgroup is not a plain \
                             sock_cgroup_data.cgroup pointer in this kernel's BTF (5.15+): {e}"
                            )
                        })
                    });
            for v in RULE.variants {
                let note = match &got {
                    Ok(_) => "peers and connections also per socket cgroup".to_owned(),
                    Err(e) => e.clone(),
                };
                out.notes
                    .entry(v.hook)
                    .and_modify(|n| {
                        n.push_str("; ");
                        n.push_str(&note);
                    })
                    .or_insert(note);
            }
            got.ok()
        } else {
            None
        };
        match offsets {
            Ok(mut o) => {
                if let Some([sk_cgroup, cgroup_kn, kn_id]) = per_cgroup {
                    o.per_cgroup = 1;
                    o.sk_cgroup = sk_cgroup;
                    o.cgroup_kn = cgroup_kn;
                    o.kn_id = kn_id;
                }
                out.global(c::GLOBAL_OFFSETS, &o)
            }
            Err(e) => out.refuse_all(&RULE, &e, |_| true),
        }
        out.map_sizes.push((
            c::MAP_CGROUP_CONNS,
            if per_cgroup.is_some() {
                cfg.max_peers
            } else {
                1
            },
        ));
        out.map_sizes.push((c::MAP_PEERS, cfg.max_peers));
        out.map_sizes.push((c::MAP_TRACKED, tracked_slots));
        out.map_sizes.push((
            c::MAP_RTT_PEERS,
            if cfg.rtt_per_peer {
                cfg.max_peers.saturating_mul(c::RTT_PEER_BUCKETS_PER_PEER)
            } else {
                1
            },
        ));
        out
    }

    fn build(
        &self,
        ctx: &mut BuildCtx<'_>,
    ) -> Result<Box<dyn crate::collectors::Collector>, BuildError> {
        Ok(Box::new(TcpCollector::new(ctx)?))
    }
}
