//! The library's front door: [`parallelize`] a checkpoint over worker processes and use the
//! returned [`ParallelModel`] for forward passes and generation. The main process holds no
//! weights: it validates inputs, talks to the ranks, and supervises them.

use std::time::Duration;

use crate::checkpoint::source::{ModelSource, ResolvedModel};
use crate::checkpoint::ModelConfig;
use crate::error::{Error, Result};
use crate::options::{Options, Verbosity};
use crate::parallel::ipc::{
    ForwardInput, GenerateRequest, Generated, LoadSpec, Reply, Request, WireTensor,
};
use crate::parallel::launcher::{default_threads, LaunchSpec, WorkerGroup};
use crate::parallel::memory::RankMemory;
use crate::parallel::Plan;

/// Greedy-generation parameters (transformers' names and defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateParams {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// Suppress end-of-sequence until this many new tokens exist.
    pub min_new_tokens: usize,
    /// End-of-sequence ids; `None` = the model's (`config.json` / `generation_config.json`).
    pub eos_token_ids: Option<Vec<u32>>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_new_tokens: 20,
            min_new_tokens: 0,
            eos_token_ids: None,
        }
    }
}

/// A model split over worker processes.
pub struct ParallelModel {
    group: WorkerGroup,
    model: ResolvedModel,
    loaded: Vec<RankMemory>,
}

/// Splits the model `source` names (a checkpoint directory, a `.gguf` file, a Hub id, or
/// [`ModelSource::Default`]) over `options.ranks` worker processes.
///
/// Configuration, weight headers and the split are validated here, before any process starts.
/// Each rank then loads only its own slices. With `verbose` set, each rank's memory is printed
/// to standard error.
pub fn parallelize(source: impl Into<ModelSource>, options: Options) -> Result<ParallelModel> {
    parallelize_resolved(ResolvedModel::resolve(&source.into())?, options)
}

/// [`parallelize`] for a model already resolved (for callers that also need its tokenizer).
pub fn parallelize_resolved(model: ResolvedModel, options: Options) -> Result<ParallelModel> {
    Plan::new(&model.config, options.ranks)?;
    let program = match &options.worker_program {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| Error::Launch(format!("cannot find this executable: {e}")))?,
    };
    let spec = LaunchSpec {
        ranks: options.ranks,
        threads_per_rank: options
            .threads_per_rank
            .unwrap_or_else(|| default_threads(options.ranks)),
        program,
        echo_stderr: std::env::var_os("RUST_LOG").is_some(),
        startup_timeout: options.startup_timeout,
    };
    let mut group = WorkerGroup::spawn(&spec)?;
    let load = Request::Load(LoadSpec {
        location: model.location.clone(),
        config: model.config.clone(),
        dtype: options.dtype,
        seed: options.seed.unwrap_or_else(rand::random),
    });
    let loaded = group
        .request(&load, Some(options.load_timeout))?
        .into_iter()
        .map(|reply| match reply {
            Reply::Parallelized(memory) => Ok(memory),
            other => Err(Error::Launch(format!(
                "unexpected answer to the load request: {other:?}"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    print_memory(options.verbose, &loaded);
    Ok(ParallelModel {
        group,
        model,
        loaded,
    })
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

    /// Why the model is unusable, if a rank failed.
    pub fn failure(&self) -> Option<&str> {
        self.group.failure()
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids
            .iter()
            .find(|&&id| id as usize >= self.model.config.vocab_size)
        {
            Some(id) => Err(Error::InvalidInput(format!(
                "token id {id} is outside the vocabulary of {} tokens",
                self.model.config.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// Runs a forward pass: logits `[B, L, V]` for LM heads, else the last hidden state `[B, L, H]`.
    pub fn forward(&mut self, input: &ForwardInput) -> Result<WireTensor> {
        if input.batch == 0
            || input.seq_len == 0
            || input.input_ids.len() != input.batch * input.seq_len
        {
            return Err(Error::InvalidInput(format!(
                "input_ids holds {} ids, which is not a non-empty batch {} × length {}",
                input.input_ids.len(),
                input.batch,
                input.seq_len
            )));
        }
        if let Some(mask) = &input.attention_mask {
            if mask.len() != input.input_ids.len() {
                return Err(Error::InvalidInput(format!(
                    "attention_mask holds {} values but input_ids holds {}",
                    mask.len(),
                    input.input_ids.len()
                )));
            }
            if let Some(v) = mask.iter().find(|&&v| v > 1) {
                return Err(Error::InvalidInput(format!(
                    "attention_mask value {v} is not 0 or 1"
                )));
            }
        }
        self.check_ids(&input.input_ids)?;
        let request = Request::Forward(input.clone());
        match self.group.request(&request, None)?.into_iter().next() {
            Some(Reply::Forward(tensor)) => Ok(tensor),
            other => Err(Error::Launch(format!(
                "unexpected answer to a forward request: {other:?}"
            ))),
        }
    }

    /// Generates greedily after `prompt`, returning the new tokens and rank 0's timings.
    pub fn generate(&mut self, prompt: &[u32], params: &GenerateParams) -> Result<Generated> {
        self.generate_stream(prompt, params, |_| {})
    }

    /// Like [`ParallelModel::generate`], calling `on_token` with each token as soon as rank 0
    /// has chosen it.
    pub fn generate_stream(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_token: impl FnMut(u32),
    ) -> Result<Generated> {
        if !self.model.config.is_causal() {
            return Err(Error::InvalidInput(format!(
                "{} is an encoder and cannot generate text",
                self.model.config.architecture
            )));
        }
        if prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        self.check_ids(prompt)?;
        let request = Request::Generate(GenerateRequest {
            input_ids: prompt.to_vec(),
            max_new_tokens: params.max_new_tokens,
            min_new_tokens: params.min_new_tokens,
            eos_token_ids: params
                .eos_token_ids
                .clone()
                .unwrap_or_else(|| self.model.eos_token_ids.clone()),
        });
        let mut on_partial = |reply: &Reply| {
            if let Reply::Token(token) = reply {
                on_token(*token);
            }
        };
        match self
            .group
            .request_streaming(&request, None, &mut on_partial)?
            .into_iter()
            .next()
        {
            Some(Reply::Generated(generated)) => Ok(generated),
            other => Err(Error::Launch(format!(
                "unexpected answer to a generate request: {other:?}"
            ))),
        }
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
