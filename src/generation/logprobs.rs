//! Log-probabilities of generated tokens ("scores out"), computed on rank 0 from the logits it
//! chooses with.
//!
//! What is reported is the **model's distribution**: the log-softmax of the raw logits of the
//! step, before any logits processor, warper, temperature or bias. That is what OpenAI's and
//! vLLM's `logprobs` report, and transformers'
//! `compute_transition_scores(sequences, outputs.logits, beam_indices, normalize_logits=True)`
//! with `output_logits=True`. (transformers' `output_scores` are the *processed* scores instead:
//! with a repetition penalty, top-k or a bias they differ from these; a token's log-probability
//! here does not depend on how it was chosen.)

use serde::{Deserialize, Serialize};

use crate::generation::processors::log_softmax;

/// The most alternatives a step may report (OpenAI's limit for `top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One generated token's log-probability under the model's distribution at its step, with the
/// most likely tokens of that step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// The token chosen.
    pub token: u32,
    /// Its log-probability (natural logarithm).
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens of the step and their log-probabilities, most
    /// likely first (the lower id first on ties); the chosen token is among them only if it is
    /// that likely.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// One row's distribution at one step: its log-probabilities and its most likely tokens, to
/// score whichever tokens are chosen from it (beam search chooses several).
#[derive(Debug, Clone)]
pub struct StepDistribution {
    log_probs: Vec<f32>,
    top: Vec<(u32, f32)>,
}

impl StepDistribution {
    /// The distribution of a row of raw `logits`, keeping its `top` most likely tokens.
    pub fn from_logits(logits: &[f32], top: usize) -> Self {
        Self::from_log_probs(log_softmax(logits), top)
    }

    /// The distribution whose log-probabilities are `log_probs`, keeping its `top` most likely
    /// tokens.
    pub fn from_log_probs(log_probs: Vec<f32>, top: usize) -> Self {
        let top = most_likely(&log_probs, top);
        StepDistribution { log_probs, top }
    }

    /// The scores of `token` chosen at this step.
    pub fn score(&self, token: u32) -> TokenLogprobs {
        TokenLogprobs {
            token,
            logprob: self
                .log_probs
                .get(token as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY),
            top_logprobs: self.top.clone(),
        }
    }
}

/// The `n` largest of `log_probs` with their ids, largest first, the lower id first on ties.
fn most_likely(log_probs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(log_probs.len());
    if n == 0 {
        return Vec::new();
    }
    let better = |a: &usize, b: &usize| log_probs[*b].total_cmp(&log_probs[*a]).then(a.cmp(b));
    let mut order: Vec<usize> = (0..log_probs.len()).collect();
    order.select_nth_unstable_by(n - 1, better);
    order.truncate(n);
    order.sort_by(better);
    order
        .into_iter()
        .map(|i| (i as u32, log_probs[i]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokens_log_probability_is_the_log_softmax_of_the_raw_logits() {
        // Probabilities 1/6, 2/6, 3/6.
        let logits = [0.0f32, 2f32.ln(), 3f32.ln()];
        let step = StepDistribution::from_logits(&logits, 2);
        let scored = step.score(1);
        assert_eq!(scored.token, 1);
        assert!((scored.logprob - (2.0f32 / 6.0).ln()).abs() < 1e-6);
        let top: Vec<u32> = scored.top_logprobs.iter().map(|&(id, _)| id).collect();
        assert_eq!(top, [2, 1]);
        assert!((scored.top_logprobs[0].1 - 0.5f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn the_most_likely_tokens_come_first_and_ties_go_to_the_lower_id() {
        let log_probs = [-3.0, -1.0, -2.0, -1.0, f32::NEG_INFINITY];
        assert_eq!(
            most_likely(&log_probs, 3),
            [(1, -1.0), (3, -1.0), (2, -2.0)]
        );
        assert_eq!(most_likely(&log_probs, 0), []);
        assert_eq!(
            most_likely(&log_probs, 9).len(),
            5,
            "at most the vocabulary"
        );
    }

    #[test]
    fn a_token_outside_the_row_has_no_probability() {
        let step = StepDistribution::from_log_probs(vec![0.0], 0);
        assert_eq!(step.score(3).logprob, f32::NEG_INFINITY);
        assert!(step.score(0).top_logprobs.is_empty());
    }
}
