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
        _pad: 0,
    })
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
