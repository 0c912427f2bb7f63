//! The library's front door: [`parallelize`] a checkpoint over worker processes and use the
//! returned [`ParallelModel`] for forward passes and generation. The main process holds no
//! weights: it validates inputs, talks to the ranks, and supervises them.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use crate::checkpoint::source::{ModelSource, ResolvedModel, WeightsLocation};
use crate::checkpoint::ModelConfig;
use crate::error::{Error, Result};
use crate::generation::constraint::Grammars;
use crate::generation::{GenerateRequest, GeneratedBatch, GenerationConfig, TokenLogprobs};
use crate::options::{Backend, Options, PrefillChunk, Verbosity};
use crate::parallel::ipc::{ForwardInput, LoadSpec, Reply, Request, WireTensor};
use crate::parallel::launcher::{default_threads, LaunchSpec, WorkerGroup};
use crate::parallel::memory::RankMemory;
use crate::parallel::Plan;
use crate::policy::file::PolicyFile;
use crate::progress::{self, Progress};
use crate::text::TextSide;

mod checks;
mod session;
mod stops;

use checks::RequestRules;
pub use checks::{check_forward, check_generation};
pub use session::{SequenceEnd, SessionDriver, SessionSequence, SessionStats};
use stops::StopWatch;

/// The result of generating for one prompt, with rank 0's timings.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// New token ids of the first (with greedy decoding, the only) returned sequence.
    pub ids: Vec<u32>,
    /// New token ids of every returned sequence (`num_return_sequences`).
    pub sequences: Vec<Vec<u32>>,
    /// With `logprobs`, each returned sequence's tokens with their log-probabilities under the
    /// model's distribution and the most likely tokens of each step (see
    /// [`logprobs`](crate::generation::logprobs)).
    pub logprobs: Option<Vec<Vec<TokenLogprobs>>>,
    /// Time of the prompt's forward pass, in seconds.
    pub prefill_seconds: f64,
    /// Time of all later forward passes and token choices, in seconds.
    pub decode_seconds: f64,
    /// The part of `decode_seconds` rank 0 spent outside the model (processing logits,
    /// choosing, broadcasting, streaming).
    pub overhead_seconds: f64,
    /// Prompt tokens whose keys and values came from the ranks' prefix cache (the start of an
    /// earlier prompt or answer) instead of being computed.
    pub cached_prompt_tokens: usize,
}

/// A model split over worker processes.
pub struct ParallelModel {
    group: WorkerGroup,
    model: ResolvedModel,
    loaded: Vec<RankMemory>,
    generation_defaults: GenerationConfig,
    /// How the ranks were started (to start them again).
    options: Options,
    /// The tokenizer, loaded the first time stop strings need it.
    text: Option<Arc<TextSide>>,
    /// Compiles constraints, to refuse those that do not compile before any rank works.
    grammars: Arc<Grammars>,
}

/// Splits the model `source` names (a checkpoint directory, a `.gguf` file, a Hub id, or
/// [`ModelSource::Default`]) over `options.ranks` worker processes.
///
/// Configuration, weight headers and the split are validated here, before any process starts.
/// Each rank then loads only its own slices. With `verbose` set, each rank's memory is printed
/// to standard error; with `progress` set, the downloads and each rank's loading are reported
/// to it as they go.
pub fn parallelize(source: impl Into<ModelSource>, options: Options) -> Result<ParallelModel> {
    let policy = options
        .policy
        .as_deref()
        .map(PolicyFile::load)
        .transpose()?;
    let model = ResolvedModel::resolve_with_progress(
        &source.into(),
        policy.as_ref(),
        options.progress.as_ref(),
    )?;
    parallelize_resolved(model, options)
}

/// [`parallelize`] for a model already resolved (for callers that also need its tokenizer).
pub fn parallelize_resolved(model: ResolvedModel, options: Options) -> Result<ParallelModel> {
    let model = model.with_expert_split(options.expert_split)?;
    if options.prefill.chunk == PrefillChunk::Tokens(0) {
        return Err(Error::InvalidInput(
            "the prefill chunk must allow at least one token (PrefillChunk::Tokens(0))".into(),
        ));
    }
    let generation_defaults = generation_defaults(&model)?;
    let (mut group, ranks) = start_group(&model, &options)?;
    let options = Options { ranks, ..options };
    let loaded = load(&mut group, &model, &options)?;
    let grammars = Arc::new(Grammars::of_model(&model.location, model.config.vocab_size));
    Ok(ParallelModel {
        group,
        model,
        loaded,
        generation_defaults,
        options,
        text: None,
        grammars,
    })
}

/// The generation defaults of `model`: transformers' defaults overridden by a checkpoint's
/// `generation_config.json` (what [`ParallelModel::generation_config`] returns once the model is
/// parallelized), read without starting any rank.
pub fn generation_defaults(model: &ResolvedModel) -> Result<GenerationConfig> {
    match &model.location {
        WeightsLocation::Safetensors(dir) => GenerationConfig::from_model_dir(dir),
        WeightsLocation::Gguf(_) => Ok(GenerationConfig::default()),
    }
}

/// Starts the ranks for `model` (the plan checked first); returns them with their number.
fn start_group(model: &ResolvedModel, options: &Options) -> Result<(WorkerGroup, usize)> {
    if options.backend == Backend::Mpi {
        // The number of ranks is mpirun's; an impossible plan drops (and so stops) the group.
        let (group, ranks) = mpi_group(options)?;
        Plan::new(&model.config, ranks)?;
        return Ok((group, ranks));
    }
    Plan::new(&model.config, options.ranks)?;
    let program = match &options.worker_program {
        Some(p) => p.clone(),
        None => this_program()?,
    };
    let spec = LaunchSpec {
        ranks: options.ranks,
        threads_per_rank: options
            .threads_per_rank
            .unwrap_or_else(|| default_threads(options.ranks)),
        program,
        args: options.worker_args.clone(),
        echo_stderr: std::env::var_os("RUST_LOG").is_some(),
        startup_timeout: options.startup_timeout,
        comm_dir: options.comm_dir.clone(),
    };
    Ok((WorkerGroup::spawn(&spec)?, options.ranks))
}

/// This executable, for ranks to re-execute: the path it was started from, or `/proc/self/exe`
/// once that file was replaced or deleted (a new build or an upgrade while a server runs, whose
/// ranks may restart), which still starts this very program.
fn this_program() -> Result<std::path::PathBuf> {
    let path = std::env::current_exe()
        .map_err(|e| Error::Launch(format!("cannot find this executable: {e}")))?;
    let running = std::path::Path::new("/proc/self/exe");
    match path.exists() || !running.exists() {
        true => Ok(path),
        false => Ok(running.to_path_buf()),
    }
}

/// The group of the MPI job this process belongs to, and its number of ranks. On ranks other
/// than 0 it serves rank 0 and exits the process.
#[cfg(feature = "mpi")]
fn mpi_group(options: &Options) -> Result<(WorkerGroup, usize)> {
    let job = crate::parallel::mpi::MpiJob::join()?;
    let ranks = job.size();
    if job.rank() != 0 {
        let code = match job.serve() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("parallelformers rank: {e}");
                1
            }
        };
        std::process::exit(code);
    }
    let (mut group, finalizer) = job.front(options.startup_timeout)?;
    group.keep_until_stopped(Box::new(finalizer));
    Ok((group, ranks))
}

/// Without the `mpi` feature: says how to get it.
#[cfg(not(feature = "mpi"))]
fn mpi_group(_options: &Options) -> Result<(WorkerGroup, usize)> {
    Err(Error::InvalidInput(
        "--backend mpi needs a build with MPI: cargo build --release --features mpi (with Open MPI: libopenmpi-dev, openmpi-bin, libclang-dev)".into(),
    ))
}

/// Loads `model` on the ranks of `group` (whose plan was checked), telling
/// `options.progress` how far each rank has got; returns each rank's memory.
fn load(
    group: &mut WorkerGroup,
    model: &ResolvedModel,
    options: &Options,
) -> Result<Vec<RankMemory>> {
    let load = Request::Load(LoadSpec {
        location: model.location.clone(),
        config: model.config.clone(),
        dtype: options.dtype,
        policy: model.policy.clone(),
        prefill: options.prefill,
    });
    let sink = options.progress.as_ref();
    let mut on_partial = |reply: &Reply| -> Option<Request> {
        if let &Reply::Loading { rank, done, total } = reply {
            progress::report(sink, &Progress::Loading { rank, done, total });
        }
        None
    };
    let loaded = group
        .request_streaming(&load, Some(options.load_timeout), &mut on_partial)?
        .into_iter()
        .map(|reply| match reply {
            Reply::Parallelized(memory) => Ok(memory),
            other => Err(Error::Launch(format!(
                "unexpected answer to the load request: {other:?}"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    progress::report(sink, &Progress::Loaded);
    print_memory(options.verbose, &loaded);
    Ok(loaded)
}

/// Prints the per-rank memory summary the seed printed with `verbose`.
pub fn print_memory(verbose: Verbosity, memory: &[RankMemory]) {
    for m in memory {
        match verbose {
            Verbosity::None => {}
            Verbosity::Simple => eprintln!("{}", m.simple_line()),
            Verbosity::Detail => eprintln!("{}", m.detail_lines()),
        }
    }
}

impl ParallelModel {
    /// The resolved model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    /// The model and where its weights are.
    pub fn model(&self) -> &ResolvedModel {
        &self.model
    }

    /// Each rank's memory right after parallelization.
    pub fn load_report(&self) -> &[RankMemory] {
        &self.loaded
    }

    /// Process ids of the ranks.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.group.pids()
    }

    /// Checks that every rank still runs; a rank that died makes the model unusable and is
    /// named in the error (with its last words).
    pub fn check_alive(&mut self) -> Result<()> {
        self.group.check_health()
    }

    /// The model's tokenizer, loaded once; an error when the model has none.
    fn text_side(&mut self) -> Result<Arc<TextSide>> {
        if let Some(text) = &self.text {
            return Ok(text.clone());
        }
        let text = Arc::new(TextSide::load(&self.model)?.ok_or_else(|| {
            Error::InvalidInput(format!(
                "stop strings need the model's tokenizer, and {} has none",
                self.model.location.path().display()
            ))
        })?);
        self.text = Some(text.clone());
        Ok(text)
    }

    /// Stops the ranks (if they still run) and starts new ones with the same model and
    /// options, which load their shards again: how a caller recovers from a rank that died.
    /// Ranks started by `mpirun` cannot be started again from here.
    pub fn restart(&mut self) -> Result<()> {
        if self.options.backend == Backend::Mpi {
            return Err(Error::InvalidInput(
                "ranks started by mpirun cannot be restarted; start the job again".into(),
            ));
        }
        self.group.shutdown();
        let (mut group, _) = start_group(&self.model, &self.options)?;
        self.loaded = load(&mut group, &self.model, &self.options)?;
        self.group = group;
        Ok(())
    }

    /// Why the model is unusable, if a rank failed.
    pub fn failure(&self) -> Option<&str> {
        self.group.failure()
    }

    /// What generation requests are checked against, and their defaults.
    fn rules(&self) -> RequestRules {
        RequestRules::new(&self.model, self.options.seed)
    }

    /// Runs a forward pass: logits `[B, L, V]` for LM heads, else the last hidden state `[B, L, H]`.
    pub fn forward(&mut self, input: &ForwardInput) -> Result<WireTensor> {
        check_forward(&self.model, input)?;
        let request = Request::Forward(input.clone());
        match self.group.request(&request, None)?.into_iter().next() {
            Some(Reply::Forward(tensor)) => Ok(tensor),
            other => Err(Error::Launch(format!(
                "unexpected answer to a forward request: {other:?}"
            ))),
        }
    }

    /// The model's generation defaults: transformers' defaults overridden by the checkpoint's
    /// `generation_config.json`. Start from these and change what a request needs.
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation_defaults
    }

    /// Generates after `prompt` as `config` says (greedy or sampling).
    pub fn generate(&mut self, prompt: &[u32], config: &GenerationConfig) -> Result<Generated> {
        self.generate_stream(prompt, config, |_| ControlFlow::Continue(()))
    }

    /// Like [`ParallelModel::generate`], calling `on_token` with each token of the first
    /// sequence as soon as rank 0 has chosen it; returning [`ControlFlow::Break`] cancels the
    /// generation (the ranks stop at their next step and the tokens so far are returned).
    pub fn generate_stream(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Generated> {
        let batch = self.generate_batch(&[prompt.to_vec()], config, |row, token| match row {
            0 => on_token(token),
            _ => ControlFlow::Continue(()),
        })?;
        Ok(Generated {
            ids: batch.sequences.first().cloned().unwrap_or_default(),
            sequences: batch.sequences,
            logprobs: batch.logprobs,
            prefill_seconds: batch.prefill_seconds,
            decode_seconds: batch.decode_seconds,
            overhead_seconds: batch.overhead_seconds,
            cached_prompt_tokens: batch.cached_prompt_tokens,
        })
    }

    /// Generates for several prompts of any lengths in one batch (padded on the left, each
    /// stopping on its own); results are in prompt order, `num_return_sequences` per prompt.
    /// `on_token(row, token)` sees each token of each row as soon as it is chosen; returning
    /// [`ControlFlow::Break`] finishes that row (the others go on). With `logprobs`, the result
    /// holds every returned token's log-probabilities.
    pub fn generate_batch(
        &mut self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
        mut on_token: impl FnMut(usize, u32) -> ControlFlow<()>,
    ) -> Result<GeneratedBatch> {
        let (eos, seed) = self.rules().check_batch(prompts, config)?;
        if let Some(constraint) = &config.constraint {
            self.grammars.check(constraint)?;
        }
        let rows = prompts.len() * config.num_return_sequences;
        let mut stops = match config.stop.is_empty() {
            true => None,
            false => {
                let text = self.text_side()?;
                Some(
                    (0..rows)
                        .map(|_| StopWatch::new(text.clone(), &config.stop))
                        .collect::<Vec<_>>(),
                )
            }
        };
        let request = Request::Generate(GenerateRequest {
            prompts: prompts.to_vec(),
            config: config.clone(),
            pad_token_id: config.pad_token_id.or(eos.first().copied()).unwrap_or(0),
            eos_token_ids: eos,
            seed,
            decoder_start_token_id: self
                .model
                .config
                .seq2seq
                .as_ref()
                .map(|s| s.decoder_start_token_id),
        });
        // Where the main process ended a row itself (cancelled, stop string): tokens the
        // ranks chose after that are dropped.
        let mut ended: Vec<Option<usize>> = vec![None; rows];
        let mut seen = vec![0usize; rows];
        let mut decode_error = None;
        let mut on_partial = |reply: &Reply| -> Option<Request> {
            let &Reply::Token { row, token } = reply else {
                return None;
            };
            let row = row as usize;
            if ended.get(row).is_none_or(Option::is_some) {
                return None;
            }
            seen[row] += 1;
            if on_token(row, token).is_break() {
                ended[row] = Some(seen[row]);
                return Some(Request::Finish(vec![row as u32]));
            }
            match stops.as_mut().map(|s| s[row].push(token)) {
                Some(Ok(true)) => {
                    ended[row] = Some(seen[row]);
                    Some(Request::Finish(vec![row as u32]))
                }
                Some(Err(e)) => {
                    decode_error.get_or_insert(e);
                    None
                }
                _ => None,
            }
        };
        let replies = self
            .group
            .request_streaming(&request, None, &mut on_partial)?;
        if let Some(e) = decode_error {
            return Err(e);
        }
        let mut batches = replies
            .into_iter()
            .map(|reply| match reply {
                Reply::Generated(batch) => Ok(batch),
                other => Err(Error::Launch(format!(
                    "unexpected answer to a generate request: {other:?}"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut first = batches.remove(0);
        // Timings differ between ranks; only rank 0 measures the choice of tokens.
        if let Some(rank) = batches.iter().position(|b| b.sequences != first.sequences) {
            return Err(Error::Launch(format!(
                "rank {} generated other tokens than rank 0",
                rank + 1
            )));
        }
        for (row, end) in ended.iter().enumerate() {
            if let Some(end) = *end {
                first.sequences[row].truncate(end);
                if let Some(scores) = first.logprobs.as_mut().and_then(|l| l.get_mut(row)) {
                    scores.truncate(end);
                }
            }
        }
        Ok(first)
    }

    /// Each rank's memory now.
    pub fn memory_report(&mut self) -> Result<Vec<RankMemory>> {
        self.group
            .request(&Request::Memory, Some(Duration::from_secs(30)))?
            .into_iter()
            .map(|reply| match reply {
                Reply::Memory(m) => Ok(m),
                other => Err(Error::Launch(format!(
                    "unexpected answer to a memory request: {other:?}"
                ))),
            })
            .collect()
    }

    /// Stops every rank and frees every resource (also done on drop).
    pub fn deparallelize(mut self) {
        self.group.shutdown();
    }
}
