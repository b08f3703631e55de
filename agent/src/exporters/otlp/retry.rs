//! What to do with a failed request: retry classification (per the OTLP
//! specification), exponential backoff with jitter, and the circuit breaker.

use std::time::{Duration, Instant};

/// The outcome of one export request, as the sender acts on it.
#[derive(Debug, Clone, PartialEq)]
pub enum Class {
    /// Accepted. `rejected` points were refused (partial success).
    Ok { rejected: u64, message: String },
    /// Failed, may succeed later; `delay` is what the server asked for.
    Retryable {
        delay: Option<Duration>,
        reason: String,
    },
    /// Failed for good (bad data, auth): drop and count.
    Permanent { reason: String },
}

/// OTLP/HTTP: 429, 502, 503, 504 are retryable (with `Retry-After` on
/// 429/503); other 4xx and 5xx are not.
pub fn classify_http(status: u16, retry_after: Option<&str>, message: String) -> Class {
    match status {
        200..=299 => Class::Ok {
            rejected: 0,
            message,
        },
        429 | 502 | 503 | 504 => Class::Retryable {
            delay: retry_after.and_then(parse_retry_after),
            reason: format!("HTTP {status}: {message}"),
        },
        _ => Class::Permanent {
            reason: format!("HTTP {status}: {message}"),
        },
    }
}

/// `Retry-After` as delay-seconds. (The HTTP-date form is not used by
/// collectors; it falls back to the backoff.)
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// OTLP/gRPC: the retryable codes of the specification.
/// `RESOURCE_EXHAUSTED` is retryable only with a `RetryInfo` (the server
/// says it can recover); without one it means the request itself is too
/// large for the server, and retrying would loop.
pub fn classify_grpc(code: tonic::Code, retry_info: Option<Duration>, message: &str) -> Class {
    use tonic::Code;
    let reason = format!("gRPC {code:?}: {message}");
    match code {
        Code::Ok => Class::Ok {
            rejected: 0,
            message: String::new(),
        },
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => Class::Retryable {
            delay: retry_info,
            reason,
        },
        Code::ResourceExhausted if retry_info.is_some() => Class::Retryable {
            delay: retry_info,
            reason,
        },
        _ => Class::Permanent { reason },
    }
}

/// OTLP/gRPC, with where the status came from. `local` is a status the
/// client's own stack made (tonic gives it a source error): a refused or
/// reset connection, a stream closed without a status, HTTP/2 garbage, an
/// I/O error or a timeout. The collector said nothing about the data, so
/// the spec's "transport failure, retry" applies whatever code tonic
/// mapped it to (`Unknown`, `Internal` for an h2 `PROTOCOL_ERROR`...).
/// A status the collector sent (`grpc-status`) goes through
/// [`classify_grpc`].
pub fn classify_grpc_status(
    code: tonic::Code,
    local: bool,
    retry_info: Option<Duration>,
    message: &str,
) -> Class {
    if local && code != tonic::Code::Ok {
        return Class::Retryable {
            delay: retry_info,
            reason: format!("gRPC transport failure ({code:?}): {message}"),
        };
    }
    classify_grpc(code, retry_info, message)
}

/// Minimal `google.rpc.Status` / `RetryInfo` messages, to read the delay a
/// gRPC server attaches to its status (`grpc-status-details-bin`).
pub mod rpc {
    /// `google.rpc.Status`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(message, repeated, tag = "3")]
        pub details: Vec<Any>,
    }
    /// `google.protobuf.Any`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }
    /// `google.rpc.RetryInfo`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RetryInfo {
        #[prost(message, optional, tag = "1")]
        pub retry_delay: Option<Duration>,
    }
    /// `google.protobuf.Duration`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Duration {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
    /// The `type_url` of `RetryInfo`.
    pub const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";
}

/// The delay in a `google.rpc.Status` details blob, if any.
pub fn retry_info_delay(details: &[u8]) -> Option<Duration> {
    use prost::Message;
    let status = rpc::Status::decode(details).ok()?;
    status
        .details
        .iter()
        .filter(|a| a.type_url == rpc::RETRY_INFO_TYPE)
        .find_map(|a| rpc::RetryInfo::decode(a.value.as_slice()).ok()?.retry_delay)
        .map(|d| {
            Duration::from_secs(u64::try_from(d.seconds).unwrap_or(0))
                + Duration::from_nanos(u64::try_from(d.nanos).unwrap_or(0))
        })
}

/// Exponential backoff with jitter: attempt n waits a random time in
/// `[d/2, d]` where `d = min(initial * 2^n, max)`. Jitter spreads a fleet of
/// agents that lost the same collector at the same moment.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15)
            ^ u64::from(std::process::id()).rotate_left(32);
        Self {
            initial,
            max,
            attempt: 0,
            rng: seed | 1,
        }
    }

    fn next_random(&mut self) -> f64 {
        // xorshift64*: jitter needs spread, not cryptographic quality.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The ceiling of the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay; advances the attempt counter.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        d.mul_f64(0.5 + 0.5 * self.next_random())
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Circuit breaker states (the `perch.export.circuit.state` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Requests flow.
    Closed = 0,
    /// Too many failures: no requests until the half-open time.
    Open = 1,
    /// One trial request allowed; its outcome closes or reopens.
    HalfOpen = 2,
}

/// Opens after `threshold` consecutive failures; half-opens after `cool`.
#[derive(Debug)]
pub struct Circuit {
    threshold: u32,
    cool: Duration,
    failures: u32,
    open_until: Option<Instant>,
    state: CircuitState,
}

impl Circuit {
    pub fn new(threshold: u32, cool: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cool,
            failures: 0,
            open_until: None,
            state: CircuitState::Closed,
        }
    }

    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// Ok when a request may go now, or the instant it may.
    pub fn allow(&mut self, now: Instant) -> Result<(), Instant> {
        match (self.state, self.open_until) {
            (CircuitState::Open, Some(until)) if now < until => Err(until),
            (CircuitState::Open, _) => {
                self.state = CircuitState::HalfOpen;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A request succeeded (or was refused for its content: the collector
    /// is alive).
    pub fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.state = CircuitState::Closed;
    }

    /// A request failed in a retryable way. Returns true when this opened
    /// the circuit.
    pub fn failure(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        let open = self.state == CircuitState::HalfOpen || self.failures >= self.threshold;
        let opened = open && self.state != CircuitState::Open;
        if open {
            self.state = CircuitState::Open;
            self.open_until = Some(now + self.cool);
        }
        opened
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn http_classification() {
        let cases: &[(u16, Option<&str>, &str)] = &[
            (200, None, "ok"),
            (400, None, "permanent"),
            (401, None, "permanent"),
            (404, None, "permanent"),
            (413, None, "permanent"),
            (429, Some("7"), "retry 7"),
            (429, None, "retry -"),
            (500, None, "permanent"),
            (502, None, "retry -"),
            (503, Some("2"), "retry 2"),
            (503, Some("Wed, 21 Oct 2015 07:28:00 GMT"), "retry -"),
            (504, None, "retry -"),
        ];
        for &(status, ra, want) in cases {
            let got = match classify_http(status, ra, "m".into()) {
                Class::Ok { .. } => "ok".to_owned(),
                Class::Permanent { .. } => "permanent".to_owned(),
                Class::Retryable { delay: Some(d), .. } => format!("retry {}", d.as_secs()),
                Class::Retryable { delay: None, .. } => "retry -".to_owned(),
            };
            assert_eq!(got, want, "HTTP {status}");
        }
    }

    #[test]
    fn grpc_classification() {
        use tonic::Code;
        let five = Some(Duration::from_secs(5));
        let cases: &[(Code, Option<Duration>, bool)] = &[
            (Code::Unavailable, None, true),
            (Code::Unavailable, five, true),
            (Code::DeadlineExceeded, None, true),
            (Code::Cancelled, None, true),
            (Code::Aborted, None, true),
            (Code::OutOfRange, None, true),
            (Code::DataLoss, None, true),
            (Code::ResourceExhausted, five, true),
            (Code::ResourceExhausted, None, false),
            (Code::InvalidArgument, None, false),
            (Code::Unauthenticated, None, false),
            (Code::PermissionDenied, None, false),
            (Code::Unimplemented, None, false),
            (Code::Internal, None, false),
        ];
        for &(code, ri, retry) in cases {
            let c = classify_grpc(code, ri, "m");
            assert_eq!(
                matches!(c, Class::Retryable { .. }),
                retry,
                "{code:?} {ri:?}"
            );
            if let Class::Retryable { delay, .. } = c {
                assert_eq!(delay, ri);
            }
        }
    }

    #[test]
    fn grpc_transport_failures_are_retryable() {
        use tonic::Code;
        // (code, made locally by the client stack, retryable)
        let cases: &[(Code, bool, bool)] = &[
            // Connection reset / closed without a status / h2 garbage.
            (Code::Unknown, true, true),
            (Code::Internal, true, true),
            (Code::Unavailable, true, true),
            (Code::Cancelled, true, true),
            (Code::ResourceExhausted, true, true),
            // The same codes sent by the collector keep the spec's meaning.
            (Code::Unknown, false, false),
            (Code::Internal, false, false),
            (Code::Unavailable, false, true),
            (Code::InvalidArgument, false, false),
            (Code::ResourceExhausted, false, false),
        ];
        for &(code, local, retry) in cases {
            let c = classify_grpc_status(code, local, None, "m");
            assert_eq!(
                matches!(c, Class::Retryable { .. }),
                retry,
                "{code:?} local={local}: {c:?}"
            );
        }
        assert!(matches!(
            classify_grpc_status(Code::Ok, true, None, ""),
            Class::Ok { .. }
        ));
    }

    #[test]
    fn retry_info_roundtrip() {
        let ri = rpc::RetryInfo {
            retry_delay: Some(rpc::Duration {
                seconds: 3,
                nanos: 500_000_000,
            }),
        };
        let status = rpc::Status {
            code: 8,
            message: "slow down".into(),
            details: vec![
                rpc::Any {
                    type_url: "type.googleapis.com/google.rpc.DebugInfo".into(),
                    value: vec![1, 2],
                },
                rpc::Any {
                    type_url: rpc::RETRY_INFO_TYPE.into(),
                    value: ri.encode_to_vec(),
                },
            ],
        };
        assert_eq!(
            retry_info_delay(&status.encode_to_vec()),
            Some(Duration::from_millis(3500))
        );
        assert_eq!(retry_info_delay(b"\xff\xff garbage"), None);
        assert_eq!(retry_info_delay(&[]), None);
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let ceilings = [1, 2, 4, 8, 16, 30, 30, 30];
        for (i, &c) in ceilings.iter().enumerate() {
            let ceiling = Duration::from_secs(c);
            assert_eq!(b.ceiling(), ceiling, "attempt {i}");
            let d = b.next_delay();
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {i}: {d:?}");
        }
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
        // Jitter: delays differ.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let ds: std::collections::HashSet<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(ds.len() > 10);
    }

    #[test]
    fn circuit_opens_half_opens_and_closes() {
        let t0 = Instant::now();
        let cool = Duration::from_secs(30);
        let mut c = Circuit::new(5, cool);
        for i in 0..4 {
            assert!(!c.failure(t0), "failure {i}");
            assert_eq!(c.allow(t0), Ok(()));
        }
        assert!(c.failure(t0), "fifth failure opens");
        assert_eq!(c.state(), CircuitState::Open);
        assert_eq!(c.allow(t0 + Duration::from_secs(29)), Err(t0 + cool));
        assert_eq!(c.allow(t0 + cool), Ok(()));
        assert_eq!(c.state(), CircuitState::HalfOpen);
        // A failed trial reopens at once.
        let t1 = t0 + cool;
        c.failure(t1);
        assert_eq!(c.state(), CircuitState::Open);
        assert!(c.allow(t1 + Duration::from_secs(1)).is_err());
        assert_eq!(c.allow(t1 + cool), Ok(()));
        c.success();
        assert_eq!(c.state(), CircuitState::Closed);
        // The count restarts after a success.
        assert!(!c.failure(t1));
        assert_eq!(c.state(), CircuitState::Closed);
    }
}
