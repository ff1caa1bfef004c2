#![no_main]
//! See `callbridge_fuzz::ws_frame_limit` for the input and the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| callbridge_fuzz::ws_frame_limit(data));
