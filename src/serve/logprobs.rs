//! Token log-probabilities in the server's answers, in OpenAI's two shapes: chat's
//! `logprobs.content` (one entry per token with its text, bytes and the most likely
//! alternatives) and the completions route's legacy `tokens` / `token_logprobs` /
//! `top_logprobs` / `text_offset` lists.
//!
//! The numbers are the model's distribution at each step (the log-softmax of the raw logits,
//! before temperature, penalties and `logit_bias`), as rank 0 computes them
//! ([`logprobs`](crate::generation::logprobs)); a token's text is its own decoding, so a token
//! that holds part of a character shows a replacement character, while its `bytes` are its own
//! (a byte-level BPE token's, GPT-2's byte-to-character map undone, or a byte-fallback token's),
//! so that a client can join them into the text.

use serde_json::{json, Map, Value};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::Tokenizer;

use crate::generation::TokenLogprobs;

/// The most alternatives chat's `top_logprobs` may ask for.
pub const MAX_CHAT_TOP_LOGPROBS: usize = crate::generation::logprobs::MAX_TOP_LOGPROBS;

/// The most alternatives the completions route's `logprobs` may ask for (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: usize = 5;

/// The log-probability reported for a token the model gives no probability (JSON has no
/// `-inf`; OpenAI and vLLM report this value).
const LEAST_LOGPROB: f32 = -9999.0;

/// A token as an answer names it: its text, its bytes and its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredText {
    /// The token's text.
    pub text: String,
    /// The bytes it stands for.
    pub bytes: Vec<u8>,
    /// Its log-probability.
    pub logprob: f32,
}

impl ScoredText {
    fn new(tokenizer: &Tokenizer, token: u32, logprob: f32) -> Self {
        let text = tokenizer.decode(&[token], false).unwrap_or_default();
        ScoredText {
            bytes: token_bytes(tokenizer, token).unwrap_or_else(|| text.as_bytes().to_vec()),
            text,
            logprob: logprob.max(LEAST_LOGPROB),
        }
    }

    /// Chat's `{"token", "logprob", "bytes"}`.
    fn chat_json(&self) -> Value {
        json!({"token": self.text, "logprob": self.logprob, "bytes": self.bytes})
    }
}

/// The bytes of `token` when its vocabulary entry spells them: a byte-fallback token
/// (`<0xE2>`), or any token of a byte-level BPE (GPT-2's map from bytes to characters undone).
fn token_bytes(tokenizer: &Tokenizer, token: u32) -> Option<Vec<u8>> {
    let piece = tokenizer.id_to_token(token)?;
    if let Some(byte) = byte_fallback(&piece) {
        return Some(vec![byte]);
    }
    match tokenizer.get_decoder() {
        Some(DecoderWrapper::ByteLevel(_)) => piece.chars().map(byte_of_char).collect(),
        _ => None,
    }
}

/// The byte of a byte-fallback token such as `<0xE2>`.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    match hex.len() {
        2 => u8::from_str_radix(hex, 16).ok(),
        _ => None,
    }
}

/// The byte GPT-2's byte-level map writes as `c`: the printable bytes as themselves, the
/// others, in order, as U+0100 onwards (`None` for a character outside the map).
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    let code = u32::from(c);
    if printable(code) {
        return u8::try_from(code).ok();
    }
    let rank = code.checked_sub(0x100)?;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(rank as usize)
        .and_then(|b| u8::try_from(b).ok())
}

/// One generated token's scores, ready for either shape.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScore {
    /// The token chosen.
    pub chosen: ScoredText,
    /// The most likely tokens of its step, most likely first.
    pub top: Vec<ScoredText>,
    /// Where its text starts in the choice's text, in characters (the completions route's
    /// `text_offset`).
    pub text_offset: usize,
}

impl TokenScore {
    /// `scored` named with `tokenizer`, its text starting at `text_offset`.
    pub fn new(scored: &TokenLogprobs, tokenizer: &Tokenizer, text_offset: usize) -> Self {
        TokenScore {
            chosen: ScoredText::new(tokenizer, scored.token, scored.logprob),
            top: scored
                .top_logprobs
                .iter()
                .map(|&(token, logprob)| ScoredText::new(tokenizer, token, logprob))
                .collect(),
            text_offset,
        }
    }
}

/// Chat's `logprobs`: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`.
pub fn chat(scores: &[TokenScore]) -> Value {
    let content: Vec<Value> = scores
        .iter()
        .map(|score| {
            let mut entry = score.chosen.chat_json();
            entry["top_logprobs"] = score.top.iter().map(ScoredText::chat_json).collect();
            entry
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// The completions route's legacy `logprobs`: `tokens`, `token_logprobs`, `top_logprobs`
/// (per token, a map from text to log-probability of the most likely tokens and always the
/// chosen one, so up to `logprobs + 1` entries) and `text_offset`.
pub fn completion(scores: &[TokenScore]) -> Value {
    let top: Vec<Value> = scores
        .iter()
        .map(|score| {
            let mut map = Map::new();
            for alternative in score.top.iter().chain([&score.chosen]) {
                map.entry(alternative.text.clone())
                    .or_insert(json!(alternative.logprob));
            }
            Value::Object(map)
        })
        .collect();
    json!({
        "tokens": scores.iter().map(|s| s.chosen.text.as_str()).collect::<Vec<_>>(),
        "token_logprobs": scores.iter().map(|s| s.chosen.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": scores.iter().map(|s| s.text_offset).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(text: &str, logprob: f32) -> ScoredText {
        ScoredText {
            text: text.into(),
            bytes: text.as_bytes().to_vec(),
            logprob,
        }
    }

    #[test]
    fn byte_level_and_byte_fallback_tokens_give_their_own_bytes() {
        // GPT-2's map: "Ġ" is a space, "Ċ" a newline, "é" and "â" the bytes 0xE9 and 0xE2.
        let bytes: Option<Vec<u8>> = "ĠhéĊâ".chars().map(byte_of_char).collect();
        assert_eq!(bytes, Some(vec![0x20, b'h', 0xE9, b'\n', 0xE2]));
        assert_eq!(byte_of_char(' '), None, "outside the map");
        assert_eq!(byte_of_char('€'), None);
        assert_eq!(byte_fallback("<0xE2>"), Some(0xE2));
        assert_eq!(byte_fallback("<0xE2"), None);
        assert_eq!(byte_fallback("<0x123>"), None);
    }

    fn two_tokens() -> Vec<TokenScore> {
        vec![
            TokenScore {
                chosen: scored("Hé", -0.5),
                top: vec![scored("Hé", -0.5), scored("A", -1.5)],
                text_offset: 0,
            },
            TokenScore {
                chosen: scored(" z", -4.0),
                top: vec![scored(" y", -1.0)],
                text_offset: 2,
            },
        ]
    }

    #[test]
    fn chat_lists_each_token_with_its_bytes_and_alternatives() {
        let value = chat(&two_tokens());
        let content = value["content"].as_array().unwrap();
        assert_eq!(content.len(), 2);
        assert_eq!(content[0]["token"], "Hé");
        assert_eq!(content[0]["logprob"], -0.5);
        assert_eq!(content[0]["bytes"], json!([72, 195, 169]));
        assert_eq!(content[0]["top_logprobs"][1]["token"], "A");
        assert_eq!(content[0]["top_logprobs"][1]["bytes"], json!([65]));
        assert_eq!(content[1]["top_logprobs"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn completions_list_tokens_offsets_and_alternatives_with_the_chosen_token() {
        let value = completion(&two_tokens());
        assert_eq!(value["tokens"], json!(["Hé", " z"]));
        assert_eq!(value["token_logprobs"], json!([-0.5, -4.0]));
        assert_eq!(value["text_offset"], json!([0, 2]));
        assert_eq!(value["top_logprobs"][0], json!({"Hé": -0.5, "A": -1.5}));
        // The chosen token is added when it is not among the most likely.
        assert_eq!(value["top_logprobs"][1], json!({" y": -1.0, " z": -4.0}));
    }

    #[test]
    fn an_impossible_token_is_reported_at_the_least_log_probability() {
        let tokenizer = Tokenizer::new(tokenizers::models::bpe::BPE::default());
        let score = TokenScore::new(
            &TokenLogprobs {
                token: 0,
                logprob: f32::NEG_INFINITY,
                top_logprobs: vec![],
            },
            &tokenizer,
            0,
        );
        assert_eq!(score.chosen.logprob, LEAST_LOGPROB);
    }
}
