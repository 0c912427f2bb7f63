//! `parallelformers loadtest`: clients against a running `serve`. The `throughput` scenario
//! runs concurrent streaming clients for a bounded time and reports requests/s, tokens/s, time
//! to first token (p50/p99) and errors for each concurrency; `long-prompt` and `multi-turn`
//! measure what a long prompt does to the others' streams and what a chat's history costs each
//! turn (modules `long_prompt`, `multi_turn`).

mod filler;
mod long_prompt;
mod multi_turn;
mod stream;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::json;

use super::at_least_one;
use stream::{percentile, stream};

/// What `loadtest` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Each concurrency of --clients in turn: requests/s, tokens/s, time to first token.
    Throughput,
    /// --streams clients stream while one sends a prompt of --long-prompt-tokens: their
    /// inter-token latency before and during its prefill, and its time to first token.
    LongPrompt,
    /// A chat whose first message brings the history to --history-tokens, for --turns turns:
    /// each turn's time to first token.
    MultiTurn,
}

/// Arguments of `loadtest`.
#[derive(Debug, Args)]
pub struct LoadtestArgs {
    /// The server's address, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    url: String,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Scenario::Throughput)]
    scenario: Scenario,
    /// Concurrent clients of each run, comma-separated (throughput).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    /// Seconds each run sends requests, requests still running then being awaited
    /// (throughput); seconds the streams are measured before the long prompt (long-prompt).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// New tokens per request (per turn in multi-turn).
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    max_tokens: usize,
    /// The prompt of every streaming request (throughput, long-prompt).
    #[arg(
        long,
        default_value = "Write a short story about a robot who learns to paint."
    )]
    prompt: String,
    /// Streaming clients (long-prompt).
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    streams: usize,
    /// About how many tokens the long prompt has (long-prompt; sized by a calibration request,
    /// the report gives the server's count).
    #[arg(long, default_value_t = 2048, value_parser = at_least_one)]
    long_prompt_tokens: usize,
    /// About how many tokens the chat's first message brings the history to (multi-turn).
    #[arg(long, default_value_t = 1500, value_parser = at_least_one)]
    history_tokens: usize,
    /// Turns of the chat (multi-turn).
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    turns: usize,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    json: bool,
}

/// What one request measured.
#[derive(Debug, Clone, Copy)]
struct Sample {
    first_token: Option<Duration>,
    tokens: usize,
    failed: bool,
}

/// Runs `loadtest`.
pub fn run(args: LoadtestArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match args.scenario {
        Scenario::Throughput => throughput(&args, &mut out),
        Scenario::LongPrompt => long_prompt::run(&args, &mut out),
        Scenario::MultiTurn => multi_turn::run(&args, &mut out),
    }
}

/// The `throughput` scenario.
fn throughput(args: &LoadtestArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    if !args.json {
        writeln!(
            out,
            "| clients | requests/s | tokens/s | TTFT p50 | TTFT p99 | errors |"
        )?;
        writeln!(out, "| --- | --- | --- | --- | --- | --- |")?;
    }
    for &clients in &args.clients {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let deadline = start + Duration::from_secs(args.seconds);
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let (samples, url) = (samples.clone(), format!("{}/v1/completions", args.url));
                let body = json!({"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0.8});
                std::thread::spawn(move || {
                    while Instant::now() < deadline {
                        let sample = match stream(&url, &body) {
                            Some(streamed) => Sample {
                                first_token: streamed.arrivals.first().map(|at| *at - streamed.sent),
                                tokens: streamed.arrivals.len(),
                                failed: false,
                            },
                            None => Sample {
                                first_token: None,
                                tokens: 0,
                                failed: true,
                            },
                        };
                        if let Ok(mut all) = samples.lock() {
                            all.push(sample);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            let _ = thread.join();
        }
        let elapsed = start.elapsed().as_secs_f64();
        let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
        let ok: Vec<&Sample> = samples.iter().filter(|s| !s.failed).collect();
        let mut firsts: Vec<f64> = ok
            .iter()
            .filter_map(|s| s.first_token)
            .map(|d| d.as_secs_f64())
            .collect();
        let tokens: usize = ok.iter().map(|s| s.tokens).sum();
        let (rps, tps) = (ok.len() as f64 / elapsed, tokens as f64 / elapsed);
        let errors = samples.len() - ok.len();
        let (p50, p99) = (
            percentile(&mut firsts, 0.5) * 1e3,
            percentile(&mut firsts, 0.99) * 1e3,
        );
        if args.json {
            writeln!(
                out,
                "{}",
                json!({"clients": clients, "requests_per_s": rps, "tokens_per_s": tps,
                "ttft_p50_ms": p50, "ttft_p99_ms": p99, "errors": errors, "requests": samples.len()})
            )?;
        } else {
            writeln!(
                out,
                "| {clients} | {rps:.2} | {tps:.1} | {p50:.0} ms | {p99:.0} ms | {errors} |"
            )?;
        }
    }
    Ok(())
}
