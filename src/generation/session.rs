//! Continuous batching: one running batch that sequences join and leave between decode steps.
//!
//! A session starts with some sequences and runs until the main process ends it. Before each
//! step rank 0 reads the main process's control messages (sequences to join, sequences to
//! finish, the end of the session), chooses each row's next token with that sequence's own
//! options and seeded generator, and broadcasts the tokens together with the joining sequences,
//! so that every rank changes its batch in the same way.
//!
//! Joining sequences are prefilled in caches of their own (`joining`: a long prompt is
//! prefilled in chunks, each in the same forward pass as a decode step of the running batch,
//! sized by `pacing`; a prompt that starts with blocks of the prefix cache is seeded with them).
//! Once prefilled, their rows are appended to the running caches, every row aligned to the end
//! (the rows shorter than the batch get left padding that the attention mask hides, and
//! position ids count real tokens only). A row that ends leaves its blocks in the prefix cache
//! and the caches at once, together with any padding that every remaining row has, so the
//! batch is never wider than its longest sequence. Both changes move rows in place.

mod joining;
mod pacing;

use std::collections::HashMap;
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::generation::constraint::Grammars;
use crate::generation::logprobs::TokenLogprobs;
use crate::generation::prefix_cache::{PrefixCache, PrefixCacheReport};
use crate::generation::processors::History;
use crate::generation::{broadcast_words, caches_of, CachedPass, Chooser, GenerationConfig};
use crate::models::ShardedModel;
use crate::options::PrefillChunk;
use joining::{Group, Joining};
use pacing::Pacer;

/// One sequence of a session, as every rank receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceRequest {
    /// The caller's name for the sequence (unique within the session).
    pub id: u32,
    /// The prompt's token ids (not empty).
    pub prompt: Vec<u32>,
    /// Its options (greedy or sampling, one returned sequence, `max_new_tokens` ≥ 1).
    pub config: GenerationConfig,
    /// End-of-sequence ids; the sequence ends after emitting one.
    pub eos_token_ids: Vec<u32>,
    /// Seed of its sampler on rank 0.
    pub seed: u64,
}

/// Why a sequence of a session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// It emitted an end-of-sequence id (its last token).
    EndOfSequence,
    /// It reached `max_new_tokens`.
    Length,
    /// The main process finished it (a cancelled stream, a stop string).
    Finished,
    /// Its options leave no token to choose; the message says why.
    Failed(String),
}

/// What every rank returns when a session ends.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionSummary {
    /// Every sequence that ran, with its new tokens, in the order they ended.
    pub sequences: Vec<(u32, Vec<u32>)>,
    /// Decode steps run (each extends every running sequence by one token).
    pub steps: usize,
    /// Chunks of joining prompts prefilled: the columns of a group of joining sequences that
    /// one step prefills (a long prompt joining a running batch takes several). A step's
    /// chunks share one pass of the model, with the running batch's decode step.
    pub prefill_chunks: usize,
    /// Steps whose pass prefilled chunks beside the running batch's decode step (in one pass
    /// of the model where it can, see [`ShardedModel::forward_segments`]).
    pub passes_beside_decode: usize,
    /// Prompt tokens whose keys and values came from the prefix cache instead of the model.
    pub cached_prompt_tokens: usize,
    /// Time of the joining sequences' forward passes, in seconds.
    pub prefill_seconds: f64,
    /// Time of the decode steps and token choices, in seconds.
    pub decode_seconds: f64,
    /// The part of `decode_seconds` spent outside the model on the answering rank.
    pub overhead_seconds: f64,
}

/// A control message from the main process to rank 0 during a session.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// Add these sequences to the batch.
    Join(Vec<SequenceRequest>),
    /// Finish these sequences now.
    Finish(Vec<u32>),
    /// No sequence will join any more: end the session once the batch is empty.
    End,
}

/// Rank 0's line to the main process during a session.
pub trait SessionLink {
    /// Streams a token of sequence `id`.
    fn token(&mut self, id: u32, token: u32) -> Result<()>;
    /// Streams the log-probabilities of the token of sequence `id` that [`SessionLink::token`]
    /// streams next (sequences with `logprobs` only). Ignored by default.
    fn logprobs(&mut self, id: u32, logprobs: &TokenLogprobs) -> Result<()> {
        let _ = (id, logprobs);
        Ok(())
    }
    /// Says that sequence `id` ended (after its last token).
    fn ended(&mut self, id: u32, reason: &EndReason) -> Result<()>;
    /// Says that the batch is empty and rank 0 waits for a control message.
    fn idle(&mut self) -> Result<()>;
    /// Tells what the prefix cache did since the last report.
    fn prefix_cache(&mut self, report: &PrefixCacheReport) -> Result<()>;
    /// The control messages that have arrived; with `wait`, blocks until at least one has.
    fn controls(&mut self, wait: bool) -> Result<Vec<Control>>;
}

/// Words of a step's broadcast before the rows' words: whether the session ends, the length of
/// the news that follow, and the prompt tokens the next step may prefill.
const HEADER_WORDS: usize = 3;
/// The first word of a step's broadcast when the session ends.
const END: u32 = 1;
/// A row's word when the main process finished it.
const FINISHED: u32 = u32::MAX;
/// A row's word when no token could be chosen for it.
const FAILED: u32 = u32::MAX - 1;

/// Runs a continuous-batching session that starts with `initial`. Every rank runs it; rank 0
/// passes its `link` to the main process, the others `None`. `chunk` says how many prompt
/// tokens are prefilled with each decode step; prompts start from what `prefix` holds of
/// them, and leave their blocks there. Rank 0 compiles the sequences' constraints with
/// `grammars`.
pub fn run(
    model: &mut dyn ShardedModel,
    comm: &dyn Communicator,
    initial: Vec<SequenceRequest>,
    chunk: PrefillChunk,
    prefix: &mut PrefixCache,
    grammars: &Grammars,
    mut link: Option<&mut dyn SessionLink>,
) -> Result<SessionSummary> {
    model.clear_cache();
    let mut batch = RunningBatch::default();
    let mut joining = Joining::default();
    let mut inbox = Inbox::default();
    let mut pacer = Pacer::new(chunk);
    let mut summary = SessionSummary::default();
    let mut news = News {
        joining: initial,
        cancelled: Vec::new(),
    };
    loop {
        let started = Instant::now();
        let chooser = link.is_some().then_some(grammars);
        summary.cached_prompt_tokens += joining.add(&news.joining, prefix, chooser)?;
        for row in joining.cancel(&news.cancelled)? {
            if let Some(link) = link.as_deref_mut() {
                link.ended(row.id, &EndReason::Finished)?;
            }
            summary.sequences.push(row.output());
        }
        let decode = (!batch.rows.is_empty()).then(|| batch.decode_input());
        let mut logits = None;
        if !joining.is_empty() {
            let beside = decode.as_ref().map(CachedPass::batch);
            let advanced = joining.advance(model, comm, pacer.budget(), beside.as_ref())?;
            let seconds = started.elapsed().as_secs_f64();
            summary.prefill_chunks += advanced.chunks;
            match advanced.decoded {
                Some(decoded) => {
                    logits = Some(batch.stepped(decoded)?);
                    let prefill = pacer.prefilled_beside_decode(advanced.tokens, seconds);
                    summary.prefill_seconds += prefill;
                    summary.decode_seconds += seconds - prefill;
                    summary.steps += 1;
                    summary.passes_beside_decode += 1;
                }
                None => {
                    pacer.prefilled(advanced.tokens, seconds);
                    summary.prefill_seconds += seconds;
                }
            }
            for (group, joined) in advanced.complete {
                batch.admit(model, group, prefix)?;
                logits = Some(match logits.take() {
                    Some(running) => Tensor::cat(&[running, joined], 0)?,
                    None => joined,
                });
            }
        } else if let Some(decode) = &decode {
            let logits_of_step = model.forward(&decode.batch(), comm)?;
            logits = Some(batch.stepped(logits_of_step)?);
            let seconds = started.elapsed().as_secs_f64();
            pacer.decoded(seconds);
            summary.decode_seconds += seconds;
            summary.steps += 1;
        }
        let step_start = Instant::now();
        let mut words = vec![0u32; HEADER_WORDS + batch.rows.len()];
        let mut payload = Vec::new();
        if let Some(link) = link.as_deref_mut() {
            if let Some(report) = prefix.take_report() {
                link.prefix_cache(&report)?;
            }
            inbox.collect(link, batch.rows.is_empty() && joining.is_empty())?;
            let finishing = std::mem::take(&mut inbox.finishing);
            words = batch.decide(logits.as_ref(), &finishing, &mut inbox.failures)?;
            let idle = batch.rows.is_empty() && joining.is_empty();
            if idle && inbox.joining.is_empty() && inbox.end {
                words[0] = END;
            }
            words[2] = pacer.next(!batch.rows.is_empty());
            let news = News {
                cancelled: finishing
                    .into_iter()
                    .filter(|&id| joining.contains(id) || inbox.joining.iter().any(|s| s.id == id))
                    .collect(),
                joining: std::mem::take(&mut inbox.joining),
            };
            if !news.joining.is_empty() || !news.cancelled.is_empty() {
                payload = postcard::to_stdvec(&news)
                    .map_err(|e| Error::Launch(format!("cannot encode joining sequences: {e}")))?;
                words[1] = payload.len() as u32;
            }
        }
        let words = broadcast_words(comm, words)?;
        news = receive_news(comm, payload, words[1] as usize)?;
        if words[0] == END {
            break;
        }
        pacer.set_budget(words[2]);
        let ended = batch.record(&words[HEADER_WORDS..]);
        if let Some(link) = link.as_deref_mut() {
            for (row, &word) in batch.rows.iter_mut().zip(&words[HEADER_WORDS..]) {
                if let Some(logprobs) = row.logprobs.take().filter(|_| word < FAILED) {
                    link.logprobs(row.id, &logprobs)?;
                }
                if word < FAILED {
                    link.token(row.id, word)?;
                }
            }
            for (row, reason) in &ended {
                let reason = match (reason, inbox.failures.remove(&batch.rows[*row].id)) {
                    (EndReason::Failed(_), Some(message)) => EndReason::Failed(message),
                    (reason, _) => reason.clone(),
                };
                link.ended(batch.rows[*row].id, &reason)?;
            }
        }
        summary
            .sequences
            .extend(ended.iter().map(|(row, _)| batch.rows[*row].output()));
        batch.remove(model, &ended, prefix)?;
        let overhead = step_start.elapsed().as_secs_f64();
        summary.overhead_seconds += overhead;
        summary.decode_seconds += overhead;
    }
    model.clear_cache();
    Ok(summary)
}

/// What changes in the batch besides its rows' tokens, as rank 0 broadcasts it with a step.
#[derive(Debug, Default, Serialize, Deserialize)]
struct News {
    /// Sequences that join.
    joining: Vec<SequenceRequest>,
    /// Sequences finished before their prefill ended (the joining ones included).
    cancelled: Vec<u32>,
}

/// Rank 0's broadcast of the step's news (`len` bytes), decoded on every rank.
fn receive_news(comm: &dyn Communicator, mut payload: Vec<u8>, len: usize) -> Result<News> {
    if len == 0 {
        return Ok(News::default());
    }
    payload.resize(len, 0);
    comm.broadcast(&mut payload, 0)?;
    postcard::from_bytes(&payload)
        .map_err(|e| Error::Launch(format!("malformed joining sequences: {e}")))
}

/// What rank 0 has heard from the main process and not acted on yet.
#[derive(Default)]
struct Inbox {
    joining: Vec<SequenceRequest>,
    finishing: Vec<u32>,
    end: bool,
    /// Why a sequence failed, by id, until its end is reported.
    failures: HashMap<u32, String>,
}

impl Inbox {
    /// Reads the waiting control messages; with an empty batch and nothing to do, says so and
    /// waits for the next.
    fn collect(&mut self, link: &mut dyn SessionLink, batch_empty: bool) -> Result<()> {
        self.apply(link.controls(false)?);
        if batch_empty && self.joining.is_empty() && !self.end {
            link.idle()?;
            while self.joining.is_empty() && !self.end {
                self.apply(link.controls(true)?);
            }
        }
        Ok(())
    }

    fn apply(&mut self, controls: Vec<Control>) {
        for control in controls {
            match control {
                Control::Join(sequences) => self.joining.extend(sequences),
                Control::Finish(ids) => self.finishing.extend(ids),
                Control::End => self.end = true,
            }
        }
    }
}

/// One running sequence.
struct Row {
    id: u32,
    /// Prompt and new tokens.
    ids: Vec<u32>,
    prompt_len: usize,
    /// Real (not padding) positions in the caches.
    cached: usize,
    limit: usize,
    eos: Vec<u32>,
    /// Rank 0's processors and generator for this sequence.
    chooser: Option<Chooser>,
    /// With `logprobs`, rank 0's scores of the token it chose this step, until streamed.
    logprobs: Option<TokenLogprobs>,
}

impl Row {
    /// The row of `sequence`; on rank 0, which chooses its tokens, `grammars` compiles its
    /// constraint.
    fn new(sequence: &SequenceRequest, grammars: Option<&Grammars>) -> Self {
        Row {
            id: sequence.id,
            ids: sequence.prompt.clone(),
            prompt_len: sequence.prompt.len(),
            cached: 0,
            limit: sequence.config.max_new_tokens,
            eos: sequence.eos_token_ids.clone(),
            chooser: grammars.map(|grammars| {
                let (config, eos) = (&sequence.config, &sequence.eos_token_ids);
                Chooser::new(config, eos, sequence.seed, grammars)
            }),
            logprobs: None,
        }
    }

    fn new_tokens(&self) -> &[u32] {
        &self.ids[self.prompt_len..]
    }

    fn output(&self) -> (u32, Vec<u32>) {
        (self.id, self.new_tokens().to_vec())
    }
}

/// The running batch: its rows, and the width of the caches (the longest row's positions).
#[derive(Default)]
struct RunningBatch {
    rows: Vec<Row>,
    width: usize,
}

impl RunningBatch {
    /// Adds the rows of a prefilled `group` to the batch, leaving the blocks of their prompts
    /// in `prefix`.
    fn admit(
        &mut self,
        model: &mut dyn ShardedModel,
        group: Group,
        prefix: &mut PrefixCache,
    ) -> Result<()> {
        for (index, row) in group.rows.iter().enumerate() {
            prefix.store(&row.ids, &group.caches, index, group.padding(index))?;
        }
        self.width = self.width.max(group.width());
        let caches = caches_of(model)?;
        match self.rows.is_empty() {
            true => *caches = group.caches,
            false => caches.append_rows(&group.caches)?,
        }
        self.rows.extend(group.rows.into_iter().map(|mut row| {
            row.cached = row.prompt_len;
            row
        }));
        Ok(())
    }

    /// Rank 0's words for the step: [`HEADER_WORDS`] zeros, then one word per row, a row's word
    /// being its next token, [`FINISHED`] (its id is in `finishing`) or [`FAILED`] (and why, in `failures`).
    fn decide(
        &mut self,
        logits: Option<&Tensor>,
        finishing: &[u32],
        failures: &mut HashMap<u32, String>,
    ) -> Result<Vec<u32>> {
        let mut words = vec![0u32; HEADER_WORDS];
        if self.rows.is_empty() {
            return Ok(words);
        }
        let values: Vec<f32> = match logits {
            Some(logits) => logits.flatten_all()?.to_vec1()?,
            None => return Err(Error::Launch("a running batch has no logits".into())),
        };
        let vocab = values.len() / self.rows.len();
        for (row, scores) in self.rows.iter_mut().zip(values.chunks_exact(vocab)) {
            if finishing.contains(&row.id) {
                words.push(FINISHED);
                continue;
            }
            let history = History {
                ids: &row.ids,
                prompt: &row.ids[..row.prompt_len],
                padding: 0,
                new_tokens: row.ids.len() - row.prompt_len,
            };
            let chosen = match row.chooser.as_mut() {
                Some(chooser) => chooser.choose(0, scores, history).inspect(|&token| {
                    row.logprobs = chooser.score(scores, token);
                }),
                None => Err(Error::Launch("only rank 0 chooses tokens".into())),
            };
            words.push(chosen.unwrap_or_else(|e| {
                failures.insert(row.id, e.to_string());
                FAILED
            }));
        }
        Ok(words)
    }

    /// Appends each row's token; returns the rows that ended, with why.
    fn record(&mut self, words: &[u32]) -> Vec<(usize, EndReason)> {
        let mut ended = Vec::new();
        for (index, (row, &word)) in self.rows.iter_mut().zip(words).enumerate() {
            let reason = match word {
                FINISHED => Some(EndReason::Finished),
                FAILED => Some(EndReason::Failed(String::new())),
                token => {
                    row.ids.push(token);
                    if row.eos.contains(&token) {
                        Some(EndReason::EndOfSequence)
                    } else if row.new_tokens().len() >= row.limit {
                        Some(EndReason::Length)
                    } else {
                        None
                    }
                }
            };
            if let Some(reason) = reason {
                ended.push((index, reason));
            }
        }
        ended
    }

    /// Drops the `ended` rows from the batch and the caches, with the padding every remaining
    /// row has, leaving the blocks of their tokens in `prefix`.
    fn remove(
        &mut self,
        model: &mut dyn ShardedModel,
        ended: &[(usize, EndReason)],
        prefix: &mut PrefixCache,
    ) -> Result<()> {
        if ended.is_empty() {
            return Ok(());
        }
        let caches = caches_of(model)?;
        for &(index, _) in ended {
            let row = &self.rows[index];
            let tokens = &row.ids[..row.cached];
            prefix.store(tokens, caches, index, self.width - row.cached)?;
        }
        let kept: Vec<usize> = (0..self.rows.len())
            .filter(|r| !ended.iter().any(|(e, _)| e == r))
            .collect();
        let mut index = 0;
        self.rows.retain(|_| {
            index += 1;
            kept.contains(&(index - 1))
        });
        self.width = self.rows.iter().map(|r| r.cached).max().unwrap_or(0);
        caches_of(model)?.retain(&kept, self.width)
    }

    /// The input of a decode step: each row's last token.
    fn decode_input(&self) -> CachedPass {
        let width = self.width + 1;
        let padded = self.rows.iter().any(|r| r.cached < self.width);
        CachedPass {
            ids: self.rows.iter().map(|r| r.ids[r.ids.len() - 1]).collect(),
            rows: self.rows.len(),
            columns: 1,
            positions: self.rows.iter().map(|r| r.cached as u32).collect(),
            mask: padded.then(|| {
                self.rows
                    .iter()
                    .flat_map(|r| {
                        let padding = self.width - r.cached;
                        (0..width).map(move |column| u32::from(column >= padding))
                    })
                    .collect()
            }),
        }
    }

    /// Records that the decode step of [`RunningBatch::decode_input`] ran, with `logits`
    /// `[rows, 1, vocab]`: every row has one more position cached. Returns the logits
    /// `[rows, vocab]`.
    fn stepped(&mut self, logits: Tensor) -> Result<Tensor> {
        self.width += 1;
        self.rows.iter_mut().for_each(|r| r.cached += 1);
        let vocab = logits.dim(2)?;
        Ok(logits.reshape((self.rows.len(), vocab))?)
    }
}

#[cfg(test)]
mod tests;
