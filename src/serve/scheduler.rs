//! The thread that owns the parallel model. Generation jobs run in a continuous-batching
//! session ([`ParallelModel::generate_session`]): each job's choices join the running batch
//! between decode steps as soon as the batch has room for them ([`BatchLimits`]: rows and
//! memory), stream their text as tokens are chosen, and leave the batch the moment they end. A
//! job whose client went away leaves at the next step. An embedding job waits until the batch
//! drains, then runs alone.
//!
//! When a rank dies, the requests it took down are answered 503, and the thread starts the
//! ranks again (waiting longer after each failure that follows soon after the last), answering
//! 503 meanwhile. Once the server stops, running requests are cut at the end of the grace
//! period ([`Shared::stopping`]) with an error.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::api::{ParallelModel, SequenceEnd, SessionDriver, SessionSequence};
use crate::error::{Error, Result};
use crate::generation::prefix_cache::PrefixCacheReport;
use crate::generation::{GenerationConfig, TokenLogprobs};
use crate::serve::admission::BatchLimits;
use crate::serve::logprobs::TokenScore;
use crate::serve::metrics::Metrics;
use crate::serve::openai::{ApiError, FinishReason};
use crate::serve::pooling::{self, Pooling};
use crate::text::TextSide;
use crate::tokenizer::TextStream;

/// How often an idle model thread checks that every rank is alive.
const HEALTH_CHECK: Duration = Duration::from_millis(200);

/// The first wait before restarting ranks that failed; it doubles after each failure that
/// follows soon after a restart, up to [`LONGEST_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait before a restart.
const LONGEST_BACKOFF: Duration = Duration::from_secs(30);
/// How long ranks must run after a restart for the next failure to start the back-off over.
const STABLE: Duration = Duration::from_secs(60);
/// The `Retry-After` of a request refused while the ranks restart, in seconds.
const RETRY_AFTER_RESTART: u64 = 5;

/// One request waiting for the model.
pub enum Job {
    /// Generate text (boxed: its options are most of its size).
    Generate(Box<GenerateJob>),
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
    /// Its options.
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
        /// The new text (empty when only scores are left to send).
        piece: String,
        /// When the request asked for log-probabilities, those of the tokens generated since
        /// the last piece (the text of a token can come out later than the token).
        logprobs: Option<Vec<TokenScore>>,
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
#[derive(Debug)]
pub struct Shared {
    /// False from the moment a rank died until its group is running again.
    pub healthy: AtomicBool,
    /// Turns true when the grace period after a stop signal ends: running requests are cut
    /// (each hears an error) and waiting ones refused.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Counters.
    pub metrics: Metrics,
}

impl Shared {
    /// Healthy, not stopping, no counts yet.
    pub fn new() -> Self {
        Shared {
            healthy: AtomicBool::new(true),
            stopping: tokio::sync::watch::Sender::new(false),
            metrics: Metrics::default(),
        }
    }

    /// Whether the server has stopped serving running requests.
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Cuts the running requests and refuses the waiting ones.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}

/// The answer to requests that the server's stop cuts or refuses.
pub fn shutting_down() -> ApiError {
    ApiError::unavailable("the server is shutting down", None)
}

/// The answer to requests that a failed rank took down, or that arrive while the ranks
/// restart; the failure itself goes to the log, not to clients.
pub fn outage() -> ApiError {
    ApiError::unavailable(
        "a worker process of the model failed; the server is restarting it",
        Some(RETRY_AFTER_RESTART),
    )
}

/// Answers a job that will not run with `error`.
fn refuse(job: Job, error: ApiError) {
    match job {
        Job::Generate(job) => {
            let _ = job.events.send(Event::Failed(error));
        }
        Job::Embed(job) => {
            let _ = job.reply.send(Err(error));
        }
    }
}

/// The waits before restarts: doubling while failures follow restarts closely.
struct Backoff {
    next: Duration,
    restarted: Option<Instant>,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: FIRST_BACKOFF,
            restarted: None,
        }
    }

    /// The wait before the next restart.
    fn wait(&mut self) -> Duration {
        if self.restarted.is_some_and(|at| at.elapsed() > STABLE) {
            self.next = FIRST_BACKOFF;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(LONGEST_BACKOFF);
        wait
    }
}

/// Runs jobs from `jobs` until every sender is gone, then stops the ranks. Batches stay
/// within `limits`.
pub fn run(
    mut model: ParallelModel,
    text: Arc<TextSide>,
    jobs: Receiver<Job>,
    shared: Arc<Shared>,
    limits: BatchLimits,
) {
    let mut pending: VecDeque<Job> = VecDeque::new();
    let mut backoff = Backoff::new();
    loop {
        if let Some(failure) = model.failure() {
            tracing::error!("the model is down: {failure}");
            pending.drain(..).for_each(|job| refuse(job, outage()));
            match heal(&mut model, &jobs, &shared, &mut backoff) {
                true => continue,
                false => break,
            }
        }
        if shared.is_stopping() {
            pending.extend(jobs.try_iter());
            pending
                .drain(..)
                .for_each(|job| refuse(job, shutting_down()));
        }
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
        match pending.pop_front() {
            Some(Job::Embed(job)) => embed(&mut model, job, &shared),
            Some(Job::Generate(job)) => {
                let queue = Queue {
                    jobs: &jobs,
                    pending: &mut pending,
                };
                run_session(&mut model, &text, *job, queue, &shared, &limits)
            }
            None => {}
        }
    }
    model.deparallelize();
}

/// Restarts the failed ranks, after a back-off during which arriving jobs are refused with
/// 503; tries again (waiting longer) while restarts fail. Returns false when the server stops
/// first.
fn heal(
    model: &mut ParallelModel,
    jobs: &Receiver<Job>,
    shared: &Shared,
    backoff: &mut Backoff,
) -> bool {
    shared.healthy.store(false, Ordering::Relaxed);
    loop {
        let until = Instant::now() + backoff.wait();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match jobs.recv_timeout(left) {
                Ok(job) => refuse(job, outage()),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        if shared.is_stopping() {
            return false;
        }
        match model.restart() {
            Ok(()) => {
                backoff.restarted = Some(Instant::now());
                shared
                    .metrics
                    .restarted(model.load_report().to_vec(), model.worker_pids());
                shared.healthy.store(true, Ordering::Relaxed);
                tracing::warn!("the ranks were restarted and serve again");
                return true;
            }
            Err(e) => tracing::error!("restarting the ranks failed: {e}"),
        }
    }
}

/// The jobs that wait for the model: those taken from the channel, then the channel.
struct Queue<'a> {
    jobs: &'a Receiver<Job>,
    pending: &'a mut VecDeque<Job>,
}

/// Runs `first`, then the jobs of `pending` and those arriving meanwhile, in one
/// continuous-batching session until the batch is empty and the next job cannot join it.
fn run_session(
    model: &mut ParallelModel,
    text: &TextSide,
    first: GenerateJob,
    queue: Queue<'_>,
    shared: &Shared,
    limits: &BatchLimits,
) {
    queue.pending.push_front(Job::Generate(Box::new(first)));
    let mut driver = Session {
        text,
        queue,
        shared,
        limits,
        live: HashMap::new(),
        next_id: 0,
        broken: Vec::new(),
    };
    let result = model.generate_session(&mut driver);
    let mut broken = std::mem::take(&mut driver.broken);
    let untouched = driver.next_id == 0;
    match result {
        Ok(stats) => tracing::debug!(
            sequences = stats.sequences,
            steps = stats.steps,
            "session done"
        ),
        Err(e) => {
            // A session refused before it took any job (the model cannot generate): the
            // first job hears why, so that it is not run again.
            if untouched {
                if let Some(Job::Generate(job)) = driver.queue.pending.pop_front() {
                    broken.push(Rc::new(JobState::new(*job)));
                }
            }
            let error = api_error(model, shared, &e);
            for job in broken {
                let _ = job.events.send(Event::Failed(error.clone()));
            }
        }
    }
}

/// A job as its running choices share it.
struct JobState {
    events: UnboundedSender<Event>,
    arrived: Instant,
    answered: Cell<bool>,
}

impl JobState {
    fn new(job: GenerateJob) -> Self {
        JobState {
            events: job.events,
            arrived: job.arrived,
            answered: Cell::new(false),
        }
    }
}

/// One choice of a job, running as a sequence of the session.
struct Choice {
    job: Rc<JobState>,
    index: usize,
    output: Output,
    tokens: usize,
    last_token: Option<Instant>,
    /// Its prompt plus its `max_tokens`: the widest its cache row can grow.
    positions: usize,
    /// The server's stop finished it: its job hears an error, not an ending.
    cut: bool,
    /// When the request asked for log-probabilities, those of its tokens not sent yet.
    scores: Option<Vec<TokenScore>>,
    /// Characters of its tokens' texts so far (where the next token's text starts).
    text_offset: usize,
}

/// The scheduler's side of a session: hands queued jobs to the batch and relays each
/// sequence's text to its job.
struct Session<'a> {
    text: &'a TextSide,
    queue: Queue<'a>,
    shared: &'a Shared,
    limits: &'a BatchLimits,
    live: HashMap<u32, Choice>,
    next_id: u32,
    /// Jobs whose sequences the session's failure ended; they hear why once it is known.
    broken: Vec<Rc<JobState>>,
}

impl SessionDriver for Session<'_> {
    fn join(&mut self) -> Vec<SessionSequence> {
        let stopping = self.shared.is_stopping();
        let pending = &mut *self.queue.pending;
        pending.extend(self.queue.jobs.try_iter());
        if stopping {
            pending
                .drain(..)
                .for_each(|job| refuse(job, shutting_down()));
            return Vec::new();
        }
        let mut rows = self.live.len();
        let mut longest = self.live.values().map(|c| c.positions).max().unwrap_or(0);
        let mut joining = Vec::new();
        while let Some(Job::Generate(job)) = pending.front() {
            let choices = job.config.num_return_sequences.max(1);
            let positions = job.prompt.len() + job.config.max_new_tokens;
            let fits = self.limits.fits(rows, longest, choices, positions);
            if !fits && rows > 0 {
                // It waits for running sequences to leave.
                break;
            }
            let Some(Job::Generate(job)) = pending.pop_front() else {
                break;
            };
            if job.events.is_closed() {
                continue;
            }
            if !fits {
                // Checked at the door; a job that could never fit is refused here too.
                let error = match self.limits.check_request(choices, positions) {
                    Err(e) => e,
                    Ok(()) => ApiError::internal("the request does not fit in an empty batch"),
                };
                let _ = job.events.send(Event::Failed(error));
                continue;
            }
            (rows, longest) = (rows + choices, longest.max(positions));
            let (prompt, job_config) = (job.prompt.clone(), job.config.clone());
            let state = Rc::new(JobState::new(*job));
            for index in 0..choices {
                let mut config = job_config.clone();
                config.num_return_sequences = 1;
                config.seed = config.seed.map(|seed| seed.wrapping_add(index as u64));
                let id = self.next_id;
                self.next_id = self.next_id.wrapping_add(1);
                let choice = Choice {
                    job: state.clone(),
                    index,
                    output: Output::new(&config.stop),
                    tokens: 0,
                    last_token: None,
                    positions,
                    cut: false,
                    scores: config.logprobs.then(Vec::new),
                    text_offset: 0,
                };
                self.live.insert(id, choice);
                joining.push(SessionSequence {
                    id,
                    prompt: prompt.clone(),
                    config,
                });
            }
        }
        joining
    }

    fn token(&mut self, id: u32, token: u32) -> ControlFlow<()> {
        let Some(choice) = self.live.get_mut(&id) else {
            return ControlFlow::Break(());
        };
        let metrics = &self.shared.metrics;
        let now = Instant::now();
        match choice.last_token.replace(now) {
            Some(last) => metrics.decode_time(1, now - last),
            None if !choice.job.answered.replace(true) => {
                metrics.first_token(choice.job.arrived.elapsed())
            }
            None => {}
        }
        if self.shared.is_stopping() {
            choice.cut = true;
            return ControlFlow::Break(());
        }
        choice.tokens += 1;
        let events = &choice.job.events;
        let gone = match choice.output.push(&self.text.tokenizer, token) {
            Some(piece) => events
                .send(Event::Text {
                    index: choice.index,
                    piece,
                    logprobs: choice.scores.as_mut().map(std::mem::take),
                })
                .is_err(),
            None => events.is_closed(),
        };
        match gone {
            true => ControlFlow::Break(()),
            false => ControlFlow::Continue(()),
        }
    }

    fn logprobs(&mut self, id: u32, logprobs: &TokenLogprobs) {
        let Some(choice) = self.live.get_mut(&id) else {
            return;
        };
        if let Some(scores) = choice.scores.as_mut() {
            let score = TokenScore::new(logprobs, &self.text.tokenizer, choice.text_offset);
            choice.text_offset += score.chosen.text.chars().count();
            scores.push(score);
        }
    }

    fn ended(&mut self, id: u32, end: Result<SequenceEnd>) {
        let Some(mut choice) = self.live.remove(&id) else {
            return;
        };
        let events = &choice.job.events;
        if choice.cut {
            let _ = events.send(Event::Failed(shutting_down()));
            return;
        }
        match end {
            Ok(end) => {
                self.shared.metrics.completion_tokens(choice.tokens);
                let rest = choice.output.finish(&self.text.tokenizer);
                let scores = choice.scores.take().filter(|s| !s.is_empty());
                if rest.is_some() || scores.is_some() {
                    let _ = events.send(Event::Text {
                        index: choice.index,
                        piece: rest.unwrap_or_default(),
                        logprobs: scores,
                    });
                }
                let finish = match (end, choice.output.stopped) {
                    (SequenceEnd::Length, false) => FinishReason::Length,
                    _ => FinishReason::Stop,
                };
                let _ = events.send(Event::End {
                    index: choice.index,
                    finish,
                    tokens: choice.tokens,
                });
            }
            Err(Error::InvalidInput(message)) => {
                let _ = events.send(Event::Failed(ApiError::invalid("", message)));
            }
            Err(_) => self.broken.push(choice.job),
        }
    }

    fn finished(&mut self) -> Vec<u32> {
        // Choices that have streamed nothing yet (their prompts are being prefilled) hear of
        // a gone client or the server's stop here rather than at their first token.
        let stopping = self.shared.is_stopping();
        let mut finished = Vec::new();
        for (&id, choice) in &mut self.live {
            if choice.last_token.is_some() {
                continue;
            }
            if stopping {
                choice.cut = true;
                finished.push(id);
            } else if choice.job.events.is_closed() {
                finished.push(id);
            }
        }
        finished
    }

    fn prefix_cache(&mut self, report: &PrefixCacheReport) {
        self.shared.metrics.prefix_cache(report);
    }
}

/// The answer to a request the model failed: 503 once a rank died (and `/health` turns red
/// until the ranks are restarted), 400 for input the model refused, 500 otherwise. What went
/// wrong inside goes to the log, not to the client.
fn api_error(model: &ParallelModel, shared: &Shared, e: &Error) -> ApiError {
    let dead = model.failure().is_some();
    shared.healthy.store(!dead, Ordering::Relaxed);
    match (e, dead) {
        (_, true) => outage(),
        (Error::InvalidInput(message), false) => ApiError::invalid("", message.clone()),
        _ => {
            tracing::error!("a request failed: {e}");
            ApiError::internal("the model failed; the server's log says why")
        }
    }
}

/// Runs an encoder over the texts (one batch, padded on the right) and pools each.
fn embed(model: &mut ParallelModel, job: EmbedJob, shared: &Shared) {
    let answer =
        pooling::embed(model, &job.inputs, &job.pooling).map_err(|e| api_error(model, shared, &e));
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
