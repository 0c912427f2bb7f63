//! Fuzz target `config_json`: see `parallelformers_fuzz::config_json` (fuzz/src/lib.rs) for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = parallelformers_fuzz::config_json(data);
});
