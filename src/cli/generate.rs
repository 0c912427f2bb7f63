//! `parallelformers generate`: continuation of a raw prompt or of token ids, printed as it is
//! generated, with every generation option of transformers' `generate` as a flag.

use anyhow::{bail, Context};
use clap::Args;
use parallelformers::api::parallelize_resolved;
use parallelformers::text::TextSide;
use std::io::Write;
use std::ops::ControlFlow;

use parallelformers::tokenizer::TextStream;

use super::generation_args::GenerationArgs;
use super::ModelArgs;

/// Arguments of `generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    generation: GenerationArgs,
    /// Prompt as comma-separated token ids instead of text.
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt")]
    input_ids: Option<Vec<u32>>,
    /// Print one JSON object `{"generated_ids": [...], "text": "..."}`.
    #[arg(long)]
    json: bool,
    /// The prompt text (needs the model's tokenizer).
    prompt: Option<String>,
}

/// Runs `generate`.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let resolved = args.model.resolve()?;
    let text = TextSide::load(&resolved)?;
    let prompt_ids = match (&args.input_ids, &args.prompt, &text) {
        (Some(ids), _, _) => ids.clone(),
        (None, Some(prompt), Some(text)) => text.encode(prompt)?,
        (None, Some(_), None) => bail!(
            "{} has no tokenizer: pass the prompt as --input-ids",
            resolved.location.path().display()
        ),
        (None, None, _) => bail!("give a PROMPT or --input-ids"),
    };
    let mut model = parallelize_resolved(resolved, args.model.options())?;
    let config = args.generation.apply(model.generation_config());
    // Text streams to standard output as tokens are chosen (complete characters only).
    let mut stream = TextStream::new();
    let mut stdout = std::io::stdout();
    let streaming = !args.json && text.is_some() && config.num_return_sequences == 1;
    let mut on_token = |token: u32| {
        if let (true, Some(text)) = (streaming, &text) {
            if let Ok(Some(piece)) = stream.push(&text.tokenizer, token) {
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            }
        }
        ControlFlow::Continue(())
    };
    let generated = model
        .generate_stream(&prompt_ids, &config, &mut on_token)
        .context("generation failed")?;
    model.deparallelize();
    if streaming {
        if let Some(text) = &text {
            if let Some(rest) = stream.finish(&text.tokenizer)? {
                print!("{rest}");
            }
        }
        println!();
        return Ok(());
    }
    let decoded = match &text {
        Some(t) => Some(
            generated
                .sequences
                .iter()
                .map(|ids| t.decode(ids))
                .collect::<parallelformers::Result<Vec<_>>>()?,
        ),
        None => None,
    };
    if args.json {
        let mut object = serde_json::json!({ "generated_ids": generated.ids });
        if generated.sequences.len() > 1 {
            object["sequences"] = serde_json::json!(generated.sequences);
        }
        if let Some(decoded) = &decoded {
            object["text"] = serde_json::Value::String(decoded[0].clone());
            if decoded.len() > 1 {
                object["texts"] = serde_json::json!(decoded);
            }
        }
        println!("{object}");
        return Ok(());
    }
    match decoded {
        Some(decoded) => decoded.iter().for_each(|d| println!("{d}")),
        None => generated.sequences.iter().for_each(|ids| {
            println!(
                "{}",
                ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            )
        }),
    }
    Ok(())
}
