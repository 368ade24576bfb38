#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| reprise_fuzzing::repo_config(data));
