//! Perch's kernel programs. One module per probe family; each module's header
//! names its hooks, maps and the oldest kernel it supports. Every program
//! aggregates in per-CPU maps: userspace reads the maps once per interval and
//! never receives one record per event.
#![no_std]
#![no_main]

mod drops;
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
