//! `[export]` and `[pipeline]` configuration.
//!
//! Precedence, highest first: CLI flags ([`ExportArgs`]), signal-specific
//! env (`OTEL_EXPORTER_OTLP_METRICS_*`), generic env (`OTEL_EXPORTER_OTLP_*`),
//! the config file, the defaults below. [`ExportConfig::apply_env`] applies
//! the two env layers over a parsed file; [`ExportArgs::apply`] applies the
//! flags last.
//!
//! Defaults follow the issue: retry backoff 1 s doubling to 30 s, circuit
//! breaker opening after 5 failures and half-opening after 30 s, series cap
//! 2000 per metric, adaptive detail switching at a 2 % error ratio.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::histogram::ClassicLayout;

pub use super::pipeline::{
    PipelineConfig, DEFAULT_DENY_ATTRIBUTES, DEFAULT_EPHEMERAL_PORT_ATTRIBUTES,
};

/// `OTEL_EXPORTER_OTLP_ENDPOINT`: base URL; `/v1/metrics` is appended for HTTP.
pub const ENV_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`: full URL, used as is.
pub const ENV_METRICS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT";
/// `OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc` or `http/protobuf`.
pub const ENV_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
/// `OTEL_EXPORTER_OTLP_METRICS_PROTOCOL`.
pub const ENV_METRICS_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL";
/// `OTEL_EXPORTER_OTLP_HEADERS`: `k=v,k2=v2`, values percent-encoded.
pub const ENV_HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
/// `OTEL_EXPORTER_OTLP_METRICS_HEADERS`.
pub const ENV_METRICS_HEADERS: &str = "OTEL_EXPORTER_OTLP_METRICS_HEADERS";
/// `OTEL_EXPORTER_OTLP_TIMEOUT`: milliseconds.
pub const ENV_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
/// `OTEL_EXPORTER_OTLP_METRICS_TIMEOUT`.
pub const ENV_METRICS_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT";
/// `OTEL_EXPORTER_OTLP_COMPRESSION`: `gzip` or `none`.
pub const ENV_COMPRESSION: &str = "OTEL_EXPORTER_OTLP_COMPRESSION";
/// `OTEL_EXPORTER_OTLP_METRICS_COMPRESSION`.
pub const ENV_METRICS_COMPRESSION: &str = "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION";
/// `OTEL_EXPORTER_OTLP_CERTIFICATE`: PEM file of the CA(s) to trust.
pub const ENV_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";
/// `OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE`.
pub const ENV_METRICS_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE";
/// `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`: PEM client certificate chain.
pub const ENV_CLIENT_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE";
/// `OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE`.
pub const ENV_METRICS_CLIENT_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE";
/// `OTEL_EXPORTER_OTLP_CLIENT_KEY`: PEM private key of the client certificate.
pub const ENV_CLIENT_KEY: &str = "OTEL_EXPORTER_OTLP_CLIENT_KEY";
/// `OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY`.
pub const ENV_METRICS_CLIENT_KEY: &str = "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY";
/// `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`: `cumulative` or `delta`.
pub const ENV_METRICS_TEMPORALITY: &str = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE";
/// `explicit_bucket_histogram` or `base2_exponential_bucket_histogram`.
pub const ENV_METRICS_HISTOGRAM: &str = "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION";
/// `OTEL_RESOURCE_ATTRIBUTES`: `k=v,k2=v2`, values percent-encoded.
pub const ENV_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
/// `OTEL_SERVICE_NAME`: overrides `service.name`.
pub const ENV_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
/// `OTEL_EXPORTER_OTLP_INSECURE`: `true` or `false`. Perch's endpoints
/// always carry a scheme, which decides (`http://` plaintext, `https://`
/// TLS); a value that contradicts the scheme is refused rather than ignored.
pub const ENV_INSECURE: &str = "OTEL_EXPORTER_OTLP_INSECURE";
/// `OTEL_EXPORTER_OTLP_METRICS_INSECURE`.
pub const ENV_METRICS_INSECURE: &str = "OTEL_EXPORTER_OTLP_METRICS_INSECURE";

/// The most a TLS file (CA bundle, client certificate or key) may hold.
pub const MAX_TLS_FILE_BYTES: u64 = 1 << 20;

/// The collector's default gRPC receive limit (4 MiB). Batches stay under it.
pub const COLLECTOR_MAX_MESSAGE_BYTES: u64 = 4 * 1024 * 1024;

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ExportConfigError {
    /// An environment variable holds a value that cannot be parsed.
    #[error("environment variable {var}={value:?}: {reason}")]
    Env {
        /// The variable name.
        var: &'static str,
        /// Its value.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// A configuration key holds a value outside its allowed range.
    #[error("[{key}] = {value}: {reason}")]
    Range {
        /// Dotted key, e.g. `export.batch.max_bytes`.
        key: &'static str,
        /// The value as written.
        value: String,
        /// The allowed range.
        reason: String,
    },
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// OTLP/gRPC (default port 4317).
    #[default]
    #[serde(rename = "grpc")]
    #[value(name = "grpc")]
    Grpc,
    /// OTLP/HTTP with binary protobuf bodies (default port 4318).
    #[serde(rename = "http/protobuf")]
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

impl Protocol {
    fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "grpc" => Some(Self::Grpc),
            "http/protobuf" => Some(Self::HttpProtobuf),
            _ => None,
        }
    }
}

/// Body compression.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// No compression.
    None,
    /// gzip (default: metric batches compress about 10x, CPU cost is small).
    #[default]
    Gzip,
}

impl Compression {
    fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "none" => Some(Self::None),
            "gzip" => Some(Self::Gzip),
            _ => None,
        }
    }
}

/// How kernel histograms go to OTLP.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HistogramFormat {
    /// `ExponentialHistogram` points: the kernel's buckets as they are
    /// (populated range only), downscaled exactly past `max_buckets`.
    #[default]
    Exponential,
    /// Explicit-bounds `Histogram` points in the classic layout
    /// (`histogram_bounds`), for backends without exponential histograms.
    Explicit,
}

/// The default `export.max_buckets`: the OpenTelemetry SDK's default size.
pub const DEFAULT_MAX_BUCKETS: usize = 160;

/// Aggregation temporality of monotonic sums and histograms on the wire.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Temporality {
    /// Values since the series' start time (default; robust to lost batches).
    #[default]
    Cumulative,
    /// Values since the previous export of the series.
    Delta,
}

impl Temporality {
    fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cumulative" => Some(Self::Cumulative),
            "delta" => Some(Self::Delta),
            _ => None,
        }
    }
}

/// `[export]`: where and how to push OTLP.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Collector URL, e.g. `http://127.0.0.1:4317` (gRPC) or
    /// `http://127.0.0.1:4318/v1/metrics` (HTTP; `/v1/metrics` is appended
    /// when the URL has no path). No endpoint: OTLP export is off.
    pub endpoint: Option<String>,
    /// `grpc` or `http/protobuf`.
    pub protocol: Protocol,
    /// Extra request headers (gRPC metadata), e.g. an API key.
    pub headers: BTreeMap<String, String>,
    /// Per-request timeout, milliseconds.
    pub timeout_ms: u64,
    /// `gzip` or `none`.
    pub compression: Compression,
    /// `cumulative` or `delta` for monotonic sums and histograms.
    pub temporality: Temporality,
    /// `service.name` resource attribute (default `perch`).
    pub service_name: Option<String>,
    /// Extra resource attributes; they override the detected ones.
    pub resource_attributes: BTreeMap<String, String>,
    /// TLS settings (used for `https://` endpoints).
    pub tls: TlsConfig,
    /// Batch bounds.
    pub batch: BatchConfig,
    /// In-memory and on-disk queue.
    pub queue: QueueConfig,
    /// Retry backoff.
    pub retry: RetryConfig,
    /// Circuit breaker.
    pub circuit: CircuitConfig,
    /// Kernel histograms on OTLP: `exponential` or `explicit`.
    pub histograms: HistogramFormat,
    /// Most buckets in one exponential point (2 to 16384); a wider point is
    /// downscaled by merging adjacent buckets exactly, with its scale lowered.
    pub max_buckets: usize,
    /// The classic layout: explicit upper bounds in seconds, used for OTLP
    /// explicit histograms and for `/metrics` text. Each must be a kernel
    /// bucket bound (`2^(m/8)` s). Not set: 15 powers of two, `2^-19` s (1.9 µs) to 1 s.
    pub histogram_bounds: Option<Vec<f64>>,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            protocol: Protocol::Grpc,
            headers: BTreeMap::new(),
            timeout_ms: 10_000,
            compression: Compression::Gzip,
            temporality: Temporality::Cumulative,
            service_name: None,
            resource_attributes: BTreeMap::new(),
            tls: TlsConfig::default(),
            batch: BatchConfig::default(),
            queue: QueueConfig::default(),
            retry: RetryConfig::default(),
            circuit: CircuitConfig::default(),
            histograms: HistogramFormat::Exponential,
            max_buckets: DEFAULT_MAX_BUCKETS,
            histogram_bounds: None,
        }
    }
}

impl ExportConfig {
    /// The classic histogram layout (`histogram_bounds`, or the default).
    /// Checked by [`ExportConfig::validate`].
    pub fn classic_layout(&self) -> Result<ClassicLayout, ExportConfigError> {
        match &self.histogram_bounds {
            None => Ok(ClassicLayout::default()),
            Some(b) => ClassicLayout::from_bounds(b).map_err(|reason| ExportConfigError::Range {
                key: "export.histogram_bounds",
                value: format!("{b:?}"),
                reason,
            }),
        }
    }
}

/// `[export.tls]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for mutual TLS (needs `client_key_file`).
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
}

/// `[export.batch]`: one request carries at most this much.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Data points per request.
    pub max_points: usize,
    /// Encoded (uncompressed) protobuf bytes per request; at most 4 MiB, the
    /// collector's default gRPC receive limit.
    pub max_bytes: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_points: 10_000,
            max_bytes: 3 * 1024 * 1024,
        }
    }
}

/// `[export.queue]`: data waiting for the collector.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Encoded bytes kept in memory; past it the oldest batches are dropped
    /// (or moved to `dir` when set).
    pub max_bytes: u64,
    /// Snapshots accepted by `submit` but not yet encoded; past it the oldest
    /// is dropped. Small: encoding takes milliseconds.
    pub max_pending_snapshots: usize,
    /// Directory of the optional on-disk queue. Batches that could not be
    /// delivered are written here and sent later, oldest first, also after
    /// a restart.
    pub dir: Option<PathBuf>,
    /// Bytes kept in `dir`; past it the oldest files are dropped.
    pub disk_max_bytes: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_bytes: 32 * 1024 * 1024,
            max_pending_snapshots: 2,
            dir: None,
            disk_max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// `[export.retry]`: exponential backoff with full jitter.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First backoff, milliseconds.
    pub initial_backoff_ms: u64,
    /// Longest backoff, milliseconds (a server's `Retry-After` may ask for
    /// longer, up to `max_server_delay_ms`).
    pub max_backoff_ms: u64,
    /// Longest delay honoured from `Retry-After` or gRPC `RetryInfo`, ms.
    pub max_server_delay_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 1_000,
            max_backoff_ms: 30_000,
            max_server_delay_ms: 300_000,
        }
    }
}

/// `[export.circuit]`: stop sending to a collector that keeps failing.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitConfig {
    /// Consecutive failed requests that open the circuit.
    pub failure_threshold: u32,
    /// Time the circuit stays open before one trial request, milliseconds.
    pub half_open_after_ms: u64,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            half_open_after_ms: 30_000,
        }
    }
}

/// Splits `k=v,k2=v2` (W3C baggage-like, values percent-encoded).
fn parse_pairs(var: &'static str, s: &str) -> Result<BTreeMap<String, String>, ExportConfigError> {
    // Header values are often credentials: their errors point at the item
    // by position and show no value.
    let secret = var == ENV_HEADERS || var == ENV_METRICS_HEADERS;
    let bad = |n: usize, item: &str, why: &str| ExportConfigError::Env {
        var,
        value: if secret {
            "<redacted>".into()
        } else {
            s.to_owned()
        },
        reason: if secret {
            format!("item {n} {why}")
        } else {
            format!("{item:?} {why}")
        },
    };
    let mut out = BTreeMap::new();
    for (n, item) in s
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .enumerate()
    {
        let Some((k, v)) = item.split_once('=') else {
            return Err(bad(n + 1, item, "is not key=value"));
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(bad(n + 1, item, "has an empty key"));
        }
        out.insert(percent_decode(k.trim()), percent_decode(v.trim()));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks an endpoint URL the way the transports will use it: a scheme of
/// `http` or `https`, a host, and a port within 1..=65535 when one is given.
pub fn check_endpoint(ep: &str) -> Result<(), String> {
    let rest = ep
        .strip_prefix("http://")
        .or_else(|| ep.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    ep.parse::<tonic::codegen::http::Uri>()
        .map_err(|e| format!("is not a valid URL ({e})"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = match authority.strip_prefix('[') {
        // `[::1]:4317`
        Some(v6) => {
            let (host, after) = v6
                .split_once(']')
                .ok_or("has an unclosed `[` in its host")?;
            (host, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err("has no host".into());
    }
    if let Some(port) = port {
        if !matches!(port.parse::<u32>(), Ok(1..=65535)) {
            return Err(format!("port `{port}` is not within 1..=65535"));
        }
    }
    Ok(())
}

/// `OTEL_EXPORTER_OTLP_INSECURE` against the endpoint's scheme.
fn check_insecure(insecure: bool, endpoint: Option<&str>) -> Result<(), String> {
    match endpoint {
        Some(ep) if insecure && ep.starts_with("https://") => Err(format!(
            "asks for plaintext but the endpoint {ep} is https://; use an http:// endpoint"
        )),
        Some(ep) if !insecure && ep.starts_with("http://") => Err(format!(
            "asks for TLS but the endpoint {ep} is http://; use an https:// endpoint"
        )),
        Some(_) => Ok(()),
        None => Err(
            "set without an endpoint (OTEL_EXPORTER_OTLP_ENDPOINT or export.endpoint); \
             the endpoint's scheme decides plaintext or TLS"
                .into(),
        ),
    }
}

fn check_header(k: &str, v: &str) -> Result<(), ()> {
    use tonic::codegen::http::{HeaderName, HeaderValue};
    match (
        HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()),
        HeaderValue::from_str(v),
    ) {
        (Ok(_), Ok(_)) => Ok(()),
        _ => Err(()),
    }
}

/// What a TLS file must hold.
#[derive(Debug, Clone, Copy)]
pub enum PemKind {
    /// One or more `CERTIFICATE` blocks (a CA bundle or a client chain).
    Certificate,
    /// A `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block.
    PrivateKey,
}

/// Reads a TLS file (regular, at most [`MAX_TLS_FILE_BYTES`]) and checks it
/// holds PEM blocks of `kind`: a DER file or the wrong file would otherwise
/// only show up as a handshake failure much later.
pub fn check_pem_file(path: &Path, kind: PemKind) -> Result<(), String> {
    let text =
        crate::sources::read_file_capped(path, MAX_TLS_FILE_BYTES).map_err(|e| e.to_string())?;
    let found = text.lines().any(|l| {
        let Some(label) = l
            .trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|r| r.strip_suffix("-----"))
        else {
            return false;
        };
        match kind {
            PemKind::Certificate => label == "CERTIFICATE",
            PemKind::PrivateKey => label.ends_with("PRIVATE KEY"),
        }
    });
    if found {
        Ok(())
    } else {
        Err(match kind {
            PemKind::Certificate => "holds no PEM `-----BEGIN CERTIFICATE-----` block".into(),
            PemKind::PrivateKey => "holds no PEM `-----BEGIN ... PRIVATE KEY-----` block".into(),
        })
    }
}

/// Appends the OTLP/HTTP metrics path to a generic base endpoint.
fn join_metrics_path(base: &str) -> String {
    format!("{}/v1/metrics", base.trim_end_matches('/'))
}

impl ExportConfig {
    /// Applies `OTEL_EXPORTER_OTLP_*` (generic, then `_METRICS_` specific),
    /// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME` over the file values.
    /// `env` is the lookup (`|k| std::env::var(k).ok()` in the agent).
    pub fn apply_env(
        &mut self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ExportConfigError> {
        let get = |var: &str| env(var).filter(|v| !v.trim().is_empty());
        let env_err = |var: &'static str, value: &str, reason: &str| ExportConfigError::Env {
            var,
            value: value.to_owned(),
            reason: reason.to_owned(),
        };

        // Protocol first: the generic endpoint's meaning depends on it.
        for var in [ENV_PROTOCOL, ENV_METRICS_PROTOCOL] {
            if let Some(v) = get(var) {
                self.protocol = Protocol::parse(&v)
                    .ok_or_else(|| env_err(var, &v, "expected grpc or http/protobuf"))?;
            }
        }
        if let Some(v) = get(ENV_ENDPOINT) {
            check_endpoint(v.trim()).map_err(|r| env_err(ENV_ENDPOINT, &v, &r))?;
            // The spec: for OTLP/HTTP the generic endpoint is a base URL and
            // the signal path is appended; for gRPC it is used as is.
            self.endpoint = Some(match self.protocol {
                Protocol::HttpProtobuf => join_metrics_path(v.trim()),
                Protocol::Grpc => v.trim().to_owned(),
            });
        }
        if let Some(v) = get(ENV_METRICS_ENDPOINT) {
            check_endpoint(v.trim()).map_err(|r| env_err(ENV_METRICS_ENDPOINT, &v, &r))?;
            self.endpoint = Some(v.trim().to_owned());
        }
        for var in [ENV_INSECURE, ENV_METRICS_INSECURE] {
            if let Some(v) = get(var) {
                let insecure = match v.trim().to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(env_err(var, &v, "expected true or false")),
                };
                check_insecure(insecure, self.endpoint.as_deref())
                    .map_err(|r| env_err(var, &v, &r))?;
            }
        }
        for var in [ENV_HEADERS, ENV_METRICS_HEADERS] {
            if let Some(v) = get(var) {
                let pairs = parse_pairs(var, &v)?;
                // Header values are often credentials: the error names
                // the header, never its value.
                if let Some((k, _)) = pairs.iter().find(|(k, v)| check_header(k, v).is_err()) {
                    return Err(env_err(
                        var,
                        "<redacted>",
                        &format!("header `{k}` is not a valid HTTP header name and value"),
                    ));
                }
                self.headers.extend(pairs);
            }
        }
        for var in [ENV_TIMEOUT, ENV_METRICS_TIMEOUT] {
            if let Some(v) = get(var) {
                self.timeout_ms = v
                    .trim()
                    .parse()
                    .map_err(|_| env_err(var, &v, "expected milliseconds"))?;
            }
        }
        for var in [ENV_COMPRESSION, ENV_METRICS_COMPRESSION] {
            if let Some(v) = get(var) {
                self.compression = Compression::parse(&v)
                    .ok_or_else(|| env_err(var, &v, "expected gzip or none"))?;
            }
        }
        for var in [ENV_CERTIFICATE, ENV_METRICS_CERTIFICATE] {
            if let Some(v) = get(var) {
                let path = PathBuf::from(v.trim());
                check_pem_file(&path, PemKind::Certificate).map_err(|r| env_err(var, &v, &r))?;
                self.tls.ca_file = Some(path);
            }
        }
        for var in [ENV_CLIENT_CERTIFICATE, ENV_METRICS_CLIENT_CERTIFICATE] {
            if let Some(v) = get(var) {
                let path = PathBuf::from(v.trim());
                check_pem_file(&path, PemKind::Certificate).map_err(|r| env_err(var, &v, &r))?;
                self.tls.client_cert_file = Some(path);
            }
        }
        for var in [ENV_CLIENT_KEY, ENV_METRICS_CLIENT_KEY] {
            if let Some(v) = get(var) {
                let path = PathBuf::from(v.trim());
                check_pem_file(&path, PemKind::PrivateKey).map_err(|r| env_err(var, &v, &r))?;
                self.tls.client_key_file = Some(path);
            }
        }
        if let Some(v) = get(ENV_METRICS_HISTOGRAM) {
            self.histograms =
                match v.trim().to_ascii_lowercase().as_str() {
                    "explicit_bucket_histogram" => HistogramFormat::Explicit,
                    "base2_exponential_bucket_histogram" => HistogramFormat::Exponential,
                    _ => return Err(env_err(
                        ENV_METRICS_HISTOGRAM,
                        &v,
                        "expected explicit_bucket_histogram or base2_exponential_bucket_histogram",
                    )),
                };
        }
        if let Some(v) = get(ENV_METRICS_TEMPORALITY) {
            // The spec's third value, `lowmemory`, is cumulative for sums
            // that are not monotonic; Perch treats it as delta.
            self.temporality = match v.trim().to_ascii_lowercase().as_str() {
                "lowmemory" => Temporality::Delta,
                other => Temporality::parse(other).ok_or_else(|| {
                    env_err(ENV_METRICS_TEMPORALITY, &v, "expected cumulative or delta")
                })?,
            };
        }
        if let Some(v) = get(ENV_RESOURCE_ATTRIBUTES) {
            self.resource_attributes
                .extend(parse_pairs(ENV_RESOURCE_ATTRIBUTES, &v)?);
        }
        if let Some(v) = get(ENV_SERVICE_NAME) {
            self.service_name = Some(v.trim().to_owned());
        }
        Ok(())
    }

    /// Checks the values without connecting anywhere (`perch validate`).
    pub fn validate(&self) -> Result<(), ExportConfigError> {
        let range = |key, value: String, reason: &str| {
            Err(ExportConfigError::Range {
                key,
                value,
                reason: reason.to_owned(),
            })
        };
        if let Some(ep) = &self.endpoint {
            if let Err(reason) = check_endpoint(ep) {
                return range("export.endpoint", ep.clone(), &reason);
            }
        }
        for (k, v) in &self.headers {
            if check_header(k, v).is_err() {
                // The value may be a credential: name the header only.
                return range(
                    "export.headers",
                    format!("{k}=<redacted>"),
                    "not a valid HTTP header name and value",
                );
            }
        }
        if self.timeout_ms == 0 {
            return range("export.timeout_ms", "0".into(), "must be at least 1");
        }
        if !(2..=16384).contains(&self.max_buckets) {
            return range(
                "export.max_buckets",
                self.max_buckets.to_string(),
                "must be 2 to 16384",
            );
        }
        self.classic_layout()?;
        if self.batch.max_points == 0 {
            return range("export.batch.max_points", "0".into(), "must be at least 1");
        }
        if !(1024..=COLLECTOR_MAX_MESSAGE_BYTES).contains(&self.batch.max_bytes) {
            return range(
                "export.batch.max_bytes",
                self.batch.max_bytes.to_string(),
                "must be within 1024..=4194304 (the collector's default gRPC limit)",
            );
        }
        if self.queue.max_bytes < self.batch.max_bytes {
            return range(
                "export.queue.max_bytes",
                self.queue.max_bytes.to_string(),
                "must be at least export.batch.max_bytes",
            );
        }
        if self.queue.max_pending_snapshots == 0 {
            return range(
                "export.queue.max_pending_snapshots",
                "0".into(),
                "must be at least 1",
            );
        }
        if self.queue.dir.is_some() && self.queue.disk_max_bytes < self.batch.max_bytes {
            return range(
                "export.queue.disk_max_bytes",
                self.queue.disk_max_bytes.to_string(),
                "must be at least export.batch.max_bytes",
            );
        }
        if self.retry.initial_backoff_ms == 0 {
            return range(
                "export.retry.initial_backoff_ms",
                "0".into(),
                "must be at least 1",
            );
        }
        if self.retry.max_backoff_ms < self.retry.initial_backoff_ms {
            return range(
                "export.retry.max_backoff_ms",
                self.retry.max_backoff_ms.to_string(),
                "must be at least initial_backoff_ms",
            );
        }
        if self.circuit.failure_threshold == 0 {
            return range(
                "export.circuit.failure_threshold",
                "0".into(),
                "must be at least 1",
            );
        }
        if self.tls.client_cert_file.is_some() != self.tls.client_key_file.is_some() {
            return range(
                "export.tls.client_cert_file",
                format!("{:?}", self.tls.client_cert_file),
                "client_cert_file and client_key_file go together",
            );
        }
        for (key, path, kind) in [
            (
                "export.tls.ca_file",
                &self.tls.ca_file,
                PemKind::Certificate,
            ),
            (
                "export.tls.client_cert_file",
                &self.tls.client_cert_file,
                PemKind::Certificate,
            ),
            (
                "export.tls.client_key_file",
                &self.tls.client_key_file,
                PemKind::PrivateKey,
            ),
        ] {
            if let Some(p) = path {
                if let Err(reason) = check_pem_file(p, kind) {
                    return range(key, p.display().to_string(), &reason);
                }
            }
        }
        Ok(())
    }
}

/// CLI flags that override the environment and the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ExportArgs {
    /// OTLP collector URL (turns OTLP export on).
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport.
    #[arg(long, value_enum)]
    pub otlp_protocol: Option<Protocol>,
    /// Extra header `key=value` (repeatable). Visible in /proc/PID/cmdline:
    /// pass credentials in OTEL_EXPORTER_OTLP_HEADERS or a 0600 config file.
    #[arg(long = "otlp-header", value_name = "KEY=VALUE")]
    pub otlp_headers: Vec<String>,
    /// Request timeout, milliseconds.
    #[arg(long, value_name = "MS")]
    pub otlp_timeout_ms: Option<u64>,
    /// Body compression.
    #[arg(long, value_enum)]
    pub otlp_compression: Option<Compression>,
    /// Temporality of sums and histograms.
    #[arg(long, value_enum)]
    pub otlp_temporality: Option<Temporality>,
    /// PEM CA file to trust for `https://` endpoints.
    #[arg(long, value_name = "PATH")]
    pub otlp_ca_file: Option<PathBuf>,
    /// Directory of the on-disk export queue.
    #[arg(long, value_name = "DIR")]
    pub otlp_queue_dir: Option<PathBuf>,
}

impl ExportArgs {
    /// Applies the flags that were given.
    pub fn apply(&self, cfg: &mut ExportConfig) {
        if let Some(v) = &self.otlp_endpoint {
            cfg.endpoint = Some(v.clone());
        }
        if let Some(v) = self.otlp_protocol {
            cfg.protocol = v;
        }
        for h in &self.otlp_headers {
            // A flag without `=` is a header with an empty value; validate()
            // then reports it if the name is invalid.
            let (k, v) = h.split_once('=').unwrap_or((h.as_str(), ""));
            cfg.headers.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        if let Some(v) = self.otlp_timeout_ms {
            cfg.timeout_ms = v;
        }
        if let Some(v) = self.otlp_compression {
            cfg.compression = v;
        }
        if let Some(v) = self.otlp_temporality {
            cfg.temporality = v;
        }
        if let Some(v) = &self.otlp_ca_file {
            cfg.tls.ca_file = Some(v.clone());
        }
        if let Some(v) = &self.otlp_queue_dir {
            cfg.queue.dir = Some(v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn pem_file(label: &str) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "-----BEGIN {label}-----\nMIIB\n-----END {label}-----").unwrap();
        f
    }

    #[test]
    fn env_precedence() {
        struct Case {
            name: &'static str,
            file_endpoint: Option<&'static str>,
            env: Vec<(&'static str, &'static str)>,
            want_endpoint: Option<&'static str>,
            want_protocol: Protocol,
        }
        let cases = [
            Case {
                name: "file only",
                file_endpoint: Some("http://file:4317"),
                env: vec![],
                want_endpoint: Some("http://file:4317"),
                want_protocol: Protocol::Grpc,
            },
            Case {
                name: "generic env beats file",
                file_endpoint: Some("http://file:4317"),
                env: vec![(ENV_ENDPOINT, "http://gen:4317")],
                want_endpoint: Some("http://gen:4317"),
                want_protocol: Protocol::Grpc,
            },
            Case {
                name: "specific env beats generic",
                file_endpoint: None,
                env: vec![
                    (ENV_ENDPOINT, "http://gen:4317"),
                    (ENV_METRICS_ENDPOINT, "http://spec:4317"),
                ],
                want_endpoint: Some("http://spec:4317"),
                want_protocol: Protocol::Grpc,
            },
            Case {
                name: "generic http endpoint gets the signal path",
                file_endpoint: None,
                env: vec![
                    (ENV_PROTOCOL, "http/protobuf"),
                    (ENV_ENDPOINT, "http://gen:4318/"),
                ],
                want_endpoint: Some("http://gen:4318/v1/metrics"),
                want_protocol: Protocol::HttpProtobuf,
            },
            Case {
                name: "specific protocol beats generic",
                file_endpoint: None,
                env: vec![
                    (ENV_PROTOCOL, "http/protobuf"),
                    (ENV_METRICS_PROTOCOL, "grpc"),
                ],
                want_endpoint: None,
                want_protocol: Protocol::Grpc,
            },
            Case {
                name: "empty variables are ignored",
                file_endpoint: Some("http://file:4317"),
                env: vec![(ENV_ENDPOINT, " ")],
                want_endpoint: Some("http://file:4317"),
                want_protocol: Protocol::Grpc,
            },
        ];
        for c in cases {
            let mut cfg = ExportConfig {
                endpoint: c.file_endpoint.map(str::to_owned),
                ..ExportConfig::default()
            };
            cfg.apply_env(env_of(&c.env)).expect(c.name);
            assert_eq!(cfg.endpoint.as_deref(), c.want_endpoint, "{}", c.name);
            assert_eq!(cfg.protocol, c.want_protocol, "{}", c.name);
        }
    }

    #[test]
    fn env_values_parse() {
        let ca = pem_file("CERTIFICATE");
        let mut cfg = ExportConfig::default();
        cfg.apply_env(env_of(&[
            (ENV_HEADERS, "a=1, b=x%20y"),
            (ENV_METRICS_HEADERS, "a=2"),
            (ENV_TIMEOUT, "2500"),
            (ENV_COMPRESSION, "none"),
            (ENV_METRICS_TEMPORALITY, "Delta"),
            (ENV_METRICS_HISTOGRAM, "explicit_bucket_histogram"),
            (
                ENV_RESOURCE_ATTRIBUTES,
                "deployment.environment=prod,team=a%2Cb",
            ),
            (ENV_SERVICE_NAME, "edge"),
            (ENV_CERTIFICATE, ca.path().to_str().unwrap()),
        ]))
        .unwrap();
        assert_eq!(cfg.headers.get("a").map(String::as_str), Some("2"));
        assert_eq!(cfg.headers.get("b").map(String::as_str), Some("x y"));
        assert_eq!(cfg.timeout_ms, 2500);
        assert_eq!(cfg.compression, Compression::None);
        assert_eq!(cfg.temporality, Temporality::Delta);
        assert_eq!(cfg.histograms, HistogramFormat::Explicit);
        assert_eq!(
            cfg.resource_attributes.get("team").map(String::as_str),
            Some("a,b")
        );
        assert_eq!(cfg.service_name.as_deref(), Some("edge"));
        assert_eq!(cfg.tls.ca_file.as_deref(), Some(ca.path()));
    }

    #[test]
    fn env_errors_name_the_variable() {
        let cases: [(&str, &str); 5] = [
            (ENV_METRICS_HISTOGRAM, "exponential"),
            (ENV_PROTOCOL, "http/json"),
            (ENV_TIMEOUT, "10s"),
            (ENV_COMPRESSION, "zstd"),
            (ENV_HEADERS, "novalue"),
        ];
        for (var, value) in cases {
            let err = ExportConfig::default()
                .apply_env(env_of(&[(var, value)]))
                .unwrap_err();
            match err {
                ExportConfigError::Env { var: v, .. } => assert_eq!(v, var),
                other => panic!("{var}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn bad_endpoints_are_refused_naming_the_variable() {
        for (ep, want) in [
            (
                "http://127.0.0.1:99999",
                "port `99999` is not within 1..=65535",
            ),
            ("http://127.0.0.1:0", "port `0`"),
            ("http://:4318", "has no host"),
            ("ftp://collector:21", "must start with http:// or https://"),
            ("collector:4317", "must start with http:// or https://"),
            ("http://[::1:4317", "not a valid URL"),
        ] {
            for var in [ENV_ENDPOINT, ENV_METRICS_ENDPOINT] {
                let err = ExportConfig::default()
                    .apply_env(env_of(&[(var, ep)]))
                    .expect_err(ep)
                    .to_string();
                assert!(err.contains(var) && err.contains(want), "{ep}: {err}");
            }
            let file = ExportConfig {
                endpoint: Some(ep.into()),
                ..ExportConfig::default()
            };
            let err = file.validate().expect_err(ep).to_string();
            assert!(
                err.contains("export.endpoint") && err.contains(want),
                "{ep}: {err}"
            );
        }
        for ep in [
            "http://127.0.0.1:4318",
            "https://collector",
            "http://[::1]:4317",
            "http://user@collector:65535/v1/metrics",
        ] {
            check_endpoint(ep).unwrap_or_else(|e| panic!("{ep}: {e}"));
        }
    }

    #[test]
    fn insecure_is_strict_and_must_agree_with_the_scheme() {
        let with = |pairs: &[(&str, &str)]| ExportConfig::default().apply_env(env_of(pairs));
        let ep = (ENV_METRICS_ENDPOINT, "http://c:4317");
        with(&[ep, (ENV_INSECURE, "true")]).unwrap();
        with(&[ep, (ENV_INSECURE, "TRUE")]).unwrap();
        with(&[
            (ENV_METRICS_ENDPOINT, "https://c:4317"),
            (ENV_INSECURE, "false"),
        ])
        .unwrap();
        for (pairs, want) in [
            (vec![ep, (ENV_INSECURE, "maybe")], "expected true or false"),
            (
                vec![ep, (ENV_METRICS_INSECURE, "1")],
                "expected true or false",
            ),
            (vec![ep, (ENV_INSECURE, "false")], "asks for TLS"),
            (
                vec![
                    (ENV_METRICS_ENDPOINT, "https://c:4317"),
                    (ENV_INSECURE, "true"),
                ],
                "asks for plaintext",
            ),
            (vec![(ENV_INSECURE, "true")], "without an endpoint"),
        ] {
            let err = with(&pairs).expect_err(want).to_string();
            assert!(err.contains("INSECURE") && err.contains(want), "{err}");
        }
    }

    #[test]
    fn tls_files_must_hold_pem_blocks() {
        let not_pem = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_pem.path(), b"\x30\x82\x01\x0a not a PEM file").unwrap();
        let key = pem_file("PRIVATE KEY");
        let cert = pem_file("CERTIFICATE");
        let not = not_pem.path().to_str().unwrap();
        for (var, value, want) in [
            (ENV_CERTIFICATE, not, "no PEM `-----BEGIN CERTIFICATE-----`"),
            (
                ENV_METRICS_CERTIFICATE,
                "/nonexistent/ca.pem",
                "/nonexistent/ca.pem",
            ),
            (
                ENV_CLIENT_CERTIFICATE,
                key.path().to_str().unwrap(),
                "CERTIFICATE",
            ),
            (ENV_CLIENT_KEY, cert.path().to_str().unwrap(), "PRIVATE KEY"),
            (ENV_CERTIFICATE, "/tmp", "not a regular file"),
        ] {
            let err = ExportConfig::default()
                .apply_env(env_of(&[(var, value)]))
                .expect_err(var)
                .to_string();
            assert!(
                err.contains(var) && err.contains(want),
                "{var}={value}: {err}"
            );
        }
        // The same checks on the file's keys, for `perch validate`.
        let c = ExportConfig {
            tls: TlsConfig {
                ca_file: Some(not_pem.path().into()),
                ..TlsConfig::default()
            },
            ..ExportConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("export.tls.ca_file") && err.contains("no PEM"),
            "{err}"
        );
        let c = ExportConfig {
            tls: TlsConfig {
                client_cert_file: Some(cert.path().into()),
                client_key_file: Some(key.path().into()),
                ..TlsConfig::default()
            },
            ..ExportConfig::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn header_errors_do_not_show_the_value() {
        let err = ExportConfig::default()
            .apply_env(env_of(&[(ENV_HEADERS, "authorization=Bearer s3cr3t\u{1}")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(ENV_HEADERS) && err.contains("authorization"),
            "{err}"
        );
        assert!(!err.contains("s3cr3t"), "{err}");
        let err = ExportConfig::default()
            .apply_env(env_of(&[(ENV_HEADERS, "a=1,authorization: Bearer s3cr3t")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("item 2 is not key=value") && !err.contains("s3cr3t"),
            "{err}"
        );
        let mut c = ExportConfig::default();
        c.headers.insert("x-key".into(), "s3cr3t\u{7f}".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("x-key") && !err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn validate_ranges() {
        let ok = ExportConfig {
            endpoint: Some("https://collector:4317".into()),
            ..ExportConfig::default()
        };
        ok.validate().unwrap();
        type Mutate = Box<dyn Fn(&mut ExportConfig)>;
        let cases: Vec<(&str, Mutate)> = vec![
            (
                "export.endpoint",
                Box::new(|c| c.endpoint = Some("collector:4317".into())),
            ),
            (
                "export.batch.max_bytes",
                Box::new(|c| c.batch.max_bytes = 5 * 1024 * 1024),
            ),
            ("export.max_buckets", Box::new(|c| c.max_buckets = 1)),
            (
                "export.histogram_bounds",
                Box::new(|c| c.histogram_bounds = Some(vec![0.001, 0.01])),
            ),
            (
                "export.queue.max_bytes",
                Box::new(|c| c.queue.max_bytes = 1024),
            ),
            (
                "export.retry.max_backoff_ms",
                Box::new(|c| c.retry.max_backoff_ms = 10),
            ),
            (
                "export.tls.client_cert_file",
                Box::new(|c| c.tls.client_cert_file = Some("/c.pem".into())),
            ),
            ("export.timeout_ms", Box::new(|c| c.timeout_ms = 0)),
        ];
        for (key, mutate) in cases {
            let mut c = ok.clone();
            mutate(&mut c);
            match c.validate() {
                Err(ExportConfigError::Range { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: got {other:?}"),
            }
        }
    }

    #[test]
    fn pipeline_validate_ranges() {
        PipelineConfig::default().validate().unwrap();
        let cases: Vec<(&str, PipelineConfig)> = vec![
            (
                "pipeline.detail_top_k",
                PipelineConfig {
                    detail_top_k: 2000,
                    ..PipelineConfig::default()
                },
            ),
            (
                "pipeline.detail_exit_ratio",
                PipelineConfig {
                    detail_exit_ratio: 0.5,
                    ..PipelineConfig::default()
                },
            ),
            (
                "pipeline.memory_soft_limit_bytes",
                PipelineConfig {
                    memory_soft_limit_bytes: u64::MAX,
                    ..PipelineConfig::default()
                },
            ),
        ];
        for (key, c) in cases {
            match c.validate() {
                Err(ExportConfigError::Range { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: got {other:?}"),
            }
        }
    }

    #[test]
    fn toml_defaults_and_unknown_fields() {
        let c: ExportConfig =
            toml::from_str("endpoint = \"http://x:4317\"\n[retry]\ninitial_backoff_ms = 5\n")
                .unwrap();
        assert_eq!(c.retry.initial_backoff_ms, 5);
        assert_eq!(c.retry.max_backoff_ms, 30_000);
        assert!(toml::from_str::<ExportConfig>("endpoit = \"x\"").is_err());
        let p: PipelineConfig = toml::from_str("max_series_per_metric = 10").unwrap();
        assert_eq!(p.detail_top_k, 200);
        assert!(toml::from_str::<PipelineConfig>("max_series = 1").is_err());
    }

    #[test]
    fn cli_overrides_env() {
        let mut cfg = ExportConfig::default();
        cfg.apply_env(env_of(&[(ENV_ENDPOINT, "http://env:4317")]))
            .unwrap();
        ExportArgs {
            otlp_endpoint: Some("http://cli:4318/v1/metrics".into()),
            otlp_protocol: Some(Protocol::HttpProtobuf),
            otlp_headers: vec!["x-key=1".into()],
            ..ExportArgs::default()
        }
        .apply(&mut cfg);
        assert_eq!(cfg.endpoint.as_deref(), Some("http://cli:4318/v1/metrics"));
        assert_eq!(cfg.protocol, Protocol::HttpProtobuf);
        assert_eq!(cfg.headers.get("x-key").map(String::as_str), Some("1"));
    }
}
