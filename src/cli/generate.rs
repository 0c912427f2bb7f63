//! `parallelformers generate`: greedy continuation of a prompt or of token ids.

use anyhow::{bail, Context};
use clap::Args;
use parallelformers::{parallelize, GenerateParams};
use tokenizers::Tokenizer;

use super::ModelArgs;

/// Arguments of `generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 20)]
    max_new_tokens: usize,
    /// End-of-sequence is suppressed until this many new tokens exist.
    #[arg(long, default_value_t = 0)]
    min_new_tokens: usize,
    /// Prompt as comma-separated token ids instead of text.
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt")]
    input_ids: Option<Vec<u32>>,
    /// Print one JSON object `{"generated_ids": [...], "text": "..."}`.
    #[arg(long)]
    json: bool,
    /// The prompt text (needs the checkpoint's tokenizer.json).
    prompt: Option<String>,
}

/// Runs `generate`.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let tokenizer_path = args.model.model.join("tokenizer.json");
    let tokenizer = if tokenizer_path.exists() {
        Some(
            Tokenizer::from_file(&tokenizer_path)
                .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tokenizer_path.display()))?,
        )
    } else {
        None
    };
    let prompt_ids = match (&args.input_ids, &args.prompt, &tokenizer) {
        (Some(ids), _, _) => ids.clone(),
        (None, Some(text), Some(tok)) => tok
            .encode(text.as_str(), true)
            .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?
            .get_ids()
            .to_vec(),
        (None, Some(_), None) => bail!(
            "{} has no tokenizer.json: pass the prompt as --input-ids",
            args.model.model.display()
        ),
        (None, None, _) => bail!("give a PROMPT or --input-ids"),
    };
    let mut model = parallelize(&args.model.model, args.model.options())?;
    let params = GenerateParams {
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: args.min_new_tokens,
        eos_token_ids: None,
    };
    let generated = model
        .generate(&prompt_ids, &params)
        .context("generation failed")?;
    model.deparallelize();
    let text = match &tokenizer {
        Some(tok) => Some(
            tok.decode(&generated.ids, true)
                .map_err(|e| anyhow::anyhow!("cannot decode the output: {e}"))?,
        ),
        None => None,
    };
    if args.json {
        let mut object = serde_json::json!({ "generated_ids": generated.ids });
        if let Some(text) = text {
            object["text"] = serde_json::Value::String(text);
        }
        println!("{object}");
    } else {
        match text {
            Some(text) => println!("{text}"),
            None => println!(
                "{}",
                generated
                    .ids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
    Ok(())
}
