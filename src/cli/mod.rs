//! Command-line arguments and the subcommands they select.

mod bench;
mod forward;
mod generate;
mod inspect;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use parallelformers::{Backend, Options, Verbosity, WeightDType};

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
    /// Generate text (greedy) after a prompt or a list of token ids.
    Generate(generate::GenerateArgs),
    /// Print the slicing plan and the memory each rank will hold, without loading weights.
    Inspect(inspect::InspectArgs),
    /// Measure prefill latency, decode speed and peak memory per rank.
    Bench(bench::BenchArgs),
}

/// Arguments shared by every command that loads a model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Checkpoint directory (config.json + safetensors + optional tokenizer.json).
    #[arg(long, env = "PARALLELFORMERS_MODEL")]
    pub model: PathBuf,
    /// Number of ranks (worker processes) to split the model over.
    #[arg(long, default_value_t = 1, env = "PARALLELFORMERS_RANKS")]
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
    #[arg(long, env = "PARALLELFORMERS_THREADS")]
    pub threads: Option<usize>,
    /// Seed for sampling.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl ModelArgs {
    /// The library options these arguments describe.
    pub fn options(&self) -> Options {
        Options {
            ranks: self.ranks,
            dtype: self.dtype,
            verbose: self.verbose,
            backend: self.backend,
            seed: self.seed,
            threads_per_rank: self.threads,
            ..Options::default()
        }
    }
}

/// Runs the selected subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Forward(args) => forward::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
