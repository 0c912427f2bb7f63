//! `parallelformers loadtest`: concurrent streaming clients against a running `serve`, for a
//! bounded time; reports requests/s, tokens/s, time to first token (p50/p99) and errors for
//! each concurrency.

use std::io::{BufRead, BufReader, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

/// Arguments of `loadtest`.
#[derive(Debug, Args)]
pub struct LoadtestArgs {
    /// The server's address, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    url: String,
    /// Concurrent clients of each run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    /// Seconds each run sends requests (requests still running then are awaited).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// New tokens per request.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// The prompt of every request.
    #[arg(
        long,
        default_value = "Write a short story about a robot who learns to paint."
    )]
    prompt: String,
    /// Print one JSON object per run instead of a Markdown table.
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
                let body = json!({"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0.8, "stream": true});
                std::thread::spawn(move || {
                    while Instant::now() < deadline {
                        let sample = one_request(&url, &body);
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
        firsts.sort_by(f64::total_cmp);
        let percentile = |p: f64| {
            firsts
                .get(((firsts.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        let tokens: usize = ok.iter().map(|s| s.tokens).sum();
        let (rps, tps) = (ok.len() as f64 / elapsed, tokens as f64 / elapsed);
        let errors = samples.len() - ok.len();
        let (p50, p99) = (percentile(0.5) * 1e3, percentile(0.99) * 1e3);
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

/// One streamed completion: when its first token arrived and how many chunks of text it got.
fn one_request(url: &str, body: &serde_json::Value) -> Sample {
    let sent = Instant::now();
    let failed = Sample {
        first_token: None,
        tokens: 0,
        failed: true,
    };
    let Ok(response) = ureq::post(url).send_json(body.clone()) else {
        return failed;
    };
    let mut sample = Sample {
        first_token: None,
        tokens: 0,
        failed: false,
    };
    for line in BufReader::new(response.into_reader()).lines() {
        let Ok(line) = line else { return failed };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return sample;
        }
        let Ok(chunk) = serde_json::from_str::<serde_json::Value>(data) else {
            return failed;
        };
        if chunk.get("error").is_some() {
            return failed;
        }
        if chunk["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            sample.first_token.get_or_insert(sent.elapsed());
            sample.tokens += 1;
        }
    }
    failed
}
