#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| gateway::fuzzing::tunnel_reorder(data));
