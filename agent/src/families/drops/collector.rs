//! The `drops` collector.
//!
//! - Metric: `perch.network.packet.drops{perch.drop.reason}`, a counter.
//!   The reason is the kernel's `enum skb_drop_reason` name without its
//!   `SKB_DROP_REASON_` prefix, lower-cased (`netfilter_drop`, `no_socket`,
//!   `tcp_listen_overflow`). Names come from the running kernel's BTF:
//!   reason numbers move between kernels. Not reported: `not_specified` (a
//!   drop the code path did not classify: noise), `consumed` and
//!   `not_dropped_yet` (normal frees). `subsystem` counts reasons of
//!   subsystems with their own enums (mac80211, openvswitch, 6.4+);
//!   `overflow` counts reasons past the map's bound; `reason_<n>` names a
//!   reason when BTF is unreadable.
//! - Where `kfree_skb` has no reason (before 5.17, or `probes.drops.by =
//!   "protocol"`): `perch.drop.reason = "unknown"`, with `network.type`
//!   (`ipv4`, `ipv6`, `other`; absent when no BTF gave `sk_buff`'s layout).
//!   Those kernels cannot tell a drop from a free that some code paths make
//!   with `kfree_skb` (the noise 5.17+ labels `not_specified`), so this
//!   counts both.
//! - Scope: eBPF sees every network namespace of the host; the fallback sees
//!   the agent's namespace (its `/proc/net`), plus the host-wide
//!   `softnet_stat`.
//! - Fallback: the protocol counters of [`FALLBACK`], each mapped to the
//!   kernel reason that the same code path passes to `kfree_skb_reason`, and
//!   `/proc/net/softnet_stat` `dropped` as `cpu_backlog`. It misses drops no
//!   counter records (netfilter, qdisc, TCP segments to closed ports,
//!   IPv6 UDP to closed ports: that one is in `/proc/net/snmp6`).

use std::time::SystemTime;

use agent_common::drops as c;
use aya::maps::{MapData, PerCpuArray};
use tracing::warn;

use crate::collectors::{cpu_sum, online_cpus, read_slot, CollectError, Collector};
use crate::families::{BuildCtx, BuildError};
use crate::gate::Source;
use crate::model::{Attributes, Metric, Number, NumberPoint, StartTimes};
use crate::sources::{snmp, Root};

use super::softnet;

const METRIC: &str = crate::catalogue::PACKET_DROPS;
const DESC: &str = "Packets the kernel dropped, by the kernel's drop reason.";
/// Attribute: the drop reason.
pub const ATTR_REASON: &str = "perch.drop.reason";

/// Attribute: the dropped packet's L3 protocol, where no reason exists.
pub const ATTR_NETWORK_TYPE: &str = "network.type";
/// `perch.drop.reason` where the kernel gives none.
pub const REASON_UNKNOWN: &str = "unknown";

/// The BTF enum of drop reasons.
const REASON_ENUM: &str = "skb_drop_reason";

/// Reasons never reported: normal frees and unclassified drops.
const SKIPPED: [&str; 3] = ["not_dropped_yet", "consumed", "not_specified"];

/// One fallback counter: file under the proc root, protocol line, counter,
/// the reason it stands for, and what the kernel counts in it.
pub struct FallbackCounter {
    pub file: &'static str,
    pub proto: &'static str,
    pub counter: &'static str,
    pub reason: &'static str,
    pub meaning: &'static str,
}

const fn fb(
    file: &'static str,
    proto: &'static str,
    counter: &'static str,
    reason: &'static str,
    meaning: &'static str,
) -> FallbackCounter {
    FallbackCounter {
        file,
        proto,
        counter,
        reason,
        meaning,
    }
}

/// The fallback mapping. Each counter is incremented on the same code path
/// that frees the packet with the named reason, so on a kernel with both the
/// two agree for that path; a reason can have other paths the counter does
/// not see (e.g. `no_socket` is also TCP to a closed port).
pub const FALLBACK: &[FallbackCounter] = &[
    fb(
        "net/snmp",
        "Ip",
        "InHdrErrors",
        "ip_inhdr",
        "IPv4 datagrams with a bad header (version, length, options, TTL exceeded)",
    ),
    fb(
        "net/snmp",
        "Ip",
        "InAddrErrors",
        "ip_inaddrerrors",
        "IPv4 datagrams for an address that is not local, with forwarding off",
    ),
    fb(
        "net/snmp",
        "Ip",
        "InUnknownProtos",
        "ip_noproto",
        "IPv4 datagrams for a protocol with no handler",
    ),
    fb(
        "net/snmp",
        "Ip",
        "OutNoRoutes",
        "ip_outnoroutes",
        "IPv4 datagrams dropped on output for lack of a route",
    ),
    fb(
        "net/snmp",
        "Tcp",
        "InCsumErrors",
        "tcp_csum",
        "TCP segments with a bad checksum",
    ),
    fb(
        "net/snmp",
        "Udp",
        "NoPorts",
        "no_socket",
        "IPv4 UDP datagrams to a port with no socket",
    ),
    fb(
        "net/snmp",
        "Udp",
        "RcvbufErrors",
        "socket_rcvbuff",
        "IPv4 UDP datagrams dropped because the socket's receive buffer was full",
    ),
    fb(
        "net/snmp",
        "Udp",
        "InCsumErrors",
        "udp_csum",
        "IPv4 UDP datagrams with a bad checksum",
    ),
    fb(
        "net/netstat",
        "IpExt",
        "InNoRoutes",
        "ip_innoroutes",
        "IPv4 datagrams received with no route to deliver or forward them",
    ),
    fb(
        "net/netstat",
        "IpExt",
        "InCsumErrors",
        "ip_csum",
        "IPv4 datagrams with a bad header checksum",
    ),
    fb(
        "net/netstat",
        "TcpExt",
        "ListenOverflows",
        "tcp_listen_overflow",
        "SYNs or final ACKs dropped because a listener's accept queue was full",
    ),
    fb(
        "net/netstat",
        "TcpExt",
        "TCPBacklogDrop",
        "socket_backlog",
        "TCP segments dropped because the socket's backlog was full",
    ),
    fb(
        "net/netstat",
        "TcpExt",
        "TCPMinTTLDrop",
        "tcp_minttl",
        "TCP segments below the socket's IP_MINTTL",
    ),
    fb(
        "net/netstat",
        "TcpExt",
        "TCPZeroWindowDrop",
        "tcp_zerowindow",
        "TCP segments dropped because the receive window was zero",
    ),
    fb(
        "net/netstat",
        "TcpExt",
        "TCPRcvQDrop",
        "proto_mem",
        "TCP segments dropped because the socket could not be charged memory",
    ),
    fb(
        "net/netstat",
        "TcpExt",
        "TCPOFODrop",
        "tcp_ofo_drop",
        "out-of-order TCP segments dropped for lack of memory",
    ),
    fb(
        "net/netstat",
        "TcpExt",
        "PAWSEstab",
        "tcp_rfc7323_paws",
        "TCP segments failing the PAWS timestamp check",
    ),
    fb(
        "net/netstat",
        "TcpExt",
        "TCPMD5NotFound",
        "tcp_md5notfound",
        "TCP segments without the MD5 signature the socket expects",
    ),
    fb(
        "net/netstat",
        "TcpExt",
        "TCPMD5Unexpected",
        "tcp_md5unexpected",
        "TCP segments with an MD5 signature the socket does not expect",
    ),
    fb(
        "net/netstat",
        "TcpExt",
        "TCPMD5Failure",
        "tcp_md5failure",
        "TCP segments whose MD5 signature is wrong",
    ),
];

/// `/proc/net/softnet_stat` `dropped`, summed over CPUs.
pub const SOFTNET_REASON: &str = "cpu_backlog";

/// One series' value: (reason, network type, count).
type Count = (String, Option<&'static str>, u64);

pub struct DropsCollector {
    proc: Root,
    map: Option<PerCpuArray<MapData, u64>>,
    /// Reason name by number, from BTF (eBPF mode).
    names: Vec<Option<String>>,
    starts: StartTimes,
}

impl DropsCollector {
    pub fn new(ctx: &mut BuildCtx<'_>) -> Result<Self, BuildError> {
        let proc = ctx.proc.clone();
        if ctx.source() != Source::Ebpf {
            return Ok(Self {
                proc,
                map: None,
                names: Vec::new(),
                starts: StartTimes::new(ctx.boot),
            });
        }
        let map = ctx.map(c::MAP_COUNTS)?;
        let attached = ctx.attached_at()?;
        let names = match ctx
            .btf()
            .and_then(|btf| btf.enum_values(REASON_ENUM).map_err(|e| e.to_string()))
        {
            Ok(values) => reason_names(&values),
            Err(e) => {
                warn!(error = %e, "drops: no reason names from BTF; reporting reason_<n>");
                Vec::new()
            }
        };
        Ok(Self {
            proc,
            map: Some(map),
            names,
            starts: StartTimes::new(attached),
        })
    }

    fn point(
        &mut self,
        reason: String,
        network_type: Option<&'static str>,
        value: u64,
        now: SystemTime,
    ) -> NumberPoint {
        let mut attributes: Attributes = vec![(ATTR_REASON, reason.into())];
        if let Some(t) = network_type {
            attributes.push((ATTR_NETWORK_TYPE, t.into()));
        }
        let start = self.starts.observe(METRIC, &attributes, value as f64, now);
        NumberPoint {
            attributes,
            start_time: Some(start),
            time: now,
            value: Number::Int(i64::try_from(value).unwrap_or(i64::MAX)),
        }
    }

    /// Every non-zero slot.
    fn read_map(&self) -> Result<Vec<Count>, CollectError> {
        let Some(map) = &self.map else {
            return Ok(Vec::new());
        };
        let cpus = online_cpus();
        let mut out = Vec::new();
        for slot in 0..c::SLOTS {
            let total = cpu_sum(&read_slot(map, slot, c::MAP_COUNTS)?, &cpus);
            if total == 0 {
                continue;
            }
            let protocol = match slot {
                c::SLOT_PROTO_IPV4 => Some(Some("ipv4")),
                c::SLOT_PROTO_IPV6 => Some(Some("ipv6")),
                c::SLOT_PROTO_OTHER => Some(Some("other")),
                c::SLOT_PROTO_UNREAD => Some(None),
                _ => None,
            };
            if let Some(network_type) = protocol {
                out.push((REASON_UNKNOWN.to_owned(), network_type, total));
                continue;
            }
            let name = match slot {
                c::SLOT_SUBSYSTEM => "subsystem".to_owned(),
                c::SLOT_OVERFLOW => "overflow".to_owned(),
                n => match self.names.get(n as usize) {
                    Some(Some(name)) => name.clone(),
                    _ => format!("reason_{n}"),
                },
            };
            if SKIPPED.contains(&name.as_str()) {
                continue;
            }
            out.push((name, None, total));
        }
        Ok(out)
    }

    fn read_procfs(&self) -> Result<Vec<(String, u64)>, CollectError> {
        let snmp_all = snmp::parse_snmp(
            &self.proc.read("net/snmp")?,
            &self.proc.path("net/snmp").display().to_string(),
        )?;
        let netstat = snmp::parse_snmp(
            &self.proc.read("net/netstat")?,
            &self.proc.path("net/netstat").display().to_string(),
        )?;
        let mut out = fallback_values(&snmp_all, &netstat);
        let soft = softnet::parse_softnet_stat(&self.proc.read("net/softnet_stat")?)?;
        out.push((
            SOFTNET_REASON.to_owned(),
            soft.iter().map(|s| s.dropped).sum(),
        ));
        Ok(out)
    }
}

/// The fallback counters present in the parsed files, as (reason, value).
pub fn fallback_values(snmp_all: &snmp::Snmp, netstat: &snmp::Snmp) -> Vec<(String, u64)> {
    FALLBACK
        .iter()
        .filter_map(|f| {
            let file = if f.file == "net/snmp" {
                snmp_all
            } else {
                netstat
            };
            let v = *file.get(f.proto)?.get(f.counter)?;
            Some((f.reason.to_owned(), u64::try_from(v).unwrap_or(0)))
        })
        .collect()
}

impl Collector for DropsCollector {
    fn name(&self) -> &'static str {
        "drops"
    }

    fn collect(&mut self, now: SystemTime, out: &mut Vec<Metric>) -> Result<(), CollectError> {
        let values = if self.map.is_some() {
            self.read_map()?
        } else {
            self.read_procfs()?
                .into_iter()
                .map(|(reason, v)| (reason, None, v))
                .collect()
        };
        let points = values
            .into_iter()
            .map(|(reason, network_type, v)| self.point(reason, network_type, v, now))
            .collect();
        self.starts.end_collection(now);
        out.push(Metric::counter(METRIC, DESC, "{packet}", points));
        Ok(())
    }
}

/// `perch.drop.reason` of an `skb_drop_reason` enumerator:
/// `SKB_DROP_REASON_NO_SOCKET` -> `no_socket`, `SKB_CONSUMED` -> `consumed`.
pub fn reason_name(enumerator: &str) -> String {
    let s = enumerator
        .strip_prefix("SKB_DROP_REASON_")
        .or_else(|| enumerator.strip_prefix("SKB_"))
        .unwrap_or(enumerator);
    s.to_ascii_lowercase()
}

/// Names indexed by reason number, for numbers below the map's bound
/// (`SKB_DROP_REASON_MAX` and the subsystem mask are not reasons).
pub fn reason_names(values: &[(String, u32)]) -> Vec<Option<String>> {
    let mut names = vec![None; c::MAX_REASONS as usize];
    for (name, v) in values {
        if *v >= c::MAX_REASONS || name.ends_with("_MAX") || name.ends_with("_SUBSYS_MASK") {
            continue;
        }
        names[*v as usize] = Some(reason_name(name));
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::btf::KernelBtf;

    /// A BTF blob: an INT, a STRUCT with one member, a FUNC_PROTO with one
    /// parameter and `enum skb_drop_reason` with `enumerators`.
    fn blob(enum_name: &str, enumerators: &[(&str, u32)]) -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut add = |s: &str| {
            let off = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off
        };
        let int_name = add("int");
        let st_name = add("sk_buff");
        let m_name = add("len");
        let en_name = add(enum_name);
        let ens: Vec<(u32, u32)> = enumerators.iter().map(|(n, v)| (add(n), *v)).collect();
        let mut types = Vec::new();
        let mut w = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        // [1] INT "int" size 4, encoding word.
        w(int_name);
        w(1 << 24);
        w(4);
        w(32);
        // [2] STRUCT "sk_buff" size 4, one member "len": int at bit 0.
        w(st_name);
        w((4 << 24) | 1);
        w(4);
        w(m_name);
        w(1);
        w(0);
        // [3] FUNC_PROTO returning void with one int parameter.
        w(0);
        w((13 << 24) | 1);
        w(0);
        w(0);
        w(1);
        // [4] ENUM.
        w(en_name);
        w((6 << 24) | ens.len() as u32);
        w(4);
        for (n, v) in &ens {
            w(*n);
            w(*v);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&[0x9f, 0xeb, 1, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn enum_from_synthetic_btf() {
        let b = blob(
            "skb_drop_reason",
            &[
                ("SKB_NOT_DROPPED_YET", 0),
                ("SKB_CONSUMED", 1),
                ("SKB_DROP_REASON_NOT_SPECIFIED", 2),
                ("SKB_DROP_REASON_NO_SOCKET", 3),
                ("SKB_DROP_REASON_NETFILTER_DROP", 12),
                ("SKB_DROP_REASON_MAX", 13),
                ("SKB_DROP_REASON_SUBSYS_MASK", 0xffff_0000),
            ],
        );
        let btf = KernelBtf::parse(b.clone(), "blob").unwrap();
        let got = btf.enum_values("skb_drop_reason").unwrap();
        assert_eq!(got.len(), 7);
        assert_eq!(got[4], ("SKB_DROP_REASON_NETFILTER_DROP".to_owned(), 12));
        let names = reason_names(&got);
        assert_eq!(names.len(), c::MAX_REASONS as usize);
        assert_eq!(names[3].as_deref(), Some("no_socket"));
        assert_eq!(names[12].as_deref(), Some("netfilter_drop"));
        assert_eq!(names[1].as_deref(), Some("consumed"));
        assert_eq!(names[13], None, "_MAX is not a reason");
        assert_eq!(names.iter().flatten().count(), 5);

        let errs: Vec<(Vec<u8>, &str)> = vec![
            (
                blob("other_enum", &[("A", 1)]),
                "no enum named `skb_drop_reason`",
            ),
            (vec![0xeb, 0x9f, 1, 0], "little-endian BTF"),
            (b[..30].to_vec(), "past the end"),
            (
                {
                    let mut x = b.clone();
                    // The INT's info word: kind 31 does not exist.
                    x[24 + 7] = 31;
                    x
                },
                "unknown type kind 31",
            ),
        ];
        for (data, needle) in errs {
            let e = KernelBtf::parse(data, "blob")
                .and_then(|btf| btf.enum_values("skb_drop_reason"))
                .unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    #[test]
    fn reason_names_cases() {
        let cases = [
            ("SKB_DROP_REASON_NO_SOCKET", "no_socket"),
            ("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW", "tcp_listen_overflow"),
            ("SKB_CONSUMED", "consumed"),
            ("SKB_NOT_DROPPED_YET", "not_dropped_yet"),
            ("ODD", "odd"),
        ];
        for (e, want) in cases {
            assert_eq!(reason_name(e), want);
        }
    }

    /// The running kernel's enum, when it has one (5.17+): the reasons the
    /// privileged tests induce are there, every name is unique, and the
    /// fallback's reasons are real reason names of this kernel.
    #[test]
    fn live_kernel_enum() {
        // Kernel BTF and the enum (5.17+) are what the eBPF variants need:
        // a kernel without them fails here, naming what is missing.
        let btf = KernelBtf::from_sys_fs().unwrap_or_else(|e| {
            panic!("this test needs kernel BTF ({e}); the drops family would use its fallback")
        });
        let values = btf.enum_values(REASON_ENUM).unwrap_or_else(|e| {
            panic!(
                "{e}: enum skb_drop_reason is Linux 5.17+; the drops family would use its fallback"
            )
        });
        let names: Vec<String> = reason_names(&values).into_iter().flatten().collect();
        for want in ["netfilter_drop", "no_socket", "not_specified"] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "duplicate names");
        for f in FALLBACK {
            assert!(
                names.iter().any(|n| n == f.reason),
                "fallback reason {} is not a reason of this kernel",
                f.reason
            );
        }
        assert!(names.iter().any(|n| n == SOFTNET_REASON));
    }

    #[test]
    fn fallback_from_captured_files() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/procfs/linux-6.18"
        );
        let s = snmp::parse_snmp(
            &std::fs::read_to_string(format!("{dir}/net_snmp")).unwrap(),
            "net_snmp",
        )
        .unwrap();
        let n = snmp::parse_snmp(
            &std::fs::read_to_string(format!("{dir}/net_netstat")).unwrap(),
            "net_netstat",
        )
        .unwrap();
        let got = fallback_values(&s, &n);
        // Every mapped counter exists on 6.18.
        assert_eq!(got.len(), FALLBACK.len());
        for ((reason, v), f) in got.iter().zip(FALLBACK) {
            let file = if f.file == "net/snmp" { &s } else { &n };
            assert_eq!(*reason, f.reason);
            assert_eq!(*v as i64, file[f.proto][f.counter], "{}", f.counter);
        }
        // An older kernel without a counter: it is left out, not zero.
        let mut old = n.clone();
        old.get_mut("TcpExt").unwrap().remove("TCPZeroWindowDrop");
        let got = fallback_values(&s, &old);
        assert_eq!(got.len(), FALLBACK.len() - 1);
        assert!(!got.iter().any(|(r, _)| r == "tcp_zerowindow"));
    }
}
