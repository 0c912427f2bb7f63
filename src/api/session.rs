//! Continuous batching through the library: [`ParallelModel::generate_session`] keeps one batch
//! running while the caller's sequences join it and leave it between decode steps.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use super::stops::StopWatch;
use super::{ParallelModel, RequestRules};
use crate::error::{Error, Result};
use crate::generation::constraint::Grammars;
use crate::generation::prefix_cache::PrefixCacheReport;
use crate::generation::session::{EndReason, SequenceRequest, SessionSummary};
use crate::generation::GenerationConfig;
use crate::generation::TokenLogprobs;
use crate::parallel::ipc::{Reply, Request};
use crate::parallel::launcher::Listener;
use crate::text::TextSide;

/// A sequence to add to a session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSequence {
    /// The caller's name for it, unique among the session's running sequences.
    pub id: u32,
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// Its options: greedy or sampling (beam search and several returned sequences cannot
    /// join a running batch; run those with [`ParallelModel::generate_batch`]). With a seed,
    /// the sequence draws the same tokens as [`ParallelModel::generate`] with that seed.
    pub config: GenerationConfig,
}

/// How a sequence of a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceEnd {
    /// Its last token is an end-of-sequence id.
    EndOfSequence,
    /// It reached `max_new_tokens`.
    Length,
    /// A stop string matched, or the driver finished it.
    Stopped,
}

/// The caller's side of a session.
pub trait SessionDriver {
    /// Sequences to add now (none: nothing to add yet). Called before the session starts,
    /// between decode steps (at least every 20 ms), and whenever the batch runs empty; when it
    /// returns nothing while the batch is empty, the session ends.
    fn join(&mut self) -> Vec<SessionSequence>;
    /// A new token of sequence `id`; [`ControlFlow::Break`] finishes the sequence.
    fn token(&mut self, id: u32, token: u32) -> ControlFlow<()>;
    /// The log-probabilities of the token of sequence `id` that [`SessionDriver::token`] hears
    /// next, for sequences whose options ask for `logprobs` (see
    /// [`logprobs`](crate::generation::logprobs) for what is reported). Ignored by default.
    fn logprobs(&mut self, id: u32, logprobs: &TokenLogprobs) {
        let _ = (id, logprobs);
    }
    /// Sequence `id` ended after its last token, or was refused or failed (`Err`, naming why).
    fn ended(&mut self, id: u32, end: Result<SequenceEnd>);
    /// Sequences to finish now without waiting for their next token (one whose long prompt is
    /// still being prefilled streams none for a while). Asked as often as [`join`]; each ends
    /// as [`SequenceEnd::Stopped`]. None by default.
    ///
    /// [`join`]: SessionDriver::join
    fn finished(&mut self) -> Vec<u32> {
        Vec::new()
    }
    /// What the ranks' prefix cache did since the last report: prompt tokens it supplied and
    /// those computed, and what it holds now. Ignored by default.
    fn prefix_cache(&mut self, report: &PrefixCacheReport) {
        let _ = report;
    }
}

/// Figures of a finished session (rank 0's timings).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionStats {
    /// Sequences that ran.
    pub sequences: usize,
    /// Tokens they generated.
    pub tokens: usize,
    /// Decode steps (each extends every running sequence by one token).
    pub steps: usize,
    /// Chunks of joining prompts prefilled: the columns of a group of joining sequences that
    /// one step prefills (a long prompt joining a running batch takes several).
    pub prefill_chunks: usize,
    /// Steps that prefilled chunks beside a decode step of the running batch (in one pass of
    /// the model, for the Llama-style decoders).
    pub passes_beside_decode: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_prompt_tokens: usize,
    /// Time of the joining sequences' forward passes, in seconds.
    pub prefill_seconds: f64,
    /// Time of the decode steps and token choices, in seconds.
    pub decode_seconds: f64,
    /// The part of `decode_seconds` rank 0 spent outside the model.
    pub overhead_seconds: f64,
}

impl ParallelModel {
    /// Refuses models that cannot run a continuous-batching session: encoders, and
    /// encoder–decoders (whose cross-attention caches sessions do not move yet).
    pub fn check_sessions(&self) -> Result<()> {
        self.rules().check_generates()?;
        match self.config().seq2seq {
            None => Ok(()),
            Some(_) => Err(Error::InvalidInput(format!(
                "{} is an encoder–decoder: it generates with generate, but continuous batching (sessions, serve) does not take encoder–decoders yet",
                self.config().architecture
            ))),
        }
    }

    /// Runs a continuous-batching session: the sequences `driver` hands over join the running
    /// batch between decode steps (they are prefilled together, then decode with the others),
    /// each streams its tokens to `driver` and leaves the batch as soon as it ends. The session
    /// ends once the batch is empty and `driver` has nothing to add.
    ///
    /// Each sequence is checked as [`ParallelModel::generate`] checks a request; one that fails
    /// the check, or whose options leave no token to choose, ends with an error while the others
    /// go on. If a rank fails, every running sequence ends with the error and so does the call.
    pub fn generate_session(&mut self, driver: &mut dyn SessionDriver) -> Result<SessionStats> {
        self.check_sessions()?;
        let text = self.text_side().map_err(|e| e.to_string());
        let mut listener = SessionListener {
            rules: self.rules(),
            grammars: self.grammars.clone(),
            text,
            driver,
            live: HashMap::new(),
            closing: false,
        };
        let Request::Join(initial) = listener.after_idle() else {
            return Ok(SessionStats::default());
        };
        let request = Request::Session(initial);
        let replies = match self.group.request_streaming(&request, None, &mut listener) {
            Ok(replies) => replies,
            Err(e) => {
                listener.fail_all(&e);
                return Err(e);
            }
        };
        let summaries = replies
            .into_iter()
            .map(|reply| match reply {
                Reply::SessionEnded(summary) => Ok(summary),
                other => Err(Error::Launch(format!(
                    "unexpected answer to a session: {other:?}"
                ))),
            })
            .collect::<Result<Vec<SessionSummary>>>()?;
        let first = &summaries[0];
        if let Some(rank) = summaries
            .iter()
            .position(|s| s.sequences != first.sequences)
        {
            return Err(Error::Launch(format!(
                "rank {rank} generated other tokens than rank 0"
            )));
        }
        Ok(SessionStats {
            sequences: first.sequences.len(),
            tokens: first.sequences.iter().map(|(_, t)| t.len()).sum(),
            steps: first.steps,
            prefill_chunks: first.prefill_chunks,
            passes_beside_decode: first.passes_beside_decode,
            cached_prompt_tokens: first.cached_prompt_tokens,
            prefill_seconds: first.prefill_seconds,
            decode_seconds: first.decode_seconds,
            overhead_seconds: first.overhead_seconds,
        })
    }
}

/// A sequence the ranks are running, as the main process follows it.
struct Live {
    stops: Option<StopWatch>,
    /// The main process asked rank 0 to finish it; later tokens are dropped.
    finishing: bool,
    /// Why it failed in the main process (its text could not be decoded).
    error: Option<Error>,
}

/// The main process's side of a running session.
struct SessionListener<'a> {
    rules: RequestRules,
    /// Compiles the sequences' constraints (to refuse those that do not compile).
    grammars: Arc<Grammars>,
    /// The tokenizer for stop strings, or why there is none.
    text: std::result::Result<Arc<TextSide>, String>,
    driver: &'a mut dyn SessionDriver,
    live: HashMap<u32, Live>,
    /// The session was told to end: nothing joins any more.
    closing: bool,
}

impl SessionListener<'_> {
    /// The driver's new sequences that pass the checks (the others end at once).
    fn admit(&mut self) -> Vec<SequenceRequest> {
        if self.closing {
            return Vec::new();
        }
        let offered = self.driver.join();
        self.check_all(offered)
    }

    /// The `offered` sequences that pass the checks; the others end at once.
    fn check_all(&mut self, offered: Vec<SessionSequence>) -> Vec<SequenceRequest> {
        let mut admitted = Vec::new();
        for sequence in offered {
            let id = sequence.id;
            match self.check(sequence) {
                Ok((request, _)) if request.config.max_new_tokens == 0 => {
                    self.driver.ended(id, Ok(SequenceEnd::Length));
                }
                Ok((request, stops)) => {
                    let live = Live {
                        stops,
                        finishing: false,
                        error: None,
                    };
                    self.live.insert(id, live);
                    admitted.push(request);
                }
                Err(e) => self.driver.ended(id, Err(e)),
            }
        }
        admitted
    }

    /// The wire form of `sequence`, with its stop-string watch, after the checks.
    fn check(&self, sequence: SessionSequence) -> Result<(SequenceRequest, Option<StopWatch>)> {
        let SessionSequence { id, prompt, config } = sequence;
        if self.live.contains_key(&id) {
            return Err(Error::InvalidInput(format!(
                "sequence {id} is already running"
            )));
        }
        if prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        if config.num_beams > 1 || config.num_return_sequences > 1 {
            return Err(Error::InvalidInput(format!(
                "num_beams {} and num_return_sequences {} cannot join a running batch (both must be 1)",
                config.num_beams, config.num_return_sequences
            )));
        }
        self.rules.check_ids(&prompt)?;
        let (eos_token_ids, seed) = self.rules.options(&config, prompt.len())?;
        if let Some(constraint) = &config.constraint {
            self.grammars.check(constraint)?;
        }
        let stops = match (config.stop.is_empty(), &self.text) {
            (true, _) => None,
            (false, Ok(text)) => Some(StopWatch::new(text.clone(), &config.stop)),
            (false, Err(why)) => return Err(Error::InvalidInput(why.clone())),
        };
        let request = SequenceRequest {
            id,
            prompt,
            config,
            eos_token_ids,
            seed,
        };
        Ok((request, stops))
    }

    /// Passes a streamed token on; asks rank 0 to finish the sequence when the driver says
    /// so or a stop string matched.
    fn token(&mut self, id: u32, token: u32) -> Option<Request> {
        let live = self.live.get_mut(&id).filter(|live| !live.finishing)?;
        let mut finish = self.driver.token(id, token).is_break();
        match live.stops.as_mut().map(|stops| stops.push(token)) {
            Some(Ok(true)) => finish = true,
            Some(Err(e)) => {
                live.error = Some(e);
                finish = true;
            }
            _ => {}
        }
        live.finishing = finish;
        finish.then(|| Request::Finish(vec![id]))
    }

    /// Tells the driver how sequence `id` ended.
    fn ended(&mut self, id: u32, reason: &EndReason) {
        let Some(live) = self.live.remove(&id) else {
            return;
        };
        let end = match (live.error, reason) {
            (Some(e), _) => Err(e),
            (None, EndReason::Failed(why)) => Err(Error::InvalidInput(why.clone())),
            (None, _) if live.finishing => Ok(SequenceEnd::Stopped),
            (None, EndReason::Finished) => Ok(SequenceEnd::Stopped),
            (None, EndReason::EndOfSequence) => Ok(SequenceEnd::EndOfSequence),
            (None, EndReason::Length) => Ok(SequenceEnd::Length),
        };
        self.driver.ended(id, end);
    }

    /// Ends every running sequence with `error`.
    fn fail_all(&mut self, error: &Error) {
        for (id, _) in std::mem::take(&mut self.live) {
            self.driver.ended(
                id,
                Err(Error::Launch(format!("the session failed: {error}"))),
            );
        }
    }

    /// The driver's new sequences as a control message, if any.
    fn joining(&mut self) -> Option<Request> {
        let admitted = self.admit();
        (!admitted.is_empty()).then_some(Request::Join(admitted))
    }

    /// The running sequences the driver finishes now, as a control message, if any.
    fn finishing(&mut self) -> Option<Request> {
        let ids: Vec<u32> = self
            .driver
            .finished()
            .into_iter()
            .filter(|id| match self.live.get_mut(id) {
                Some(live) if !live.finishing => {
                    live.finishing = true;
                    true
                }
                _ => false,
            })
            .collect();
        (!ids.is_empty()).then_some(Request::Finish(ids))
    }

    /// The answer to an empty batch: the driver's next sequences that pass the checks (asking
    /// again while it offers only sequences that end at once), else the end of the session.
    fn after_idle(&mut self) -> Request {
        loop {
            let offered = self.driver.join();
            if offered.is_empty() {
                self.closing = true;
                return Request::EndSession;
            }
            let admitted = self.check_all(offered);
            if !admitted.is_empty() {
                return Request::Join(admitted);
            }
        }
    }
}

impl Listener for SessionListener<'_> {
    fn partial(&mut self, reply: &Reply) -> Vec<Request> {
        match reply {
            &Reply::Token { row, token } => self.token(row, token).into_iter().collect(),
            Reply::Logprobs { row, logprobs } => {
                if self.live.get(row).is_some_and(|live| !live.finishing) {
                    self.driver.logprobs(*row, logprobs);
                }
                Vec::new()
            }
            Reply::Ended { id, reason } => {
                self.ended(*id, reason);
                Vec::new()
            }
            Reply::Idle => vec![self.after_idle()],
            Reply::PrefixCache(report) => {
                self.driver.prefix_cache(report);
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn tick(&mut self) -> Vec<Request> {
        self.finishing().into_iter().chain(self.joining()).collect()
    }
}
