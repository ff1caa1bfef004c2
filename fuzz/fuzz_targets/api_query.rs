#![no_main]
//! See `callbridge_fuzz::api_query` for the input and the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| callbridge_fuzz::api_query(data));
