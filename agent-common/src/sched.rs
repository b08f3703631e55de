//! Scheduler family: context switches and run-queue latency.

use crate::contract::{GlobalSpec, MapSpec};

/// Per-CPU array of `u64` counters, indexed by the `SLOT_*` constants.
pub const MAP_COUNTERS: &str = "SCHED_COUNTERS";
/// Per-CPU array of `u64` bucket counts, indexed by [`crate::exp::slot`]
/// of the run-queue latency in nanoseconds.
pub const MAP_RUNQ_HIST: &str = "SCHED_RUNQ_HIST";
/// Hash map: task pointer -> time it became runnable (ns, `bpf_ktime_get_ns`).
/// Used only where the kernel keeps no `sched_info` stamps (see [`SchedOffsets`]).
pub const MAP_RUNQ_START: &str = "SCHED_RUNQ_START";
/// Per-CPU array of one [`Arrival`]: the task that last arrived on this CPU.
pub const MAP_ARRIVAL: &str = "SCHED_ARRIVAL";
/// Per-CPU array of [`CGROUP_FRONT_SLOTS`] [`CgroupFront`]: the per-cgroup
/// run-queue latency histograms (`probes.sched.runqueue_per_cgroup`), one
/// slot per cgroup, direct-mapped by [`cgroup_hash`]. A cgroup whose slot
/// on this CPU holds another live cgroup goes to [`MAP_CGROUP_RUNQ`].
pub const MAP_CGROUP_FRONT: &str = "SCHED_CGROUP_FRONT";
/// Per-CPU hash: [`CgroupSlot`] -> [`CgroupWait`], the sparse per-cgroup
/// histograms of cgroups that collided in [`MAP_CGROUP_FRONT`]. One entry
/// in the object; the loader sizes it from `probes.sched.max_cgroup_buckets`.
pub const MAP_CGROUP_RUNQ: &str = "SCHED_CGROUP_RUNQ";
/// Hash: cgroup id -> 0, written by userspace: removed cgroups whose
/// [`MAP_CGROUP_FRONT`] slots it has read for the last time. A program
/// finding such a cgroup in the slot its own cgroup maps to takes the slot
/// over.
pub const MAP_CGROUP_GONE: &str = "SCHED_CGROUP_GONE";
/// Per-CPU array of `u64` counts by [`cgroup_bucket`]: the waits of cgroups
/// that fit neither [`MAP_CGROUP_FRONT`] nor [`MAP_CGROUP_RUNQ`], folded into
/// one histogram (their sum is in
/// [`SLOT_CGROUP_OVF_SUM_NS`]).
pub const MAP_CGROUP_OVF: &str = "SCHED_CGROUP_OVF";
/// Global (`.rodata`) holding [`SchedOffsets`].
pub const GLOBAL_OFFSETS: &str = "SCHED_OFFSETS";
/// Global (`.rodata`) holding [`TpOffsets`].
pub const GLOBAL_TP_OFFSETS: &str = "SCHED_TP_OFFSETS";

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
/// Switches out of the idle task (pid 0). Idle is always runnable, so it
/// would read as "preempted"; counted apart so that involuntary switches are
/// preemptions of real tasks (the tasks' own `nivcsw`) and the three types
/// still sum to `/proc/stat` `ctxt`.
pub const SLOT_IDLE: u32 = 4;
/// Waits that did not fit [`MAP_CGROUP_RUNQ`] (map full): they went to
/// [`MAP_CGROUP_OVF`] instead of their cgroup's histogram.
pub const SLOT_CGROUP_FULL: u32 = 5;
/// Sum of the waits in [`MAP_CGROUP_OVF`], ns.
pub const SLOT_CGROUP_OVF_SUM_NS: u32 = 6;
/// Number of slots in `SCHED_COUNTERS`.
pub const COUNTER_SLOTS: u32 = 7;

/// Default bound of [`MAP_CGROUP_RUNQ`] (`probes.sched.max_cgroup_buckets`):
/// one entry per (cgroup, occupied bucket), for cgroups that collided in
/// [`MAP_CGROUP_FRONT`].
pub const CGROUP_RUNQ_DEFAULT_ENTRIES: u32 = 4096;
/// Slots of [`MAP_CGROUP_FRONT`] per CPU (a power of two): 672 bytes each,
/// 172 KiB per CPU.
pub const CGROUP_FRONT_SLOTS: u32 = 256;
/// Bound of [`MAP_CGROUP_GONE`]: removed cgroups still holding a front slot
/// on some CPU.
pub const CGROUP_GONE_ENTRIES: u32 = 4096;
/// Scale of the per-cgroup histograms: 2 buckets per power of two (the host
/// histogram has [`crate::exp::SCALE`]), so that a cgroup's slot holds its
/// whole range in [`CGROUP_BUCKETS`] counts.
pub const CGROUP_SCALE: i32 = 1;
/// Counts per cgroup: zeros, the 80 scale-1 buckets of 1 ns to 2^40 ns, and
/// (folded into the top one) the overflow.
pub const CGROUP_BUCKETS: usize = 82;

/// The per-cgroup bucket of a wait whose host bucket is `slot`
/// ([`crate::exp::slot`]): scale 3 to scale 1 is a shift of the index.
#[inline(always)]
pub const fn cgroup_bucket(slot: u32) -> u32 {
    if slot == crate::exp::ZERO_SLOT {
        0
    } else {
        ((slot - 1) >> 2) + 1
    }
}

/// The OpenTelemetry bucket index (at [`CGROUP_SCALE`]) of per-cgroup bucket
/// `b` (1..): the inverse of [`cgroup_bucket`].
pub const fn cgroup_bucket_index(b: u32) -> i32 {
    b as i32 - 1 + crate::exp::MIN_INDEX / 4
}

/// The [`MAP_CGROUP_FRONT`] slot of cgroup `id` (ids are sequential inode
/// numbers: MurmurHash3's 64-bit finalizer spreads them).
#[inline(always)]
pub const fn cgroup_front_slot(id: u64) -> u32 {
    (crate::fmix64(id) as u32) & (CGROUP_FRONT_SLOTS - 1)
}

/// Value of [`MAP_CGROUP_FRONT`] (per CPU): cgroup `id`'s waits on this CPU.
/// `id` 0: never used. The program that takes a slot over zeroes the counts
/// before it writes `id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupFront {
    pub id: u64,
    /// Sum of the waits, ns.
    pub sum_ns: u64,
    /// Waits by [`cgroup_bucket`].
    pub counts: [u64; CGROUP_BUCKETS],
}
const _: () = assert!(core::mem::size_of::<CgroupFront>() == 672);

/// Key of [`MAP_CGROUP_RUNQ`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupSlot {
    /// The waiting task's cgroup v2 id (`bpf_get_current_cgroup_id`, the
    /// inode number of its directory in the cgroup2 mount).
    pub cgroup: u64,
    /// [`cgroup_bucket`] of the wait.
    pub slot: u32,
    /// Explicit padding.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CgroupSlot>() == 16);

/// Value of [`MAP_CGROUP_RUNQ`] (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupWait {
    /// Waits in this bucket.
    pub count: u64,
    /// Their sum, ns: the cgroup's histogram sum is the sum over its buckets.
    pub sum_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CgroupWait>() == 16);

/// Bound of `SCHED_RUNQ_START`. The key is a task pointer, which is not a small
/// integer, hence a hash map. A task keeps its slot from its first wait until
/// it exits (a slot is reset in place, not deleted, so that the hot path never
/// allocates), so the map holds about one entry per live task that has
/// waited: 16384 is far above the task count of most hosts. Failed inserts
/// are counted in [`SLOT_RUNQ_START_FULL`]; the collector publishes the
/// entries next to this capacity (`perch.bpf.map.entries`).
pub const RUNQ_START_ENTRIES: u32 = 16384;

/// Every map of the family's kernel side ([`crate::contract`]).
pub const MAPS: &[MapSpec] = &[
    MapSpec::per_cpu_array::<u64>(MAP_COUNTERS, COUNTER_SLOTS),
    MapSpec::per_cpu_array::<u64>(MAP_RUNQ_HIST, crate::exp::SLOTS),
    // Keyed by `task_struct` pointer (`tp_btf`, `raw_tp`) or pid (classic
    // tracepoint), both as `u64`.
    MapSpec::hash::<u64, u64>(MAP_RUNQ_START, RUNQ_START_ENTRIES),
    MapSpec::per_cpu_array::<Arrival>(MAP_ARRIVAL, 1),
    // One entry in the object; the loader sizes it (see the map's doc).
    MapSpec::per_cpu_hash::<CgroupSlot, CgroupWait>(MAP_CGROUP_RUNQ, 1),
    MapSpec::per_cpu_array::<u64>(MAP_CGROUP_OVF, CGROUP_BUCKETS as u32),
    MapSpec::per_cpu_array::<CgroupFront>(MAP_CGROUP_FRONT, CGROUP_FRONT_SLOTS),
    MapSpec::hash::<u64, u8>(MAP_CGROUP_GONE, CGROUP_GONE_ENTRIES),
];

/// Every global of the family's kernel side that userspace overrides.
pub const GLOBALS: &[GlobalSpec] = &[
    GlobalSpec::of::<SchedOffsets>(GLOBAL_OFFSETS),
    GlobalSpec::of::<TpOffsets>(GLOBAL_TP_OFFSETS),
];

/// Where `sched_switch` finds the kernel's own run-queue stamps, from the
/// running kernel's BTF. With `CONFIG_SCHED_INFO` (selected by
/// `TASK_DELAY_ACCT` or `SCHEDSTATS`), `task_struct.sched_info` holds
/// `last_queued` (run-queue clock when the task was enqueued, 0 when it is
/// not waiting) and `last_arrival` (run-queue clock when it last got a CPU).
/// The kernel updates both in `sched_info_switch()`, right after the
/// `sched_switch` tracepoint. When `valid` is 0 the programs time wake-ups
/// themselves (`sched_wakeup`, a clock read and a hash per task). Also where
/// the previous task's state is, on kernels whose tracepoint lacks it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedOffsets {
    /// Non-zero once userspace filled the offsets in.
    pub valid: u32,
    /// `task_struct.sched_info.last_queued` (`unsigned long long`).
    pub last_queued: u32,
    /// `task_struct.sched_info.last_arrival` (`unsigned long long`).
    pub last_arrival: u32,
    /// Where the switch finds the previous task's state. Before 5.18
    /// `sched_switch` has no `prev_state` argument: then this is the byte
    /// offset of `task_struct.__state` (5.14+) or `task_struct.state`, and
    /// [`Self::task_state_size`] its size. Found in BTF; used with or
    /// without the stamps.
    pub task_state: u32,
    /// 0: `prev_state` is `sched_switch`'s fourth argument (5.18+). 4 or 8:
    /// read [`Self::task_state`] from the task, a field of that many bytes.
    pub task_state_size: u32,
    /// Non-zero: also record each wait per cgroup ([`MAP_CGROUP_FRONT`]).
    pub per_cgroup: u32,
    /// Where `tp_btf` finds a task's cgroup v2 id with four BTF-checked
    /// loads instead of a helper call: `task_struct.cgroups`,
    /// `css_set.dfl_cgrp`, `cgroup.kn`, `kernfs_node.id` (what
    /// `bpf_get_current_cgroup_id` reads). `task_cgroups` 0: use the helper.
    pub task_cgroups: u32,
    pub css_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
}
const _: () = assert!(core::mem::size_of::<SchedOffsets>() == 40);

/// Value of [`MAP_ARRIVAL`]: the task `sched_switch` last switched in on this
/// CPU and its `last_queued` at that moment. At the next switch on the same
/// CPU that task is `prev` (a running task cannot migrate), and its
/// `last_arrival`, stamped by the kernel in between, minus `queued` is the
/// wait the kernel itself added to its `run_delay`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Arrival {
    /// `task_struct` pointer.
    pub task: u64,
    /// Its `sched_info.last_queued` when it was switched in (0: it had not
    /// been waiting on a run queue).
    pub queued: u64,
    /// With the wake-up clock and per-cgroup waits: the wait `task` had
    /// just ended when it was switched in, ns, plus one, recorded in its
    /// cgroup when it leaves the CPU (`current` is then that task). 0: none.
    pub pending: u64,
}
const _: () = assert!(core::mem::size_of::<Arrival>() == 24);

/// Byte offsets into the classic `sched:sched_switch` and
/// `sched:sched_wakeup[_new]` records, read at start-up from tracefs
/// (`events/sched/<name>/format`) and handed to the tracepoint variant as a
/// read-only global: the record layout is the kernel's own description,
/// never a constant compiled in. Zero means unknown: the variant is tried
/// only when every offset was found.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TpOffsets {
    /// `sched_switch` `prev_pid` (pid_t).
    pub switch_prev_pid: u32,
    /// `sched_switch` `prev_state` (long; the report state, with the
    /// preempted case encoded above the low byte).
    pub switch_prev_state: u32,
    /// `sched_switch` `next_pid` (pid_t).
    pub switch_next_pid: u32,
    /// `sched_wakeup` and `sched_wakeup_new` `pid` (pid_t).
    pub wakeup_pid: u32,
}
const _: () = assert!(core::mem::size_of::<TpOffsets>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), only integer fields, no implicit padding.
    unsafe impl aya::Pod for super::SchedOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TpOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CgroupSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CgroupWait {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CgroupFront {}
}
