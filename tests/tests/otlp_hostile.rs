//! A hostile or broken collector (issue 10), against the exporter in
//! process: a 1 GiB response body, connections reset, closed without an
//! answer, or answered with garbage, and a SIGKILL during an outage with
//! the disk queue on. Each test is named after the finding and asserts
//! what must be true.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use perch::config::export::{ExportConfig, Protocol};
use perch::exporters::otlp::OtlpExporter;
use perch::model::Snapshot;
use perch::selfmetrics::SelfMetrics;
use perch_tests::otlp_receiver::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn start(cfg: &ExportConfig) -> (OtlpExporter, Arc<SelfMetrics>) {
    let selfm = Arc::new(SelfMetrics::new());
    let memory = perch::pipeline::memory::MemoryGauge::default();
    let e = OtlpExporter::start_with_resource(cfg, selfm.clone(), memory, test_resource())
        .expect("start")
        .expect("endpoint");
    (e, selfm)
}

fn snapshot(round: u64) -> Arc<Snapshot> {
    Arc::new(synthetic_snapshot(round, 3))
}

fn rounds_received(r: &[Received]) -> Vec<f64> {
    series_values(r, "system.cpu.time", &[("cpu", "0"), ("cpu.mode", "user")])
        .into_iter()
        .map(|v| v.0)
        .collect()
}

fn dropped(selfm: &SelfMetrics, reason: &str) -> f64 {
    selfm_value(selfm, "perch.export.points.dropped", &[("reason", reason)])
}

/// This process's resident memory.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("statm resident");
    pages * 4096
}

/// Samples RSS every 5 ms on its own thread and keeps the maximum.
struct RssWatch {
    max: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start() -> Self {
        let max = Arc::new(std::sync::atomic::AtomicU64::new(rss_bytes()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (max.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(rss_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            max,
            stop,
            thread: Some(thread),
        }
    }
    fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one HTTP/1.1 request (headers and a `Content-Length` body).
async fn read_http_request(s: &mut tokio::net::TcpStream) -> Option<()> {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    let (head_end, len) = loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (i + 4, len);
        }
    };
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(())
}

static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// An OTLP/HTTP "collector" that answers every request 200 with a 1 GiB
/// body, streamed from one static 64 KiB buffer (the test process never
/// holds it) until the client hangs up.
async fn huge_body_collector(
    requests: Arc<AtomicUsize>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let requests = requests.clone();
            tokio::spawn(async move {
                while read_http_request(&mut s).await.is_some() {
                    requests.fetch_add(1, Ordering::SeqCst);
                    let total: u64 = 1 << 30;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: {total}\r\n\r\n"
                    );
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut sent = 0u64;
                    while sent < total {
                        if s.write_all(&ZEROS).await.is_err() {
                            return;
                        }
                        sent += ZEROS.len() as u64;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_collector_answers_200_with_a_1gib_body() {
    let _serial = perch_tests::serial_async().await;
    let requests = Arc::new(AtomicUsize::new(0));
    let (addr, task) = huge_body_collector(requests.clone()).await;
    let mut cfg = test_config(format!("http://{addr}/v1/metrics"), Protocol::HttpProtobuf);
    // Long enough to read the whole gigabyte, as a client without a cap would.
    cfg.timeout_ms = 20_000;
    let base = rss_bytes();
    let watch = RssWatch::start();
    let (exporter, selfm) = start(&cfg);
    let mut delivered = exporter.delivered();
    for round in 1..=3 {
        exporter.submit(snapshot(round));
        let want = round;
        tokio::time::timeout(Duration::from_secs(10), delivered.wait_for(|n| *n >= want))
            .await
            .expect("each batch delivered in turn")
            .expect("exporter alive");
    }
    let peak = watch.max();
    drop(watch);
    let after = rss_bytes();
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "1 GiB body: RSS base {:.1} MiB, peak {:.1} MiB, after {:.1} MiB",
        mib(base),
        mib(peak),
        mib(after)
    );
    assert_eq!(requests.load(Ordering::SeqCst), 3, "one request per batch");
    assert_eq!(
        selfm_value(&selfm, "perch.export.response.truncated", &[]),
        3.0,
        "each cut-off response is counted"
    );
    assert_eq!(
        selfm_value(&selfm, "perch.export.points.sent", &[]),
        3.0 * points_in(&snapshot(1)) as f64
    );
    assert_eq!(dropped(&selfm, "rejected"), 0.0);
    // The cap is 64 KiB; allow for the allocator and test harness noise.
    assert!(
        peak < base + (32 << 20),
        "RSS grew by {:.1} MiB under a 1 GiB body",
        mib(peak.saturating_sub(base))
    );
    exporter.shutdown(Duration::from_secs(1)).await;
    task.abort();
}

/// An OTLP/gRPC "collector" that answers every request with a response
/// message whose length prefix says 1 GiB, then streams zeros from the
/// static buffer as fast as the client's flow-control window allows.
/// With `bomb`, the message is instead that gzip payload (small on the
/// wire, huge once inflated), flagged compressed.
async fn huge_grpc_collector(
    requests: Arc<AtomicUsize>,
    bomb: Option<bytes::Bytes>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                return;
            };
            let requests = requests.clone();
            let bomb = bomb.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    requests.fetch_add(1, Ordering::SeqCst);
                    let bomb = bomb.clone();
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        while let Some(Ok(d)) = body.data().await {
                            let _ = body.flow_control().release_capacity(d.len());
                        }
                        let mut resp = tonic::codegen::http::Response::builder()
                            .status(200)
                            .header("content-type", "application/grpc");
                        if bomb.is_some() {
                            resp = resp.header("grpc-encoding", "gzip");
                        }
                        let resp = resp.body(()).expect("response");
                        let Ok(mut send) = respond.send_response(resp, false) else {
                            return;
                        };
                        if let Some(b) = bomb {
                            let mut m = vec![1u8];
                            m.extend_from_slice(&(b.len() as u32).to_be_bytes());
                            m.extend_from_slice(&b);
                            let _ = send.send_data(bytes::Bytes::from(m), false);
                            // Keep the stream open: no trailers.
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                        let total: u32 = 1 << 30;
                        let mut prefix = vec![0u8];
                        prefix.extend_from_slice(&total.to_be_bytes());
                        if send.send_data(bytes::Bytes::from(prefix), false).is_err() {
                            return;
                        }
                        let mut sent = 0u64;
                        while sent < u64::from(total) {
                            send.reserve_capacity(ZEROS.len());
                            match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                                Some(Ok(n)) if n > 0 => {
                                    let chunk = bytes::Bytes::from_static(&ZEROS[..n]);
                                    if send.send_data(chunk, false).is_err() {
                                        return;
                                    }
                                    sent += n as u64;
                                }
                                Some(Ok(_)) => {}
                                _ => return,
                            }
                        }
                    });
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_collector_answers_with_a_1gib_message() {
    let _serial = perch_tests::serial_async().await;
    // 1 GiB announced, and a gzip bomb: 256 MiB of zeros in ~256 KiB.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    for _ in 0..(256 << 20) / ZEROS.len() {
        std::io::Write::write_all(&mut gz, &ZEROS).expect("gzip");
    }
    let bomb = bytes::Bytes::from(gz.finish().expect("gzip"));
    for bomb in [None, Some(bomb)] {
        grpc_huge_message(bomb).await;
    }
}

async fn grpc_huge_message(bomb: Option<bytes::Bytes>) {
    let what = if bomb.is_some() { "gzip bomb" } else { "1 GiB" };
    let requests = Arc::new(AtomicUsize::new(0));
    let (addr, task) = huge_grpc_collector(requests.clone(), bomb).await;
    let mut cfg = test_config(format!("http://{addr}"), Protocol::Grpc);
    cfg.timeout_ms = 20_000;
    let base = rss_bytes();
    let watch = RssWatch::start();
    let (exporter, selfm) = start(&cfg);
    let mut delivered = exporter.delivered();
    for round in 1..=3 {
        exporter.submit(snapshot(round));
        let want = round;
        tokio::time::timeout(Duration::from_secs(10), delivered.wait_for(|n| *n >= want))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{what}: batch {round} not delivered: {:?}",
                    exporter.last_error()
                )
            })
            .expect("exporter alive");
    }
    let peak = watch.max();
    drop(watch);
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "{what} gRPC message: RSS base {:.1} MiB, peak {:.1} MiB",
        mib(base),
        mib(peak)
    );
    assert_eq!(
        requests.load(Ordering::SeqCst),
        3,
        "{what}: accepted data is not sent again"
    );
    assert_eq!(
        selfm_value(&selfm, "perch.export.response.truncated", &[]),
        3.0,
        "{what}"
    );
    assert_eq!(selfm_value(&selfm, "perch.export.retries", &[]), 0.0);
    assert_eq!(dropped(&selfm, "rejected"), 0.0, "{what}");
    assert!(
        peak < base + (32 << 20),
        "{what}: RSS grew by {:.1} MiB under a huge message",
        mib(peak.saturating_sub(base))
    );
    exporter.shutdown(Duration::from_secs(1)).await;
    task.abort();
}

/// What a broken collector does with each connection.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Reads the start of the request, then resets (RST) the connection.
    Reset,
    /// Reads the request, then closes without a byte of answer.
    Close,
    /// Reads the request, then answers with bytes that are neither HTTP/1
    /// nor HTTP/2 frames.
    Garbage,
}

/// A listener on `port` applying `fault` to every connection until
/// stopped; counts connections.
async fn faulty_collector(
    port: u16,
    fault: Fault,
    conns: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind fault port");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            conns.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                // The request's first bytes (the HTTP/2 preface and
                // SETTINGS, or the HTTP/1 request line).
                let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
                match fault {
                    Fault::Reset => {
                        use std::os::fd::AsRawFd;
                        let linger = libc::linger {
                            l_onoff: 1,
                            l_linger: 0,
                        };
                        // SAFETY: a valid socket fd and a linger struct of
                        // the size given; SO_LINGER 0 makes close send RST.
                        unsafe {
                            libc::setsockopt(
                                s.as_raw_fd(),
                                libc::SOL_SOCKET,
                                libc::SO_LINGER,
                                (&linger as *const libc::linger).cast(),
                                std::mem::size_of::<libc::linger>() as libc::socklen_t,
                            );
                        }
                        drop(s);
                    }
                    Fault::Close => {
                        // Drain what comes within a moment, then FIN.
                        let _ =
                            tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await;
                        let _ = s.shutdown().await;
                    }
                    Fault::Garbage => {
                        let _ = s
                            .write_all(b"\x17\x03\x03\xff\xffthis is not a frame\x00\x00\x00\x00\x00garbage garbage garbage\r\n\r\n")
                            .await;
                        let _ =
                            tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await;
                    }
                }
            });
        }
    })
}

async fn transport_fault_is_retried(protocol: Protocol, fault: Fault) {
    let port = free_port();
    let conns = Arc::new(AtomicUsize::new(0));
    let bad = faulty_collector(port, fault, conns.clone()).await;
    let url = match protocol {
        Protocol::Grpc => format!("http://127.0.0.1:{port}"),
        Protocol::HttpProtobuf => format!("http://127.0.0.1:{port}/v1/metrics"),
    };
    let mut cfg = test_config(url, protocol);
    cfg.circuit.failure_threshold = 2;
    let (exporter, selfm) = start(&cfg);
    let mut opened = false;
    for round in 1..=3 {
        exporter.submit(snapshot(round));
        let deadline = Instant::now() + Duration::from_millis(400);
        while Instant::now() < deadline {
            opened |= selfm_value(&selfm, "perch.export.circuit.state", &[]) == 1.0;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let what = format!("{protocol:?} {fault:?}");
    assert!(
        conns.load(Ordering::SeqCst) >= 2,
        "{what}: the collector was tried"
    );
    let retries = selfm_value(&selfm, "perch.export.retries", &[]);
    assert!(retries >= 2.0, "{what}: retried ({retries})");
    assert!(opened, "{what}: the circuit breaker counted the failures");
    assert_eq!(
        selfm_value(&selfm, "perch.export.requests", &[("outcome", "rejected")]),
        0.0,
        "{what}: no request counted rejected"
    );
    assert_eq!(dropped(&selfm, "rejected"), 0.0, "{what}");
    let err = exporter.last_error().unwrap_or_default();
    eprintln!("{what}: {err}");
    // The collector is healthy again on the same port: everything arrives.
    bad.abort();
    let _ = bad.await;
    let rx = match protocol {
        Protocol::Grpc => Receiver::start_on(Some(port), None, None).await,
        Protocol::HttpProtobuf => Receiver::start_on(None, Some(port), None).await,
    };
    assert!(
        rx.wait_for(Duration::from_secs(5), |r| rounds_received(r).len() == 3)
            .await,
        "{what}: not delivered after recovery: {:?} ({:?})",
        rounds_received(&rx.received()),
        exporter.last_error()
    );
    assert_eq!(
        rounds_received(&rx.received()),
        vec![0.5, 1.0, 1.5],
        "{what}: in order, once each"
    );
    assert_eq!(
        dropped(&selfm, "rejected") + dropped(&selfm, "queue_full"),
        0.0
    );
    exporter.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_collector_resets_closes_or_sends_garbage_is_retried() {
    let _serial = perch_tests::serial_async().await;
    for fault in [Fault::Reset, Fault::Close, Fault::Garbage] {
        transport_fault_is_retried(Protocol::Grpc, fault).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_collector_resets_closes_or_sends_garbage_is_retried() {
    let _serial = perch_tests::serial_async().await;
    for fault in [Fault::Reset, Fault::Close, Fault::Garbage] {
        transport_fault_is_retried(Protocol::HttpProtobuf, fault).await;
    }
}

/// Batches that may be lost to a SIGKILL during an outage with a disk
/// queue (docs/architecture.md, Export): the snapshots not yet encoded,
/// at most `max_pending_snapshots`.
const MAX_LOST_ON_KILL: usize = 2;

/// SIGKILL simulated in process: the exporter's runtime is dropped with
/// its tasks, without `shutdown` (no flush, no spill). A second exporter
/// on the same directory must deliver what the first had.
#[test]
fn sigkill_during_an_outage_with_the_disk_queue() {
    // The async tests' guard, so this one does not run beside them.
    let _serial = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(perch_tests::serial_async());
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut cfg = test_config(format!("http://127.0.0.1:{port}"), Protocol::Grpc);
    cfg.queue.dir = Some(dir.path().join("queue"));
    let n: u64 = 14;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let selfm1 = rt.block_on(async {
        let (exporter, selfm) = start(&cfg);
        for round in 1..=n {
            exporter.submit(snapshot(round));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Leaked on purpose: dropping it is not what a kill does either.
        std::mem::forget(exporter);
        selfm
    });
    rt.shutdown_background();
    let on_disk = std::fs::read_dir(dir.path().join("queue"))
        .expect("queue dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "otlpq"))
        })
        .count();
    eprintln!(
        "killed during an outage: {on_disk} of {n} batches on disk, {} retries",
        selfm_value(&selfm1, "perch.export.retries", &[])
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let rx = Receiver::start_on(Some(port), None, None).await;
        let (exporter, selfm) = start(&cfg);
        rx.wait_for(Duration::from_secs(5), |r| {
            rounds_received(r).len() as u64 >= n
        })
        .await;
        // Let a straggler (a duplicate would show here) arrive.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got = rounds_received(&rx.received());
        let lost = n as usize - got.len().min(n as usize);
        eprintln!("after restart: {} of {n} delivered, {lost} lost", got.len());
        assert!(
            lost <= MAX_LOST_ON_KILL,
            "{lost} batches lost to the kill (at most {MAX_LOST_ON_KILL}): got {got:?}"
        );
        let mut sorted = got.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.dedup();
        assert_eq!(sorted, got, "in order, no duplicates");
        assert_eq!(selfm_value(&selfm, "perch.export.disk.bytes", &[]), 0.0);
        exporter.shutdown(Duration::from_secs(1)).await;
    });
}
