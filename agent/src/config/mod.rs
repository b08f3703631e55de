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
pub use env::known_env_vars;
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

/// The largest config file read: 1 MiB. The commented default config
/// (`deploy/perch.toml`) is under 20 KiB; a larger file is a mistake, and
/// without a cap a 50 MB file took 800 MB to validate.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a config file: a regular file (a symlink to one is fine) of at
/// most [`MAX_CONFIG_BYTES`]. The open is non-blocking, so a FIFO at the
/// path is refused instead of waiting forever for a writer.
pub fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |error| ConfigError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match std::fs::metadata(path) {
            Ok(m) if !m.is_file() && !m.is_dir() => not_regular(path, &m.file_type()),
            _ => io(e),
        })?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta.file_type()));
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!("larger than {MAX_CONFIG_BYTES} bytes, the cap on a config file"),
        )));
    }
    Ok(text)
}

fn not_regular(path: &Path, t: &std::fs::FileType) -> ConfigError {
    use std::os::unix::fs::FileTypeExt;
    let kind = if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    };
    ConfigError::Io {
        path: path.to_path_buf(),
        error: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{kind}, not a regular file; refusing to read it"),
        ),
    }
}

/// The dotted keys whose value differs between two config texts: added,
/// removed or changed, recursing into tables (`agent.interval_secs`,
/// `probes.tcp.mode`). Arrays compare whole. A text that does not parse
/// counts as empty. Used by SIGHUP to name what it cannot apply live.
pub fn changed_keys(old: &str, new: &str) -> Vec<String> {
    fn walk(prefix: &str, a: &toml::Table, b: &toml::Table, out: &mut Vec<String>) {
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for k in keys {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match (a.get(k), b.get(k)) {
                (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                    walk(&path, x, y, out)
                }
                (Some(toml::Value::Table(x)), None) => walk(&path, x, &toml::Table::new(), out),
                (None, Some(toml::Value::Table(y))) => walk(&path, &toml::Table::new(), y, out),
                (x, y) if x != y => out.push(path),
                _ => {}
            }
        }
    }
    let parse = |t: &str| toml::from_str::<toml::Table>(t).unwrap_or_default();
    let mut out = Vec::new();
    walk("", &parse(old), &parse(new), &mut out);
    out
}

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
/// Overrides `probes.btf_path`.
pub const ENV_BTF_PATH: &str = "PERCH_PROBES_BTF_PATH";

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
    /// Drop every capability after the programs are attached but what map
    /// reads still need on this kernel (CAP_BPF before Linux 6.5). Default
    /// true.
    pub drop_capabilities: bool,
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
            drop_capabilities: true,
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
                Err(error) => {
                    return Err(ConfigError::Io {
                        path: default_path.to_path_buf(),
                        error,
                    })
                }
            },
        };
        let text = read_config_file(&chosen)?;
        let config = Config::from_toml_str(&text, &chosen.display().to_string())?;
        Ok((config, Some(chosen)))
    }

    /// [`Config::load`], also returning the file's text (empty when no file
    /// was read), so a reload can name the keys that changed
    /// ([`changed_keys`]).
    pub fn load_with_text(
        path: Option<&Path>,
    ) -> Result<(Config, Option<PathBuf>, String), ConfigError> {
        let (config, used) = Self::load(path)?;
        // Read again rather than thread the text through `load`: the file
        // is small (capped) and this runs at start-up and on SIGHUP only.
        let text = match &used {
            Some(p) => read_config_file(p)?,
            None => String::new(),
        };
        // The file may have changed between the two reads; parse what is
        // returned so config and text always agree.
        let config = match &used {
            Some(p) => Config::from_toml_str(&text, &p.display().to_string())?,
            None => config,
        };
        Ok((config, used, text))
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
