//! Fuzz target `ipc_frames`: see `parallelformers_fuzz::ipc_frames` (fuzz/src/lib.rs) for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = parallelformers_fuzz::ipc_frames(data);
});
