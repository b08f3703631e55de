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
        if let Some(v) = get(ENV_BTF_PATH)? {
            let path = PathBuf::from(v);
            check_root(&path).map_err(|m| env_error(ENV_BTF_PATH, m))?;
            self.probes.btf_path = Some(path);
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

/// The prefix of the variables that configure `[probes]`.
const PROBES_PREFIX: &str = "PERCH_PROBES_";

/// Every `PERCH_*` variable that configures the agent.
pub fn known_env_vars() -> Vec<String> {
    let mut v: Vec<String> = [
        ENV_INTERVAL_SECS,
        ENV_LISTEN,
        ENV_LOG_LEVEL,
        ENV_LOG_FORMAT,
        ENV_PROC_ROOT,
        ENV_SYS_ROOT,
        ENV_SKIP_HOOKS,
        ENV_BTF_PATH,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    v.extend(Family::ALL.iter().map(|&f| env_mode_var(f)));
    v
}

impl Config {
    /// Refuses a variable in the agent's own namespaces that it does not
    /// know: any `PERCH_PROBES_*` (`PERCH_PROBES_FOO_MODE`, a typo such as
    /// `PERCH_PROBES_SCHED_MOD`) and a misspelt agent variable (one edit
    /// away from a known name, e.g. `PERCH_LOG_LEVE`). Other `PERCH_*`
    /// names are left alone: the build and the tests use `PERCH_BIN`,
    /// `PERCH_ROTEL` and `PERCH_EBPF_*` in the same environment.
    pub fn check_env_names<I, S>(names: I) -> Result<(), ConfigError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let known = known_env_vars();
        for name in names {
            let name = name.as_ref();
            if !name.starts_with("PERCH_") || known.iter().any(|k| k == name) {
                continue;
            }
            // One edit away, or a known name cut short or run on
            // (`PERCH_INTERVAL` for `PERCH_INTERVAL_SECS`).
            let close = known.iter().find(|k| {
                edit_distance(k, name) <= 1
                    || (name.len() > "PERCH_".len() + 2
                        && (k.starts_with(name) || name.starts_with(k.as_str())))
            });
            if name.starts_with(PROBES_PREFIX) || close.is_some() {
                let hint = close
                    .map(|k| format!("; did you mean {k}?"))
                    .unwrap_or_default();
                return Err(env_error(
                    name,
                    format!(
                        "unknown variable (the agent reads {}){hint}",
                        known.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Levenshtein distance, for near-miss variable names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
