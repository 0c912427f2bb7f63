//! Using parallelformers from your own program.
//!
//! Ranks are started by re-executing the current program, so `run_worker_if_requested()` must be
//! the first call in `main`: in a worker copy it serves the rank and exits, in the user's copy
//! it returns at once.
//!
//! ```text
//! cargo run --example library_user -- tests/fixtures/llama 2 1,2,3
//! ```

use anyhow::Context;
use parallelformers::{parallelize, GenerationConfig, Options};

fn main() -> anyhow::Result<()> {
    parallelformers::run_worker_if_requested();
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .context("usage: library_user MODEL_DIR [RANKS] [IDS]")?;
    let ranks: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(2);
    let prompt: Vec<u32> = args
        .next()
        .unwrap_or_else(|| "1,2,3".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let mut model = parallelize(
        &dir,
        Options {
            ranks,
            ..Options::default()
        },
    )?;
    let generated = model.generate(
        &prompt,
        &GenerationConfig {
            max_new_tokens: 6,
            ..GenerationConfig::default()
        },
    )?;
    let pids = model.worker_pids();
    model.deparallelize();
    println!(
        "{}",
        serde_json::json!({ "generated_ids": generated.ids, "worker_pids": pids })
    );
    Ok(())
}
