//! Known workloads: each reports what it did, so tests can compare the
//! agent's figures with the workload's own count.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two fds into the array.
    let r = unsafe { libc::pipe(fds.as_mut_ptr()) };
    assert_eq!(r, 0, "pipe: {}", std::io::Error::last_os_error());
    // SAFETY: both fds are fresh and owned by us.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn write_byte(fd: &OwnedFd) {
    let b = [1u8];
    // SAFETY: writes one byte from a valid buffer.
    let n = unsafe { libc::write(fd.as_raw_fd(), b.as_ptr().cast(), 1) };
    assert_eq!(n, 1, "write: {}", std::io::Error::last_os_error());
}

fn read_byte(fd: &OwnedFd) {
    let mut b = [0u8];
    // SAFETY: reads one byte into a valid buffer.
    let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
    assert_eq!(n, 1, "read: {}", std::io::Error::last_os_error());
}

/// Per-thread scheduler counters from `/proc/self/task/<tid>/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ThreadSwitches {
    pub voluntary: u64,
    pub involuntary: u64,
    /// Time runnable but waiting for a CPU, in ns (`run_delay` of
    /// `/proc/<pid>/task/<tid>/schedstat`, kept with `CONFIG_SCHED_INFO`).
    pub run_delay_ns: u64,
    /// Times the thread got a CPU after waiting on a run queue (`pcount`,
    /// the third field of that file).
    pub pcount: u64,
}

pub fn thread_switches(tid: i32) -> ThreadSwitches {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
        .expect("reading the thread's status");
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().parse::<u64>().expect("number"))
            .unwrap_or_else(|| panic!("{name} missing from status"))
    };
    let schedstat =
        std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap_or_default();
    let stat = |i: usize| {
        schedstat
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    ThreadSwitches {
        voluntary: field("voluntary_ctxt_switches:"),
        involuntary: field("nonvoluntary_ctxt_switches:"),
        run_delay_ns: stat(1),
        pcount: stat(2),
    }
}

impl ThreadSwitches {
    /// Applies `op` to every counter of `self` and `other`.
    fn zip(self, other: Self, op: fn(u64, u64) -> u64) -> Self {
        ThreadSwitches {
            voluntary: op(self.voluntary, other.voluntary),
            involuntary: op(self.involuntary, other.involuntary),
            run_delay_ns: op(self.run_delay_ns, other.run_delay_ns),
            pcount: op(self.pcount, other.pcount),
        }
    }
}

impl std::ops::Sub for ThreadSwitches {
    type Output = Self;
    fn sub(self, before: Self) -> Self {
        self.zip(before, |a, b| a - b)
    }
}

impl std::ops::Add for ThreadSwitches {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        self.zip(other, |a, b| a + b)
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// What a ping-pong run did.
#[derive(Debug, Clone, Copy)]
pub struct PingPong {
    pub round_trips: u64,
    /// Wake-ups the workload caused: each message wakes the blocked reader.
    pub wakeups: u64,
    /// Context switches of the two threads, from their own status files.
    pub switches: ThreadSwitches,
    pub elapsed: Duration,
}

/// Two threads bounce one byte over a pair of pipes `round_trips` times.
/// Every message wakes a thread blocked in `read`.
pub fn ping_pong(round_trips: u64) -> PingPong {
    ping_pong_on(None, round_trips)
}

/// [`ping_pong`] with both threads pinned to `cpu` when given: the kernel
/// then never migrates a waiting thread, so each wait is one run-queue
/// stay.
pub fn ping_pong_on(cpu: Option<usize>, round_trips: u64) -> PingPong {
    let (a_r, a_w) = pipe();
    let (b_r, b_w) = pipe();
    let start = Instant::now();
    let pong = std::thread::spawn(move || {
        if let Some(cpu) = cpu {
            pin_to(cpu);
        }
        let tid = gettid();
        let before = thread_switches(tid);
        for _ in 0..round_trips {
            read_byte(&a_r);
            write_byte(&b_w);
        }
        thread_switches(tid) - before
    });
    let ping = std::thread::spawn(move || {
        if let Some(cpu) = cpu {
            pin_to(cpu);
        }
        let tid = gettid();
        let before = thread_switches(tid);
        for _ in 0..round_trips {
            write_byte(&a_w);
            read_byte(&b_r);
        }
        thread_switches(tid) - before
    });
    let p = ping.join().expect("ping thread");
    let q = pong.join().expect("pong thread");
    PingPong {
        round_trips,
        wakeups: 2 * round_trips,
        switches: p + q,
        elapsed: start.elapsed(),
    }
}

/// Like [`ping_pong`], but bounces for `wall` and returns how many round
/// trips it made. The pinging side decides when to stop and tells the other
/// with a zero byte.
pub fn ping_pong_for(wall: Duration) -> PingPong {
    let (a_r, a_w) = pipe();
    let (b_r, b_w) = pipe();
    let start = Instant::now();
    let pong = std::thread::spawn(move || {
        let tid = gettid();
        let before = thread_switches(tid);
        loop {
            let mut b = [0u8];
            // SAFETY: reads one byte into a valid buffer.
            let n = unsafe { libc::read(a_r.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
            assert_eq!(n, 1, "read: {}", std::io::Error::last_os_error());
            if b[0] == 0 {
                break;
            }
            write_byte(&b_w);
        }
        thread_switches(tid) - before
    });
    let ping = std::thread::spawn(move || {
        let tid = gettid();
        let before = thread_switches(tid);
        let mut trips = 0u64;
        while start.elapsed() < wall {
            write_byte(&a_w);
            read_byte(&b_r);
            trips += 1;
        }
        let zero = [0u8];
        // SAFETY: writes one byte from a valid buffer.
        let n = unsafe { libc::write(a_w.as_raw_fd(), zero.as_ptr().cast(), 1) };
        assert_eq!(n, 1, "write: {}", std::io::Error::last_os_error());
        (trips, thread_switches(tid) - before)
    });
    let (trips, p) = ping.join().expect("ping thread");
    let q = pong.join().expect("pong thread");
    PingPong {
        round_trips: trips,
        wakeups: 2 * trips,
        switches: p + q,
        elapsed: start.elapsed(),
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays in bounds for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let r = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            r,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// CPU time consumed by the calling thread.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Spins in user space on `cpu` for `wall`; returns the thread's CPU time.
pub fn spin_pinned(cpu: usize, wall: Duration) -> Duration {
    std::thread::spawn(move || {
        pin_to(cpu);
        let start_cpu = thread_cpu_time();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < wall {
            for i in 0..10_000u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
            }
            std::hint::black_box(x);
        }
        thread_cpu_time() - start_cpu
    })
    .join()
    .expect("spinner")
}
