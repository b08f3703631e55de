//! Every compatibility rule in one place: per family, the eBPF variants in
//! order of preference, the programs each needs, and the fallback.
//!
//! Preference is `tp_btf` > `raw_tp` > tracepoint. `tp_btf` (5.5, commit
//! ac4414b5ca47) gives typed arguments checked by the verifier against BTF;
//! `raw_tp` (4.17, commit c4f6699dfcb8) has the same arguments without BTF;
//! classic tracepoints need tracefs mounted, which is not the default on every
//! host. `min_kernel` documents where a variant first works; the gate never
//! decides from it: it loads the programs and believes the kernel.

use serde::{Deserialize, Serialize};

use super::Family;

/// How an eBPF program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    /// BTF-typed raw tracepoint (`BPF_PROG_TYPE_TRACING`, `BPF_TRACE_RAW_TP`).
    TpBtf,
    /// Raw tracepoint (`BPF_PROG_TYPE_RAW_TRACEPOINT`).
    RawTp,
    /// Classic tracepoint through tracefs (`BPF_PROG_TYPE_TRACEPOINT`).
    Tracepoint,
    /// cgroup socket buffer program (`BPF_PROG_TYPE_CGROUP_SKB`).
    CgroupSkb,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::TpBtf => "tp_btf",
            Hook::RawTp => "raw_tp",
            Hook::Tracepoint => "tracepoint",
            Hook::CgroupSkb => "cgroup_skb",
        }
    }
}

impl std::str::FromStr for Hook {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Hook::TpBtf, Hook::RawTp, Hook::Tracepoint, Hook::CgroupSkb]
            .into_iter()
            .find(|h| h.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown hook `{s}`, expected one of tp_btf, raw_tp, tracepoint, cgroup_skb"
                )
            })
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a program of a variant runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Run {
    /// Attached to its target with the variant's hook, for the agent's life.
    Hook,
    /// A BPF iterator (`BPF_TRACE_ITER`, 5.8) over its target (`task_file`,
    /// ...): linked and run once when the variant is attached, then run by
    /// the family's collector at each collection.
    Iter,
}

/// One program of a variant: its name in the object and what it attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProgramSpec {
    /// Function name in `agent-ebpf`.
    pub program: &'static str,
    /// Tracepoint name (`tp_btf`, `raw_tp`), `category/name` (tracepoint),
    /// or the iterator's target (`task_file`).
    pub target: &'static str,
    /// Needed only when the run-queue latency is timed from wake-ups
    /// ([`KernelFacts::sched_info`](super::KernelFacts) false): left
    /// unattached where `sched_switch` reads the kernel's own stamps.
    pub wakeup_clock: bool,
    /// Attached to a hook, or run as an iterator.
    pub run: Run,
}

impl ProgramSpec {
    /// `hook target` or `iter/target`, as the plan shows it.
    pub fn describe(&self, hook: Hook) -> String {
        match self.run {
            Run::Hook => format!("{hook} {}", self.target),
            Run::Iter => format!("iter/{}", self.target),
        }
    }

    /// Whether this program is attached, given whether `sched_switch` reads
    /// the kernel's `sched_info` stamps.
    pub fn used(&self, sched_info: bool) -> bool {
        !(self.wakeup_clock && sched_info)
    }
}

/// One way to serve a family from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Variant {
    pub hook: Hook,
    pub programs: &'static [ProgramSpec],
    /// Oldest kernel this variant works on (documentation only).
    pub min_kernel: (u32, u32),
    /// Whether it needs kernel BTF (`/sys/kernel/btf/vmlinux`).
    pub needs_btf: bool,
}

impl Variant {
    /// The programs attached on a kernel where `sched_switch` does (or does
    /// not) read the `sched_info` stamps; see [`ProgramSpec::used`].
    pub fn programs_used(&self, sched_info: bool) -> impl Iterator<Item = &'static ProgramSpec> {
        self.programs.iter().filter(move |p| p.used(sched_info))
    }
}

/// The rule for one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub family: Family,
    /// eBPF variants, most preferred first. Empty: procfs is the only source.
    pub variants: &'static [Variant],
    /// What the fallback reads, or `None` when there is none.
    pub fallback: Option<&'static str>,
    /// What the fallback cannot provide, shown in the plan.
    pub fallback_loses: &'static str,
}

const fn p(program: &'static str, target: &'static str) -> ProgramSpec {
    ProgramSpec {
        program,
        target,
        wakeup_clock: false,
        run: Run::Hook,
    }
}

/// A wake-up program of the `sched` family (see [`ProgramSpec::wakeup_clock`]).
const fn w(program: &'static str, target: &'static str) -> ProgramSpec {
    ProgramSpec {
        wakeup_clock: true,
        ..p(program, target)
    }
}

/// An iterator program (see [`Run::Iter`]).
const fn iter(program: &'static str, target: &'static str) -> ProgramSpec {
    ProgramSpec {
        run: Run::Iter,
        ..p(program, target)
    }
}

/// The rules, one per family.
pub const RULES: &[Rule] = &[
    Rule {
        family: Family::Cpu,
        variants: &[],
        fallback: Some("/proc/stat, /proc/loadavg"),
        fallback_loses: "nothing: /proc/stat is the kernel's own CPU accounting, which eBPF could only re-derive",
    },
    Rule {
        family: Family::Sched,
        variants: &[
            // Both variants read sched_switch's prev_state argument, appended
            // in 5.18 (commit fa2c3254d7cf). Where task_struct has
            // sched_info (CONFIG_SCHED_INFO), sched_switch reads the
            // kernel's run-queue stamps and the wake-up programs are not
            // attached; the classic tracepoint sees pids, not tasks, and
            // always times wake-ups.
            Variant {
                hook: Hook::TpBtf,
                programs: &[
                    p("sched_switch_btf", "sched_switch"),
                    w("sched_wakeup_btf", "sched_wakeup"),
                    w("sched_wakeup_new_btf", "sched_wakeup_new"),
                ],
                min_kernel: (5, 18),
                needs_btf: true,
            },
            Variant {
                hook: Hook::RawTp,
                programs: &[
                    p("sched_switch_raw", "sched_switch"),
                    w("sched_wakeup_raw", "sched_wakeup"),
                    w("sched_wakeup_new_raw", "sched_wakeup_new"),
                ],
                min_kernel: (5, 18),
                needs_btf: false,
            },
            // The classic record has carried prev_state since 2.6; BPF
            // tracepoint programs arrived in 4.7 (commit 98b5c2c65c29).
            // Needs tracefs mounted; offsets come from its format files.
            Variant {
                hook: Hook::Tracepoint,
                programs: &[
                    p("sched_switch_tp", "sched/sched_switch"),
                    p("sched_wakeup_tp", "sched/sched_wakeup"),
                    p("sched_wakeup_new_tp", "sched/sched_wakeup_new"),
                ],
                min_kernel: (4, 7),
                needs_btf: false,
            },
        ],
        fallback: Some("/proc/stat ctxt, /proc/schedstat"),
        fallback_loses: "the voluntary/involuntary and per-CPU split of context switches, \
                         and the run-queue latency histogram",
    },
    Rule {
        family: Family::Softirq,
        variants: &[
            Variant {
                hook: Hook::TpBtf,
                programs: &[
                    p("softirq_entry_btf", "softirq_entry"),
                    p("softirq_exit_btf", "softirq_exit"),
                ],
                min_kernel: (5, 5),
                needs_btf: true,
            },
            Variant {
                hook: Hook::RawTp,
                programs: &[
                    p("softirq_entry_raw", "softirq_entry"),
                    p("softirq_exit_raw", "softirq_exit"),
                ],
                min_kernel: (4, 17),
                needs_btf: false,
            },
            Variant {
                hook: Hook::Tracepoint,
                programs: &[
                    p("softirq_entry_tp", "irq/softirq_entry"),
                    p("softirq_exit_tp", "irq/softirq_exit"),
                ],
                min_kernel: (4, 7),
                needs_btf: false,
            },
        ],
        fallback: Some("/proc/softirqs"),
        fallback_loses: "the time spent per vector (counts remain)",
    },
    Rule {
        family: Family::Interfaces,
        // The kernel's per-device counters (`dev_get_stats`) are exact; a
        // per-packet probe could only count the same packets again, at a
        // cost per packet. No eBPF mode, like `cpu`.
        variants: &[],
        fallback: Some("/sys/class/net/*/statistics (or /proc/net/dev without sysfs)"),
        fallback_loses: "nothing: these are the devices' own counters",
    },
    Rule {
        family: Family::Connections,
        // A count of sockets by state is a snapshot the kernel answers
        // directly (sock_diag dump, 2.6.14+ for TCP, 3.3+ with
        // `inet_diag_req_v2` and UDP); counting it from state-change events
        // would drift from the truth on every missed event. No eBPF mode.
        // The collector asks netlink first and reads /proc/net/* only when
        // the sock_diag socket or dump fails; the metric's point carries no
        // source, the log line names the one in use.
        variants: &[],
        fallback: Some(
            "netlink sock_diag (NETLINK_SOCK_DIAG dump, inet_diag_req_v2), \
             else /proc/net/{tcp,tcp6,udp,udp6}",
        ),
        fallback_loses: "nothing: both are the kernel's own socket tables",
    },
    Rule {
        family: Family::Drops,
        variants: &[
            // `kfree_skb` gained its `reason` argument in 5.17 (commit
            // c504e5c2f964, "net: skb: introduce kfree_skb_reason()"); `rx_sk`
            // was appended in 6.10 and is not read. Before 5.17 `tp_btf`
            // fails the verifier on the third argument, and `raw_tp` fails
            // to attach (its context is larger than the tracepoint's).
            Variant {
                hook: Hook::TpBtf,
                programs: &[p("drops_kfree_skb_btf", "kfree_skb")],
                min_kernel: (5, 17),
                needs_btf: true,
            },
            Variant {
                hook: Hook::RawTp,
                programs: &[p("drops_kfree_skb_raw", "kfree_skb")],
                min_kernel: (5, 17),
                needs_btf: false,
            },
        ],
        fallback: Some(
            "/proc/net/snmp, /proc/net/netstat, /proc/net/softnet_stat \
             (a fixed mapping of drop counters to reasons)",
        ),
        fallback_loses: "drops that no protocol counter records (e.g. netfilter \
                         and qdisc drops) and the kernel's exact reason names",
    },
    Rule {
        family: Family::Tcp,
        // Both variants read `struct sock` and `tcp_sock` at offsets from
        // kernel BTF (probes/btf.rs), so even `raw_tp` needs BTF.
        variants: &[
            // Socket counters (agent-ebpf/src/tcp/sockets.rs): one program
            // per state change and nothing per I/O, plus a walk of every
            // open file at each collection. `bpf_sock_from_file` is 5.11
            // (commit 4f19cab76136), `bpf_skc_to_tcp_sock` 5.9, the
            // `task_file` iterator 5.8.
            Variant {
                hook: Hook::TpBtf,
                programs: &[
                    p("tcp_state_btf", "inet_sock_set_state"),
                    iter("tcp_walk", "task_file"),
                ],
                min_kernel: (5, 11),
                needs_btf: true,
            },
            // Per I/O (agent-ebpf/src/tcp/io.rs): `sock_send_length` and
            // `sock_recv_length` are 6.3 ("net: sock: add tracepoint for
            // send recv length"), `inet_sock_set_state` 4.16 and
            // `tcp_retransmit_skb` 4.15; `sk_protocol` became a plain field
            // in 5.6.
            Variant {
                hook: Hook::RawTp,
                programs: &[
                    p("tcp_state_raw", "inet_sock_set_state"),
                    p("tcp_send_raw", "sock_send_length"),
                    p("tcp_recv_raw", "sock_recv_length"),
                    p("tcp_retx_raw", "tcp_retransmit_skb"),
                ],
                min_kernel: (6, 3),
                needs_btf: true,
            },
        ],
        fallback: Some("/proc/net/snmp Tcp (RetransSegs, ActiveOpens, PassiveOpens, AttemptFails, EstabResets), \
                        plus a netlink sock_diag sampler of tcp_info (per-peer bytes acked/received, RTT) once per interval"),
        fallback_loses: "connections that open and close between two samples (their bytes and RTT), \
                         bytes a socket moved after its last sample, per-peer retransmits, \
                         the connect-duration histogram, and the refused/timeout split of failed connects",
    },
];

/// The rule for `family`, if it has one.
pub fn rule(family: Family) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.family == family)
}
