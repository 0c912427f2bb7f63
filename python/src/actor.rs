//! The thread that owns a parallel model. The ranks are started from it and live as long as it
//! does (a rank dies with the thread that started it), so a model made on a short-lived Python
//! thread keeps its ranks; Python calls send it jobs and wait for the answers with the GIL
//! released.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use parallelformers::checkpoint::source::{ResolvedModel, WeightsLocation};
use parallelformers::serve::pooling::{self, Pooling};
use parallelformers::{
    Error, ForwardInput, GeneratedBatch, GenerationConfig, Options, ParallelModel, RankMemory,
    Result, WireTensor,
};

/// What the model tells Python once it has started.
pub struct Started {
    /// The resolved configuration, as JSON.
    pub config: String,
    /// The model's generation defaults.
    pub defaults: GenerationConfig,
    /// The model and where its weights are (for its tokenizer).
    pub resolved: ResolvedModel,
    /// The ranks' process ids.
    pub pids: Vec<u32>,
    /// Each rank's memory once loaded.
    pub memory: Vec<RankMemory>,
}

/// An event of a running generation.
pub enum Event {
    /// Row `row` chose `token`.
    Token(usize, u32),
    /// The generation ended.
    Done(Result<GeneratedBatch>),
}

/// A job for the model's thread.
pub enum Job {
    /// A forward pass.
    Forward(ForwardInput, Sender<Result<WireTensor>>),
    /// A generation, streamed as events; it stops early once `cancel` is set.
    Generate {
        prompts: Vec<Vec<u32>>,
        /// Boxed: the options are most of a job's size.
        config: Box<GenerationConfig>,
        events: Sender<Event>,
        cancel: Arc<AtomicBool>,
    },
    /// Pooled sentence embeddings `[texts, hidden]` of an encoder, from the texts' token ids.
    Embed(Vec<Vec<u32>>, Sender<Result<WireTensor>>),
    /// Each rank's memory now, as JSON.
    Memory(Sender<Result<String>>),
}

/// The model's thread and the line to it.
pub struct Actor {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Actor {
    /// Starts the thread, which resolves `source` and parallelizes it with `options`; returns
    /// once the ranks have loaded their shards (or failed to).
    pub fn start(
        source: parallelformers::ModelSource,
        options: Options,
    ) -> Result<(Self, Started)> {
        let (jobs, inbox) = channel();
        let (ready, started) = channel();
        let thread = std::thread::Builder::new()
            .name("parallelformers-model".into())
            .spawn(move || run(source, options, inbox, ready))
            .map_err(|e| Error::Launch(format!("cannot start the model's thread: {e}")))?;
        let answer = started
            .recv()
            .map_err(|_| Error::Launch("the model's thread ended while starting".into()))?;
        match answer {
            Ok(started) => Ok((
                Actor {
                    jobs: Some(jobs),
                    thread: Some(thread),
                },
                started,
            )),
            Err(e) => {
                let _ = thread.join();
                Err(e)
            }
        }
    }

    /// Sends `job`; `false` once the model is closed.
    pub fn send(&self, job: Job) -> bool {
        self.jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok())
    }
}

impl Drop for Actor {
    /// Stops the ranks and the thread, after the job in progress (which a cancelled
    /// generation ends soon).
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The model's thread: starts the model, then runs jobs until the line closes.
fn run(
    source: parallelformers::ModelSource,
    options: Options,
    inbox: Receiver<Job>,
    ready: Sender<Result<Started>>,
) {
    let start = || -> Result<(ParallelModel, Started)> {
        let model = parallelformers::parallelize(source, options)?;
        let config = serde_json::to_string(model.config())
            .map_err(|e| Error::InvalidInput(format!("cannot describe the model: {e}")))?;
        let started = Started {
            config,
            defaults: model.generation_config().clone(),
            resolved: model.model().clone(),
            pids: model.worker_pids(),
            memory: model.load_report().to_vec(),
        };
        Ok((model, started))
    };
    let mut model = match start() {
        Ok((model, started)) => {
            if ready.send(Ok(started)).is_err() {
                return;
            }
            Served::new(model)
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    while let Ok(job) = inbox.recv() {
        model.run(job);
    }
    model.model.deparallelize();
}

/// The model of the thread.
struct Served {
    model: ParallelModel,
}

impl Served {
    fn new(model: ParallelModel) -> Self {
        Served { model }
    }

    fn run(&mut self, job: Job) {
        match job {
            Job::Forward(input, reply) => {
                let _ = reply.send(self.model.forward(&input));
            }
            Job::Generate {
                prompts,
                config,
                events,
                cancel,
            } => {
                let tokens = events.clone();
                let result = self.model.generate_batch(&prompts, &config, |row, token| {
                    let _ = tokens.send(Event::Token(row, token));
                    match cancel.load(Ordering::Relaxed) {
                        true => ControlFlow::Break(()),
                        false => ControlFlow::Continue(()),
                    }
                });
                let _ = events.send(Event::Done(result));
            }
            Job::Embed(inputs, reply) => {
                let _ = reply.send(self.embed(&inputs));
            }
            Job::Memory(reply) => {
                let report = self.model.memory_report().and_then(|report| {
                    serde_json::to_string(&report)
                        .map_err(|e| Error::InvalidInput(format!("cannot describe memory: {e}")))
                });
                let _ = reply.send(report);
            }
        }
    }

    /// Runs the encoder over the token ids of some texts (one batch, padded on the right) and
    /// pools each row as the checkpoint's sentence-transformers files say (mean and
    /// normalised without them).
    fn embed(&mut self, inputs: &[Vec<u32>]) -> Result<WireTensor> {
        let dir =
            match (
                &self.model.model().location,
                self.model.config().is_causal(),
            ) {
                (WeightsLocation::Safetensors(dir), false) => dir.clone(),
                _ => return Err(Error::InvalidInput(
                    "embeddings need an encoder checkpoint (BERT-like); this model generates text"
                        .into(),
                )),
            };
        let pooling = Pooling::from_model_dir(&dir)?;
        let vectors = pooling::embed(&mut self.model, inputs, &pooling)?;
        Ok(WireTensor {
            shape: vec![vectors.len(), vectors.first().map_or(0, Vec::len)],
            data: vectors.concat(),
        })
    }
}
