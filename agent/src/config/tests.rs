//! Tests of the configuration: every key, every error, env overrides.

mod unit {
    use super::super::*;
    use crate::families::drops::{By as DropsBy, Config as DropsProbeConfig};
    use crate::families::interfaces::Config as InterfacesProbeConfig;
    use crate::families::sched::{Config as SchedProbeConfig, PrevState, RunqueueClock};
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
        ] {
            let config = parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(config, Config::default(), "{name}");
        }
    }

    /// The commented `histogram_bounds` of deploy/perch.toml is the default
    /// layout, written out; other bounds name the nearest kernel bounds.
    #[test]
    fn histogram_keys_parse_and_bad_bounds_say_why() {
        let line = DEPLOY
            .lines()
            .find_map(|l| l.strip_prefix("# histogram_bounds = "))
            .expect("deploy/perch.toml documents histogram_bounds");
        let c = parse(&format!(
            "[export]\nhistograms = \"explicit\"\nmax_buckets = 40\nhistogram_bounds = {line}\n"
        ))
        .expect("the documented bounds parse");
        assert_eq!(
            c.export.histograms,
            crate::config::export::HistogramFormat::Explicit
        );
        assert_eq!(c.export.max_buckets, 40);
        assert_eq!(
            c.export.classic_layout().expect("valid layout"),
            crate::histogram::ClassicLayout::default()
        );
        c.validate().expect("validates");
        let err = parse("[export]\nhistogram_bounds = [0.001, 0.01]\n")
            .expect_err("0.001 s is not a kernel bound")
            .to_string();
        assert!(
            err.contains("export.histogram_bounds")
                && err.contains("perch.toml:2")
                && err.contains("0.001 s is not a kernel bucket bound")
                && err.contains("9.765625000e-4"),
            "{err}"
        );
        let err = parse("[export]\nhistograms = \"native\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("histograms"), "{err}");
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
        assert_eq!(c.probes.sched.prev_state, PrevState::Auto);
        assert_eq!(c.probes.drops.by, DropsBy::Auto);
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
                drop_capabilities: false,
            },
            // `..default()` (needless today) keeps a new family's section
            // at its defaults here, so adding one needs no edit of this test.
            #[expect(
                clippy::needless_update,
                reason = "a new family's section takes its default"
            )]
            probes: ProbesConfig {
                skip_hooks: vec![crate::gate::Hook::RawTp, crate::gate::Hook::Tracepoint],
                btf_path: Some(PathBuf::from("/var/lib/perch/btf/vmlinux.btf")),
                cpu: ProbeConfig { mode: Mode::Procfs },
                sched: SchedProbeConfig {
                    mode: Mode::Ebpf,
                    runqueue_per_cpu: true,
                    runqueue_clock: RunqueueClock::Wakeup,
                    prev_state: PrevState::TaskStruct,
                    runqueue_per_cgroup: false,
                    max_cgroup_buckets: 4096,
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
                    per_cgroup: true,
                },
                drops: DropsProbeConfig {
                    mode: Mode::Procfs,
                    by: DropsBy::Protocol,
                },
                containers: crate::families::containers::Config {
                    mode: Mode::Off,
                    host_depth: 2,
                    max_cgroups: 500,
                    hierarchy: crate::families::containers::cgroupfs::Hierarchy::V2,
                    kubelet_url: "https://127.0.0.1:10250".into(),
                    kubelet_token_file: String::new(),
                    kubelet_ca_file: "/etc/perch/kubelet-ca.pem".into(),
                    kubelet_refresh_secs: 60,
                },
                ..ProbesConfig::default()
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
                "PERCH_PROBES_CONTAINERS_MODE",
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

mod skip_hooks {
    use super::super::*;
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

/// Hostile files and names (issue 10): the config reader takes regular
/// files of bounded size only, SIGHUP names what changed, and unknown
/// `PERCH_PROBES_*` variables are refused.
mod hostile {
    use super::super::*;
    use std::time::Instant;

    #[test]
    fn config_reader_refuses_fifos_devices_and_huge_files() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("perch.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let zero = dir.path().join("zero.toml");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        for (path, want) in [
            (&fifo, "a FIFO"),
            (&zero, "a character device"),
            (&dir.path().to_path_buf(), "a directory"),
        ] {
            let started = Instant::now();
            let err = Config::load(Some(path)).unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(1), "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains(&path.display().to_string()) && msg.contains(want),
                "{msg}"
            );
        }

        let big = dir.path().join("big.toml");
        // Valid TOML (a comment), one byte over the cap.
        let mut text = "#".repeat(MAX_CONFIG_BYTES as usize);
        text.push('\n');
        std::fs::write(&big, &text).unwrap();
        let msg = Config::load(Some(&big)).unwrap_err().to_string();
        assert!(msg.contains("larger than 1048576 bytes"), "{msg}");
        // At the cap it is read.
        text.truncate(MAX_CONFIG_BYTES as usize);
        std::fs::write(&big, &text).unwrap();
        assert_eq!(Config::load(Some(&big)).unwrap().0, Config::default());

        let real = dir.path().join("real.toml");
        std::fs::write(&real, "[agent]\ninterval_secs = 5\n").unwrap();
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let (cfg, used, text) = Config::load_with_text(Some(&link)).unwrap();
        assert_eq!(cfg.agent.interval_secs, 5);
        assert_eq!(used.as_deref(), Some(link.as_path()));
        assert_eq!(text, "[agent]\ninterval_secs = 5\n");
    }

    #[test]
    fn changed_keys_name_every_dotted_key() {
        let cases: &[(&str, &str, &[&str])] = &[
            ("", "", &[]),
            (
                "[agent]\nlog_level = \"info\"\n",
                "[agent]\nlog_level = \"info\"\n",
                &[],
            ),
            (
                "[agent]\nlog_level = \"info\"\n",
                "[agent]\nlog_level = \"debug\"\ninterval_secs = 5\n",
                &["agent.interval_secs", "agent.log_level"],
            ),
            ("[probes.tcp]\nmode = \"auto\"\n", "", &["probes.tcp.mode"]),
            (
                "",
                "[export]\nendpoint = \"http://x:4318\"\n[export.queue]\ndir = \"/q\"\n",
                &["export.endpoint", "export.queue.dir"],
            ),
            (
                "[pipeline]\ndeny_attributes = [\"a\"]\n",
                "[pipeline]\ndeny_attributes = [\"a\", \"b\"]\n",
                &["pipeline.deny_attributes"],
            ),
        ];
        for &(old, new, want) in cases {
            assert_eq!(changed_keys(old, new), want, "{old:?} -> {new:?}");
        }
    }

    #[test]
    fn unknown_perch_probes_variables_are_refused() {
        assert!(Config::check_env_names(known_env_vars()).is_ok());
        // Build and test variables are not the agent's.
        assert!(
            Config::check_env_names(["PERCH_BIN", "PERCH_ROTEL", "PERCH_EBPF_ROUTE", "PATH"])
                .is_ok()
        );
        for (var, hint) in [
            ("PERCH_PROBES_FOO_MODE", None),
            ("PERCH_PROBES_SCHED_MOD", Some("PERCH_PROBES_SCHED_MODE")),
            ("PERCH_LOG_LEVE", Some("PERCH_LOG_LEVEL")),
            ("PERCH_INTERVAL", Some("PERCH_INTERVAL_SECS")),
            ("PERCH_LISTEN_ADDR", Some("PERCH_LISTEN")),
        ] {
            let err = Config::check_env_names([var]).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("environment variable {var}: unknown variable")),
                "{msg}"
            );
            if let Some(h) = hint {
                assert!(msg.contains(&format!("did you mean {h}?")), "{msg}");
            }
        }
    }
}
