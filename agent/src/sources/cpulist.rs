//! CPU list files such as `/sys/devices/system/cpu/online` and `possible`:
//! comma-separated ranges, `0-3,8,10-11` (the kernel's `%*pbl` format).
//!
//! Needed to label per-CPU rows of files that skip offline CPUs without
//! saying which CPU a row is for (`/proc/net/softnet_stat` before 5.10).

use super::{dec_u64, ProcError, Root};

/// Path of the online-CPU list under a [`Root`].
pub const ONLINE: &str = "devices/system/cpu/online";

/// The highest CPU number accepted: `CONFIG_NR_CPUS` is at most 8192 on
/// every architecture Linux builds today; a number past this is garbage,
/// and would make the list allocate without bound (found by fuzzing:
/// `799-999989999`).
pub const MAX_CPU: u32 = 65_535;

/// Parse a CPU list (`0-3,8,10-11`) into ascending CPU numbers.
///
/// Ranges must be ascending and not overlap, as the kernel prints them. An
/// empty list (a blank line) is valid and yields no CPUs.
pub fn parse_cpu_list(text: &str, file: &str) -> Result<Vec<u32>, ProcError> {
    let line = text.trim();
    let mut cpus = Vec::new();
    if line.is_empty() {
        return Ok(cpus);
    }
    for part in line.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (cpu(lo, file)?, cpu(hi, file)?),
            None => {
                let c = cpu(part, file)?;
                (c, c)
            }
        };
        if lo > hi || cpus.last().is_some_and(|&last| last >= lo) {
            return Err(ProcError::malformed(
                file,
                1,
                format!("range {part:?} is out of order"),
            ));
        }
        cpus.extend(lo..=hi);
    }
    Ok(cpus)
}

fn cpu(tok: &str, file: &str) -> Result<u32, ProcError> {
    let v = dec_u64(tok, file, 1, "cpu number")?;
    u32::try_from(v)
        .ok()
        .filter(|&c| c <= MAX_CPU)
        .ok_or_else(|| ProcError::malformed(file, 1, format!("cpu number {v} out of range")))
}

/// Read and parse `/sys/devices/system/cpu/online` under `root`.
pub fn read_online_cpus(root: &Root) -> Result<Vec<u32>, ProcError> {
    let path = root.path(ONLINE);
    let text = super::read_file(&path)?;
    parse_cpu_list(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::testutil::{assert_err, online_cpus, Want};

    #[test]
    fn lists() {
        let cases: &[(&str, &[u32])] = &[
            ("0-1\n", &[0, 1]),
            ("0\n", &[0]),
            ("0,2-3\n", &[0, 2, 3]),
            ("0-3,8,10-11\n", &[0, 1, 2, 3, 8, 10, 11]),
            ("\n", &[]),
            ("", &[]),
        ];
        for &(text, want) in cases {
            assert_eq!(parse_cpu_list(text, "online").unwrap(), want, "{text:?}");
        }
    }

    #[test]
    fn bad_lists() {
        let cases: &[(&str, Want)] = &[
            ("0-x\n", Want::Malformed(1, "\"x\"")),
            ("3-1\n", Want::Malformed(1, "out of order")),
            ("0-3,2\n", Want::Malformed(1, "out of order")),
            ("0,,1\n", Want::Malformed(1, "\"\"")),
            ("4294967296\n", Want::Malformed(1, "out of range")),
            // Found by fuzzing: a range this wide allocated without bound.
            ("799-999989999\n", Want::Malformed(1, "out of range")),
        ];
        for &(text, want) in cases {
            assert_err(text, parse_cpu_list(text, "online"), "online", want);
        }
    }

    #[test]
    fn live_online_cpus() {
        let cpus = read_online_cpus(&Root::sys()).expect("reading the online CPU list");
        assert!(!cpus.is_empty());
        assert_eq!(cpus, online_cpus());
        let n = nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN)
            .expect("sysconf")
            .expect("_SC_NPROCESSORS_ONLN is supported");
        assert_eq!(usize::try_from(n).ok(), Some(cpus.len()), "{cpus:?}");
    }
}
