//! `PERCH_*` environment overrides.

use super::*;

impl Config {
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
}
