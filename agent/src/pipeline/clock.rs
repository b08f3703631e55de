//! Clock-jump guard: points carry wall-clock time, intervals run on the
//! monotonic clock.
//!
//! If the wall clock steps back (NTP correction, a VM restored from a
//! snapshot), a naive exporter would send points older than the previous
//! ones, which backends reject or misorder. The guard keeps the exported
//! time moving forward by the monotonic elapsed time until the wall clock
//! catches up again, then follows the wall clock.

use std::time::{Duration, Instant, SystemTime};

/// Keeps exported timestamps monotonic across wall-clock steps.
#[derive(Debug, Default)]
pub struct ClockGuard {
    last_wall: Option<SystemTime>,
    last_out: Option<SystemTime>,
    last_mono: Option<Instant>,
}

/// What [`ClockGuard::adjust`] decided for one collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adjusted {
    /// The timestamp to export.
    pub time: SystemTime,
    /// How far `time` is ahead of the wall clock (zero normally).
    pub shift: Duration,
    /// The wall clock went backwards since the previous collection.
    pub jumped_back: bool,
}

impl ClockGuard {
    /// Adjusts the wall-clock `wall` read at monotonic instant `mono`.
    pub fn adjust(&mut self, wall: SystemTime, mono: Instant) -> Adjusted {
        let jumped_back = self.last_wall.is_some_and(|w| wall < w);
        let time = match (self.last_out, self.last_mono) {
            (Some(out), Some(m)) if wall <= out => {
                // At least 1 ms forward so two points never share a time.
                out + mono
                    .saturating_duration_since(m)
                    .max(Duration::from_millis(1))
            }
            _ => wall,
        };
        self.last_wall = Some(wall);
        self.last_out = Some(time);
        self.last_mono = Some(mono);
        Adjusted {
            time,
            shift: time.duration_since(wall).unwrap_or_default(),
            jumped_back,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn exported_time_never_goes_back() {
        // (wall ms, monotonic ms since start, want exported ms, want jump)
        let cases: &[(u64, u64, u64, bool)] = &[
            (4_000_000, 0, 4_000_000, false),
            (4_010_000, 10_000, 4_010_000, false),
            // Wall clock stepped back an hour: follow the monotonic clock.
            (4_010_000 - 3_600_000 + 10_000, 20_000, 4_020_000, true),
            (4_010_000 - 3_600_000 + 20_000, 30_000, 4_030_000, false),
            // Wall clock stepped forward past the exported time: follow it.
            (4_100_000, 40_000, 4_100_000, false),
            // A small step back (1 s).
            (4_099_000, 50_000, 4_110_000, true),
            (4_120_000, 60_000, 4_120_000, false),
        ];
        let mut g = ClockGuard::default();
        let start = Instant::now();
        let mut prev = None;
        for &(wall, mono, want, want_jump) in cases {
            let a = g.adjust(t(wall), start + Duration::from_millis(mono));
            assert_eq!(a.time, t(want), "wall {wall}");
            assert_eq!(a.jumped_back, want_jump, "wall {wall}");
            assert_eq!(a.shift, Duration::from_millis(want - wall), "wall {wall}");
            if let Some(p) = prev {
                assert!(a.time > p, "time went back at wall {wall}");
            }
            prev = Some(a.time);
        }
    }

    #[test]
    fn same_wall_time_twice_still_advances() {
        let mut g = ClockGuard::default();
        let m = Instant::now();
        let a = g.adjust(t(1000), m);
        let b = g.adjust(t(1000), m);
        assert!(b.time > a.time);
    }
}
