//! What the TCP programs read, from kernel BTF and the running host: the
//! struct offsets of `sock`, `tcp_sock` and `sk_buff`, the tracepoint
//! signatures, the ephemeral port range and the kernel tick.

use agent_common::tcp::TcpOffsets;

use crate::sources::btf::{BtfError, KernelBtf};

/// The offsets the TCP programs read, from `btf`. `rtt_per_peer` and the
/// ephemeral port range are passed through to the programs.
pub fn tcp_offsets(
    btf: &KernelBtf,
    rtt_per_peer: bool,
    ephemeral: (u32, u32),
    tick_ns: u64,
    tracked_slots: u32,
) -> Result<TcpOffsets, BtfError> {
    let cb = btf.member("sk_buff", "cb")?.offset;
    let gso = btf.member_sized("tcp_skb_cb", "tcp_gso_segs", 2)?;
    Ok(TcpOffsets {
        valid: 1,
        sk_family: btf.member_sized("sock", "__sk_common.skc_family", 2)?,
        sk_state: btf.member_sized("sock", "__sk_common.skc_state", 1)?,
        sk_protocol: btf.member_sized("sock", "sk_protocol", 2)?,
        sk_daddr: btf.member_sized("sock", "__sk_common.skc_daddr", 4)?,
        sk_v6_daddr: btf.member_sized("sock", "__sk_common.skc_v6_daddr", 16)?,
        sk_dport: btf.member_sized("sock", "__sk_common.skc_dport", 2)?,
        sk_num: btf.member_sized("sock", "__sk_common.skc_num", 2)?,
        sk_err: btf.member_sized("sock", "sk_err", 4)?,
        tcp_srtt_us: btf.member_sized("tcp_sock", "srtt_us", 4)?,
        skb_gso_segs: cb + gso,
        // (sk, skb, err) since the tracepoint fires on failures too (6.x,
        // "tcp: add the err argument to tcp_retransmit_skb"); (sk, skb) before.
        retrans_has_err: u32::from(btf.tracepoint_args("tcp_retransmit_skb")? >= 3),
        rtt_per_peer: u32::from(rtt_per_peer),
        ephemeral_lo: ephemeral.0,
        ephemeral_hi: ephemeral.1,
        rtt_interval_jiffies: agent_common::tcp::rtt_interval_jiffies(tick_ns),
        tcp_total_retrans: btf.member_sized("tcp_sock", "total_retrans", 4)?,
        tcp_bytes_sent: btf.member_sized("tcp_sock", "bytes_sent", 8)?,
        tcp_bytes_retrans: btf.member_sized("tcp_sock", "bytes_retrans", 8)?,
        tcp_bytes_received: btf.member_sized("tcp_sock", "bytes_received", 8)?,
        sk_flags: sk_flags_offset(btf)?,
        socket_sk: btf.member_sized("socket", "sk", 8)?,
        tracked_mask: tracked_slots.saturating_sub(1),
        tcp_mstamp: btf.member_sized("tcp_sock", "tcp_mstamp", 8)?,
        // The helper is in the kernel's own list of helpers (5.11+).
        no_sock_from_file: u32::from(
            !btf.enum_values("bpf_func_id")?
                .iter()
                .any(|(n, _)| n == "BPF_FUNC_sock_from_file"),
        ),
        file_f_inode: btf.member_sized("file", "f_inode", 8)?,
        inode_i_mode: btf.member_sized("inode", "i_mode", 2)?,
        file_private_data: btf.member_sized("file", "private_data", 8)?,
        // Set by `prepare` with `probes.tcp.per_cgroup` (`cgroup_offsets`).
        per_cgroup: 0,
        sk_cgroup: 0,
        cgroup_kn: 0,
        kn_id: 0,
    })
}

/// Where the programs find a socket's cgroup v2 id: `sock.sk_cgrp_data.cgroup`
/// (`struct cgroup *`, a plain pointer since 5.15; before, a word shared
/// with net_cls/net_prio data), `cgroup.kn`, `kernfs_node.id`.
pub fn cgroup_offsets(btf: &KernelBtf) -> Result<[u32; 3], BtfError> {
    Ok([
        btf.member_sized("sock", "sk_cgrp_data.cgroup", 8)?,
        btf.member_sized("cgroup", "kn", 8)?,
        btf.member_sized("kernfs_node", "id", 8)?,
    ])
}

/// `sock.sk_flags` (`unsigned long`): a member of `sock_common` named
/// `skc_flags` on recent kernels (`sk_flags` is a #define there), a plain
/// member of `sock` before.
fn sk_flags_offset(btf: &KernelBtf) -> Result<u32, BtfError> {
    btf.member_sized("sock", "__sk_common.skc_flags", 8)
        .or_else(|_| btf.member_sized("sock", "sk_flags", 8))
}

/// The kernel's tick (one jiffy) in ns: the resolution of the coarse
/// clocks, which advance once per tick (`1e9 / CONFIG_HZ`). 4 ms (HZ=250,
/// the common default) if the kernel does not say.
pub fn tick_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes one timespec into a valid pointer.
    let r = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    let ns = (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64);
    if r == 0 && ns > 0 {
        ns
    } else {
        4_000_000
    }
}

/// `net.ipv4.ip_local_port_range` of the agent's namespace, or Linux's
/// default (32768..=60999) when unreadable.
pub fn ephemeral_range(proc_root: &std::path::Path) -> (u32, u32) {
    crate::sources::read_file_capped(&proc_root.join("sys/net/ipv4/ip_local_port_range"), 64)
        .ok()
        .and_then(|s| parse_port_range(&s))
        .unwrap_or((32768, 60999))
}

/// Parses `ip_local_port_range` (`"32768\t60999\n"`).
pub fn parse_port_range(text: &str) -> Option<(u32, u32)> {
    let mut it = text.split_ascii_whitespace().map(str::parse::<u32>);
    let lo = it.next()?.ok()?;
    let hi = it.next()?.ok()?;
    (lo <= hi && hi <= 65535 && it.next().is_none()).then_some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::btf::testutil::{sample, Builder};
    use crate::sources::btf::KIND_STRUCT;

    /// `sk_flags` where 6.x keeps it (`sock_common.skc_flags`) and where
    /// older kernels did (`sock.sk_flags`).
    #[test]
    fn sk_flags_old_and_new() {
        for (case, in_common, want) in [("6.x", true, 8), ("before", false, 16)] {
            let mut b = Builder::new();
            let ulong = b.int("unsigned long", 8);
            let common_members: &[(&str, u32, u32, u32)] = if in_common {
                &[("skc_flags", ulong, 64, 0)]
            } else {
                &[]
            };
            let common = b.composite(KIND_STRUCT, "sock_common", 16, common_members);
            let mut members = vec![("__sk_common", common, 0, 0)];
            if !in_common {
                members.push(("sk_flags", ulong, 128, 0));
            }
            b.composite(KIND_STRUCT, "sock", 24, &members);
            let btf = KernelBtf::parse(b.build(), case).expect("parses");
            assert_eq!(sk_flags_offset(&btf).unwrap(), want, "{case}");
        }
        let e = sk_flags_offset(&sample()).unwrap_err().to_string();
        assert!(
            e.contains("sk_flags"),
            "the 4-byte bitfield of sample(): {e}"
        );
    }

    #[test]
    fn port_ranges() {
        let cases = [
            ("32768\t60999\n", Some((32768, 60999))),
            ("1024 65535", Some((1024, 65535))),
            ("60999 32768", None),
            ("1 70000", None),
            ("32768", None),
            ("a b", None),
            ("1 2 3", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_port_range(text), want, "{text:?}");
        }
    }
}
