//! The two OTLP transports: gRPC (tonic) and HTTP/protobuf (reqwest).
//! Both use rustls with the `ring` provider, the same CA and client
//! certificate settings, gzip, and the configured headers.
//!
//! Batches are encoded once, when queued; the gRPC client sends those bytes
//! as they are through a pass-through codec, so a retry costs no re-encoding.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::retry::{classify_http, retry_info_delay, Class};
use super::ExportError;
use crate::config::export::{Compression, ExportConfig, Protocol};

const GRPC_PATH: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// The most of a collector's response body that is read. An
/// `ExportMetricsServiceResponse` is a few bytes (a partial-success count
/// and a message); error bodies are a `google.rpc.Status` or a line of
/// text. A collector answering with more (a 1 GiB body was measured at
/// 781 MB RSS) is cut off here: the rest is never read, the connection is
/// dropped, and the response counted in `perch.export.response.truncated`.
pub const MAX_RESPONSE_BYTES: usize = 64 << 10;

/// tonic's text for a response message past `max_decoding_message_size`
/// (tonic `codec/decode.rs`). It checks the 5-byte length prefix before
/// buffering anything, so the message is never read.
const TONIC_TOO_LARGE: &str = "decoded message length too large";
/// tonic's text for a gzip response message that inflates past the same
/// limit (its decompression writes into a buffer limited to it).
const TONIC_INFLATED_TOO_LARGE: &str = "exceeded while decompressing message";

/// A connected (lazily) transport.
#[derive(Debug, Clone)]
pub enum Transport {
    Grpc(GrpcTransport),
    Http(HttpTransport),
}

impl Transport {
    /// Builds the client. Nothing connects yet: a collector that is down at
    /// start-up is a retryable failure at the first send, not a start error.
    pub fn new(cfg: &ExportConfig, endpoint: &str) -> Result<Self, ExportError> {
        let tls = TlsFiles::load(cfg)?;
        match cfg.protocol {
            Protocol::Grpc => GrpcTransport::new(cfg, endpoint, &tls).map(Transport::Grpc),
            Protocol::HttpProtobuf => HttpTransport::new(cfg, endpoint, &tls).map(Transport::Http),
        }
    }

    /// Sends one encoded request; returns how the sender should proceed,
    /// and whether the response was cut at [`MAX_RESPONSE_BYTES`].
    pub async fn send(&mut self, body: Bytes) -> (Class, bool) {
        match self {
            Transport::Grpc(g) => g.send(body).await,
            Transport::Http(h) => h.send(body).await,
        }
    }
}

/// PEM contents of the configured TLS files.
#[derive(Debug, Default)]
struct TlsFiles {
    ca: Option<Vec<u8>>,
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
}

impl TlsFiles {
    fn load(cfg: &ExportConfig) -> Result<Self, ExportError> {
        let read = |p: &Option<std::path::PathBuf>| -> Result<Option<Vec<u8>>, ExportError> {
            p.as_ref()
                .map(|p| {
                    crate::sources::read_file_capped(p, crate::config::export::MAX_TLS_FILE_BYTES)
                        .map(String::into_bytes)
                        .map_err(|e| ExportError::TlsFile {
                            path: p.clone(),
                            reason: e.to_string(),
                        })
                })
                .transpose()
        };
        Ok(Self {
            ca: read(&cfg.tls.ca_file)?,
            cert: read(&cfg.tls.client_cert_file)?,
            key: read(&cfg.tls.client_key_file)?,
        })
    }
}

/// The whole error chain on one line: TLS failures are deep inside it
/// ("invalid peer certificate: UnknownIssuer") and the top level alone
/// ("transport error") tells an operator nothing.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

// ---- gRPC ----

/// Passes pre-encoded request bytes through; decodes the response.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug)]
struct RawEncoder;

#[derive(Debug)]
struct ResponseDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = ExportMetricsServiceResponse;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        ExportMetricsServiceResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("bad response: {e}")))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ExportMetricsServiceResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

/// OTLP/gRPC client.
#[derive(Debug, Clone)]
pub struct GrpcTransport {
    grpc: tonic::client::Grpc<Channel>,
    headers: tonic::metadata::MetadataMap,
    timeout: Duration,
}

impl GrpcTransport {
    fn new(cfg: &ExportConfig, endpoint: &str, tls: &TlsFiles) -> Result<Self, ExportError> {
        let bad = |reason: String| ExportError::Endpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let mut ep = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(timeout)
            .timeout(timeout);
        if endpoint.starts_with("https://") {
            let mut t = ClientTlsConfig::new();
            t = match &tls.ca {
                Some(ca) => t.ca_certificate(Certificate::from_pem(ca)),
                None => t.with_native_roots(),
            };
            if let (Some(c), Some(k)) = (&tls.cert, &tls.key) {
                t = t.identity(Identity::from_pem(c, k));
            }
            ep = ep.tls_config(t).map_err(|e| bad(error_chain(&e)))?;
        }
        let mut grpc = tonic::client::Grpc::new(ep.connect_lazy());
        if cfg.compression == Compression::Gzip {
            grpc = grpc
                .send_compressed(tonic::codec::CompressionEncoding::Gzip)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        }
        grpc = grpc
            .max_encoding_message_size(usize::MAX)
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let mut headers = tonic::metadata::MetadataMap::new();
        for (k, v) in &cfg.headers {
            let key = tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                .map_err(|e| bad(format!("header {k}: {e}")))?;
            let val = v.parse().map_err(|e| bad(format!("header {k}: {e}")))?;
            headers.insert(key, val);
        }
        Ok(Self {
            grpc,
            headers,
            timeout,
        })
    }

    async fn send(&mut self, body: Bytes) -> (Class, bool) {
        if let Err(e) = self.grpc.ready().await {
            return (
                Class::Retryable {
                    delay: None,
                    reason: format!("connect: {}", error_chain(&e)),
                },
                false,
            );
        }
        let mut req = tonic::Request::new(body);
        *req.metadata_mut() = self.headers.clone();
        req.set_timeout(self.timeout);
        let path = http::uri::PathAndQuery::from_static(GRPC_PATH);
        match self.grpc.unary(req, path, RawCodec).await {
            Ok(resp) => {
                let r = resp.into_inner();
                let (rejected, message) = r
                    .partial_success
                    .map(|p| {
                        (
                            u64::try_from(p.rejected_data_points).unwrap_or(0),
                            p.error_message,
                        )
                    })
                    .unwrap_or_default();
                (Class::Ok { rejected, message }, false)
            }
            Err(status) => {
                let mut message = status.message().to_owned();
                // A status with a source was made by the client's own stack
                // (connect, reset, closed stream, bad HTTP/2 frame, I/O): the
                // collector never answered. One without came from the
                // collector's `grpc-status` (or from our decoder).
                let local = std::error::Error::source(&status).is_some();
                if let Some(src) = std::error::Error::source(&status) {
                    // Transport errors (TLS, refused) hide their cause here.
                    message = format!("{message}: {}", error_chain(src));
                }
                let too_large = match status.code() {
                    tonic::Code::OutOfRange => message.contains(TONIC_TOO_LARGE),
                    tonic::Code::ResourceExhausted => message.contains(TONIC_INFLATED_TOO_LARGE),
                    _ => false,
                };
                if !local && too_large {
                    // The collector answered with a response message, which
                    // gRPC servers send only on success, but one far past
                    // any real ExportMetricsServiceResponse. Retrying would
                    // send accepted data again; it counts as delivered.
                    return (
                        Class::Ok {
                            rejected: 0,
                            message: String::new(),
                        },
                        true,
                    );
                }
                let delay = retry_info_delay(status.details());
                (
                    super::retry::classify_grpc_status(status.code(), local, delay, &message),
                    false,
                )
            }
        }
    }
}

// ---- HTTP ----

/// OTLP/HTTP client (binary protobuf).
#[derive(Debug, Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
    url: String,
    gzip: bool,
    headers: reqwest::header::HeaderMap,
}

/// TLS that verifies the server against `ca_pem` (else the system roots),
/// with no client certificate: the kubelet metadata client's too.
pub(crate) fn rustls_verifying(
    ca_pem: Option<Vec<u8>>,
    endpoint: &str,
) -> Result<rustls::ClientConfig, ExportError> {
    let tls = TlsFiles {
        ca: ca_pem,
        ..TlsFiles::default()
    };
    rustls_config(&tls, endpoint)
}

fn rustls_config(tls: &TlsFiles, endpoint: &str) -> Result<rustls::ClientConfig, ExportError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |reason: String| ExportError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca {
        Some(pem) => {
            for c in CertificateDer::pem_slice_iter(pem) {
                let c = c.map_err(|e| bad(format!("CA file: {e}")))?;
                roots.add(c).map_err(|e| bad(format!("CA file: {e}")))?;
            }
        }
        None => {
            // System roots, as tonic's `with_native_roots`; unreadable ones
            // are skipped (the handshake then reports the unknown issuer).
            let loaded = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(loaded.certs);
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&tls.cert, &tls.key) {
        (Some(c), Some(k)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(c)
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("client certificate: {e}")))?;
            let key =
                PrivateKeyDer::from_pem_slice(k).map_err(|e| bad(format!("client key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad(format!("client certificate: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(config)
}

impl HttpTransport {
    fn new(cfg: &ExportConfig, endpoint: &str, tls: &TlsFiles) -> Result<Self, ExportError> {
        let bad = |reason: String| ExportError::Endpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let mut url = endpoint.to_owned();
        // A bare host:port gets the OTLP/HTTP metrics path.
        if let Ok(u) = endpoint.parse::<http::Uri>() {
            if u.path() == "/" || u.path().is_empty() {
                url = format!("{}/v1/metrics", endpoint.trim_end_matches('/'));
            }
        }
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &cfg.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| bad(format!("header {k}: {e}")))?;
            let val = reqwest::header::HeaderValue::from_str(v)
                .map_err(|e| bad(format!("header {k}: {e}")))?;
            headers.insert(name, val);
        }
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(rustls_config(tls, endpoint)?)
            .timeout(timeout)
            .connect_timeout(timeout)
            .no_proxy()
            .build()
            .map_err(|e| bad(error_chain(&e)))?;
        Ok(Self {
            client,
            url,
            gzip: cfg.compression == Compression::Gzip,
            headers,
        })
    }

    async fn send(&mut self, body: Bytes) -> (Class, bool) {
        let mut req = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .header("content-type", "application/x-protobuf");
        let wire: Bytes = if self.gzip {
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 4),
                flate2::Compression::fast(),
            );
            match enc.write_all(&body).and_then(|_| enc.finish()) {
                Ok(z) => {
                    req = req.header("content-encoding", "gzip");
                    Bytes::from(z)
                }
                Err(_) => body,
            }
        } else {
            body
        };
        let mut resp = match req.body(wire).send().await {
            Ok(r) => r,
            Err(e) => {
                return (
                    Class::Retryable {
                        delay: None,
                        reason: error_chain(&e),
                    },
                    false,
                )
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (body, truncated) = read_capped(&mut resp, MAX_RESPONSE_BYTES).await;
        // Dropping `resp` with its body unread closes the connection.
        drop(resp);
        if (200..300).contains(&status) {
            let (rejected, message) = ExportMetricsServiceResponse::decode(body)
                .ok()
                .and_then(|r| r.partial_success)
                .map(|p| {
                    (
                        u64::try_from(p.rejected_data_points).unwrap_or(0),
                        p.error_message,
                    )
                })
                .unwrap_or_default();
            return (Class::Ok { rejected, message }, truncated);
        }
        // Error bodies are a google.rpc.Status in protobuf, or text.
        let message = match super::retry::rpc::Status::decode(body.clone()) {
            Ok(s) if !s.message.is_empty() => s.message,
            _ => String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
        };
        (
            classify_http(status, retry_after.as_deref(), message),
            truncated,
        )
    }
}

/// Reads a response body chunk by chunk, keeping at most `cap` bytes:
/// `(body, truncated)`. Past the cap it stops reading; the rest is never
/// buffered. A body that fails midway keeps what arrived (the status line
/// already said how the request went).
async fn read_capped(resp: &mut reqwest::Response, cap: usize) -> (Bytes, bool) {
    let mut buf = bytes::BytesMut::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                let room = cap - buf.len();
                if c.len() > room {
                    buf.extend_from_slice(&c[..room]);
                    return (buf.freeze(), true);
                }
                buf.extend_from_slice(&c);
            }
            Ok(None) | Err(_) => return (buf.freeze(), false),
        }
    }
}
