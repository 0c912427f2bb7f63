//! The flags that constrain the new text (structured outputs): JSON valid against a schema, a
//! Lark grammar, or a regular expression. At most one; each is compiled against the model's
//! tokenizer before any rank starts, and an error names the flag and its file.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use parallelformers::generation::constraint::{Constraint, Grammars};
use parallelformers::text::TextSide;

/// The constraint flags of the commands that generate.
#[derive(Debug, Clone, Default, Args)]
#[group(multiple = false)]
pub struct ConstraintArgs {
    /// The new text is JSON valid against the JSON schema in FILE (written compactly; the
    /// sequence ends once the JSON is complete).
    #[arg(long, value_name = "FILE")]
    json_schema: Option<PathBuf>,
    /// The new text follows the Lark grammar in FILE (llguidance's dialect: the `start` rule
    /// is the whole text).
    #[arg(long, value_name = "FILE")]
    grammar: Option<PathBuf>,
    /// The new text is matched as a whole by this regular expression (Rust regex syntax).
    #[arg(long, value_name = "REGEX")]
    regex: Option<String>,
}

impl ConstraintArgs {
    /// The constraint the flags give, its file read and compiled against `text`'s tokenizer
    /// for logits `vocab_size` wide; `None` without a flag.
    pub fn resolve(
        &self,
        text: Option<&TextSide>,
        vocab_size: usize,
    ) -> anyhow::Result<Option<Constraint>> {
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {flag} {}", path.display()))
        };
        let (constraint, flag) = match (&self.json_schema, &self.grammar, &self.regex) {
            (Some(path), _, _) => (
                Constraint::JsonSchema(read("--json-schema", path)?),
                format!("--json-schema {}", path.display()),
            ),
            (_, Some(path), _) => (
                Constraint::Lark(read("--grammar", path)?),
                format!("--grammar {}", path.display()),
            ),
            (_, _, Some(regex)) => (
                Constraint::Regex(regex.clone()),
                format!("--regex {regex:?}"),
            ),
            _ => return Ok(None),
        };
        let text = text.with_context(|| {
            format!("{flag}: the model has no tokenizer, which constraints need")
        })?;
        Grammars::from_tokenizer(text.tokenizer.clone(), vocab_size)
            .check(&constraint)
            .with_context(|| flag)?;
        Ok(Some(constraint))
    }
}
