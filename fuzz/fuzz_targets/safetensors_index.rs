//! Fuzz target `safetensors_index`: see `parallelformers_fuzz::safetensors_index` (fuzz/src/lib.rs) for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = parallelformers_fuzz::safetensors_index(data);
});
