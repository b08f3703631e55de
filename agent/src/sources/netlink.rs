//! A minimal `NETLINK_SOCK_DIAG` client: dumps the sockets of one address
//! family and protocol and returns their states. The preferred source of the
//! connections family (see [`crate::families::connections`]).
//!
//! One request per (family, protocol): an `inet_diag_req_v2`
//! (`include/uapi/linux/inet_diag.h`, 3.3+, commit 8d34172dfd5a) with every
//! state bit set, answered by a multi-part dump of `inet_diag_msg` records
//! ending in `NLMSG_DONE`. For connection counts only the `idiag_state`
//! byte of each record is used, so no attribute is asked for
//! ([`SockDiag::states`]). The tcp family's per-peer sampler
//! ([`crate::families::tcp::sampler`]) asks for `INET_DIAG_INFO` and reads addresses,
//! ports, the socket cookie and `struct tcp_info` ([`SockDiag::tcp_socks`]).
//! UDP needs
//! `udp_diag` (`CONFIG_INET_UDP_DIAG`); without it the kernel answers
//! `ENOENT` and the caller reads `/proc/net/udp*` instead.
//!
//! The socket lives in the agent's network namespace: it dumps exactly
//! what `/proc/net/tcp` of that namespace lists.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `SOCK_DIAG_BY_FAMILY` (`include/uapi/linux/sock_diag.h`).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLM_F_REQUEST | NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`).
const FLAGS_DUMP_REQUEST: u16 = 0x1 | 0x100 | 0x200;
/// `NLMSG_ERROR`.
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
const NLMSG_DONE: u16 = 3;
/// `NLMSG_NOOP`.
const NLMSG_NOOP: u16 = 1;
/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct inet_diag_req_v2)`: family, protocol, ext, pad, states,
/// then the 48-byte `inet_diag_sockid`.
const REQ_LEN: usize = 56;
/// `sizeof(struct inet_diag_msg)`: 4 bytes, the 48-byte sockid, then
/// expires, rqueue, wqueue, uid, inode.
const DIAG_MSG_LEN: usize = 72;

/// Why a dump failed. The caller falls back to `/proc/net/*`.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    /// `socket(AF_NETLINK, SOCK_DGRAM, NETLINK_SOCK_DIAG)` failed.
    #[error("opening a NETLINK_SOCK_DIAG socket: {0}")]
    Socket(#[source] std::io::Error),
    /// Sending the dump request failed.
    #[error("sending the sock_diag request for {what}: {source}")]
    Send {
        /// The table asked for, e.g. `tcp6`.
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Receiving the dump failed.
    #[error("receiving the sock_diag dump for {what}: {source}")]
    Recv {
        /// The table asked for.
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The kernel answered `NLMSG_ERROR` (e.g. `ENOENT` without `udp_diag`).
    #[error("sock_diag dump for {what}: the kernel answered {}", std::io::Error::from_raw_os_error(*.errno))]
    Kernel {
        /// The table asked for.
        what: &'static str,
        /// The positive errno.
        errno: i32,
    },
    /// A message that does not parse.
    #[error("sock_diag dump for {what}: byte {offset}: {reason}")]
    Malformed {
        /// The table asked for.
        what: &'static str,
        /// Offset of the bad message in the received datagram.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
}

/// A table to dump: address family and IP protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    /// `tcp`, `tcp6`, `udp` or `udp6`, as the `/proc/net` file is named.
    pub name: &'static str,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
}

/// The four tables of the connections family.
pub const TABLES: [Table; 4] = [
    Table {
        name: "tcp",
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_TCP as u8,
    },
    Table {
        name: "tcp6",
        family: libc::AF_INET6 as u8,
        protocol: libc::IPPROTO_TCP as u8,
    },
    Table {
        name: "udp",
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_UDP as u8,
    },
    Table {
        name: "udp6",
        family: libc::AF_INET6 as u8,
        protocol: libc::IPPROTO_UDP as u8,
    },
];

/// The request datagram for `table` with sequence number `seq`.
pub fn request(table: Table, seq: u32) -> [u8; NLMSG_HDRLEN + REQ_LEN] {
    let mut b = [0u8; NLMSG_HDRLEN + REQ_LEN];
    b[0..4].copy_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b[6..8].copy_from_slice(&FLAGS_DUMP_REQUEST.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel fills in the port.
    let r = NLMSG_HDRLEN;
    b[r] = table.family;
    b[r + 1] = table.protocol;
    // idiag_ext 0, pad 0; every state.
    b[r + 4..r + 8].copy_from_slice(&u32::MAX.to_ne_bytes());
    // The sockid stays zero: no filter on addresses, ports or interface.
    b
}

/// What one received datagram held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// `idiag_state` of every socket record, in order.
    pub states: Vec<u8>,
    /// `NLMSG_DONE` was seen: the dump is complete.
    pub done: bool,
}

/// Parses one datagram of a dump answering request `seq` for `table`.
/// Messages of another sequence number are skipped (a late answer to an
/// earlier, abandoned request).
pub fn parse(buf: &[u8], table: Table, seq: u32) -> Result<Parsed, DiagError> {
    let mut out = Parsed::default();
    out.done = walk(buf, table, seq, |_, payload| {
        out.states.push(payload[1]);
        Ok(())
    })?;
    Ok(out)
}

/// Walks the messages of one datagram answering request `seq` for `table`,
/// calling `record(offset, payload)` for every `inet_diag_msg` (at least
/// [`DIAG_MSG_LEN`] bytes, of the table's family). Returns whether
/// `NLMSG_DONE` was seen.
fn walk(
    buf: &[u8],
    table: Table,
    seq: u32,
    mut record: impl FnMut(usize, &[u8]) -> Result<(), DiagError>,
) -> Result<bool, DiagError> {
    let what = table.name;
    let bad = |offset: usize, reason: String| DiagError::Malformed {
        what,
        offset,
        reason,
    };
    let mut off = 0;
    while off < buf.len() {
        let rest = &buf[off..];
        if rest.len() < NLMSG_HDRLEN {
            return Err(bad(
                off,
                format!("{} bytes left, less than a header", rest.len()),
            ));
        }
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let msg_seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(bad(
                off,
                format!("length {len} outside {NLMSG_HDRLEN}..={}", rest.len()),
            ));
        }
        let payload = &rest[NLMSG_HDRLEN..len];
        if msg_seq == seq {
            match kind {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let Some(code) = payload.get(0..4) else {
                        return Err(bad(off, "NLMSG_ERROR without an error code".into()));
                    };
                    let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
                    // 0 is an acknowledgement, which a dump does not send;
                    // treat it as the end.
                    if code == 0 {
                        return Ok(true);
                    }
                    return Err(DiagError::Kernel {
                        what,
                        errno: code.saturating_neg(),
                    });
                }
                NLMSG_NOOP => {}
                SOCK_DIAG_BY_FAMILY => {
                    if payload.len() < DIAG_MSG_LEN {
                        return Err(bad(
                            off,
                            format!(
                                "inet_diag_msg of {} bytes, expected {DIAG_MSG_LEN}",
                                payload.len()
                            ),
                        ));
                    }
                    if payload[0] != table.family {
                        return Err(bad(
                            off,
                            format!("family {} in a dump of {}", payload[0], table.family),
                        ));
                    }
                    record(off, payload)?;
                }
                other => return Err(bad(off, format!("unexpected message type {other}"))),
            }
        }
        // NLMSG_ALIGN: messages start on 4-byte boundaries.
        off += (len + 3) & !3;
    }
    Ok(false)
}

/// `INET_DIAG_INFO` (`enum inet_diag_attr`): the attribute carrying
/// `struct tcp_info`.
const INET_DIAG_INFO: u16 = 2;
/// `INET_DIAG_CGROUP_ID` (5.7+): the cgroup v2 id of the socket's cgroup
/// (`u64`), sent with every record.
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `sizeof(struct rtattr)`.
const RTA_HDRLEN: usize = 4;

/// The `struct tcp_info` fields the per-peer sampler uses
/// (`include/uapi/linux/tcp.h`; offsets from libc's copy of that struct).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpInfo {
    /// `tcpi_bytes_acked` (4.1+, RFC 4898 `tcpEStatsAppHCThruOctetsAcked`):
    /// sequence space acknowledged by the peer. A client's SYN and an
    /// acknowledged FIN each add one.
    pub bytes_acked: u64,
    /// `tcpi_bytes_received` (4.1+): sequence space received in order; a
    /// received FIN adds one.
    pub bytes_received: u64,
    /// `tcpi_rtt`: smoothed RTT in µs (0 before the first measurement).
    pub rtt_us: u32,
    /// `tcpi_total_retrans`: segments retransmitted over the socket's life.
    pub total_retrans: u32,
}

/// One TCP socket of a dump with `INET_DIAG_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSock {
    /// `idiag_state` (`TCP_ESTABLISHED` = 1 ... `TCP_LISTEN` = 10).
    pub state: u8,
    /// Local port, host order.
    pub local_port: u16,
    /// Remote port, host order.
    pub remote_port: u16,
    /// Local address.
    pub local: std::net::IpAddr,
    /// Remote address.
    pub remote: std::net::IpAddr,
    /// `idiag_cookie`: the socket's cookie, unique while it lives.
    pub cookie: u64,
    /// `idiag_inode`, 0 for sockets no file refers to (orphans).
    pub inode: u32,
    /// `struct tcp_info`, absent for time-wait and request minisockets, and
    /// on kernels whose `tcp_info` predates `tcpi_bytes_received` (< 4.1).
    pub info: Option<TcpInfo>,
    /// `INET_DIAG_CGROUP_ID`: the socket's cgroup v2 id; 0 where the
    /// kernel does not send it (< 5.7).
    pub cgroup: u64,
}

/// The request datagram for `table` with sequence number `seq`, asking for
/// `INET_DIAG_INFO` (`struct tcp_info`) with every record.
pub fn request_info(table: Table, seq: u32) -> [u8; NLMSG_HDRLEN + REQ_LEN] {
    let mut b = request(table, seq);
    // idiag_ext is a bit mask of (1 << (attribute - 1)).
    b[NLMSG_HDRLEN + 2] = 1 << (INET_DIAG_INFO - 1);
    b
}

/// An address of `family` from the 16 bytes of an `inet_diag_sockid` field.
fn addr(family: u8, b: &[u8]) -> std::net::IpAddr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    if family == libc::AF_INET as u8 {
        std::net::IpAddr::from([a[0], a[1], a[2], a[3]])
    } else {
        std::net::IpAddr::from(a)
    }
}

/// Reads a native-endian `u64`/`u32` at `at` of `b`, if it fits.
fn ne_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The fields of a `struct tcp_info` attribute payload, or `None` when it
/// is too short to hold `tcpi_bytes_received` (kernels before 4.1).
pub fn parse_tcp_info(b: &[u8]) -> Option<TcpInfo> {
    use std::mem::offset_of;
    Some(TcpInfo {
        bytes_acked: ne_u64(b, offset_of!(libc::tcp_info, tcpi_bytes_acked))?,
        bytes_received: ne_u64(b, offset_of!(libc::tcp_info, tcpi_bytes_received))?,
        rtt_us: ne_u32(b, offset_of!(libc::tcp_info, tcpi_rtt))?,
        total_retrans: ne_u32(b, offset_of!(libc::tcp_info, tcpi_total_retrans))?,
    })
}

/// Parses one `inet_diag_msg` payload and its attributes.
fn tcp_sock(table: Table, off: usize, p: &[u8]) -> Result<TcpSock, DiagError> {
    let family = p[0];
    let mut sock = TcpSock {
        state: p[1],
        local_port: u16::from_be_bytes([p[4], p[5]]),
        remote_port: u16::from_be_bytes([p[6], p[7]]),
        local: addr(family, &p[8..24]),
        remote: addr(family, &p[24..40]),
        // idiag_cookie is two host-order u32 halves, low first.
        cookie: u64::from(u32::from_ne_bytes([p[44], p[45], p[46], p[47]]))
            | u64::from(u32::from_ne_bytes([p[48], p[49], p[50], p[51]])) << 32,
        inode: u32::from_ne_bytes([p[68], p[69], p[70], p[71]]),
        info: None,
        cgroup: 0,
    };
    let mut at = DIAG_MSG_LEN;
    while at + RTA_HDRLEN <= p.len() {
        let len = u16::from_ne_bytes([p[at], p[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([p[at + 2], p[at + 3]]);
        if len < RTA_HDRLEN || at + len > p.len() {
            return Err(DiagError::Malformed {
                what: table.name,
                offset: off + NLMSG_HDRLEN + at,
                reason: format!("attribute length {len} outside the record"),
            });
        }
        let value = &p[at + RTA_HDRLEN..at + len];
        if kind == INET_DIAG_INFO {
            sock.info = parse_tcp_info(value);
        } else if kind == INET_DIAG_CGROUP_ID {
            if let Ok(b) = <[u8; 8]>::try_from(value) {
                sock.cgroup = u64::from_ne_bytes(b);
            }
        }
        // RTA_ALIGN: attributes start on 4-byte boundaries.
        at += (len + 3) & !3;
    }
    Ok(sock)
}

/// Parses one datagram of an `INET_DIAG_INFO` dump (see [`request_info`]):
/// the sockets in it, and whether the dump is complete.
pub fn parse_tcp_socks(
    buf: &[u8],
    table: Table,
    seq: u32,
) -> Result<(Vec<TcpSock>, bool), DiagError> {
    let mut socks = Vec::new();
    let done = walk(buf, table, seq, |off, payload| {
        socks.push(tcp_sock(table, off, payload)?);
        Ok(())
    })?;
    Ok((socks, done))
}

/// An open `NETLINK_SOCK_DIAG` socket.
#[derive(Debug)]
pub struct SockDiag {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl SockDiag {
    /// Opens the socket in the caller's network namespace.
    pub fn open() -> Result<Self, DiagError> {
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(DiagError::Socket(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: valid timeval for SO_RCVTIMEO; a failure only loses the
        // timeout, so it is ignored.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        Ok(Self {
            fd,
            seq: 0,
            // The kernel fills dump datagrams up to about a page (or 32 KiB
            // with a large receive buffer); 64 KiB never truncates.
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// Dumps `table` and returns the state of every socket in it.
    pub fn states(&mut self, table: Table) -> Result<Vec<u8>, DiagError> {
        let mut states = Vec::new();
        self.dump(table, request, |buf, seq| {
            let got = parse(buf, table, seq)?;
            states.extend(got.states);
            Ok(got.done)
        })?;
        Ok(states)
    }

    /// Dumps `table` (a TCP table) with `INET_DIAG_INFO`: every socket with
    /// its addresses, cookie and `struct tcp_info`.
    pub fn tcp_socks(&mut self, table: Table) -> Result<Vec<TcpSock>, DiagError> {
        let mut socks = Vec::new();
        self.dump(table, request_info, |buf, seq| {
            let (got, done) = parse_tcp_socks(buf, table, seq)?;
            socks.extend(got);
            Ok(done)
        })?;
        Ok(socks)
    }

    /// Sends the request `make(table, seq)` and feeds every datagram of the
    /// answer to `each` until it reports the dump done.
    fn dump(
        &mut self,
        table: Table,
        make: fn(Table, u32) -> [u8; NLMSG_HDRLEN + REQ_LEN],
        mut each: impl FnMut(&[u8], u32) -> Result<bool, DiagError>,
    ) -> Result<(), DiagError> {
        self.seq = self.seq.wrapping_add(1);
        let req = make(table, self.seq);
        // SAFETY: sockaddr_nl is plain data; zero is the kernel's address.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sends `req` to a valid sockaddr_nl.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(DiagError::Send {
                what: table.name,
                source: std::io::Error::last_os_error(),
            });
        }
        loop {
            // SAFETY: receives into our buffer, bounded by its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DiagError::Recv {
                    what: table.name,
                    source: e,
                });
            }
            if each(&self.buf[..n as usize], self.seq)? {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One netlink message: header then payload, padded to 4 bytes.
    fn msg(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + payload.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0x2u16.to_ne_bytes()); // NLM_F_MULTI
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&4242u32.to_ne_bytes());
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn diag(family: u8, state: u8) -> Vec<u8> {
        let mut p = vec![0u8; DIAG_MSG_LEN];
        p[0] = family;
        p[1] = state;
        p
    }

    const TCP: Table = TABLES[0];
    const UDP6: Table = TABLES[3];

    #[test]
    fn request_layout() {
        let r = request(TCP, 7);
        assert_eq!(r.len(), 72);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes(r[4..6].try_into().unwrap()), 20);
        assert_eq!(u16::from_ne_bytes(r[6..8].try_into().unwrap()), 0x301);
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 7);
        assert_eq!((r[16], r[17]), (2, 6), "AF_INET, IPPROTO_TCP");
        assert_eq!(&r[20..24], &[0xff; 4], "every state");
        assert!(r[24..].iter().all(|b| *b == 0), "no sockid filter");
    }

    #[test]
    fn parse_cases() {
        type Want = Result<(Vec<u8>, bool), &'static str>;
        let mut two = msg(20, 5, &diag(2, 10));
        two.extend(msg(20, 5, &diag(2, 1)));
        let mut with_done = two.clone();
        with_done.extend(msg(3, 5, &0i32.to_ne_bytes()));
        let mut stale_then_ours = msg(20, 4, &diag(2, 6));
        stale_then_ours.extend(msg(20, 5, &diag(2, 6)));
        let cases: Vec<(&str, Table, Vec<u8>, Want)> = vec![
            (
                "two records, more to come",
                TCP,
                two,
                Ok((vec![10, 1], false)),
            ),
            ("records then done", TCP, with_done, Ok((vec![10, 1], true))),
            (
                "empty dump",
                TCP,
                msg(3, 5, &0i32.to_ne_bytes()),
                Ok((vec![], true)),
            ),
            (
                "earlier request's answer skipped",
                TCP,
                stale_then_ours,
                Ok((vec![6], false)),
            ),
            ("noop skipped", TCP, msg(1, 5, &[]), Ok((vec![], false))),
            (
                "ENOENT (no udp_diag)",
                UDP6,
                msg(2, 5, &(-libc::ENOENT).to_ne_bytes()),
                Err("No such file or directory"),
            ),
            (
                "error without a code",
                TCP,
                msg(2, 5, &[]),
                Err("without an error code"),
            ),
            (
                "short record",
                TCP,
                msg(20, 5, &[2, 1, 0, 0]),
                Err("inet_diag_msg of 4 bytes"),
            ),
            (
                "wrong family",
                UDP6,
                msg(20, 5, &diag(2, 7)),
                Err("family 2 in a dump of 10"),
            ),
            (
                "truncated header",
                TCP,
                vec![1, 2, 3],
                Err("less than a header"),
            ),
            (
                "length past the end",
                TCP,
                {
                    let mut m = msg(20, 5, &diag(2, 1));
                    m.truncate(40);
                    m
                },
                Err("length 88 outside"),
            ),
            (
                "unknown type",
                TCP,
                msg(99, 5, &[]),
                Err("unexpected message type 99"),
            ),
        ];
        for (case, table, bytes, want) in cases {
            match (parse(&bytes, table, 5), want) {
                (Ok(p), Ok((states, done))) => {
                    assert_eq!((p.states, p.done), (states, done), "{case}")
                }
                (Err(e), Err(needle)) => {
                    assert!(e.to_string().contains(needle), "{case}: {e}")
                }
                (got, want) => panic!("{case}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// A dump captured on Linux 6.18 (x86_64) in a fresh network namespace
    /// holding one TCP listener on 127.0.0.1:8080 and one established pair
    /// to it: three records (listen, established, established) and
    /// `NLMSG_DONE`, as the kernel sent them in one datagram.
    #[test]
    fn captured_dump() {
        let bytes = hex(CAPTURED_TCP_DUMP);
        let p = parse(&bytes, TCP, 1).unwrap();
        let mut states = p.states.clone();
        states.sort();
        assert_eq!(states, vec![1, 1, 10]);
        // The capture's done message arrived in a second datagram.
        let done = hex(CAPTURED_DONE);
        assert_eq!(
            parse(&done, TCP, 1).unwrap(),
            Parsed {
                states: vec![],
                done: true
            }
        );
    }

    /// One `inet_diag_msg` of `family` with ports, addresses, cookie and
    /// inode, followed by `attrs` (already framed).
    #[expect(clippy::too_many_arguments, reason = "one argument per sockid field")]
    fn diag_full(
        family: u8,
        state: u8,
        sport: u16,
        dport: u16,
        src: &[u8],
        dst: &[u8],
        cookie: u64,
        attrs: &[u8],
    ) -> Vec<u8> {
        let mut p = vec![0u8; DIAG_MSG_LEN];
        p[0] = family;
        p[1] = state;
        p[4..6].copy_from_slice(&sport.to_be_bytes());
        p[6..8].copy_from_slice(&dport.to_be_bytes());
        p[8..8 + src.len()].copy_from_slice(src);
        p[24..24 + dst.len()].copy_from_slice(dst);
        p[44..48].copy_from_slice(&(cookie as u32).to_ne_bytes());
        p[48..52].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        p[68..72].copy_from_slice(&777u32.to_ne_bytes());
        p.extend_from_slice(attrs);
        p
    }

    /// An `INET_DIAG_INFO` attribute holding a `tcp_info` of `len` bytes.
    fn info_attr(len: usize, acked: u64, received: u64, rtt: u32, retrans: u32) -> Vec<u8> {
        use std::mem::offset_of;
        let mut info = vec![0u8; len];
        let mut put = |at: usize, b: &[u8]| {
            if at + b.len() <= info.len() {
                info[at..at + b.len()].copy_from_slice(b);
            }
        };
        put(
            offset_of!(libc::tcp_info, tcpi_bytes_acked),
            &acked.to_ne_bytes(),
        );
        put(
            offset_of!(libc::tcp_info, tcpi_bytes_received),
            &received.to_ne_bytes(),
        );
        put(offset_of!(libc::tcp_info, tcpi_rtt), &rtt.to_ne_bytes());
        put(
            offset_of!(libc::tcp_info, tcpi_total_retrans),
            &retrans.to_ne_bytes(),
        );
        let mut a = Vec::new();
        a.extend_from_slice(&((RTA_HDRLEN + len) as u16).to_ne_bytes());
        a.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
        a.extend_from_slice(&info);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    #[test]
    fn request_info_asks_for_tcp_info() {
        let r = request_info(TCP, 3);
        assert_eq!(r[18], 0b10, "idiag_ext bit of INET_DIAG_INFO (2)");
        let mut plain = request(TCP, 3);
        plain[18] = 0b10;
        assert_eq!(r, plain, "otherwise the plain request");
    }

    #[test]
    fn tcp_info_offsets_are_the_uapi_ones() {
        // include/uapi/linux/tcp.h on x86_64 and arm64 alike.
        use std::mem::offset_of;
        let cases = [
            ("tcpi_rtt", offset_of!(libc::tcp_info, tcpi_rtt), 68),
            (
                "tcpi_total_retrans",
                offset_of!(libc::tcp_info, tcpi_total_retrans),
                100,
            ),
            (
                "tcpi_bytes_acked",
                offset_of!(libc::tcp_info, tcpi_bytes_acked),
                120,
            ),
            (
                "tcpi_bytes_received",
                offset_of!(libc::tcp_info, tcpi_bytes_received),
                128,
            ),
        ];
        for (field, got, want) in cases {
            assert_eq!(got, want, "{field}");
        }
    }

    #[test]
    fn parse_tcp_socks_cases() {
        const TCP6: Table = TABLES[1];
        let v6: [u8; 16] = "2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let full = info_attr(232, 1001, 42, 350, 3);
        let short = info_attr(104, 0, 0, 350, 3);
        // An unknown attribute before INET_DIAG_INFO is skipped.
        let mut other_then_info = vec![8, 0, 5, 0, 1, 2, 3, 4];
        other_then_info.extend_from_slice(&full);
        // INET_DIAG_CGROUP_ID (21): 12 bytes, a u64; a short one is ignored.
        let mut with_cgroup = vec![12, 0, 21, 0];
        with_cgroup.extend_from_slice(&0x1_0000_2345u64.to_ne_bytes());
        with_cgroup.extend_from_slice(&full);
        let short_cgroup = [8, 0, 21, 0, 1, 2, 3, 4];
        type Want = Result<(TcpSock, bool), &'static str>;
        let sock = |info: Option<TcpInfo>| TcpSock {
            state: 1,
            local_port: 40000,
            remote_port: 8080,
            local: "10.0.0.1".parse().unwrap(),
            remote: "10.0.0.2".parse().unwrap(),
            cookie: 0x1_0000_0002,
            inode: 777,
            cgroup: 0,
            info,
        };
        let info = TcpInfo {
            bytes_acked: 1001,
            bytes_received: 42,
            rtt_us: 350,
            total_retrans: 3,
        };
        let v4 = |attrs: &[u8]| {
            msg(
                20,
                5,
                &diag_full(
                    2,
                    1,
                    40000,
                    8080,
                    &[10, 0, 0, 1],
                    &[10, 0, 0, 2],
                    0x1_0000_0002,
                    attrs,
                ),
            )
        };
        let cases: Vec<(&str, Table, Vec<u8>, Want)> = vec![
            (
                "ipv4 with tcp_info",
                TCP,
                v4(&full),
                Ok((sock(Some(info)), false)),
            ),
            ("no attribute", TCP, v4(&[]), Ok((sock(None), false))),
            (
                "tcp_info of a pre-4.1 kernel (no byte counters)",
                TCP,
                v4(&short),
                Ok((sock(None), false)),
            ),
            (
                "other attribute first",
                TCP,
                v4(&other_then_info),
                Ok((sock(Some(info)), false)),
            ),
            (
                "socket cgroup id",
                TCP,
                v4(&with_cgroup),
                Ok((
                    TcpSock {
                        cgroup: 0x1_0000_2345,
                        ..sock(Some(info))
                    },
                    false,
                )),
            ),
            (
                "cgroup id of the wrong size",
                TCP,
                v4(&short_cgroup),
                Ok((sock(None), false)),
            ),
            (
                "ipv6",
                TCP6,
                msg(20, 5, &diag_full(10, 10, 443, 0, &v6, &[0; 16], 9, &[])),
                Ok((
                    TcpSock {
                        state: 10,
                        local_port: 443,
                        remote_port: 0,
                        local: "2001:db8::7".parse().unwrap(),
                        remote: "::".parse().unwrap(),
                        cookie: 9,
                        inode: 777,
                        info: None,
                        cgroup: 0,
                    },
                    false,
                )),
            ),
            (
                "attribute past the record",
                TCP,
                v4(&[200, 0, 2, 0]),
                Err("attribute length 200 outside the record"),
            ),
        ];
        for (case, table, bytes, want) in cases {
            match (parse_tcp_socks(&bytes, table, 5), want) {
                (Ok((socks, done)), Ok((sock, want_done))) => {
                    assert_eq!((socks, done), (vec![sock], want_done), "{case}")
                }
                (Err(e), Err(needle)) => {
                    assert!(e.to_string().contains(needle), "{case}: {e}")
                }
                (got, want) => panic!("{case}: got {got:?}, want {want:?}"),
            }
        }
        let (socks, done) = parse_tcp_socks(&msg(3, 5, &0i32.to_ne_bytes()), TCP, 5).unwrap();
        assert!(socks.is_empty() && done, "done");
    }

    /// Live: a loopback pair in this namespace moves 1000 bytes one way and
    /// 7 the other; the dump shows `tcpi_bytes_acked` = payload + 1 for the
    /// SYN on the connecting side, = payload on the accepting side, and
    /// `tcpi_bytes_received` = payload on both, once everything is read.
    #[test]
    fn live_tcp_info_counts_payload_and_the_syn() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(&[1u8; 1000]).unwrap();
        let mut b = [0u8; 1000];
        s.read_exact(&mut b).unwrap();
        s.write_all(&[2u8; 7]).unwrap();
        c.read_exact(&mut b[..7]).unwrap();
        // The last ACK of the 7 bytes may still be in flight on loopback.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (cport, sport) = (
            c.local_addr().unwrap().port(),
            l.local_addr().unwrap().port(),
        );
        let mut d = SockDiag::open().unwrap();
        let socks = d.tcp_socks(TCP).unwrap();
        let find = |local: u16, remote: u16| {
            socks
                .iter()
                .find(|x| x.local_port == local && x.remote_port == remote)
                .unwrap_or_else(|| panic!("{local}->{remote} not in the dump"))
        };
        let (client, server) = (find(cport, sport), find(sport, cport));
        let ci = client.info.expect("client tcp_info");
        let si = server.info.expect("server tcp_info");
        assert_eq!((ci.bytes_acked, ci.bytes_received), (1001, 7), "client");
        assert_eq!((si.bytes_acked, si.bytes_received), (7, 1000), "server");
        assert!(ci.rtt_us > 0 && si.rtt_us > 0, "{ci:?} {si:?}");
        assert_ne!(client.cookie, server.cookie);
        assert!(
            socks.iter().any(|x| x.state == 10 && x.local_port == sport),
            "the listener"
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const CAPTURED_TCP_DUMP: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/netlink/tcp_dump.hex"
    ));
    const CAPTURED_DONE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/netlink/tcp_done.hex"
    ));

    /// Live: the dump of this process's namespace shows a listener this test
    /// opens, in both the state-only dump the connections family counts
    /// and the full one (the host's other sockets may come and go, so only
    /// the test's own listener is checked).
    #[test]
    fn live_dump_sees_our_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut d = SockDiag::open().unwrap();
        let states = d.states(TCP).unwrap();
        assert!(states.contains(&10), "{states:?}");
        let socks = d.tcp_socks(TCP).unwrap();
        assert!(
            socks.iter().any(|x| x.local_port == port && x.state == 10),
            "listener on port {port} not in the dump"
        );
        drop(l);
        // Every table answers, except the UDP ones on a kernel without
        // udp_diag (CONFIG_INET_UDP_DIAG off or the module not loaded),
        // whose dump gets ENOENT; the connections family then reads
        // /proc/net/udp{,6} (`families::connections` live test).
        for t in TABLES {
            match d.states(t) {
                Ok(_) => {}
                Err(DiagError::Kernel { errno, .. })
                    if errno == libc::ENOENT && t.protocol == libc::IPPROTO_UDP as u8 => {}
                Err(e) => panic!("{}: {e}", t.name),
            }
        }
    }
}
