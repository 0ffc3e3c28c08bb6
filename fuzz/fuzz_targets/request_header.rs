#![no_main]
//! See `aegis_client::fuzzing::request_header`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| aegis_client::fuzzing::request_header(data));
