#![no_main]
//! See `callbridge_fuzz::agents_file` for the input and the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| callbridge_fuzz::agents_file(data));
