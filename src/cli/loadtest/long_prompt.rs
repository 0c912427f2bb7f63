//! The `long-prompt` scenario: while `--streams` clients stream completions, one client sends a
//! prompt of about `--long-prompt-tokens` tokens. Reported: the streaming clients' inter-token
//! latency (p50, p99) before the long prompt arrives and while it is prefilled (until its
//! first token), and the long request's time to first token.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use super::filler::Filler;
use super::stream::{percentile, prompt_tokens, stream};
use super::LoadtestArgs;

/// How long the streaming clients run before the measured window opens.
const WARM_UP: Duration = Duration::from_secs(2);

/// New tokens of the long request.
const LONG_NEW_TOKENS: usize = 8;

/// Runs the scenario and writes its report to `out`.
pub fn run(args: &LoadtestArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let url = format!("{}/v1/completions", args.url);
    let filler = Filler::calibrate(&args.url)?;
    let stop = Arc::new(AtomicBool::new(false));
    let gaps = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..args.streams)
        .map(|_| {
            let (stop, gaps, url) = (stop.clone(), gaps.clone(), url.clone());
            let body =
                json!({"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0.8});
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(streamed) = stream(&url, &body) else {
                        continue;
                    };
                    if let Ok(mut all) = gaps.lock() {
                        all.extend(streamed.gaps());
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(WARM_UP);
    let before_start = Instant::now();
    std::thread::sleep(Duration::from_secs(args.seconds));
    let long_body = json!({"prompt": filler.text(args.long_prompt_tokens), "max_tokens": LONG_NEW_TOKENS, "temperature": 0});
    let long = stream(&url, &long_body);
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.join();
    }
    let long = long.context("the long request failed")?;
    let (sent, first) = match long.arrivals.first() {
        Some(&first) => (long.sent, first),
        None => anyhow::bail!("the long request streamed no text"),
    };
    let gaps = gaps.lock().map(|g| g.clone()).unwrap_or_default();
    let window = |from: Instant, to: Instant| -> Vec<f64> {
        gaps.iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .map(|(_, gap)| gap * 1e3)
            .collect()
    };
    let before = Latency::of(window(before_start, sent));
    let during = Latency::of(window(sent, first));
    let tokens = prompt_tokens(&url, &long_body)?;
    let ttft = (first - sent).as_secs_f64();
    let ratio = during.p99 / before.p50;
    if args.json {
        writeln!(
            out,
            "{}",
            json!({"scenario": "long-prompt", "streams": args.streams, "long_prompt_tokens": tokens,
                "long_ttft_s": ttft, "itl_before_ms": before.json(), "itl_during_ms": during.json(),
                "p99_during_over_p50_before": ratio})
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{} streaming clients; a {tokens}-token prompt arrives; its time to first token: {ttft:.2} s",
        args.streams
    )?;
    writeln!(
        out,
        "| streams' inter-token latency | p50 | p90 | p99 | max | samples |"
    )?;
    writeln!(out, "| --- | --- | --- | --- | --- | --- |")?;
    for (phase, l) in [
        ("before the long prompt", &before),
        ("during its prefill", &during),
    ] {
        writeln!(
            out,
            "| {phase} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {} |",
            l.p50, l.p90, l.p99, l.max, l.samples
        )?;
    }
    writeln!(out, "p99 during its prefill / p50 before: {ratio:.2}")?;
    Ok(())
}

/// A window's inter-token latencies, in milliseconds.
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    samples: usize,
}

impl Latency {
    fn of(mut gaps: Vec<f64>) -> Self {
        Latency {
            p50: percentile(&mut gaps, 0.5),
            p90: percentile(&mut gaps, 0.9),
            p99: percentile(&mut gaps, 0.99),
            max: percentile(&mut gaps, 1.0),
            samples: gaps.len(),
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({"p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max,
            "samples": self.samples})
    }
}
