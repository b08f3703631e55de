//! `perch`: the command line. Only this file exits the process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
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
    /// Force a family's mode, e.g. `--probe sched=procfs` (repeatable).
    /// Families: cpu, sched, softirq. Modes: auto, ebpf, procfs, off.
    #[arg(long = "probe", value_name = "FAMILY=MODE")]
    probes: Vec<String>,
    /// Never use this hook type (repeatable): tp_btf, raw_tp, tracepoint,
    /// cgroup_skb. `--skip-hook tp_btf` runs the families on raw_tp.
    #[arg(long = "skip-hook", value_name = "HOOK")]
    skip_hooks: Vec<perch::gate::Hook>,
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
        /// Collection interval, e.g. `10s`, `500ms`, `1m`.
        #[arg(long, value_parser = parse_duration)]
        interval: Option<Duration>,
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

fn load_config(common: &Common) -> Result<Config> {
    let (mut cfg, _) = Config::load(common.config.as_deref())?;
    // PERCH_* for the agent and probes; OTEL_EXPORTER_OTLP_* (specific, then
    // generic), OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME for export.
    cfg.apply_env(|k| std::env::var(k).ok())?;
    cfg.export.apply_env(|k| std::env::var(k).ok())?;
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
    cfg.validate()?;
    Ok(cfg)
}

fn init_logging(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_new(&cfg.agent.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.agent.log_format {
        perch::config::LogFormat::Json => builder.json().init(),
        perch::config::LogFormat::Text => builder.init(),
    }
}

fn print_features(facts: &perch::gate::KernelFacts, plan: &perch::gate::Plan) {
    println!(
        "kernel {}  BTF: {}  tracefs: {}",
        facts.release,
        yes(facts.btf),
        yes(facts.tracefs)
    );
    if let Some(e) = &facts.object_error {
        println!("eBPF object: NOT LOADED: {e}");
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
    println!("kernel support: {}", types.join(" "));
    println!();
    println!(
        "{:<12} {:<9} {:<8} {:<11} reason",
        "family", "requested", "source", "hook"
    );
    for p in &plan.families {
        let requested = format!("{:?}", p.requested).to_lowercase();
        let hook = p.hook.map(|h| h.name()).unwrap_or("-");
        println!(
            "{:<12} {:<9} {:<8} {:<11} {}",
            p.family.name(),
            requested,
            p.source.name(),
            hook,
            p.reason
        );
        if !p.reads.is_empty() {
            println!("{:<12} reads: {}", "", p.reads);
        }
    }
    println!();
    println!("variants tried:");
    for ((family, hook), status) in &facts.hooks {
        let used = plan.get(*family).and_then(|p| p.hook) == Some(*hook);
        let s = match status {
            perch::gate::HookStatus::Ok if used => "loaded and attached".to_owned(),
            perch::gate::HookStatus::Ok => "loads (not used)".to_owned(),
            perch::gate::HookStatus::Failed(e) => format!("FAILED: {e}"),
            perch::gate::HookStatus::NotTried(e) => format!("not tried: {e}"),
        };
        println!("  {:<10} {:<10} {s}", family.name(), hook.name());
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => {
            let path = config.unwrap_or_else(|| PathBuf::from(perch::config::DEFAULT_PATH));
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            Config::from_toml_str(&text, &path.display().to_string())?;
            println!("{}: ok", path.display());
            Ok(())
        }
        Command::Features { common, json } => {
            let cfg = load_config(&common)?;
            init_logging(&cfg);
            let agent = perch::runtime::Agent::start(&cfg)?;
            let shared = &agent.shared;
            if json {
                let v = serde_json::json!({"kernel": shared.facts, "plan": shared.plan});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_features(&shared.facts, &shared.plan);
            }
            Ok(())
        }
        Command::Collect {
            common,
            duration,
            format,
        } => {
            let cfg = load_config(&common)?;
            init_logging(&cfg);
            let (snap, plan) = perch::runtime::collect_window(&cfg, duration)?;
            match format {
                Format::Prometheus => {
                    print!("{}", perch::exporters::prometheus::render(&snap.metrics))
                }
                Format::Json => {
                    let mut v = perch::exporters::json::render(&snap);
                    v["plan"] = serde_json::to_value(&plan)?;
                    println!("{}", serde_json::to_string_pretty(&v)?);
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
            let mut cfg = load_config(&common)?;
            if let Some(l) = listen {
                cfg.agent.listen = l;
            }
            if let Some(i) = interval {
                if i < Duration::from_secs(1) {
                    bail!("--interval {i:?}: must be at least 1s");
                }
                cfg.agent.interval_secs = i.as_secs();
            }
            export.apply(&mut cfg.export);
            cfg.validate()?;
            init_logging(&cfg);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(perch::runtime::run(cfg))
        }
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("perch: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
