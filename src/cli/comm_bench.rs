//! `parallelformers comm-bench`: all-reduce latency and bandwidth of a backend, from one hidden
//! vector to 16 MiB (the figures in BENCHMARKS.md).

use std::io::Write;

use clap::Args;
use parallelformers::comm::timing::{message_sizes, time_shm_all_reduce, AllReduceTiming};
use parallelformers::Backend;

/// Arguments of `comm-bench`.
#[derive(Debug, Args)]
pub struct CommBenchArgs {
    /// Ranks (shared memory: threads of this process; MPI: mpirun's `-n`).
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// The backend measured (`mpi`: run under mpirun, in a build with the `mpi` feature).
    #[arg(long, value_enum, default_value = "shm")]
    backend: Backend,
    /// Width of the hidden vector, the smallest message (SmolLM2-135M's: 576).
    #[arg(long, default_value_t = 576)]
    hidden: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `comm-bench`.
pub fn run(args: CommBenchArgs) -> anyhow::Result<()> {
    if args.ranks < 2 {
        anyhow::bail!("--ranks must be at least 2, got {}", args.ranks);
    }
    let sizes = message_sizes(args.hidden);
    let (ranks, timings) = match args.backend {
        Backend::Shm => (args.ranks, Some(time_shm_all_reduce(args.ranks, &sizes)?)),
        Backend::Mpi => over_mpi(&sizes)?,
    };
    if let Some(timings) = timings {
        print(&args, ranks, &timings)?;
    }
    Ok(())
}

/// The timings under MPI (rank 0's; `None` on the other ranks, which print nothing).
#[cfg(feature = "mpi")]
fn over_mpi(sizes: &[usize]) -> anyhow::Result<(usize, Option<Vec<AllReduceTiming>>)> {
    use parallelformers::comm::timing::time_all_reduce;
    let job = parallelformers::parallel::mpi::MpiJob::join()?;
    let (rank, ranks) = (job.rank(), job.size());
    if ranks < 2 {
        anyhow::bail!("run it under mpirun with at least 2 ranks (mpirun -n 2 ...)");
    }
    let timings = job.with_collectives(|comm| time_all_reduce(comm, sizes))?;
    Ok((ranks, (rank == 0).then_some(timings)))
}

/// Without the `mpi` feature: says how to get it.
#[cfg(not(feature = "mpi"))]
fn over_mpi(_sizes: &[usize]) -> anyhow::Result<(usize, Option<Vec<AllReduceTiming>>)> {
    anyhow::bail!("--backend mpi needs a build with MPI: cargo build --release --features mpi")
}

/// Prints `timings` measured over `ranks`: a table, or JSON with `--json`.
fn print(args: &CommBenchArgs, ranks: usize, timings: &[AllReduceTiming]) -> anyhow::Result<()> {
    let backend = format!("{:?}", args.backend).to_lowercase();
    let mut out = std::io::stdout().lock();
    if args.json {
        let report = serde_json::json!({"backend": backend, "ranks": ranks, "all_reduce": timings});
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    writeln!(out, "all-reduce (f32 sum), {backend}, {ranks} ranks")?;
    writeln!(
        out,
        "{:>12} {:>10} {:>14} {:>12}",
        "bytes", "iterations", "median µs", "GB/s"
    )?;
    for t in timings {
        writeln!(
            out,
            "{:>12} {:>10} {:>14.1} {:>12.3}",
            t.bytes,
            t.iterations,
            t.median_seconds * 1e6,
            t.bytes_per_second / 1e9
        )?;
    }
    Ok(())
}
