//! One streamed request as a load-test client sees it: when it was sent, when each piece of
//! text arrived, and the text; and the server's count of a prompt's tokens.

use std::io::{BufRead, BufReader};
use std::time::Instant;

use anyhow::Context;
use serde_json::Value;

/// What a streamed request received.
#[derive(Debug, Clone)]
pub struct Streamed {
    /// When the request was sent.
    pub sent: Instant,
    /// When each chunk carrying text arrived.
    pub arrivals: Vec<Instant>,
    /// The text received.
    pub text: String,
}

impl Streamed {
    /// Seconds from sending to the first text, if any came.
    pub fn first_token_seconds(&self) -> Option<f64> {
        self.arrivals
            .first()
            .map(|at| (*at - self.sent).as_secs_f64())
    }

    /// The waits between consecutive pieces of text: `(arrival, seconds since the one
    /// before)`.
    pub fn gaps(&self) -> impl Iterator<Item = (Instant, f64)> + '_ {
        self.arrivals
            .windows(2)
            .map(|w| (w[1], (w[1] - w[0]).as_secs_f64()))
    }
}

/// POSTs `body` to `url` as a streamed request (completions or chat completions); `None` when
/// it failed or ended without `data: [DONE]`.
pub fn stream(url: &str, body: &Value) -> Option<Streamed> {
    let mut body = body.clone();
    body["stream"] = Value::Bool(true);
    let sent = Instant::now();
    let response = ureq::post(url).send_json(body).ok()?;
    let mut streamed = Streamed {
        sent,
        arrivals: Vec::new(),
        text: String::new(),
    };
    for line in BufReader::new(response.into_reader()).lines() {
        let line = line.ok()?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return Some(streamed);
        }
        let chunk: Value = serde_json::from_str(data).ok()?;
        if chunk.get("error").is_some() {
            return None;
        }
        let choice = &chunk["choices"][0];
        let text = choice["text"]
            .as_str()
            .or(choice["delta"]["content"].as_str());
        if let Some(text) = text.filter(|t| !t.is_empty()) {
            streamed.arrivals.push(Instant::now());
            streamed.text.push_str(text);
        }
    }
    None
}

/// The prompt tokens the server counts for `body` (sent whole, for one new token).
pub fn prompt_tokens(url: &str, body: &Value) -> anyhow::Result<u64> {
    let mut body = body.clone();
    body["max_tokens"] = 1.into();
    body["stream"] = false.into();
    let answer: Value = ureq::post(url)
        .send_json(body)
        .with_context(|| format!("POST {url}"))?
        .into_json()
        .with_context(|| format!("the answer of {url} is not JSON"))?;
    answer["usage"]["prompt_tokens"]
        .as_u64()
        .with_context(|| format!("the answer of {url} has no usage.prompt_tokens: {answer}"))
}

/// The value at fraction `p` of `values` (sorted here); NaN when there are none.
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n => values[((n as f64 - 1.0) * p).round() as usize],
    }
}
