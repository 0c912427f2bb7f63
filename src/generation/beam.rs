//! Beam search with the semantics of transformers' `_beam_search`: every prompt's beams run as
//! rows of one batch through the model; rank 0 keeps the scores, picks each step's best
//! continuations and which cached row each surviving beam continues, and broadcasts both; at
//! the end it broadcasts the best finished hypotheses with their length-normalised scores.

use candle_core::Tensor;

use crate::comm::Communicator;
use crate::error::Result;
use crate::generation::config::EarlyStopping;
use crate::generation::logprobs::{StepDistribution, TokenLogprobs};
use crate::generation::processors::{log_softmax, History, LogitsPipeline};
use crate::generation::{broadcast_words, GenerateRequest, GeneratedBatch, Rows};
use crate::models::ShardedModel;

/// transformers' stand-in for an impossible score.
const IMPOSSIBLE: f32 = -1.0e9;

/// Runs beam search for every prompt of `req` (`num_beams` > 1). Every rank returns the same
/// sequences and scores.
pub(super) fn beam_search(
    model: &mut dyn ShardedModel,
    comm: &dyn Communicator,
    req: &GenerateRequest,
    finish_requested: &mut dyn FnMut() -> Result<Vec<usize>>,
) -> Result<GeneratedBatch> {
    let start = std::time::Instant::now();
    let beams = req.config.num_beams;
    let mut rows = Rows::new(req, beams);
    model.clear_cache();
    let mut logits = rows.forward_prompts(model, comm, 0)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let decode_start = std::time::Instant::now();
    let mut search = (comm.rank() == 0).then(|| Search::new(req));
    let n = rows.count();
    let mut overhead = super::Overhead::default();
    loop {
        overhead.start();
        let mut words = vec![0u32; 1 + 2 * n];
        if let Some(search) = search.as_mut() {
            // `max_time` ends the search as a cancellation does, with the beams of this step.
            let cancelled =
                !finish_requested()?.is_empty() || super::out_of_time(&req.config, start);
            words = search.step(&logits, &rows, cancelled)?;
        }
        let words = broadcast_words(comm, words)?;
        let sources: Vec<usize> = words[1..=n].iter().map(|&s| s as usize).collect();
        let tokens = &words[1 + n..];
        rows.reorder(&sources);
        model.reorder_cache(&sources)?;
        rows.push(tokens);
        overhead.stop();
        if words[0] == 0 {
            break;
        }
        logits = rows.forward_step(model, comm, tokens)?;
    }
    model.clear_cache();
    let (result, logprobs) = match search.map(|s| s.result(req.config.num_return_sequences)) {
        Some((sequences, scores, logprobs)) => (Some((sequences, scores)), logprobs),
        None => (None, None),
    };
    let (sequences, scores) = share_result(comm, result)?;
    Ok(GeneratedBatch {
        sequences,
        scores: Some(scores),
        logprobs,
        prefill_seconds,
        decode_seconds: decode_start.elapsed().as_secs_f64(),
        overhead_seconds: overhead.seconds,
        cached_prompt_tokens: 0,
    })
}

/// Sends rank 0's sequences and scores to every rank: their count and lengths first, then the
/// tokens and the scores' bits.
fn share_result(
    comm: &dyn Communicator,
    result: Option<(Vec<Vec<u32>>, Vec<f32>)>,
) -> Result<(Vec<Vec<u32>>, Vec<f32>)> {
    let (sequences, scores) = result.unwrap_or_default();
    let count = broadcast_words(comm, vec![sequences.len() as u32])?[0] as usize;
    let mut lengths: Vec<u32> = sequences.iter().map(|s| s.len() as u32).collect();
    lengths.resize(count, 0);
    let lengths = broadcast_words(comm, lengths)?;
    let mut words: Vec<u32> = sequences.concat();
    words.extend(scores.iter().map(|s| s.to_bits()));
    words.resize(lengths.iter().sum::<u32>() as usize + count, 0);
    let words = broadcast_words(comm, words)?;
    let mut at = 0;
    let sequences = lengths
        .iter()
        .map(|&len| {
            at += len as usize;
            words[at - len as usize..at].to_vec()
        })
        .collect();
    let scores = words[at..].iter().map(|&b| f32::from_bits(b)).collect();
    Ok((sequences, scores))
}

/// A hypothesis: its new tokens, their log-probabilities (with `logprobs`) and its score.
#[derive(Debug, Clone)]
struct Hypothesis {
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
    score: f32,
    finished: bool,
}

/// One prompt's beams on rank 0.
#[derive(Debug, Clone)]
struct Prompt {
    /// The live beams, best first: summed log-probabilities.
    running: Vec<Hypothesis>,
    /// The best finished hypotheses (length-normalised scores), best first.
    finished: Vec<Hypothesis>,
    /// Whether a running beam may still beat the finished ones.
    improvable: bool,
}

/// Rank 0's beam-search state.
struct Search {
    beams: usize,
    keep: usize,
    max_new: usize,
    length_penalty: f32,
    early_stopping: EarlyStopping,
    eos: Vec<u32>,
    pipeline: LogitsPipeline,
    prompts: Vec<Prompt>,
    /// New tokens so far (the same for every beam).
    length: usize,
    /// With `logprobs`, how many of the most likely tokens each step reports.
    top_logprobs: Option<usize>,
}

impl Search {
    fn new(req: &GenerateRequest) -> Self {
        let beams = req.config.num_beams;
        let empty = |score| Hypothesis {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            score,
            finished: false,
        };
        let mut running = vec![empty(IMPOSSIBLE); beams];
        running[0].score = 0.0;
        Search {
            beams,
            keep: 2.max(1 + req.eos_token_ids.len()) * beams,
            max_new: req.config.max_new_tokens,
            length_penalty: req.config.length_penalty,
            early_stopping: req.config.early_stopping,
            eos: req.eos_token_ids.clone(),
            pipeline: LogitsPipeline::new(&req.config, &req.eos_token_ids),
            prompts: vec![
                Prompt {
                    running,
                    finished: vec![empty(IMPOSSIBLE); beams],
                    improvable: true,
                };
                req.prompts.len()
            ],
            length: 0,
            top_logprobs: req.config.logprobs.then_some(req.config.top_logprobs),
        }
    }

    /// One step: `[more, source row of each new row…, token of each new row…]`.
    fn step(&mut self, logits: &Tensor, rows: &Rows, cancelled: bool) -> Result<Vec<u32>> {
        let values: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let vocab = values.len() / rows.count();
        let (mut sources, mut tokens) = (Vec::new(), Vec::new());
        let mut all_hit = true;
        for p in 0..self.prompts.len() {
            let (candidates, steps) = self.candidates(p, &values, vocab, rows);
            let hits: Vec<bool> = candidates
                .iter()
                .map(|c| {
                    cancelled || self.eos.contains(&c.token) || self.length + 1 >= self.max_new
                })
                .collect();
            all_hit &= hits.iter().all(|&h| h);
            self.update_finished(p, &candidates, &hits, &steps);
            // The best continuations that did not stop become the next beams.
            let mut order: Vec<usize> = (0..candidates.len()).collect();
            let running_score =
                |i: usize| candidates[i].score + if hits[i] { IMPOSSIBLE } else { 0.0 };
            order.sort_by(|&a, &b| {
                running_score(b)
                    .total_cmp(&running_score(a))
                    .then(a.cmp(&b))
            });
            let prompt = &mut self.prompts[p];
            let old = std::mem::take(&mut prompt.running);
            for &i in order.iter().take(self.beams) {
                let c = &candidates[i];
                prompt.running.push(Hypothesis {
                    score: running_score(i),
                    ..old[c.beam].extended(c.token, steps.get(c.beam))
                });
                sources.push((p * self.beams + c.beam) as u32);
                tokens.push(c.token);
            }
        }
        self.length += 1;
        for p in 0..self.prompts.len() {
            self.check_improvable(p);
        }
        let improvable = self.prompts.iter().any(|p| p.improvable);
        let open = !(self.early_stopping == EarlyStopping::Done
            && self
                .prompts
                .iter()
                .all(|p| p.finished.iter().all(|h| h.finished)));
        let more = improvable && open && !all_hit;
        let mut words = vec![u32::from(more)];
        words.extend(sources);
        words.extend(tokens);
        Ok(words)
    }

    /// The `keep` best continuations of prompt `p`'s beams: log-softmax, the processors, plus
    /// each beam's score; best first, ties to the lower (beam, token). With `logprobs`, also
    /// each beam's distribution before the processors (else none).
    fn candidates(
        &self,
        p: usize,
        values: &[f32],
        vocab: usize,
        rows: &Rows,
    ) -> (Vec<Candidate>, Vec<StepDistribution>) {
        let mut all = Vec::with_capacity(self.beams * vocab);
        let mut steps = Vec::new();
        for beam in 0..self.beams {
            let row = p * self.beams + beam;
            let mut scores = log_softmax(&values[row * vocab..(row + 1) * vocab]);
            if let Some(top) = self.top_logprobs {
                steps.push(StepDistribution::from_log_probs(scores.clone(), top));
            }
            let (ids, padding) = rows.processed_ids(row, self.length);
            let prompt = rows.encoder_input(row, self.length);
            self.pipeline.apply(
                &mut scores,
                History {
                    ids: &ids,
                    prompt: &prompt,
                    padding,
                    new_tokens: self.length,
                },
            );
            let base = self.prompts[p].running[beam].score;
            all.extend(scores.into_iter().enumerate().map(|(token, s)| Candidate {
                beam,
                token: token as u32,
                score: s + base,
            }));
        }
        let keep = self.keep.min(all.len());
        let better = |a: &Candidate, b: &Candidate| {
            b.score
                .total_cmp(&a.score)
                .then((a.beam, a.token).cmp(&(b.beam, b.token)))
        };
        all.select_nth_unstable_by(keep - 1, better);
        all.truncate(keep);
        all.sort_by(better);
        (all, steps)
    }

    /// Adds the candidates among the best `beams` that stopped to the finished hypotheses,
    /// keeping the best `beams` (transformers' `_update_finished_beams`).
    fn update_finished(
        &mut self,
        p: usize,
        candidates: &[Candidate],
        hits: &[bool],
        steps: &[StepDistribution],
    ) {
        let prompt = &self.prompts[p];
        let full = self.early_stopping == EarlyStopping::Done
            && prompt.finished.iter().all(|h| h.finished);
        let normaliser = ((self.length + 1) as f32).powf(self.length_penalty);
        let mut merged = prompt.finished.clone();
        for (i, c) in candidates.iter().enumerate() {
            let finished = hits[i] && i < self.beams;
            let mut score = c.score / normaliser;
            score += if full { IMPOSSIBLE } else { 0.0 };
            score += if prompt.improvable { 0.0 } else { IMPOSSIBLE };
            score += if finished { 0.0 } else { IMPOSSIBLE };
            merged.push(Hypothesis {
                score,
                finished,
                ..prompt.running[c.beam].extended(c.token, steps.get(c.beam))
            });
        }
        let mut order: Vec<usize> = (0..merged.len()).collect();
        order.sort_by(|&a, &b| merged[b].score.total_cmp(&merged[a].score).then(a.cmp(&b)));
        self.prompts[p].finished = order
            .into_iter()
            .take(self.beams)
            .map(|i| merged[i].clone())
            .collect();
    }

    /// transformers' `_check_early_stop_heuristic`, after the step.
    fn check_improvable(&mut self, p: usize) {
        let prompt = &mut self.prompts[p];
        let length = match (self.early_stopping, self.length_penalty > 0.0) {
            (EarlyStopping::Never, true) => self.max_new,
            _ => self.length,
        };
        let best = prompt.running[0].score / (length as f32).powf(self.length_penalty);
        let worst = prompt
            .finished
            .iter()
            .map(|h| h.score)
            .fold(f32::INFINITY, f32::min);
        prompt.improvable &= prompt
            .finished
            .iter()
            .any(|h| best > if h.finished { worst } else { IMPOSSIBLE });
    }

    /// The best `count` finished hypotheses of every prompt, with their scores, and with
    /// `logprobs` their tokens' log-probabilities.
    fn result(self, count: usize) -> BeamResult {
        let best: Vec<Hypothesis> = self
            .prompts
            .into_iter()
            .flat_map(|p| p.finished.into_iter().take(count))
            .collect();
        let logprobs = self
            .top_logprobs
            .map(|_| best.iter().map(|h| h.logprobs.clone()).collect());
        let (sequences, scores) = best.into_iter().map(|h| (h.tokens, h.score)).unzip();
        (sequences, scores, logprobs)
    }
}

/// The returned sequences, their scores and, with `logprobs`, their tokens' log-probabilities.
type BeamResult = (Vec<Vec<u32>>, Vec<f32>, Option<Vec<Vec<TokenLogprobs>>>);

impl Hypothesis {
    /// This hypothesis continued by `token` (the caller sets its score and whether it is
    /// finished), scored with `step`, its beam's distribution (`None` without `logprobs`).
    fn extended(&self, token: u32, step: Option<&StepDistribution>) -> Hypothesis {
        let mut next = self.clone();
        next.tokens.push(token);
        if let Some(step) = step {
            next.logprobs.push(step.score(token));
        }
        next
    }
}

/// A continuation of a beam by one token, with its summed log-probability.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    beam: usize,
    token: u32,
    score: f32,
}
