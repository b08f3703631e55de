//! Perch's kernel programs. One module per probe family; each module's header
//! names its hooks, maps and the oldest kernel it supports. Every event
//! program aggregates in maps: userspace reads the maps once per interval and
//! never receives one record per event. The one iterator (`tcp_walk`) runs
//! when userspace reads it, once per interval, and writes a record per live
//! socket: a snapshot, like a `sock_diag` dump.
//!
//! Names are the contract with userspace. A map's name in the object is its
//! static's name (`#[map]` takes no `name`, so there is one place to change
//! here), which must equal the `MAP_*` constant in `agent-common`; a
//! program's is its function's name, which `agent/src/gate/rules.rs` lists.
//! `agent/src/probes/contract.rs` checks the built object against
//! `agent_common::contract` and the rules.
#![no_std]
#![no_main]

mod drops;
mod histogram;
mod kmem;
mod sched;
mod softirq;
mod tcp;
mod tracepoint;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no reachable panic; this is never called.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
