#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Parsers take text: the kernel's files are ASCII, and the reader
    // refuses what is not UTF-8.
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = perch::families::drops::softnet::parse_softnet_stat(s);
    }
});
