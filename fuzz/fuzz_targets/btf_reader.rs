#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = perch::sources::btf::KernelBtf::parse(data.to_vec(), "fuzz") {
        let _ = btf.member("sock", "__sk_common.skc_daddr");
        let _ = btf.enum_values("skb_drop_reason");
        let _ = btf.tracepoint_args("tcp_retransmit_skb");
        let _ = perch::families::sched::offsets::sched_offsets(&btf);
    }
});
