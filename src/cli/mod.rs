//! Command-line arguments and the subcommands they select.

mod bench;
mod chat;
mod comm_bench;
mod constraint_args;
mod forward;
mod generate;
mod generation_args;
mod inspect;
mod loadtest;
mod printer;
mod progress;
mod serve;

use clap::{Args, Parser, Subcommand};
use parallelformers::checkpoint::source::{ModelSource, ResolvedModel};
use parallelformers::policy::file::PolicyFile;
use parallelformers::{Backend, ExpertSplit, Options, Verbosity, WeightDType};

/// Split a Hugging Face transformer over worker processes (tensor parallelism) and run it.
#[derive(Debug, Parser)]
#[command(name = "parallelformers", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one forward pass over inputs from a safetensors file; write logits or hidden states.
    Forward(forward::ForwardArgs),
    /// Generate text (greedy, sampled or beam search) after a prompt or a list of token ids.
    Generate(generate::GenerateArgs),
    /// Print the slicing plan and the memory each rank will hold, without loading weights.
    Inspect(inspect::InspectArgs),
    /// Measure prefill latency, decode speed and peak memory per rank.
    Bench(bench::BenchArgs),
    /// Chat with the model: one answer to PROMPT, or an interactive conversation.
    Chat(chat::ChatArgs),
    /// Serve the model over HTTP with OpenAI's API (completions, chat, streaming).
    Serve(serve::ServeArgs),
    /// Load-test a running server: concurrent streaming clients for a bounded time.
    Loadtest(loadtest::LoadtestArgs),
    /// Measure all-reduce latency and bandwidth of a communication backend.
    CommBench(comm_bench::CommBenchArgs),
}

/// Ranks of every command that does not name `--ranks`: a tensor-parallel split from the first
/// run, as the README's first command shows it.
pub const DEFAULT_RANKS: usize = 2;

/// Arguments shared by every command that loads a model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// The model: a Hugging Face checkpoint directory, a .gguf file, or a Hub id (org/name).
    /// Default: SmolLM2-135M-Instruct (GGUF Q4_1), fetched once into the user cache.
    #[arg(long, env = "PARALLELFORMERS_MODEL")]
    pub model: Option<String>,
    /// Number of ranks (worker processes) to split the model over.
    #[arg(long, env = "PARALLELFORMERS_RANKS", default_value_t = DEFAULT_RANKS)]
    pub ranks: usize,
    /// Weight dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDType,
    /// Print each rank's memory after parallelization.
    #[arg(long, value_enum, default_value = "none")]
    pub verbose: Verbosity,
    /// Communication backend.
    #[arg(long, value_enum, default_value = "shm")]
    pub backend: Backend,
    /// Compute threads per rank (default: available cores ÷ ranks).
    #[arg(long, env = "PARALLELFORMERS_THREADS", value_parser = at_least_one)]
    pub threads: Option<usize>,
    /// Seed for sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Back the ranks' shared memory with an unnamed file in this directory (when anonymous
    /// shared memory is scarce, e.g. in a container with a small memory limit for it).
    #[arg(long, env = "PARALLELFORMERS_COMM_DIR")]
    pub comm_dir: Option<std::path::PathBuf>,
    /// A policy file for a model_type that reuses a known block wiring (see the README's
    /// "Policy files").
    #[arg(long, env = "PARALLELFORMERS_POLICY")]
    pub policy: Option<std::path::PathBuf>,
    /// How a mixture of experts is divided among the ranks: `tensor` (each rank holds a slice
    /// of every expert) or `expert` (each rank holds whole experts). Default: the policy
    /// file's choice, else `tensor`.
    #[arg(long, value_enum, env = "PARALLELFORMERS_EXPERT_SPLIT")]
    pub expert_split: Option<ExpertSplit>,
}

impl ModelArgs {
    /// The model these arguments name, found and validated.
    pub fn resolve(&self) -> parallelformers::Result<ResolvedModel> {
        resolve_model(self.model.as_deref(), self.policy.as_deref())
    }

    /// The library options these arguments describe.
    pub fn options(&self) -> Options {
        Options {
            ranks: self.ranks,
            dtype: self.dtype,
            verbose: self.verbose,
            backend: self.backend,
            seed: self.seed,
            threads_per_rank: self.threads,
            comm_dir: self.comm_dir.clone(),
            expert_split: self.expert_split,
            progress: progress::terminal(),
            ..Options::default()
        }
    }
}

/// Parses a count that must be at least 1; clap's error names the flag and the value.
pub fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(count) => Ok(count),
        Err(e) => Err(e.to_string()),
    }
}

/// The model a `--model` value (or none: the default model) names, described by the policy file
/// at `policy` when given; downloads show their progress on a terminal.
pub fn resolve_model(
    model: Option<&str>,
    policy: Option<&std::path::Path>,
) -> parallelformers::Result<ResolvedModel> {
    let source = model.map_or(ModelSource::Default, ModelSource::parse);
    let policy = policy.map(PolicyFile::load).transpose()?;
    ResolvedModel::resolve_with_progress(&source, policy.as_ref(), progress::terminal().as_ref())
}

/// Runs the selected subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Forward(args) => forward::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Loadtest(args) => loadtest::run(args),
        Command::CommBench(args) => comm_bench::run(args),
    }
}
