//! The options of [`parallelize`](crate::parallelize), mirroring the seed's arguments
//! (`num_gpus`, `fp16`, `verbose`, `backend`, `seed`) plus the process-level knobs.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::progress::ProgressSink;

/// The dtype weights are stored in and activations computed in (norms, attention and
/// reductions always run in f32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum WeightDType {
    /// 32-bit floats: the reference precision.
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// GGUF weights keep their quantized blocks in memory (Q4_0, Q4_1, Q8_0, K-quants …),
    /// dequantized inside the kernels; everything else, and other checkpoints, in f32.
    Quantized,
}

impl WeightDType {
    /// Bytes of one weight in this dtype.
    pub fn size_in_bytes(self) -> usize {
        candle_core::DType::from(self).size_in_bytes()
    }
}

impl From<WeightDType> for candle_core::DType {
    fn from(d: WeightDType) -> Self {
        match d {
            WeightDType::F32 => candle_core::DType::F32,
            WeightDType::F16 => candle_core::DType::F16,
            WeightDType::Bf16 => candle_core::DType::BF16,
            WeightDType::Quantized => candle_core::DType::F32,
        }
    }
}

/// How much to print about each rank after parallelization (the seed's `verbose`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Verbosity {
    /// Nothing.
    #[default]
    None,
    /// One line per rank.
    Simple,
    /// A breakdown per rank.
    Detail,
}

/// How ranks communicate (the seed's `backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Shared memory between processes on one host.
    #[default]
    Shm,
    /// MPI: every rank of the `mpirun` job this process belongs to is one rank (MPI rank 0
    /// runs the caller; on the others, `parallelize` serves it and exits the process). Needs
    /// a build with the cargo feature `mpi`.
    Mpi,
}

/// How the experts of a mixture-of-experts model are divided among the ranks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ExpertSplit {
    /// Tensor-parallel experts: every expert's projections are split like a dense MLP's, so
    /// each rank holds a slice of every expert and one all-reduce per layer combines them.
    #[default]
    Tensor,
    /// Expert parallelism: each rank holds whole experts (as evenly as their number allows),
    /// runs the tokens routed to them, and the ranks' results are combined; attention stays
    /// tensor-parallel.
    Expert,
}

/// Most prompt tokens a paced session prefills with one decode step: also what it prefills at
/// a time while no sequence is running, as [`generate`](crate::generation::generate) does.
pub const MOST_PACED_PREFILL_TOKENS: usize = crate::generation::PREFILL_CHUNK;

/// Fewest prompt tokens a paced session prefills with one decode step, however slow.
pub const FEWEST_PACED_PREFILL_TOKENS: usize = 8;

/// How much longer than a decode step alone a paced step that also prefills may take, as a
/// share of the decode step: the running sequences' tokens then come about 1.5 times as far
/// apart while a prompt joins, leaving room under 3 times for the slowest steps.
pub const PACED_PREFILL_SHARE: f64 = 0.5;

/// How many prompt tokens a continuous-batching session prefills with each decode step, so
/// that the running sequences keep streaming while a long prompt joins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrefillChunk {
    /// As many as add about [`PACED_PREFILL_SHARE`] of a decode step of the running batch
    /// to the step they share a pass with, as rank 0 measures them (between
    /// [`FEWEST_PACED_PREFILL_TOKENS`] and [`MOST_PACED_PREFILL_TOKENS`]; the most while no
    /// sequence is running). The running sequences' steps then take about 1.5 times as long
    /// while a prompt joins, whatever the model, the machine and the batch.
    #[default]
    Paced,
    /// This many (at least 1), padding included.
    Tokens(usize),
}

impl std::str::FromStr for PrefillChunk {
    type Err = String;

    /// `auto` ([`PrefillChunk::Paced`]) or a number of tokens, at least 1.
    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        if text == "auto" {
            return Ok(PrefillChunk::Paced);
        }
        match text.parse::<usize>() {
            Ok(0) => Err("the prefill chunk must allow at least one token".into()),
            Ok(tokens) => Ok(PrefillChunk::Tokens(tokens)),
            Err(_) => Err(format!(
                "expected `auto` or a number of tokens, got `{text}`"
            )),
        }
    }
}

/// The prefix cache's size on each rank unless told otherwise, in MiB.
pub const DEFAULT_PREFIX_CACHE_MIB: u64 = 512;

/// How the ranks prefill prompts, fixed for the life of the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefillOptions {
    /// How many prompt tokens a continuous-batching session prefills with each decode step.
    pub chunk: PrefillChunk,
    /// Bytes of the prefix cache on each rank (0: no prefix cache): keys and values of earlier
    /// prompts and replies, by blocks of tokens, for later prompts that start with the same
    /// tokens (continuous-batching sessions, and single-prompt generation such as `chat`).
    pub prefix_cache_bytes: u64,
}

impl Default for PrefillOptions {
    fn default() -> Self {
        PrefillOptions {
            chunk: PrefillChunk::Paced,
            prefix_cache_bytes: DEFAULT_PREFIX_CACHE_MIB << 20,
        }
    }
}

/// Options of [`parallelize`](crate::parallelize).
#[derive(Debug, Clone)]
pub struct Options {
    /// Number of ranks (worker processes).
    pub ranks: usize,
    /// Weight dtype.
    pub dtype: WeightDType,
    /// Memory summary after parallelization, printed to standard error.
    pub verbose: Verbosity,
    /// Communication backend.
    pub backend: Backend,
    /// Seed for sampling; `None` draws one.
    pub seed: Option<u64>,
    /// Compute threads per rank; `None` = available cores ÷ ranks.
    pub threads_per_rank: Option<usize>,
    /// The program started for each rank; `None` = this executable. It must call
    /// [`run_worker_if_requested`](crate::run_worker_if_requested) at the top of `main`.
    pub worker_program: Option<PathBuf>,
    /// Arguments of the worker program (an interpreter's, for one: the Python package starts
    /// its ranks as `python -m parallelformers._worker`).
    pub worker_args: Vec<String>,
    /// Longest wait for the ranks to connect.
    pub startup_timeout: Duration,
    /// Longest wait for the ranks to load their shards.
    pub load_timeout: Duration,
    /// Back the ranks' shared memory with an unnamed file in this directory instead of
    /// anonymous memory (for hosts where that is scarce); `None` = anonymous memory.
    pub comm_dir: Option<PathBuf>,
    /// A policy file describing the model (a `model_type` that reuses a known block wiring;
    /// see [`PolicyFile`](crate::policy::file::PolicyFile)). Used by
    /// [`parallelize`](crate::parallelize); a model resolved beforehand carries its own.
    pub policy: Option<PathBuf>,
    /// How a mixture of experts is divided among the ranks; `None`: as the policy file says,
    /// else tensor-parallel experts.
    pub expert_split: Option<ExpertSplit>,
    /// Where to tell how fetching the model (in [`parallelize`](crate::parallelize)) and
    /// loading it on the ranks go; `None`: the library reports and prints nothing.
    pub progress: Option<ProgressSink>,
    /// Chunked prefill and the prefix cache.
    pub prefill: PrefillOptions,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ranks: 1,
            dtype: WeightDType::F32,
            verbose: Verbosity::None,
            backend: Backend::Shm,
            seed: None,
            threads_per_rank: None,
            worker_program: None,
            worker_args: Vec::new(),
            startup_timeout: Duration::from_secs(30),
            load_timeout: Duration::from_secs(600),
            comm_dir: None,
            policy: None,
            expert_split: None,
            progress: None,
            prefill: PrefillOptions::default(),
        }
    }
}
