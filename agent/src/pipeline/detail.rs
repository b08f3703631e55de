//! Adaptive detail: sample per-peer series down while the host is healthy,
//! capture everything when it breaks.
//!
//! Each interval the host's error ratio is the largest of these, computed on
//! the interval's deltas of cumulative counters in the snapshot itself:
//!
//! | ratio | numerator | denominator |
//! |---|---|---|
//! | retransmits | `perch.tcp.retransmits` | `system.network.packet.count` with `network.io.direction=transmit` (all directions when no point carries the attribute): packets sent stand in for segments sent |
//! | connection failures | `perch.tcp.connections.failed` | `perch.tcp.connections.opened` + `perch.tcp.connections.failed` (attempts) |
//! | drops | `perch.network.packet.drops` | `system.network.packet.count` (all directions) |
//!
//! A ratio whose inputs are missing, or whose denominator did not grow, is
//! left out; with none left there is no verdict and the mode does not
//! change. A counter that went down (reset) skips that interval.
//!
//! Hysteresis: the mode goes to full detail as soon as the ratio exceeds
//! the enter threshold (a failure must be seen at once), and back to reduced
//! only after `exit_intervals` intervals in a row below the lower exit
//! threshold, so a ratio hovering around one threshold never flaps.

use crate::model::{Data, Snapshot};

/// The attribute that identifies a peer in per-peer series.
pub const PEER_ATTRIBUTE: &str = "network.peer.address";
/// The value of the folded series of the peers left out.
pub const OTHER_PEER: &str = crate::catalogue::OTHER_PEER;

const RETRANSMITS: &str = crate::catalogue::TCP_RETRANSMITS;
const CONN_OPENED: &str = crate::catalogue::TCP_OPENED;
const CONN_FAILED: &str = crate::catalogue::TCP_FAILED;
const DROPS: &str = crate::catalogue::PACKET_DROPS;
const PACKETS: &str = crate::catalogue::NETWORK_PACKETS;
const DIRECTION: &str = "network.io.direction";

/// Detail level of per-peer series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetailMode {
    /// Only the top-K peers of each metric; the rest fold into `other`.
    Reduced,
    /// Every peer, up to the series cap.
    Full,
}

impl DetailMode {
    /// Name used in the `perch.pipeline.detail.mode` self-metric.
    pub fn as_str(self) -> &'static str {
        match self {
            DetailMode::Reduced => "reduced",
            DetailMode::Full => "full",
        }
    }
}

/// Totals of the feed counters in one snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Totals {
    retransmits: Option<f64>,
    opened: Option<f64>,
    failed: Option<f64>,
    drops: Option<f64>,
    packets: Option<f64>,
    packets_tx: Option<f64>,
}

fn totals(snapshot: &Snapshot) -> Totals {
    let mut t = Totals::default();
    let mut tx_seen = false;
    for m in &snapshot.metrics {
        let Data::Sum { points, .. } = &m.data else {
            continue;
        };
        let sum = |pts: &mut dyn Iterator<Item = f64>| pts.sum::<f64>();
        match m.name {
            RETRANSMITS => t.retransmits = Some(sum(&mut points.iter().map(|p| p.value.as_f64()))),
            CONN_OPENED => t.opened = Some(sum(&mut points.iter().map(|p| p.value.as_f64()))),
            CONN_FAILED => t.failed = Some(sum(&mut points.iter().map(|p| p.value.as_f64()))),
            DROPS => t.drops = Some(sum(&mut points.iter().map(|p| p.value.as_f64()))),
            PACKETS => {
                t.packets = Some(sum(&mut points.iter().map(|p| p.value.as_f64())));
                let mut tx = 0.0;
                for p in points {
                    if let Some((_, v)) = p.attributes.iter().find(|(k, _)| *k == DIRECTION) {
                        tx_seen = true;
                        if v.to_string() == "transmit" {
                            tx += p.value.as_f64();
                        }
                    }
                }
                t.packets_tx = if tx_seen { Some(tx) } else { t.packets };
            }
            _ => {}
        }
    }
    t
}

/// Computes the interval error ratio from consecutive snapshots.
#[derive(Debug, Default)]
pub struct ErrorRatio {
    prev: Option<Totals>,
}

impl ErrorRatio {
    /// The error ratio of the interval ending with `snapshot`, if any input
    /// is present in this and the previous snapshot.
    pub fn observe(&mut self, snapshot: &Snapshot) -> Option<f64> {
        let now = totals(snapshot);
        let prev = self.prev.replace(now)?;
        let delta = |a: Option<f64>, b: Option<f64>| -> Option<f64> {
            let d = a? - b?;
            (d >= 0.0).then_some(d)
        };
        let ratio = |num: Option<f64>, den: Option<f64>| -> Option<f64> {
            let (n, d) = (num?, den?);
            (d > 0.0).then(|| (n / d).min(1.0))
        };
        let d_retr = delta(now.retransmits, prev.retransmits);
        let d_tx = delta(now.packets_tx, prev.packets_tx);
        let d_opened = delta(now.opened, prev.opened);
        let d_failed = delta(now.failed, prev.failed);
        let d_attempts = match (d_opened, d_failed) {
            (Some(o), Some(f)) => Some(o + f),
            (None, Some(f)) => Some(f),
            _ => None,
        };
        let d_drops = delta(now.drops, prev.drops);
        let d_packets = delta(now.packets, prev.packets);
        [
            ratio(d_retr, d_tx),
            ratio(d_failed, d_attempts),
            ratio(d_drops, d_packets),
        ]
        .into_iter()
        .flatten()
        .reduce(f64::max)
    }
}

/// The mode switch with hysteresis.
#[derive(Debug)]
pub struct DetailController {
    mode: DetailMode,
    enter: f64,
    exit: f64,
    exit_intervals: u32,
    healthy_streak: u32,
}

impl DetailController {
    /// Starts in reduced detail.
    pub fn new(enter: f64, exit: f64, exit_intervals: u32) -> Self {
        Self {
            mode: DetailMode::Reduced,
            enter,
            exit,
            exit_intervals: exit_intervals.max(1),
            healthy_streak: 0,
        }
    }

    /// The current mode.
    pub fn mode(&self) -> DetailMode {
        self.mode
    }

    /// Feeds one interval's ratio (None: no verdict) and returns the mode.
    pub fn update(&mut self, ratio: Option<f64>) -> DetailMode {
        let Some(r) = ratio else {
            return self.mode;
        };
        match self.mode {
            DetailMode::Reduced => {
                if r > self.enter {
                    self.mode = DetailMode::Full;
                    self.healthy_streak = 0;
                }
            }
            DetailMode::Full => {
                if r < self.exit {
                    self.healthy_streak += 1;
                    if self.healthy_streak >= self.exit_intervals {
                        self.mode = DetailMode::Reduced;
                        self.healthy_streak = 0;
                    }
                } else {
                    self.healthy_streak = 0;
                }
            }
        }
        self.mode
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Attributes, Metric, Number, NumberPoint};
    use std::time::SystemTime;

    #[test]
    fn hysteresis_never_flaps() {
        // (ratio, expected mode after it); enter 2 %, exit 1 %, 3 intervals.
        let steps: &[(Option<f64>, DetailMode)] = &[
            (Some(0.0), DetailMode::Reduced),
            (Some(0.019), DetailMode::Reduced),
            (Some(0.021), DetailMode::Full),
            // Between the thresholds: stays full, streak stays 0.
            (Some(0.015), DetailMode::Full),
            (Some(0.005), DetailMode::Full),
            (Some(0.005), DetailMode::Full),
            // Streak broken by a value above exit.
            (Some(0.012), DetailMode::Full),
            (Some(0.005), DetailMode::Full),
            (None, DetailMode::Full),
            (Some(0.005), DetailMode::Full),
            (Some(0.005), DetailMode::Reduced),
            // Oscillating around the exit threshold in reduced mode: stays.
            (Some(0.011), DetailMode::Reduced),
            (Some(0.009), DetailMode::Reduced),
            (Some(0.02), DetailMode::Reduced),
            (Some(1.0), DetailMode::Full),
        ];
        let mut c = DetailController::new(0.02, 0.01, 3);
        for (i, &(r, want)) in steps.iter().enumerate() {
            assert_eq!(c.update(r), want, "step {i} ratio {r:?}");
        }
    }

    fn sum(name: &'static str, pts: &[(Attributes, i64)]) -> Metric {
        Metric {
            name,
            description: "",
            unit: "1",
            data: Data::Sum {
                monotonic: true,
                points: pts
                    .iter()
                    .map(|(a, v)| NumberPoint {
                        attributes: a.clone(),
                        start_time: Some(SystemTime::UNIX_EPOCH),
                        time: SystemTime::UNIX_EPOCH,
                        value: Number::Int(*v),
                    })
                    .collect(),
            },
        }
    }

    fn snap(metrics: Vec<Metric>) -> Snapshot {
        Snapshot {
            time: SystemTime::UNIX_EPOCH,
            metrics,
        }
    }

    #[test]
    fn error_ratio_inputs() {
        let tx: Attributes = vec![(DIRECTION, "transmit".into())];
        let rx: Attributes = vec![(DIRECTION, "receive".into())];
        struct Case {
            name: &'static str,
            first: Vec<Metric>,
            second: Vec<Metric>,
            want: Option<f64>,
        }
        let cases = vec![
            Case {
                name: "no inputs",
                first: vec![],
                second: vec![],
                want: None,
            },
            Case {
                name: "retransmits over transmitted packets",
                first: vec![
                    sum(RETRANSMITS, &[(vec![], 10)]),
                    sum(PACKETS, &[(tx.clone(), 1000), (rx.clone(), 5000)]),
                ],
                second: vec![
                    sum(RETRANSMITS, &[(vec![], 15)]),
                    sum(PACKETS, &[(tx.clone(), 1100), (rx.clone(), 9000)]),
                ],
                want: Some(0.05),
            },
            Case {
                name: "failed over attempted connections",
                first: vec![
                    sum(CONN_OPENED, &[(vec![], 100)]),
                    sum(CONN_FAILED, &[(vec![], 0)]),
                ],
                second: vec![
                    sum(CONN_OPENED, &[(vec![], 130)]),
                    sum(CONN_FAILED, &[(vec![], 10)]),
                ],
                want: Some(0.25),
            },
            Case {
                name: "largest ratio wins",
                first: vec![
                    sum(DROPS, &[(vec![], 0)]),
                    sum(PACKETS, &[(vec![], 0)]),
                    sum(RETRANSMITS, &[(vec![], 0)]),
                ],
                second: vec![
                    sum(DROPS, &[(vec![], 3)]),
                    sum(PACKETS, &[(vec![], 100)]),
                    sum(RETRANSMITS, &[(vec![], 1)]),
                ],
                want: Some(0.03),
            },
            Case {
                name: "no traffic: no verdict",
                first: vec![sum(DROPS, &[(vec![], 5)]), sum(PACKETS, &[(vec![], 100)])],
                second: vec![sum(DROPS, &[(vec![], 5)]), sum(PACKETS, &[(vec![], 100)])],
                want: None,
            },
            Case {
                name: "counter reset skips the interval",
                first: vec![sum(DROPS, &[(vec![], 50)]), sum(PACKETS, &[(vec![], 1000)])],
                second: vec![sum(DROPS, &[(vec![], 1)]), sum(PACKETS, &[(vec![], 1100)])],
                want: None,
            },
        ];
        for c in cases {
            let mut e = ErrorRatio::default();
            assert_eq!(e.observe(&snap(c.first)), None, "{}: first", c.name);
            let got = e.observe(&snap(c.second));
            match (got, c.want) {
                (Some(g), Some(w)) => assert!((g - w).abs() < 1e-9, "{}: {g} != {w}", c.name),
                (g, w) => assert_eq!(g, w, "{}", c.name),
            }
        }
    }
}
