//! `parallelformers bench`: prefill latency of a fixed-length prompt, greedy decode speed at
//! batch 1, and each rank's peak memory; with a constraint flag, what the constraint's token
//! masks cost per decoded token.

use std::io::Write;
use std::ops::ControlFlow;

use anyhow::Context;
use clap::Args;
use parallelformers::api::{check_generation, parallelize_resolved};
use parallelformers::bandwidth::measure_read_bandwidth;
use parallelformers::checkpoint::ModelConfig;
use parallelformers::generation::constraint::Constraint;
use parallelformers::options::WeightDType;
use parallelformers::parallel::memory::RankMemory;
use parallelformers::text::TextSide;
use parallelformers::{Backend, GenerationConfig, ParallelModel};

use super::constraint_args::ConstraintArgs;
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
    /// Sequences decoded together (prompts of the same length, different tokens): the decode
    /// figures are then steps of the whole batch and its tokens per second in all.
    #[arg(long, default_value_t = 1, value_parser = super::at_least_one)]
    batch: usize,
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
    /// With a constraint flag, also decode under it (ending where its text ends, at most
    /// --new-tokens) and compare with an unconstrained decode of as many tokens: the time the
    /// masks add per token, and its share of the decode time.
    #[command(flatten)]
    constraint: ConstraintArgs,
}

/// `batch` deterministic prompts of `len` ids spread over the vocabulary, each its own.
fn prompts(batch: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|row| {
            (0..len)
                .map(|i| ((i * 7919 + 13 + row * 104_729) % vocab) as u32)
                .collect()
        })
        .collect()
}

/// Bytes of weights a decode step of one sequence reads: the active parameters. That is
/// everything the ranks hold, less an untied input embedding table (only one row of it is read
/// per token), and, of a mixture of experts, only the `top_k` of each layer's experts that the
/// token is routed to.
fn weight_bytes_per_token(memory: &[RankMemory], config: &ModelConfig, dtype: WeightDType) -> u64 {
    let held: u64 = memory.iter().map(|m| m.weights.total()).sum();
    let routed: u64 = memory.iter().map(|m| m.weights.routed).sum();
    let untied_embedding = match config.tie_word_embeddings {
        Some(false) => (config.vocab_size * config.hidden_size * dtype.size_in_bytes()) as u64,
        _ => 0,
    };
    let moe = config.decoder.as_ref().and_then(|d| d.moe.as_ref());
    let unread_experts = moe.map_or(0, |m| {
        routed - routed * m.top_k as u64 / m.experts.max(1) as u64
    });
    held.saturating_sub(untied_embedding + unread_experts)
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
    let text = TextSide::load(&resolved)?;
    let constraint = args
        .constraint
        .resolve(text.as_ref(), resolved.config.vocab_size)?;
    let batch = prompts(args.batch, args.prompt_len, resolved.config.vocab_size);
    let params = decode_config(args.new_tokens, args.sampling);
    check_generation(&resolved, &batch, &params).with_context(|| {
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
    let warm_up = GenerationConfig {
        max_new_tokens: 2,
        min_new_tokens: 2,
        ..params.clone()
    };
    model.generate_batch(&batch, &warm_up, |_, _| ControlFlow::Continue(()))?;
    let best = best_run(&mut model, &batch, &params, args.repeats)?;
    let (prefill, decode) = (best.prefill_seconds, best.step_seconds);
    let overhead = best.overhead_seconds / best.step_seconds;
    let constrained = constraint
        .map(|c| constraint_cost(&mut model, &batch, &params, c, args.repeats))
        .transpose()?;
    let memory = model.memory_report()?;
    let model_name = model.model().location.path().display().to_string();
    let model_config = model.config().clone();
    model.deparallelize();
    let peaks: Vec<u64> = memory.iter().map(|m| m.peak_bytes).collect();
    let streamed = weight_bytes_per_token(&memory, &model_config, args.model.dtype);
    let limit = bandwidth.map(|b| b / streamed as f64);
    let prefill_ms = prefill * 1e3;
    let decode_steps_per_s = 1.0 / decode;
    let decode_tokens_per_s = args.batch as f64 * decode_steps_per_s;
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
                "batch": args.batch,
                "prefill_ms": prefill_ms,
                "decode_steps_per_s": decode_steps_per_s,
                "decode_tokens_per_s": decode_tokens_per_s,
                "peak_memory_bytes": peaks,
                "read_bandwidth_bytes_per_s": bandwidth,
                "weight_bytes_per_token": streamed,
                "bandwidth_limit_tokens_per_s": limit,
                "sampling": args.sampling,
                "decode_overhead_fraction": overhead,
                "constraint": constrained.as_ref().map(ConstraintCost::json),
            })
        )?;
    } else {
        let rows = match args.batch {
            1 => String::new(),
            n => format!(" × {n} sequences"),
        };
        writeln!(
            out,
            "prefill ({} tokens{rows}): {prefill_ms:.1} ms",
            args.prompt_len
        )?;
        let mode = if args.sampling { "sampled" } else { "greedy" };
        let steps = match args.batch {
            1 => String::new(),
            _ => format!(" in all, {decode_steps_per_s:.1} steps/s"),
        };
        writeln!(out, "{mode} decode: {decode_tokens_per_s:.1} tokens/s{steps}, {:.1} % of it outside the model (choosing, broadcasting, streaming)", 100.0 * overhead)?;
        if let (Some(bandwidth), Some(limit), 1) = (bandwidth, limit, args.batch) {
            writeln!(
                out,
                "memory-bandwidth limit: {limit:.1} tokens/s ({:.1} GB/s read over {:.0} MB of active weights per token); decode is at {:.0} %",
                bandwidth / 1e9,
                streamed as f64 / 1e6,
                100.0 * decode_tokens_per_s / limit
            )?;
        }
        if let Some(cost) = &constrained {
            writeln!(out, "{}", cost.line())?;
        }
        for m in &memory {
            writeln!(out, "{}", m.simple_line())?;
        }
    }
    Ok(())
}

/// The fastest of `repeats` runs of `config` (by time per decode step), in seconds.
#[derive(Debug, Clone, Copy)]
struct Best {
    prefill_seconds: f64,
    /// Time of one decode step.
    step_seconds: f64,
    /// Of `step_seconds`, the time rank 0 spent outside the model.
    overhead_seconds: f64,
    /// Tokens of the longest sequence.
    tokens: usize,
}

/// Runs `config` on `batch` `repeats` times; the fastest prefill, and the run with the
/// fastest decode steps.
fn best_run(
    model: &mut ParallelModel,
    batch: &[Vec<u32>],
    config: &GenerationConfig,
    repeats: usize,
) -> anyhow::Result<Best> {
    let mut best: Option<Best> = None;
    for _ in 0..repeats.max(1) {
        let run = model.generate_batch(batch, config, |_, _| ControlFlow::Continue(()))?;
        let tokens = run.sequences.iter().map(Vec::len).max().unwrap_or(0);
        anyhow::ensure!(
            tokens >= 2,
            "a run generated {tokens} token(s); at least 2 are needed to time a decode step"
        );
        let steps = (tokens - 1) as f64;
        let this = Best {
            prefill_seconds: run.prefill_seconds,
            step_seconds: run.decode_seconds / steps,
            overhead_seconds: run.overhead_seconds / steps,
            tokens,
        };
        let prefill_seconds = best.map_or(this.prefill_seconds, |b| {
            b.prefill_seconds.min(this.prefill_seconds)
        });
        best = Some(match best {
            Some(b) if b.step_seconds <= this.step_seconds => Best {
                prefill_seconds,
                ..b
            },
            _ => Best {
                prefill_seconds,
                ..this
            },
        });
    }
    best.context("no run")
}

/// What a constraint costs per decoded token: the constrained decode against an
/// unconstrained decode of as many tokens.
struct ConstraintCost {
    constraint: &'static str,
    constrained: Best,
    plain: Best,
}

/// Decodes `batch` under `constraint` (the options of `params` otherwise, ending at the end
/// of the constrained text), then without it for as many tokens.
fn constraint_cost(
    model: &mut ParallelModel,
    batch: &[Vec<u32>],
    params: &GenerationConfig,
    constraint: Constraint,
    repeats: usize,
) -> anyhow::Result<ConstraintCost> {
    let name = constraint.name();
    let constrained_config = GenerationConfig {
        min_new_tokens: 0,
        eos_token_id: None,
        constraint: Some(constraint),
        ..params.clone()
    };
    let constrained = best_run(model, batch, &constrained_config, repeats)?;
    let plain_config = GenerationConfig {
        max_new_tokens: constrained.tokens,
        min_new_tokens: constrained.tokens,
        ..params.clone()
    };
    let plain = best_run(model, batch, &plain_config, repeats)?;
    Ok(ConstraintCost {
        constraint: name,
        constrained,
        plain,
    })
}

impl ConstraintCost {
    /// Time the masks add per decode step, in seconds: the difference of rank 0's time outside
    /// the model, which the masks are part of (steadier than the difference of whole steps).
    fn mask_seconds(&self) -> f64 {
        self.constrained.overhead_seconds - self.plain.overhead_seconds
    }

    /// The masks' share of the constrained decode time.
    fn fraction(&self) -> f64 {
        self.mask_seconds() / self.constrained.step_seconds
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": self.constraint,
            "tokens": self.constrained.tokens,
            "constrained_ms_per_token": self.constrained.step_seconds * 1e3,
            "constrained_overhead_ms_per_token": self.constrained.overhead_seconds * 1e3,
            "unconstrained_ms_per_token": self.plain.step_seconds * 1e3,
            "unconstrained_overhead_ms_per_token": self.plain.overhead_seconds * 1e3,
            "mask_ms_per_token": self.mask_seconds() * 1e3,
            "mask_fraction_of_decode": self.fraction(),
        })
    }

    fn line(&self) -> String {
        format!(
            "{} constraint ({} tokens): {:.2} ms/token ({:.2} ms outside the model), unconstrained {:.2} ms/token ({:.2} ms outside); the masks cost {:.3} ms/token, {:.1} % of the constrained decode",
            self.constraint,
            self.constrained.tokens,
            self.constrained.step_seconds * 1e3,
            self.constrained.overhead_seconds * 1e3,
            self.plain.step_seconds * 1e3,
            self.plain.overhead_seconds * 1e3,
            self.mask_seconds() * 1e3,
            100.0 * self.fraction()
        )
    }
}
