//! `/sys/class/net/<if>/statistics/*`: the same per-interface counters as
//! [`super::net_dev`], one value per file, for the network namespace that
//! mounted sysfs.
//!
//! Differences from `/proc/net/dev`: `rx_dropped` here excludes
//! `rx_missed_errors`; and interfaces come and go while the directory is
//! read. An interface deleted between the listing and the reads is skipped:
//! its files are gone (`ENOENT`), or its kernfs nodes are deactivated
//! (`ENODEV`), or the device is unregistering and `netstat_show` refuses
//! (`EINVAL`, `net/core/net-sysfs.c`). Any other error is returned.
//!
//! `/sys/class/net` also holds plain files (`bonding_masters` with the
//! bonding module loaded); only directories are interfaces.

use std::io;
use std::path::Path;

use super::net_dev::IfStats;
use crate::sources::{dec_u64, ProcError, Root};

/// The directory of network interfaces under a [`Root`].
pub const CLASS_NET: &str = "class/net";

/// Read the counters of every interface under `root`, sorted by name.
pub fn read_sys_class_net(root: &Root) -> Result<Vec<(String, IfStats)>, ProcError> {
    let dir = root.path(CLASS_NET);
    let entries = std::fs::read_dir(&dir).map_err(|e| ProcError::io(&dir, e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ProcError::io(&dir, e))?;
        let path = entry.path();
        // Follow the symlink to the device directory.
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => continue,
            Err(e) if vanished(&e) => continue,
            Err(e) => return Err(ProcError::io(&path, e)),
        }
        let name = crate::sources::name_from_os(&entry.file_name());
        if let Some(stats) = read_interface_dir(&path)? {
            out.push((name, stats));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Read the counters of interface `name` under `root`; `None` if it does
/// not exist (or vanished while being read).
pub fn read_interface(root: &Root, name: &str) -> Result<Option<IfStats>, ProcError> {
    read_interface_dir(&root.path(CLASS_NET).join(name))
}

/// The most a `statistics/*` or `ifindex` file holds: one decimal number.
pub const MAX_COUNTER_FILE_BYTES: u64 = 64;

/// Reads one small sysfs file through the safe reader
/// ([`crate::sources::read_file_capped`]); `None` if it vanished (the
/// interface went away while being read).
pub fn read_small(path: &Path) -> Result<Option<String>, ProcError> {
    match crate::sources::read_file_capped(path, MAX_COUNTER_FILE_BYTES) {
        Ok(t) => Ok(Some(t)),
        Err(ProcError::Io { source, .. }) if vanished(&source) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads the counters of the interface directory `dir`.
pub fn read_interface_dir(dir: &Path) -> Result<Option<IfStats>, ProcError> {
    let stats = dir.join("statistics");
    let mut v = [0u64; 8];
    for (slot, file) in v.iter_mut().zip(FILES) {
        let path = stats.join(file);
        let Some(text) = read_small(&path)? else {
            return Ok(None);
        };
        let shown = path.display().to_string();
        let mut lines = text.lines();
        let (Some(value), None) = (lines.next(), lines.next()) else {
            return Err(ProcError::malformed(
                &shown,
                1,
                "expected one line with a number",
            ));
        };
        *slot = dec_u64(value.trim(), &shown, 1, file)?;
    }
    let [rx_bytes, rx_packets, rx_errors, rx_dropped, tx_bytes, tx_packets, tx_errors, tx_dropped] =
        v;
    Ok(Some(IfStats {
        rx_bytes,
        rx_packets,
        rx_errors,
        rx_dropped,
        tx_bytes,
        tx_packets,
        tx_errors,
        tx_dropped,
    }))
}

/// The statistics files read, in [`IfStats`] field order.
const FILES: [&str; 8] = [
    "rx_bytes",
    "rx_packets",
    "rx_errors",
    "rx_dropped",
    "tx_bytes",
    "tx_packets",
    "tx_errors",
    "tx_dropped",
];

/// Whether an error means the interface went away mid-read.
fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
        || matches!(e.raw_os_error(), Some(libc::ENODEV) | Some(libc::EINVAL))
}

#[cfg(test)]
mod tests {
    use super::super::net_dev::parse_net_dev;
    use super::*;
    use crate::sources::testutil::{assert_err, Want};
    use std::fs;

    fn fixture_root() -> Root {
        Root::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/procfs/linux-6.18/sys"
        ))
    }

    fn st(v: [u64; 8]) -> IfStats {
        let [rx_bytes, rx_packets, rx_errors, rx_dropped, tx_bytes, tx_packets, tx_errors, tx_dropped] =
            v;
        IfStats {
            rx_bytes,
            rx_packets,
            rx_errors,
            rx_dropped,
            tx_bytes,
            tx_packets,
            tx_errors,
            tx_dropped,
        }
    }

    /// Write an interface directory with the 8 files holding `values`.
    fn write_if(root: &Path, name: &str, values: [&str; 8]) {
        let dir = root.join(CLASS_NET).join(name).join("statistics");
        fs::create_dir_all(&dir).unwrap();
        for (f, v) in FILES.iter().zip(values) {
            fs::write(dir.join(f), v).unwrap();
        }
    }

    #[test]
    fn captured_tree() {
        let got = read_sys_class_net(&fixture_root()).expect("reading the fixture tree");
        let want = vec![
            (
                "eth0".to_owned(),
                st([456919637, 13934, 0, 0, 754200, 8097, 0, 0]),
            ),
            ("lo".to_owned(), st([9127, 127, 0, 0, 9127, 127, 0, 0])),
        ];
        assert_eq!(got, want);
        assert_eq!(
            read_interface(&fixture_root(), "lo").unwrap(),
            Some(want[1].1)
        );
        assert_eq!(read_interface(&fixture_root(), "nope0").unwrap(), None);
    }

    #[test]
    fn skips_non_interfaces_and_vanished_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let ones = ["1", "2", "3", "4", "5", "6", "7", "8\n"];
        write_if(tmp.path(), "veth0", ones);
        // Listed, then deleted before its statistics were read.
        fs::create_dir_all(tmp.path().join("class/net/gone0")).unwrap();
        // Deleted half-way: the first files read, the rest gone.
        write_if(tmp.path(), "gone1", ones);
        fs::remove_file(tmp.path().join("class/net/gone1/statistics/tx_bytes")).unwrap();
        // The bonding module's control file.
        fs::write(tmp.path().join("class/net/bonding_masters"), "bond0\n").unwrap();
        // A dangling symlink: the device directory went first.
        std::os::unix::fs::symlink(
            "/nonexistent/devices/gone2",
            tmp.path().join("class/net/gone2"),
        )
        .unwrap();
        let got = read_sys_class_net(&Root::new(tmp.path())).unwrap();
        assert_eq!(
            got,
            vec![("veth0".to_owned(), st([1, 2, 3, 4, 5, 6, 7, 8]))]
        );
    }

    #[test]
    fn errors() {
        type Setup = fn(&Path);
        let cases: &[(&str, Setup, &str, Option<Want>)] = &[
            (
                "garbage value",
                |r| write_if(r, "eth0", ["1", "2", "x3", "4", "5", "6", "7", "8"]),
                "class/net/eth0/statistics/rx_errors",
                Some(Want::Malformed(1, "rx_errors: invalid number \"x3\"")),
            ),
            (
                "empty value",
                |r| write_if(r, "eth0", ["1", "2", "3", "", "5", "6", "7", "8"]),
                "class/net/eth0/statistics/rx_dropped",
                Some(Want::Malformed(1, "expected one line")),
            ),
            (
                "two lines",
                |r| write_if(r, "eth0", ["1", "2", "3", "4", "5\n6\n", "6", "7", "8"]),
                "class/net/eth0/statistics/tx_bytes",
                Some(Want::Malformed(1, "expected one line")),
            ),
            (
                "a directory in place of a statistics file",
                |r| {
                    write_if(r, "eth0", ["1"; 8]);
                    let f = r.join("class/net/eth0/statistics/rx_packets");
                    fs::remove_file(&f).unwrap();
                    fs::create_dir(&f).unwrap();
                },
                "class/net/eth0/statistics/rx_packets",
                Some(Want::NotRegular("directory")),
            ),
            ("no class/net directory", |_| {}, "class/net", None),
        ];
        for (case, setup, rel, want) in cases {
            let tmp = tempfile::tempdir().unwrap();
            setup(tmp.path());
            let path = tmp.path().join(rel).display().to_string();
            let got = read_sys_class_net(&Root::new(tmp.path()));
            match want {
                Some(w) => assert_err(case, got, &path, *w),
                None => match got {
                    Err(ProcError::Io { path: p, .. }) => assert_eq!(p, path, "{case}"),
                    other => panic!("{case}: expected Io error, got {other:?}"),
                },
            }
        }
    }

    #[test]
    fn live_sys_class_net() {
        // /proc/net/dev first: counters only grow, so sysfs read after it
        // must show at least as much.
        let proc_text = fs::read_to_string("/proc/net/dev").expect("reading /proc/net/dev");
        let proc_ifs = parse_net_dev(&proc_text).expect("parsing /proc/net/dev");
        let sys_ifs = read_sys_class_net(&Root::sys()).expect("reading /sys/class/net");
        let find =
            |ifs: &[(String, IfStats)], n: &str| ifs.iter().find(|(x, _)| x == n).map(|(_, s)| *s);
        let p = find(&proc_ifs, "lo").expect("lo in /proc/net/dev");
        let s = find(&sys_ifs, "lo").expect("lo in /sys/class/net");
        assert!(
            s.rx_bytes >= p.rx_bytes && s.rx_packets >= p.rx_packets,
            "{p:?} {s:?}"
        );
        assert!(
            s.tx_bytes >= p.tx_bytes && s.tx_packets >= p.tx_packets,
            "{p:?} {s:?}"
        );
        // Strictly increasing: sorted, and so no duplicates (`dedup` alone
        // would miss a duplicate that is not next to its twin).
        let names: Vec<&str> = sys_ifs.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            names.windows(2).all(|w| w[0] < w[1]),
            "sorted, no duplicates: {names:?}"
        );
    }
}
