//! Memory limiter: a soft and a hard limit on the agent's resident memory.
//!
//! Past the soft limit the pipeline sheds per-peer detail (folds it into the
//! `other` series); past the hard limit the OTLP exporter refuses new data.
//! The run loop creates one [`MemoryGauge`] and hands it to both: the
//! pipeline writes what it measured at the last interval, the exporter reads
//! it.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// Where resident memory stands against the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MemoryState {
    /// Under the soft limit.
    Normal = 0,
    /// Over the soft limit: detail series are shed.
    Soft = 1,
    /// Over the hard limit: new data is refused.
    Hard = 2,
}

/// The limiter's state, shared by the pipeline (which measures) and the
/// exporter (which refuses data at [`MemoryState::Hard`]).
#[derive(Debug, Clone, Default)]
pub struct MemoryGauge(Arc<AtomicU8>);

impl MemoryGauge {
    /// The state measured at the last pipeline interval.
    pub fn get(&self) -> MemoryState {
        match self.0.load(Ordering::Relaxed) {
            2 => MemoryState::Hard,
            1 => MemoryState::Soft,
            _ => MemoryState::Normal,
        }
    }

    pub(crate) fn set(&self, s: MemoryState) {
        self.0.store(s as u8, Ordering::Relaxed);
    }
}

/// Classifies `rss` bytes against the limits.
pub fn classify(rss: u64, soft: u64, hard: u64) -> MemoryState {
    if rss > hard {
        MemoryState::Hard
    } else if rss > soft {
        MemoryState::Soft
    } else {
        MemoryState::Normal
    }
}

/// Resident set size of this process, from `/proc/self/statm`.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    parse_statm_rss(&statm, page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// `statm` fields: size resident shared text lib data dt (pages).
pub fn parse_statm_rss(statm: &str, page: u64) -> Option<u64> {
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_limits() {
        let cases = [
            (10, MemoryState::Normal),
            (100, MemoryState::Normal),
            (101, MemoryState::Soft),
            (200, MemoryState::Soft),
            (201, MemoryState::Hard),
        ];
        for (rss, want) in cases {
            assert_eq!(classify(rss, 100, 200), want, "rss {rss}");
        }
    }

    #[test]
    fn statm() {
        assert_eq!(
            parse_statm_rss("1000 250 30 1 0 400 0\n", 4096),
            Some(250 * 4096)
        );
        assert_eq!(parse_statm_rss("1000", 4096), None);
        assert_eq!(parse_statm_rss("", 4096), None);
    }

    /// `VmRSS` of `/proc/self/status`, in bytes.
    fn vm_rss() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no VmRSS in /proc/self/status:\n{status}"));
        kb * 1024
    }

    /// The live statm read is this process's RSS as the kernel reports it
    /// elsewhere. `VmRSS` (fs/proc/task_mmu.c `task_mem`) and statm's
    /// `resident` (`task_statm`) come from the same per-mm counters, the sum
    /// of anon, file and shmem pages; `VmRSS` is in kB, statm in pages. They
    /// differ only by what changed between the reads, so the statm value is
    /// checked against `VmRSS` read just before and just after it. The 1 MiB
    /// slack covers the other test threads of this binary (cargo runs tests
    /// in parallel in one process), which may fault pages in and free them
    /// again within the microseconds of the three reads; it is small against
    /// what a wrong reading gives: the virtual size (field 1) counts every
    /// mapping, thread stacks included, and a wrong page size is off by a
    /// factor of 4 or more.
    #[test]
    fn live_statm_rss_is_vm_rss() {
        const SLACK: u64 = 1 << 20;
        let before = vm_rss();
        let rss = rss_bytes().expect("reading /proc/self/statm");
        let after = vm_rss();
        let (lo, hi) = (before.min(after), before.max(after));
        assert!(
            lo.saturating_sub(SLACK) <= rss && rss <= hi + SLACK,
            "statm RSS {rss} B, VmRSS {before} B before and {after} B after"
        );
    }
}
