//! `parallelformers generate`: greedy continuation of a raw prompt or of token ids.

use anyhow::{bail, Context};
use clap::Args;
use parallelformers::api::parallelize_resolved;
use parallelformers::text::TextSide;
use parallelformers::GenerateParams;

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
    let mut model = parallelize_resolved(resolved, args.model.options(1))?;
    let params = GenerateParams {
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: args.min_new_tokens,
        eos_token_ids: None,
    };
    let generated = model
        .generate(&prompt_ids, &params)
        .context("generation failed")?;
    model.deparallelize();
    let decoded = text
        .as_ref()
        .map(|t| t.decode(&generated.ids))
        .transpose()?;
    if args.json {
        let mut object = serde_json::json!({ "generated_ids": generated.ids });
        if let Some(decoded) = decoded {
            object["text"] = serde_json::Value::String(decoded);
        }
        println!("{object}");
    } else {
        match decoded {
            Some(decoded) => println!("{decoded}"),
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
