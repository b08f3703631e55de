//! Sources shared by several families, and what every reader needs.
//!
//! Pure parsers for the `/proc` and `/sys` files more than one family reads,
//! the kernel BTF reader, the sock_diag client and tracefs. A parser that
//! only one family uses lives in that family's folder
//! (`agent/src/families/<name>/`). Each parser owns one file format and
//! exposes a `parse_*` function over the file's text, so it can be tested on
//! fixtures captured from real kernels (`agent/tests/fixtures/procfs/`,
//! whose README says where each one comes from). Reading is separate:
//! [`Root`] joins relative paths onto a root directory, `/host/proc` or
//! `/host/sys` when the agent runs in a container.
//!
//! | module      | source                                | used by                 |
//! |-------------|---------------------------------------|-------------------------|
//! | [`stat`]    | `/proc/stat`                          | cpu, sched, boot time   |
//! | [`snmp`]    | `/proc/net/snmp`, `/proc/net/netstat` | tcp, drops              |
//! | [`cpulist`] | `/sys/devices/system/cpu/online`      | tests, per-CPU maps     |
//! | [`tracefs`] | tracefs `events/*/*/format`           | classic tracepoints     |
//! | [`btf`]     | `/sys/kernel/btf/vmlinux`             | sched, tcp, drops       |
//! | [`netlink`] | `NETLINK_SOCK_DIAG`                   | connections, tcp        |
//!
//! Errors name the file and, where one is at fault, the 1-based line.

pub mod btf;
pub mod cpulist;
pub mod netlink;
pub mod snmp;
pub mod stat;
pub mod tracefs;

use std::path::{Path, PathBuf};

/// Errors from reading or parsing a /proc or /sys file. Each names the file
/// (path as read) and the line (1-based) where relevant.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// I/O error reading a file or listing a directory.
    #[error("reading {path}: {source}")]
    Io {
        /// The path that failed, as opened.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Malformed content.
    #[error("{file}: line {line}: {reason}")]
    Malformed {
        /// The file being parsed.
        file: String,
        /// 1-based line number of the offending line.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The path is not a regular file (a FIFO, a device, a socket, a
    /// directory). procfs and sysfs files are regular files; anything else
    /// could block a read forever (a FIFO) or never end (`/dev/zero`), so
    /// it is refused before any byte is read.
    #[error("{path}: not a regular file ({file_type}); refusing to read it")]
    NotRegular {
        /// The path as opened.
        path: String,
        /// What it is instead: `FIFO`, `character device`, `socket`, ...
        file_type: &'static str,
    },
    /// The file holds more than the per-file cap ([`MAX_FILE_BYTES`]); no
    /// part of it is parsed.
    #[error(
        "{path}: larger than {max_bytes} bytes, the cap on one procfs or sysfs file; not read"
    )]
    TooLarge {
        /// The path as opened.
        path: String,
        /// The cap that was exceeded.
        max_bytes: u64,
    },
    /// A required line or field is absent.
    #[error("{file}: missing {what}")]
    Missing {
        /// The file being parsed.
        file: String,
        /// The line or field that was expected.
        what: String,
    },
}

impl ProcError {
    pub(crate) fn malformed(file: &str, line: usize, reason: impl Into<String>) -> Self {
        Self::Malformed {
            file: file.to_owned(),
            line,
            reason: reason.into(),
        }
    }

    pub(crate) fn missing(file: &str, what: impl Into<String>) -> Self {
        Self::Missing {
            file: file.to_owned(),
            what: what.into(),
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// A root directory for procfs or sysfs (default `/proc` and `/sys`;
/// `/host/proc` and `/host/sys` in a container). Readers join relative
/// paths onto it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root(pub PathBuf);

impl Root {
    /// A root at `p`.
    pub fn new(p: impl Into<PathBuf>) -> Self {
        Self(p.into())
    }

    /// The host's own `/proc`.
    pub fn proc() -> Self {
        Self::new("/proc")
    }

    /// The host's own `/sys`.
    pub fn sys() -> Self {
        Self::new("/sys")
    }

    /// The absolute path of `rel` (e.g. `"net/dev"`) under this root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    /// Read `rel` under this root into a string.
    pub fn read(&self, rel: &str) -> Result<String, ProcError> {
        read_file(&self.path(rel))
    }
}

/// The most bytes [`read_file`] reads from one file: 8 MiB.
///
/// The largest file a collector reads is a socket table in the connections
/// family's procfs fallback: `/proc/net/tcp` lines are 150 bytes and
/// `/proc/net/tcp6` lines 178, so 8 MiB holds about 55 000 IPv4 or 47 000
/// IPv6 sockets (the normal path, sock_diag, reads no file). Everything
/// else is far smaller: `/proc/stat` is about 150 bytes per CPU (150 KiB
/// at 1 024 CPUs), `/proc/net/dev` 200 bytes per interface. A read that
/// grows its buffer by doubling peaks under 2 × 8 MiB, well inside the
/// 96 MiB memory soft limit, where a link to `/dev/zero` once took 7 GB.
pub const MAX_FILE_BYTES: u64 = 8 << 20;

/// Reads one procfs or sysfs file, safely against whatever is at `path`:
///
/// - opened `O_NONBLOCK` (a FIFO without a writer does not block the open)
///   and `O_CLOEXEC | O_NOCTTY`;
/// - refused unless `fstat` says it is a regular file
///   ([`ProcError::NotRegular`]); a socket, which `open` refuses with
///   `ENXIO`, is reported the same way;
/// - at most [`MAX_FILE_BYTES`] read ([`ProcError::TooLarge`] beyond).
///
/// One pass over the file: proc's seq_file files produce each record whole
/// within a read, so a single pass gives consistent lines.
pub fn read_file(path: &Path) -> Result<String, ProcError> {
    read_file_capped(path, MAX_FILE_BYTES)
}

/// [`read_file`] with a cap of `max_bytes`.
pub fn read_file_capped(path: &Path, max_bytes: u64) -> Result<String, ProcError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;

    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| {
            // Name the file type when that is why the open failed (a
            // socket gives ENXIO, which says nothing to an operator).
            match std::fs::metadata(path) {
                Ok(m) if !m.file_type().is_file() && !m.is_dir() => ProcError::NotRegular {
                    path: path.display().to_string(),
                    file_type: file_type_name(&m.file_type()),
                },
                _ => ProcError::io(path, e),
            }
        })?;
    let meta = file.metadata().map_err(|e| ProcError::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(ProcError::NotRegular {
            path: path.display().to_string(),
            file_type: file_type_name(&meta.file_type()),
        });
    }
    let mut bytes = Vec::new();
    // One byte past the cap tells "exactly at the cap" from "over it".
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| ProcError::io(path, e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(ProcError::TooLarge {
            path: path.display().to_string(),
            max_bytes,
        });
    }
    Ok(escape_non_utf8(bytes))
}

/// Text from bytes the kernel does not promise are UTF-8: valid UTF-8 as is,
/// each invalid byte as `\xNN`. The kernel's own text is ASCII; what is not
/// comes from names users choose (an interface may be named with any bytes
/// but `/`, `:`, NUL and whitespace), and such a name must neither fail the
/// whole file nor be left out. The escape keeps two names that differ in an
/// invalid byte distinct (a name that spells `\x` itself aside), adds no
/// whitespace, and
/// is the same whether the name comes from `/proc/net/dev` or a directory
/// listing ([`name_from_os`]).
pub fn escape_non_utf8(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => {
            let bytes = e.into_bytes();
            let mut out = String::with_capacity(bytes.len() + 8);
            for chunk in bytes.utf8_chunks() {
                out.push_str(chunk.valid());
                for b in chunk.invalid() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
            }
            out
        }
    }
}

/// A file name from a directory listing, as [`escape_non_utf8`] writes it.
pub fn name_from_os(name: &std::ffi::OsStr) -> String {
    use std::os::unix::ffi::OsStrExt;
    escape_non_utf8(name.as_bytes().to_vec())
}

/// A file type, as [`ProcError::NotRegular`] names it.
pub(crate) fn file_type_name(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_file() {
        "regular file"
    } else {
        "unknown file type"
    }
}

/// Parse a decimal `u64` token; `what` names the field in the error.
pub(crate) fn dec_u64(tok: &str, file: &str, line: usize, what: &str) -> Result<u64, ProcError> {
    // `u64::from_str` accepts a leading '+', which the kernel never prints.
    if tok.starts_with('+') {
        return Err(bad_number(tok, file, line, what));
    }
    tok.parse().map_err(|_| bad_number(tok, file, line, what))
}

/// Parse a hexadecimal `u64` token (no `0x` prefix, as the kernel prints
/// with `%x`/`%X`); `what` names the field in the error.
pub(crate) fn hex_u64(tok: &str, file: &str, line: usize, what: &str) -> Result<u64, ProcError> {
    if tok.is_empty() || !tok.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad_number(tok, file, line, what));
    }
    u64::from_str_radix(tok, 16).map_err(|_| bad_number(tok, file, line, what))
}

fn bad_number(tok: &str, file: &str, line: usize, what: &str) -> ProcError {
    ProcError::malformed(file, line, format!("{what}: invalid number {tok:?}"))
}

/// Shared assertions for the parsers' tests.
#[cfg(test)]
pub(crate) mod testutil {
    use super::ProcError;

    /// The expected error of a bad-input case.
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum Want {
        /// `Malformed` at `line`, with `reason` containing the text.
        Malformed(usize, &'static str),
        /// `Missing`, with `what` containing the text.
        Missing(&'static str),
        /// `NotRegular`, of this file type.
        NotRegular(&'static str),
    }

    /// Assert that `got` is the error `want`, naming `file`.
    #[track_caller]
    pub(crate) fn assert_err<T: std::fmt::Debug>(
        case: &str,
        got: Result<T, ProcError>,
        file: &str,
        want: Want,
    ) {
        match (got, want) {
            (
                Err(ProcError::Malformed {
                    file: f,
                    line,
                    reason,
                }),
                Want::Malformed(want_line, needle),
            ) => {
                assert_eq!(f, file, "{case}: file");
                assert_eq!(line, want_line, "{case}: line ({reason})");
                assert!(
                    reason.contains(needle),
                    "{case}: reason {reason:?} lacks {needle:?}"
                );
            }
            (Err(ProcError::Missing { file: f, what }), Want::Missing(needle)) => {
                assert_eq!(f, file, "{case}: file");
                assert!(
                    what.contains(needle),
                    "{case}: what {what:?} lacks {needle:?}"
                );
            }
            (Err(ProcError::NotRegular { path: f, file_type }), Want::NotRegular(want_type)) => {
                assert_eq!(f, file, "{case}: file");
                assert_eq!(file_type, want_type, "{case}: file type");
            }
            (got, want) => panic!("{case}: got {got:?}, want {want:?}"),
        }
    }

    /// The online CPUs of this machine, from sysfs, for the live tests.
    pub(crate) fn online_cpus() -> Vec<u32> {
        let text = std::fs::read_to_string("/sys/devices/system/cpu/online")
            .expect("reading /sys/devices/system/cpu/online");
        super::cpulist::parse_cpu_list(&text, "/sys/devices/system/cpu/online")
            .expect("parsing /sys/devices/system/cpu/online")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_join_and_name_the_path_on_error() {
        let root = Root::new("/nonexistent-perch-root");
        assert_eq!(
            root.path("net/dev"),
            PathBuf::from("/nonexistent-perch-root/net/dev")
        );
        match root.read("net/dev") {
            Err(ProcError::Io { path, source }) => {
                assert_eq!(path, "/nonexistent-perch-root/net/dev");
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected Io error, got {other:?}"),
        }
        assert_eq!(Root::proc().path("stat"), PathBuf::from("/proc/stat"));
        assert_eq!(
            Root::sys().path("class/net"),
            PathBuf::from("/sys/class/net")
        );
        let err = Root::new("/nonexistent-perch-root").read("x").unwrap_err();
        assert_eq!(
            err.to_string().split(':').next(),
            Some("reading /nonexistent-perch-root/x")
        );
    }

    /// Bytes that are not UTF-8 become `\xNN`, one escape per byte, and the
    /// rest of the file is kept; a file read and a directory name agree.
    #[test]
    fn non_utf8_bytes_are_escaped_not_lost() {
        assert_eq!(escape_non_utf8(b"lo eth0\n".to_vec()), "lo eth0\n");
        assert_eq!(escape_non_utf8(b"d\xffx: 1 2\n".to_vec()), "d\\xffx: 1 2\n");
        // A truncated multi-byte sequence and a lone continuation byte.
        assert_eq!(
            escape_non_utf8(b"\xe2\x82 \x80".to_vec()),
            "\\xe2\\x82 \\x80"
        );
        // Valid multi-byte text is untouched.
        assert_eq!(escape_non_utf8("é€".as_bytes().to_vec()), "é€");
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(
            name_from_os(std::ffi::OsStr::from_bytes(b"d\xffx")),
            escape_non_utf8(b"d\xffx".to_vec())
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("dev");
        std::fs::write(&f, b"d\xffx: 5\n").unwrap();
        assert_eq!(read_file(&f).unwrap(), "d\\xffx: 5\n");
    }

    /// What is not a regular file is refused before a byte is read, naming
    /// the path and the type; what is over the cap is refused naming the cap.
    #[test]
    fn read_file_refuses_what_is_not_a_bounded_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let sock = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let cases: &[(&Path, &str)] = &[
            (&fifo, "FIFO"),
            (&zero, "character device"),
            (&sock, "socket"),
            (dir.path(), "directory"),
        ];
        for &(path, want) in cases {
            let started = std::time::Instant::now();
            match read_file(path) {
                Err(ProcError::NotRegular { path: p, file_type }) => {
                    assert_eq!(p, path.display().to_string());
                    assert_eq!(file_type, want, "{}", path.display());
                    let msg = read_file(path).unwrap_err().to_string();
                    assert!(
                        msg.contains(&p) && msg.contains(want),
                        "message names path and type: {msg}"
                    );
                }
                other => panic!("{}: expected NotRegular, got {other:?}", path.display()),
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(1));
        }

        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 4097]).unwrap();
        match read_file_capped(&big, 4096) {
            Err(ProcError::TooLarge { path, max_bytes }) => {
                assert_eq!(path, big.display().to_string());
                assert_eq!(max_bytes, 4096);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(read_file_capped(&big, 4096)
            .unwrap_err()
            .to_string()
            .contains("4096 bytes"));
        // Exactly at the cap is fine.
        assert_eq!(read_file_capped(&big, 4097).unwrap().len(), 4097);
        // The default cap, on a file just over it.
        let huge = dir.path().join("huge");
        let f = std::fs::File::create(&huge).unwrap();
        f.set_len(MAX_FILE_BYTES + 1).unwrap();
        assert!(matches!(
            read_file(&huge),
            Err(ProcError::TooLarge {
                max_bytes: MAX_FILE_BYTES,
                ..
            })
        ));
        // A symlink to a regular file is read (container roots are often
        // bind mounts or links).
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&big, &link).unwrap();
        assert_eq!(read_file(&link).unwrap().len(), 4097);
        // Real procfs files are regular and read whole.
        assert!(Root::proc().read("stat").unwrap().contains("btime"));
    }

    #[test]
    fn number_helpers() {
        let cases: &[(&str, bool, Option<u64>)] = &[
            ("0", false, Some(0)),
            ("18446744073709551615", false, Some(u64::MAX)),
            ("18446744073709551616", false, None),
            ("+1", false, None),
            ("-1", false, None),
            ("", false, None),
            ("1O", false, None),
            ("00c0ffee", true, Some(0xc0ffee)),
            ("FFFFFFFF", true, Some(0xffff_ffff)),
            ("+1", true, None),
            ("0x10", true, None),
            ("", true, None),
        ];
        for &(tok, hex, want) in cases {
            let got = if hex {
                hex_u64(tok, "f", 3, "col")
            } else {
                dec_u64(tok, "f", 3, "col")
            };
            match (got, want) {
                (Ok(v), Some(w)) => assert_eq!(v, w, "{tok:?}"),
                (
                    Err(ProcError::Malformed {
                        line: 3, reason, ..
                    }),
                    None,
                ) => {
                    assert!(reason.contains("col") && reason.contains(tok), "{reason}")
                }
                (got, want) => panic!("{tok:?} hex={hex}: got {got:?}, want {want:?}"),
            }
        }
    }
}
