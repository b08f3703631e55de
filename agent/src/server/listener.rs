//! The bounded HTTP/1 listener: every limit on what a client can make the
//! agent hold is here, in the constants below.
//!
//! `axum::serve` accepts without bound and keeps idle or half-sent
//! connections forever: 600 connections each sending a never-ending 380 KB
//! header took the agent from 10 MB to 243 MB, and 1 100 idle ones used up
//! a 1024-fd limit so collectors failed with EMFILE. Here the accept loop
//! drives hyper's HTTP/1 connections itself:
//!
//! - at most [`MAX_CONNECTIONS`] connections are served at once. A
//!   connection past the cap first evicts the connection that has been
//!   silent longest (if silent for [`EVICT_IDLE_AFTER`]), else it is
//!   accepted and closed at once. Accept-and-close rather than leaving it
//!   in the kernel's backlog: the client learns at once (a reset) instead
//!   of hanging until its timeout, the backlog never fills so a fresh
//!   probe is not stuck behind attackers, and the agent holds at most
//!   `MAX_CONNECTIONS + 1` sockets;
//! - a request head must arrive within [`HEADER_READ_TIMEOUT`] and fit in
//!   [`MAX_BUF_BYTES`] (hyper answers 431 past it), so a connection's read
//!   buffer cannot grow past that and the listener's buffers past
//!   `MAX_CONNECTIONS * MAX_BUF_BYTES` (1 MiB);
//! - a connection waiting for its next request (keep-alive) is closed
//!   after [`HEADER_READ_TIMEOUT`] too: hyper's header timer runs while it
//!   waits for a head. A connection with no byte read or written for
//!   [`IDLE_TIMEOUT`] is closed whatever its state (a client that stopped
//!   reading its response);
//! - when the last connection closes after a burst, freed heap is given
//!   back to the kernel (`malloc_trim`), so RSS returns to its baseline and
//!   the memory limiter, which reads RSS, leaves its hard state.
//!
//! Every connection closed by a limit is counted in
//! `perch.http.connections.refused{reason}`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};

use crate::selfmetrics::SelfMetrics;

/// Connections served at once. Prometheus, a health probe and an operator
/// need a handful; 64 leaves room for several scrapers while keeping fds
/// (64 of a 65 536 `LimitNOFILE`) and buffers small.
pub const MAX_CONNECTIONS: usize = 64;
/// Time to receive a whole request head, from its first byte.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection with no byte either way this long is closed, mid-response
/// included (a client that stopped reading).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// At the cap, a connection silent this long may be evicted for a new one.
pub const EVICT_IDLE_AFTER: Duration = Duration::from_secs(1);
/// How long a new connection waits for an evicted one's slot.
const EVICT_WAIT: Duration = Duration::from_millis(500);
/// hyper's read buffer limit, which bounds a request head (hyper's minimum
/// is 8 KiB; its default of ~400 KiB is what the attack filled).
pub const MAX_BUF_BYTES: usize = 16 * 1024;
/// How often a connection checks its idle time.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// Pause after a failed accept (EMFILE, ENFILE): retrying at once would spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Trim the heap when the connection count drops to zero after reaching
/// this many (or after any refusal).
const TRIM_AFTER_PEAK: usize = 8;

/// Reasons in `perch.http.connections.refused{reason}`.
pub mod reason {
    /// At the cap with no idle connection to evict: accepted and closed.
    pub const LIMIT: &str = "limit";
    /// Closed to make room for a new connection at the cap.
    pub const EVICTED: &str = "evicted";
    /// No byte either way for `IDLE_TIMEOUT`.
    pub const IDLE_TIMEOUT: &str = "idle_timeout";
    /// The request head did not arrive within `HEADER_READ_TIMEOUT`.
    pub const HEADER_TIMEOUT: &str = "header_timeout";
    /// The request head was larger than `MAX_BUF_BYTES` (answered 431).
    pub const HEADER_TOO_LARGE: &str = "header_too_large";
    /// The request could not be parsed (answered 400).
    pub const BAD_REQUEST: &str = "bad_request";
    /// `accept` failed (e.g. EMFILE); the client was not served.
    pub const ACCEPT_ERROR: &str = "accept_error";
    pub const ALL: &[&str] = &[
        LIMIT,
        EVICTED,
        IDLE_TIMEOUT,
        HEADER_TIMEOUT,
        HEADER_TOO_LARGE,
        BAD_REQUEST,
        ACCEPT_ERROR,
    ];
}

/// When a connection last read and wrote a byte, in ms since `epoch`
/// (`u64::MAX`: never wrote).
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    read_ms: AtomicU64,
    write_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            read_ms: AtomicU64::new(0),
            write_ms: AtomicU64::new(u64::MAX),
        }
    }
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
    fn read(&self) {
        self.read_ms.store(self.now_ms(), Ordering::Relaxed);
    }
    fn wrote(&self) {
        self.write_ms.store(self.now_ms(), Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        let read = self.read_ms.load(Ordering::Relaxed);
        let last = match self.write_ms.load(Ordering::Relaxed) {
            u64::MAX => read,
            w => w.max(read),
        };
        Duration::from_millis(self.now_ms().saturating_sub(last))
    }
    /// Answered a request and read nothing since: an idle keep-alive
    /// connection, not a stalled request head.
    fn between_requests(&self) -> bool {
        match self.write_ms.load(Ordering::Relaxed) {
            u64::MAX => false,
            w => self.read_ms.load(Ordering::Relaxed) <= w,
        }
    }
}

/// A socket that records its last activity.
struct Tracked {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A connection as the accept loop sees it, for eviction.
struct Entry {
    activity: Arc<Activity>,
    evict: Arc<Notify>,
    evicting: AtomicBool,
}

/// The listener's bookkeeping.
struct Conns {
    slots: Arc<Semaphore>,
    open: Mutex<HashMap<u64, Arc<Entry>>>,
    next_id: AtomicU64,
    active: AtomicUsize,
    /// A burst happened since the last trim.
    dirty: AtomicBool,
    selfm: Arc<SelfMetrics>,
}

impl Conns {
    fn refused(&self, why: &'static str) {
        self.dirty.store(true, Ordering::Relaxed);
        self.selfm.add(
            crate::catalogue::HTTP_CONNECTIONS_REFUSED,
            "HTTP connections closed before or instead of being served, by reason.",
            "{connection}",
            vec![("reason", why.into())],
            1,
        );
    }

    fn publish_active(&self, n: usize) {
        self.selfm.set(
            crate::catalogue::HTTP_CONNECTIONS_ACTIVE,
            "HTTP connections open now.",
            "{connection}",
            Vec::new(),
            n as f64,
        );
    }

    /// Asks the connection silent longest (at least `EVICT_IDLE_AFTER`) to
    /// close. Returns whether one was asked.
    fn evict_idlest(&self) -> bool {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let victim = open
            .values()
            .filter(|e| !e.evicting.load(Ordering::Relaxed))
            .map(|e| (e.activity.idle_for(), e))
            .filter(|(idle, _)| *idle >= EVICT_IDLE_AFTER)
            .max_by_key(|(idle, _)| *idle);
        match victim {
            Some((_, e)) => {
                e.evicting.store(true, Ordering::Relaxed);
                e.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Removes a connection from the books when its task ends.
struct Registered {
    conns: Arc<Conns>,
    id: u64,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        let left = self.conns.active.fetch_sub(1, Ordering::Relaxed) - 1;
        self.conns.publish_active(left);
        if left == 0 && self.conns.dirty.swap(false, Ordering::Relaxed) {
            // Give the burst's freed buffers back to the kernel, off the
            // async workers (trimming can take milliseconds). Outside a
            // runtime (dropped while it shuts down), trim right here.
            // SAFETY: malloc_trim only releases free memory held by glibc's malloc.
            let trim = || unsafe { libc::malloc_trim(0) };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(trim)),
                Err(_) => drop(trim()),
            }
        }
    }
}

/// Serves `router` on `listener` within the bounds above, until the task
/// is aborted.
pub async fn serve(listener: TcpListener, router: axum::Router, selfm: Arc<SelfMetrics>) {
    let conns = Arc::new(Conns {
        slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        open: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        active: AtomicUsize::new(0),
        dirty: AtomicBool::new(false),
        selfm: selfm.clone(),
    });
    // Every reason shows from the start, so rate() works from the first scrape.
    for r in reason::ALL {
        selfm.add(
            crate::catalogue::HTTP_CONNECTIONS_REFUSED,
            "HTTP connections closed before or instead of being served, by reason.",
            "{connection}",
            vec![("reason", (*r).into())],
            0,
        );
    }
    conns.publish_active(0);
    let mut accept_failing = false;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => {
                accept_failing = false;
                s
            }
            Err(e) => {
                if !accept_failing {
                    tracing::warn!(error = %e, "HTTP accept failed; retrying (clients are not served meanwhile)");
                    accept_failing = true;
                }
                conns.refused(reason::ACCEPT_ERROR);
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let permit = match conns.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) if conns.evict_idlest() => {
                conns.refused(reason::EVICTED);
                match tokio::time::timeout(EVICT_WAIT, conns.slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        conns.refused(reason::LIMIT);
                        continue;
                    }
                }
            }
            Err(_) => {
                // Accepted and closed at once (see the module header).
                conns.refused(reason::LIMIT);
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, permit, conns.clone(), router.clone()));
    }
}

async fn connection(
    stream: TcpStream,
    permit: tokio::sync::OwnedSemaphorePermit,
    conns: Arc<Conns>,
    router: axum::Router,
) {
    let id = conns.next_id.fetch_add(1, Ordering::Relaxed);
    let activity = Arc::new(Activity::new());
    let entry = Arc::new(Entry {
        activity: activity.clone(),
        evict: Arc::new(Notify::new()),
        evicting: AtomicBool::new(false),
    });
    conns
        .open
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, entry.clone());
    let n = conns.active.fetch_add(1, Ordering::Relaxed) + 1;
    if n >= TRIM_AFTER_PEAK {
        conns.dirty.store(true, Ordering::Relaxed);
    }
    conns.publish_active(n);
    let _registered = Registered {
        conns: conns.clone(),
        id,
        _permit: permit,
    };

    let io = TokioIo::new(Tracked {
        io: stream,
        activity: activity.clone(),
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_BYTES)
        .keep_alive(true)
        .serve_connection(io, TowerToHyperService::new(router));
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(IDLE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Dropping `conn` closes the socket.
    let closed_by: Option<&'static str> = loop {
        tokio::select! {
            r = conn.as_mut() => break r.err().and_then(|e| classify(&e, &activity)),
            _ = entry.evict.notified() => break None, // counted by the accept loop
            _ = tick.tick() => if activity.idle_for() >= IDLE_TIMEOUT {
                break Some(reason::IDLE_TIMEOUT);
            },
        }
    };
    if let Some(why) = closed_by {
        conns.refused(why);
    }
}

/// The limit a connection error comes from; None for a client that went
/// away (not the listener's doing) and for the normal end of an idle
/// keep-alive connection. hyper's header timer also runs while a
/// keep-alive connection waits for its next request, so an idle keep-alive
/// connection is closed after `HEADER_READ_TIMEOUT` too; that is not
/// counted, or every scraper's connection would look like an attack.
fn classify(e: &hyper::Error, activity: &Activity) -> Option<&'static str> {
    if e.is_timeout() && activity.between_requests() {
        None
    } else if e.is_timeout() {
        Some(reason::HEADER_TIMEOUT)
    } else if e.is_parse_too_large() {
        Some(reason::HEADER_TOO_LARGE)
    } else if e.is_parse() {
        Some(reason::BAD_REQUEST)
    } else {
        None
    }
}
