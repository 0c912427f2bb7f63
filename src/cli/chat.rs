//! `parallelformers chat`: one answer to a prompt, or an interactive conversation that keeps its
//! history, streamed to the terminal as tokens arrive. Each answer's prompt is the whole
//! conversation; the ranks' prefix cache keeps the keys and values of the conversation so far
//! (the earlier prompts and answers), so that an answer computes only the newest message.

use std::io::{BufRead, Write};

use anyhow::{ensure, Context};
use clap::Args;
use parallelformers::api::{check_generation, generation_defaults, parallelize_resolved};
use parallelformers::options::DEFAULT_PREFIX_CACHE_MIB;
use parallelformers::text::TextSide;
use parallelformers::tokenizer::Message;
use parallelformers::{GenerationConfig, Options, ParallelModel, PrefillOptions};

use super::generation_args::GenerationArgs;
use super::printer::TokenPrinter;
use super::ModelArgs;

/// Longest answer unless `--max-new-tokens` says otherwise.
const CHAT_MAX_NEW_TOKENS: usize = 256;

/// Arguments of `chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A system message to start the conversation with.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    generation: GenerationArgs,
    /// Memory of the prefix cache on each rank, in MiB (0: none): each answer starts from the
    /// keys and values the ranks kept of the conversation so far, instead of reading it again.
    #[arg(long, default_value_t = DEFAULT_PREFIX_CACHE_MIB)]
    prefix_cache_mb: u64,
    /// The question; without it, an interactive conversation starts.
    prompt: Option<String>,
}

/// A message of `role`.
fn message(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

/// Generates an answer to `messages`, printing it as it streams; returns the answer's text.
fn answer(
    model: &mut ParallelModel,
    text: &TextSide,
    messages: &[Message],
    config: &GenerationConfig,
) -> anyhow::Result<String> {
    let prompt = text.chat_prompt(messages)?;
    let mut printer = TokenPrinter::new(text);
    let generated = model.generate_stream(&prompt, config, |token| printer.push(token))?;
    printer.finish()?;
    Ok(text.decode(&generated.ids)?)
}

/// Runs `chat`. Every argument is checked before any rank starts.
pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    if let Some(prompt) = &args.prompt {
        ensure!(
            !prompt.trim().is_empty(),
            "the PROMPT is empty: ask something, or give no PROMPT for an interactive chat"
        );
    }
    let resolved = args.model.resolve()?;
    let path = resolved.location.path().display().to_string();
    let text = TextSide::load(&resolved)?.with_context(|| {
        format!("{path} has no tokenizer, so it cannot chat; use `generate --input-ids`")
    })?;
    ensure!(
        text.template.is_some(),
        "{path} has no chat template (tokenizer.chat_template / tokenizer_config.json); use `generate` for raw prompts"
    );
    let mut config = args.generation.apply(&GenerationConfig {
        max_new_tokens: CHAT_MAX_NEW_TOKENS,
        ..generation_defaults(&resolved)?
    });
    config.constraint = args
        .generation
        .constraint(Some(&text), resolved.config.vocab_size)?;
    let mut messages: Vec<Message> = args.system.iter().map(|s| message("system", s)).collect();
    // The first answer's prompt (the shortest any answer has) is checked with the options.
    let first = [
        messages.clone(),
        vec![message("user", args.prompt.as_deref().unwrap_or_default())],
    ]
    .concat();
    check_generation(&resolved, &[text.chat_prompt(&first)?], &config)?;
    // The conversation's keys and values stay in the ranks' prefix cache between answers.
    let options = Options {
        prefill: PrefillOptions {
            prefix_cache_bytes: args.prefix_cache_mb.saturating_mul(1 << 20),
            ..PrefillOptions::default()
        },
        ..args.model.options()
    };
    let mut model = parallelize_resolved(resolved, options)?;
    if args.prompt.is_some() {
        answer(&mut model, &text, &first, &config)?;
        model.deparallelize();
        return Ok(());
    }
    let mut prompt = std::io::stderr();
    writeln!(
        prompt,
        "Chatting with the model on {} ranks. End of input (Ctrl-D) quits.",
        model.load_report().len()
    )?;
    let mut lines = std::io::stdin().lock().lines();
    loop {
        write!(prompt, "> ")?;
        let Some(line) = lines.next().transpose()? else {
            // Leave the terminal on a fresh line.
            writeln!(prompt)?;
            break;
        };
        if line.trim().is_empty() {
            continue;
        }
        messages.push(message("user", &line));
        let reply = answer(&mut model, &text, &messages, &config)?;
        messages.push(message("assistant", &reply));
    }
    model.deparallelize();
    Ok(())
}
