//! `parallelformers inspect`: the slicing plan and the weight memory each rank will report once
//! loaded (`--verbose`), from the headers only.

use std::io::Write;

use clap::Args;
use parallelformers::parallel::forecast::Forecast;
use parallelformers::parallel::memory::{weights_summary, ExpertsHeld};
use parallelformers::{ExpertSplit, WeightDType};

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
    /// Weight dtype the ranks would hold (`quantized`: a GGUF file's quantized blocks).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: WeightDType,
    /// How a mixture of experts would be divided: `tensor` (a slice of every expert on each
    /// rank) or `expert` (whole experts on each rank). Default: the policy file's, else
    /// `tensor`.
    #[arg(long, value_enum, env = "PARALLELFORMERS_EXPERT_SPLIT")]
    expert_split: Option<ExpertSplit>,
}

/// Runs `inspect`.
pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let model = super::resolve_model(args.model.as_deref(), args.policy.as_deref())?
        .with_expert_split(args.expert_split)?;
    let config = &model.config;
    let forecast = Forecast::of(&model, args.ranks, args.dtype)?;
    let (plan, policy) = (&forecast.plan, &forecast.policy);
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
    let whole_experts = policy.expert_split() == ExpertSplit::Expert;
    if let Some(moe) = config.decoder.as_ref().and_then(|d| d.moe.as_ref()) {
        match whole_experts {
            false => writeln!(
                out,
                "split: tensor-parallel experts, every expert's intermediate {:?}",
                plan.expert_intermediate.element_counts()
            )?,
            true => {
                let held: Vec<String> = (0..args.ranks)
                    .map(|rank| ExpertsHeld::of_rank(&plan.experts, rank).to_string())
                    .collect();
                writeln!(out, "split: expert parallelism, whole {}", held.join(" | "))?;
            }
        }
        if moe.shared_expert.is_some() {
            writeln!(
                out,
                "split: the shared expert's intermediate {:?}",
                plan.shared_expert_intermediate.element_counts()
            )?;
        }
    }
    for line in config.wiring_summary() {
        writeln!(out, "{line}")?;
    }
    writeln!(out)?;
    for tensor in &forecast.tensors {
        let shapes: Vec<String> = tensor
            .slices
            .iter()
            .map(|(shape, _)| match shape.as_slice() {
                [0] => "-".to_string(),
                _ => format!("{shape:?}"),
            })
            .collect();
        writeln!(
            out,
            "{:<52} {:<14} {:<32} {}",
            tensor.name,
            format!("{:?}", tensor.shape),
            tensor.role.to_string(),
            shapes.join(" ")
        )?;
    }
    writeln!(out)?;
    for (rank, bytes) in forecast.ranks.iter().enumerate() {
        let held = match whole_experts {
            true => format!(", {}", ExpertsHeld::of_rank(&plan.experts, rank)),
            false => String::new(),
        };
        writeln!(out, "rank {rank}: {}{held}", weights_summary(bytes))?;
    }
    if !forecast.unused.is_empty() {
        writeln!(out, "not loaded: {}", forecast.unused.join(", "))?;
    }
    Ok(())
}
