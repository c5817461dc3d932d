#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    careweave_fuzzing::api(data);
});
