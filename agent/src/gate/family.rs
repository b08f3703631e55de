//! Metric families and the modes a family can run in.

use serde::{Deserialize, Serialize};

/// A metric family: the unit that is switched between eBPF, procfs and off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// `system.cpu.time`, `system.cpu.load_average.*` (procfs in every mode).
    Cpu,
    /// Context switches, run-queue latency, scheduler wait time.
    Sched,
    /// Softirq time and counts.
    Softirq,
    /// Interface byte, packet, error and drop counters.
    Interfaces,
    /// Connection counts by state.
    Connections,
    /// Per-peer TCP bytes, retransmits, RTT, connection lifecycle.
    Tcp,
    /// Packet drops with the kernel's drop reason.
    Drops,
}

impl Family {
    pub const ALL: [Family; 7] = [
        Family::Cpu,
        Family::Sched,
        Family::Softirq,
        Family::Interfaces,
        Family::Connections,
        Family::Tcp,
        Family::Drops,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Family::Cpu => "cpu",
            Family::Sched => "sched",
            Family::Softirq => "softirq",
            Family::Interfaces => "interfaces",
            Family::Connections => "connections",
            Family::Tcp => "tcp",
            Family::Drops => "drops",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The mode a family is asked to run in (`[probes.<family>] mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// eBPF where it loads, else the procfs fallback.
    #[default]
    Auto,
    /// eBPF or a start-up error.
    Ebpf,
    /// The procfs/sysfs/netlink fallback only.
    Procfs,
    /// Not collected.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Mode::Auto),
            "ebpf" => Ok(Mode::Ebpf),
            "procfs" => Ok(Mode::Procfs),
            "off" => Ok(Mode::Off),
            other => Err(format!(
                "unknown mode `{other}`, expected one of auto, ebpf, procfs, off"
            )),
        }
    }
}
