#![no_main]
//! See `aegis_client::fuzzing::control_frame`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| aegis_client::fuzzing::control_frame(data));
