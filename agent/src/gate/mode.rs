//! The modes a family can run in.

use serde::{Deserialize, Serialize};

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

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Ebpf => "ebpf",
            Mode::Procfs => "procfs",
            Mode::Off => "off",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
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
