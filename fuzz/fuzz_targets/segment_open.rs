#![no_main]
//! See `aegis_client::fuzzing::segment_open`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| aegis_client::fuzzing::segment_open(data));
