//! Connections family: sockets by transport and state, a gauge.
//!
//! - Hooks: none. A count by state is a snapshot the kernel answers
//!   directly; counting it from state-change events would drift with every
//!   missed event and miss sockets opened before the agent.
//! - Metric: `system.network.connection.count{network.transport,
//!   network.connection.state}`, TCP and UDP, IPv4 and IPv6 together.
//! - Fallback: netlink `sock_diag`, else `/proc/net/{tcp,tcp6,udp,udp6}`
//!   (see `collector.rs`).
//! - Oldest kernel: any (`/proc/net/tcp` since 2.2; sock_diag for UDP 3.3).

mod collector;
pub mod net_sockets;

use crate::gate::rules::Rule;

use super::{BuildCtx, BuildError, ProbeConfig, Unit};

pub use collector::{count_states, state_name, ConnectionsCollector};

/// `[probes.connections]`.
pub type Config = ProbeConfig;

pub const RULE: Rule = Rule {
    // A count of sockets by state is a snapshot the kernel answers directly
    // (sock_diag dump, 2.6.14+ for TCP, 3.3+ with `inet_diag_req_v2` and
    // UDP); counting it from state-change events would drift from the truth
    // on every missed event. No eBPF mode. The collector asks netlink first
    // and reads /proc/net/* only when the sock_diag socket or dump fails;
    // the metric's point carries no source, the log line names the one in
    // use.
    variants: &[],
    fallback: Some(
        "netlink sock_diag (NETLINK_SOCK_DIAG dump, inet_diag_req_v2), \
         else /proc/net/{tcp,tcp6,udp,udp6}",
    ),
    fallback_loses: "nothing: both are the kernel's own socket tables",
};

pub struct Connections;
pub static UNIT: Connections = Connections;

impl Unit for Connections {
    fn rule(&self) -> &'static Rule {
        &RULE
    }

    fn build(
        &self,
        ctx: &mut BuildCtx<'_>,
    ) -> Result<Box<dyn crate::collectors::Collector>, BuildError> {
        Ok(Box::new(ConnectionsCollector::new(
            ctx.proc.clone(),
            ctx.plan.requested,
        )))
    }
}
