#![no_main]
//! See `callbridge_fuzz::twilio_webhook` for the input and the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| callbridge_fuzz::twilio_webhook(data));
