//! Every metric name Perch emits, in one place: the collectors, the
//! pipeline and the self-metrics use these constants, and a test checks
//! that each one is documented in `docs/metrics.md`.
//!
//! Names follow the OpenTelemetry semantic conventions where one exists
//! (`system.cpu.time`, `system.network.io`) and use `perch.*` elsewhere.

/// Writes one `pub const` per name and [`ALL`], so no name can be left out
/// of the docs check.
macro_rules! catalogue {
    ($( $(#[doc = $doc:literal])* $name:ident = $value:literal, )*) => {
        $( $(#[doc = $doc])* pub const $name: &str = $value; )*

        /// Every metric name above.
        pub const ALL: &[&str] = &[$($name),*];
    };
}

catalogue! {
    // Host metrics, by family.

    /// cpu: CPU time per CPU and mode.
    CPU_TIME = "system.cpu.time",
    /// cpu: load averages.
    LOAD_1M = "system.cpu.load_average.1m",
    LOAD_5M = "system.cpu.load_average.5m",
    LOAD_15M = "system.cpu.load_average.15m",

    /// sched: context switches by CPU and type.
    CONTEXT_SWITCHES = "perch.cpu.context_switches",
    /// sched: run-queue latency histogram.
    RUNQUEUE_LATENCY = "perch.scheduler.runqueue.latency",
    /// sched: run-queue latency per cgroup (container, pod, host cgroup).
    CONTAINER_RUNQUEUE_LATENCY = "perch.container.runqueue.latency",
    /// sched: time runnable but not running, per CPU.
    WAIT_TIME = "perch.scheduler.wait.time",

    /// softirq: time per CPU and vector.
    SOFTIRQ_TIME = "perch.cpu.softirq.time",
    /// softirq: count per CPU and vector.
    SOFTIRQ_COUNT = "perch.cpu.softirq.count",

    /// interfaces: bytes.
    NETWORK_IO = "system.network.io",
    /// interfaces: packets.
    NETWORK_PACKETS = "system.network.packet.count",
    /// interfaces: errors.
    NETWORK_ERRORS = "system.network.errors",
    /// interfaces: packets dropped by the device.
    NETWORK_DROPPED = "system.network.packet.dropped",

    /// connections: sockets by transport and state.
    CONNECTIONS = "system.network.connection.count",

    /// containers: CPU time per container (and host cgroup) and mode.
    CONTAINER_CPU_TIME = "container.cpu.time",
    /// containers: CFS periods throttled.
    CONTAINER_THROTTLED_PERIODS = "perch.container.cpu.throttled.periods",
    /// containers: time throttled.
    CONTAINER_THROTTLED_TIME = "perch.container.cpu.throttled.time",
    /// containers: CPU quota per period.
    CONTAINER_CPU_QUOTA = "perch.container.cpu.quota",
    /// containers: CFS period.
    CONTAINER_CPU_PERIOD = "perch.container.cpu.period",
    /// containers: cgroups past the walk's bounds.
    CONTAINER_CGROUPS_SKIPPED = "perch.containers.cgroups.skipped",
    /// containers: failed kubelet pod-list refreshes (pod names).
    K8S_METADATA_ERRORS = "perch.k8s.metadata.errors",
    /// containers: pods named by the last kubelet refresh.
    K8S_METADATA_PODS = "perch.k8s.metadata.pods",

    /// tcp: payload bytes per peer.
    TCP_IO = "perch.tcp.io",
    /// tcp: retransmitted segments.
    TCP_RETRANSMITS = "perch.tcp.retransmits",
    /// tcp: connections established.
    TCP_OPENED = "perch.tcp.connections.opened",
    /// tcp: connections that failed.
    TCP_FAILED = "perch.tcp.connections.failed",
    /// tcp: SYN sent to established.
    TCP_CONNECT_DURATION = "perch.tcp.connect.duration",
    /// tcp: smoothed round-trip time.
    TCP_RTT = "perch.tcp.rtt",
    /// tcp: idle peers evicted from the kernel map.
    TCP_PEERS_EVICTED = "perch.tcp.peers.evicted",
    /// tcp: evicted peers forgotten.
    TCP_PEERS_FORGOTTEN = "perch.tcp.peers.forgotten",
    /// tcp: sockets older than the agent adopted by the walk.
    TCP_SOCKETS_ADOPTED = "perch.tcp.sockets.adopted",
    /// tcp: sockets closed without being tracked.
    TCP_SOCKETS_UNTRACKED = "perch.tcp.sockets.untracked",

    /// drops: packets dropped, by the kernel's reason.
    PACKET_DROPS = "perch.network.packet.drops",

    // Self-metrics.

    /// 1 for the source each family uses.
    PROBE_STATE = "perch.probe.state",
    /// Collections a collector could not complete.
    COLLECTOR_ERRORS = "perch.collector.errors",
    /// Wall time of the last collection.
    COLLECTION_DURATION = "perch.collection.duration",
    /// Kernel-side inserts refused because a bounded map was full (the one
    /// name for "map full", every family).
    BPF_MAP_INSERT_FAILURES = "perch.bpf.map.insert_failures",
    /// Entries in a bounded kernel map.
    BPF_MAP_ENTRIES = "perch.bpf.map.entries",
    /// Capacity of a bounded kernel map.
    BPF_MAP_CAPACITY = "perch.bpf.map.capacity",
    /// Runs of each attached program.
    BPF_PROGRAM_RUN_COUNT = "perch.bpf.program.run.count",
    /// Run time of each attached program.
    BPF_PROGRAM_RUN_TIME = "perch.bpf.program.run.time",
    /// The agent's CPU time (Prometheus: `process_cpu_seconds_total`).
    PROCESS_CPU_TIME = "process.cpu.time",
    /// The agent's resident memory, the one RSS metric (Prometheus:
    /// `process_resident_memory_bytes`).
    PROCESS_MEMORY_USAGE = "process.memory.usage",
    /// The agent's virtual memory (`process_virtual_memory_bytes`).
    PROCESS_MEMORY_VIRTUAL = "process.memory.virtual",
    /// Open file descriptors (`process_open_fds`).
    PROCESS_OPEN_FDS = "process.open_file_descriptor.count",
    /// `RLIMIT_NOFILE` (`process_max_fds`).
    PROCESS_MAX_FDS = "process.open_file_descriptor.limit",
    /// Start time, seconds since the epoch (`process_start_time_seconds`).
    PROCESS_START_TIME = "process.start_time",
    /// Log lines that could not be written to stderr.
    LOG_LINES_DROPPED = "perch.log.lines.dropped",

    /// Pipeline: wall-clock steps back.
    CLOCK_JUMPS = "perch.clock.jumps",
    /// Pipeline: detail mode.
    DETAIL_MODE = "perch.pipeline.detail.mode",
    /// Pipeline: error ratio driving detail.
    DETAIL_RATIO = "perch.pipeline.detail.ratio",
    /// Pipeline: series folded by reduced detail.
    DETAIL_FOLDED = "perch.pipeline.detail.folded",
    /// Pipeline: series folded by the series cap.
    SERIES_OVERFLOWED = "perch.pipeline.series.overflowed",
    /// Pipeline: memory limiter state.
    MEMORY_STATE = "perch.memory.state",
    /// Pipeline: series shed past the soft memory limit.
    MEMORY_SHED = "perch.memory.shed",

    /// Export: requests by outcome.
    EXPORT_REQUESTS = "perch.export.requests",
    /// Export: request latency by outcome (histogram).
    EXPORT_DURATION = "perch.export.duration",
    /// Export: retries.
    EXPORT_RETRIES = "perch.export.retries",
    /// Export: points delivered.
    EXPORT_POINTS_SENT = "perch.export.points.sent",
    /// Export: points dropped, by reason.
    EXPORT_POINTS_DROPPED = "perch.export.points.dropped",
    /// Export: bytes sent.
    EXPORT_BYTES_SENT = "perch.export.bytes.sent",
    /// Export: encoded bytes queued in memory.
    EXPORT_QUEUE_BYTES = "perch.export.queue.bytes",
    /// Export: batches queued in memory.
    EXPORT_QUEUE_BATCHES = "perch.export.queue.batches",
    /// Export: circuit breaker state.
    EXPORT_CIRCUIT_STATE = "perch.export.circuit.state",
    /// Export: bytes in the disk queue.
    EXPORT_DISK_BYTES = "perch.export.disk.bytes",
    /// Export: corrupt disk-queue files set aside.
    EXPORT_DISK_CORRUPT = "perch.export.disk.corrupt",
    /// Export: `.corrupt` disk-queue files deleted (too many, too old).
    EXPORT_DISK_CORRUPT_REMOVED = "perch.export.disk.corrupt.removed",
    /// Export: collector responses cut off at the size cap.
    EXPORT_RESPONSE_TRUNCATED = "perch.export.response.truncated",

    /// Readiness: 1 while `/readyz` answers 200.
    READY = "perch.ready",
    /// HTTP listener: connections closed before or instead of being
    /// served, by reason.
    HTTP_CONNECTIONS_REFUSED = "perch.http.connections.refused",
    /// HTTP listener: connections open now.
    HTTP_CONNECTIONS_ACTIVE = "perch.http.connections.active",
}

/// OpenTelemetry names of the agent's own process metrics, and the names
/// every Prometheus client library gives them, which the Prometheus
/// exposition uses instead of the generic translation.
pub const PROMETHEUS_PROCESS_NAMES: &[(&str, &str)] = &[
    (PROCESS_CPU_TIME, "process_cpu_seconds_total"),
    (PROCESS_MEMORY_USAGE, "process_resident_memory_bytes"),
    (PROCESS_MEMORY_VIRTUAL, "process_virtual_memory_bytes"),
    (PROCESS_OPEN_FDS, "process_open_fds"),
    (PROCESS_MAX_FDS, "process_max_fds"),
    (PROCESS_START_TIME, "process_start_time_seconds"),
];

/// The value of `network.peer.address` for peers folded together: by the
/// pipeline (reduced detail, memory shedding) and by the tcp family (peers
/// that did not fit its kernel map). One value, so a backend sees one
/// "everyone else" series.
pub const OTHER_PEER: &str = "other";

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric is documented in docs/metrics.md, under its own name.
    #[test]
    fn every_metric_is_documented() {
        let docs = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"));
        let missing: Vec<&str> = ALL
            .iter()
            .copied()
            .filter(|n| !docs.contains(&format!("`{n}`")) && !docs.contains(&format!("`{n}{{")))
            .collect();
        assert!(missing.is_empty(), "not in docs/metrics.md: {missing:?}");
        let mut sorted = ALL.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ALL.len(), "a name is listed twice");
    }
}
