//! The thread that owns the parallel model. It takes the queued jobs, runs those that share
//! their options as one batch (all waiting requests with the same options decode together, one
//! row each), and streams each row's text to its job as tokens are chosen. A job whose client
//! went away has its row finished at the next step.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::api::ParallelModel;
use crate::error::Error;
use crate::generation::GenerationConfig;
use crate::parallel::ipc::ForwardInput;
use crate::serve::metrics::Metrics;
use crate::serve::openai::{ApiError, FinishReason};
use crate::serve::pooling::Pooling;
use crate::text::TextSide;
use crate::tokenizer::TextStream;

/// Most requests decoded together.
const MAX_BATCH: usize = 16;

/// How often an idle model thread checks that every rank is alive.
const HEALTH_CHECK: Duration = Duration::from_millis(200);

/// One request waiting for the model.
pub enum Job {
    /// Generate text.
    Generate(GenerateJob),
    /// Embed texts with an encoder.
    Embed(EmbedJob),
}

/// Texts to embed, and where the vectors go.
pub struct EmbedJob {
    /// Each text's token ids.
    pub inputs: Vec<Vec<u32>>,
    /// How token states become one vector.
    pub pooling: Pooling,
    /// The answer.
    pub reply: tokio::sync::oneshot::Sender<Result<Vec<Vec<f32>>, ApiError>>,
}

/// A generation waiting for the model.
pub struct GenerateJob {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Its options (jobs with equal options share a batch).
    pub config: GenerationConfig,
    /// Where its events go; a closed channel means the client left.
    pub events: UnboundedSender<Event>,
    /// When the request arrived.
    pub arrived: Instant,
}

/// What a job hears from the model thread.
#[derive(Debug)]
pub enum Event {
    /// More text of choice `index`.
    Text {
        /// The choice (`0..n`).
        index: usize,
        /// The new text.
        piece: String,
    },
    /// Choice `index` is complete.
    End {
        /// The choice.
        index: usize,
        /// Why it ended.
        finish: FinishReason,
        /// Tokens it generated.
        tokens: usize,
    },
    /// The request failed.
    Failed(ApiError),
}

/// State the handlers read.
#[derive(Debug, Default)]
pub struct Shared {
    /// False once a rank died.
    pub healthy: AtomicBool,
    /// Counters.
    pub metrics: Metrics,
}

/// Runs jobs from `jobs` until every sender is gone, then stops the ranks.
pub fn run(
    mut model: ParallelModel,
    text: Arc<TextSide>,
    jobs: Receiver<Job>,
    shared: Arc<Shared>,
) {
    let mut pending: VecDeque<Job> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match jobs.recv_timeout(HEALTH_CHECK) {
                Ok(job) => pending.push_back(job),
                Err(RecvTimeoutError::Timeout) => {
                    // Idle: notice a rank that died, so that /health turns red.
                    let alive = model.check_alive().is_ok();
                    shared.healthy.store(alive, Ordering::Relaxed);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        pending.extend(jobs.try_iter());
        let first = match pending.pop_front() {
            Some(Job::Generate(job)) => job,
            Some(Job::Embed(job)) => {
                embed(&mut model, job, &shared);
                continue;
            }
            None => continue,
        };
        let mut batch = vec![first];
        let mut i = 0;
        while i < pending.len() && batch.len() < MAX_BATCH {
            match &pending[i] {
                Job::Generate(job) if job.config == batch[0].config => {
                    if let Some(Job::Generate(job)) = pending.remove(i) {
                        batch.push(job);
                    }
                }
                _ => i += 1,
            }
        }
        run_batch(&mut model, &text, batch, &shared);
    }
    model.deparallelize();
}

/// Generates for `batch` (jobs with equal options) and tells each job what happened.
fn run_batch(model: &mut ParallelModel, text: &TextSide, batch: Vec<GenerateJob>, shared: &Shared) {
    let config = batch[0].config.clone();
    let copies = config.num_return_sequences.max(1);
    let prompts: Vec<Vec<u32>> = batch.iter().map(|j| j.prompt.clone()).collect();
    let mut outputs: Vec<Output> = (0..batch.len() * copies)
        .map(|_| Output::new(&config.stop))
        .collect();
    let mut answered = vec![false; batch.len()];
    let started = Instant::now();
    let result = model.generate_batch(&prompts, &config, |row, token| {
        let job = &batch[row / copies];
        if !std::mem::replace(&mut answered[row / copies], true) {
            shared.metrics.first_token(job.arrived.elapsed());
        }
        let piece = outputs[row].push(&text.tokenizer, token);
        let gone = match piece {
            Some(piece) => job
                .events
                .send(Event::Text {
                    index: row % copies,
                    piece,
                })
                .is_err(),
            None => job.events.is_closed(),
        };
        match gone {
            true => ControlFlow::Break(()),
            false => ControlFlow::Continue(()),
        }
    });
    match result {
        Ok(generated) => {
            let eos = config
                .eos_token_id
                .clone()
                .unwrap_or_else(|| model.model().eos_token_ids.clone());
            let tokens: usize = generated.sequences.iter().map(Vec::len).sum();
            let steps = generated.sequences.iter().map(Vec::len).max().unwrap_or(0);
            shared.metrics.decoded(
                tokens,
                steps,
                Duration::from_secs_f64(generated.decode_seconds),
            );
            for (row, sequence) in generated.sequences.iter().enumerate() {
                let job = &batch[row / copies];
                let index = row % copies;
                if let Some(rest) = outputs[row].finish(&text.tokenizer) {
                    let _ = job.events.send(Event::Text { index, piece: rest });
                }
                let ended_by_length = sequence.len() >= config.max_new_tokens
                    && sequence.last().is_none_or(|t| !eos.contains(t));
                let finish = match ended_by_length && !outputs[row].stopped {
                    true => FinishReason::Length,
                    false => FinishReason::Stop,
                };
                let _ = job.events.send(Event::End {
                    index,
                    finish,
                    tokens: sequence.len(),
                });
            }
        }
        Err(e) => {
            let error = api_error(model, shared, &e);
            for job in &batch {
                let _ = job.events.send(Event::Failed(error.clone()));
            }
        }
    }
    tracing::debug!(
        jobs = batch.len(),
        seconds = started.elapsed().as_secs_f64(),
        "batch done"
    );
}

/// The answer to a request the model failed: 503 once a rank died (and `/health` turns red),
/// 400 for input the model refused, 500 otherwise.
fn api_error(model: &ParallelModel, shared: &Shared, e: &Error) -> ApiError {
    let dead = model.failure().is_some();
    shared.healthy.store(!dead, Ordering::Relaxed);
    match (e, dead) {
        (_, true) => ApiError::unavailable(format!("the model is down: {e}"), None),
        (Error::InvalidInput(message), false) => ApiError::invalid("", message.clone()),
        _ => ApiError::internal(format!("the model failed: {e}")),
    }
}

/// Runs an encoder over the texts (one batch, padded on the right) and pools each.
fn embed(model: &mut ParallelModel, job: EmbedJob, shared: &Shared) {
    let width = job.inputs.iter().map(Vec::len).max().unwrap_or(0);
    let input = ForwardInput {
        input_ids: job
            .inputs
            .iter()
            .flat_map(|ids| {
                ids.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, width - ids.len()))
            })
            .collect(),
        batch: job.inputs.len(),
        seq_len: width,
        attention_mask: Some(
            job.inputs
                .iter()
                .flat_map(|ids| (0..width).map(|i| u32::from(i < ids.len())))
                .collect(),
        ),
    };
    let answer = match model.forward(&input) {
        Ok(states) => {
            let hidden = states.shape.last().copied().unwrap_or(0);
            Ok(job
                .inputs
                .iter()
                .zip(states.data.chunks_exact(width * hidden.max(1)))
                .map(|(ids, states)| job.pooling.pool(states, hidden, ids.len()))
                .collect())
        }
        Err(e) => Err(api_error(model, shared, &e)),
    };
    let _ = job.reply.send(answer);
}

/// One row's text on its way out: complete characters only, and never past a stop string
/// (OpenAI's answers leave the stop string out, so text that could begin one is held back).
struct Output {
    stream: TextStream,
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl Output {
    fn new(stops: &[String]) -> Self {
        Output {
            stream: TextStream::new(),
            stops: stops.to_vec(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Adds a token; returns the text that is now safe to send.
    fn push(&mut self, tokenizer: &tokenizers::Tokenizer, token: u32) -> Option<String> {
        let piece = self.stream.push(tokenizer, token).ok().flatten()?;
        self.release(piece, false)
    }

    /// The text still held once the row ended.
    fn finish(&mut self, tokenizer: &tokenizers::Tokenizer) -> Option<String> {
        let rest = self
            .stream
            .finish(tokenizer)
            .ok()
            .flatten()
            .unwrap_or_default();
        self.release(rest, true)
    }

    fn release(&mut self, piece: String, last: bool) -> Option<String> {
        if self.stopped {
            return None;
        }
        self.held.push_str(&piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            self.held.truncate(at);
            return Some(std::mem::take(&mut self.held)).filter(|t| !t.is_empty());
        }
        let keep = match last {
            true => 0,
            false => self
                .stops
                .iter()
                .map(|s| s.len().saturating_sub(1))
                .max()
                .unwrap_or(0),
        };
        let mut cut = self.held.len().saturating_sub(keep);
        while !self.held.is_char_boundary(cut) {
            cut -= 1;
        }
        let out: String = self.held.drain(..cut).collect();
        Some(out).filter(|t| !t.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_may_begin_a_stop_string_is_held_and_the_stop_string_is_dropped() {
        let mut out = Output::new(&["END".to_string()]);
        assert_eq!(
            out.release("hello E".into(), false).as_deref(),
            Some("hello")
        );
        assert_eq!(out.release("N".into(), false).as_deref(), Some(" "));
        assert_eq!(out.release("D and more".into(), false), None);
        assert!(out.stopped);
        assert_eq!(out.release("ignored".into(), true), None);
        let mut plain = Output::new(&[]);
        assert_eq!(plain.release("é".into(), false).as_deref(), Some("é"));
    }
}
