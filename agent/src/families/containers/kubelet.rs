//! Pod and container names from the kubelet (`probes.containers.kubelet_url`):
//! `k8s.pod.name`, `k8s.namespace.name` and `k8s.container.name` for the
//! series that carry `k8s.pod.uid` and `container.id`.
//!
//! Off the hot path: a thread of its own asks the kubelet's pod list
//! (`GET /pods`, what `kubectl get --raw /api/v1/nodes/<node>/proxy/pods`
//! shows) every `kubelet_refresh_secs`, with the pod's service-account
//! token, and swaps the cached names. The pipeline adds names from the
//! cache ([`Names::enrich`]); it never waits for the kubelet. A failed
//! refresh keeps the last names (a pod that started since has ids only),
//! is logged when the cause changes, and counted in
//! `perch.k8s.metadata.errors{error.type}`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;

use crate::model::{Attributes, Data, Snapshot};
use crate::selfmetrics::SelfMetrics;

/// Longest pod list accepted (bytes): 110 pods (the kubelet's default
/// maximum) take about 1 MB of JSON; 64 MiB is a node of thousands.
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// Names of the pods and containers on this node.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Names {
    /// `k8s.pod.uid` -> (`k8s.pod.name`, `k8s.namespace.name`).
    pub pods: HashMap<String, (String, String)>,
    /// `container.id` (64 hex) -> `k8s.container.name`.
    pub containers: HashMap<String, String>,
}

#[derive(Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Deserialize)]
struct Pod {
    metadata: PodMeta,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Deserialize)]
struct PodMeta {
    uid: String,
    name: String,
    #[serde(default)]
    namespace: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerStatus {
    name: String,
    /// `containerd://<id>`, `cri-o://<id>`, `docker://<id>`; absent while
    /// the container is being created.
    #[serde(default, rename = "containerID")]
    container_id: Option<String>,
}

/// Parses the kubelet's `/pods` answer (a `v1.PodList`).
pub fn parse_pods(body: &[u8]) -> Result<Names, String> {
    let list: PodList = serde_json::from_slice(body).map_err(|e| format!("not a PodList: {e}"))?;
    let mut names = Names::default();
    for pod in list.items {
        let st = pod.status;
        for c in st
            .container_statuses
            .into_iter()
            .chain(st.init_container_statuses)
            .chain(st.ephemeral_container_statuses)
        {
            let Some(id) = c.container_id.as_deref().and_then(|s| s.split_once("://")) else {
                continue;
            };
            // The ids cgroup paths carry: 64 lowercase hex.
            let id = id.1.to_ascii_lowercase();
            if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                names.containers.insert(id, c.name);
            }
        }
        names.pods.insert(
            pod.metadata.uid,
            (pod.metadata.name, pod.metadata.namespace),
        );
    }
    Ok(names)
}

impl Names {
    /// Adds the names of every point's pod and container, where known and
    /// not already there.
    pub fn enrich(&self, snapshot: &mut Snapshot) {
        if self.pods.is_empty() && self.containers.is_empty() {
            return;
        }
        for m in &mut snapshot.metrics {
            match &mut m.data {
                Data::Sum { points, .. } | Data::Gauge { points } => {
                    for p in points {
                        self.add_to(&mut p.attributes);
                    }
                }
                Data::Histogram { points } => {
                    for p in points {
                        self.add_to(&mut p.attributes);
                    }
                }
            }
        }
    }

    fn add_to(&self, attrs: &mut Attributes) {
        let get = |attrs: &Attributes, key: &str| -> Option<String> {
            attrs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        };
        let has = |attrs: &Attributes, key: &str| attrs.iter().any(|(k, _)| *k == key);
        if let Some(uid) = get(attrs, "k8s.pod.uid") {
            if let Some((name, ns)) = self.pods.get(&uid) {
                if !has(attrs, "k8s.pod.name") {
                    attrs.push(("k8s.pod.name", name.clone().into()));
                    attrs.push(("k8s.namespace.name", ns.clone().into()));
                }
            }
        }
        if let Some(id) = get(attrs, "container.id") {
            if let Some(name) = self.containers.get(&id) {
                if !has(attrs, "k8s.container.name") {
                    attrs.push(("k8s.container.name", name.clone().into()));
                }
            }
        }
    }
}

/// `text` with each `${NAME}` replaced by `var(NAME)`.
pub fn expand_env(text: &str, var: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(j) = after.find('}') else {
            return Err(format!("{text:?}: unclosed ${{"));
        };
        let name = &after[..j];
        let value = var(name).ok_or_else(|| format!("{text:?}: ${{{name}}} is not set"))?;
        out.push_str(&value);
        rest = &after[j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Where and how to ask the kubelet.
#[derive(Debug, Clone)]
pub struct Source {
    /// `https://<node>:10250` (or the read-only `http://...:10255`).
    pub url: String,
    /// Bearer token file, read at each refresh (tokens are rotated).
    pub token_file: Option<PathBuf>,
    /// CA bundle that signed the kubelet's serving certificate.
    pub ca_file: Option<PathBuf>,
    pub refresh: Duration,
    pub timeout: Duration,
}

/// The cached names, shared with the pipeline.
pub type Shared = Arc<RwLock<Arc<Names>>>;

/// Why a refresh failed, for `error.type`.
fn kind(e: &FetchError) -> &'static str {
    match e {
        FetchError::Token(_) => "token",
        FetchError::Client(_) => "config",
        FetchError::Request(_) => "request",
        FetchError::Status(_) => "status",
        FetchError::Malformed(_) => "malformed",
        FetchError::Panic(_) => "panic",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("reading the token file: {0}")]
    Token(String),
    #[error("building the HTTP client: {0}")]
    Client(String),
    #[error("GET /pods: {0}")]
    Request(String),
    #[error("GET /pods answered HTTP {0}")]
    Status(u16),
    #[error("GET /pods: {0}")]
    Malformed(String),
    #[error("the refresh panicked: {0}")]
    Panic(String),
}

/// Starts the refresher thread; returns the cache it fills. The first
/// refresh starts at once; until it succeeds, series have ids only.
pub fn spawn(source: Source, selfm: Arc<SelfMetrics>) -> std::io::Result<Shared> {
    let shared: Shared = Arc::new(RwLock::new(Arc::new(Names::default())));
    let out = shared.clone();
    std::thread::Builder::new()
        .name("perch-kubelet".into())
        .spawn(move || run(source, selfm, shared))?;
    Ok(out)
}

fn run(source: Source, selfm: Arc<SelfMetrics>, shared: Shared) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "kubelet metadata: no runtime; pod names disabled");
            return;
        }
    };
    let mut last_error: Option<String> = None;
    loop {
        // A panic would end the thread and the names with it: counted and
        // tried again at the next refresh instead.
        let got =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(fetch(&source))))
                .unwrap_or_else(|p| {
                    let what = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(FetchError::Panic(what))
                });
        match got {
            Ok(names) => {
                selfm.set(
                    crate::catalogue::K8S_METADATA_PODS,
                    "Pods whose names the last successful kubelet refresh returned.",
                    "{pod}",
                    Vec::new(),
                    names.pods.len() as f64,
                );
                *shared.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(names);
                if last_error.take().is_some() {
                    tracing::info!(url = %source.url, "kubelet metadata: refresh works again");
                }
            }
            Err(e) => {
                selfm.add(
                    crate::catalogue::K8S_METADATA_ERRORS,
                    "Kubelet pod-list refreshes that failed; series kept the last names, or ids only.",
                    "{error}",
                    vec![("error.type", kind(&e).into())],
                    1,
                );
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(url = %source.url, error = %msg, "kubelet metadata: refresh failed; pod and container names stay as they were (ids only for new pods)");
                }
                last_error = Some(msg);
            }
        }
        std::thread::sleep(source.refresh);
    }
}

async fn fetch(source: &Source) -> Result<Names, FetchError> {
    let mut builder = reqwest::Client::builder()
        .timeout(source.timeout)
        .connect_timeout(source.timeout)
        .no_proxy();
    // reqwest needs a TLS setup even for http:// (no default provider).
    let ca = if source.url.starts_with("https://") {
        source.ca_file.as_deref()
    } else {
        None
    };
    builder = builder.use_preconfigured_tls(tls(ca)?);
    let client = builder
        .build()
        .map_err(|e| FetchError::Client(e.to_string()))?;
    let url = format!("{}/pods", source.url.trim_end_matches('/'));
    let mut req = client.get(&url);
    if let Some(f) = &source.token_file {
        let token = crate::sources::read_file_capped(f, 64 * 1024)
            .map_err(|e| FetchError::Token(format!("{}: {e}", f.display())))?;
        req = req.bearer_auth(token.trim());
    }
    let mut resp = req
        .send()
        .await
        .map_err(|e| FetchError::Request(crate::exporters::otlp::transport::error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(FetchError::Status(resp.status().as_u16()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| FetchError::Request(crate::exporters::otlp::transport::error_chain(&e)))?
    {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(FetchError::Malformed(format!(
                "pod list larger than {MAX_BODY_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    parse_pods(&body).map_err(FetchError::Malformed)
}

/// TLS to the kubelet: its CA (`ca_file`), else the system roots (the
/// exporter's setup). No option skips verification: the bearer token
/// would go to whoever answers.
fn tls(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, FetchError> {
    let pem = ca_file
        .map(|f| std::fs::read(f).map_err(|e| FetchError::Client(format!("{}: {e}", f.display()))))
        .transpose()?;
    let what = ca_file.map_or("system roots".into(), |f| f.display().to_string());
    crate::exporters::otlp::transport::rustls_verifying(pem, &what).map_err(|e| {
        FetchError::Client(match e {
            crate::exporters::otlp::ExportError::Endpoint { reason, .. } => {
                format!("{what}: {reason}")
            }
            other => other.to_string(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Metric, Number, NumberPoint};
    use std::time::SystemTime;

    const ID: &str = "4f1b3c2d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c";
    const UID: &str = "5d0e7a9c-3b1f-4c2d-9e8a-7b6c5d4e3f2a";

    fn pod_list() -> String {
        format!(
            r#"{{"kind":"PodList","apiVersion":"v1","items":[
              {{"metadata":{{"name":"web-0","namespace":"shop","uid":"{UID}"}},
                "status":{{"containerStatuses":[
                  {{"name":"app","containerID":"containerd://{ID}"}},
                  {{"name":"starting"}}],
                  "initContainerStatuses":[{{"name":"init","containerID":"cri-o://{}"}}]}}}},
              {{"metadata":{{"name":"pending","namespace":"shop","uid":"u2"}}}}]}}"#,
            "ab".repeat(32)
        )
    }

    #[test]
    fn pod_lists_parse_into_names() {
        let n = parse_pods(pod_list().as_bytes()).expect("parses");
        assert_eq!(n.pods[UID], ("web-0".to_owned(), "shop".to_owned()));
        assert_eq!(n.pods["u2"].0, "pending", "no status yet");
        assert_eq!(n.containers[ID], "app");
        assert_eq!(n.containers[&"ab".repeat(32)], "init");
        assert_eq!(
            n.containers.len(),
            2,
            "a container without an id is skipped"
        );
        for bad in [
            "",
            "null",
            "{\"items\":[{\"metadata\":{}}]}",
            "{\"items\":7}",
        ] {
            assert!(parse_pods(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert_eq!(parse_pods(b"{}").unwrap(), Names::default(), "no items");
    }

    #[test]
    fn urls_expand_environment_variables() {
        let var = |k: &str| (k == "NODE_IP").then(|| "10.0.0.7".to_owned());
        assert_eq!(
            expand_env("https://${NODE_IP}:10250", var).unwrap(),
            "https://10.0.0.7:10250"
        );
        assert_eq!(
            expand_env("http://127.0.0.1:10255", var).unwrap(),
            "http://127.0.0.1:10255"
        );
        let e = expand_env("https://${NODE}:10250", var).unwrap_err();
        assert!(e.contains("${NODE} is not set"), "{e}");
        assert!(expand_env("https://${NODE_IP", var)
            .unwrap_err()
            .contains("unclosed"));
    }

    #[test]
    fn enrich_adds_names_where_known() {
        let n = parse_pods(pod_list().as_bytes()).unwrap();
        let point = |attrs: Attributes| NumberPoint {
            attributes: attrs,
            start_time: None,
            time: SystemTime::UNIX_EPOCH,
            value: Number::Int(1),
        };
        let mut snap = Snapshot {
            time: SystemTime::UNIX_EPOCH,
            metrics: vec![Metric {
                name: "container.cpu.time",
                description: "",
                unit: "s",
                data: Data::Sum {
                    monotonic: true,
                    points: vec![
                        point(vec![
                            ("container.id", ID.into()),
                            ("k8s.pod.uid", UID.into()),
                        ]),
                        point(vec![("k8s.pod.uid", "unknown".into())]),
                        point(vec![]),
                    ],
                },
            }],
        };
        n.enrich(&mut snap);
        let Data::Sum { points, .. } = &snap.metrics[0].data else {
            unreachable!()
        };
        let keys = |p: &NumberPoint| -> Vec<String> {
            p.attributes
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect()
        };
        assert_eq!(
            keys(&points[0]),
            vec![
                format!("container.id={ID}"),
                format!("k8s.pod.uid={UID}"),
                "k8s.pod.name=web-0".to_owned(),
                "k8s.namespace.name=shop".to_owned(),
                "k8s.container.name=app".to_owned(),
            ]
        );
        assert_eq!(keys(&points[1]), vec!["k8s.pod.uid=unknown"], "ids only");
        assert!(points[2].attributes.is_empty());
    }
}
