//! A minimal `NETLINK_SOCK_DIAG` client: dumps the sockets of one address
//! family and protocol and returns their states. The preferred source of the
//! connections family (see [`super::connections`]).
//!
//! One request per (family, protocol): an `inet_diag_req_v2`
//! (`include/uapi/linux/inet_diag.h`, 3.3+, commit 8d34172dfd5a) with every
//! state bit set, answered by a multi-part dump of `inet_diag_msg` records
//! ending in `NLMSG_DONE`. Only the `idiag_state` byte of each record is
//! used, so no attribute (`INET_DIAG_INFO`, ...) is asked for. UDP needs
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
    let what = table.name;
    let bad = |offset: usize, reason: String| DiagError::Malformed {
        what,
        offset,
        reason,
    };
    let mut out = Parsed::default();
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
                NLMSG_DONE => {
                    out.done = true;
                    return Ok(out);
                }
                NLMSG_ERROR => {
                    let Some(code) = payload.get(0..4) else {
                        return Err(bad(off, "NLMSG_ERROR without an error code".into()));
                    };
                    let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
                    // 0 is an acknowledgement, which a dump does not send;
                    // treat it as the end.
                    if code == 0 {
                        out.done = true;
                        return Ok(out);
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
                    out.states.push(payload[1]);
                }
                other => return Err(bad(off, format!("unexpected message type {other}"))),
            }
        }
        // NLMSG_ALIGN: messages start on 4-byte boundaries.
        off += (len + 3) & !3;
    }
    Ok(out)
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
        self.seq = self.seq.wrapping_add(1);
        let req = request(table, self.seq);
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
        let mut states = Vec::new();
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
            let got = parse(&self.buf[..n as usize], table, self.seq)?;
            states.extend(got.states);
            if got.done {
                return Ok(states);
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

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const CAPTURED_TCP_DUMP: &str = include_str!("../../tests/fixtures/netlink/tcp_dump.hex");
    const CAPTURED_DONE: &str = include_str!("../../tests/fixtures/netlink/tcp_done.hex");

    /// Live: the dump of this process's namespace agrees with
    /// `/proc/thread-self/net/tcp` for a listener this test opens (a fresh
    /// namespace would need root; the host's sockets may change between the
    /// two reads, so only the test's own listener is checked exactly).
    #[test]
    fn live_dump_sees_our_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut d = SockDiag::open().unwrap();
        let states = d.states(TCP).unwrap();
        assert!(states.contains(&10), "{states:?}");
        drop(l);
        // Every table answers or says why (udp_diag may be absent).
        for t in TABLES {
            match d.states(t) {
                Ok(_) | Err(DiagError::Kernel { .. }) => {}
                Err(e) => panic!("{}: {e}", t.name),
            }
        }
    }
}
