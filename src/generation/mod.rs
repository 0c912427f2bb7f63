//! Token-by-token generation inside the ranks, in lock-step: every rank runs the same forward
//! passes; rank 0 processes the logits, chooses each row's next token (greedy or sampled from
//! its seeded generator) and broadcasts the choices, so all ranks extend their caches with the
//! same ids whatever rounding their own logits carry.
//!
//! Several prompts run as one batch: prompts are padded on the left, the attention mask hides
//! the padding, position ids skip it (as transformers' `generate` does), and each row stops on
//! its own; a finished row is fed padding until every row is done.

mod beam;
pub mod config;
pub mod constraint;
pub mod logprobs;
pub mod prefix_cache;
pub mod processors;
pub mod session;

use std::borrow::Cow;
use std::ops::Range;
use std::time::Instant;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::models::attention::LayerCaches;
use crate::models::{Batch, ShardedModel};
pub use config::{EarlyStopping, GenerationConfig};
use constraint::{Grammars, RowConstraints};
use logprobs::StepDistribution;
pub use logprobs::TokenLogprobs;
use prefix_cache::PrefixCache;
use processors::{History, LogitsPipeline};

/// A generation request as every rank receives it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The prompts' token ids (one or several, of any lengths).
    pub prompts: Vec<Vec<u32>>,
    /// The options.
    pub config: GenerationConfig,
    /// End-of-sequence ids; a row stops after emitting one.
    pub eos_token_ids: Vec<u32>,
    /// The id that pads prompts on the left and finished rows.
    pub pad_token_id: u32,
    /// Seed of rank 0's sampler.
    pub seed: u64,
    /// An encoder–decoder's decoder start token (`None` for decoder-only models): its logits
    /// processors see the decoder's sequence, this token and the new ones, as transformers'
    /// see `decoder_input_ids`, not the encoder's prompt.
    pub decoder_start_token_id: Option<u32>,
}

/// The new tokens of every returned sequence, with the timings of the rank that answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratedBatch {
    /// New tokens, `num_return_sequences` rows per prompt, in prompt order.
    pub sequences: Vec<Vec<u32>>,
    /// With beam search, each sequence's score: its summed log-probabilities divided by
    /// `length ^ length_penalty` (transformers' `sequences_scores`).
    pub scores: Option<Vec<f32>>,
    /// With `logprobs` (rank 0's answer; the other ranks' hold `None`), each returned
    /// sequence's tokens with their log-probabilities under the model's distribution, one
    /// entry per new token (see [`logprobs`]).
    pub logprobs: Option<Vec<Vec<TokenLogprobs>>>,
    /// Time of the prompts' forward pass, in seconds.
    pub prefill_seconds: f64,
    /// Time of all later forward passes and token choices, in seconds.
    pub decode_seconds: f64,
    /// The part of `decode_seconds` spent outside the model on the answering rank: processing
    /// logits, choosing tokens, broadcasting them, streaming them out.
    pub overhead_seconds: f64,
    /// Prompt tokens whose keys and values came from the prefix cache instead of the model.
    pub cached_prompt_tokens: usize,
}

/// Callbacks of a generation on rank 0: `on_token(row, token)` sees each token as soon as it is
/// decided; `finish_requested()` returns rows the caller asked to finish (a cancelled stream,
/// a matched stop string), checked between steps.
pub struct Hooks<'a> {
    /// Called with each new token of each row.
    pub on_token: &'a mut dyn FnMut(usize, u32) -> Result<()>,
    /// Rows to finish now.
    pub finish_requested: &'a mut dyn FnMut() -> Result<Vec<usize>>,
}

/// Generates for every prompt of `req` (greedy or sampling, as its options say). Every rank
/// returns the same sequences; the hooks are called on rank 0 only, and only rank 0 compiles
/// the request's constraint, with `grammars`. A single prompt with a single returned sequence
/// of a decoder-only model starts from what `prefix` holds of it, and leaves its blocks there.
pub fn generate(
    model: &mut dyn ShardedModel,
    comm: &dyn Communicator,
    req: &GenerateRequest,
    prefix: &mut PrefixCache,
    grammars: &Grammars,
    hooks: Hooks,
) -> Result<GeneratedBatch> {
    if req.prompts.is_empty() || req.prompts.iter().any(Vec::is_empty) {
        return Err(Error::InvalidInput("a prompt is empty".into()));
    }
    if req.config.num_beams > 1 {
        return beam::beam_search(model, comm, req, hooks.finish_requested);
    }
    let start = Instant::now();
    let mut rows = Rows::new(req, req.config.num_return_sequences);
    if req.config.max_new_tokens == 0 {
        return Ok(rows.finish(0.0, 0.0, 0.0));
    }
    model.clear_cache();
    // One row of a decoder-only model (an encoder–decoder's caches hold decoder positions,
    // not the prompt's).
    let single = rows.count() == 1 && model.caches().is_some();
    let cached = match single {
        true => seed(model, prefix, &rows.ids[0])?,
        false => 0,
    };
    let mut logits = rows.forward_prompts(model, comm, cached)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    let mut chooser = (comm.rank() == 0)
        .then(|| Chooser::new(&req.config, &req.eos_token_ids, req.seed, grammars));
    let mut overhead = Overhead::default();
    // Rank 0's log-probabilities of each row's tokens, when asked for.
    let mut logprobs =
        (comm.rank() == 0 && req.config.logprobs).then(|| vec![Vec::new(); rows.count()]);
    loop {
        overhead.start();
        let mut decision = vec![0u32; rows.count() + 1];
        let mut scored = Vec::new();
        let mut failure = None;
        if let Some(chooser) = chooser.as_mut() {
            for row in (hooks.finish_requested)()? {
                rows.finish_row(row);
            }
            // A failed choice still reaches every rank, so that all of them stop together.
            decision = chooser
                .decide(&logits, &rows, &mut scored)
                .unwrap_or_else(|e| {
                    failure = Some(e);
                    let mut abort = vec![0u32; rows.count() + 1];
                    abort[0] = ABORT;
                    abort
                });
            // transformers' `MaxTimeCriteria`: the tokens just chosen are the last.
            if decision[0] != ABORT && out_of_time(&req.config, start) {
                decision[0] = 0;
            }
        }
        let decision = broadcast_words(comm, decision)?;
        if decision[0] == ABORT {
            model.clear_cache();
            return Err(failure.unwrap_or_else(banned));
        }
        let more = decision[0] != 0;
        for (row, token) in rows.record(&decision[1..]) {
            if comm.rank() == 0 {
                (hooks.on_token)(row, token)?;
            }
            let score = scored.get_mut(row).and_then(Option::take);
            if let (Some(logprobs), Some(score)) = (logprobs.as_mut(), score) {
                logprobs[row].push(score);
            }
        }
        overhead.stop();
        if !more {
            break;
        }
        logits = rows.forward_step(model, comm, &rows.last_fed())?;
    }
    if single {
        let caches = caches_of(model)?;
        prefix.store(&rows.ids[0][..caches.len()], caches, 0, 0)?;
    }
    model.clear_cache();
    let mut generated = rows.finish(
        prefill_seconds,
        decode_start.elapsed().as_secs_f64(),
        overhead.seconds,
    );
    generated.cached_prompt_tokens = cached;
    generated.logprobs = logprobs;
    Ok(generated)
}

/// Whether `config.max_time` has passed since `start`.
fn out_of_time(config: &GenerationConfig, start: Instant) -> bool {
    config
        .max_time
        .is_some_and(|limit| start.elapsed().as_secs_f64() > limit)
}

/// The caches of a model that decodes incrementally.
fn caches_of(model: &mut dyn ShardedModel) -> Result<&mut LayerCaches> {
    model.caches().ok_or_else(|| {
        Error::InvalidInput("this model has no key/value cache and cannot generate".into())
    })
}

/// Seeds the model's (empty) caches with what `prefix` holds of `prompt`; returns the number of
/// positions seeded.
fn seed(model: &mut dyn ShardedModel, prefix: &mut PrefixCache, prompt: &[u32]) -> Result<usize> {
    Ok(match prefix.seed(prompt)? {
        Some((caches, reused)) => {
            *caches_of(model)? = caches;
            reused
        }
        None => 0,
    })
}

/// Time spent between the model's forward passes, summed over the steps.
#[derive(Debug, Default)]
struct Overhead {
    since: Option<Instant>,
    seconds: f64,
}

impl Overhead {
    fn start(&mut self) {
        self.since = Some(Instant::now());
    }

    fn stop(&mut self) {
        if let Some(since) = self.since.take() {
            self.seconds += since.elapsed().as_secs_f64();
        }
    }
}

/// Broadcasts rank 0's words (a length every rank knows) and returns them on every rank.
fn broadcast_words(comm: &dyn Communicator, words: Vec<u32>) -> Result<Vec<u32>> {
    let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    comm.broadcast(&mut bytes, 0)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The first word of rank 0's broadcast when it could not choose: every rank stops.
const ABORT: u32 = 2;

/// The token a finished row gets in rank 0's broadcast (it is fed padding).
const FINISHED: u32 = u32::MAX;

/// The batch's rows (shared with [`beam`]): the ids the model has seen (padding included), the attention mask, the
/// next position of each row, and what each row generated.
struct Rows {
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<u32>>,
    padding: Vec<usize>,
    next_position: Vec<u32>,
    new: Vec<Vec<u32>>,
    done: Vec<bool>,
    pad: u32,
    eos: Vec<u32>,
    limit: usize,
    decoder_start: Option<u32>,
}

impl Rows {
    /// Each prompt `copies` times, padded on the left to the longest.
    fn new(req: &GenerateRequest, copies: usize) -> Self {
        let copies = copies.max(1);
        let prompts: Vec<&Vec<u32>> = req
            .prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p, copies))
            .collect();
        let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let padding: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
        Rows {
            ids: prompts
                .iter()
                .zip(&padding)
                .map(|(p, &pad)| [vec![req.pad_token_id; pad], p.to_vec()].concat())
                .collect(),
            mask: padding
                .iter()
                .map(|&pad| [vec![0; pad], vec![1; width - pad]].concat())
                .collect(),
            next_position: prompts.iter().map(|p| p.len() as u32).collect(),
            new: vec![Vec::new(); prompts.len()],
            done: vec![false; prompts.len()],
            padding,
            pad: req.pad_token_id,
            eos: req.eos_token_ids.clone(),
            limit: req.config.max_new_tokens,
            decoder_start: req.decoder_start_token_id,
        }
    }

    /// What the logits processors see of `row` after `new_tokens` new tokens, with its left
    /// padding: the prompt and the new tokens, or for an encoder–decoder the decoder's start
    /// token and the new tokens.
    fn processed_ids(&self, row: usize, new_tokens: usize) -> (Cow<'_, [u32]>, usize) {
        let ids = &self.ids[row];
        match self.decoder_start {
            Some(start) => {
                let new = &ids[ids.len() - new_tokens..];
                (Cow::Owned([&[start], new].concat()), 0)
            }
            None => (Cow::Borrowed(ids.as_slice()), self.padding[row]),
        }
    }

    /// What transformers' encoder processors see of `row` after `new_tokens` new tokens: a
    /// decoder-only model's prompt as padded (on the left), an encoder–decoder's encoder prompt
    /// padded on the right, as their tokenizers pad.
    fn encoder_input(&self, row: usize, new_tokens: usize) -> Cow<'_, [u32]> {
        let ids = &self.ids[row];
        let prompt = &ids[..ids.len() - new_tokens];
        match self.decoder_start {
            Some(_) if self.padding[row] > 0 => {
                let pad = self.padding[row];
                Cow::Owned([&prompt[pad..], &vec![self.pad; pad][..]].concat())
            }
            _ => Cow::Borrowed(prompt),
        }
    }

    fn count(&self) -> usize {
        self.ids.len()
    }

    /// Whether `token`, as the next token of `row`, ends it (end of sequence or the limit).
    fn ends(&self, row: usize, token: u32) -> bool {
        self.eos.contains(&token) || self.new[row].len() + 1 >= self.limit
    }

    fn finish_row(&mut self, row: usize) {
        if let Some(done) = self.done.get_mut(row) {
            *done = true;
        }
    }

    /// The prompts' forward passes after the first `cached` columns, which the caches hold
    /// already, [`PREFILL_CHUNK`] columns at a time for models with a key/value cache: the last
    /// position's logits of every row.
    fn forward_prompts(
        &self,
        model: &mut dyn ShardedModel,
        comm: &dyn Communicator,
        cached: usize,
    ) -> Result<Tensor> {
        let width = self.ids.first().map_or(0, Vec::len);
        // An encoder–decoder's first step runs its encoder, which takes the prompt at once.
        let chunk = match model.caches().is_some() {
            true => PREFILL_CHUNK,
            false => width.max(1),
        };
        let mut start = cached;
        loop {
            let end = (start + chunk).min(width);
            let logits = prefill(model, comm, &self.ids, &self.padding, start..end)?;
            if end >= width {
                return Ok(logits);
            }
            start = end;
        }
    }

    /// One decode step: feeds each row's chosen token and returns the new logits.
    fn forward_step(
        &mut self,
        model: &mut dyn ShardedModel,
        comm: &dyn Communicator,
        tokens: &[u32],
    ) -> Result<Tensor> {
        let positions: Vec<u32> = self.next_position.clone();
        self.next_position.iter_mut().for_each(|p| *p += 1);
        let padded = self.padding.iter().any(|&p| p > 0);
        let mask: Vec<u32> = self.mask.concat();
        model.forward(
            &Batch {
                ids: tokens,
                batch: self.count(),
                seq_len: 1,
                attention_mask: padded.then_some(mask.as_slice()),
                use_cache: true,
                last_only: true,
                positions: Some(&positions),
                decoder_ids: None,
            },
            comm,
        )
    }

    /// Appends the broadcast tokens; returns the (row, token) pairs that are new output (rows
    /// finished earlier are fed padding, which is not output).
    /// ([`FINISHED`] marks a row finished earlier or now, on request, and feeds it padding.)
    fn record(&mut self, tokens: &[u32]) -> Vec<(usize, u32)> {
        let mut emitted = Vec::new();
        let mut fed_ids = Vec::with_capacity(tokens.len());
        for (row, &token) in tokens.iter().enumerate() {
            let fed = match token {
                FINISHED => {
                    self.done[row] = true;
                    self.pad
                }
                token => {
                    self.done[row] = self.ends(row, token);
                    self.new[row].push(token);
                    emitted.push((row, token));
                    token
                }
            };
            fed_ids.push(fed);
        }
        self.push(&fed_ids);
        emitted
    }

    /// Appends the ids fed to each row in the last step.
    fn push(&mut self, fed: &[u32]) {
        for ((ids, mask), &id) in self.ids.iter_mut().zip(&mut self.mask).zip(fed) {
            ids.push(id);
            mask.push(1);
        }
    }

    /// Rearranges the rows: row `i` becomes the old row `sources[i]`.
    fn reorder(&mut self, sources: &[usize]) {
        fn pick<T: Clone>(items: &mut Vec<T>, sources: &[usize]) {
            *items = sources.iter().map(|&s| items[s].clone()).collect();
        }
        pick(&mut self.ids, sources);
        pick(&mut self.mask, sources);
        pick(&mut self.padding, sources);
        pick(&mut self.next_position, sources);
        pick(&mut self.new, sources);
        pick(&mut self.done, sources);
    }

    /// The ids the last step fed to the model, one per row.
    fn last_fed(&self) -> Vec<u32> {
        self.ids.iter().map(|ids| ids[ids.len() - 1]).collect()
    }

    fn finish(
        self,
        prefill_seconds: f64,
        decode_seconds: f64,
        overhead_seconds: f64,
    ) -> GeneratedBatch {
        GeneratedBatch {
            sequences: self.new,
            scores: None,
            logprobs: None,
            prefill_seconds,
            decode_seconds,
            overhead_seconds,
            cached_prompt_tokens: 0,
        }
    }
}

/// Prompt positions per forward pass of [`generate`]'s prefill: a long prompt goes through the
/// model this many positions at a time, each pass attending to the cache of the earlier ones,
/// so that the activations of a pass stay in the processor's caches (and its logits are
/// computed once). Sessions size theirs with [`PrefillChunk`](crate::options::PrefillChunk).
pub const PREFILL_CHUNK: usize = 512;

/// The forward pass of `columns` of prompts padded on the left to one width (`ids[i]` starts
/// with `padding[i]` pad ids), the caches holding the columns before them: fills the caches
/// and returns the logits of the last of these columns for every row.
fn prefill(
    model: &mut dyn ShardedModel,
    comm: &dyn Communicator,
    ids: &[Vec<u32>],
    padding: &[usize],
    columns: Range<usize>,
) -> Result<Tensor> {
    model.forward(&CachedPass::prefill(ids, padding, columns).batch(), comm)
}

/// The model input of a pass that extends the caches and keeps only the last column's logits:
/// a [`prefill`] chunk, or a decode step of a session's running batch.
struct CachedPass {
    ids: Vec<u32>,
    rows: usize,
    columns: usize,
    positions: Vec<u32>,
    /// `None` when no row is padded.
    mask: Option<Vec<u32>>,
}

impl CachedPass {
    /// Columns `columns` of the prompts `ids`, each with `padding` pad ids in front.
    fn prefill(ids: &[Vec<u32>], padding: &[usize], columns: Range<usize>) -> Self {
        // Position ids count real tokens only (the padding's positions are never attended).
        let positions = padding
            .iter()
            .flat_map(|&pad| columns.clone().map(move |i| i.saturating_sub(pad) as u32))
            .collect();
        let mask = padding.iter().any(|&p| p > 0).then(|| {
            padding
                .iter()
                .flat_map(|&pad| (0..columns.end).map(move |i| u32::from(i >= pad)))
                .collect()
        });
        CachedPass {
            ids: ids
                .iter()
                .flat_map(|row| row[columns.clone()].iter().copied())
                .collect(),
            rows: ids.len(),
            columns: columns.len(),
            positions,
            mask,
        }
    }

    /// The batch the model runs.
    fn batch(&self) -> Batch<'_> {
        Batch {
            ids: &self.ids,
            batch: self.rows,
            seq_len: self.columns,
            attention_mask: self.mask.as_deref(),
            use_cache: true,
            last_only: true,
            positions: Some(&self.positions),
            decoder_ids: None,
        }
    }
}

/// Rank 0's side: processes each row's logits and chooses its next token.
struct Chooser {
    pipeline: LogitsPipeline,
    sample: bool,
    rng: StdRng,
    /// With `logprobs`, how many of the most likely tokens each step reports.
    top_logprobs: Option<usize>,
    /// End-of-sequence ids (what a constraint allows once its text may end).
    eos: Vec<u32>,
    /// Each row's place in the request's constraint, if it has one.
    constraints: Option<RowConstraints>,
}

impl Chooser {
    /// A chooser with `config`'s processors, its constraint compiled by `grammars`, and a
    /// generator seeded with `seed`.
    fn new(config: &GenerationConfig, eos: &[u32], seed: u64, grammars: &Grammars) -> Self {
        Chooser {
            pipeline: LogitsPipeline::new(config, eos),
            sample: config.do_sample,
            rng: StdRng::seed_from_u64(seed),
            eos: eos.to_vec(),
            constraints: config
                .constraint
                .as_ref()
                .map(|c| RowConstraints::new(c, grammars)),
            top_logprobs: config.logprobs.then_some(config.top_logprobs),
        }
    }

    /// With `logprobs`, the log-probabilities of `token` chosen from the raw `logits`.
    fn score(&self, logits: &[f32], token: u32) -> Option<TokenLogprobs> {
        self.top_logprobs
            .map(|top| StepDistribution::from_logits(logits, top).score(token))
    }

    /// The next token of `row`, a sequence with `history`, given its `scores`: what the
    /// row's constraint allows, processed, then chosen.
    fn choose(&mut self, row: usize, scores: &[f32], history: History) -> Result<u32> {
        let mut scores = scores.to_vec();
        let mut constraint = self.constraints.as_mut().map(|r| r.row(row)).transpose()?;
        if let Some(state) = constraint.as_deref_mut() {
            state.restrict(&mut scores, &self.eos)?;
        }
        self.pipeline.apply(&mut scores, history);
        if let Some(state) = constraint.as_deref() {
            state.enforce(&mut scores, &self.eos);
        }
        let token = match self.sample {
            true => sample(&scores, &mut self.rng),
            false => argmax(&scores),
        }?;
        if let Some(state) = constraint {
            state.advance(token, &self.eos)?;
        }
        Ok(token)
    }

    /// `[more, token of row 0, token of row 1, ...]`: `more` is 0 once every row will be done
    /// after these tokens; finished rows get [`FINISHED`]. With `logprobs`, `scored` gets each
    /// row's scores of its token (`None` for finished rows).
    fn decide(
        &mut self,
        logits: &Tensor,
        rows: &Rows,
        scored: &mut Vec<Option<TokenLogprobs>>,
    ) -> Result<Vec<u32>> {
        let values: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let vocab = values.len() / rows.count();
        let mut decision = Vec::with_capacity(rows.count() + 1);
        decision.push(0);
        let mut more = false;
        for (row, scores) in values.chunks_exact(vocab).enumerate() {
            if rows.done[row] {
                decision.push(FINISHED);
                scored.push(None);
                continue;
            }
            let (ids, padding) = rows.processed_ids(row, rows.new[row].len());
            let prompt = rows.encoder_input(row, rows.new[row].len());
            let history = History {
                ids: &ids,
                prompt: &prompt,
                padding,
                new_tokens: rows.new[row].len(),
            };
            let token = self.choose(row, scores, history)?;
            scored.push(self.score(scores, token));
            decision.push(token);
            more |= !rows.ends(row, token);
        }
        decision[0] = u32::from(more);
        Ok(decision)
    }
}

/// The index of the largest score (the first on ties, like `torch.argmax`).
fn argmax(scores: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in scores.iter().enumerate() {
        if v > f32::NEG_INFINITY && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i as u32).ok_or_else(banned)
}

/// A token drawn from the softmax of `scores` (tokens at `-inf` are never drawn).
fn sample(scores: &[f32], rng: &mut StdRng) -> Result<u32> {
    let live: Vec<usize> = (0..scores.len())
        .filter(|&i| scores[i] > f32::NEG_INFINITY)
        .collect();
    let probs = processors::softmax(&live.iter().map(|&i| scores[i]).collect::<Vec<_>>());
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    if total.is_nan() || total <= 0.0 {
        return Err(banned());
    }
    let target = rng.random::<f64>() * total;
    let mut cumulative = 0f64;
    for (&i, &p) in live.iter().zip(&probs) {
        cumulative += p as f64;
        if cumulative > target {
            return Ok(i as u32);
        }
    }
    live.last().map(|&i| i as u32).ok_or_else(banned)
}

fn banned() -> Error {
    Error::InvalidInput(
        "every token is banned by the generation options; nothing can be generated".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_of_equal_maxima_and_skips_banned() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]).unwrap(), 1);
        assert_eq!(argmax(&[1.0, f32::NEG_INFINITY, 2.0]).unwrap(), 2);
        assert!(argmax(&[f32::NEG_INFINITY; 3]).is_err());
    }

    /// The sampler's draws follow the processed distribution: a chi-square test over 20 000
    /// draws from a fixed distribution with a banned token.
    #[test]
    fn sampling_draws_from_the_processed_distribution() {
        let scores = [0.0f32, 1.0, f32::NEG_INFINITY, 2.0, -1.0];
        let probs = processors::softmax(&scores);
        let mut rng = StdRng::seed_from_u64(5);
        let draws = 20_000;
        let mut counts = [0usize; 5];
        for _ in 0..draws {
            counts[sample(&scores, &mut rng).unwrap() as usize] += 1;
        }
        assert_eq!(counts[2], 0, "a banned token was drawn");
        let chi2: f64 = counts
            .iter()
            .zip(&probs)
            .filter(|(_, &p)| p > 0.0)
            .map(|(&c, &p)| {
                let expected = p as f64 * draws as f64;
                (c as f64 - expected).powi(2) / expected
            })
            .sum();
        // 3 degrees of freedom: P(chi2 > 16.27) = 0.001.
        assert!(chi2 < 16.27, "chi-square {chi2} for counts {counts:?}");
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let scores = [0.5f32, 0.4, 0.3, 0.2];
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..50)
                .map(|_| sample(&scores, &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(9), draw(9));
        assert_ne!(draw(9), draw(10));
    }
}
