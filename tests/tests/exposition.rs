//! The `/metrics` endpoint as Prometheus sees it: `promtool check metrics`
//! (apt `prometheus`, installed by `cargo xtask setup --test`) parses and
//! lints a real scrape of the agent with every family on.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use perch_tests::perch::Agent;

/// promtool lints that follow from OpenTelemetry semantic-convention names
/// and are kept on purpose.
const ACCEPTED_LINTS: &[&str] = &[
    // `system.network.connection.count` is the semconv name of a gauge.
    "system_network_connection_count non-histogram and non-summary metrics should not have \"_count\" suffix",
];

#[test]
fn promtool_accepts_the_scrape() {
    let _serial = perch_tests::kernel::privileged();
    let agent = Agent::start(&["--interval", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let (code, body) = agent.get("/metrics").expect("scrape");
    assert_eq!(code, 200);
    for needle in [
        "# TYPE system_cpu_time_seconds_total counter",
        "# TYPE perch_scheduler_runqueue_latency_seconds histogram",
        "# TYPE perch_probe_state gauge",
    ] {
        assert!(body.contains(needle), "missing `{needle}`");
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt prometheus; `cargo xtask setup --test` installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("writing the scrape to promtool");
    let out = child.wait_with_output().expect("promtool");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // Exit 1: the text did not parse. Exit 3: lint problems, each listed.
    assert_ne!(
        out.status.code(),
        Some(1),
        "promtool could not parse /metrics:\n{report}"
    );
    let unexpected: Vec<&str> = report
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !ACCEPTED_LINTS.contains(l))
        .collect();
    assert!(unexpected.is_empty(), "promtool lints: {unexpected:#?}");
    assert!(agent.stop(), "perch did not exit cleanly");
}
