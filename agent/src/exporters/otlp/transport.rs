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

use super::retry::{classify_grpc, classify_http, retry_info_delay, Class};
use super::ExportError;
use crate::config::export::{Compression, ExportConfig, Protocol};

const GRPC_PATH: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

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

    /// Sends one encoded request; returns how the sender should proceed.
    pub async fn send(&mut self, body: Bytes) -> Class {
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
                    std::fs::read(p).map_err(|source| ExportError::TlsFile {
                        path: p.clone(),
                        reason: source.to_string(),
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
        grpc = grpc.max_encoding_message_size(usize::MAX);
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

    async fn send(&mut self, body: Bytes) -> Class {
        if let Err(e) = self.grpc.ready().await {
            return Class::Retryable {
                delay: None,
                reason: format!("connect: {}", error_chain(&e)),
            };
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
                Class::Ok { rejected, message }
            }
            Err(status) => {
                let mut message = status.message().to_owned();
                if let Some(src) = std::error::Error::source(&status) {
                    // Transport errors (TLS, refused) hide their cause here.
                    message = format!("{message}: {}", error_chain(src));
                }
                let delay = retry_info_delay(status.details());
                classify_grpc(status.code(), delay, &message)
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

    async fn send(&mut self, body: Bytes) -> Class {
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
        let resp = match req.body(wire).send().await {
            Ok(r) => r,
            Err(e) => {
                return Class::Retryable {
                    delay: None,
                    reason: error_chain(&e),
                }
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.bytes().await.unwrap_or_default();
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
            return Class::Ok { rejected, message };
        }
        // Error bodies are a google.rpc.Status in protobuf, or text.
        let message = match super::retry::rpc::Status::decode(body.clone()) {
            Ok(s) if !s.message.is_empty() => s.message,
            _ => String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
        };
        classify_http(status, retry_after.as_deref(), message)
    }
}
