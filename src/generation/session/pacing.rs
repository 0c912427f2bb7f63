//! How many prompt tokens a session prefills with each decode step. With
//! [`PrefillChunk::Paced`] rank 0 sizes each step's prefill to add about
//! [`PACED_PREFILL_SHARE`] of a decode step of the running batch to the pass they share: it
//! measures decode steps alone (a moving average) and the passes that also prefill, reckons
//! the prefill's part as the difference, and scales the last prefill's token count by how far
//! from its goal that part was (growing at most twofold from one step to the next, so that one
//! fast measurement does not make the running sequences wait; shrinking at once). Rank 0's
//! choice travels with the step's broadcast, so every rank prefills the same columns.

use crate::options::{
    PrefillChunk, FEWEST_PACED_PREFILL_TOKENS, MOST_PACED_PREFILL_TOKENS, PACED_PREFILL_SHARE,
};

/// Weight of the newest decode step in the moving average of their times.
const DECODE_STEP_WEIGHT: f64 = 0.25;

/// The least share of a pass shared with a decode step that is reckoned as prefill (the
/// decode step's average may exceed the pass's time on a noisy machine).
const MIN_PREFILL_SHARE: f64 = 0.05;

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

    /// Records that a pass prefilled `tokens` beside a decode step in `seconds`; returns the
    /// part of them the prefill is reckoned to have taken (beyond an average decode step).
    pub fn prefilled_beside_decode(&mut self, tokens: usize, seconds: f64) -> f64 {
        let prefill =
            (seconds - self.decode_seconds.unwrap_or(0.0)).max(seconds * MIN_PREFILL_SHARE);
        self.prefilled(tokens, prefill);
        prefill
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

    /// The paced budget while sequences run: the last prefill's tokens scaled to last
    /// [`PACED_PREFILL_SHARE`] of an average decode step.
    fn paced(&self) -> usize {
        let (fewest, most) = (FEWEST_PACED_PREFILL_TOKENS, MOST_PACED_PREFILL_TOKENS);
        let Some(decode) = self.decode_seconds else {
            return self.budget.min(FIRST_PACED_TOKENS);
        };
        let Some((tokens, seconds)) = self.prefilled else {
            return self.budget.clamp(fewest, most);
        };
        let scaled = tokens as f64 * PACED_PREFILL_SHARE * decode / seconds.max(1e-6);
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
    fn paced_chunks_add_about_half_a_decode_step() {
        let mut pacer = Pacer::new(PrefillChunk::Paced);
        assert_eq!(pacer.budget(), MOST_PACED_PREFILL_TOKENS);
        // Sequences run, but no decode step has been measured: a first guess.
        pacer.prefilled(MOST_PACED_PREFILL_TOKENS, 0.8);
        assert_eq!(pacer.next(true), FIRST_PACED_TOKENS as u32);
        pacer.set_budget(64);
        pacer.decoded(0.040);
        // 64 tokens took 0.160 s, eight times the goal of 0.020 s: 8.
        pacer.prefilled(64, 0.160);
        assert_eq!(pacer.next(true), 8);
        pacer.set_budget(8);
        // Beside a decode step, the pass took 0.045 s: 0.005 s of prefill, a quarter of the
        // goal, but the budget at most doubles: 16.
        let prefill = pacer.prefilled_beside_decode(8, 0.045);
        assert!((prefill - 0.005).abs() < 1e-12);
        assert_eq!(pacer.next(true), 16);
        pacer.set_budget(16);
        // 16 tokens beside the step took 0.060 s: 0.020 s of prefill, the goal.
        pacer.prefilled_beside_decode(16, 0.060);
        assert_eq!(pacer.next(true), 16);
        // A step that prefilled nothing keeps the budget.
        assert_eq!(pacer.next(true), 16);
        // A pass faster than the decode average still counts a little prefill.
        let prefill = pacer.prefilled_beside_decode(16, 0.030);
        assert!((prefill - 0.030 * MIN_PREFILL_SHARE).abs() < 1e-12);
        assert_eq!(pacer.next(true), 32);
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
