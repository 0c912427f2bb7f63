//! Fuzz target `gguf_reader`: see `parallelformers_fuzz::gguf_reader` (fuzz/src/lib.rs) for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = parallelformers_fuzz::gguf_reader(data);
});
