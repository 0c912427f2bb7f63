//! Prompts of about a given number of tokens whatever the model's tokenizer: numbered
//! sentences, sized by the server's own count of a calibration prompt. Every prompt starts with
//! a salt of its own, so that a run never finds an earlier run's prompts in the server's
//! prefix cache.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::stream::prompt_tokens;

const SUBJECTS: [&str; 8] = [
    "the river",
    "a lantern",
    "the old mill",
    "a heron",
    "the north road",
    "a copper kettle",
    "the orchard",
    "a quiet bell",
];
const VERBS: [&str; 6] = [
    "rests beside",
    "points toward",
    "hides behind",
    "leans on",
    "waits near",
    "shines over",
];
const OBJECTS: [&str; 7] = [
    "the stone bridge",
    "a field of barley",
    "the harbour wall",
    "a blue door",
    "the chapel",
    "an empty cart",
    "the willow",
];

/// Sentences in the calibration prompt.
const CALIBRATION_SENTENCES: usize = 64;

/// Makes prompts of about so many tokens.
pub struct Filler {
    tokens_per_sentence: f64,
}

impl Filler {
    /// Asks the server at `base` how many tokens a prompt of sentences takes.
    pub fn calibrate(base: &str) -> anyhow::Result<Filler> {
        let url = format!("{base}/v1/completions");
        let body = json!({"prompt": notes(CALIBRATION_SENTENCES), "temperature": 0});
        let tokens = prompt_tokens(&url, &body)?;
        Ok(Filler {
            tokens_per_sentence: (tokens as f64 / CALIBRATION_SENTENCES as f64).max(1.0),
        })
    }

    /// A text of about `tokens` tokens.
    pub fn text(&self, tokens: usize) -> String {
        let sentences = (tokens as f64 / self.tokens_per_sentence).round() as usize;
        notes(sentences.max(1))
    }
}

/// `count` numbered sentences after a salt of their own.
fn notes(count: usize) -> String {
    let salt = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut text = format!("Notebook {salt}.");
    for i in 0..count {
        let (s, v, o) = (SUBJECTS[i % 8], VERBS[i % 6], OBJECTS[i % 7]);
        text.push_str(&format!(" Note {i}: {s} {v} {o}."));
    }
    text
}
