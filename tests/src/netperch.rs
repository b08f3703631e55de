//! Running `perch collect` inside a network namespace, so that `/proc/net`
//! and `/sys/class/net` show that namespace (`ip netns exec` remounts
//! `/sys` for it), and reading a namespace's own counters as the reference.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::kernel::sh;
use crate::perch_bin;

/// Like [`crate::perch::collect`], but `perch` runs in namespace `ns`
/// through `ip netns exec`. Returns the JSON snapshot and `during`'s result.
pub fn collect_in_netns<T>(
    ns: &str,
    args: &[&str],
    window: Duration,
    during: impl FnOnce() -> T,
) -> (Value, T) {
    collect_in_netns_env(ns, args, &[], window, during)
}

/// [`collect_in_netns`] with extra environment variables for `perch`.
pub fn collect_in_netns_env<T>(
    ns: &str,
    args: &[&str],
    env: &[(&str, &str)],
    window: Duration,
    during: impl FnOnce() -> T,
) -> (Value, T) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(perch_bin())
        .args(["collect", "--format", "json", "--duration"])
        .arg(format!("{}ms", window.as_millis()))
        .args(args)
        .envs(env.iter().copied());
    crate::perch::collect_with(cmd, during)
}

/// `/sys/class/net/<ifname>/statistics/<counter>` as namespace `ns` sees it.
pub fn if_stat(ns: &str, ifname: &str, counter: &str) -> u64 {
    let out = sh(&format!(
        "ip netns exec {ns} cat /sys/class/net/{ifname}/statistics/{counter}"
    ));
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{ns} {ifname} {counter}: {out:?}: {e}"))
}

/// One counter of namespace `ns`'s `/proc/net/snmp` or `/proc/net/netstat`
/// (`file` = "snmp" or "netstat"), e.g. `("Udp", "NoPorts")`.
pub fn snmp(ns: &str, file: &str, proto: &str, name: &str) -> i64 {
    let text = sh(&format!("ip netns exec {ns} cat /proc/net/{file}"));
    let prefix = format!("{proto}:");
    let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
        panic!("{proto} not in {ns}'s /proc/net/{file}:\n{text}");
    };
    let i = names
        .split_whitespace()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("{proto} {name} not in {ns}'s /proc/net/{file}"));
    values
        .split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{proto} {name}: bad value in {values:?}"))
}
