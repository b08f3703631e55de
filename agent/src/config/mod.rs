//! Perch's configuration: `perch.toml`, `PERCH_*` overrides and validation.
//!
//! Sources, highest precedence first:
//!
//! 1. command-line flags, which `main` writes onto the loaded [`Config`]
//!    before calling [`Config::validate`];
//! 2. `PERCH_*` environment variables ([`Config::apply_env`]; the names are
//!    the `ENV_*` constants below and [`env_mode_var`]);
//! 3. the file given with `--config PATH`, else [`DEFAULT_PATH`] if it
//!    exists ([`Config::load`]);
//! 4. built-in defaults ([`Config::default`], written out with comments in
//!    `deploy/perch.toml`).
//!
//! Every table is `deny_unknown_fields`, so a typo is an error rather than
//! a silently ignored option. Errors from a file name the file, the line and
//! the dotted key (`perch.toml:7: agent.interval_secs: must be between 1 and
//! 3600 (got 0)`), which is what `perch validate` prints.
//!
//! Line numbers come from the spans of `toml`'s own parse tree
//! ([`toml::de::DeTable`]): decode errors carry a byte span that is mapped
//! back to the key it falls in, and range errors found after decoding look
//! their key up by path with [`line_of_key`]. Checks of other config
//! modules report a dotted key too ([`export`]'s range errors are converted
//! here; new checks can return [`ConfigError::invalid`]) and get their line
//! filled in the same way by [`ConfigError::locate`].

mod diagnostics;
mod env;
mod error;
pub mod export;
mod pipeline;
#[cfg(test)]
mod tests;
mod validate;

pub(crate) use crate::range::check_range;
pub use diagnostics::line_of_key;
use diagnostics::*;
pub use error::ConfigError;
use validate::*;

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

pub use crate::families::{ProbeConfig, ProbesConfig};
use crate::gate::{Family, Mode};

/// The config file read when `--config` is not given, if it exists.
pub const DEFAULT_PATH: &str = "/etc/perch/perch.toml";

/// Overrides `agent.interval_secs`.
pub const ENV_INTERVAL_SECS: &str = "PERCH_INTERVAL_SECS";
/// Overrides `agent.listen`.
pub const ENV_LISTEN: &str = "PERCH_LISTEN";
/// Overrides `agent.log_level`.
pub const ENV_LOG_LEVEL: &str = "PERCH_LOG_LEVEL";
/// Overrides `agent.log_format`.
pub const ENV_LOG_FORMAT: &str = "PERCH_LOG_FORMAT";
/// Overrides `agent.proc_root`.
pub const ENV_PROC_ROOT: &str = "PERCH_PROC_ROOT";
/// Overrides `agent.sys_root`.
pub const ENV_SYS_ROOT: &str = "PERCH_SYS_ROOT";
/// Comma-separated hook types never to use (`probes.skip_hooks`).
pub const ENV_SKIP_HOOKS: &str = "PERCH_PROBES_SKIP_HOOKS";

/// Allowed values of `agent.interval_secs`. One second is the finest step
/// the in-kernel histograms are read at; an hour is the coarsest interval at
/// which cumulative counters still make sense to a backend's rate().
pub const INTERVAL_SECS_RANGE: RangeInclusive<u64> = 1..=3600;

/// The variable that overrides `probes.<family>.mode`, e.g.
/// `PERCH_PROBES_SCHED_MODE` for [`Family::Sched`].
pub fn env_mode_var(family: Family) -> String {
    format!("PERCH_PROBES_{}_MODE", family.name().to_ascii_uppercase())
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[agent]`: scrape interval, listener, host roots, logging.
    pub agent: AgentConfig,
    /// `[probes]`: per-family mode and options.
    pub probes: ProbesConfig,
    /// `[export]`: OTLP push.
    pub export: export::ExportConfig,
    /// `[pipeline]`: label hygiene and cardinality.
    pub pipeline: export::PipelineConfig,
}

/// `[agent]`: process-wide settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Seconds between two collections. Range 1..=3600, default 10.
    pub interval_secs: u64,
    /// Address of the Prometheus `/metrics` and health listener, as
    /// `IP:port` (no host names). Default `127.0.0.1:9464`.
    pub listen: SocketAddr,
    /// Where procfs is mounted; `/host/proc` when running in a container
    /// with the host's `/proc` bind-mounted. Absolute. Default `/proc`.
    pub proc_root: PathBuf,
    /// Where sysfs is mounted (`/host/sys` in a container). Absolute.
    /// Default `/sys`.
    pub sys_root: PathBuf,
    /// `tracing` filter: a level (`info`) or `target=level` directives
    /// separated by commas (`info,perch::gate=debug`). Default `info`.
    pub log_level: String,
    /// Log line format. Default `text`.
    pub log_format: LogFormat,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            interval_secs: 10,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            proc_root: PathBuf::from("/proc"),
            sys_root: PathBuf::from("/sys"),
            log_level: "info".to_owned(),
            log_format: LogFormat::Text,
        }
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (journald adds its own timestamp).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format `{other}`, expected one of text, json"
            )),
        }
    }
}

impl Config {
    /// Parses and validates the TOML `text` of the file named `path` (used
    /// only in messages). An empty text gives [`Config::default`].
    pub fn from_toml_str(text: &str, path: &str) -> Result<Config, ConfigError> {
        let config = toml::from_str::<Config>(text).map_err(|e| decode_error(&e, text, path))?;
        config.validate().map_err(|e| e.locate(text, path))?;
        Ok(config)
    }

    /// Reads the file at `path` (`--config`), else [`DEFAULT_PATH`] if it
    /// exists, else returns the defaults. Returns the file that was used.
    /// Environment and CLI overrides are applied by the caller.
    pub fn load(path: Option<&Path>) -> Result<(Config, Option<PathBuf>), ConfigError> {
        Self::load_with_default(path, Path::new(DEFAULT_PATH))
    }

    fn load_with_default(
        path: Option<&Path>,
        default_path: &Path,
    ) -> Result<(Config, Option<PathBuf>), ConfigError> {
        let chosen = match path {
            Some(p) => p.to_path_buf(),
            None => match default_path.try_exists() {
                Ok(true) => default_path.to_path_buf(),
                Ok(false) => return Ok((Config::default(), None)),
                // Existence unknown (e.g. /etc/perch not searchable): an
                // operator must look, rather than us running on defaults.
                Err(source) => {
                    return Err(ConfigError::Io {
                        path: default_path.to_path_buf(),
                        source,
                    })
                }
            },
        };
        let text = std::fs::read_to_string(&chosen).map_err(|source| ConfigError::Io {
            path: chosen.clone(),
            source,
        })?;
        let config = Config::from_toml_str(&text, &chosen.display().to_string())?;
        Ok((config, Some(chosen)))
    }

    /// `agent.interval_secs` as a duration.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.agent.interval_secs)
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}
