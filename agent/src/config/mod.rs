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

pub mod export;

use std::fmt::{self, Display, Write as _};
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

/// What went wrong while loading or checking the configuration.
///
/// `path` is the file as the user named it; `line` is 1-based. `key` is the
/// dotted path of the offending key (`probes.interfaces.include[1]`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read (missing `--config` file,
    /// permissions, not UTF-8).
    #[error("{}: cannot read config file: {source}", path.display())]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a decode error could not be tied to
    /// a key.
    #[error("{}invalid TOML: {message}", location(Some(path), *line))]
    Syntax {
        /// The file that failed.
        path: String,
        /// Line the parser stopped at, if it reported a position.
        line: Option<usize>,
        /// The parser's message.
        message: String,
    },
    /// A key that its table does not have: a typo, or an option from
    /// another Perch version.
    #[error(
        "{}unknown key `{name}` {}, {expected}{}",
        location(Some(path), *line),
        table_label(table),
        suggest(name, expected).map(|s| format!("; did you mean `{s}`?")).unwrap_or_default()
    )]
    UnknownKey {
        /// The file that failed.
        path: String,
        /// Line of the unknown key.
        line: Option<usize>,
        /// Dotted path of the table holding it; empty for the top level.
        table: String,
        /// The unknown key itself.
        name: String,
        /// The keys the table does accept, as serde lists them
        /// (`expected one of `a`, `b``). The closest one, if close, is
        /// suggested in the message.
        expected: String,
    },
    /// A value of the wrong type, or one that its type cannot parse (a
    /// string for an integer, an unknown mode, an unparsable address).
    #[error("{}{key}: {message}", location(Some(path), *line))]
    Parse {
        /// The file that failed.
        path: String,
        /// Line of the value.
        line: Option<usize>,
        /// Dotted path of the key.
        key: String,
        /// What was expected and what was found.
        message: String,
    },
    /// A well-typed value that is not allowed (out of range, `ebpf` for
    /// cpu, an empty pattern). From a file it carries the path and line;
    /// from [`Config::validate`] after CLI overrides it carries neither.
    #[error("{}{key}: {message}", location(path.as_deref(), *line))]
    Invalid {
        /// The file the value came from, if it came from one.
        path: Option<String>,
        /// Line of the key in that file, if found.
        line: Option<usize>,
        /// Dotted path of the key.
        key: String,
        /// Why the value is rejected, including the value.
        message: String,
    },
    /// A `PERCH_*` environment variable that cannot be applied.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable, e.g. `PERCH_INTERVAL_SECS`.
        var: String,
        /// Why its value is rejected, including the value.
        message: String,
    },
}

/// `path:line: `, `path: ` or nothing, as a message prefix.
fn location(path: Option<&str>, line: Option<usize>) -> String {
    match (path, line) {
        (Some(p), Some(l)) => format!("{p}:{l}: "),
        (Some(p), None) => format!("{p}: "),
        (None, _) => String::new(),
    }
}

fn table_label(table: &str) -> String {
    if table.is_empty() {
        "at the top level".to_owned()
    } else {
        format!("in [{table}]")
    }
}

impl ConfigError {
    /// A rejected value at dotted `key` (`export.max_bytes`,
    /// `pipeline.relabel[2].from`), for config modules' own checks. The
    /// file and line are filled in by [`ConfigError::locate`] when the
    /// value came from a file.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: None,
            line: None,
            key: key.into(),
            message: message.into(),
        }
    }

    /// Attaches file `path` and the line of the key in `text` to an
    /// [`Invalid`](ConfigError::Invalid) error; other variants are returned
    /// unchanged.
    pub fn locate(self, text: &str, path: &str) -> ConfigError {
        match self {
            ConfigError::Invalid {
                path: None,
                line,
                key,
                message,
            } => {
                let segs = parse_key_path(&key);
                let refs: Vec<&str> = segs.iter().map(String::as_str).collect();
                ConfigError::Invalid {
                    path: Some(path.to_owned()),
                    line: line.or_else(|| line_of_key(text, &refs)),
                    key,
                    message,
                }
            }
            other => other,
        }
    }

    /// The 1-based line in the file, when the error has one.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Syntax { line, .. }
            | ConfigError::UnknownKey { line, .. }
            | ConfigError::Parse { line, .. }
            | ConfigError::Invalid { line, .. } => *line,
            ConfigError::Io { .. } | ConfigError::Env { .. } => None,
        }
    }

    /// The dotted key the error is about, when it is about one.
    pub fn key(&self) -> Option<String> {
        match self {
            ConfigError::UnknownKey { table, name, .. } if table.is_empty() => Some(name.clone()),
            ConfigError::UnknownKey { table, name, .. } => Some(format!("{table}.{name}")),
            ConfigError::Parse { key, .. } | ConfigError::Invalid { key, .. } => Some(key.clone()),
            ConfigError::Io { .. } | ConfigError::Syntax { .. } | ConfigError::Env { .. } => None,
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

    /// Applies the `PERCH_*` overrides found by `env` (normally
    /// `|k| std::env::var(k).ok()`). Each value is checked as it is applied
    /// and errors name the variable. A variable set to the empty string is
    /// an error rather than "unset", so a half-written unit file fails loudly.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |var: &str| -> Result<Option<String>, ConfigError> {
            match env(var) {
                Some(v) if v.is_empty() => Err(env_error(
                    var,
                    "is set but empty; unset it to keep the file's or the default value",
                )),
                other => Ok(other),
            }
        };

        if let Some(v) = get(ENV_INTERVAL_SECS)? {
            let secs: u64 = v.parse().map_err(|_| {
                env_error(
                    ENV_INTERVAL_SECS,
                    format!("expected a whole number of seconds, got `{v}`"),
                )
            })?;
            check_interval_secs(secs).map_err(|m| env_error(ENV_INTERVAL_SECS, m))?;
            self.agent.interval_secs = secs;
        }
        if let Some(v) = get(ENV_LISTEN)? {
            self.agent.listen = v.parse().map_err(|_| {
                env_error(ENV_LISTEN, format!("expected {LISTEN_EXPECTED}, got `{v}`"))
            })?;
        }
        if let Some(v) = get(ENV_LOG_LEVEL)? {
            check_log_level(&v).map_err(|m| env_error(ENV_LOG_LEVEL, m))?;
            self.agent.log_level = v;
        }
        if let Some(v) = get(ENV_LOG_FORMAT)? {
            self.agent.log_format = v.parse().map_err(|m| env_error(ENV_LOG_FORMAT, m))?;
        }
        if let Some(v) = get(ENV_PROC_ROOT)? {
            let root = PathBuf::from(v);
            check_root(&root).map_err(|m| env_error(ENV_PROC_ROOT, m))?;
            self.agent.proc_root = root;
        }
        if let Some(v) = get(ENV_SYS_ROOT)? {
            let root = PathBuf::from(v);
            check_root(&root).map_err(|m| env_error(ENV_SYS_ROOT, m))?;
            self.agent.sys_root = root;
        }
        if let Some(v) = get(ENV_SKIP_HOOKS)? {
            self.probes.skip_hooks = v
                .split(',')
                .map(|h| h.trim().parse())
                .collect::<Result<_, String>>()
                .map_err(|m| env_error(ENV_SKIP_HOOKS, m))?;
        }
        for &family in Family::ALL {
            let var = env_mode_var(family);
            if let Some(v) = get(&var)? {
                let mode: Mode = v.parse().map_err(|m| env_error(&var, m))?;
                check_mode(family, mode).map_err(|m| env_error(&var, m))?;
                self.probes.set_mode(family, mode);
            }
        }
        Ok(())
    }

    /// Checks every value the types alone do not constrain. Returns the
    /// first problem as [`ConfigError::Invalid`] with the dotted key and no
    /// file position ([`Config::from_toml_str`] adds it).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.agent;
        check_interval_secs(a.interval_secs)
            .map_err(|m| ConfigError::invalid("agent.interval_secs", m))?;
        check_root(&a.proc_root).map_err(|m| ConfigError::invalid("agent.proc_root", m))?;
        check_root(&a.sys_root).map_err(|m| ConfigError::invalid("agent.sys_root", m))?;
        check_log_level(&a.log_level).map_err(|m| ConfigError::invalid("agent.log_level", m))?;

        for &family in Family::ALL {
            let section = self.probes.section(family);
            check_mode(family, section.mode())
                .map_err(|m| ConfigError::invalid(format!("probes.{family}.mode"), m))?;
            section
                .validate()
                .map_err(|(key, m)| ConfigError::invalid(format!("probes.{family}.{key}"), m))?;
        }
        // `[export]` and `[pipeline]` own their checks; their range errors
        // carry a dotted key, so they get a line like every other key.
        self.export.validate().map_err(from_export_error)?;
        self.pipeline.validate().map_err(from_export_error)?;
        Ok(())
    }

    /// `agent.interval_secs` as a duration.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.agent.interval_secs)
    }
}

fn from_export_error(e: export::ExportConfigError) -> ConfigError {
    match e {
        export::ExportConfigError::Range { key, value, reason } => {
            ConfigError::invalid(key, format!("{reason} (got {value})"))
        }
        export::ExportConfigError::Env { var, value, reason } => {
            env_error(var, format!("{reason} (got {value:?})"))
        }
    }
}

fn env_error(var: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Env {
        var: var.to_owned(),
        message: message.into(),
    }
}

const LISTEN_EXPECTED: &str =
    "an IP address and port such as \"127.0.0.1:9464\" or \"[::1]:9464\" (host names are not resolved)";

pub(crate) fn check_range<T: PartialOrd + Display>(
    v: T,
    range: &RangeInclusive<T>,
) -> Result<(), String> {
    if range.contains(&v) {
        Ok(())
    } else {
        Err(format!(
            "must be between {} and {} (got {v})",
            range.start(),
            range.end()
        ))
    }
}

fn check_interval_secs(secs: u64) -> Result<(), String> {
    check_range(secs, &INTERVAL_SECS_RANGE)
}

fn check_root(root: &Path) -> Result<(), String> {
    // Relative roots would resolve against the working directory, which is
    // `/` under systemd but anything in a shell: refuse the ambiguity.
    if root.is_absolute() {
        Ok(())
    } else {
        Err(format!(
            "must be an absolute path (got \"{}\")",
            root.display()
        ))
    }
}

/// A mode the family's rule can serve: `ebpf` needs an eBPF variant,
/// `procfs` a fallback.
fn check_mode(family: Family, mode: Mode) -> Result<(), String> {
    let rule = family.rule();
    match mode {
        Mode::Ebpf if rule.variants.is_empty() => Err(format!(
            "the {family} family has no eBPF source ({}); use auto, procfs or off",
            rule.fallback.unwrap_or("none")
        )),
        Mode::Procfs if rule.fallback.is_none() => Err(format!(
            "the {family} family has no procfs fallback; use auto, ebpf or off"
        )),
        _ => Ok(()),
    }
}

/// Levels `tracing` accepts on their own in a filter.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Accepts what `EnvFilter` accepts, except a bare word that is not a level.
/// `EnvFilter` reads `debugg` as "everything from target `debugg`", which
/// in a log-level option is always a typo that would silence the agent.
fn check_log_level(filter: &str) -> Result<(), String> {
    if filter.trim().is_empty() {
        return Err(format!(
            "must not be empty; use a level ({})",
            LEVELS.join(", ")
        ));
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map_err(|e| format!("invalid log filter \"{filter}\": {e}"))?;
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !directive.contains('=') && !directive.contains('[');
        if bare
            && directive
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        {
            return Err(format!(
                "`{directive}` is not a level; use one of {} or target=level directives \
                 such as \"info,perch=debug\"",
                LEVELS.join(", ")
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Key paths and line numbers
// ---------------------------------------------------------------------------

/// One step into a parsed document.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn render_path(segs: &[Seg]) -> String {
    let mut out = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if bare {
                    out.push_str(k);
                } else {
                    let _ = write!(out, "{k:?}");
                }
            }
            Seg::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

/// Splits a dotted key as [`ConfigError::Invalid`] carries it
/// (`pipeline.relabel[2].from`) into segments for [`line_of_key`]. Quoted
/// keys containing dots are not supported: their line is simply not found.
fn parse_key_path(key: &str) -> Vec<String> {
    let mut segs = Vec::new();
    for part in key.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        segs.push(name.to_owned());
        while let Some(inner) = rest.strip_prefix('[') {
            let Some(end) = inner.find(']') else { break };
            segs.push(inner[..end].to_owned());
            rest = &inner[end + 1..];
        }
    }
    segs
}

/// 1-based line of byte `offset` in `text`.
fn line_of_offset(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The 1-based line where `key_path` is set in TOML `text`, or `None` if
/// the text does not parse or does not set that key. Works for `[table]`
/// headers, dotted keys and inline tables alike. A segment that is a number
/// indexes an array (`["probes", "interfaces", "include", "1"]`); the line
/// is then that element's.
pub fn line_of_key(text: &str, key_path: &[&str]) -> Option<usize> {
    enum Cursor<'a, 'i> {
        Table(&'a DeTable<'i>),
        Array(&'a [Spanned<DeValue<'i>>]),
        Leaf,
    }
    let doc = DeTable::parse(text).ok()?;
    let mut cursor = Cursor::Table(doc.get_ref());
    let mut line = None;
    for seg in key_path {
        let (span, value) = match cursor {
            Cursor::Table(t) => {
                let (k, v) = t.iter().find(|(k, _)| k.get_ref() == seg)?;
                (k.span(), v)
            }
            Cursor::Array(items) => {
                let item = items.get(seg.parse::<usize>().ok()?)?;
                (item.span(), item)
            }
            Cursor::Leaf => return None,
        };
        line = Some(line_of_offset(text, span.start));
        cursor = match value.get_ref() {
            DeValue::Table(t) => Cursor::Table(t),
            DeValue::Array(a) => Cursor::Array(a),
            _ => Cursor::Leaf,
        };
    }
    line
}

/// The path of the innermost key or value in `table` whose span contains
/// byte `pos`, for attributing a decode error to a key.
fn path_at(table: &DeTable<'_>, pos: usize) -> Option<Vec<Seg>> {
    let mut best: Option<(usize, Vec<Seg>)> = None;
    let mut prefix = Vec::new();
    search_table(table, pos, &mut prefix, &mut best);
    best.map(|(_, path)| path)
}

fn consider(
    span: std::ops::Range<usize>,
    pos: usize,
    prefix: &[Seg],
    best: &mut Option<(usize, Vec<Seg>)>,
) {
    let hit = span.contains(&pos) || (span.is_empty() && span.start == pos);
    if !hit {
        return;
    }
    let len = span.len();
    // The narrowest span wins; on a tie, the deeper path.
    let better = match best {
        None => true,
        Some((blen, bpath)) => len < *blen || (len == *blen && prefix.len() > bpath.len()),
    };
    if better {
        *best = Some((len, prefix.to_vec()));
    }
}

fn search_table(
    table: &DeTable<'_>,
    pos: usize,
    prefix: &mut Vec<Seg>,
    best: &mut Option<(usize, Vec<Seg>)>,
) {
    for (k, v) in table.iter() {
        prefix.push(Seg::Key(k.get_ref().to_string()));
        consider(k.span(), pos, prefix, best);
        search_value(v, pos, prefix, best);
        prefix.pop();
    }
}

fn search_value(
    v: &Spanned<DeValue<'_>>,
    pos: usize,
    prefix: &mut Vec<Seg>,
    best: &mut Option<(usize, Vec<Seg>)>,
) {
    match v.get_ref() {
        DeValue::Table(t) => search_table(t, pos, prefix, best),
        DeValue::Array(items) => {
            // An array as a whole is a candidate (a wrong type for the
            // whole list); its elements are narrower ones.
            consider(v.span(), pos, prefix, best);
            for (i, item) in items.iter().enumerate() {
                prefix.push(Seg::Index(i));
                search_value(item, pos, prefix, best);
                prefix.pop();
            }
        }
        _ => consider(v.span(), pos, prefix, best),
    }
}

/// The value at `segs` in `table`.
fn value_at<'a, 'i>(table: &'a DeTable<'i>, segs: &[Seg]) -> Option<&'a Spanned<DeValue<'i>>> {
    let (first, rest) = segs.split_first()?;
    let Seg::Key(k) = first else { return None };
    let mut cur = table.iter().find(|(key, _)| key.get_ref() == k)?.1;
    for seg in rest {
        cur = match (seg, cur.get_ref()) {
            (Seg::Key(k), DeValue::Table(t)) => t.iter().find(|(key, _)| key.get_ref() == k)?.1,
            (Seg::Index(i), DeValue::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn with_article(type_str: &str) -> String {
    match type_str {
        "integer" | "array" => format!("an {type_str}"),
        other => format!("a {other}"),
    }
}

/// serde's name for an expected type, in the words of a config file.
fn humanize_expected(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative integer".to_owned(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer".to_owned(),
        "f32" | "f64" => "a number".to_owned(),
        "a sequence" => "an array".to_owned(),
        "path string" => "a path string".to_owned(),
        "socket address" => LISTEN_EXPECTED.to_owned(),
        "enum Mode" => "one of \"auto\", \"ebpf\", \"procfs\", \"off\"".to_owned(),
        "enum LogFormat" => "one of \"text\", \"json\"".to_owned(),
        s if s.starts_with("struct ") => "a table".to_owned(),
        s if s.starts_with("enum ") => "a string".to_owned(),
        s => s.to_owned(),
    }
}

/// Turns a `toml` decode error into a [`ConfigError`] naming the key.
fn decode_error(err: &toml::de::Error, text: &str, path: &str) -> ConfigError {
    let span = err.span();
    let line = span.as_ref().map(|s| line_of_offset(text, s.start));
    let message = err.message().trim().to_owned();
    let Ok(doc) = DeTable::parse(text) else {
        return ConfigError::Syntax {
            path: path.to_owned(),
            line,
            message,
        };
    };
    let doc = doc.get_ref();
    let segs = span.as_ref().and_then(|s| path_at(doc, s.start));

    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (name, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let expected = match tail.trim_start_matches(',').trim() {
            "there are no fields" => "this table accepts no keys".to_owned(),
            other => other.to_owned(),
        };
        let mut table = segs.unwrap_or_default();
        if table.last() == Some(&Seg::Key(name.to_owned())) {
            table.pop();
        }
        return ConfigError::UnknownKey {
            path: path.to_owned(),
            line,
            table: render_path(&table),
            name: name.to_owned(),
            expected,
        };
    }

    let Some(segs) = segs else {
        return ConfigError::Syntax {
            path: path.to_owned(),
            line,
            message,
        };
    };
    let value = value_at(doc, &segs);
    let source = span
        .as_ref()
        .and_then(|s| text.get(s.clone()))
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= 80 && !s.contains('\n'));

    let message = if let Some(rest) = message.strip_prefix("invalid type: ") {
        let (found, expected) = rest.rsplit_once(", expected ").unwrap_or((rest, ""));
        let got = match value {
            Some(v) => with_article(v.get_ref().type_str()),
            None => found.to_owned(),
        };
        format!("expected {}, got {got}", humanize_expected(expected))
    } else if let Some(rest) = message.strip_prefix("invalid value: ") {
        let (found, expected) = rest.rsplit_once(", expected ").unwrap_or((rest, ""));
        format!(
            "expected {}, got {}",
            humanize_expected(expected),
            source.unwrap_or(found)
        )
    } else if let Some(rest) = message.strip_prefix("unknown variant ") {
        format!("unknown value {rest}")
    } else if message.starts_with("wanted string or table") {
        // toml's own message for a non-string where an enum is expected.
        let got = value.map_or("?".to_owned(), |v| with_article(v.get_ref().type_str()));
        format!("expected a string, got {got}")
    } else if message == "invalid socket address syntax" {
        format!("expected {LISTEN_EXPECTED}, got {}", source.unwrap_or("?"))
    } else {
        match source {
            Some(src) => format!("{message} (got {src})"),
            None => message,
        }
    };
    ConfigError::Parse {
        path: path.to_owned(),
        line,
        key: render_path(&segs),
        message,
    }
}

/// The accepted key closest to `name` (edit distance at most 2), from
/// serde's "expected one of `a`, `b`" text.
fn suggest(name: &str, expected: &str) -> Option<String> {
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|cand| (edit_distance(name, cand), cand))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, cand)| cand.to_owned())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::interfaces::Config as InterfacesProbeConfig;
    use crate::families::sched::{Config as SchedProbeConfig, RunqueueClock};
    use crate::families::tcp::Config as TcpProbeConfig;
    use std::collections::HashMap;

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/config/",
                $name
            ))
        };
    }

    const DEPLOY: &str = include_str!("../../../deploy/perch.toml");

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, "perch.toml")
    }

    #[test]
    fn empty_and_shipped_files_are_the_defaults() {
        for (name, text) in [
            ("empty", ""),
            ("comments only", "# nothing\n\n"),
            (
                "empty tables",
                "[agent]\n[probes]\n[probes.tcp]\n[export]\n[pipeline]\n",
            ),
            ("deploy/perch.toml", DEPLOY),
            ("fixture defaults.toml", fixture!("defaults.toml")),
        ] {
            let config = parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(config, Config::default(), "{name}");
        }
        // The fixture is a copy for other tests; it must not drift.
        assert_eq!(fixture!("defaults.toml"), DEPLOY);
    }

    #[test]
    fn defaults_are_the_documented_values() {
        let c = Config::default();
        assert_eq!(c.agent.interval_secs, 10);
        assert_eq!(c.interval(), Duration::from_secs(10));
        assert_eq!(c.agent.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.agent.proc_root, Path::new("/proc"));
        assert_eq!(c.agent.sys_root, Path::new("/sys"));
        assert_eq!(c.agent.log_level, "info");
        assert_eq!(c.agent.log_format, LogFormat::Text);
        for &f in Family::ALL {
            assert_eq!(c.probes.mode(f), Mode::Auto, "{f}");
        }
        assert!(!c.probes.sched.runqueue_per_cpu);
        assert_eq!(c.probes.sched.runqueue_clock, RunqueueClock::Auto);
        assert_eq!(c.probes.interfaces.include, ["*"]);
        assert!(c.probes.interfaces.exclude.is_empty());
        assert!(!c.probes.tcp.rtt_per_peer);
        assert_eq!(c.probes.tcp.max_peers, 4096);
        c.validate().expect("defaults validate");
    }

    #[test]
    fn every_field_parses() {
        let c = parse(fixture!("full.toml")).expect("full.toml");
        let expected = Config {
            agent: AgentConfig {
                interval_secs: 30,
                listen: "[::1]:9100".parse().expect("addr"),
                proc_root: PathBuf::from("/host/proc"),
                sys_root: PathBuf::from("/host/sys"),
                log_level: "warn,perch::gate=debug".to_owned(),
                log_format: LogFormat::Json,
            },
            probes: ProbesConfig {
                skip_hooks: vec![crate::gate::Hook::RawTp, crate::gate::Hook::Tracepoint],
                cpu: ProbeConfig { mode: Mode::Procfs },
                sched: SchedProbeConfig {
                    mode: Mode::Ebpf,
                    runqueue_per_cpu: true,
                    runqueue_clock: RunqueueClock::Wakeup,
                },
                softirq: ProbeConfig { mode: Mode::Off },
                interfaces: InterfacesProbeConfig {
                    mode: Mode::Procfs,
                    include: vec!["eth*".into(), "en?s*".into(), "bond0".into()],
                    exclude: vec!["veth*".into(), "lo".into()],
                },
                connections: ProbeConfig { mode: Mode::Off },
                tcp: TcpProbeConfig {
                    mode: Mode::Ebpf,
                    rtt_per_peer: true,
                    max_peers: 65536,
                    max_sockets: 32768,
                },
                drops: ProbeConfig { mode: Mode::Procfs },
            },
            export: Default::default(),
            pipeline: Default::default(),
        };
        assert_eq!(c, expected);
        assert_eq!(c.interval(), Duration::from_secs(30));
    }

    /// What an error must say: variant, key, line, and a fragment of text.
    struct Case {
        name: &'static str,
        text: &'static str,
        kind: &'static str,
        key: Option<&'static str>,
        line: Option<usize>,
        contains: &'static str,
    }

    fn kind(e: &ConfigError) -> &'static str {
        match e {
            ConfigError::Io { .. } => "io",
            ConfigError::Syntax { .. } => "syntax",
            ConfigError::UnknownKey { .. } => "unknown",
            ConfigError::Parse { .. } => "parse",
            ConfigError::Invalid { .. } => "invalid",
            ConfigError::Env { .. } => "env",
        }
    }

    #[test]
    fn errors_name_key_and_line() {
        let cases = [
            Case {
                name: "unknown key in [agent]",
                text: fixture!("unknown_key.toml"),
                kind: "unknown",
                key: Some("agent.intervall_secs"),
                line: Some(3),
                contains: "perch.toml:3: unknown key `intervall_secs` in [agent], expected one of \
                           `interval_secs`, `listen`",
            },
            Case {
                name: "unknown table",
                text: fixture!("unknown_table.toml"),
                kind: "unknown",
                key: Some("probe"),
                line: Some(4),
                contains: "unknown key `probe` at the top level, expected one of `agent`, \
                           `probes`, `export`, `pipeline`; did you mean `probes`?",
            },
            Case {
                name: "unknown key in an inline table",
                text: "[probes]\ncpu = { mod = \"off\" }\n",
                kind: "unknown",
                key: Some("probes.cpu.mod"),
                line: Some(2),
                contains: "unknown key `mod` in [probes.cpu], expected `mode`",
            },
            Case {
                name: "unknown dotted key",
                text: "# x\nagent.interval_secs = 5\nagent.colour = 1\n",
                kind: "unknown",
                key: Some("agent.colour"),
                line: Some(3),
                contains: "unknown key `colour` in [agent]",
            },
            Case {
                name: "wrong type",
                text: fixture!("wrong_type.toml"),
                kind: "parse",
                key: Some("agent.interval_secs"),
                line: Some(3),
                contains: "perch.toml:3: agent.interval_secs: expected a non-negative integer, \
                           got a string",
            },
            Case {
                name: "negative integer",
                text: "[agent]\ninterval_secs = -5\n",
                kind: "parse",
                key: Some("agent.interval_secs"),
                line: Some(2),
                contains: "expected a non-negative integer, got -5",
            },
            Case {
                name: "table expected",
                text: "\nagent = 5\n",
                kind: "parse",
                key: Some("agent"),
                line: Some(2),
                contains: "agent: expected a table, got an integer",
            },
            Case {
                name: "array expected",
                text: "[probes.interfaces]\ninclude = \"eth*\"\n",
                kind: "parse",
                key: Some("probes.interfaces.include"),
                line: Some(2),
                contains: "expected an array, got a string",
            },
            Case {
                name: "wrong element type, multi-line array",
                text: "[probes.interfaces]\ninclude = [\n  \"eth*\",\n  5,\n]\n",
                kind: "parse",
                key: Some("probes.interfaces.include[1]"),
                line: Some(4),
                contains: "expected a string, got an integer",
            },
            Case {
                name: "out of range",
                text: fixture!("out_of_range.toml"),
                kind: "invalid",
                key: Some("agent.interval_secs"),
                line: Some(7),
                contains: "perch.toml:7: agent.interval_secs: must be between 1 and 3600 (got 0)",
            },
            Case {
                name: "above range",
                text: "[agent]\ninterval_secs = 3601\n",
                kind: "invalid",
                key: Some("agent.interval_secs"),
                line: Some(2),
                contains: "must be between 1 and 3600 (got 3601)",
            },
            Case {
                name: "max_peers out of range",
                text: fixture!("max_peers_range.toml"),
                kind: "invalid",
                key: Some("probes.tcp.max_peers"),
                line: Some(3),
                contains: "must be between 16 and 1000000 (got 8)",
            },
            Case {
                name: "max_sockets out of range",
                text: "[probes.tcp]\nmax_peers = 64\nmax_sockets = 100\n",
                kind: "invalid",
                key: Some("probes.tcp.max_sockets"),
                line: Some(3),
                contains: "must be between 1024 and 4194304 (got 100)",
            },
            Case {
                name: "bad listen address",
                text: fixture!("bad_listen.toml"),
                kind: "parse",
                key: Some("agent.listen"),
                line: Some(2),
                contains: "agent.listen: expected an IP address and port such as \
                           \"127.0.0.1:9464\"",
            },
            Case {
                name: "listen of the wrong type",
                text: "[agent]\nlisten = 9464\n",
                kind: "parse",
                key: Some("agent.listen"),
                line: Some(2),
                contains: "got an integer",
            },
            Case {
                name: "bad mode string",
                text: fixture!("bad_mode.toml"),
                kind: "parse",
                key: Some("probes.tcp.mode"),
                line: Some(5),
                contains: "probes.tcp.mode: unknown value `bpf`, expected one of `auto`, `ebpf`, \
                           `procfs`, `off`",
            },
            Case {
                name: "mode of the wrong type",
                text: "[probes.sched]\nmode = 1\n",
                kind: "parse",
                key: Some("probes.sched.mode"),
                line: Some(2),
                contains: "expected a string, got an integer",
            },
            Case {
                name: "bad log format",
                text: "[agent]\nlog_format = \"xml\"\n",
                kind: "parse",
                key: Some("agent.log_format"),
                line: Some(2),
                contains: "unknown value `xml`, expected `text` or `json`",
            },
            Case {
                name: "cpu = ebpf",
                text: fixture!("cpu_ebpf.toml"),
                kind: "invalid",
                key: Some("probes.cpu.mode"),
                line: Some(3),
                contains: "probes.cpu.mode: the cpu family has no eBPF source \
                           (/proc/stat, /proc/loadavg); use auto, procfs or off",
            },
            Case {
                name: "empty pattern",
                text: fixture!("empty_pattern.toml"),
                kind: "invalid",
                key: Some("probes.interfaces.include[1]"),
                line: Some(4),
                contains: "empty pattern",
            },
            Case {
                name: "empty exclude pattern",
                text: "[probes.interfaces]\nexclude = [\"\"]\n",
                kind: "invalid",
                key: Some("probes.interfaces.exclude[0]"),
                line: Some(2),
                contains: "empty pattern",
            },
            Case {
                name: "no include pattern",
                text: "[probes.interfaces]\n\ninclude = []\n",
                kind: "invalid",
                key: Some("probes.interfaces.include"),
                line: Some(3),
                contains: "must list at least one pattern",
            },
            Case {
                name: "bad log level directive",
                text: fixture!("bad_log_level.toml"),
                kind: "invalid",
                key: Some("agent.log_level"),
                line: Some(3),
                contains: "invalid log filter \"perch=verbose\"",
            },
            Case {
                name: "log level typo",
                text: "[agent]\nlog_level = \"debugg\"\n",
                kind: "invalid",
                key: Some("agent.log_level"),
                line: Some(2),
                contains: "`debugg` is not a level",
            },
            Case {
                name: "relative proc_root",
                text: "[agent]\nproc_root = \"host/proc\"\n",
                kind: "invalid",
                key: Some("agent.proc_root"),
                line: Some(2),
                contains: "must be an absolute path (got \"host/proc\")",
            },
            Case {
                name: "syntax error",
                text: fixture!("syntax_error.toml"),
                kind: "syntax",
                key: None,
                line: Some(3),
                contains: "perch.toml:3: invalid TOML:",
            },
        ];
        for case in cases {
            let err = match parse(case.text) {
                Ok(c) => panic!("{}: parsed as {c:?}", case.name),
                Err(e) => e,
            };
            let msg = err.to_string();
            assert_eq!(kind(&err), case.kind, "{}: {msg}", case.name);
            assert_eq!(err.key().as_deref(), case.key, "{}: {msg}", case.name);
            assert_eq!(err.line(), case.line, "{}: {msg}", case.name);
            assert!(
                msg.contains(case.contains),
                "{}: `{msg}` lacks `{}`",
                case.name,
                case.contains
            );
        }
    }

    #[test]
    fn export_and_pipeline_range_errors_get_a_line() {
        let cases = [
            (
                "[export]\n\n[export.batch]\nmax_bytes = 10\n",
                "export.batch.max_bytes",
                4,
            ),
            (
                "[pipeline]\nmax_series_per_metric = 100\ndetail_top_k = 100\n",
                "pipeline.detail_top_k",
                3,
            ),
        ];
        for (text, key, line) in cases {
            let err = parse(text).expect_err(key);
            assert_eq!(kind(&err), "invalid", "{err}");
            assert_eq!(err.key().as_deref(), Some(key), "{err}");
            assert_eq!(err.line(), Some(line), "{err}");
            assert!(err
                .to_string()
                .starts_with(&format!("perch.toml:{line}: {key}: ")));
        }
    }

    #[test]
    fn error_display_matches_the_documented_form() {
        let text = "# 1\n# 2\n# 3\n# 4\n# 5\n[agent]\ninterval_secs = 0\n";
        let err = Config::from_toml_str(text, DEFAULT_PATH).expect_err("out of range");
        assert_eq!(
            err.to_string(),
            "/etc/perch/perch.toml:7: agent.interval_secs: must be between 1 and 3600 (got 0)"
        );
    }

    #[test]
    fn accepted_values() {
        for (name, text) in [
            ("interval lower bound", "[agent]\ninterval_secs = 1\n"),
            ("interval upper bound", "[agent]\ninterval_secs = 3600\n"),
            ("max_peers lower bound", "[probes.tcp]\nmax_peers = 16\n"),
            (
                "max_peers upper bound",
                "[probes.tcp]\nmax_peers = 1000000\n",
            ),
            (
                "max_sockets lower bound",
                "[probes.tcp]\nmax_sockets = 1024\n",
            ),
            (
                "max_sockets upper bound",
                "[probes.tcp]\nmax_sockets = 4194304\n",
            ),
            ("ipv6 listen", "[agent]\nlisten = \"[::]:9464\"\n"),
            (
                "port 0 (tests bind any port)",
                "[agent]\nlisten = \"127.0.0.1:0\"\n",
            ),
            (
                "level with targets",
                "[agent]\nlog_level = \"info,perch::probes=trace\"\n",
            ),
            ("upper-case level", "[agent]\nlog_level = \"DEBUG\"\n"),
            ("numeric level", "[agent]\nlog_level = \"3\"\n"),
            ("cpu off", "[probes.cpu]\nmode = \"off\"\n"),
            (
                "dotted keys",
                "agent.interval_secs = 5\nprobes.tcp.mode = \"off\"\n",
            ),
        ] {
            parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn line_of_key_finds_keys_in_every_toml_form() {
        let text = "\
# comment
[agent]
interval_secs = 5

[probes.tcp]
max_peers = 16
[probes]
cpu = { mode = \"off\" }
sched.mode = \"auto\"
[probes.interfaces]
include = [
  \"a\",
  \"b\",
]
";
        let cases: &[(&[&str], Option<usize>)] = &[
            (&["agent"], Some(2)),
            (&["agent", "interval_secs"], Some(3)),
            (&["probes", "tcp", "max_peers"], Some(6)),
            (&["probes", "cpu", "mode"], Some(8)),
            (&["probes", "sched", "mode"], Some(9)),
            (&["probes", "interfaces", "include"], Some(11)),
            (&["probes", "interfaces", "include", "1"], Some(13)),
            (&["probes", "interfaces", "include", "2"], None),
            (&["probes", "interfaces", "include", "x"], None),
            (&["agent", "listen"], None),
            (&["agent", "interval_secs", "deeper"], None),
            (&["nope"], None),
            (&[], None),
        ];
        for (path, line) in cases {
            assert_eq!(line_of_key(text, path), *line, "{path:?}");
        }
        assert_eq!(line_of_key("[agent\n", &["agent"]), None, "unparsable");
    }

    #[test]
    fn invalid_errors_from_other_modules_get_located() {
        let text =
            "[pipeline]\n[[pipeline.relabel]]\nfrom = \"a\"\n[[pipeline.relabel]]\n\nfrom = \"\"\n";
        let err = ConfigError::invalid("pipeline.relabel[1].from", "must not be empty")
            .locate(text, "p.toml");
        assert_eq!(err.line(), Some(6));
        assert_eq!(
            err.to_string(),
            "p.toml:6: pipeline.relabel[1].from: must not be empty"
        );
        // Not in the file: path but no line.
        let err = ConfigError::invalid("export.max_bytes", "too big").locate(text, "p.toml");
        assert_eq!(err.to_string(), "p.toml: export.max_bytes: too big");
        // Not from a file at all.
        assert_eq!(
            ConfigError::invalid("export.max_bytes", "too big").to_string(),
            "export.max_bytes: too big"
        );
    }

    #[test]
    fn key_paths_round_trip() {
        for (key, segs) in [
            ("agent.interval_secs", vec!["agent", "interval_secs"]),
            ("a.b[2].c", vec!["a", "b", "2", "c"]),
            ("a.b[2][3]", vec!["a", "b", "2", "3"]),
            ("top", vec!["top"]),
        ] {
            assert_eq!(parse_key_path(key), segs, "{key}");
        }
        let segs = [
            Seg::Key("a".into()),
            Seg::Key("b c".into()),
            Seg::Index(2),
            Seg::Key("d".into()),
        ];
        assert_eq!(render_path(&segs), "a.\"b c\"[2].d");
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn env_overrides_file() {
        let mut c = parse(fixture!("full.toml")).expect("full.toml");
        c.apply_env(env_of(&[
            (ENV_INTERVAL_SECS, "5"),
            (ENV_LISTEN, "0.0.0.0:9999"),
            (ENV_LOG_LEVEL, "debug"),
            (ENV_LOG_FORMAT, "text"),
            (ENV_PROC_ROOT, "/proc"),
            (ENV_SYS_ROOT, "/sys"),
            ("PERCH_PROBES_SCHED_MODE", "procfs"),
            ("PERCH_PROBES_CPU_MODE", "off"),
            ("PERCH_PROBES_DROPS_MODE", "auto"),
        ]))
        .expect("env applies");
        assert_eq!(c.agent.interval_secs, 5);
        assert_eq!(c.agent.listen.to_string(), "0.0.0.0:9999");
        assert_eq!(c.agent.log_level, "debug");
        assert_eq!(c.agent.log_format, LogFormat::Text);
        assert_eq!(c.agent.proc_root, Path::new("/proc"));
        assert_eq!(c.agent.sys_root, Path::new("/sys"));
        assert_eq!(c.probes.mode(Family::Sched), Mode::Procfs);
        assert_eq!(c.probes.mode(Family::Cpu), Mode::Off);
        assert_eq!(c.probes.mode(Family::Drops), Mode::Auto);
        // Untouched by the environment: still the file's values.
        assert_eq!(c.probes.mode(Family::Tcp), Mode::Ebpf);
        assert_eq!(c.probes.tcp.max_peers, 65536);
        assert!(c.probes.sched.runqueue_per_cpu);
        c.validate().expect("still valid");

        // No variables: nothing changes.
        let before = c.clone();
        c.apply_env(|_| None).expect("empty env");
        assert_eq!(c, before);
    }

    #[test]
    fn env_errors_name_the_variable() {
        let cases: &[(&str, &str, &str)] = &[
            (ENV_INTERVAL_SECS, "0", "must be between 1 and 3600 (got 0)"),
            (
                ENV_INTERVAL_SECS,
                "ten",
                "expected a whole number of seconds, got `ten`",
            ),
            (ENV_INTERVAL_SECS, "", "is set but empty"),
            (
                ENV_LISTEN,
                "localhost:80",
                "expected an IP address and port",
            ),
            (ENV_LOG_LEVEL, "verbose", "`verbose` is not a level"),
            (ENV_LOG_FORMAT, "xml", "unknown log format `xml`"),
            (ENV_PROC_ROOT, "proc", "must be an absolute path"),
            (ENV_SYS_ROOT, "sys", "must be an absolute path"),
            ("PERCH_PROBES_TCP_MODE", "bpf", "unknown mode `bpf`"),
            (
                "PERCH_PROBES_CPU_MODE",
                "ebpf",
                "the cpu family has no eBPF source",
            ),
            (
                "PERCH_PROBES_INTERFACES_MODE",
                "ebpf",
                "the interfaces family has no eBPF source",
            ),
            (
                "PERCH_PROBES_CONNECTIONS_MODE",
                "ebpf",
                "the connections family has no eBPF source",
            ),
        ];
        for (var, value, fragment) in cases {
            let mut c = Config::default();
            let err = c
                .apply_env(env_of(&[(var, value)]))
                .expect_err(&format!("{var}={value}"));
            let msg = err.to_string();
            assert!(
                matches!(&err, ConfigError::Env { var: v, .. } if v == var),
                "{var}={value}: {msg}"
            );
            assert!(
                msg.starts_with(&format!("environment variable {var}: ")),
                "{msg}"
            );
            assert!(
                msg.contains(fragment),
                "{var}={value}: `{msg}` lacks `{fragment}`"
            );
        }
    }

    #[test]
    fn env_mode_var_names() {
        let names: Vec<String> = Family::ALL.iter().map(|f| env_mode_var(*f)).collect();
        assert_eq!(
            names,
            [
                "PERCH_PROBES_CPU_MODE",
                "PERCH_PROBES_SCHED_MODE",
                "PERCH_PROBES_SOFTIRQ_MODE",
                "PERCH_PROBES_INTERFACES_MODE",
                "PERCH_PROBES_CONNECTIONS_MODE",
                "PERCH_PROBES_TCP_MODE",
                "PERCH_PROBES_DROPS_MODE",
            ]
        );
    }

    #[test]
    fn set_mode_and_mode_agree_for_every_family() {
        for &family in Family::ALL {
            let mut p = ProbesConfig::default();
            p.set_mode(family, Mode::Off);
            for &other in Family::ALL {
                let want = if other == family {
                    Mode::Off
                } else {
                    Mode::Auto
                };
                assert_eq!(p.mode(other), want, "set {family}, read {other}");
            }
        }
    }

    #[test]
    fn validate_after_overrides_has_no_line() {
        let mut c = Config::default();
        c.agent.interval_secs = 0;
        let err = c.validate().expect_err("out of range");
        assert_eq!(err.line(), None);
        assert_eq!(
            err.to_string(),
            "agent.interval_secs: must be between 1 and 3600 (got 0)"
        );
        let mut c = Config::default();
        c.probes.set_mode(Family::Cpu, Mode::Ebpf);
        assert_eq!(
            c.validate().expect_err("cpu ebpf").key().as_deref(),
            Some("probes.cpu.mode")
        );
    }

    #[test]
    fn load_picks_the_right_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let absent = dir.path().join("absent.toml");
        let present = dir.path().join("perch.toml");
        std::fs::write(&present, "[agent]\ninterval_secs = 42\n").expect("write");

        // No --config, no default file: defaults, no file.
        let (c, used) = Config::load_with_default(None, &absent).expect("defaults");
        assert_eq!((c, used), (Config::default(), None));

        // No --config, default file present: it is read.
        let (c, used) = Config::load_with_default(None, &present).expect("default file");
        assert_eq!(c.agent.interval_secs, 42);
        assert_eq!(used.as_deref(), Some(present.as_path()));

        // --config wins over the default file.
        let other = dir.path().join("other.toml");
        std::fs::write(&other, "[agent]\ninterval_secs = 7\n").expect("write");
        let (c, used) = Config::load_with_default(Some(&other), &present).expect("--config");
        assert_eq!(c.agent.interval_secs, 7);
        assert_eq!(used.as_deref(), Some(other.as_path()));

        // A missing --config file is an error naming it, not a silent default.
        let err = Config::load_with_default(Some(&absent), &present).expect_err("missing");
        assert!(matches!(&err, ConfigError::Io { path, .. } if path == &absent));
        assert!(err.to_string().starts_with(&absent.display().to_string()));

        // Errors from a loaded file carry its path.
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[agent]\nintervall_secs = 1\n").expect("write");
        let err = Config::load(Some(&bad)).expect_err("bad");
        assert!(
            err.to_string()
                .starts_with(&format!("{}:2: unknown key", bad.display())),
            "{err}"
        );
    }

    #[test]
    fn suggestions_only_for_close_names() {
        let expected = "expected one of `interval_secs`, `listen`, `log_level`";
        assert_eq!(
            suggest("intervall_secs", expected).as_deref(),
            Some("interval_secs")
        );
        assert_eq!(suggest("lsiten", expected).as_deref(), Some("listen"));
        assert_eq!(suggest("colour", expected), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}

#[cfg(test)]
mod skip_hooks_tests {
    use super::*;
    use crate::gate::Hook;

    #[test]
    fn skip_hooks_from_file_env_and_errors() {
        let cfg = Config::from_toml_str("[probes]\nskip_hooks = [\"tp_btf\"]\n", "t.toml").unwrap();
        assert_eq!(cfg.probes.skip_hooks, vec![Hook::TpBtf]);

        let mut cfg = Config::default();
        cfg.apply_env(|k| (k == ENV_SKIP_HOOKS).then(|| "tp_btf, raw_tp".to_owned()))
            .unwrap();
        assert_eq!(cfg.probes.skip_hooks, vec![Hook::TpBtf, Hook::RawTp]);

        let err = Config::default()
            .apply_env(|k| (k == ENV_SKIP_HOOKS).then(|| "kprobe".to_owned()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(ENV_SKIP_HOOKS) && err.contains("unknown hook `kprobe`"),
            "{err}"
        );

        let err = Config::from_toml_str("\n[probes]\nskip_hooks = [\"fentry\"]\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("t.toml:3: probes.skip_hooks[0]"), "{err}");
    }
}
