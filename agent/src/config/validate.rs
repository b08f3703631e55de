//! Checks of the values the types alone do not constrain.

use super::*;

impl Config {
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

        if let Some(p) = &self.probes.btf_path {
            check_root(p).map_err(|m| ConfigError::invalid("probes.btf_path", m))?;
        }
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
}

pub(super) fn from_export_error(e: export::ExportConfigError) -> ConfigError {
    match e {
        export::ExportConfigError::Range { key, value, reason } => {
            ConfigError::invalid(key, format!("{reason} (got {value})"))
        }
        export::ExportConfigError::Env { var, value, reason } => {
            env_error(var, format!("{reason} (got {value:?})"))
        }
    }
}

pub(super) fn env_error(var: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Env {
        var: var.to_owned(),
        message: message.into(),
    }
}

pub(super) const LISTEN_EXPECTED: &str =
    "an IP address and port such as \"127.0.0.1:9464\" or \"[::1]:9464\" (host names are not resolved)";

pub(super) fn check_interval_secs(secs: u64) -> Result<(), String> {
    check_range(secs, &INTERVAL_SECS_RANGE)
}

pub(super) fn check_root(root: &Path) -> Result<(), String> {
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
pub(super) fn check_mode(family: Family, mode: Mode) -> Result<(), String> {
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
pub(super) const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Accepts what `EnvFilter` accepts, except a bare word that is not a level.
/// `EnvFilter` reads `debugg` as "everything from target `debugg`", which
/// in a log-level option is always a typo that would silence the agent.
pub(super) fn check_log_level(filter: &str) -> Result<(), String> {
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
