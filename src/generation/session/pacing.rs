//! How many prompt tokens a session prefills between two decode steps. With
//! [`PrefillChunk::Paced`] rank 0 sizes each step's prefill to take about as long as one decode
//! step of the running batch: it measures both, keeps a moving average of the decode steps, and
//! scales the last prefill's token count by how much faster or slower than that it was (growing
//! at most twofold from one step to the next, so that one fast measurement does not make the
//! running sequences wait; shrinking at once). Rank 0's choice travels with the step's broadcast, so every rank prefills the same
//! columns.

use crate::options::{PrefillChunk, FEWEST_PACED_PREFILL_TOKENS, MOST_PACED_PREFILL_TOKENS};

/// Weight of the newest decode step in the moving average of their times.
const DECODE_STEP_WEIGHT: f64 = 0.25;

/// The paced budget while sequences run and no decode step has been measured yet.
const FIRST_PACED_TOKENS: usize = 64;

/// The prefill budget of a session's steps.
pub(super) struct Pacer {
    chunk: PrefillChunk,
    /// The prompt tokens this step may prefill (the same on every rank).
    budget: usize,
    /// Moving average of the decode steps' seconds (rank 0; `None` before the first).
    decode_seconds: Option<f64>,
    /// Prompt tokens prefilled this step and their seconds (rank 0).
    prefilled: Option<(usize, f64)>,
}

impl Pacer {
    /// The pacer of a session that starts with no running sequence.
    pub fn new(chunk: PrefillChunk) -> Self {
        Pacer {
            chunk,
            budget: Self::idle_budget(chunk),
            decode_seconds: None,
            prefilled: None,
        }
    }

    /// What a step may prefill while no sequence is running: nobody waits for it.
    fn idle_budget(chunk: PrefillChunk) -> usize {
        match chunk {
            PrefillChunk::Paced => MOST_PACED_PREFILL_TOKENS,
            PrefillChunk::Tokens(tokens) => tokens.max(1),
        }
    }

    /// The prompt tokens this step may prefill.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Takes the budget rank 0 chose for the next step (what [`Pacer::next`] returned there).
    pub fn set_budget(&mut self, budget: u32) {
        self.budget = (budget as usize).max(1);
    }

    /// Records that this step prefilled `tokens` in `seconds`.
    pub fn prefilled(&mut self, tokens: usize, seconds: f64) {
        self.prefilled = (tokens > 0).then_some((tokens, seconds));
    }

    /// Records that a decode step took `seconds`.
    pub fn decoded(&mut self, seconds: f64) {
        self.decode_seconds = Some(match self.decode_seconds {
            Some(average) => average + DECODE_STEP_WEIGHT * (seconds - average),
            None => seconds,
        });
    }

    /// Rank 0's budget for the next step: whether sequences will be `running` then decides
    /// whether any wait for it.
    pub fn next(&mut self, running: bool) -> u32 {
        let budget = match self.chunk {
            PrefillChunk::Tokens(tokens) => tokens.max(1),
            PrefillChunk::Paced if !running => MOST_PACED_PREFILL_TOKENS,
            PrefillChunk::Paced => self.paced(),
        };
        self.prefilled = None;
        u32::try_from(budget).unwrap_or(u32::MAX)
    }

    /// The paced budget while sequences run: the last prefill's tokens scaled to last one
    /// average decode step.
    fn paced(&self) -> usize {
        let (fewest, most) = (FEWEST_PACED_PREFILL_TOKENS, MOST_PACED_PREFILL_TOKENS);
        let Some(decode) = self.decode_seconds else {
            return self.budget.min(FIRST_PACED_TOKENS);
        };
        let Some((tokens, seconds)) = self.prefilled else {
            return self.budget.clamp(fewest, most);
        };
        let scaled = tokens as f64 * decode / seconds.max(1e-6);
        (scaled.min(self.budget as f64 * 2.0) as usize).clamp(fewest, most)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_chunks_never_change() {
        let mut pacer = Pacer::new(PrefillChunk::Tokens(7));
        assert_eq!(pacer.budget(), 7);
        pacer.decoded(0.01);
        pacer.prefilled(7, 10.0);
        assert_eq!(pacer.next(true), 7);
        assert_eq!(pacer.next(false), 7);
    }

    #[test]
    fn paced_chunks_take_about_one_decode_step() {
        let mut pacer = Pacer::new(PrefillChunk::Paced);
        assert_eq!(pacer.budget(), MOST_PACED_PREFILL_TOKENS);
        // Sequences run, but no decode step has been measured: a first guess.
        pacer.prefilled(MOST_PACED_PREFILL_TOKENS, 0.8);
        assert_eq!(pacer.next(true), FIRST_PACED_TOKENS as u32);
        pacer.set_budget(64);
        pacer.decoded(0.040);
        // 64 tokens took 0.160 s, four decode steps: 16.
        pacer.prefilled(64, 0.160);
        assert_eq!(pacer.next(true), 16);
        pacer.set_budget(16);
        // 16 tokens took 0.020 s: 16 × 0.040 / 0.020 = 32.
        pacer.prefilled(16, 0.020);
        assert_eq!(pacer.next(true), 32);
        pacer.set_budget(32);
        // A step that prefilled nothing keeps the budget.
        assert_eq!(pacer.next(true), 32);
        // Very fast prefill at most doubles it.
        pacer.prefilled(32, 0.001);
        assert_eq!(pacer.next(true), 64);
        // Nobody running: the most.
        assert_eq!(pacer.next(false), MOST_PACED_PREFILL_TOKENS as u32);
    }

    #[test]
    fn paced_chunks_stay_within_bounds() {
        let mut pacer = Pacer::new(PrefillChunk::Paced);
        pacer.set_budget(FEWEST_PACED_PREFILL_TOKENS as u32);
        pacer.decoded(0.001);
        pacer.prefilled(FEWEST_PACED_PREFILL_TOKENS, 1.0);
        assert_eq!(pacer.next(true), FEWEST_PACED_PREFILL_TOKENS as u32);
        pacer.set_budget(MOST_PACED_PREFILL_TOKENS as u32);
        pacer.prefilled(MOST_PACED_PREFILL_TOKENS, 1e-9);
        assert_eq!(pacer.next(true), MOST_PACED_PREFILL_TOKENS as u32);
        // The moving average follows the decode steps.
        pacer.decoded(0.005);
        assert!((pacer.decode_seconds.unwrap_or(0.0) - 0.002).abs() < 1e-12);
    }
}
