//! `parallelformers chat`: one answer to a prompt, or an interactive conversation that keeps its
//! history, streamed to the terminal as tokens arrive.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;

use anyhow::Context;
use clap::Args;
use parallelformers::text::TextSide;
use parallelformers::tokenizer::{Message, TextStream};
use parallelformers::{GenerationConfig, ParallelModel};

use super::generation_args::GenerationArgs;
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
    /// The question; without it, an interactive conversation starts.
    prompt: Option<String>,
}

/// Generates an answer to `messages`, printing it as it streams; returns the answer's text.
fn answer(
    model: &mut ParallelModel,
    text: &TextSide,
    messages: &[Message],
    config: &GenerationConfig,
) -> anyhow::Result<String> {
    let prompt = text.chat_prompt(messages)?;
    let mut stream = TextStream::new();
    let mut stdout = std::io::stdout();
    let mut failure = None;
    let generated = model.generate_stream(&prompt, config, |token| {
        match stream.push(&text.tokenizer, token) {
            Ok(Some(piece)) => {
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            }
            Ok(None) => {}
            Err(e) => failure = Some(e),
        }
        ControlFlow::Continue(())
    })?;
    if let Some(e) = failure {
        return Err(anyhow::anyhow!("cannot decode the answer: {e}"));
    }
    if let Some(rest) = stream
        .finish(&text.tokenizer)
        .map_err(|e| anyhow::anyhow!("cannot decode the answer: {e}"))?
    {
        write!(stdout, "{rest}")?;
    }
    writeln!(stdout)?;
    Ok(text.decode(&generated.ids)?)
}

/// Runs `chat`.
pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let resolved = args.model.resolve()?;
    let path = resolved.location.path().display().to_string();
    let text = TextSide::load(&resolved)?.with_context(|| {
        format!("{path} has no tokenizer, so it cannot chat; use `generate --input-ids`")
    })?;
    anyhow::ensure!(
        text.template.is_some(),
        "{path} has no chat template (tokenizer.chat_template / tokenizer_config.json); use `generate` for raw prompts"
    );
    let mut model = parallelformers::api::parallelize_resolved(resolved, args.model.options())?;
    let config = args.generation.apply(&GenerationConfig {
        max_new_tokens: CHAT_MAX_NEW_TOKENS,
        ..model.generation_config().clone()
    });
    let mut messages: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message {
            role: "system".into(),
            content: s.clone(),
        })
        .collect();
    let user = |content: String| Message {
        role: "user".into(),
        content,
    };
    if let Some(prompt) = args.prompt {
        messages.push(user(prompt));
        answer(&mut model, &text, &messages, &config)?;
        model.deparallelize();
        return Ok(());
    }
    eprintln!(
        "Chatting with the model on {} ranks. An empty line or end of input quits.",
        model.load_report().len()
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let Some(line) = lines.next().transpose()? else {
            break;
        };
        if line.trim().is_empty() {
            break;
        }
        messages.push(user(line));
        let reply = answer(&mut model, &text, &messages, &config)?;
        messages.push(Message {
            role: "assistant".into(),
            content: reply,
        });
    }
    model.deparallelize();
    Ok(())
}
