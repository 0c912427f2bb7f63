//! Generated text printed to standard output as tokens arrive (complete characters only), for
//! `generate` and `chat`. A failed write (the reader of a pipe went away) or a failed decode
//! asks the generation to stop: no one will read the rest.

use std::io::{StdoutLock, Write};
use std::ops::ControlFlow;

use anyhow::Context;
use parallelformers::text::TextSide;
use parallelformers::tokenizer::TextStream;

/// Prints the text of generated tokens as it becomes final.
pub struct TokenPrinter<'a> {
    text: &'a TextSide,
    stream: TextStream,
    out: StdoutLock<'static>,
    /// The first failure; nothing is printed after it.
    failure: Option<anyhow::Error>,
}

impl<'a> TokenPrinter<'a> {
    /// A printer decoding with `text`'s tokenizer.
    pub fn new(text: &'a TextSide) -> Self {
        TokenPrinter {
            text,
            stream: TextStream::new(),
            out: std::io::stdout().lock(),
            failure: None,
        }
    }

    /// Prints the text `token` completes; asks to stop once printing or decoding failed.
    pub fn push(&mut self, token: u32) -> ControlFlow<()> {
        if self.failure.is_none() {
            self.failure = self.print(token).err();
        }
        match self.failure {
            Some(_) => ControlFlow::Break(()),
            None => ControlFlow::Continue(()),
        }
    }

    /// Prints the text held back and ends the line; the first failure, if any.
    pub fn finish(mut self) -> anyhow::Result<()> {
        if let Some(failure) = self.failure.take() {
            return Err(failure);
        }
        let rest = self
            .stream
            .finish(&self.text.tokenizer)
            .context("cannot decode the generated text")?;
        writeln!(self.out, "{}", rest.unwrap_or_default())?;
        Ok(())
    }

    fn print(&mut self, token: u32) -> anyhow::Result<()> {
        let piece = self
            .stream
            .push(&self.text.tokenizer, token)
            .context("cannot decode the generated text")?;
        if let Some(piece) = piece {
            write!(self.out, "{piece}")?;
            self.out.flush()?;
        }
        Ok(())
    }
}
