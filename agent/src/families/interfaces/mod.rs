//! Interfaces family: byte, packet, error and drop counters per network
//! interface.
//!
//! - Hooks: none. The kernel keeps these counters per device
//!   (`dev_get_stats`); an eBPF probe could only count the same packets
//!   again, at a cost per packet. The family has no eBPF mode (like `cpu`).
//! - Metrics: `system.network.io`, `system.network.packet.count`,
//!   `system.network.errors`, `system.network.packet.dropped`.
//! - Fallback: `/sys/class/net/<if>/statistics/*`, or `/proc/net/dev`
//!   without sysfs (see `collector.rs`).
//! - Oldest kernel: any (2.6 formats are parsed).

mod collector;
pub mod net_dev;
pub mod sysfs_net;

use serde::Deserialize;

use crate::gate::rules::Rule;
use crate::gate::Mode;

use super::{BuildCtx, BuildError, Section, Unit};

pub use collector::{IfSource, InterfacesCollector, ATTR_DIRECTION, ATTR_INTERFACE};

pub const RULE: Rule = Rule {
    // The kernel's per-device counters (`dev_get_stats`) are exact; a
    // per-packet probe could only count the same packets again, at a cost
    // per packet. No eBPF mode, like `cpu`.
    variants: &[],
    fallback: Some("/sys/class/net/*/statistics (or /proc/net/dev without sysfs)"),
    fallback_loses: "nothing: these are the devices' own counters",
};

pub struct Interfaces;
pub static UNIT: Interfaces = Interfaces;

impl Unit for Interfaces {
    fn rule(&self) -> &'static Rule {
        &RULE
    }

    fn build(
        &self,
        ctx: &mut BuildCtx<'_>,
    ) -> Result<Box<dyn crate::collectors::Collector>, BuildError> {
        Ok(Box::new(InterfacesCollector::new(
            ctx.proc.clone(),
            ctx.sys.clone(),
            ctx.boot,
            ctx.config.interfaces.clone(),
        )))
    }
}

/// `[probes.interfaces]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `auto`, `ebpf`, `procfs` or `off`. Default `auto`.
    pub mode: Mode,
    /// Interfaces to report, as glob patterns (`*` any run of characters,
    /// `?` one character). Default `["*"]`.
    pub include: Vec<String>,
    /// Interfaces never to report, as glob patterns; wins over `include`.
    /// Default `[]`.
    pub exclude: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Auto,
            include: vec!["*".to_owned()],
            exclude: Vec::new(),
        }
    }
}

impl Config {
    /// Whether interface `ifname` is reported: it matches an `include`
    /// pattern and no `exclude` pattern.
    pub fn matches(&self, ifname: &str) -> bool {
        self.include.iter().any(|p| glob_match(p, ifname))
            && !self.exclude.iter().any(|p| glob_match(p, ifname))
    }
}

impl Section for Config {
    fn mode(&self) -> Mode {
        self.mode
    }
    fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }
    fn validate(&self) -> Result<(), (String, String)> {
        if self.include.is_empty() {
            return Err((
                "include".to_owned(),
                "must list at least one pattern; to report no interfaces set \
                 probes.interfaces.mode = \"off\""
                    .to_owned(),
            ));
        }
        for (list, name) in [(&self.include, "include"), (&self.exclude, "exclude")] {
            if let Some(i) = list.iter().position(String::is_empty) {
                return Err((
                    format!("{name}[{i}]"),
                    "empty pattern; use \"*\" to match every interface".to_owned(),
                ));
            }
        }
        Ok(())
    }
}

/// Matches `name` against a glob `pattern` where `*` matches any run of
/// characters (including none) and `?` exactly one; every other character
/// matches itself. Linear backtracking over the last `*`, so no pattern can
/// blow up.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // Position of the last `*` seen and the name position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                // Let the last `*` swallow one more character and retry.
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        let cases = [
            ("*", "eth0", true),
            ("*", "", true),
            ("", "", true),
            ("", "eth0", false),
            ("eth*", "eth0", true),
            ("eth*", "eth", true),
            ("eth*", "veth0", false),
            ("*eth*", "veth0", true),
            ("eth?", "eth0", true),
            ("eth?", "eth10", false),
            ("eth??", "eth10", true),
            ("en?s*", "enp0s3", false),
            ("en?s*", "ens3", false),
            ("en??s*", "enp0s3", true),
            ("*.100", "eth0.100", true),
            ("*.100", "eth0.1000", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbYcZ", false),
            ("a*b*c", "abcbc", true),
            ("**", "x", true),
            ("lo", "lo", true),
            ("lo", "lo0", false),
            ("br-*", "br-1a2b", true),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(glob_match(pattern, name), want, "{pattern:?} vs {name:?}");
        }
    }

    #[test]
    fn interface_filter_exclude_wins() {
        let f = Config {
            mode: Mode::Auto,
            include: vec!["eth*".into(), "veth1".into(), "lo".into()],
            exclude: vec!["veth*".into(), "lo".into()],
        };
        for (ifname, want) in [
            ("eth0", true),
            ("eth1", true),
            ("veth1", false),
            ("lo", false),
            ("wlan0", false),
        ] {
            assert_eq!(f.matches(ifname), want, "{ifname}");
        }
        let all = Config::default();
        assert!(all.matches("lo") && all.matches("docker0"));
    }
}
