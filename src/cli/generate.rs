//! `parallelformers generate`: continuation of a raw prompt or of token ids, printed as it is
//! generated, with every generation option of transformers' `generate` as a flag.

use std::io::Write;
use std::ops::ControlFlow;

use anyhow::{bail, ensure, Context};
use clap::Args;
use parallelformers::api::{check_generation, generation_defaults, parallelize_resolved};
use parallelformers::text::TextSide;
use parallelformers::{Generated, TokenLogprobs};

use super::generation_args::{GenerationArgs, ScoreArgs};
use super::printer::TokenPrinter;
use super::ModelArgs;

/// Arguments of `generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    generation: GenerationArgs,
    #[command(flatten)]
    scores: ScoreArgs,
    /// Prompt as comma-separated token ids instead of text.
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt")]
    input_ids: Option<Vec<u32>>,
    /// Print one JSON object `{"generated_ids": [...], "text": "..."}` (with --logprobs, also
    /// `"logprobs"`: each new token's `{"token", "text", "logprob", "top_logprobs"}`).
    #[arg(long)]
    json: bool,
    /// The prompt text (needs the model's tokenizer).
    prompt: Option<String>,
}

/// Runs `generate`. Every argument is checked before any rank starts.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let resolved = args.model.resolve()?;
    let text = TextSide::load(&resolved)?;
    let no_tokenizer = || format!("{} has no tokenizer", resolved.location.path().display());
    let prompt_ids = match (&args.input_ids, &args.prompt, &text) {
        (Some(ids), _, _) => ids.clone(),
        (None, Some(prompt), Some(text)) => {
            ensure!(!prompt.is_empty(), "the PROMPT is empty: give some text");
            text.encode(prompt)?
        }
        (None, Some(_), None) => bail!("{}: pass the prompt as --input-ids", no_tokenizer()),
        (None, None, _) => bail!("give a PROMPT or --input-ids"),
    };
    let mut config = args
        .scores
        .apply(args.generation.apply(&generation_defaults(&resolved)?));
    config.constraint = args
        .generation
        .constraint(text.as_ref(), resolved.config.vocab_size)?;
    if text.is_none() && !config.stop.is_empty() {
        bail!("{}: --stop needs one", no_tokenizer());
    }
    check_generation(&resolved, std::slice::from_ref(&prompt_ids), &config)?;
    let mut model = parallelize_resolved(resolved, args.model.options())?;
    // Text streams to standard output as tokens are chosen.
    let streaming = !args.json && config.num_return_sequences == 1;
    let mut printer = text.as_ref().filter(|_| streaming).map(TokenPrinter::new);
    let generated = model
        .generate_stream(&prompt_ids, &config, |token| match printer.as_mut() {
            Some(printer) => printer.push(token),
            None => ControlFlow::Continue(()),
        })
        .context("generation failed")?;
    model.deparallelize();
    match printer {
        Some(printer) => printer.finish(),
        None => print_result(&generated, text.as_ref(), args.json),
    }
}

/// Prints `generated` at once: as one JSON object, or one line per sequence (its text, else
/// its ids).
fn print_result(generated: &Generated, text: Option<&TextSide>, json: bool) -> anyhow::Result<()> {
    let decoded: Option<Vec<String>> = text
        .map(|t| {
            let decode = |ids: &Vec<u32>| t.decode(ids);
            generated.sequences.iter().map(decode).collect()
        })
        .transpose()?;
    let mut out = std::io::stdout().lock();
    if json {
        let mut object = serde_json::json!({ "generated_ids": generated.ids });
        if generated.sequences.len() > 1 {
            object["sequences"] = serde_json::json!(generated.sequences);
        }
        if let Some(decoded) = &decoded {
            object["text"] = serde_json::json!(decoded.first());
            if decoded.len() > 1 {
                object["texts"] = serde_json::json!(decoded);
            }
        }
        if let Some(logprobs) = &generated.logprobs {
            let lists = logprobs
                .iter()
                .map(|tokens| logprobs_json(tokens, text))
                .collect::<anyhow::Result<Vec<_>>>()?;
            object["logprobs"] = lists.first().cloned().unwrap_or_default();
            if lists.len() > 1 {
                object["sequences_logprobs"] = serde_json::Value::Array(lists);
            }
        }
        writeln!(out, "{object}")?;
        return Ok(());
    }
    let lines = decoded.unwrap_or_else(|| {
        generated
            .sequences
            .iter()
            .map(|ids| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
            .collect()
    });
    for line in lines {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// One sequence's log-probabilities in `generate --json`: per token `{"token": id, "text",
/// "logprob", "top_logprobs": [{"token", "text", "logprob"}]}` (`text` with a tokenizer).
fn logprobs_json(
    tokens: &[TokenLogprobs],
    text: Option<&TextSide>,
) -> anyhow::Result<serde_json::Value> {
    let entry = |token: u32, logprob: f32| -> anyhow::Result<serde_json::Value> {
        let mut entry = serde_json::json!({"token": token, "logprob": logprob});
        if let Some(text) = text {
            entry["text"] = text.decode(&[token])?.into();
        }
        Ok(entry)
    };
    let list = tokens
        .iter()
        .map(|t| {
            let mut scored = entry(t.token, t.logprob)?;
            let top = t
                .top_logprobs
                .iter()
                .map(|&(id, logprob)| entry(id, logprob))
                .collect::<anyhow::Result<Vec<_>>>()?;
            scored["top_logprobs"] = top.into();
            Ok(scored)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(list.into())
}
