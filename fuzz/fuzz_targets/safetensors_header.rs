//! Fuzz target `safetensors_header`: see `parallelformers_fuzz::safetensors_header` (fuzz/src/lib.rs) for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = parallelformers_fuzz::safetensors_header(data);
});
