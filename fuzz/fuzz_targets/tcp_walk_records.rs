#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = perch::families::tcp::walk::parse(data);
});
