//! Token log-probabilities in the server's answers, in OpenAI's two shapes: chat's
//! `logprobs.content` (one entry per token with its text, bytes and the most likely
//! alternatives) and the completions route's legacy `tokens` / `token_logprobs` /
//! `top_logprobs` / `text_offset` lists.
//!
//! The numbers are the model's distribution at each step (the log-softmax of the raw logits,
//! before temperature, penalties and `logit_bias`), as rank 0 computes them
//! ([`logprobs`](crate::generation::logprobs)); a token's text is its own decoding, so a token
//! that holds part of a character shows a replacement character.

use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

use crate::generation::TokenLogprobs;

/// The most alternatives chat's `top_logprobs` may ask for.
pub const MAX_CHAT_TOP_LOGPROBS: usize = crate::generation::logprobs::MAX_TOP_LOGPROBS;

/// The most alternatives the completions route's `logprobs` may ask for (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: usize = 5;

/// The log-probability reported for a token the model gives no probability (JSON has no
/// `-inf`; OpenAI and vLLM report this value).
const LEAST_LOGPROB: f32 = -9999.0;

/// A token as an answer names it: its text and its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredText {
    /// The token's text.
    pub text: String,
    /// Its log-probability.
    pub logprob: f32,
}

impl ScoredText {
    fn new(tokenizer: &Tokenizer, token: u32, logprob: f32) -> Self {
        ScoredText {
            text: tokenizer.decode(&[token], false).unwrap_or_default(),
            logprob: logprob.max(LEAST_LOGPROB),
        }
    }

    /// Chat's `{"token", "logprob", "bytes"}`.
    fn chat_json(&self) -> Value {
        json!({"token": self.text, "logprob": self.logprob, "bytes": self.text.as_bytes()})
    }
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
            logprob,
        }
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
