//! `perch`: the command line. Only this file exits the process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use perch::config::Config;
use perch::gate::{Family, Mode};

#[derive(Parser, Debug)]
#[command(
    name = "perch",
    version,
    about = "eBPF host agent: CPU and network metrics, pushed over OTLP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone, Default)]
struct Common {
    /// Config file (TOML). Default: /etc/perch/perch.toml if it exists.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    // The help lists the registry's families, so a new family needs no edit.
    #[arg(long = "probe", value_name = "FAMILY=MODE", help = probe_help())]
    probes: Vec<String>,
    /// Never use this hook type (repeatable): tp_btf, raw_tp, tracepoint,
    /// cgroup_skb. `--skip-hook tp_btf` runs the families on raw_tp.
    #[arg(long = "skip-hook", value_name = "HOOK")]
    skip_hooks: Vec<perch::gate::Hook>,
    /// BTF file to use in place of /sys/kernel/btf/vmlinux (probes.btf_path):
    /// a BTFhub file for a kernel without BTF, or one extracted from it.
    #[arg(long = "btf-path", value_name = "FILE")]
    btf_path: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent: collect every interval, serve /metrics, push OTLP.
    Run {
        #[command(flatten)]
        common: Common,
        /// Listen address for /metrics and /healthz.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Collection interval in whole seconds (agent.interval_secs), at
        /// least 1: `10`, `10s`, `1m`. Fractions (`1.5s`, `500ms`) are refused.
        #[arg(long, value_parser = parse_interval)]
        interval: Option<u64>,
        #[command(flatten)]
        export: perch::config::export::ExportArgs,
    },
    /// Attach, collect over a window, print one snapshot and exit.
    Collect {
        #[command(flatten)]
        common: Common,
        /// How long to collect, e.g. `5s`.
        #[arg(long, value_parser = parse_duration, default_value = "5s")]
        duration: Duration,
        #[arg(long, value_enum, default_value_t = Format::Prometheus)]
        format: Format,
    },
    /// Probe the kernel and print, per metric family, the source Perch would use.
    Features {
        #[command(flatten)]
        common: Common,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Print the whole verifier log of each program the kernel refused,
        /// for one family or `all` (the table's reasons are one line each).
        #[arg(long, value_name = "FAMILY|all")]
        verifier_log: Option<String>,
    },
    /// Check a config file and exit: non-zero with the key and line on error.
    Validate {
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Format {
    Json,
    Prometheus,
}

/// `10s`, `500ms`, `1m`, `2h`, or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 10s, 500ms, 1m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}` (use ms, s, m or h)"
            ))
        }
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("`{s}` must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `--probe`'s help, from the family registry.
fn probe_help() -> String {
    format!(
        "Force a family's mode, e.g. `--probe sched=procfs` (repeatable). \
         Families: {}. Modes: auto, ebpf, procfs, off.",
        perch::runtime::family_names()
    )
}

/// `--interval`: whole seconds, as `agent.interval_secs` counts them. A
/// bare number is seconds; `s`, `m`, `h` and `ms` (a multiple of 1000) are
/// accepted. A fraction is an error rather than silently cut.
fn parse_interval(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let whole = || {
        format!(
            "`{s}`: the interval is a whole number of seconds, at least 1 \
             (agent.interval_secs), e.g. 10, 10s, 1m"
        )
    };
    if num.is_empty() {
        return Err(whole());
    }
    let n: u64 = num.parse().map_err(|_| whole())?;
    let secs = match unit {
        "" | "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "ms" if n % 1000 == 0 => Some(n / 1000),
        "ms" => return Err(whole()),
        u if u.starts_with('.') => return Err(whole()),
        other => return Err(format!("unknown unit `{other}` in `{s}` (use s, m or h)")),
    }
    .ok_or_else(whole)?;
    if secs == 0 {
        return Err(whole());
    }
    Ok(secs)
}

/// The config (file, `PERCH_*` and `OTEL_*` env, `--probe` and
/// `--skip-hook`) and the file's text (empty without a file).
fn load_config(common: &Common) -> Result<(Config, String)> {
    let (mut cfg, _, text) = Config::load_with_text(common.config.as_deref())?;
    apply_environment(&mut cfg)?;
    for p in &common.probes {
        let (fam, mode) = p
            .split_once('=')
            .with_context(|| format!("--probe {p}: expected FAMILY=MODE"))?;
        let family = Family::from_name(fam).with_context(|| {
            format!(
                "--probe {p}: unknown family `{fam}` (one of {})",
                perch::runtime::family_names()
            )
        })?;
        let mode: Mode = mode
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--probe {p}: {e}"))?;
        cfg.probes.set_mode(family, mode);
    }
    if !common.skip_hooks.is_empty() {
        cfg.probes.skip_hooks = common.skip_hooks.clone();
    }
    if let Some(p) = &common.btf_path {
        cfg.probes.btf_path = Some(p.clone());
    }
    cfg.validate()?;
    Ok((cfg, text))
}

/// The environment over the file, as the agent and `perch validate` read
/// it: unknown `PERCH_*` names refused, then PERCH_* for the agent and
/// probes; OTEL_EXPORTER_OTLP_* (specific, then generic),
/// OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME for export.
fn apply_environment(cfg: &mut Config) -> Result<()> {
    Config::check_env_names(std::env::vars_os().map(|(k, _)| k.to_string_lossy().into_owned()))?;
    cfg.apply_env(|k| std::env::var(k).ok())?;
    cfg.export.apply_env(|k| std::env::var(k).ok())?;
    Ok(())
}

/// stderr for log lines, which never fails: a line that cannot be written
/// (`EPIPE` once the reader of a pipe is gone, `EAGAIN` on a full
/// non-blocking pipe) is dropped and counted (`perch.log.lines.dropped`;
/// tracing writes each line with one `write_all`). tracing's own fallback for a failed
/// write is `eprintln!`, which panics on a broken pipe; it is turned off
/// in [`init_logging`].
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().write_all(buf).is_err() {
            perch::runtime::LOG_LINES_DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Installs the log subscriber; returns how to change its filter
/// (`agent.log_level`) later, for SIGHUP.
fn init_logging(cfg: &Config) -> perch::runtime::SetLogLevel {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_new(&cfg.agent.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        .log_internal_errors(false);
    // The two formats are two subscriber types, hence two handles.
    match cfg.agent.log_format {
        perch::config::LogFormat::Json => {
            let builder = builder.json().with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level: &str| {
                handle
                    .reload(EnvFilter::try_new(level)?)
                    .map_err(anyhow::Error::from)
            })
        }
        perch::config::LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level: &str| {
                handle
                    .reload(EnvFilter::try_new(level)?)
                    .map_err(anyhow::Error::from)
            })
        }
    }
}

/// `perch features --verifier-log`: each refused program's whole log, or
/// a line saying that none was refused.
fn print_verifier_logs(
    out: &mut impl std::io::Write,
    facts: &perch::gate::KernelFacts,
    only: Option<Family>,
) -> std::io::Result<()> {
    let logs: Vec<_> = facts
        .verifier_logs
        .iter()
        .filter(|l| only.is_none_or(|f| l.family == f))
        .collect();
    if logs.is_empty() {
        let what = only.map_or("any family".to_owned(), |f| f.name().to_owned());
        return writeln!(
            out,
            "the verifier refused no program of {what} on kernel {}",
            facts.release
        );
    }
    for l in logs {
        writeln!(
            out,
            "=== {} {} {}: verifier log ===",
            l.family.name(),
            l.hook,
            l.program
        )?;
        writeln!(out, "{}", l.log.trim_end())?;
    }
    Ok(())
}

fn print_features(
    out: &mut impl std::io::Write,
    facts: &perch::gate::KernelFacts,
    plan: &perch::gate::Plan,
) -> std::io::Result<()> {
    let btf = match (&facts.btf_source, facts.btf) {
        (Some(src), true) => format!("yes ({src})"),
        (_, b) => yes(b).to_owned(),
    };
    writeln!(
        out,
        "kernel {}  BTF: {btf}  tracefs: {}",
        facts.release,
        yes(facts.tracefs)
    )?;
    if let Some(e) = &facts.object_error {
        writeln!(out, "eBPF object: NOT LOADED: {e}")?;
    }
    for w in &facts.warnings {
        println!("warning: {w}");
    }
    let types: Vec<String> = facts
        .program_types
        .iter()
        .chain(facts.map_types.iter())
        .map(|(k, v)| {
            format!(
                "{k}={}",
                if *v == perch::gate::HookStatus::Ok {
                    "yes"
                } else {
                    "no"
                }
            )
        })
        .collect();
    writeln!(out, "kernel support: {}", types.join(" "))?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<12} {:<9} {:<8} {:<11} reason",
        "family", "requested", "source", "hook"
    )?;
    for p in &plan.families {
        let requested = format!("{:?}", p.requested).to_lowercase();
        let hook = p.hook.map(|h| h.name()).unwrap_or("-");
        writeln!(
            out,
            "{:<12} {:<9} {:<8} {:<11} {}",
            p.family.name(),
            requested,
            p.source.name(),
            hook,
            p.reason
        )?;
        if !p.reads.is_empty() {
            writeln!(out, "{:<12} reads: {}", "", p.reads)?;
        }
    }
    writeln!(out)?;
    writeln!(out, "variants tried:")?;
    for ((family, hook), status) in &facts.hooks {
        let used = plan.get(*family).and_then(|p| p.hook) == Some(*hook);
        let s = match status {
            perch::gate::HookStatus::Ok if used => "loaded and attached".to_owned(),
            perch::gate::HookStatus::Ok => "loads (not used)".to_owned(),
            perch::gate::HookStatus::Failed(e) => format!("FAILED: {e}"),
            perch::gate::HookStatus::NotTried(e) => format!("not tried: {e}"),
        };
        writeln!(out, "  {:<10} {:<10} {s}", family.name(), hook.name())?;
    }
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Context of a failed write of a command's output. Output goes through
/// `write!`, not `print!`, which panics when stdout is a closed pipe
/// (`perch features | head -1`).
const STDOUT: &str = "writing to stdout";

fn real_main() -> Result<()> {
    use std::io::Write as _;
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => {
            let path = config.unwrap_or_else(|| PathBuf::from(perch::config::DEFAULT_PATH));
            // Regular files of at most 1 MiB: a FIFO is refused, not waited on.
            let text = perch::config::read_config_file(&path)?;
            let mut cfg = Config::from_toml_str(&text, &path.display().to_string())?;
            // The agent reads the environment over the file: check it the
            // same way, so `perch validate` in the unit's environment
            // (ExecStartPre, a pod's command) catches a bad variable too.
            apply_environment(&mut cfg)?;
            cfg.validate()?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}: ok", path.display()).context(STDOUT)?;
            let known = perch::config::known_env_vars();
            let set: Vec<String> = std::env::vars_os()
                .map(|(k, _)| k.to_string_lossy().into_owned())
                .filter(|k| {
                    known.contains(k)
                        || k.starts_with("OTEL_EXPORTER_OTLP_")
                        || k == "OTEL_RESOURCE_ATTRIBUTES"
                        || k == "OTEL_SERVICE_NAME"
                })
                .collect();
            if !set.is_empty() {
                writeln!(out, "environment: ok ({})", set.join(", ")).context(STDOUT)?;
            }
            Ok(())
        }
        Command::Features {
            common,
            json,
            verifier_log,
        } => {
            let only = match verifier_log.as_deref() {
                None | Some("all") => None,
                Some(name) => Some(Family::from_name(name).with_context(|| {
                    format!(
                        "--verifier-log {name}: unknown family (one of {}, or all)",
                        perch::runtime::family_names()
                    )
                })?),
            };
            let (cfg, _) = load_config(&common)?;
            let _ = init_logging(&cfg);
            let agent = perch::runtime::Agent::start(&cfg)?;
            let shared = &agent.shared;
            if verifier_log.is_some() {
                let mut out = std::io::stdout().lock();
                print_verifier_logs(&mut out, &shared.facts, only).context(STDOUT)?;
            } else if json {
                let v = serde_json::json!({"kernel": shared.facts, "plan": shared.plan});
                writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&v)?)
                    .context(STDOUT)?;
            } else {
                print_features(&mut std::io::stdout().lock(), &shared.facts, &shared.plan)
                    .context(STDOUT)?;
            }
            Ok(())
        }
        Command::Collect {
            common,
            duration,
            format,
        } => {
            let (cfg, _) = load_config(&common)?;
            let _ = init_logging(&cfg);
            let (snap, plan) = perch::runtime::collect_window(&cfg, duration)?;
            match format {
                Format::Prometheus => {
                    write!(
                        std::io::stdout(),
                        "{}",
                        perch::exporters::prometheus::render(
                            &snap.metrics,
                            &cfg.export.classic_layout()?
                        )
                    )
                    .context(STDOUT)?;
                }
                Format::Json => {
                    let mut v = perch::exporters::json::render(&snap);
                    v["plan"] = serde_json::to_value(&plan)?;
                    writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&v)?)
                        .context(STDOUT)?;
                }
            }
            Ok(())
        }
        Command::Run {
            common,
            listen,
            interval,
            export,
        } => {
            // Start-up and SIGHUP build the config the same way, with the
            // same precedence: CLI > env > file > defaults.
            let build = move || -> Result<(Config, String)> {
                let (mut cfg, text) = load_config(&common)?;
                if let Some(l) = listen {
                    cfg.agent.listen = l;
                }
                if let Some(secs) = interval {
                    cfg.agent.interval_secs = secs;
                }
                export.apply(&mut cfg.export);
                cfg.validate()?;
                Ok((cfg, text))
            };
            let (cfg, text) = build()?;
            let set_log_level = init_logging(&cfg);
            let reload = perch::runtime::Reload {
                load: Box::new(build),
                set_log_level,
                text,
            };
            // Start-up happens on this thread before any other exists: the
            // signal mask and the capabilities dropped after attach are
            // per thread, and every later thread inherits them.
            let held = perch::runtime::HeldSignals::block()?;
            let listener = std::net::TcpListener::bind(cfg.agent.listen)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .with_context(|| format!("listening on {} (agent.listen)", cfg.agent.listen))?;
            let agent = perch::runtime::Agent::start(&cfg)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(perch::runtime::run(cfg, reload, agent, listener, held))
        }
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            use std::io::Write as _;
            // Not eprintln!: it panics when stderr is a broken pipe.
            let _ = writeln!(std::io::stderr(), "perch: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_is_whole_seconds() {
        let cases: &[(&str, Result<u64, &str>)] = &[
            ("10", Ok(10)),
            ("10s", Ok(10)),
            ("1m", Ok(60)),
            ("2h", Ok(7200)),
            ("2000ms", Ok(2)),
            ("1.9s", Err("whole number of seconds")),
            ("500ms", Err("whole number of seconds")),
            ("1500ms", Err("whole number of seconds")),
            ("0", Err("at least 1")),
            ("0s", Err("at least 1")),
            ("", Err("whole number")),
            ("s", Err("whole number")),
            ("-1", Err("whole number")),
            ("10d", Err("unknown unit `d`")),
            ("99999999999999999999h", Err("whole number")),
        ];
        for (arg, want) in cases {
            match (parse_interval(arg), want) {
                (Ok(got), Ok(w)) => assert_eq!(got, *w, "{arg}"),
                (Err(e), Err(needle)) => assert!(e.contains(needle), "{arg}: {e}"),
                (got, want) => panic!("{arg}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn help_matches_what_is_accepted() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let run = cmd.find_subcommand_mut("run").expect("run");
        let help = run.render_long_help().to_string();
        for f in perch::families::Family::ALL {
            assert!(help.contains(f.name()), "--probe help lacks {f}: {help}");
        }
        // The interval's help says what parse_interval does.
        assert!(help.contains("whole seconds"), "{help}");
        assert!(help.contains("`500ms`) are refused"), "{help}");
        assert!(parse_interval("500ms").is_err() && parse_interval("10s") == Ok(10));
    }
}
