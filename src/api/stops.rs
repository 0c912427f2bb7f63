//! Stop strings, watched in a sequence's text as its tokens stream in the main process.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::text::TextSide;
use crate::tokenizer::stream::TextStream;

/// One sequence's text so far, checked for stop strings after each token.
pub(super) struct StopWatch {
    text: Arc<TextSide>,
    stops: Vec<String>,
    stream: TextStream,
    seen: String,
}

impl StopWatch {
    /// Watches for `stops`, decoding with `text`'s tokenizer.
    pub(super) fn new(text: Arc<TextSide>, stops: &[String]) -> Self {
        StopWatch {
            text,
            stops: stops.to_vec(),
            stream: TextStream::new(),
            seen: String::new(),
        }
    }

    /// Adds `token` to the text; whether the text now contains a stop string.
    pub(super) fn push(&mut self, token: u32) -> Result<bool> {
        let piece = self
            .stream
            .push(&self.text.tokenizer, token)
            .map_err(|e| Error::Tokenizer(format!("cannot decode token {token}: {e}")))?;
        let Some(piece) = piece else {
            return Ok(false);
        };
        // Only the new text, and what before it could begin a stop string, needs a look.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut start = self.seen.len().saturating_sub(longest);
        while !self.seen.is_char_boundary(start) {
            start -= 1;
        }
        self.seen.push_str(&piece);
        Ok(self
            .stops
            .iter()
            .any(|stop| self.seen[start..].contains(stop.as_str())))
    }
}
