//! tracefs `events/<category>/<name>/format` files: where each field of a
//! classic tracepoint's record lives. The classic tracepoint variants read
//! their fields at these offsets, so the layout is the running kernel's.

use std::path::{Path, PathBuf};

use super::ProcError;

/// Where tracefs may be mounted, in the kernel's order of preference.
pub const MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The first mounted tracefs (it has an `events` directory).
pub fn mount() -> Option<PathBuf> {
    MOUNTS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

/// The byte offset of `field` in a format file, e.g. `prev_pid` in
/// `field:pid_t prev_pid; offset:24; size:4; signed:1;` (tab-separated).
pub fn parse_field_offset(text: &str, file: &str, field: &str) -> Result<u32, ProcError> {
    for (i, line) in text.lines().enumerate() {
        let Some(decl) = line.trim().strip_prefix("field:") else {
            continue;
        };
        let mut parts = decl.split(';');
        let name = parts.next().unwrap_or_default();
        // The declaration ends with the name, maybe with an array suffix.
        let declared = name
            .split_whitespace()
            .last()
            .map(|n| n.split('[').next().unwrap_or(n));
        if declared != Some(field) {
            continue;
        }
        let offset = parts
            .map(str::trim)
            .find_map(|p| p.strip_prefix("offset:"))
            .ok_or_else(|| ProcError::Malformed {
                file: file.to_owned(),
                line: i + 1,
                reason: format!("field {field} has no offset"),
            })?;
        return offset.trim().parse().map_err(|_| ProcError::Malformed {
            file: file.to_owned(),
            line: i + 1,
            reason: format!("field {field}: offset `{offset}` is not a number"),
        });
    }
    Err(ProcError::Missing {
        file: file.to_owned(),
        what: format!("field {field}"),
    })
}

/// Reads `events/<event>/format` under `root` and returns `field`'s offset.
pub fn field_offset(root: &Path, event: &str, field: &str) -> Result<u32, ProcError> {
    let path = root.join("events").join(event).join("format");
    // A format file is a few KiB; 1 MiB is far past any the kernel writes.
    let text = crate::sources::read_file_capped(&path, 1 << 20)?;
    parse_field_offset(&text, &path.display().to_string(), field)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWITCH: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tracefs/sched_switch.format"
    ));
    const WAKEUP: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tracefs/sched_wakeup.format"
    ));
    const SOFTIRQ: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tracefs/softirq_exit.format"
    ));

    #[test]
    fn offsets_from_a_6_18_kernel() {
        for (text, field, want) in [
            (SWITCH, "prev_pid", 24),
            (SWITCH, "prev_state", 32),
            (SWITCH, "next_pid", 56),
            (SWITCH, "prev_comm", 8),
            (WAKEUP, "pid", 24),
            (SOFTIRQ, "vec", 8),
        ] {
            assert_eq!(
                parse_field_offset(text, "f", field).unwrap(),
                want,
                "{field}"
            );
        }
    }

    #[test]
    fn missing_and_malformed_fields_are_errors() {
        assert!(matches!(
            parse_field_offset(SWITCH, "f", "no_such_field"),
            Err(ProcError::Missing { .. })
        ));
        let bad = "format:\n\tfield:int pid;\toffset:xx;\tsize:4;\tsigned:1;\n";
        let err = parse_field_offset(bad, "f", "pid").unwrap_err().to_string();
        assert!(
            err.contains("f: line 2") && err.contains("not a number"),
            "{err}"
        );
        // `common_pid` must not match `pid`.
        let only_common = "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n";
        assert!(parse_field_offset(only_common, "f", "pid").is_err());
    }
}
