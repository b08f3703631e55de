#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for t in perch::sources::netlink::TABLES {
        let _ = perch::sources::netlink::parse(data, t, 1);
    }
    let _ = perch::sources::netlink::parse_tcp_info(data);
});
