//! `inspect` forecasts the weights each rank reports once loaded (`--verbose`, `load_report`),
//! for safetensors and GGUF checkpoints in every dtype (issue 17, point 3: `--dtype quantized`
//! forecast f32 sizes, 265 MiB a rank where the ranks held 47 MiB).

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, options, run};
use parallelformers::checkpoint::source::ResolvedModel;
use parallelformers::parallel::engine::WeightBytes;
use parallelformers::parallel::forecast::Forecast;
use parallelformers::parallel::memory::weights_summary;
use parallelformers::{parallelize, ExpertSplit, ModelSource, WeightDType};

/// A forecast may be this far (relative) from what a rank reports.
const TOLERANCE: f64 = 0.03;

/// Each rank's weights as `model` split over `ranks` in `dtype` (its experts as `split` says)
/// reports them once loaded.
fn loaded(
    model: &Path,
    ranks: usize,
    dtype: WeightDType,
    split: Option<ExpertSplit>,
) -> Vec<WeightBytes> {
    let mut opts = options(ranks);
    opts.dtype = dtype;
    opts.expert_split = split;
    let model = parallelize(model, opts)
        .unwrap_or_else(|e| panic!("{} at {ranks} ranks: {e}", model.display()));
    let weights = model.load_report().iter().map(|m| m.weights).collect();
    model.deparallelize();
    weights
}

/// Each rank's weights as `inspect` forecasts them.
fn forecast(
    model: &Path,
    ranks: usize,
    dtype: WeightDType,
    split: Option<ExpertSplit>,
) -> Vec<WeightBytes> {
    let resolved = ResolvedModel::resolve(&ModelSource::from(model))
        .and_then(|m| m.with_expert_split(split))
        .unwrap();
    Forecast::of(&resolved, ranks, dtype).unwrap().ranks
}

/// How far `forecast` is from what a rank reported, `loaded`: the largest difference of the
/// total, the sliced and the replicated bytes, relative to the total the rank reported. (A
/// StableLM rank loads only its own heads' q/k LayerNorms, which the policy replicates: the
/// forecast counts every head's, a few hundred bytes too many of the replicated part.)
fn deviation(forecast: &WeightBytes, loaded: &WeightBytes) -> f64 {
    let worst = [
        forecast.total().abs_diff(loaded.total()),
        forecast.sliced.abs_diff(loaded.sliced),
        forecast.replicated.abs_diff(loaded.replicated),
        forecast.experts.abs_diff(loaded.experts),
        forecast.routed.abs_diff(loaded.routed),
    ]
    .into_iter()
    .max()
    .unwrap_or_default();
    worst as f64 / loaded.total().max(1) as f64
}

/// Checks the forecast of `model` in each of `dtypes` at each of `rank_counts` against what the
/// ranks report, rank by rank, within [`TOLERANCE`].
fn check(model: &Path, dtypes: &[WeightDType], rank_counts: &[usize]) {
    check_split(model, dtypes, rank_counts, None);
}

/// [`check`] with a mixture of experts divided as `split` says.
fn check_split(
    model: &Path,
    dtypes: &[WeightDType],
    rank_counts: &[usize],
    split: Option<ExpertSplit>,
) {
    for &dtype in dtypes {
        for &ranks in rank_counts {
            let forecast = forecast(model, ranks, dtype, split);
            let loaded = loaded(model, ranks, dtype, split);
            assert_eq!(forecast.len(), loaded.len());
            for (rank, (f, l)) in forecast.iter().zip(&loaded).enumerate() {
                let case = format!(
                    "{} {dtype:?} rank {rank} of {ranks}",
                    model.file_name().unwrap_or_default().to_string_lossy()
                );
                let deviation = deviation(f, l);
                eprintln!(
                    "{case}: forecast {} / loaded {} bytes, deviation {:.3} %",
                    f.total(),
                    l.total(),
                    deviation * 100.0
                );
                assert!(
                    deviation <= TOLERANCE,
                    "{case}: forecast {f:?}, loaded {l:?}"
                );
            }
        }
    }
}

const FLOATS: [WeightDType; 3] = [WeightDType::F32, WeightDType::F16, WeightDType::Bf16];

const EVERY_DTYPE: [WeightDType; 4] = [
    WeightDType::F32,
    WeightDType::F16,
    WeightDType::Bf16,
    WeightDType::Quantized,
];

fn gguf_family(arch: &str) -> PathBuf {
    fixture("gguf/families").join(format!("{arch}.gguf"))
}

/// Every checkpoint directory among the fixtures.
fn safetensors_fixtures() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixture(""))
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .filter(|dir| dir.join("config.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn every_safetensors_fixture_is_forecast_as_its_ranks_load_it_in_every_float_dtype() {
    // Sharded, tied and untied, fused and transposed, encoders, encoder-decoders, ALBERT's
    // shared layer, StableLM's per-head norms: every family's wiring.
    for dir in safetensors_fixtures() {
        check(&dir, &FLOATS, &[1, 2]);
    }
}

/// Expert parallelism: whole experts on their owners only, uneven over 3 and 4 ranks.
#[test]
fn whole_experts_are_forecast_as_their_owners_load_them() {
    for name in ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"] {
        check_split(&fixture(name), &FLOATS, &[3, 4], Some(ExpertSplit::Expert));
    }
}

#[test]
fn quantized_safetensors_are_forecast_in_f32_as_they_load() {
    check(&fixture("llama"), &[WeightDType::Quantized], &[2]);
}

#[test]
fn gguf_forecasts_count_quantized_blocks_as_the_ranks_hold_them() {
    check(&fixture("gguf/tiny_llama_q8_0.gguf"), &EVERY_DTYPE, &[2]);
    // Fused q/k/v and gate/up (kept quantized only where whole), `1 + w` norms, the q/k rotary
    // permutation, LayerNorm biases, q/k norms over the whole projection, experts stacked in
    // 3-D tensors.
    for arch in [
        "llama",
        "phi3",
        "gemma2",
        "gemma3",
        "granite",
        "olmo2",
        "qwen3",
        "starcoder2",
        "mixtral",
        "qwen3moe",
    ] {
        check(&gguf_family(arch), &EVERY_DTYPE, &[2]);
    }
}

/// The regression of issue 17: `inspect --dtype quantized` printed each rank's weights in f32.
#[test]
fn inspect_prints_what_a_quantized_rank_reports() {
    let model = gguf_family("llama");
    let out = run(&[
        "inspect",
        "--model",
        model.to_str().unwrap(),
        "--ranks",
        "2",
        "--dtype",
        "quantized",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (rank, weights) in loaded(&model, 2, WeightDType::Quantized, None)
        .iter()
        .enumerate()
    {
        let line = format!("rank {rank}: {}", weights_summary(weights));
        assert!(
            text.lines().any(|l| l == line),
            "`{line}` missing in:\n{text}"
        );
    }
}
