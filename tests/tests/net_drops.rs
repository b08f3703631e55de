//! Drops family: drops of a known kind induced in a namespace the test
//! creates, compared with the kernel's own counters, in eBPF mode and in
//! forced-procfs mode.
//!
//! eBPF counts every namespace of the host, so its figure is checked as at
//! least the namespace's own counter (other tests on the host may drop
//! packets meanwhile); the fallback reads the namespace's own `/proc/net`,
//! so it must equal the namespace's counter exactly.
//!
//! Privileged: run as root (`cargo xtask test`).

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use perch_tests::kernel::sh;
use perch_tests::netns::NetnsPair;
use perch_tests::netperch::{collect_in_netns, snmp};
use perch_tests::perch::{self, points, source, sum};

const N: u64 = 500;
fn quiet_pair() -> NetnsPair {
    let p = NetnsPair::new();
    for ns in [&p.a, &p.b] {
        p.exec(ns, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1");
    }
    p
}

/// Sends `N` UDP datagrams from namespace `a` to `dst`, paced so that no
/// backlog overflows on the way.
fn udp_from_a(p: &NetnsPair, dst: SocketAddr) {
    p.run_in(&p.a, move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind in a");
        for _ in 0..N {
            s.send_to(&[1u8; 64], dst).expect("send_to");
            std::thread::sleep(Duration::from_micros(100));
        }
        // Let the last ones reach b's stack.
        std::thread::sleep(Duration::from_millis(100));
    })
    .join()
    .expect("sender");
}

/// `mode` for the drops family, every other family off.
fn args(mode: &str) -> Vec<&str> {
    let mut a = vec!["--probe", mode];
    a.extend(perch::only(&["drops"]));
    a
}

/// UDP to a port of `b` with no socket: every datagram is freed with
/// `SKB_DROP_REASON_NO_SOCKET` and counted in `b`'s `Udp NoPorts`.
#[test]
fn udp_to_a_closed_port_is_no_socket() {
    // eBPF on tp_btf, eBPF on raw_tp (`--skip-hook tp_btf`), procfs.
    for (mode, skip) in [
        ("drops=ebpf", false),
        ("drops=ebpf", true),
        ("drops=procfs", false),
    ] {
        let p = quiet_pair();
        let dst = SocketAddr::from((p.ip_b, 40999));
        let before = snmp(&p.b, "snmp", "Udp", "NoPorts");
        let mut a = args(mode);
        if skip {
            a.extend(["--skip-hook", "tp_btf"]);
        }
        let (snap, ()) = collect_in_netns(&p.b, &a, Duration::from_secs(2), || udp_from_a(&p, dst));
        let after = snmp(&p.b, "snmp", "Udp", "NoPorts");
        let kernel = (after - before) as f64;
        let ours = sum(
            &snap,
            "perch.network.packet.drops",
            &[("perch.drop.reason", "no_socket")],
        );
        println!("{mode}: no_socket {ours}, namespace Udp NoPorts {before} -> {after}");
        assert_eq!(
            kernel, N as f64,
            "{mode}: the namespace's own NoPorts counts every datagram"
        );
        if mode == "drops=ebpf" {
            assert_eq!(source(&snap, "drops"), "ebpf");
            let hook = perch::plan_entry(&snap, "drops")["hook"]
                .as_str()
                .map(str::to_owned);
            assert_eq!(
                hook.as_deref(),
                Some(if skip { "raw_tp" } else { "tp_btf" })
            );
            assert!(
                ours >= kernel,
                "{mode}: no_socket {ours} < NoPorts delta {kernel}"
            );
        } else {
            assert_eq!(source(&snap, "drops"), "procfs");
            // The fallback reads b's own counter, which started at 0 with b.
            assert_eq!(ours, after as f64, "{mode}");
        }
        let reasons: Vec<String> = points(&snap, "perch.network.packet.drops")
            .iter()
            .map(|pt| {
                pt["attributes"]["perch.drop.reason"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        for skipped in ["not_specified", "consumed", "not_dropped_yet"] {
            assert!(
                !reasons.iter().any(|r| r == skipped),
                "{mode}: {skipped} reported: {reasons:?}"
            );
        }
    }
}

/// The path of kernels whose `kfree_skb` has no reason (before 5.17),
/// forced with `probes.drops.by = "protocol"`: the same closed-port
/// datagrams count as `perch.drop.reason = "unknown"` with `network.type
/// = "ipv4"`, at least once each (the host's other frees count too: that
/// is the documented loss), and no reason is invented.
#[test]
fn without_a_reason_drops_count_by_protocol() {
    let cfg = perch::ConfigFile::new("[probes.drops]\nby = \"protocol\"\n");
    let path = cfg.path();
    for hook in ["tp_btf", "raw_tp"] {
        let p = quiet_pair();
        let dst = SocketAddr::from((p.ip_b, 40999));
        let before = snmp(&p.b, "snmp", "Udp", "NoPorts");
        let mut a = args("drops=ebpf");
        a.extend(["--config", path]);
        if hook == "raw_tp" {
            a.extend(["--skip-hook", "tp_btf"]);
        }
        let (snap, ()) = collect_in_netns(&p.b, &a, Duration::from_secs(2), || udp_from_a(&p, dst));
        let kernel = (snmp(&p.b, "snmp", "Udp", "NoPorts") - before) as f64;
        assert_eq!(kernel, N as f64, "{hook}: the namespace's NoPorts");
        let entry = perch::plan_entry(&snap, "drops");
        assert_eq!(source(&snap, "drops"), "ebpf", "{hook}: {entry}");
        assert_eq!(entry["hook"].as_str(), Some(hook));
        let reason = entry["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("probes.drops.by") && reason.contains("by L3 protocol"),
            "{hook}: the plan does not say drops count by protocol: `{reason}`"
        );
        let ipv4 = sum(
            &snap,
            "perch.network.packet.drops",
            &[("perch.drop.reason", "unknown"), ("network.type", "ipv4")],
        );
        println!("{hook}: unknown/ipv4 {ipv4}, namespace Udp NoPorts +{kernel}");
        assert!(
            ipv4 >= kernel,
            "{hook}: ipv4 drops {ipv4} < NoPorts delta {kernel}"
        );
        for pt in points(&snap, "perch.network.packet.drops") {
            let attrs = &pt["attributes"];
            assert_eq!(attrs["perch.drop.reason"].as_str(), Some("unknown"), "{pt}");
            let t = attrs["network.type"].as_str();
            assert!(matches!(t, Some("ipv4" | "ipv6" | "other")), "{pt}");
        }
    }
}

/// An iptables DROP rule in `b`: every datagram it matches is freed with
/// `SKB_DROP_REASON_NETFILTER_DROP`; the rule's own packet counter is the
/// reference. The fallback has no counter for it and must not invent one.
#[test]
fn iptables_drop_is_netfilter_drop() {
    for mode in ["drops=ebpf", "drops=procfs"] {
        let p = quiet_pair();
        let port = 40998;
        p.exec(
            &p.b,
            &format!("iptables -A INPUT -p udp --dport {port} -j DROP"),
        );
        let dst = SocketAddr::from((p.ip_b, port));
        let (snap, ()) = collect_in_netns(&p.b, &args(mode), Duration::from_secs(2), || {
            udp_from_a(&p, dst)
        });
        let listing = sh(&format!("ip netns exec {} iptables -L INPUT -v -x -n", p.b));
        let rule_pkts: f64 = listing
            .lines()
            .find(|l| l.contains("DROP") && l.contains(&format!("dpt:{port}")))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("the DROP rule's counter in:\n{listing}"));
        assert_eq!(
            rule_pkts, N as f64,
            "{mode}: the rule matched every datagram"
        );
        let ours = sum(
            &snap,
            "perch.network.packet.drops",
            &[("perch.drop.reason", "netfilter_drop")],
        );
        println!("{mode}: netfilter_drop {ours}, iptables rule counter {rule_pkts}");
        if mode == "drops=ebpf" {
            assert!(
                ours >= rule_pkts,
                "{mode}: netfilter_drop {ours} < rule counter {rule_pkts}"
            );
        } else {
            assert!(
                points(&snap, "perch.network.packet.drops")
                    .iter()
                    .all(|pt| pt["attributes"]["perch.drop.reason"] != "netfilter_drop"),
                "{mode}: the fallback has no netfilter counter"
            );
        }
    }
}
