//! TCP family against what the workload did and the namespaces' own
//! `/proc/net/snmp`, with the real programs loaded (eBPF mode) and with the
//! family forced to its fallback (procfs mode, perch running inside the
//! client's namespace so `/proc/net/snmp` is that namespace's).
//!
//! The kernel hooks are global: eBPF-mode assertions on per-peer series
//! filter by the test namespaces' own addresses, which nothing else uses.
//! Host-wide series (lifecycle counters, histograms) may also see other
//! activity on the machine; those tests bound the excess by the `ActiveOpens`
//! / `AttemptFails` deltas of every namespace during the window.
//!
//! Server ports are below 32768 so the export pipeline never folds them into
//! `"ephemeral"`. Privileged: run as root. The tests in this file run one at
//! a time (a lock) so they do not see each other's connections.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use perch_tests::kernel::{require_root, sh};
use perch_tests::netns::NetnsPair;
use perch_tests::netperch::snmp;
use perch_tests::perch::{points, source, sum};

static SERIAL: Mutex<()> = Mutex::new(());

fn collect<T>(
    args: &[&str],
    window: Duration,
    during: impl FnOnce() -> T,
) -> (serde_json::Value, T) {
    perch_tests::perch::collect(args, window, during)
}

fn collect_in_netns<T>(
    ns: &str,
    args: &[&str],
    window: Duration,
    during: impl FnOnce() -> T,
) -> (serde_json::Value, T) {
    perch_tests::netperch::collect_in_netns(ns, args, window, during)
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A server port below the ephemeral range, distinct per call.
fn port(n: u16) -> u16 {
    20000 + (std::process::id() % 5000) as u16 + n
}

/// Binds a listener in namespace `b` on `ip_b:port`.
fn listen(pair: &NetnsPair, port: u16) -> TcpListener {
    let addr = SocketAddrV4::new(pair.ip_b, port);
    pair.run_in(&pair.b, move || TcpListener::bind(addr).expect("bind in b"))
        .join()
        .expect("bind thread")
}

/// Serves `conns` connections: reads each to EOF, returns the byte counts.
fn serve(pair: &NetnsPair, l: TcpListener, conns: usize) -> std::thread::JoinHandle<Vec<u64>> {
    pair.run_in(&pair.b, move || {
        (0..conns)
            .map(|_| {
                let (mut s, _) = l.accept().expect("accept");
                let mut buf = vec![0u8; 64 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => n += k as u64,
                        Err(e) => panic!("server read: {e}"),
                    }
                }
                n
            })
            .collect()
    })
}

/// From namespace `a`: connects to `ip_b:port` and sends `bytes` bytes
/// with `write_all`, then closes. Returns bytes sent.
fn send_from_a(pair: &NetnsPair, ip: Ipv4Addr, port: u16, bytes: u64) -> u64 {
    pair.run_in(&pair.a, move || {
        let mut s = TcpStream::connect(SocketAddrV4::new(ip, port)).expect("connect");
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            s.write_all(&chunk[..k]).expect("write");
            left -= k as u64;
        }
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        // Wait for the server's close so the whole transfer is acked.
        let mut b = [0u8; 1];
        let _ = s.read(&mut b);
        bytes
    })
    .join()
    .expect("client thread")
}

/// `Tcp <name>` summed over the root namespace and every named namespace:
/// an upper bound for host-wide activity.
fn all_ns_tcp(name: &str) -> i64 {
    let mut total = root_tcp(name);
    for ns in sh("ip netns list").lines() {
        let ns = ns.split_whitespace().next().unwrap_or("");
        if ns.is_empty() {
            continue;
        }
        // A namespace removed meanwhile is simply skipped.
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
            .output();
        if let Ok(o) = out {
            total += tcp_field(&String::from_utf8_lossy(&o.stdout), name).unwrap_or(0);
        }
    }
    total
}

fn root_tcp(name: &str) -> i64 {
    let text = std::fs::read_to_string("/proc/net/snmp").expect("/proc/net/snmp");
    tcp_field(&text, name).expect("Tcp field")
}

fn tcp_field(text: &str, name: &str) -> Option<i64> {
    let mut rows = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (rows.next()?, rows.next()?);
    let i = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

fn hist_count(snap: &serde_json::Value, name: &str, filter: &[(&str, &str)]) -> u64 {
    points(snap, name)
        .into_iter()
        .filter(|p| {
            filter.iter().all(|(k, v)| {
                let a = &p["attributes"][*k];
                a.as_str()
                    .map(|s| s == *v)
                    .unwrap_or_else(|| a.as_i64().is_some_and(|n| v.parse::<i64>() == Ok(n)))
            }) && (!filter.is_empty() || p["attributes"].as_object().is_none_or(|o| o.is_empty()))
        })
        .map(|p| p["count"].as_u64().expect("count"))
        .sum()
}

/// eBPF: a client in `a` sends exactly N bytes to a server in `b`.
/// `perch.tcp.io` for peer `ip_b`, the server port, role client, transmit
/// is exactly N (payload bytes returned by send); the server's receive
/// series for peer `ip_a` is exactly N; nothing flows the other way.
#[test]
fn tcp_io_is_exact_payload_bytes_ebpf() {
    require_root();
    let _g = serial();
    const N: u64 = 3_000_017;
    let pair = NetnsPair::new();
    let p = port(1);
    let l = listen(&pair, p);
    let (snap, (sent, got)) = collect(&["--probe", "tcp=ebpf"], Duration::from_secs(3), || {
        let server = serve(&pair, l, 1);
        let sent = send_from_a(&pair, pair.ip_b, p, N);
        (sent, server.join().expect("server")[0])
    });
    assert_eq!(source(&snap, "tcp"), "ebpf");
    assert_eq!((sent, got), (N, N), "the workload itself");
    let port_s = p.to_string();
    let (ip_a, ip_b) = (pair.ip_a.to_string(), pair.ip_b.to_string());
    let io = |peer: &str, role: &str, dir: &str| {
        sum(
            &snap,
            "perch.tcp.io",
            &[
                ("network.peer.address", peer),
                ("server.port", &port_s),
                ("perch.tcp.role", role),
                ("network.io.direction", dir),
            ],
        )
    };
    let cases = [
        ("client transmit", io(&ip_b, "client", "transmit"), N),
        ("server receive", io(&ip_a, "server", "receive"), N),
        ("client receive", io(&ip_b, "client", "receive"), 0),
        ("server transmit", io(&ip_a, "server", "transmit"), 0),
    ];
    for (case, got, want) in cases {
        assert_eq!(got, want as f64, "perch.tcp.io {case}");
    }
    eprintln!(
        "perch.tcp.io: client transmit {} B, server receive {} B, sent {N} B",
        cases[0].1, cases[1].1
    );
    // The ephemeral port never appears as an attribute value.
    for p in points(&snap, "perch.tcp.io") {
        let attrs = p["attributes"].as_object().expect("attributes");
        assert!(
            !attrs.contains_key("client.port") && !attrs.contains_key("network.local.port"),
            "{p}"
        );
    }
}

/// eBPF: K connections, R of them to a closed port. Opened client series,
/// connect-duration count, and refused series against what the test did;
/// the excess is bounded by what every namespace's own counters saw.
#[test]
fn tcp_lifecycle_counts_ebpf() {
    require_root();
    let _g = serial();
    const K: usize = 40;
    const R: usize = 7;
    let pair = NetnsPair::new();
    let p = port(2);
    let closed = port(3);
    let l = listen(&pair, p);
    let opens0 = all_ns_tcp("ActiveOpens");
    let fails0 = all_ns_tcp("AttemptFails");
    let (snap, refused) = collect(&["--probe", "tcp=ebpf"], Duration::from_secs(4), || {
        let server = serve(&pair, l, K);
        for _ in 0..K {
            send_from_a(&pair, pair.ip_b, p, 100);
        }
        server.join().expect("server");
        let ip = pair.ip_b;
        pair.run_in(&pair.a, move || {
            (0..R)
                .filter(|_| {
                    matches!(
                        TcpStream::connect(SocketAddrV4::new(ip, closed)),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
                    )
                })
                .count()
        })
        .join()
        .expect("refused thread")
    });
    let opens = (all_ns_tcp("ActiveOpens") - opens0) as f64;
    let fails = (all_ns_tcp("AttemptFails") - fails0) as f64;
    assert_eq!(source(&snap, "tcp"), "ebpf");
    assert_eq!(refused, R, "every connect to the closed port was refused");

    let opened = sum(
        &snap,
        "perch.tcp.connections.opened",
        &[("perch.tcp.role", "client")],
    );
    let accepted = sum(
        &snap,
        "perch.tcp.connections.opened",
        &[("perch.tcp.role", "server")],
    );
    let dur = hist_count(&snap, "perch.tcp.connect.duration", &[]) as f64;
    let refused_n = sum(
        &snap,
        "perch.tcp.connections.failed",
        &[("error.type", "refused")],
    );
    eprintln!(
        "connections: made {K}, opened client {opened}, server {accepted}, connect.duration count {dur}; \
         refused made {R}, counted {refused_n}; all-namespace ActiveOpens delta {opens}, AttemptFails delta {fails}"
    );
    assert_eq!(
        dur, opened,
        "one connect duration per client connection established"
    );
    assert!(opened >= K as f64, "opened client {opened} < {K}");
    assert!(accepted >= K as f64, "opened server {accepted} < {K}");
    // Whatever else connected meanwhile is in some namespace's ActiveOpens.
    assert!(
        opened <= opens,
        "opened {opened} > all-namespace ActiveOpens delta {opens}"
    );
    assert!(refused_n >= R as f64, "refused {refused_n} < {R}");
    assert!(
        refused_n <= fails,
        "refused {refused_n} > all-namespace AttemptFails delta {fails}"
    );
    let h = points(&snap, "perch.tcp.connect.duration");
    let mean = h[0]["sum"].as_f64().expect("sum") / dur;
    assert!(
        mean > 0.0 && mean < 0.5,
        "mean connect duration {mean} s on a veth is implausible"
    );
}

/// Installs `statistic --mode random` loss on traffic to `port` in `ns`.
fn add_loss(pair: &NetnsPair, ns: &str, port: u16) {
    pair.exec(
        ns,
        &format!(
            "iptables -A INPUT -p tcp --dport {port} -m statistic --mode random --probability 0.05 -j DROP"
        ),
    );
}

fn require_iptables() {
    let ok = std::process::Command::new("iptables")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "iptables is required for the loss tests: apt-get install iptables"
    );
}

/// eBPF: with 5 % of the data segments dropped on the server's input,
/// retransmits counted for peer `ip_b` match namespace `a`'s own
/// `RetransSegs` delta within 2 %.
#[test]
fn tcp_retransmits_match_netns_snmp_ebpf() {
    require_root();
    require_iptables();
    let _g = serial();
    let pair = NetnsPair::new();
    let p = port(4);
    add_loss(&pair, &pair.b, p);
    let l = listen(&pair, p);
    let (snap, delta) = collect(&["--probe", "tcp=ebpf"], Duration::from_secs(8), || {
        let before = snmp(&pair.a, "snmp", "Tcp", "RetransSegs");
        let server = serve(&pair, l, 1);
        let t = Instant::now();
        send_from_a(&pair, pair.ip_b, p, 4 << 20);
        server.join().expect("server");
        assert!(
            t.elapsed() < Duration::from_secs(7),
            "transfer overran the window"
        );
        snmp(&pair.a, "snmp", "Tcp", "RetransSegs") - before
    });
    assert_eq!(source(&snap, "tcp"), "ebpf");
    let ip_b = pair.ip_b.to_string();
    let counted = sum(
        &snap,
        "perch.tcp.retransmits",
        &[("network.peer.address", &ip_b)],
    );
    let delta = delta as f64;
    eprintln!("retransmits: perch {counted}, netns a RetransSegs delta {delta}");
    assert!(
        delta > 20.0,
        "the loss rule caused too few retransmits ({delta}) to compare"
    );
    let err = (counted - delta).abs() / delta;
    assert!(
        err <= 0.02,
        "perch {counted} vs RetransSegs delta {delta}: {:.2} % apart",
        err * 100.0
    );
}

/// eBPF, `rtt_per_peer`: a connection that stays open beyond perch's window,
/// exchanging a message every 20 ms. The RTT histogram has samples for the
/// peer before the connection closes, about one per 100 ms of activity.
#[test]
fn tcp_rtt_is_sampled_during_the_connection_ebpf() {
    require_root();
    let _g = serial();
    let pair = NetnsPair::new();
    let p = port(5);
    let l = listen(&pair, p);
    let cfg = tempfile::NamedTempFile::new().expect("temp config");
    std::fs::write(cfg.path(), "[probes.tcp]\nrtt_per_peer = true\n").expect("write config");
    let cfg_path = cfg.path().to_str().expect("utf-8 path").to_owned();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let window = Duration::from_secs(3);
    let (snap, (client, server)) = collect(
        &["--probe", "tcp=ebpf", "--config", &cfg_path],
        window,
        || {
            let server = pair.run_in(&pair.b, move || {
                let (mut s, _) = l.accept().expect("accept");
                let mut b = [0u8; 64];
                while let Ok(n @ 1..) = s.read(&mut b) {
                    s.write_all(&b[..n]).expect("echo");
                }
            });
            let ip = pair.ip_b;
            let stop2 = stop.clone();
            let client = pair.run_in(&pair.a, move || {
                let mut s = TcpStream::connect(SocketAddrV4::new(ip, p)).expect("connect");
                let mut b = [0u8; 64];
                let mut rounds = 0u32;
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    s.write_all(&[1u8; 64]).expect("send");
                    s.read_exact(&mut b).expect("echo back");
                    rounds += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                rounds
            });
            (client, server)
        },
    );
    // perch has exited; the connection is still open.
    assert!(
        !client.is_finished(),
        "the connection closed before perch's snapshot"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = client.join().expect("client");
    server.join().expect("server");
    assert_eq!(source(&snap, "tcp"), "ebpf");
    let ip_b = pair.ip_b.to_string();
    let port_s = p.to_string();
    let filter = [
        ("network.peer.address", ip_b.as_str()),
        ("server.port", &port_s),
        ("perch.tcp.role", "client"),
    ];
    let n = hist_count(&snap, "perch.tcp.rtt", &filter);
    let host = hist_count(&snap, "perch.tcp.rtt", &[]);
    eprintln!("rtt: {n} samples for the peer over a {window:?} window ({rounds} round trips), {host} host-wide");
    // ~3 s of activity at one sample per 100 ms per socket.
    assert!(
        n >= 10,
        "only {n} RTT samples for a live connection over {window:?}"
    );
    assert!(n <= 40, "{n} RTT samples: more than one per 100 ms");
    assert!(host >= n, "host-wide {host} < per-peer {n}");
    let pt = points(&snap, "perch.tcp.rtt")
        .into_iter()
        .find(|p| {
            p["attributes"]["network.peer.address"] == ip_b.as_str()
                && p["attributes"]["perch.tcp.role"] == "client"
        })
        .expect("per-peer rtt point");
    let mean = pt["sum"].as_f64().expect("sum") / n as f64;
    assert!(
        mean > 0.0 && mean < 0.1,
        "mean srtt {mean} s on a veth is implausible"
    );
}

/// procfs: perch runs inside namespace `a`; its counters are `a`'s own
/// `/proc/net/snmp`: ActiveOpens (every connect attempt, refused ones
/// included), AttemptFails, RetransSegs. There is no `perch.tcp.io`.
#[test]
fn tcp_procfs_is_the_namespace_snmp() {
    require_root();
    require_iptables();
    let _g = serial();
    const K: usize = 12;
    const R: usize = 5;
    let pair = NetnsPair::new();
    let p = port(6);
    let closed = port(7);
    add_loss(&pair, &pair.b, p);
    let l = listen(&pair, p);
    let (snap, ()) = collect_in_netns(
        &pair.a,
        &["--probe", "tcp=procfs"],
        Duration::from_secs(8),
        || {
            let server = serve(&pair, l, K);
            for i in 0..K {
                send_from_a(&pair, pair.ip_b, p, if i == 0 { 8 << 20 } else { 1000 });
            }
            server.join().expect("server");
            let ip = pair.ip_b;
            pair.run_in(&pair.a, move || {
                for _ in 0..R {
                    assert!(TcpStream::connect(SocketAddrV4::new(ip, closed)).is_err());
                }
            })
            .join()
            .expect("refused thread");
        },
    );
    assert_eq!(source(&snap, "tcp"), "procfs");
    let kernel = |name| snmp(&pair.a, "snmp", "Tcp", name) as f64;
    let retrans = sum(&snap, "perch.tcp.retransmits", &[]);
    let (ao, af, rs) = (
        kernel("ActiveOpens"),
        kernel("AttemptFails"),
        kernel("RetransSegs"),
    );
    eprintln!("procfs: perch retransmits {retrans}, netns RetransSegs {rs}; ActiveOpens {ao}, AttemptFails {af}");
    let cases = [
        (
            "opened client = ActiveOpens",
            sum(
                &snap,
                "perch.tcp.connections.opened",
                &[("perch.tcp.role", "client")],
            ),
            (K + R) as f64,
        ),
        (
            "opened server = PassiveOpens (none in a)",
            sum(
                &snap,
                "perch.tcp.connections.opened",
                &[("perch.tcp.role", "server")],
            ),
            0.0,
        ),
        (
            "failed attempt_failed = AttemptFails",
            sum(
                &snap,
                "perch.tcp.connections.failed",
                &[("error.type", "attempt_failed")],
            ),
            R as f64,
        ),
        ("ActiveOpens itself", ao, (K + R) as f64),
        ("AttemptFails itself", af, R as f64),
    ];
    for (case, got, want) in cases {
        assert_eq!(got, want, "{case}");
    }
    // Loss hits GSO super-packets, so a few MiB give only a handful of
    // retransmits here; the counter is read from the same file either way.
    assert!(rs > 0.0, "the loss rule caused no retransmits");
    let err = (retrans - rs).abs() / rs;
    assert!(
        err <= 0.02,
        "perch {retrans} vs netns RetransSegs {rs}: {:.2} % apart",
        err * 100.0
    );
    assert!(
        points(&snap, "perch.tcp.io").is_empty(),
        "perch.tcp.io exists only in eBPF mode"
    );
    assert!(
        points(&snap, "perch.tcp.connect.duration").is_empty(),
        "no histogram in procfs mode"
    );
}
