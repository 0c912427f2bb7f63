//! The `multi-turn` scenario: one chat whose first message brings the history to about
//! `--history-tokens` tokens, then `--turns` turns in all, each a short question about it.
//! Reported: each turn's prompt tokens and time to first token, and the later turns' times as
//! a fraction of the first's (a server that keeps the conversation's keys and values computes
//! only the newest messages).

use std::io::Write;

use anyhow::Context;
use serde_json::{json, Value};

use super::filler::Filler;
use super::stream::{prompt_tokens, stream};
use super::LoadtestArgs;

/// Runs the scenario and writes its report to `out`.
pub fn run(args: &LoadtestArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let url = format!("{}/v1/chat/completions", args.url);
    let filler = Filler::calibrate(&args.url)?;
    let notes = filler.text(args.history_tokens);
    let mut messages = vec![json!({"role": "user", "content": format!(
        "Read these notes, then answer each question in one sentence.\n{notes}\nQuestion 1: what does note 3 say?"
    )})];
    let mut turns = Vec::new();
    for turn in 1..=args.turns {
        let body = json!({"messages": messages, "max_tokens": args.max_tokens, "temperature": 0});
        let answer = stream(&url, &body).with_context(|| format!("turn {turn} failed"))?;
        let ttft = answer
            .first_token_seconds()
            .with_context(|| format!("turn {turn} streamed no text"))?;
        turns.push((body, ttft));
        messages.push(json!({"role": "assistant", "content": answer.text}));
        let question = format!("Question {}: what does note {} say?", turn + 1, 7 * turn);
        messages.push(json!({"role": "user", "content": question}));
    }
    let first = turns.first().map_or(f64::NAN, |(_, ttft)| *ttft);
    let mut rows: Vec<Value> = Vec::new();
    for (index, (body, ttft)) in turns.iter().enumerate() {
        // Counted after the turns, so that the count does not warm the cache for them.
        let tokens = prompt_tokens(&url, body)?;
        rows.push(
            json!({"turn": index + 1, "prompt_tokens": tokens, "ttft_s": ttft,
            "ttft_over_first": ttft / first}),
        );
    }
    if args.json {
        writeln!(out, "{}", json!({"scenario": "multi-turn", "turns": rows}))?;
        return Ok(());
    }
    writeln!(
        out,
        "| turn | prompt tokens | time to first token | / first turn's |"
    )?;
    writeln!(out, "| --- | --- | --- | --- |")?;
    for row in &rows {
        writeln!(
            out,
            "| {} | {} | {:.3} s | {:.0}% |",
            row["turn"],
            row["prompt_tokens"],
            row["ttft_s"].as_f64().unwrap_or(f64::NAN),
            row["ttft_over_first"].as_f64().unwrap_or(f64::NAN) * 100.0
        )?;
    }
    Ok(())
}
