//! Test hosts: two network namespaces joined by a veth pair, made and
//! removed by the test. Traffic between them never leaves this machine.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::kernel::sh;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two namespaces `a` and `b`, `veth_a` in `a` (`ip_a`) and `veth_b` in `b`
/// (`ip_b`), on a /24 of their own. Removed on drop.
#[derive(Debug)]
pub struct NetnsPair {
    pub a: String,
    pub b: String,
    pub veth_a: String,
    pub veth_b: String,
    pub ip_a: std::net::Ipv4Addr,
    pub ip_b: std::net::Ipv4Addr,
}

impl NetnsPair {
    pub fn new() -> NetnsPair {
        crate::kernel::require_root();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{}", std::process::id() % 100_000, n);
        // Subnet per pair, in the test's own namespaces only.
        let subnet = (std::process::id() % 200 + n * 7) % 250 + 1;
        let p = NetnsPair {
            a: format!("perch{id}a"),
            b: format!("perch{id}b"),
            veth_a: format!("pv{id}a"),
            veth_b: format!("pv{id}b"),
            ip_a: format!("10.231.{subnet}.1").parse().expect("ip"),
            ip_b: format!("10.231.{subnet}.2").parse().expect("ip"),
        };
        sh(&format!(
            "set -e; ip netns add {a}; ip netns add {b}; \
             ip link add {va} netns {a} type veth peer name {vb} netns {b}; \
             ip -n {a} addr add {ia}/24 dev {va}; ip -n {b} addr add {ib}/24 dev {vb}; \
             ip -n {a} link set lo up; ip -n {b} link set lo up; \
             ip -n {a} link set {va} up; ip -n {b} link set {vb} up",
            a = p.a,
            b = p.b,
            va = p.veth_a,
            vb = p.veth_b,
            ia = p.ip_a,
            ib = p.ip_b
        ));
        p
    }

    /// Runs `cmd` in namespace `ns` with `ip netns exec`.
    pub fn exec(&self, ns: &str, cmd: &str) -> String {
        sh(&format!(
            "ip netns exec {ns} sh -c '{}'",
            cmd.replace('\'', "'\\''")
        ))
    }

    /// Runs `f` on a thread that has entered namespace `ns`: sockets it
    /// opens live there.
    pub fn run_in<T: Send + 'static>(
        &self,
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a valid namespace fd affects this thread only.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Default for NetnsPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        let _ = std::process::Command::new("sh")
            .args([
                "-c",
                &format!("ip netns del {} ; ip netns del {}", self.a, self.b),
            ])
            .status();
    }
}
