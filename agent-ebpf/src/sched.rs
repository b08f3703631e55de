//! Scheduler family: context switches (voluntary / involuntary) and run-queue
//! latency.
//!
//! - Hooks: `sched_switch`, `sched_wakeup`, `sched_wakeup_new`, each as
//!   `tp_btf` (preferred, 5.5+), `raw_tp` (4.17+) or a classic tracepoint
//!   (through tracefs, 4.7+). `tp_btf` and `raw_tp` share one body: their
//!   context is the tracepoint's `TP_PROTO` arguments, and tasks are keyed
//!   by their `task_struct` pointer. The classic tracepoint reads the
//!   record's `prev_pid`, `prev_state` and `next_pid` at offsets taken from
//!   tracefs at start-up and keys tasks by pid; it serves kernels before
//!   5.18, where the other two variants are refused.
//! - `sched_switch` reads its 4th argument, `prev_state`, which was appended
//!   in 5.18 (commit fa2c3254d7cf, "sched/tracing: Don't re-read p->state when
//!   emitting sched_switch event"). On older kernels the verifier rejects the
//!   access and the family falls back to `/proc/stat`.
//! - Maps: `SCHED_COUNTERS`, `SCHED_RUNQ_HIST`, `SCHED_ARRIVAL`,
//!   `SCHED_CGROUP_OVF` (per-CPU arrays), `SCHED_RUNQ_START` (bounded hash,
//!   wake-up clock only); per cgroup, `SCHED_CGROUP_FRONT` (per-CPU array,
//!   direct-mapped by cgroup id), `SCHED_CGROUP_RUNQ` (bounded per-CPU hash,
//!   for cgroups that collide there), `SCHED_CGROUP_GONE` (hash, written by
//!   userspace: removed cgroups).
//! - Metrics: `perch.cpu.context_switches`, `perch.scheduler.runqueue.latency`,
//!   `perch.container.runqueue.latency`.
//! - Fallback: `/proc/stat` `ctxt` (no voluntary/involuntary split, no latency).
//! - Oldest kernel: 5.18 (`tp_btf`, `raw_tp`), 4.7 with tracefs mounted
//!   (tracepoint).
//!
//! A switch is involuntary when the previous task was preempted or was still
//! `TASK_RUNNING`: the same rule `__schedule()` uses to pick `nivcsw` over
//! `nvcsw`, so the split matches `/proc/<pid>/status`.
//!
//! Run-queue latency is the time from a task becoming runnable (woken, or
//! preempted while runnable) to it running. The agent's own threads are
//! counted like any other task. It is measured one of two ways:
//!
//! - **Kernel stamps** (`tp_btf`/`raw_tp` where `task_struct.sched_info`
//!   exists, i.e. `CONFIG_SCHED_INFO`, which `TASK_DELAY_ACCT` selects on
//!   every major distribution kernel). The scheduler stamps
//!   `sched_info.last_queued` when a task is enqueued and, right after the
//!   `sched_switch` tracepoint, `sched_info.last_arrival` when it gets the
//!   CPU. `sched_switch` remembers in a per-CPU slot which task it switched
//!   in and its `last_queued`; at the next switch on that CPU the task is
//!   `prev`, and `last_arrival - last_queued` is exactly the wait the kernel
//!   adds to the task's `run_delay` (`/proc/<pid>/schedstat`). No clock
//!   read, no hash, no `sched_wakeup` program. A wait is recorded when the
//!   task it delayed leaves the CPU. A queued task that the load balancer
//!   moves to another CPU is counted from its enqueue on the CPU it ran on.
//! - **Wake-up clock** (the classic tracepoint, kernels without
//!   `sched_info`, or `probes.sched.runqueue_clock = "wakeup"`):
//!   `sched_wakeup`/`sched_wakeup_new` stamp `bpf_ktime_get_ns()` into a
//!   hash keyed by task, `sched_switch` looks `next` up.
//!
//! With `SchedOffsets::per_cgroup` each wait also goes to the waiting
//! task's cgroup, read while that task is `current` (at its switch-out;
//! the wake-up clock holds the wait in `SCHED_ARRIVAL` until then): through
//! BTF (`task->cgroups->dfl_cgrp->kn->id`) with `tp_btf`, else with
//! `bpf_get_current_cgroup_id` (4.18+). It goes to its slot of
//! `SCHED_CGROUP_FRONT`, or where another
//! live cgroup holds that slot on this CPU, in `SCHED_CGROUP_RUNQ` keyed by
//! (cgroup, bucket).

use agent_common::{
    exp,
    sched::{self as c, Arrival, CgroupFront, CgroupSlot, CgroupWait, SchedOffsets, TpOffsets},
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};

use crate::{
    kmem::{field, read},
    tracepoint::tp_offset,
};

/// Filled in by userspace from kernel BTF (`.rodata`: the verifier sees
/// constants and prunes the design this kernel does not use).
#[unsafe(no_mangle)]
static SCHED_OFFSETS: SchedOffsets = SchedOffsets {
    valid: 0,
    last_queued: 0,
    last_arrival: 0,
    task_state: 0,
    task_state_size: 0,
    per_cgroup: 0,
    task_cgroups: 0,
    css_dfl_cgrp: 0,
    cgroup_kn: 0,
    kn_id: 0,
};

/// Classic tracepoint record offsets, from tracefs (see `tracepoint.rs`).
#[unsafe(no_mangle)]
static SCHED_TP_OFFSETS: TpOffsets = TpOffsets {
    switch_prev_pid: 0,
    switch_prev_state: 0,
    switch_next_pid: 0,
    wakeup_pid: 0,
};

/// One field of [`SCHED_OFFSETS`], read so the compiler cannot fold the
/// all-zero initializer.
macro_rules! off {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&SCHED_OFFSETS.$field) }
    };
}

#[map]
static SCHED_ARRIVAL: PerCpuArray<Arrival> = PerCpuArray::with_max_entries(1, 0);

#[map]
static SCHED_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(c::COUNTER_SLOTS, 0);

#[map]
static SCHED_RUNQ_HIST: PerCpuArray<u64> = PerCpuArray::with_max_entries(exp::SLOTS, 0);

#[map]
static SCHED_RUNQ_START: HashMap<u64, u64> = HashMap::with_max_entries(c::RUNQ_START_ENTRIES, 0);

/// One entry in the object: the loader sizes it when per-cgroup waits are on.
#[map]
static SCHED_CGROUP_RUNQ: PerCpuHashMap<CgroupSlot, CgroupWait> =
    PerCpuHashMap::with_max_entries(1, 0);

#[map]
static SCHED_CGROUP_OVF: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(c::CGROUP_BUCKETS as u32, 0);

#[map]
static SCHED_CGROUP_FRONT: PerCpuArray<CgroupFront> =
    PerCpuArray::with_max_entries(c::CGROUP_FRONT_SLOTS, 0);

#[map]
static SCHED_CGROUP_GONE: HashMap<u64, u8> = HashMap::with_max_entries(c::CGROUP_GONE_ENTRIES, 0);

/// `TASK_RUNNING` in `include/linux/sched.h`.
const TASK_RUNNING: u64 = 0;
/// `TASK_DEAD` in `include/linux/sched.h` (0x80 since 4.14).
const TASK_DEAD: u64 = 0x80;

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, slot: u32) {
    if let Some(p) = map.get_ptr_mut(slot) {
        // Per-CPU slot: only this CPU writes it, with preemption disabled.
        unsafe { *p += 1 };
    }
}

/// Records that `task` became runnable at `now`. A task seen before keeps
/// its slot and is updated in place (no hash update, which would allocate);
/// only a task's first wake-up inserts.
#[inline(always)]
fn mark_runnable(task: u64, now: u64) {
    if let Some(p) = SCHED_RUNQ_START.get_ptr_mut(task) {
        unsafe { *p = now };
    } else if SCHED_RUNQ_START.insert(task, now, 0).is_err() {
        bump(&SCHED_COUNTERS, c::SLOT_RUNQ_START_FULL);
    }
}

/// `sched_switch(bool preempt, struct task_struct *prev,
///               struct task_struct *next, unsigned int prev_state)`
///
/// With the kernel's stamps, see [`account_switch_stamped`]. With the
/// wake-up clock, per switch: one counter bump and one hash lookup (for
/// `next`), plus an in-place write for a preempted `prev`. A start left behind by a wake-up
/// that found its task still running is harmless: the task's next wake-up
/// overwrites it before it can be switched in. Slots are freed when their
/// task exits (`prev_state` has `TASK_DEAD`).
#[inline(always)]
fn on_switch<const BTF: bool>(preempt: u64, prev: u64, next: u64, prev_state: u64) -> u32 {
    let prev_state = prev_state & 0xffff_ffff;
    let involuntary = (preempt & 0xff) != 0 || prev_state == TASK_RUNNING;
    // The idle task (pid 0; `current` is still `prev` here) is always
    // "runnable" but never queued: it is neither preempted (its switches
    // are counted as their own type) nor timed (that would count busy time
    // as latency). Asked only when it matters.
    let idle = involuntary && bpf_get_current_pid_tgid() as u32 == 0;
    if off!(valid) != 0 {
        return account_switch_stamped::<BTF>(involuntary, idle, prev, next);
    }
    account_switch(involuntary, idle, prev_state & TASK_DEAD != 0, prev, next)
}

/// The switch with the kernel's own stamps: count it; if `prev` is the task
/// this CPU last switched in after a wait, record that wait (its
/// `last_arrival`, stamped after the previous switch, minus the
/// `last_queued` seen then); remember `next` and its `last_queued`.
///
/// Per switch: two per-CPU array bumps and one or two field loads. Only
/// this CPU touches its slot, with preemption disabled.
#[inline(always)]
fn account_switch_stamped<const BTF: bool>(
    involuntary: bool,
    idle: bool,
    prev: u64,
    next: u64,
) -> u32 {
    bump(&SCHED_COUNTERS, switch_slot(involuntary, idle));
    let Some(cur) = SCHED_ARRIVAL.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's value slot, valid for this program run.
    let cur = unsafe { &mut *cur };
    if cur.task == prev && cur.queued != 0 {
        if let Some(arrived) = field::<u64, BTF>(prev, off!(last_arrival)) {
            if arrived >= cur.queued {
                let wait = arrived - cur.queued;
                let slot = record_wait(wait);
                if off!(per_cgroup) != 0 {
                    // `current` is still `prev`, the task that waited.
                    record_cgroup_wait(cgroup_of::<BTF>(prev), wait, slot);
                }
            }
        }
    }
    cur.task = next;
    cur.queued = field::<u64, BTF>(next, off!(last_queued)).unwrap_or(0);
    0
}

/// Adds a wait (host bucket `slot`) of the current task, of cgroup `id`,
/// to that cgroup's histogram. Per wait: one per-CPU array slot (the
/// cgroup's by hash); only a cgroup whose slot holds another live cgroup on
/// this CPU pays a per-CPU hash lookup. What fits neither goes to
/// `SCHED_CGROUP_OVF`, counted.
#[inline(always)]
fn record_cgroup_wait(id: u64, wait: u64, slot: u32) {
    let b = c::cgroup_bucket(slot);
    if let Some(p) = SCHED_CGROUP_FRONT.get_ptr_mut(c::cgroup_front_slot(id)) {
        // SAFETY: this CPU's value slot, valid for this program run.
        let f = unsafe { &mut *p };
        if f.id != id && (f.id == 0 || take_over(f.id)) {
            claim(f, id);
        }
        if f.id == id {
            if let Some(n) = f.counts.get_mut(b as usize) {
                *n += 1;
            }
            f.sum_ns += wait;
            return;
        }
    }
    record_cgroup_collision(id, b, wait);
}

/// The cgroup v2 id of `task`, the current task: with `tp_btf` four
/// BTF-checked loads (`task->cgroups->dfl_cgrp->kn->id`, what the helper
/// reads; a helper call costs as much as the rest of the program on a KVM
/// guest), else `bpf_get_current_cgroup_id`.
#[inline(always)]
fn cgroup_of<const BTF: bool>(task: u64) -> u64 {
    if !BTF || off!(task_cgroups) == 0 {
        return unsafe { bpf_get_current_cgroup_id() };
    }
    let id = field::<u64, true>(task, off!(task_cgroups))
        .and_then(|cset| field::<u64, true>(cset, off!(css_dfl_cgrp)))
        .and_then(|cgrp| field::<u64, true>(cgrp, off!(cgroup_kn)))
        .and_then(|kn| field::<u64, true>(kn, off!(kn_id)));
    id.unwrap_or(0)
}

/// Whether the front slot's cgroup `other` is gone and read for the last
/// time (userspace listed it): asked only when two cgroups meet in a slot.
#[inline(always)]
fn take_over(other: u64) -> bool {
    // SAFETY: a lookup; the value is not read.
    unsafe { SCHED_CGROUP_GONE.get(other) }.is_some()
}

/// Makes `f` cgroup `id`'s slot on this CPU: counts zeroed first, `id`
/// last, so that a reader never sees `id` with the counts of another.
#[inline(always)]
fn claim(f: &mut CgroupFront, id: u64) {
    let mut i = 0;
    while i < c::CGROUP_BUCKETS {
        f.counts[i] = 0;
        i += 1;
    }
    f.sum_ns = 0;
    unsafe { core::ptr::write_volatile(&mut f.id, id) };
}

/// A wait of a cgroup that lost its front slot to another: the sparse
/// per-CPU hash, else the overflow histogram.
#[inline(always)]
fn record_cgroup_collision(id: u64, b: u32, wait: u64) {
    let key = CgroupSlot {
        cgroup: id,
        slot: b,
        _pad: 0,
    };
    if let Some(p) = SCHED_CGROUP_RUNQ.get_ptr_mut(key) {
        // SAFETY: this CPU's value slot, valid for this program run.
        let v = unsafe { &mut *p };
        v.count += 1;
        v.sum_ns += wait;
        return;
    }
    let first = CgroupWait {
        count: 1,
        sum_ns: wait,
    };
    if SCHED_CGROUP_RUNQ
        .insert(key, first, BPF_NOEXIST as u64)
        .is_err()
    {
        bump(&SCHED_COUNTERS, c::SLOT_CGROUP_FULL);
        bump(&SCHED_CGROUP_OVF, b);
        if let Some(sum) = SCHED_COUNTERS.get_ptr_mut(c::SLOT_CGROUP_OVF_SUM_NS) {
            unsafe { *sum += wait };
        }
    }
}

/// The `SCHED_COUNTERS` slot of a switch.
#[inline(always)]
fn switch_slot(involuntary: bool, idle: bool) -> u32 {
    if idle {
        c::SLOT_IDLE
    } else if involuntary {
        c::SLOT_INVOLUNTARY
    } else {
        c::SLOT_VOLUNTARY
    }
}

/// Records a wait in the host histogram; returns its bucket.
#[inline(always)]
fn record_wait(latency: u64) -> u32 {
    let slot = crate::histogram::slot(latency);
    bump(&SCHED_RUNQ_HIST, slot);
    if let Some(sum) = SCHED_COUNTERS.get_ptr_mut(c::SLOT_RUNQ_SUM_NS) {
        unsafe { *sum += latency };
    }
    slot
}

/// The switch itself, whatever identifies a task (`task_struct` pointer or
/// pid): count it, start the run-queue clock of a preempted `prev`, free
/// the slot of an exiting one, and time `next`'s wait.
#[inline(always)]
fn account_switch(involuntary: bool, idle_prev: bool, dead: bool, prev: u64, next: u64) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    bump(&SCHED_COUNTERS, switch_slot(involuntary, idle_prev));
    if involuntary {
        // Still runnable: it waits on the run queue from now.
        if !idle_prev {
            mark_runnable(prev, now);
        }
    } else if dead {
        let _ = SCHED_RUNQ_START.remove(prev);
    }
    let (mut waited, mut wait) = (false, 0);
    if let Some(p) = SCHED_RUNQ_START.get_ptr_mut(next) {
        // SAFETY: a value slot of this map, valid for this program run.
        let start = unsafe { *p };
        if start != 0 {
            unsafe { *p = 0 };
            if now >= start {
                (waited, wait) = (true, now - start);
                let _ = record_wait(wait);
            }
        }
    }
    if off!(per_cgroup) != 0 {
        defer_cgroup_wait(prev, next, waited, wait);
    }
    0
}

/// The wake-up clock learns a wait when its task is switched in, while
/// `current` is still the previous task: the wait waits in this CPU's
/// `SCHED_ARRIVAL` slot and goes to the task's cgroup when the task leaves
/// the CPU (a running task cannot migrate), with `current` the task.
#[inline(always)]
fn defer_cgroup_wait(prev: u64, next: u64, started: bool, wait: u64) {
    let Some(cur) = SCHED_ARRIVAL.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's value slot, valid for this program run.
    let cur = unsafe { &mut *cur };
    if cur.task == prev && cur.pending != 0 {
        let id = unsafe { bpf_get_current_cgroup_id() };
        let wait = cur.pending - 1;
        record_cgroup_wait(id, wait, crate::histogram::slot(wait));
    }
    cur.task = next;
    // Plus one: a wait of 0 ns is a wait too (the host histogram's zeros).
    cur.pending = if started { wait + 1 } else { 0 };
}

/// The previous task's state: the tracepoint's fourth argument (5.18+),
/// or, where `sched_switch` has only three (before 5.18), the task's own
/// `__state`/`state` field, as the kernel's classic tracepoint read it then.
/// The choice is a `.rodata` constant: the verifier explores one branch
/// only, so a kernel with three arguments never sees the fourth read.
#[inline(always)]
fn prev_state<const BTF: bool>(arg3: impl FnOnce() -> u64, prev: u64) -> u64 {
    match off!(task_state_size) {
        0 => arg3(),
        4 => field::<u32, BTF>(prev, off!(task_state)).unwrap_or(0) as u64,
        // `volatile long state` (before 5.14): its low 32 bits hold the
        // flags (little-endian), read through the helper at any size.
        _ => read::<u32>(prev, off!(task_state)).unwrap_or(0) as u64,
    }
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_btf(ctx: BtfTracePointContext) -> u32 {
    let prev: u64 = ctx.arg(1);
    let state = prev_state::<true>(|| ctx.arg(3), prev);
    on_switch::<true>(ctx.arg(0), prev, ctx.arg(2), state)
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch_raw(ctx: RawTracePointContext) -> u32 {
    let prev: u64 = ctx.arg(1);
    let state = prev_state::<false>(|| ctx.arg(3), prev);
    on_switch::<false>(ctx.arg(0), prev, ctx.arg(2), state)
}

#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup_btf(ctx: BtfTracePointContext) -> u32 {
    mark_runnable(ctx.arg(0), unsafe { bpf_ktime_get_ns() });
    0
}

#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn sched_wakeup_raw(ctx: RawTracePointContext) -> u32 {
    mark_runnable(ctx.arg(0), unsafe { bpf_ktime_get_ns() });
    0
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new_btf(ctx: BtfTracePointContext) -> u32 {
    mark_runnable(ctx.arg(0), unsafe { bpf_ktime_get_ns() });
    0
}

#[raw_tracepoint(tracepoint = "sched_wakeup_new")]
pub fn sched_wakeup_new_raw(ctx: RawTracePointContext) -> u32 {
    mark_runnable(ctx.arg(0), unsafe { bpf_ktime_get_ns() });
    0
}

/// Classic `sched:sched_switch`. Its `prev_state` is the report state:
/// 0 for running, sleeping states in the low byte (interruptible 0x1 ...
/// idle 0x80), and preemption encoded above it (`TASK_REPORT_MAX`, 0x100
/// since 4.14; `TASK_STATE_MAX` before). So the switch is involuntary when
/// the low byte is 0, the rule the other variants apply to the raw state.
/// Exiting tasks report `EXIT_DEAD`/`EXIT_ZOMBIE` (0x10/0x20; `TASK_DEAD`
/// 0x40 before 4.14).
#[tracepoint(category = "sched", name = "sched_switch")]
pub fn sched_switch_tp(ctx: TracePointContext) -> u32 {
    let (o_prev, o_next, o_state) = (
        tp_offset!(SCHED_TP_OFFSETS, switch_prev_pid),
        tp_offset!(SCHED_TP_OFFSETS, switch_next_pid),
        tp_offset!(SCHED_TP_OFFSETS, switch_prev_state),
    );
    // SAFETY: offsets come from this kernel's own format file, and
    // read_at goes through bpf_probe_read (a bad offset reads an error).
    let prev_pid = unsafe { ctx.read_at::<i32>(o_prev) }.unwrap_or(-1);
    let next_pid = unsafe { ctx.read_at::<i32>(o_next) }.unwrap_or(-1);
    let state = unsafe { ctx.read_at::<i64>(o_state) }.unwrap_or(0) as u64;
    if prev_pid < 0 || next_pid < 0 {
        return 0;
    }
    let involuntary = state & 0xff == 0;
    let dead = state & 0x70 != 0;
    account_switch(
        involuntary,
        prev_pid == 0,
        dead,
        prev_pid as u64,
        next_pid as u64,
    )
}

#[inline(always)]
fn on_wakeup_tp(ctx: &TracePointContext) -> u32 {
    let offset = tp_offset!(SCHED_TP_OFFSETS, wakeup_pid);
    // SAFETY: offset from this kernel's own format file.
    if let Ok(pid) = unsafe { ctx.read_at::<i32>(offset) } {
        if pid > 0 {
            mark_runnable(pid as u64, unsafe { bpf_ktime_get_ns() });
        }
    }
    0
}

#[tracepoint(category = "sched", name = "sched_wakeup")]
pub fn sched_wakeup_tp(ctx: TracePointContext) -> u32 {
    on_wakeup_tp(&ctx)
}

#[tracepoint(category = "sched", name = "sched_wakeup_new")]
pub fn sched_wakeup_new_tp(ctx: TracePointContext) -> u32 {
    on_wakeup_tp(&ctx)
}
