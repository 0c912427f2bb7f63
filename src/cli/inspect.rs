//! `parallelformers inspect`: the slicing plan and per-rank weight memory, from the headers only.

use std::io::Write;

use clap::Args;
use parallelformers::parallel::engine::plan_slice;
use parallelformers::parallel::memory::human;
use parallelformers::parallel::Plan;
use parallelformers::policy::Policy;
use parallelformers::WeightDType;

/// Arguments of `inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The model: checkpoint directory, .gguf file or Hub id (default: the default model).
    #[arg(long, env = "PARALLELFORMERS_MODEL")]
    model: Option<String>,
    /// Number of ranks to plan for.
    #[arg(long, env = "PARALLELFORMERS_RANKS", default_value_t = super::DEFAULT_RANKS)]
    ranks: usize,
    /// A policy file for a model_type that reuses a known block wiring.
    #[arg(long, env = "PARALLELFORMERS_POLICY")]
    policy: Option<std::path::PathBuf>,
    /// Weight dtype the ranks would hold.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: WeightDType,
}

/// Runs `inspect`.
pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let model = super::resolve_model(args.model.as_deref(), args.policy.as_deref())?;
    let config = &model.config;
    let weights = model.location.open(config)?;
    let plan = Plan::new(config, args.ranks)?;
    let policy = model
        .policy
        .clone()
        .unwrap_or_else(|| Policy::for_config(config));
    let element = candle_core::DType::from(args.dtype).size_in_bytes() as u64;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} ({}), {} layers, {} ranks, policy `{}`, dtype {:?}",
        config.architecture,
        config.model_type,
        config.num_layers,
        args.ranks,
        policy.name,
        args.dtype
    )?;
    writeln!(
        out,
        "split: heads {:?}, kv heads {:?}, intermediate {:?}, vocab {:?}",
        plan.heads.counts(),
        plan.kv_heads.counts(),
        plan.intermediate.element_counts(),
        plan.vocab.counts()
    )?;
    for line in config.wiring_summary() {
        writeln!(out, "{line}")?;
    }
    writeln!(out)?;
    let mut sliced = vec![0u64; args.ranks];
    let mut replicated = vec![0u64; args.ranks];
    let mut unused = Vec::new();
    for name in weights.names() {
        let (Some(role), Some(shape)) = (policy.role_of(&name), weights.shape(&name)) else {
            unused.push(name);
            continue;
        };
        let mut shapes = Vec::with_capacity(args.ranks);
        for rank in 0..args.ranks {
            let slice = plan_slice(&name, role, &shape, &plan, rank)?;
            let bytes = slice.shape.iter().product::<usize>() as u64 * element;
            if role.is_sliced() {
                sliced[rank] += bytes;
            } else {
                replicated[rank] += bytes;
            }
            shapes.push(format!("{:?}", slice.shape));
        }
        writeln!(
            out,
            "{name:<52} {:<14} {:<32} {}",
            format!("{shape:?}"),
            role.to_string(),
            shapes.join(" ")
        )?;
    }
    writeln!(out)?;
    for rank in 0..args.ranks {
        writeln!(
            out,
            "rank {rank}: weights {} (sliced {}, replicated {})",
            human(sliced[rank] + replicated[rank]),
            human(sliced[rank]),
            human(replicated[rank])
        )?;
    }
    if !unused.is_empty() {
        writeln!(out, "not loaded: {}", unused.join(", "))?;
    }
    Ok(())
}
