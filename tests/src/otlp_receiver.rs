//! Test collectors for the OTLP exporter:
//! - [`Receiver`]: an in-process OTLP receiver (gRPC and HTTP on 127.0.0.1)
//!   that records every request and answers from a script (503/429 with
//!   `Retry-After`, `RESOURCE_EXHAUSTED` with `RetryInfo`, `INVALID_ARGUMENT`,
//!   partial success, slow answers, TLS).
//! - [`Rotel`]: the real Rotel collector, forwarding what it receives to a
//!   [`Receiver`] so tests can decode it.

use std::collections::VecDeque;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point, NumberDataPoint};
use perch::exporters::otlp::retry::rpc;
use prost::Message;

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Accept.
    Ok,
    /// Accept, but refuse `rejected` points.
    Partial { rejected: i64, message: String },
    /// HTTP only: this status, with an optional `Retry-After` in seconds.
    Http {
        status: u16,
        retry_after_secs: Option<u64>,
        message: String,
    },
    /// gRPC only: this code, with an optional `RetryInfo` delay.
    Grpc {
        code: tonic::Code,
        retry_info: Option<Duration>,
        message: String,
    },
    /// Wait, then answer with the inner reply.
    Slow(Duration, Box<Reply>),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub transport: &'static str,
    pub request: ExportMetricsServiceRequest,
    /// Whether the request was answered with success.
    pub accepted: bool,
}

#[derive(Default)]
struct State {
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
    received: Mutex<Vec<Received>>,
}

impl State {
    fn next_reply(&self) -> Reply {
        if let Some(r) = self.script.lock().unwrap().pop_front() {
            return r;
        }
        self.default.lock().unwrap().clone().unwrap_or(Reply::Ok)
    }

    fn record(
        &self,
        transport: &'static str,
        request: ExportMetricsServiceRequest,
        accepted: bool,
    ) {
        self.received.lock().unwrap().push(Received {
            at: Instant::now(),
            transport,
            request,
            accepted,
        });
    }
}

async fn resolve(mut r: Reply) -> Reply {
    while let Reply::Slow(d, inner) = r {
        tokio::time::sleep(d).await;
        r = *inner;
    }
    r
}

struct Grpc(Arc<State>);

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let req = request.into_inner();
        match resolve(self.0.next_reply()).await {
            Reply::Ok => {
                self.0.record("grpc", req, true);
                Ok(tonic::Response::new(ExportMetricsServiceResponse {
                    partial_success: None,
                }))
            }
            Reply::Partial { rejected, message } => {
                self.0.record("grpc", req, true);
                Ok(tonic::Response::new(ExportMetricsServiceResponse {
                    partial_success: Some(ExportMetricsPartialSuccess {
                        rejected_data_points: rejected,
                        error_message: message,
                    }),
                }))
            }
            Reply::Grpc {
                code,
                retry_info,
                message,
            } => {
                self.0.record("grpc", req, false);
                let details = retry_info.map(|d| {
                    let ri = rpc::RetryInfo {
                        retry_delay: Some(rpc::Duration {
                            seconds: d.as_secs() as i64,
                            nanos: d.subsec_nanos() as i32,
                        }),
                    };
                    rpc::Status {
                        code: code as i32,
                        message: message.clone(),
                        details: vec![rpc::Any {
                            type_url: rpc::RETRY_INFO_TYPE.into(),
                            value: ri.encode_to_vec(),
                        }],
                    }
                    .encode_to_vec()
                });
                Err(match details {
                    Some(d) => tonic::Status::with_details(code, message, Bytes::from(d)),
                    None => tonic::Status::new(code, message),
                })
            }
            Reply::Http { status, .. } => panic!("scripted HTTP {status} for a gRPC request"),
            Reply::Slow(..) => unreachable!(),
        }
    }
}

async fn http_export(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let gz = headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip");
    let raw = if gz {
        let mut out = Vec::new();
        if flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .is_err()
        {
            return (axum::http::StatusCode::BAD_REQUEST, "bad gzip").into_response();
        }
        out
    } else {
        body.to_vec()
    };
    let Ok(req) = ExportMetricsServiceRequest::decode(raw.as_slice()) else {
        return (axum::http::StatusCode::BAD_REQUEST, "bad protobuf").into_response();
    };
    let ok = |partial: Option<ExportMetricsPartialSuccess>| {
        (
            [("content-type", "application/x-protobuf")],
            ExportMetricsServiceResponse {
                partial_success: partial,
            }
            .encode_to_vec(),
        )
            .into_response()
    };
    match resolve(state.next_reply()).await {
        Reply::Ok => {
            state.record("http", req, true);
            ok(None)
        }
        Reply::Partial { rejected, message } => {
            state.record("http", req, true);
            ok(Some(ExportMetricsPartialSuccess {
                rejected_data_points: rejected,
                error_message: message,
            }))
        }
        Reply::Http {
            status,
            retry_after_secs,
            message,
        } => {
            state.record("http", req, false);
            let body = rpc::Status {
                code: 0,
                message,
                details: vec![],
            }
            .encode_to_vec();
            let mut resp = (
                axum::http::StatusCode::from_u16(status).expect("valid status"),
                body,
            )
                .into_response();
            if let Some(s) = retry_after_secs {
                resp.headers_mut()
                    .insert("retry-after", s.to_string().parse().expect("header"));
            }
            resp
        }
        Reply::Grpc { code, .. } => panic!("scripted gRPC {code:?} for an HTTP request"),
        Reply::Slow(..) => unreachable!(),
    }
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// The in-process OTLP receiver.
pub struct Receiver {
    /// gRPC address.
    pub grpc: SocketAddr,
    /// HTTP address (`/v1/metrics`).
    pub http: SocketAddr,
    state: Arc<State>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Receiver {
    /// Starts on fresh ports.
    pub async fn start() -> Self {
        Self::start_on(None, None, None).await
    }

    /// Starts on the given ports (0 or None: any), with TLS on the gRPC
    /// side when `tls` holds (cert PEM, key PEM).
    pub async fn start_on(
        grpc_port: Option<u16>,
        http_port: Option<u16>,
        tls: Option<(Vec<u8>, Vec<u8>)>,
    ) -> Self {
        Self::start_with_state(Arc::new(State::default()), grpc_port, http_port, tls).await
    }

    async fn start_with_state(
        state: Arc<State>,
        grpc_port: Option<u16>,
        http_port: Option<u16>,
        tls: Option<(Vec<u8>, Vec<u8>)>,
    ) -> Self {
        let bind = |port: Option<u16>| async move {
            let addr = SocketAddr::from(([127, 0, 0, 1], port.unwrap_or(0)));
            // The port was just released by a stopped receiver: retry briefly.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => return l,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("bind {addr}: {e}"),
                }
            }
        };
        let gl = bind(grpc_port).await;
        let hl = bind(http_port).await;
        let grpc = gl.local_addr().expect("addr");
        let http = hl.local_addr().expect("addr");

        let svc = MetricsServiceServer::new(Grpc(state.clone()))
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .max_decoding_message_size(64 << 20);
        let mut builder = tonic::transport::Server::builder();
        if let Some((cert, key)) = tls {
            builder = builder
                .tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(cert, key)),
                )
                .expect("server TLS config");
        }
        let router = builder.add_service(svc);
        let g = tokio::spawn(async move {
            let _ = router
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(gl))
                .await;
        });
        let app = axum::Router::new()
            .route("/v1/metrics", axum::routing::post(http_export))
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .with_state(state.clone());
        let h = tokio::spawn(async move {
            let _ = axum::serve(hl, app).await;
        });
        Self {
            grpc,
            http,
            state,
            tasks: vec![g, h],
        }
    }

    /// Stops listening (the collector goes away); the record is kept by
    /// the returned handle, which [`Receiver::restart`] brings back.
    pub async fn stop(mut self) -> Stopped {
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
        Stopped {
            grpc: self.grpc,
            http: self.http,
            state: self.state.clone(),
        }
    }

    /// `http://` URL of the gRPC side.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// URL of the HTTP side, with the metrics path.
    pub fn http_url(&self) -> String {
        format!("http://{}/v1/metrics", self.http)
    }

    /// Replies used, in order, for the next requests (then the default).
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    /// The reply once the script is used up.
    pub fn set_default(&self, r: Reply) {
        *self.state.default.lock().unwrap() = Some(r);
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Waits until `pred` holds over what was received, or `timeout`.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Received]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.state.received.lock().unwrap()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A stopped receiver, restartable on the same ports with its record.
pub struct Stopped {
    grpc: SocketAddr,
    http: SocketAddr,
    state: Arc<State>,
}

impl Stopped {
    /// Listens again on the same ports.
    pub async fn restart(self) -> Receiver {
        Receiver::start_with_state(
            self.state,
            Some(self.grpc.port()),
            Some(self.http.port()),
            None,
        )
        .await
    }
}

// ---- Decoding helpers ----

/// A flattened number point: (metric name, unit, attributes, value, start, time).
#[derive(Debug, Clone, PartialEq)]
pub struct FlatPoint {
    pub metric: String,
    pub unit: String,
    pub attributes: Vec<(String, String)>,
    pub value: f64,
    pub start_unix_nano: u64,
    pub time_unix_nano: u64,
    pub monotonic: bool,
}

fn attr_string(kv: &KeyValue) -> (String, String) {
    let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    };
    (kv.key.clone(), v)
}

fn number(p: &NumberDataPoint) -> f64 {
    match p.value {
        Some(number_data_point::Value::AsInt(i)) => i as f64,
        Some(number_data_point::Value::AsDouble(d)) => d,
        None => f64::NAN,
    }
}

/// Every sum and gauge point in a request. Histogram points are reported
/// with their count as the value.
pub fn flat_points(req: &ExportMetricsServiceRequest) -> Vec<FlatPoint> {
    let mut out = vec![];
    for rm in &req.resource_metrics {
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let mut push = |attrs: &[KeyValue], value, start, time, monotonic| {
                    out.push(FlatPoint {
                        metric: m.name.clone(),
                        unit: m.unit.clone(),
                        attributes: attrs.iter().map(attr_string).collect(),
                        value,
                        start_unix_nano: start,
                        time_unix_nano: time,
                        monotonic,
                    })
                };
                match &m.data {
                    Some(Data::Sum(s)) => {
                        for p in &s.data_points {
                            push(
                                &p.attributes,
                                number(p),
                                p.start_time_unix_nano,
                                p.time_unix_nano,
                                s.is_monotonic,
                            )
                        }
                    }
                    Some(Data::Gauge(g)) => {
                        for p in &g.data_points {
                            push(&p.attributes, number(p), 0, p.time_unix_nano, false)
                        }
                    }
                    Some(Data::Histogram(h)) => {
                        for p in &h.data_points {
                            push(
                                &p.attributes,
                                p.count as f64,
                                p.start_time_unix_nano,
                                p.time_unix_nano,
                                true,
                            )
                        }
                    }
                    Some(Data::ExponentialHistogram(h)) => {
                        for p in &h.data_points {
                            push(
                                &p.attributes,
                                p.count as f64,
                                p.start_time_unix_nano,
                                p.time_unix_nano,
                                true,
                            )
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// Resource attributes of the first resource in a request.
pub fn resource_attributes(req: &ExportMetricsServiceRequest) -> Vec<(String, String)> {
    req.resource_metrics
        .first()
        .and_then(|rm| rm.resource.as_ref())
        .map(|r| r.attributes.iter().map(attr_string).collect())
        .unwrap_or_default()
}

/// Points accepted so far, over every accepted request.
pub fn accepted_points(received: &[Received]) -> Vec<FlatPoint> {
    received
        .iter()
        .filter(|r| r.accepted)
        .flat_map(|r| flat_points(&r.request))
        .collect()
}

// ---- Rotel ----

/// Where Rotel is: `$PERCH_ROTEL`, `tests/.venv/bin/rotel`, or the binary
/// the `rotel` wheel ships (`site-packages/rotel/rotel-agent`). Panics with
/// the fix when it is missing: a missing collector must fail, not skip.
pub fn rotel_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PERCH_ROTEL") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "PERCH_ROTEL={} does not exist", p.display());
        return p;
    }
    let venv = crate::workspace_root().join("tests/.venv");
    let bin = venv.join("bin/rotel");
    if bin.exists() {
        return bin;
    }
    if let Ok(libs) = std::fs::read_dir(venv.join("lib")) {
        for l in libs.flatten() {
            let p = l.path().join("site-packages/rotel/rotel-agent");
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "Rotel not found (looked for $PERCH_ROTEL, {} and {}/lib/python3*/site-packages/rotel/rotel-agent): \
         run `cargo xtask setup` (it pip-installs tests/requirements.txt into tests/.venv)",
        bin.display(),
        venv.display()
    );
}

/// A running Rotel collector, forwarding metrics over OTLP/gRPC.
pub struct Rotel {
    child: std::process::Child,
    /// OTLP/gRPC receiver port.
    pub grpc_port: u16,
    /// OTLP/HTTP receiver port.
    pub http_port: u16,
    forward_to: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

impl Rotel {
    /// Starts Rotel on fresh ports, forwarding to `forward_to` (gRPC).
    pub fn start(forward_to: SocketAddr) -> Self {
        Self::start_on(free_port(), free_port(), forward_to)
    }

    /// Starts Rotel with its blackhole exporter: it acknowledges and drops
    /// everything (the benchmark, so no receiver runs in the measured process).
    pub fn start_blackhole() -> Self {
        Self::start_on(
            free_port(),
            free_port(),
            SocketAddr::from(([0, 0, 0, 0], 0)),
        )
    }

    fn start_on(grpc_port: u16, http_port: u16, forward_to: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = rotel_bin();
        let child = spawn_rotel(&bin, dir.path(), grpc_port, http_port, forward_to);
        let mut r = Self {
            child,
            grpc_port,
            http_port,
            forward_to,
            dir,
        };
        r.wait_ready();
        r
    }

    fn wait_ready(&mut self) {
        let ok = wait_listening(self.grpc_port, Duration::from_secs(15))
            && wait_listening(self.http_port, Duration::from_secs(5));
        if !ok {
            let _ = self.child.kill();
            let log =
                std::fs::read_to_string(self.dir.path().join("rotel.log")).unwrap_or_default();
            panic!(
                "rotel did not start listening on {}/{}:\n{log}",
                self.grpc_port, self.http_port
            );
        }
    }

    /// Kills the collector (SIGKILL: no flush, as a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same ports.
    pub fn restart(&mut self) {
        self.kill();
        let bin = rotel_bin();
        self.child = spawn_rotel(
            &bin,
            self.dir.path(),
            self.grpc_port,
            self.http_port,
            self.forward_to,
        );
        self.wait_ready();
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/metrics", self.http_port)
    }
}

fn spawn_rotel(
    bin: &Path,
    dir: &Path,
    grpc_port: u16,
    http_port: u16,
    forward_to: SocketAddr,
) -> std::process::Child {
    let log = std::fs::File::create(dir.join("rotel.log")).expect("rotel log");
    let log2 = log.try_clone().expect("rotel log");
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("start")
        .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc_port}")])
        .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")]);
    if forward_to.port() == 0 {
        cmd.args(["--exporter", "blackhole"]);
    } else {
        cmd.args(["--exporter", "otlp"])
            .args(["--otlp-exporter-endpoint", &format!("http://{forward_to}")])
            .args(["--otlp-exporter-protocol", "grpc"]);
    }
    cmd.args(["--batch-timeout", "10ms"])
        .args(["--pid-file", &dir.join("rotel.pid").to_string_lossy()])
        .args(["--log-file", &dir.join("rotel-agent.log").to_string_lossy()])
        .env_remove("ROTEL_DAEMON")
        .stdout(log)
        .stderr(log2)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()))
}

/// A test PKI made with the `openssl` CLI: a CA (`dir/ca.pem`) and a
/// server certificate it signed for `localhost` and 127.0.0.1. Returns the
/// server's (cert PEM, key PEM). (webpki refuses a self-signed CA
/// certificate used directly as the server's, hence two levels.)
pub fn test_pki(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the TLS tests need the openssl CLI (apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=perch test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca-key.pem", "-out", "ca.pem"]);
    run(&ca);
    let mut csr = vec!["req", "-new", "-subj", "/CN=localhost"];
    csr.extend(ec);
    csr.extend(["-keyout", "key.pem", "-out", "server.csr"]);
    run(&csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    (
        std::fs::read(dir.join("cert.pem")).expect("cert"),
        std::fs::read(dir.join("key.pem")).expect("key"),
    )
}

// ---- Agent-side helpers shared by the otlp_* tests ----

use perch::config::export::{ExportConfig, Protocol};
use perch::model::{Data as MData, HistogramPoint, Metric, Number, NumberPoint, Snapshot};
use perch::selfmetrics::SelfMetrics;

/// An export config for tests: short timeouts and backoffs (the defaults
/// stay as the issue says), a 1 MiB queue.
pub fn test_config(endpoint: String, protocol: Protocol) -> ExportConfig {
    let mut c = ExportConfig {
        endpoint: Some(endpoint),
        protocol,
        timeout_ms: 500,
        ..ExportConfig::default()
    };
    c.retry.initial_backoff_ms = 50;
    c.retry.max_backoff_ms = 200;
    c.circuit.half_open_after_ms = 300;
    c.queue.max_bytes = 1 << 20;
    c.batch.max_bytes = 256 << 10;
    c
}

/// Fixed resource attributes for assertions.
pub fn test_resource() -> Vec<(String, String)> {
    vec![
        ("service.name".into(), "perch".into()),
        ("service.version".into(), "test".into()),
        ("host.name".into(), "test-host".into()),
        ("host.id".into(), "0123456789abcdef0123456789abcdef".into()),
        ("host.arch".into(), "amd64".into()),
        ("os.type".into(), "linux".into()),
        ("k8s.node.name".into(), "node-a".into()),
    ]
}

/// Unix time of a synthetic round (1 s apart), from a fixed base.
pub fn round_time(round: u64) -> std::time::SystemTime {
    static BASE: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| std::time::SystemTime::now() - Duration::from_secs(3600))
        + Duration::from_secs(round)
}

/// A synthetic snapshot for round `round` (1, 2, ...): a CPU-time counter
/// per CPU and mode, a per-peer byte counter for `peers` peers, a gauge and
/// a histogram. Cumulative values grow linearly with `round`.
pub fn synthetic_snapshot(round: u64, peers: usize) -> Snapshot {
    let now = round_time(round);
    let start = round_time(0);
    let r = round as i64;
    let mut cpu = vec![];
    for c in 0..2i64 {
        for mode in ["user", "system"] {
            cpu.push(NumberPoint {
                attributes: vec![("cpu", c.into()), ("cpu.mode", mode.into())],
                start_time: Some(start),
                time: now,
                value: Number::Double(0.5 * r as f64 * (c + 1) as f64),
            });
        }
    }
    let peer_points = (0..peers)
        .map(|i| NumberPoint {
            attributes: vec![
                (
                    "network.peer.address",
                    format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255).into(),
                ),
                ("network.io.direction", "transmit".into()),
            ],
            start_time: Some(start),
            time: now,
            value: Number::Int(100 * r * (i as i64 % 7 + 1)),
        })
        .collect();
    Snapshot {
        time: now,
        metrics: vec![
            Metric {
                name: "system.cpu.time",
                description: "CPU time by mode",
                unit: "s",
                data: MData::Sum {
                    monotonic: true,
                    points: cpu,
                },
            },
            Metric {
                name: "perch.tcp.bytes",
                description: "TCP payload bytes per peer",
                unit: "By",
                data: MData::Sum {
                    monotonic: true,
                    points: peer_points,
                },
            },
            Metric {
                name: "system.cpu.load_average.1m",
                description: "Load average",
                unit: "{thread}",
                data: MData::Gauge {
                    points: vec![NumberPoint {
                        attributes: vec![],
                        start_time: None,
                        time: now,
                        value: Number::Double(0.25 * r as f64),
                    }],
                },
            },
            Metric {
                name: "perch.sched.runqueue.latency",
                description: "Run-queue latency",
                unit: "s",
                data: MData::Histogram {
                    points: vec![HistogramPoint {
                        attributes: vec![],
                        start_time: start,
                        time: now,
                        count: 6 * round,
                        sum: 0.003 * round as f64,
                        buckets: kernel_buckets(&[
                            (1_000, round),
                            (2_000, 2 * round),
                            (4_000, 3 * round),
                        ]),
                    }],
                },
            },
        ],
    }
}

/// Exponential buckets as the kernel fills them: `(ns, times)` pairs.
pub fn kernel_buckets(values: &[(u64, u64)]) -> perch::model::Buckets {
    let mut slots = vec![0u64; agent_common::exp::SLOTS as usize];
    for &(ns, n) in values {
        slots[agent_common::exp::slot(ns) as usize] += n;
    }
    perch::model::Buckets::Exponential(perch::model::Exponential::from_slots(&slots))
}

/// Points in a snapshot.
pub fn points_in(s: &Snapshot) -> u64 {
    perch::exporters::otlp::snapshot_points(s)
}

/// A self-metric value (0 when absent).
pub fn selfm_value(selfm: &SelfMetrics, name: &str, attrs: &[(&'static str, &str)]) -> f64 {
    let attrs: perch::model::Attributes = attrs.iter().map(|(k, v)| (*k, (*v).into())).collect();
    selfm.value(name, &attrs).unwrap_or(0.0)
}

/// Samples `perch.export.queue.bytes` every 5 ms and keeps the maximum:
/// the memory bound the fault tests assert.
pub struct QueueWatch {
    max: Arc<Mutex<f64>>,
    task: tokio::task::JoinHandle<()>,
}

impl QueueWatch {
    pub fn start(selfm: Arc<SelfMetrics>) -> Self {
        let max = Arc::new(Mutex::new(0.0f64));
        let m = max.clone();
        let task = tokio::spawn(async move {
            loop {
                let v = selfm_value(&selfm, "perch.export.queue.bytes", &[]);
                {
                    let mut g = m.lock().unwrap();
                    *g = g.max(v);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Self { max, task }
    }

    /// The largest queue size seen.
    pub fn max(&self) -> f64 {
        *self.max.lock().unwrap()
    }
}

impl Drop for QueueWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The value of the point of `metric` with attribute `key=value` in each
/// accepted request, in order of arrival.
pub fn series_values(
    received: &[Received],
    metric: &str,
    attrs: &[(&str, &str)],
) -> Vec<(f64, u64)> {
    accepted_points(received)
        .into_iter()
        .filter(|p| p.metric == metric)
        .filter(|p| {
            attrs
                .iter()
                .all(|(k, v)| p.attributes.iter().any(|(pk, pv)| pk == k && pv == v))
        })
        .map(|p| (p.value, p.start_unix_nano))
        .collect()
}
