//! `parallelformers bench`: prefill latency of a fixed-length prompt, greedy decode speed at
//! batch 1, and each rank's peak memory.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use parallelformers::api::{check_generation, parallelize_resolved};
use parallelformers::bandwidth::measure_read_bandwidth;
use parallelformers::checkpoint::ModelConfig;
use parallelformers::options::WeightDType;
use parallelformers::parallel::memory::RankMemory;
use parallelformers::{Backend, GenerationConfig};

use super::ModelArgs;

/// Arguments of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// New tokens to decode (end-of-sequence is suppressed).
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Measured repetitions; the fastest is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Decode by sampling with the costliest common options (temperature 0.7, top-k 50,
    /// top-p 0.9, typical-p 0.95, repetition penalty 1.1, no 3-gram repeats) instead of
    /// greedily, to measure the cost of processing the logits.
    #[arg(long)]
    sampling: bool,
}

/// A deterministic prompt of `len` ids spread over the vocabulary.
fn prompt(len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// Bytes of weights a decode step reads: everything the ranks hold, less an untied input
/// embedding table (only one row of it is read per token).
fn weight_bytes_per_token(memory: &[RankMemory], config: &ModelConfig, dtype: WeightDType) -> u64 {
    let held: u64 = memory
        .iter()
        .map(|m| m.weights.sliced + m.weights.replicated)
        .sum();
    let untied_embedding = match config.tie_word_embeddings {
        Some(false) => (config.vocab_size * config.hidden_size * dtype.size_in_bytes()) as u64,
        _ => 0,
    };
    held.saturating_sub(untied_embedding)
}

/// The greedy (or, with `sampling`, sampled) options of a measured run: exactly `new_tokens`
/// tokens, with no end-of-sequence id.
fn decode_config(new_tokens: usize, sampling: bool) -> GenerationConfig {
    let base = match sampling {
        true => GenerationConfig {
            do_sample: true,
            temperature: 0.7,
            top_k: 50,
            top_p: 0.9,
            typical_p: 0.95,
            repetition_penalty: 1.1,
            no_repeat_ngram_size: 3,
            seed: Some(0),
            ..GenerationConfig::default()
        },
        false => GenerationConfig::default(),
    };
    GenerationConfig {
        max_new_tokens: new_tokens,
        min_new_tokens: new_tokens,
        eos_token_id: Some(Vec::new()),
        ..base
    }
}

/// Runs `bench`. Every argument is checked before any rank starts.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.new_tokens >= 2,
        "--new-tokens must be at least 2, got {}",
        args.new_tokens
    );
    anyhow::ensure!(
        args.prompt_len >= 1,
        "--prompt-len must be at least 1, got {}",
        args.prompt_len
    );
    let resolved = args.model.resolve()?;
    let ids = prompt(args.prompt_len, resolved.config.vocab_size);
    let params = decode_config(args.new_tokens, args.sampling);
    check_generation(&resolved, std::slice::from_ref(&ids), &params).with_context(|| {
        format!(
            "cannot bench --prompt-len {} --new-tokens {}",
            args.prompt_len, args.new_tokens
        )
    })?;
    let mut options = args.model.options();
    // Every run repeats the same prompt: prefill is measured without the prefix cache.
    options.prefill.prefix_cache_bytes = 0;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Under MPI the ranks' cores (perhaps on other hosts) are not this process's to measure.
    let bandwidth =
        (options.backend == Backend::Shm).then(|| measure_read_bandwidth(options.ranks.min(cores)));
    let mut model = parallelize_resolved(resolved, options)?;
    // Warm-up: page in code and weights, size the allocator.
    model.generate(
        &ids,
        &GenerationConfig {
            max_new_tokens: 2,
            min_new_tokens: 2,
            ..params.clone()
        },
    )?;
    let mut prefill = f64::INFINITY;
    let mut decode = f64::INFINITY;
    let mut overhead = 0.0;
    for _ in 0..args.repeats.max(1) {
        let run = model.generate(&ids, &params)?;
        prefill = prefill.min(run.prefill_seconds);
        let per_token = run.decode_seconds / (run.ids.len() - 1) as f64;
        if per_token < decode {
            decode = per_token;
            overhead = run.overhead_seconds / run.decode_seconds;
        }
    }
    let memory = model.memory_report()?;
    let model_name = model.model().location.path().display().to_string();
    let model_config = model.config().clone();
    model.deparallelize();
    let peaks: Vec<u64> = memory.iter().map(|m| m.peak_bytes).collect();
    let streamed = weight_bytes_per_token(&memory, &model_config, args.model.dtype);
    let limit = bandwidth.map(|b| b / streamed as f64);
    let prefill_ms = prefill * 1e3;
    let decode_tokens_per_s = 1.0 / decode;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({
                "model": model_name,
                "ranks": memory.len(),
                "dtype": format!("{:?}", args.model.dtype).to_lowercase(),
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "prefill_ms": prefill_ms,
                "decode_tokens_per_s": decode_tokens_per_s,
                "peak_memory_bytes": peaks,
                "read_bandwidth_bytes_per_s": bandwidth,
                "weight_bytes_per_token": streamed,
                "bandwidth_limit_tokens_per_s": limit,
                "sampling": args.sampling,
                "decode_overhead_fraction": overhead,
            })
        )?;
    } else {
        writeln!(
            out,
            "prefill ({} tokens): {prefill_ms:.1} ms",
            args.prompt_len
        )?;
        let mode = if args.sampling { "sampled" } else { "greedy" };
        writeln!(out, "{mode} decode: {decode_tokens_per_s:.1} tokens/s, {:.1} % of it outside the model (choosing, broadcasting, streaming)", 100.0 * overhead)?;
        if let (Some(bandwidth), Some(limit)) = (bandwidth, limit) {
            writeln!(
                out,
                "memory-bandwidth limit: {limit:.1} tokens/s ({:.1} GB/s read over {:.0} MB of weights per token); decode is at {:.0} %",
                bandwidth / 1e9,
                streamed as f64 / 1e6,
                100.0 * decode_tokens_per_s / limit
            )?;
        }
        for m in &memory {
            writeln!(out, "{}", m.simple_line())?;
        }
    }
    Ok(())
}
