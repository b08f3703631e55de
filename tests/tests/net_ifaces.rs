//! Interfaces and connections families, in namespaces the test creates:
//! Perch runs inside namespace `a` (`ip netns exec`), so it sees exactly the
//! namespace's `lo`, its veth and the test's own sockets, and its figures are
//! compared with the namespace's own counters.
//!
//! Privileged: run as root (`cargo xtask test`).

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use perch_tests::netns::NetnsPair;
use perch_tests::netperch::{collect_in_netns, collect_in_netns_env, if_stat};
use perch_tests::perch::{only, points, source, sum};

const DATAGRAMS: u64 = 1000;
const PAYLOAD: usize = 200;

/// A fresh pair with IPv6 off in both namespaces: no router solicitations
/// or MLD reports that would move the counters on their own.
fn quiet_pair() -> NetnsPair {
    let p = NetnsPair::new();
    for ns in [&p.a, &p.b] {
        p.exec(ns, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1");
    }
    p
}

/// Sends `DATAGRAMS` UDP datagrams of `PAYLOAD` bytes from `a` to a socket
/// bound in `b`, and waits until `b` received them all (so the counters of
/// both ends are final). Returns how many arrived.
fn udp_a_to_b(p: &NetnsPair) -> u64 {
    let dst = SocketAddr::from((p.ip_b, 9999));
    let (ready_tx, ready_rx) = mpsc::channel();
    let rx = p.run_in(&p.b, move || {
        let s = UdpSocket::bind(dst).expect("bind in b");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
        let mut n = 0;
        while n < DATAGRAMS && s.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    });
    ready_rx.recv().expect("receiver ready");
    p.run_in(&p.a, move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind in a");
        for _ in 0..DATAGRAMS {
            s.send_to(&[7u8; PAYLOAD], dst).expect("send_to");
            // Let the veth's peer keep up: its backlog would drop otherwise.
            std::thread::sleep(Duration::from_micros(50));
        }
    })
    .join()
    .expect("sender");
    rx.join().expect("receiver")
}

const COUNTERS: [(&str, &str, &str); 8] = [
    ("system.network.io", "receive", "rx_bytes"),
    ("system.network.io", "transmit", "tx_bytes"),
    ("system.network.packet.count", "receive", "rx_packets"),
    ("system.network.packet.count", "transmit", "tx_packets"),
    ("system.network.errors", "receive", "rx_errors"),
    ("system.network.errors", "transmit", "tx_errors"),
    ("system.network.packet.dropped", "receive", "rx_dropped"),
    ("system.network.packet.dropped", "transmit", "tx_dropped"),
];

/// Both sources (sysfs in `auto`, `/proc/net/dev` when sysfs is absent):
/// Perch's counters for the namespace's veth equal what
/// `/sys/class/net/<veth>/statistics` shows after Perch exits (nothing else
/// sends in the quiet namespace), and they include the workload's
/// datagrams: at least `DATAGRAMS` packets and `DATAGRAMS * (PAYLOAD + 42)`
/// bytes (UDP 8 + IPv4 20 + Ethernet 14 headers) more than before.
#[test]
fn interface_counters_match_sysfs() {
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("interfaces=auto", &[]),
        // No sysfs under this root: the collector reads /proc/net/dev.
        (
            "interfaces=procfs",
            &[("PERCH_SYS_ROOT", "/nonexistent-perch-sys")],
        ),
    ];
    for (mode, env) in cases {
        let p = quiet_pair();
        let before: Vec<u64> = COUNTERS
            .iter()
            .map(|(_, _, f)| if_stat(&p.a, &p.veth_a, f))
            .collect();
        let mut args = vec!["--probe", mode];
        args.extend(only(&["interfaces"]));
        let (snap, got) =
            collect_in_netns_env(&p.a, &args, env, Duration::from_secs(2), || udp_a_to_b(&p));
        assert_eq!(got, DATAGRAMS, "{mode}: datagrams received in b");
        assert_eq!(source(&snap, "interfaces"), "procfs", "{mode}");
        for ((metric, dir, file), b) in COUNTERS.iter().zip(&before) {
            let kernel = if_stat(&p.a, &p.veth_a, file);
            let filter = [
                ("network.interface.name", p.veth_a.as_str()),
                ("network.io.direction", *dir),
            ];
            let ours = sum(&snap, metric, &filter);
            println!("{mode} {metric} {dir}: perch {ours}, sysfs {kernel} (before {b})");
            assert_eq!(ours, kernel as f64, "{mode} {metric} {dir} vs {file}");
        }
        let tx_packets = if_stat(&p.a, &p.veth_a, "tx_packets") - before[3];
        let tx_bytes = if_stat(&p.a, &p.veth_a, "tx_bytes") - before[1];
        assert!(
            tx_packets >= DATAGRAMS,
            "{mode}: tx_packets grew {tx_packets}"
        );
        assert!(
            tx_bytes >= DATAGRAMS * (PAYLOAD as u64 + 42),
            "{mode}: tx_bytes grew {tx_bytes}"
        );
        // The namespace has lo and the veth, nothing else.
        let names: std::collections::BTreeSet<String> = points(&snap, "system.network.io")
            .iter()
            .map(|pt| {
                pt["attributes"]["network.interface.name"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        let want: std::collections::BTreeSet<String> =
            ["lo".to_owned(), p.veth_a.clone()].into_iter().collect();
        assert_eq!(names, want, "{mode}");
    }
}

fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("perch.toml");
    std::fs::write(&path, text).expect("writing config");
    (dir, path)
}

/// `exclude` drops the matching interfaces, `include` keeps only the
/// matching ones, in both sources.
#[test]
fn include_and_exclude_patterns() {
    let p = quiet_pair();
    let cases: &[(&str, &str, &[&str])] = &[
        ("exclude the veths", "exclude = [\"pv*\"]", &["lo"]),
        ("include only the veths", "include = [\"pv*\"]", &["veth"]),
        (
            "include all but exclude lo",
            "include = [\"*\"]\nexclude = [\"lo\"]",
            &["veth"],
        ),
    ];
    for (case, toml, want) in cases {
        let (_dir, path) = config_file(&format!("[probes.interfaces]\n{toml}\n"));
        let path = path.to_str().unwrap().to_owned();
        for env in [&[][..], &[("PERCH_SYS_ROOT", "/nonexistent-perch-sys")][..]] {
            let mut args = vec!["--config", path.as_str()];
            args.extend(only(&["interfaces"]));
            let (snap, ()) =
                collect_in_netns_env(&p.a, &args, env, Duration::from_millis(300), || ());
            let names: std::collections::BTreeSet<String> = points(&snap, "system.network.io")
                .iter()
                .map(|pt| {
                    let n = pt["attributes"]["network.interface.name"].as_str().unwrap();
                    if n == p.veth_a {
                        "veth".to_owned()
                    } else {
                        n.to_owned()
                    }
                })
                .collect();
            let want: std::collections::BTreeSet<String> =
                want.iter().map(|s| s.to_string()).collect();
            assert_eq!(names, want, "{case} {env:?}");
        }
    }
}

/// Connections: in a fresh namespace only the test's sockets exist. Open
/// `K` TCP listeners plus one that accepts `K` connections (so `K + 1`
/// listening and `2K` established sockets: each client and its accepted
/// socket), `K` bound UDP sockets and `K` connected ones, and check Perch's
/// gauge by transport and state exactly, with sock_diag (`auto`) and with
/// `/proc/net/*` (`procfs`).
#[test]
fn connection_counts_by_state() {
    const K: usize = 5;
    for mode in ["connections=auto", "connections=procfs"] {
        let p = quiet_pair();
        let (hold_tx, hold_rx) = mpsc::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let ip_a = p.ip_a;
        let sockets = p.run_in(&p.a, move || {
            let listeners: Vec<TcpListener> = (0..K)
                .map(|_| TcpListener::bind((ip_a, 0)).expect("listen"))
                .collect();
            // One more listener that accepts the K connections.
            let server = TcpListener::bind((ip_a, 0)).expect("listen");
            let addr = server.local_addr().unwrap();
            let clients: Vec<TcpStream> = (0..K)
                .map(|_| TcpStream::connect(addr).expect("connect"))
                .collect();
            let accepted: Vec<TcpStream> =
                (0..K).map(|_| server.accept().expect("accept").0).collect();
            let udp_bound: Vec<UdpSocket> = (0..K)
                .map(|_| UdpSocket::bind((ip_a, 0)).expect("udp bind"))
                .collect();
            let udp_connected: Vec<UdpSocket> = (0..K)
                .map(|_| {
                    let s = UdpSocket::bind((ip_a, 0)).expect("udp bind");
                    s.connect((ip_a, 9)).expect("udp connect");
                    s
                })
                .collect();
            ready_tx.send(()).unwrap();
            let _ = hold_rx.recv();
            drop((
                listeners,
                server,
                clients,
                accepted,
                udp_bound,
                udp_connected,
            ));
        });
        ready_rx.recv().expect("sockets ready");
        let mut args = vec!["--probe", mode];
        args.extend(only(&["connections"]));
        let (snap, ()) = collect_in_netns(&p.a, &args, Duration::from_millis(300), || ());
        hold_tx.send(()).unwrap();
        sockets.join().unwrap();
        assert_eq!(source(&snap, "connections"), "procfs", "{mode}");
        let count = |transport: &str, state: &str| {
            sum(
                &snap,
                "system.network.connection.count",
                &[
                    ("network.transport", transport),
                    ("network.connection.state", state),
                ],
            )
        };
        let cases = [
            ("tcp", "listen", K + 1),
            ("tcp", "established", 2 * K),
            ("udp", "none", K),
            ("udp", "established", K),
        ];
        for (transport, state, want) in cases {
            let got = count(transport, state);
            println!("{mode} {transport} {state}: {got} (want {want})");
            assert_eq!(got, want as f64, "{mode}: {transport} {state}");
        }
        let total: f64 = points(&snap, "system.network.connection.count")
            .iter()
            .map(|pt| pt["value"].as_f64().unwrap())
            .sum();
        assert_eq!(
            total,
            (K + 1 + 2 * K + 2 * K) as f64,
            "{mode}: no other sockets"
        );
    }
}

/// An interface whose name is not UTF-8 (Linux allows any byte but `/`,
/// `:`, NUL and whitespace) is reported, not left out, under the same
/// escaped name (`\xNN` per invalid byte) from sysfs and from
/// `/proc/net/dev`, with the kernel's counters.
#[test]
fn an_interface_named_with_non_utf8_bytes_is_reported_escaped() {
    let p = quiet_pair();
    let bash = |cmd: &str| {
        perch_tests::kernel::sh(&format!(
            "ip netns exec {} bash -c {}",
            p.a,
            shell_quote(cmd)
        ))
    };
    // A second veth pair, named with a 0xff byte on a's side, its peer in b.
    bash(&format!(
        "ip link add $'d\\xffx' type veth peer name pq{id} netns {b} && \
         ip addr add 10.250.0.1/24 dev $'d\\xffx' && ip link set $'d\\xffx' up",
        id = std::process::id() % 10_000,
        b = p.b
    ));
    p.exec(
        &p.b,
        &format!(
            "ip addr add 10.250.0.2/24 dev pq{id} && ip link set pq{id} up",
            id = std::process::id() % 10_000
        ),
    );
    bash("for i in $(seq 25); do echo perch > /dev/udp/10.250.0.2/9; done");
    let kernel = |file: &str| -> f64 {
        bash(&format!("cat /sys/class/net/$'d\\xffx'/statistics/{file}"))
            .trim()
            .parse()
            .unwrap()
    };
    for (mode, env) in [
        ("interfaces=auto", &[][..]),
        (
            "interfaces=procfs",
            &[("PERCH_SYS_ROOT", "/nonexistent-perch-sys")][..],
        ),
    ] {
        let mut args = vec!["--probe", mode];
        args.extend(only(&["interfaces"]));
        let (snap, ()) = collect_in_netns_env(&p.a, &args, env, Duration::from_millis(300), || ());
        let filter = [
            ("network.interface.name", "d\\xffx"),
            ("network.io.direction", "transmit"),
        ];
        let bytes = sum(&snap, "system.network.io", &filter);
        let packets = sum(&snap, "system.network.packet.count", &filter);
        println!("{mode}: d\\xffx transmit {bytes} B, {packets} packets");
        assert_eq!(packets, kernel("tx_packets"), "{mode}");
        assert_eq!(bytes, kernel("tx_bytes"), "{mode}");
        assert!(packets >= 25.0, "{mode}: {packets}");
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
