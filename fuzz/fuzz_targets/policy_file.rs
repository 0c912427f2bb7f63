//! Fuzz target `policy_file`: see `parallelformers_fuzz::policy_file` (fuzz/src/lib.rs) for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = parallelformers_fuzz::policy_file(data);
});
