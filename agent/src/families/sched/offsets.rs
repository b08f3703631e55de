//! Where `sched_switch` reads the kernel's run-queue stamps, from BTF.

use crate::sources::btf::{BtfError, KernelBtf};

/// Where `sched_switch` reads the kernel's run-queue stamps:
/// `task_struct.sched_info.{last_queued,last_arrival}`, which exist with
/// `CONFIG_SCHED_INFO`. An error names what is missing; the programs then
/// time wake-ups themselves.
pub fn sched_offsets(btf: &KernelBtf) -> Result<agent_common::sched::SchedOffsets, BtfError> {
    Ok(agent_common::sched::SchedOffsets {
        valid: 1,
        last_queued: btf.member_sized("task_struct", "sched_info.last_queued", 8)?,
        last_arrival: btf.member_sized("task_struct", "sched_info.last_arrival", 8)?,
        ..Default::default()
    })
}

/// Where `tp_btf` reads a task's cgroup v2 id ([`SchedOffsets::task_cgroups`]
/// and the three after it), or an error naming what is missing (the program
/// then calls `bpf_get_current_cgroup_id`).
///
/// [`SchedOffsets::task_cgroups`]: agent_common::sched::SchedOffsets::task_cgroups
pub fn cgroup_id_path(btf: &KernelBtf) -> Result<[u32; 4], BtfError> {
    Ok([
        btf.member_sized("task_struct", "cgroups", 8)?,
        btf.member_sized("css_set", "dfl_cgrp", 8)?,
        btf.member_sized("cgroup", "kn", 8)?,
        btf.member_sized("kernfs_node", "id", 8)?,
    ])
}

/// Where `sched_switch` finds the previous task's state, as
/// ([`SchedOffsets::task_state`], [`SchedOffsets::task_state_size`]):
/// `(0, 0)` where the tracepoint passes `prev_state` (a fourth argument,
/// 5.18+), else the offset and size of `task_struct.__state` (5.14+,
/// `unsigned int`) or `task_struct.state` (`long`).
///
/// [`SchedOffsets::task_state`]: agent_common::sched::SchedOffsets::task_state
/// [`SchedOffsets::task_state_size`]: agent_common::sched::SchedOffsets::task_state_size
///
/// With `from_task` (`probes.sched.prev_state = "task_struct"`) the state is
/// read from the task even where the argument exists: how the pre-5.18 path
/// is tested and measured on a newer kernel.
pub fn task_state(btf: &KernelBtf, from_task: bool) -> Result<(u32, u32), BtfError> {
    // A BTF without the tracepoint's typedef says nothing: assume the
    // argument, and let the kernel's verdict on the load tell.
    if !from_task && !btf.tracepoint_args("sched_switch").is_ok_and(|n| n < 4) {
        return Ok((0, 0));
    }
    let f = btf
        .member("task_struct", "__state")
        .or_else(|_| btf.member("task_struct", "state"))?;
    match f.size {
        4 | 8 => Ok((f.offset, f.size)),
        got => Err(BtfError::Size {
            source_name: "task_struct".to_owned(),
            ty: "task_struct".to_owned(),
            member: "__state".to_owned(),
            got,
            want: 4,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::btf::testutil::Builder;
    use crate::sources::btf::KIND_STRUCT;

    /// `task_struct` as `CONFIG_SCHED_INFO` lays it out (or without it).
    fn task_btf(sched_info: bool) -> KernelBtf {
        let mut b = Builder::new();
        let u64_ = b.int("unsigned long long", 8);
        let long = b.int("long", 8);
        let info = b.composite(
            KIND_STRUCT,
            "sched_info",
            32,
            &[
                ("pcount", long, 0, 0),
                ("run_delay", u64_, 64, 0),
                ("last_arrival", u64_, 128, 0),
                ("last_queued", u64_, 192, 0),
            ],
        );
        let mut members = vec![("__state", long, 0, 0)];
        if sched_info {
            members.push(("sched_info", info, 1024, 0));
        }
        b.composite(KIND_STRUCT, "task_struct", 256, &members);
        KernelBtf::parse(b.build(), "task").expect("task BTF parses")
    }

    /// 5.18+: the argument; 5.14..5.18: `__state` (u32); before: `state`
    /// (long); no state member at all: an error naming it.
    #[test]
    fn the_previous_tasks_state_comes_from_the_argument_or_the_task() {
        let kernel = |args: usize, member: Option<(&str, u32)>| {
            let mut b = Builder::new();
            let int = b.int("unsigned int", 4);
            let long = b.int("long", 8);
            let mut members = vec![("flags", long, 0, 0)];
            if let Some((name, size)) = member {
                members.push((name, if size == 4 { int } else { long }, 128, 0));
            }
            b.composite(KIND_STRUCT, "task_struct", 256, &members);
            let void_ptr = b.ptr(0);
            let params = vec![void_ptr; args + 1];
            let proto = b.func_proto(&params);
            let p = b.ptr(proto);
            b.typedef("btf_trace_sched_switch", p);
            KernelBtf::parse(b.build(), "task").expect("BTF parses")
        };
        assert_eq!(
            task_state(&kernel(4, Some(("__state", 4))), false).unwrap(),
            (0, 0)
        );
        // Forced: the task's field even where the argument exists.
        assert_eq!(
            task_state(&kernel(4, Some(("__state", 4))), true).unwrap(),
            (16, 4)
        );
        assert_eq!(
            task_state(&kernel(3, Some(("__state", 4))), false).unwrap(),
            (16, 4)
        );
        assert_eq!(
            task_state(&kernel(3, Some(("state", 8))), false).unwrap(),
            (16, 8)
        );
        let e = task_state(&kernel(3, None), false).unwrap_err().to_string();
        assert!(e.contains("state"), "{e}");
    }

    #[test]
    fn sched_offsets_need_sched_info() {
        let got = sched_offsets(&task_btf(true)).unwrap();
        assert_eq!(
            (got.valid, got.last_arrival, got.last_queued),
            (1, 128 + 16, 128 + 24)
        );
        let e = sched_offsets(&task_btf(false)).unwrap_err().to_string();
        assert!(e.contains("sched_info.last_queued"), "{e}");
    }
}
