//! Incremental detokenization for streaming generated text.
//!
//! Decoding one token at a time does not work: a byte-level token can hold half of a UTF-8
//! character (an emoji is often two or three tokens), and SentencePiece decoders treat the first
//! token of a sequence differently (they strip its leading space). [`TextStream`] decodes a
//! sliding window of ids instead and hands out only the text that is final.

use tokenizers::Tokenizer;

use super::TokenizerError;

/// Turns a growing sequence of token ids into text pieces for streaming, never splitting a
/// multi-byte character: emit only text that is final (no trailing U+FFFD from an incomplete UTF-8
/// sequence), skipping special tokens.
///
/// The concatenation of every piece returned by [`push`](Self::push) and
/// [`finish`](Self::finish) equals `tokenizer.decode(all_ids, true)`.
///
/// It works like `transformers`' `TextStreamer` and text-generation-inference: it decodes the ids
/// from `prefix_offset` to the end and the ids from `prefix_offset` to `read_offset`, and hands
/// out the difference once it does not end in U+FFFD. The window of already handed-out ids gives
/// the decoder the context it needs (the space a SentencePiece decoder strips from the first
/// token is only stripped once).
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    emitted_bytes: usize,
}

impl TextStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Add the next generated id. Returns the text that became final with it, or `None` when
    /// nothing new is final yet (an incomplete character, a special token, an empty token).
    pub fn push(
        &mut self,
        tokenizer: &Tokenizer,
        id: u32,
    ) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        self.advance(tokenizer, false)
    }

    /// The text still held back after the last id (for example an incomplete character at the
    /// end, which is handed out as U+FFFD as `decode` does). Call once generation has stopped;
    /// the stream is then empty and can be reused.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>, TokenizerError> {
        let piece = self.advance(tokenizer, true)?;
        *self = Self::default();
        Ok(piece)
    }

    fn advance(
        &mut self,
        tokenizer: &Tokenizer,
        flush: bool,
    ) -> Result<Option<String>, TokenizerError> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let prefix_text = decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset])?;
        let new_text = decode(tokenizer, &self.ids[self.prefix_offset..])?;
        if !new_text.starts_with(&prefix_text) {
            // A decoder whose output for the window depends on what follows: fall back to
            // decoding everything and handing out what extends the text already handed out.
            return self.advance_from_full(tokenizer, flush);
        }
        let piece = &new_text[prefix_text.len()..];
        if piece.is_empty() || (!flush && self.held_back(tokenizer, piece)) {
            return Ok(None);
        }
        let piece = piece.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.emitted_bytes += piece.len();
        Ok(Some(piece))
    }

    /// Whether `piece` may still change when more ids follow: it ends in an incomplete character
    /// (U+FFFD), or the last id that shows in the text is a byte-fallback token (`<0xE4>`):
    /// the `ByteFallback` decoder turns a whole run of byte tokens into U+FFFDs, text already
    /// decoded from it included, when the run does not end up as valid UTF-8, so such a run is
    /// only final once a token of another kind follows it.
    fn held_back(&self, tokenizer: &Tokenizer, piece: &str) -> bool {
        if piece.ends_with(char::REPLACEMENT_CHARACTER) {
            return true;
        }
        let added = tokenizer.get_added_vocabulary();
        for &id in self.ids[self.read_offset..].iter().rev() {
            let Some(token) = tokenizer.id_to_token(id) else {
                continue; // ids without a token decode to nothing
            };
            if added.is_special_token(&token) {
                continue; // skipped when decoding
            }
            return is_byte_fallback_token(&token);
        }
        false
    }

    fn advance_from_full(
        &mut self,
        tokenizer: &Tokenizer,
        flush: bool,
    ) -> Result<Option<String>, TokenizerError> {
        let full = decode(tokenizer, &self.ids)?;
        if full.len() < self.emitted_bytes || !full.is_char_boundary(self.emitted_bytes) {
            return Err(TokenizerError::StreamDiverged {
                emitted_bytes: self.emitted_bytes,
            });
        }
        let piece = &full[self.emitted_bytes..];
        if piece.is_empty() || (!flush && self.held_back(tokenizer, piece)) {
            return Ok(None);
        }
        let piece = piece.to_string();
        // Restart the window at the end: later ids are decoded in the context of none of these.
        // The next call compares against the full decode again if the window disagrees.
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        self.emitted_bytes += piece.len();
        Ok(Some(piece))
    }
}

/// `<0xXX>`: a SentencePiece byte-fallback token.
fn is_byte_fallback_token(token: &str) -> bool {
    let bytes = token.as_bytes();
    bytes.len() == 6
        && token.starts_with("<0x")
        && bytes[5] == b'>'
        && bytes[3].is_ascii_hexdigit()
        && bytes[4].is_ascii_hexdigit()
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, TokenizerError> {
    tokenizer
        .decode(ids, true)
        .map_err(|e| TokenizerError::Decode {
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::gguf_vocab::{bytes_to_unicode, tokenizer_from_gguf, GgufVocab};

    /// A byte-level BPE with a few merges: `😀` (F0 9F 98 80) is two tokens, `F0 9F` and
    /// `98 80`; `é` (C3 A9) is two single-byte tokens; `<|im_end|>` is special.
    fn tokenizer() -> Tokenizer {
        let table = bytes_to_unicode();
        let spell = |bytes: &[u8]| -> String { bytes.iter().map(|b| table[*b as usize]).collect() };
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_end|>".into()];
        tokens.extend(table.iter().map(|c| c.to_string()));
        let mut merges = Vec::new();
        for (l, r) in [
            (&[0xF0u8][..], &[0x9Fu8][..]),
            (&[0x98], &[0x80]),
            (b"H", b"i"),
            (b" ", b"t"),
            (b" t", b"h"),
            (b" th", b"e"),
        ] {
            merges.push(format!("{} {}", spell(l), spell(r)));
            tokens.push(format!("{}{}", spell(l), spell(r)));
        }
        let mut token_types = vec![3, 3];
        token_types.resize(tokens.len(), 1);
        tokenizer_from_gguf(&GgufVocab {
            model: "gpt2".into(),
            pre: Some("default".into()),
            tokens,
            token_types,
            merges,
            eos_token_id: Some(1),
            ..GgufVocab::default()
        })
        .expect("tokenizer")
    }

    fn stream_all(tok: &Tokenizer, ids: &[u32]) -> (Vec<String>, String) {
        let mut stream = TextStream::new();
        let mut pieces = Vec::new();
        for &id in ids {
            if let Some(piece) = stream.push(tok, id).expect("push") {
                pieces.push(piece);
            }
        }
        if let Some(piece) = stream.finish(tok).expect("finish") {
            pieces.push(piece);
        }
        let joined = pieces.concat();
        (pieces, joined)
    }

    #[test]
    fn emoji_split_across_tokens_is_emitted_whole() {
        let tok = tokenizer();
        let ids = tok
            .encode("Hi 😀 the é<|im_end|>", false)
            .expect("encode")
            .get_ids()
            .to_vec();
        let table = bytes_to_unicode();
        let f09f = tok
            .token_to_id(&format!("{}{}", table[0xF0], table[0x9F]))
            .expect("id");
        let x9880 = tok
            .token_to_id(&format!("{}{}", table[0x98], table[0x80]))
            .expect("id");
        // The emoji really is split: F0 9F, then 98 80.
        assert!(ids.windows(2).any(|w| w == [f09f, x9880]), "{ids:?}");
        let mut stream = TextStream::new();
        let mut pieces = Vec::new();
        for &id in &ids {
            let piece = stream.push(&tok, id).expect("push");
            if let Some(p) = &piece {
                assert!(
                    !p.contains('\u{FFFD}'),
                    "incomplete character handed out: {p:?}"
                );
            }
            pieces.extend(piece);
        }
        pieces.extend(stream.finish(&tok).expect("finish"));
        assert!(pieces.iter().any(|p| p.contains('😀')), "{pieces:?}");
        assert_eq!(pieces.concat(), tok.decode(&ids, true).expect("decode"));
        assert_eq!(pieces.concat(), "Hi 😀 the é");
    }

    #[test]
    fn pieces_concatenate_to_full_decode() {
        let tok = tokenizer();
        for text in [
            "",
            "Hi",
            "😀😀😀",
            " the the the",
            "é😀<|endoftext|>é",
            "<|im_end|><|im_end|>",
            "a\u{200d}b 👨‍👩‍👧",
        ] {
            let ids = tok.encode(text, false).expect("encode").get_ids().to_vec();
            let (_, joined) = stream_all(&tok, &ids);
            assert_eq!(joined, tok.decode(&ids, true).expect("decode"), "{text:?}");
        }
    }

    #[test]
    fn incomplete_character_at_the_end_is_flushed_by_finish() {
        let tok = tokenizer();
        let f09f = tok
            .token_to_id(&format!(
                "{}{}",
                bytes_to_unicode()[0xF0],
                bytes_to_unicode()[0x9F]
            ))
            .expect("id");
        let hi = tok.token_to_id("Hi").expect("id");
        let mut stream = TextStream::new();
        assert_eq!(stream.push(&tok, hi).expect("push").as_deref(), Some("Hi"));
        assert_eq!(stream.push(&tok, f09f).expect("push"), None);
        let rest = stream.finish(&tok).expect("finish");
        assert_eq!(rest.as_deref(), Some("\u{FFFD}"));
        assert_eq!(tok.decode(&[hi, f09f], true).expect("decode"), "Hi\u{FFFD}");
        // finish() leaves the stream empty and reusable.
        assert_eq!(stream.ids(), &[] as &[u32]);
        assert_eq!(stream.push(&tok, hi).expect("push").as_deref(), Some("Hi"));
    }

    #[test]
    fn special_tokens_are_skipped() {
        let tok = tokenizer();
        let mut stream = TextStream::new();
        assert_eq!(stream.push(&tok, 1).expect("push"), None);
        assert_eq!(stream.push(&tok, 0).expect("push"), None);
        assert_eq!(stream.finish(&tok).expect("finish"), None);
    }

    #[test]
    fn random_id_sequences_concatenate_to_full_decode() {
        let tok = tokenizer();
        let vocab = tok.get_vocab_size(true) as u64;
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..200 {
            let mut ids = Vec::new();
            for _ in 0..(state % 40) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ids.push((state % vocab) as u32);
            }
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let (_, joined) = stream_all(&tok, &ids);
            assert_eq!(joined, tok.decode(&ids, true).expect("decode"), "{ids:?}");
        }
    }

    /// A SentencePiece vocabulary with byte fallback: `<0x00>`..`<0xFF>` are ids 3..=258.
    fn sentencepiece_tokenizer() -> Tokenizer {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        tokens.extend(["▁", "▁a", "▁b", "a", "b"].iter().map(|s| s.to_string()));
        let mut token_types = vec![2, 3, 3];
        token_types.extend(std::iter::repeat_n(6, 256));
        token_types.extend([1, 1, 1, 1, 1]);
        let mut scores = vec![0.0; 259];
        scores.extend([-1.0, -2.0, -3.0, -4.0, -5.0]);
        tokenizer_from_gguf(&GgufVocab {
            model: "llama".into(),
            tokens,
            token_types,
            scores,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            unknown_token_id: Some(0),
            ..GgufVocab::default()
        })
        .expect("tokenizer")
    }

    #[test]
    fn sentencepiece_leading_space_is_stripped_once() {
        let tok = sentencepiece_tokenizer();
        for text in ["a b a b", " a  b", "a é 😀 b"] {
            let ids = tok.encode(text, true).expect("encode").get_ids().to_vec();
            let (pieces, joined) = stream_all(&tok, &ids);
            assert_eq!(
                joined,
                tok.decode(&ids, true).expect("decode"),
                "{text:?} {pieces:?}"
            );
            assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        }
    }

    #[test]
    fn byte_fallback_runs_are_held_until_they_end() {
        let tok = sentencepiece_tokenizer();
        let byte = |b: u8| 3 + u32::from(b);
        let a = tok.token_to_id("a").expect("id");
        // "a" then the bytes of "你" (E4 BD A0): nothing of the run is handed out before it ends.
        let mut stream = TextStream::new();
        assert_eq!(stream.push(&tok, a).expect("push").as_deref(), Some("a"));
        assert_eq!(stream.push(&tok, byte(0x41)).expect("push"), None);
        assert_eq!(stream.push(&tok, byte(0xE4)).expect("push"), None);
        assert_eq!(stream.push(&tok, byte(0xBD)).expect("push"), None);
        assert_eq!(stream.push(&tok, byte(0xA0)).expect("push"), None);
        assert_eq!(stream.push(&tok, a).expect("push").as_deref(), Some("A你a"));
        // A run cut short: ByteFallback turns the whole run into U+FFFDs, the valid "A" included,
        // and so does the stream.
        let ids = [a, byte(0x41), byte(0xE4), byte(0xBD)];
        let (_, joined) = stream_all(&tok, &ids);
        assert_eq!(joined, tok.decode(&ids, true).expect("decode"));
        assert_eq!(joined, "a\u{FFFD}\u{FFFD}\u{FFFD}");
    }

    #[test]
    fn sentencepiece_random_ids_concatenate_to_full_decode() {
        let tok = sentencepiece_tokenizer();
        let vocab = tok.get_vocab_size(true) as u64;
        let mut state = 0x1234_5678_9ABC_DEF1u64;
        for _ in 0..500 {
            let mut ids = Vec::new();
            for _ in 0..(state % 30) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Bias towards byte tokens, half of them from the UTF-8 lead/continuation range.
                let id = match state % 4 {
                    0 | 1 => 3 + 0x80 + (state >> 8) % 0x78,
                    _ => (state >> 8) % vocab,
                };
                ids.push(id as u32);
            }
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let (_, joined) = stream_all(&tok, &ids);
            assert_eq!(joined, tok.decode(&ids, true).expect("decode"), "{ids:?}");
        }
    }
}
