//! `/proc/net/{tcp,tcp6,udp,udp6}`: one line per socket of the reader's
//! network namespace (`net/ipv4/tcp_ipv4.c` `tcp4_seq_show`,
//! `net/ipv6/tcp_ipv6.c`, `net/ipv4/udp.c`). The procfs fallback for TCP
//! connection counts by state.
//!
//! ```text
//!   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
//!    0: 0100007F:1F90 00000000:0000 0A 00000000:00000001 00:00000000 00000000     0        0 21751 ...
//! ```
//!
//! Addresses are the raw `__be32` words printed with `%08X`, that is as the
//! CPU reads them: host byte order per 32-bit word. `127.0.0.1` is
//! `0100007F` on little-endian hosts and `7F000001` on big-endian ones; an
//! IPv6 address is four such words. Ports are `%04X` of the host-order
//! port, so `1F90` is 8080 everywhere.
//!
//! IPv4-mapped peers of an IPv6 socket (`::ffff:127.0.0.1`) stay IPv6
//! addresses here; [`std::net::Ipv6Addr::to_ipv4_mapped`] unwraps them.
//! Fields after `inode` (refcount, pointer, timers, `drops` for UDP) differ
//! between files and are ignored.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::sources::{dec_u64, hex_u64, ProcError};

/// One socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketEntry {
    /// Local address and port.
    pub local: SocketAddr,
    /// Remote address and port (`0.0.0.0:0` / `[::]:0` when unconnected).
    pub remote: SocketAddr,
    /// `TCP_*` state number (see [`tcp_state_name`]); UDP uses 7 (`TCP_CLOSE`)
    /// for unconnected and 1 for connected sockets.
    pub state: u8,
    /// TCP: bytes sent but not yet acknowledged (`write_seq - snd_una`).
    /// UDP: bytes of send buffer in use.
    pub tx_queue: u64,
    /// TCP listener: connections waiting in the accept queue. Other TCP
    /// sockets: bytes received but not yet read (a received FIN counts 1).
    /// UDP: bytes of receive buffer in use (skb truesize, not payload).
    pub rx_queue: u64,
    /// Owner's uid (in the reader's user namespace).
    pub uid: u32,
    /// Socket inode; 0 for TIME_WAIT (and orphaned FIN_WAIT2) mini-sockets and a
    /// connection still in a listener's accept queue.
    pub inode: u64,
}

/// `TCP_ESTABLISHED`.
pub const TCP_ESTABLISHED: u8 = 1;
/// `TCP_TIME_WAIT`.
pub const TCP_TIME_WAIT: u8 = 6;
/// `TCP_CLOSE`: also every unconnected UDP socket.
pub const TCP_CLOSE: u8 = 7;
/// `TCP_LISTEN`.
pub const TCP_LISTEN: u8 = 10;

/// The OpenTelemetry `network.connection.state` value for a TCP state number
/// (`include/net/tcp_states.h`): lower-case, `close` for `TCP_CLOSE`.
///
/// 12, `TCP_NEW_SYN_RECV`, is a request socket for a connection in the
/// SYN_RECV phase; it maps to `"syn_recv"`, as the kernel itself does when
/// printing it here (`get_openreq4` prints `TCP_SYN_RECV`), so the file
/// never shows 12 and other sources (eBPF, sock_diag) agree with it.
/// 13, `TCP_BOUND_INACTIVE` (recent kernels), is a bound socket that never listened
/// or connected; it is not a connection, is never listed here, and maps to
/// `None`, like 0 and anything unknown.
pub fn tcp_state_name(state: u8) -> Option<&'static str> {
    Some(match state {
        1 => "established",
        2 => "syn_sent",
        3 | 12 => "syn_recv",
        4 => "fin_wait_1",
        5 => "fin_wait_2",
        6 => "time_wait",
        7 => "close",
        8 => "close_wait",
        9 => "last_ack",
        10 => "listen",
        11 => "closing",
        _ => return None,
    })
}

/// How the kernel's address words are laid out in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WordOrder {
    Little,
    Big,
}

impl WordOrder {
    const NATIVE: Self = if cfg!(target_endian = "big") {
        Self::Big
    } else {
        Self::Little
    };

    fn bytes(self, word: u32) -> [u8; 4] {
        match self {
            Self::Little => word.to_le_bytes(),
            Self::Big => word.to_be_bytes(),
        }
    }
}

/// Parse `/proc/net/tcp`, `tcp6`, `udp` or `udp6` text written by the
/// running kernel (so in this host's byte order); `file` names it in errors.
///
/// The header line is required; a row with fewer than 10 fields (through
/// `inode`), a bad address or number is malformed.
pub fn parse_net_sockets(text: &str, file: &str) -> Result<Vec<SocketEntry>, ProcError> {
    parse_with_order(text, file, WordOrder::NATIVE)
}

fn parse_with_order(
    text: &str,
    file: &str,
    order: WordOrder,
) -> Result<Vec<SocketEntry>, ProcError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty());
    match lines.next() {
        Some((_, hdr)) if hdr.split_ascii_whitespace().next() == Some("sl") => {}
        Some((n, _)) => {
            return Err(ProcError::malformed(
                file,
                n,
                "expected the \"sl local_address ...\" header",
            ))
        }
        None => return Err(ProcError::missing(file, "the header line")),
    }
    lines
        .map(|(n, line)| parse_row(line, file, n, order))
        .collect()
}

fn parse_row(line: &str, file: &str, n: usize, order: WordOrder) -> Result<SocketEntry, ProcError> {
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    let &[sl, local, remote, st, queues, _timer, _retrnsmt, uid, _timeout, inode, ..] =
        fields.as_slice()
    else {
        return Err(ProcError::malformed(
            file,
            n,
            format!("{} fields, expected at least 10", fields.len()),
        ));
    };
    if !sl.ends_with(':') {
        return Err(ProcError::malformed(
            file,
            n,
            format!("slot: expected \"N:\", found {sl:?}"),
        ));
    }
    let local = addr(local, file, n, "local address", order)?;
    let remote = addr(remote, file, n, "remote address", order)?;
    if local.is_ipv4() != remote.is_ipv4() {
        return Err(ProcError::malformed(
            file,
            n,
            "local and remote address families differ",
        ));
    }
    let state = u8::try_from(hex_u64(st, file, n, "state")?)
        .map_err(|_| ProcError::malformed(file, n, format!("state {st:?} out of range")))?;
    let Some((tx, rx)) = queues.split_once(':') else {
        return Err(ProcError::malformed(
            file,
            n,
            format!("queues: expected tx:rx, found {queues:?}"),
        ));
    };
    let uid = u32::try_from(dec_u64(uid, file, n, "uid")?)
        .map_err(|_| ProcError::malformed(file, n, format!("uid {uid} out of range")))?;
    Ok(SocketEntry {
        local,
        remote,
        state,
        tx_queue: hex_u64(tx, file, n, "tx_queue")?,
        rx_queue: hex_u64(rx, file, n, "rx_queue")?,
        uid,
        inode: dec_u64(inode, file, n, "inode")?,
    })
}

/// `HHHHHHHH:PPPP` (IPv4) or 32 hex digits `:PPPP` (IPv6).
fn addr(
    tok: &str,
    file: &str,
    n: usize,
    what: &str,
    order: WordOrder,
) -> Result<SocketAddr, ProcError> {
    let bad = |why: &str| ProcError::malformed(file, n, format!("{what} {tok:?}: {why}"));
    let (ip, port) = tok
        .split_once(':')
        .ok_or_else(|| bad("expected ADDR:PORT"))?;
    if port.len() != 4 {
        return Err(bad("port is not 4 hex digits"));
    }
    let port =
        u16::try_from(hex_u64(port, file, n, what)?).map_err(|_| bad("port out of range"))?;
    let word = |hex: &str| -> Result<[u8; 4], ProcError> {
        // 8 hex digits always fit a u32.
        let v =
            u32::try_from(hex_u64(hex, file, n, what)?).map_err(|_| bad("word out of range"))?;
        Ok(order.bytes(v))
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut b = [0u8; 16];
            for (chunk, i) in b.chunks_exact_mut(4).zip(0..) {
                let start = i * 8;
                let hex = ip.get(start..start + 8).ok_or_else(|| bad("not hex"))?;
                chunk.copy_from_slice(&word(hex)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return Err(bad("address is neither 8 nor 32 hex digits")),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::testutil::{assert_err, Want};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    macro_rules! fixture {
        ($p:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/procfs/",
                $p
            ))
        };
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// (local, remote, state, tx_queue, rx_queue, uid, inode)
    type Row = (&'static str, &'static str, u8, u64, u64, u32, u64);

    fn e(r: &Row) -> SocketEntry {
        SocketEntry {
            local: sa(r.0),
            remote: sa(r.1),
            state: r.2,
            tx_queue: r.3,
            rx_queue: r.4,
            uid: r.5,
            inode: r.6,
        }
    }

    /// The captured files were written on x86_64 (little-endian); the
    /// s390x ones reproduce a big-endian host. Both are parsed with their
    /// own byte order, so this test holds on any host.
    #[test]
    fn fixtures() {
        let cases: &[(&str, &str, WordOrder, &[Row])] = &[
            (
                "linux-6.18 tcp (captured): listeners, established, TIME_WAIT, FIN_WAIT2/CLOSE_WAIT, accept queue",
                fixture!("linux-6.18/tcp"),
                WordOrder::Little,
                &[
                    ("0.0.0.0:2024", "0.0.0.0:0", 10, 0, 0, 0, 1065),
                    ("127.0.0.1:8080", "0.0.0.0:0", 10, 0, 0, 0, 21751),
                    ("127.0.0.1:8080", "127.0.0.1:52724", 1, 0, 5, 0, 21754),
                    ("127.0.0.1:8080", "127.0.0.1:52736", 8, 0, 1, 0, 21762),
                    ("127.0.0.1:52724", "127.0.0.1:8080", 1, 0, 0, 0, 21753),
                    ("127.0.0.1:52734", "127.0.0.1:8080", 6, 0, 0, 0, 0),
                    ("127.0.0.1:52736", "127.0.0.1:8080", 5, 0, 0, 0, 0),
                    ("127.0.0.1:8080", "127.0.0.1:52730", 1, 0, 0, 0, 21758),
                ],
            ),
            (
                "linux-6.18 tcp6 (captured): ::1 and an IPv4-mapped peer",
                fixture!("linux-6.18/tcp6"),
                WordOrder::Little,
                &[
                    ("[::1]:8081", "[::]:0", 10, 0, 1, 0, 21752),
                    ("[::1]:8081", "[::1]:44102", 1, 0, 0, 0, 0),
                    ("[::1]:8081", "[::1]:44092", 1, 0, 0, 0, 21756),
                    ("[::ffff:127.0.0.1]:52730", "[::ffff:127.0.0.1]:8080", 1, 0, 0, 0, 21757),
                    ("[::1]:44092", "[::1]:8081", 1, 0, 3, 0, 21755),
                    ("[::1]:44102", "[::1]:8081", 1, 0, 0, 0, 21763),
                ],
            ),
            (
                "linux-6.18 udp (captured): 10 bytes queued = 0x340 of buffer",
                fixture!("linux-6.18/udp"),
                WordOrder::Little,
                &[
                    ("127.0.0.1:9997", "0.0.0.0:0", 7, 0, 0, 0, 21766),
                    ("127.0.0.1:9999", "0.0.0.0:0", 7, 0, 0x340, 0, 21764),
                ],
            ),
            (
                "linux-6.18 udp6 (captured)",
                fixture!("linux-6.18/udp6"),
                WordOrder::Little,
                &[("[::1]:9998", "[::]:0", 7, 0, 0, 0, 21765)],
            ),
            (
                "s390x tcp: big-endian words",
                fixture!("formats/tcp-s390x"),
                WordOrder::Big,
                &[
                    ("127.0.0.1:8080", "0.0.0.0:0", 10, 0, 0, 1000, 31337),
                    ("127.0.0.1:8080", "127.0.0.1:52724", 1, 0, 5, 1000, 31338),
                ],
            ),
            (
                "s390x tcp6: big-endian words",
                fixture!("formats/tcp6-s390x"),
                WordOrder::Big,
                &[
                    ("[::1]:8081", "[::]:0", 10, 0, 0, 1000, 31339),
                    ("[::ffff:127.0.0.1]:52730", "[::ffff:127.0.0.1]:8080", 1, 0, 0, 1000, 31340),
                ],
            ),
        ];
        for (case, text, order, want) in cases {
            let want: Vec<SocketEntry> = want.iter().map(e).collect();
            let got = parse_with_order(text, "f", *order).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(got, want, "{case}");
        }
    }

    #[test]
    fn addresses() {
        let cases: &[(&str, WordOrder, &str)] = &[
            ("0100007F:1F90", WordOrder::Little, "127.0.0.1:8080"),
            ("7F000001:1F90", WordOrder::Big, "127.0.0.1:8080"),
            ("0101A8C0:0016", WordOrder::Little, "192.168.1.1:22"),
            ("00000000:FFFF", WordOrder::Little, "0.0.0.0:65535"),
            (
                "00000000000000000000000001000000:0050",
                WordOrder::Little,
                "[::1]:80",
            ),
            (
                "00000000000000000000000000000001:0050",
                WordOrder::Big,
                "[::1]:80",
            ),
            (
                "B80D0120000000000000000001000000:01BB",
                WordOrder::Little,
                "[2001:db8::1]:443",
            ),
            (
                "20010DB8000000000000000000000001:01BB",
                WordOrder::Big,
                "[2001:db8::1]:443",
            ),
            (
                "000080FE000000000302A0FE0100A8C0:0001",
                WordOrder::Little,
                "[fe80::fea0:203:c0a8:1]:1",
            ),
        ];
        for (tok, order, want) in cases {
            assert_eq!(
                addr(tok, "f", 1, "a", *order).unwrap(),
                sa(want),
                "{tok} {order:?}"
            );
        }
    }

    #[test]
    fn bad_input() {
        let hdr = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        let row = |s: &str| format!("{hdr}{s}\n");
        let ok = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1065 1 00000000e64c1c16 100 0 0 10 0";
        let cases: Vec<(&str, String, Want)> = vec![
            (
                "empty file",
                fixture!("odd/empty").to_owned(),
                Want::Missing("header line"),
            ),
            ("no header", format!("{ok}\n"), Want::Malformed(1, "header")),
            (
                "truncated last row",
                fixture!("odd/tcp-truncated").to_owned(),
                Want::Malformed(9, "5 fields, expected at least 10"),
            ),
            (
                "short address",
                row(&ok.replace("0100007F:1F90", "100007F:1F90")),
                Want::Malformed(2, "neither 8 nor 32"),
            ),
            (
                "bad hex",
                row(&ok.replace("0100007F:1F90", "0100007G:1F90")),
                Want::Malformed(2, "local address: invalid number \"0100007G\""),
            ),
            (
                "5-digit port",
                row(&ok.replace("0100007F:1F90", "0100007F:11F90")),
                Want::Malformed(2, "port is not 4 hex digits"),
            ),
            (
                "no port",
                row(&ok.replace("00000000:0000", "00000000")),
                Want::Malformed(2, "remote address \"00000000\": expected ADDR:PORT"),
            ),
            (
                "mixed families",
                row(&ok.replace("00000000:0000", "00000000000000000000000000000000:0000")),
                Want::Malformed(2, "families differ"),
            ),
            (
                "state overflow",
                row(&ok.replace(" 0A ", " 10A ")),
                Want::Malformed(2, "state \"10A\" out of range"),
            ),
            (
                "queues without colon",
                row(&ok.replace("00000000:00000000", "0000000000000000")),
                Want::Malformed(2, "expected tx:rx"),
            ),
            (
                "bad uid",
                row(&ok.replace("     0        0 1065", "    -1        0 1065")),
                Want::Malformed(2, "uid"),
            ),
            (
                "bad inode",
                row(&ok.replace(" 1065 ", " 10x5 ")),
                Want::Malformed(2, "inode: invalid number \"10x5\""),
            ),
            (
                "bad slot",
                row(&ok.replace("   0: ", "   0 ")),
                Want::Malformed(2, "slot"),
            ),
        ];
        for (case, text, want) in &cases {
            assert_err(
                case,
                parse_with_order(text, "/proc/net/tcp", WordOrder::Little),
                "/proc/net/tcp",
                *want,
            );
        }
    }

    #[test]
    fn state_names() {
        let cases: &[(u8, Option<&str>)] = &[
            (0, None),
            (1, Some("established")),
            (2, Some("syn_sent")),
            (3, Some("syn_recv")),
            (4, Some("fin_wait_1")),
            (5, Some("fin_wait_2")),
            (6, Some("time_wait")),
            (7, Some("close")),
            (8, Some("close_wait")),
            (9, Some("last_ack")),
            (10, Some("listen")),
            (11, Some("closing")),
            (12, Some("syn_recv")),
            (13, None),
            (255, None),
        ];
        for (state, want) in cases {
            assert_eq!(tcp_state_name(*state), *want, "state {state}");
        }
        assert_eq!(tcp_state_name(TCP_LISTEN), Some("listen"));
        assert_eq!(tcp_state_name(TCP_CLOSE), Some("close"));
    }

    fn inode_of(fd: &impl AsRawFd) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .expect("stat socket fd")
            .ino()
    }

    fn my_uid() -> u32 {
        std::fs::metadata("/proc/self")
            .expect("stat /proc/self")
            .uid()
    }

    /// Find the socket this test opened in the live file, by inode.
    fn live_find(file: &str, inode: u64) -> SocketEntry {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {file}: {e}"));
        let rows = parse_net_sockets(&text, file).unwrap_or_else(|e| panic!("parsing {file}: {e}"));
        rows.into_iter()
            .find(|r| r.inode == inode)
            .unwrap_or_else(|| panic!("inode {inode} not in {file}"))
    }

    #[test]
    fn live_proc_net_tcp_and_udp() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let got = live_find("/proc/net/tcp", inode_of(&listener));
        assert_eq!(got.local, listener.local_addr().unwrap());
        assert_eq!(got.remote, sa("0.0.0.0:0"));
        assert_eq!(
            (got.state, got.uid, got.rx_queue),
            (TCP_LISTEN, my_uid(), 0)
        );

        // An unaccepted connection shows in the listener's accept queue.
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
        let got = live_find("/proc/net/tcp", inode_of(&client));
        assert_eq!(
            (got.local, got.remote),
            (client.local_addr().unwrap(), listener.local_addr().unwrap())
        );
        assert_eq!(got.state, TCP_ESTABLISHED);
        assert_eq!(live_find("/proc/net/tcp", inode_of(&listener)).rx_queue, 1);

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp 127.0.0.1");
        let got = live_find("/proc/net/udp", inode_of(&udp));
        assert_eq!(
            (got.local, got.state),
            (udp.local_addr().unwrap(), TCP_CLOSE)
        );
    }

    #[test]
    fn live_proc_net_tcp6_and_udp6() {
        let listener = match std::net::TcpListener::bind("[::1]:0") {
            Ok(l) => l,
            Err(e) => return no_ipv6_loopback(e),
        };
        let got = live_find("/proc/net/tcp6", inode_of(&listener));
        assert_eq!(got.local, listener.local_addr().unwrap());
        assert_eq!(
            (got.remote, got.state, got.uid),
            (sa("[::]:0"), TCP_LISTEN, my_uid())
        );
        let udp = std::net::UdpSocket::bind("[::1]:0").expect("bind udp ::1");
        let got = live_find("/proc/net/udp6", inode_of(&udp));
        assert_eq!(
            (got.local, got.state),
            (udp.local_addr().unwrap(), TCP_CLOSE)
        );
    }

    /// No `::1` to bind. A kernel without IPv6 (`CONFIG_IPV6=n`, or booted
    /// with `ipv6.disable=1`) has no `/proc/net/tcp6` and `udp6`: the
    /// connections family then counts the IPv4 tables alone, in both modes,
    /// rather than failing. A kernel with IPv6 but no `::1` on `lo` is a
    /// host set-up this test cannot run on, and it says so.
    fn no_ipv6_loopback(e: std::io::Error) {
        use crate::families::connections::ConnectionsCollector;
        use crate::gate::Mode;
        use crate::sources::Root;
        let tables = ["/proc/net/tcp6", "/proc/net/udp6"];
        assert!(
            tables.iter().all(|t| !std::path::Path::new(t).exists()),
            "binding [::1]:0: {e}; this kernel has IPv6 ({tables:?} exist) but no IPv6 \
             loopback address (lo down, or net.ipv6.conf.lo.disable_ipv6=1?): this test needs ::1"
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        for mode in [Mode::Auto, Mode::Procfs] {
            let counts = ConnectionsCollector::new(Root::proc(), mode)
                .counts()
                .unwrap_or_else(|e| panic!("{mode}: no IPv6 tables (kernel without IPv6): {e}"));
            assert!(counts[&("tcp", "listen")] >= 1, "{mode}: {counts:?}");
        }
        drop(listener);
    }
}
