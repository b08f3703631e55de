//! OTLP resource attributes: who is sending.
//!
//! Detected: `service.name` (`perch`), `service.version`,
//! `service.instance.id` (derived from the machine id, so it is stable
//! across restarts), `host.name`, `host.id` (`/etc/machine-id`),
//! `host.arch`, `os.type`, `os.version` (kernel release), and
//! `k8s.node.name` when `NODE_NAME` is set (the downward API in the
//! DaemonSet). `OTEL_RESOURCE_ATTRIBUTES` / `[export] resource_attributes`
//! override detected values; `OTEL_SERVICE_NAME` / `service_name` wins
//! for `service.name`, as the OpenTelemetry spec says.

use std::path::Path;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;

use crate::config::export::ExportConfig;

/// `NODE_NAME`: the Kubernetes node, set from the downward API.
pub const ENV_NODE_NAME: &str = "NODE_NAME";

/// Maps Rust's `std::env::consts::ARCH` to the semantic-convention values.
pub fn host_arch(arch: &str) -> &str {
    match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm32",
        "x86" => "x86",
        "powerpc64" => "ppc64",
        "powerpc" => "ppc32",
        "s390x" => "s390x",
        other => other,
    }
}

/// A machine id is 32 lowercase hex digits; anything else is not one.
pub fn parse_machine_id(text: &str) -> Option<String> {
    let id = text.trim();
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// Formats a machine id as a UUID (8-4-4-4-12) for `service.instance.id`.
pub fn instance_id(machine_id: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &machine_id[0..8],
        &machine_id[8..12],
        &machine_id[12..16],
        &machine_id[16..20],
        &machine_id[20..32]
    )
}

fn read_trimmed(root: &Path, rel: &str) -> Option<String> {
    std::fs::read_to_string(root.join(rel))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The resource attributes, in a stable order. `root` is `/` on a host or
/// the host's root mounted in a container (`/host`); `env` looks up
/// environment variables.
pub fn attributes(
    cfg: &ExportConfig,
    root: &Path,
    env: impl Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: String| {
        if let Some(slot) = out.iter_mut().find(|(key, _)| key == k) {
            slot.1 = v;
        } else {
            out.push((k.to_owned(), v));
        }
    };
    put("service.name", "perch".to_owned());
    put("service.version", env!("CARGO_PKG_VERSION").to_owned());
    let machine_id = read_trimmed(root, "etc/machine-id")
        .or_else(|| read_trimmed(root, "var/lib/dbus/machine-id"))
        .and_then(|m| parse_machine_id(&m));
    if let Some(id) = &machine_id {
        put("service.instance.id", instance_id(id));
    }
    if let Some(h) = read_trimmed(root, "proc/sys/kernel/hostname") {
        put("host.name", h);
    }
    if let Some(id) = machine_id {
        put("host.id", id);
    }
    put("host.arch", host_arch(std::env::consts::ARCH).to_owned());
    put("os.type", "linux".to_owned());
    if let Some(r) = read_trimmed(root, "proc/sys/kernel/osrelease") {
        put("os.version", r);
    }
    if let Some(node) = env(ENV_NODE_NAME).filter(|n| !n.trim().is_empty()) {
        put("k8s.node.name", node.trim().to_owned());
    }
    for (k, v) in &cfg.resource_attributes {
        put(k, v.clone());
    }
    if let Some(name) = &cfg.service_name {
        put("service.name", name.clone());
    }
    out
}

/// The OTLP resource message.
pub fn resource(attrs: &[(String, String)]) -> Resource {
    Resource {
        attributes: attrs
            .iter()
            .map(|(k, v)| KeyValue {
                key: k.clone(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(v.clone())),
                }),
                key_strindex: 0,
            })
            .collect(),
        dropped_attributes_count: 0,
        entity_refs: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn get<'a>(attrs: &'a [(String, String)], k: &str) -> Option<&'a str> {
        attrs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn detected_and_overridden() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::create_dir_all(root.path().join("proc/sys/kernel")).unwrap();
        std::fs::write(
            root.path().join("etc/machine-id"),
            "0123456789ABCDEF0123456789abcdef\n",
        )
        .unwrap();
        std::fs::write(root.path().join("proc/sys/kernel/hostname"), "node-1\n").unwrap();
        std::fs::write(
            root.path().join("proc/sys/kernel/osrelease"),
            "6.1.0-13-amd64\n",
        )
        .unwrap();

        let cfg = ExportConfig::default();
        let env = |k: &str| (k == ENV_NODE_NAME).then(|| "k8s-node-7".to_owned());
        let a = attributes(&cfg, root.path(), env);
        let want: &[(&str, &str)] = &[
            ("service.name", "perch"),
            (
                "service.instance.id",
                "01234567-89ab-cdef-0123-456789abcdef",
            ),
            ("host.name", "node-1"),
            ("host.id", "0123456789abcdef0123456789abcdef"),
            ("os.type", "linux"),
            ("os.version", "6.1.0-13-amd64"),
            ("k8s.node.name", "k8s-node-7"),
        ];
        for (k, v) in want {
            assert_eq!(get(&a, k), Some(*v), "{k}");
        }
        assert_eq!(get(&a, "service.version"), Some(env!("CARGO_PKG_VERSION")));
        assert!(get(&a, "host.arch").is_some());

        // Overrides: resource_attributes, then service_name.
        let cfg = ExportConfig {
            service_name: Some("edge-perch".into()),
            resource_attributes: BTreeMap::from([
                ("service.name".to_owned(), "ignored".to_owned()),
                ("host.name".to_owned(), "alias".to_owned()),
                ("deployment.environment".to_owned(), "prod".to_owned()),
            ]),
            ..ExportConfig::default()
        };
        let a = attributes(&cfg, root.path(), |_| None);
        assert_eq!(get(&a, "service.name"), Some("edge-perch"));
        assert_eq!(get(&a, "host.name"), Some("alias"));
        assert_eq!(get(&a, "deployment.environment"), Some("prod"));
        assert_eq!(get(&a, "k8s.node.name"), None);
    }

    #[test]
    fn missing_files_are_left_out() {
        let root = tempfile::tempdir().unwrap();
        let a = attributes(&ExportConfig::default(), root.path(), |_| None);
        assert_eq!(get(&a, "host.id"), None);
        assert_eq!(get(&a, "service.instance.id"), None);
        assert_eq!(get(&a, "service.name"), Some("perch"));
    }

    #[test]
    fn machine_id_and_arch() {
        let cases = [
            ("0123456789abcdef0123456789abcdef", true),
            ("0123456789abcdef0123456789abcde", false),
            ("0123456789abcdef0123456789abcdeg", false),
            ("", false),
        ];
        for (s, ok) in cases {
            assert_eq!(parse_machine_id(s).is_some(), ok, "{s:?}");
        }
        assert_eq!(host_arch("x86_64"), "amd64");
        assert_eq!(host_arch("aarch64"), "arm64");
        assert_eq!(host_arch("riscv64"), "riscv64");
    }
}
