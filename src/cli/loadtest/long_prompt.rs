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
    let mut before = window(before_start, sent);
    let mut during = window(sent, first);
    let tokens = prompt_tokens(&url, &long_body)?;
    let ttft = (first - sent).as_secs_f64();
    let (before_p50, before_p99) = (percentile(&mut before, 0.5), percentile(&mut before, 0.99));
    let (during_p50, during_p99) = (percentile(&mut during, 0.5), percentile(&mut during, 0.99));
    if args.json {
        writeln!(
            out,
            "{}",
            json!({"scenario": "long-prompt", "streams": args.streams, "long_prompt_tokens": tokens,
                "long_ttft_s": ttft,
                "itl_before_ms": {"p50": before_p50, "p99": before_p99, "samples": before.len()},
                "itl_during_ms": {"p50": during_p50, "p99": during_p99, "samples": during.len()},
                "p99_during_over_p50_before": during_p99 / before_p50})
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
        "| streams' inter-token latency | p50 | p99 | samples |"
    )?;
    writeln!(out, "| --- | --- | --- | --- |")?;
    for (phase, p50, p99, n) in [
        (
            "before the long prompt",
            before_p50,
            before_p99,
            before.len(),
        ),
        ("during its prefill", during_p50, during_p99, during.len()),
    ] {
        writeln!(out, "| {phase} | {p50:.0} ms | {p99:.0} ms | {n} |")?;
    }
    writeln!(
        out,
        "p99 during its prefill / p50 before: {:.2}",
        during_p99 / before_p50
    )?;
    Ok(())
}
