#![no_main]
//! See `callbridge_fuzz::twilio_frame` for the input and the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| callbridge_fuzz::twilio_frame(data));
