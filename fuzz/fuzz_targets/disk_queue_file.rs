#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = perch::exporters::otlp::disk::decode_file(data);
});
