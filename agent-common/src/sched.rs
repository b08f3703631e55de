//! Scheduler family: context switches and run-queue latency.

/// Per-CPU array of `u64` counters, indexed by the `SLOT_*` constants.
pub const MAP_COUNTERS: &str = "SCHED_COUNTERS";
/// Per-CPU array of `u64` bucket counts, indexed by [`crate::hist::bucket_index`]
/// of the run-queue latency in nanoseconds.
pub const MAP_RUNQ_HIST: &str = "SCHED_RUNQ_HIST";
/// Hash map: task pointer -> time it became runnable (ns, `bpf_ktime_get_ns`).
pub const MAP_RUNQ_START: &str = "SCHED_RUNQ_START";

/// Switches where the previous task gave up the CPU (it blocked).
pub const SLOT_VOLUNTARY: u32 = 0;
/// Switches where the previous task was still runnable (preempted).
pub const SLOT_INVOLUNTARY: u32 = 1;
/// Enqueue timestamps that could not be stored because `SCHED_RUNQ_START` was
/// full: those wake-ups are missing from the run-queue histogram.
pub const SLOT_RUNQ_START_FULL: u32 = 2;
/// Sum of every run-queue latency recorded in `SCHED_RUNQ_HIST`, in ns: the
/// histogram's exact sum.
pub const SLOT_RUNQ_SUM_NS: u32 = 3;
/// Number of slots in `SCHED_COUNTERS`.
pub const COUNTER_SLOTS: u32 = 4;

/// Bound of `SCHED_RUNQ_START`. The key is a task pointer, which is not a small
/// integer, hence a hash map. It holds only tasks that are runnable and not yet
/// running, which is bounded by the run-queue lengths: 16384 is far above what
/// a healthy host has at once. Failed inserts are counted in
/// [`SLOT_RUNQ_START_FULL`].
pub const RUNQ_START_ENTRIES: u32 = 16384;
