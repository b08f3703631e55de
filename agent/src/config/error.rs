//! What went wrong while loading or checking the configuration.

use super::*;

/// What went wrong while loading or checking the configuration.
///
/// `path` is the file as the user named it; `line` is 1-based. `key` is the
/// dotted path of the offending key (`probes.interfaces.include[1]`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read (missing `--config` file,
    /// permissions, not UTF-8).
    #[error("{}: cannot read config file: {error}", path.display())]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying error. It is in the message, so it is not also
        /// the error's `source()`: `{:#}` (anyhow, `main`) would print it
        /// twice.
        error: std::io::Error,
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
pub(super) fn location(path: Option<&str>, line: Option<usize>) -> String {
    match (path, line) {
        (Some(p), Some(l)) => format!("{p}:{l}: "),
        (Some(p), None) => format!("{p}: "),
        (None, _) => String::new(),
    }
}

pub(super) fn table_label(table: &str) -> String {
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
