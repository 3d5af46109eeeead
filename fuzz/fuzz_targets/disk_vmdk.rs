#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| edge_agent::source::fuzzing::disk_image(data, "vmdk"));
