#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| reprise_fuzzing::guest_stream(data));
