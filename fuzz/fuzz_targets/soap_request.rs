#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cloud_endpoint::api::fuzzing::soap_request(data));
