//! Outputs of every fixture, at every rank count the model allows up to 4, against the
//! references transformers wrote (`scripts/make_fixtures.py`).

mod common;

use common::{fixture, masked_max_diff, options, reference, reference_batch, reference_output};
use parallelformers::{parallelize, ExpertSplit, GenerationConfig, Options, WeightDType};

/// f32 outputs must be within this of transformers' (absolute, at unpadded positions).
const F32_TOLERANCE: f64 = 1e-4;

/// Runs the padded reference batch through `name` split as `opts` says and returns the largest
/// difference from the reference; also checks greedy generation when the fixture has it.
fn check_fixture(name: &str, opts: Options) -> f64 {
    let refs = reference(name);
    let (ranks, dtype) = (opts.ranks, opts.dtype);
    let mut model =
        parallelize(fixture(name), opts).unwrap_or_else(|e| panic!("{name} at {ranks} ranks: {e}"));
    let (_, expected, mask) = reference_output(&refs);
    let out = model.forward(&reference_batch(&refs)).unwrap();
    assert_eq!(out.shape, expected.shape, "{name}: output shape");
    let diff = masked_max_diff(&out.data, expected, &mask);
    if let (Some(prompt), WeightDType::F32) = (refs.get("generate_input_ids"), dtype) {
        let stopping = model
            .generate(
                &prompt.ids(),
                &GenerationConfig {
                    max_new_tokens: 12,
                    ..GenerationConfig::default()
                },
            )
            .unwrap();
        assert_eq!(
            stopping.ids,
            refs["generate_output_ids"].ids(),
            "{name} at {ranks} ranks: greedy stopping at eos"
        );
        let forced = model
            .generate(
                &prompt.ids(),
                &GenerationConfig {
                    max_new_tokens: 12,
                    min_new_tokens: 12,
                    eos_token_id: None,
                    ..GenerationConfig::default()
                },
            )
            .unwrap();
        assert_eq!(
            forced.ids,
            refs["generate_min_output_ids"].ids(),
            "{name} at {ranks} ranks: min_new_tokens"
        );
    }
    model.deparallelize();
    diff
}

/// Every rank count the model allows (one query head per rank at least), up to 4: beyond its
/// key/value heads, ranks share them.
fn max_ranks(name: &str) -> usize {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap())
            .unwrap();
    let heads = config["num_attention_heads"]
        .as_u64()
        .or(config["n_head"].as_u64())
        .or(config["n_heads"].as_u64())
        .or(config["num_heads"].as_u64())
        .or(config["encoder_attention_heads"].as_u64())
        .unwrap() as usize;
    heads.min(4)
}

fn check_all_ranks(name: &str) {
    check_all_ranks_with(name, options);
}

/// Checks `name` at every rank count it allows, each with the options `options_for` gives.
fn check_all_ranks_with(name: &str, options_for: fn(usize) -> Options) {
    for ranks in 1..=max_ranks(name) {
        let opts = options_for(ranks);
        let split = opts.expert_split;
        let diff = check_fixture(name, opts);
        assert!(
            diff < F32_TOLERANCE,
            "{name} at {ranks} ranks (experts split: {split:?}) differs from transformers by {diff}"
        );
    }
}

#[test]
fn gpt2_matches_transformers_at_every_rank_count() {
    check_all_ranks("gpt2");
}

/// GPTBigCode: one key/value head (multi-query) that every rank holds.
#[test]
fn gpt_bigcode_with_multi_query_attention_matches_transformers_at_every_rank_count() {
    check_all_ranks("gpt_bigcode");
}

/// OPT: separate q/k/v, positions offset by 2, ReLU.
#[test]
fn opt_matches_transformers_at_every_rank_count() {
    check_all_ranks("opt");
}

/// GPT-Neo: global and local attention layers, unscaled scores.
#[test]
fn gpt_neo_with_local_attention_matches_transformers_at_every_rank_count() {
    check_all_ranks("gpt_neo");
}

/// Phi: attention and MLP in parallel, rotary on half of each head, an LM head with a bias.
#[test]
fn phi_with_partial_rotary_matches_transformers_at_every_rank_count() {
    check_all_ranks("phi");
}

/// GPT-J: parallel block, interleaved rotary on the first dimensions, no attention biases.
#[test]
fn gptj_with_interleaved_partial_rotary_matches_transformers_at_every_rank_count() {
    check_all_ranks("gptj");
}

/// GPT-NeoX: q/k/v fused head by head, rotary on a quarter of each head, parallel residual.
#[test]
fn gpt_neox_with_per_head_fused_qkv_matches_transformers_at_every_rank_count() {
    check_all_ranks("gpt_neox");
}

/// BLOOM: ALiBi (each rank adds its heads' slopes), q/k/v fused head by head.
#[test]
fn bloom_with_alibi_matches_transformers_at_every_rank_count() {
    check_all_ranks("bloom");
}

/// Falcon's new architecture: q/k/v fused by key/value group, parallel attention and MLP.
#[test]
fn falcon_with_grouped_fused_qkv_matches_transformers_at_every_rank_count() {
    check_all_ranks("falcon");
}

/// Falcon-7B's architecture: multi-query attention (one key/value head every rank holds) and a
/// LayerNorm that attention and MLP share.
#[test]
fn falcon_with_multi_query_attention_matches_transformers_at_every_rank_count() {
    check_all_ranks("falcon_mq");
}

/// Falcon without multi-query attention (q/k/v fused head by head) nor parallel attention.
#[test]
fn sequential_falcon_with_per_head_fused_qkv_matches_transformers_at_every_rank_count() {
    check_all_ranks("falcon_sequential");
}

#[test]
fn sharded_llama_checkpoint_matches_transformers_at_every_rank_count() {
    check_all_ranks("llama");
}

#[test]
fn smollm_shaped_llama_with_nine_heads_splits_unevenly_and_matches() {
    check_all_ranks("smollm_like");
}

#[test]
fn mistral_with_sliding_window_matches_transformers_at_every_rank_count() {
    check_all_ranks("mistral");
}

#[test]
fn qwen2_with_qkv_bias_and_tied_head_matches_transformers_at_every_rank_count() {
    check_all_ranks("qwen2");
}

/// Llama 3.2: llama3 rotary scaling (each of its three frequency bands), tied embeddings.
#[test]
fn llama3_with_llama3_rope_scaling_matches_transformers_at_every_rank_count() {
    check_all_ranks("llama3");
}

/// Qwen3: q/k RMSNorm per head, a head width apart from hidden ÷ heads, sliding layers after
/// `max_window_layers`, YaRN scaling.
#[test]
fn qwen3_with_qk_norms_sliding_layers_and_yarn_matches_transformers_at_every_rank_count() {
    check_all_ranks("qwen3");
}

/// Gemma: (1 + w) RMSNorm, scaled embeddings, one key/value head held by every rank.
#[test]
fn gemma_with_offset_norms_and_scaled_embeddings_matches_transformers_at_every_rank_count() {
    check_all_ranks("gemma");
}

/// Gemma 2: sandwich norms, attention and final soft-capping, `query_pre_attn_scalar`,
/// alternating sliding and global layers.
#[test]
fn gemma2_with_soft_capping_and_alternating_windows_matches_transformers_at_every_rank_count() {
    check_all_ranks("gemma2");
}

/// Gemma 3 (text): q/k norms, sliding layers on their own rotary base, linear scaling of the
/// global layers.
#[test]
fn gemma3_with_local_and_global_rotary_matches_transformers_at_every_rank_count() {
    check_all_ranks("gemma3");
}

/// Phi-3 / Phi-4-mini: fused `qkv_proj` and `gate_up_proj` sliced part by part, partial
/// rotary with longrope's long factors.
#[test]
fn phi3_with_fused_projections_and_longrope_matches_transformers_at_every_rank_count() {
    check_all_ranks("phi3");
}

/// SmolLM3: every second layer without rotary positions.
#[test]
fn smollm3_with_nope_layers_matches_transformers_at_every_rank_count() {
    check_all_ranks("smollm3");
}

/// OLMo 2: norms after each sub-block, q/k RMSNorm over the whole projection (statistics
/// gathered from every rank, shared key/value heads counted once).
#[test]
fn olmo2_with_whole_projection_qk_norms_matches_transformers_at_every_rank_count() {
    check_all_ranks("olmo2");
}

/// StableLM: LayerNorm, rotary on a quarter of each head, q/k/v biases, per-head q/k
/// LayerNorms, parallel residual.
#[test]
fn stablelm_with_per_head_layernorms_and_parallel_residual_matches_transformers_at_every_rank_count(
) {
    check_all_ranks("stablelm");
}

/// Granite: embedding, attention, residual and logit multipliers; dynamic NTK scaling past
/// its context.
#[test]
fn granite_with_multipliers_and_dynamic_rope_matches_transformers_at_every_rank_count() {
    check_all_ranks("granite");
}

/// StarCoder2: LayerNorm with biases, biased projections, a plain MLP, a sliding window.
#[test]
fn starcoder2_matches_transformers_at_every_rank_count() {
    check_all_ranks("starcoder2");
}

/// Cohere / Command-R: parallel block on one bias-free LayerNorm, interleaved rotary, per-head
/// q/k LayerNorms, logit scale.
#[test]
fn cohere_with_parallel_block_and_logit_scale_matches_transformers_at_every_rank_count() {
    check_all_ranks("cohere");
}

/// Mixtral: 6 experts, each split across the ranks like a dense MLP, a replicated router
/// picking the top 2 with renormalised weights.
#[test]
fn mixtral_with_tensor_parallel_experts_matches_transformers_at_every_rank_count() {
    check_all_ranks("mixtral");
}

/// Qwen3-MoE: Qwen3's q/k norms, 8 experts routed top 2 without renormalisation
/// (`norm_topk_prob` false), and a dense middle layer (`mlp_only_layers`).
#[test]
fn qwen3_moe_with_a_dense_layer_matches_transformers_at_every_rank_count() {
    check_all_ranks("qwen3_moe");
}

/// The mixtures of experts' fixtures.
const MOE_FIXTURES: [&str; 4] = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"];

/// Options for `ranks` ranks holding whole experts.
fn expert_parallel(ranks: usize) -> Options {
    Options {
        expert_split: Some(ExpertSplit::Expert),
        ..options(ranks)
    }
}

/// Expert parallelism: each rank holds whole experts (Mixtral's 6 over 4 ranks: 2, 2, 1, 1;
/// Qwen3-MoE's 8 over 3: 3, 3, 2), runs the tokens routed to them, and the ranks' outputs are
/// summed: the logits, greedy tokens and `min_new_tokens` continuation equal transformers'.
#[test]
fn mixtures_of_experts_split_by_expert_match_transformers_at_every_rank_count() {
    for name in MOE_FIXTURES {
        check_all_ranks_with(name, expert_parallel);
    }
}

/// Expert parallelism: each rank holds its experts whole and nothing of the others; the
/// experts' bytes add up to the whole model's, and the load report says which experts.
#[test]
fn each_rank_holds_whole_experts_when_split_by_expert() {
    let report = |opts: Options| {
        let model = parallelize(fixture("mixtral"), opts).unwrap();
        let report = model.load_report().to_vec();
        model.deparallelize();
        report
    };
    let tensor_parallel = report(options(2));
    let alone = report(expert_parallel(1));
    let split = report(expert_parallel(3));
    // Mixtral's fixture: 6 experts of 3 projections of 64 × 40 f32s in each of 2 layers.
    let expert_bytes = 6 * 3 * 64 * 40 * 4 * 2;
    assert_eq!(alone[0].weights.experts, expert_bytes, "{alone:?}");
    for (rank, memory) in split.iter().enumerate() {
        assert_eq!(memory.weights.experts, expert_bytes / 3, "{split:?}");
        let held = memory.experts.expect("the report says which experts");
        assert_eq!((held.first, held.count, held.of), (2 * rank, 2, 6));
    }
    // Tensor-parallel experts are sliced, not whole, and the report names no experts.
    assert!(tensor_parallel
        .iter()
        .all(|m| m.weights.experts == 0 && m.experts.is_none()));
    let tp_sliced: u64 = tensor_parallel.iter().map(|m| m.weights.sliced).sum();
    assert_eq!(tp_sliced, alone[0].weights.sliced + expert_bytes);
}

/// Asking a dense model for expert parallelism is refused before any rank starts.
#[test]
fn a_dense_model_cannot_be_split_by_expert() {
    let err = parallelize(fixture("llama"), expert_parallel(2))
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("no mixture of experts"), "{err}");
}

/// Qwen2-MoE: Qwen2's q/k/v biases, 8 experts routed top 2, a shared expert of its own width
/// split like a dense MLP and scaled by its replicated sigmoid gate, and a dense middle layer.
#[test]
fn qwen2_moe_with_a_gated_shared_expert_matches_transformers_at_every_rank_count() {
    check_all_ranks("qwen2_moe");
}

/// OLMoE: q/k RMSNorm over the whole projection (statistics summed across ranks), q/k/v
/// clipped (`clip_qkv`), 8 experts routed top 2 with renormalised weights.
#[test]
fn olmoe_with_whole_projection_qk_norms_and_clipping_matches_transformers_at_every_rank_count() {
    check_all_ranks("olmoe");
}

/// Tensor-parallel experts: each rank holds `1 / ranks` of every expert, not whole experts.
#[test]
fn each_rank_holds_a_share_of_every_expert() {
    let held = |ranks| {
        let model = parallelize(fixture("mixtral"), options(ranks)).unwrap();
        let report: Vec<_> = model.load_report().iter().map(|r| r.weights).collect();
        model.deparallelize();
        report
    };
    let whole = held(1)[0];
    let halves = held(2);
    // The ranks' slices add up to the whole model, and differ only by the odd vocabulary row
    // of the embedding and of the head (101 rows of 64 f32s each).
    let sliced: Vec<u64> = halves.iter().map(|w| w.sliced).collect();
    assert_eq!(
        sliced.iter().sum::<u64>(),
        whole.sliced,
        "{halves:?} of {whole:?}"
    );
    assert!(sliced[0] - sliced[1] <= 2 * 64 * 4, "{halves:?}");
    assert!(halves.iter().all(|w| w.replicated == whole.replicated));
}

#[test]
fn bert_hidden_states_match_transformers_at_every_rank_count() {
    check_all_ranks("bert");
}

/// RoBERTa: BERT's blocks with positions numbered after the padding id, skipping padding.
#[test]
fn roberta_hidden_states_match_transformers_at_every_rank_count() {
    check_all_ranks("roberta");
}

/// DistilBERT: BERT's blocks under other names, without token types.
#[test]
fn distilbert_hidden_states_match_transformers_at_every_rank_count() {
    check_all_ranks("distilbert");
}

/// ELECTRA: narrower embeddings projected to the encoder's width.
#[test]
fn electra_hidden_states_match_transformers_at_every_rank_count() {
    check_all_ranks("electra");
}

/// ALBERT: factorized embeddings and one layer shared by every block.
#[test]
fn albert_hidden_states_match_transformers_at_every_rank_count() {
    check_all_ranks("albert");
    // The shared layer is held once, not once per block: one rank holds at most the file.
    let model = parallelize(fixture("albert"), options(1)).unwrap();
    let held = model.load_report()[0].weights;
    let file = std::fs::metadata(fixture("albert").join("model.safetensors"))
        .unwrap()
        .len();
    assert!(
        held.sliced + held.replicated <= file,
        "{held:?} > {file} bytes"
    );
    model.deparallelize();
}

/// BART: encoder and decoder of post-LayerNorm blocks, learned positions offset by 2, a tied
/// head with `final_logits_bias`; generation caches the encoder output's keys and values.
#[test]
fn bart_matches_transformers_at_every_rank_count() {
    check_all_ranks("bart");
}

/// T5 as first released: ReLU feed-forward, relative position buckets, tied head (scaled).
#[test]
fn t5_with_relative_positions_and_a_tied_head_matches_transformers_at_every_rank_count() {
    check_all_ranks("t5");
}

/// T5 v1.1: gated-GELU feed-forward, separate head.
#[test]
fn t5_with_a_gated_feed_forward_matches_transformers_at_every_rank_count() {
    check_all_ranks("t5_gated");
}

#[test]
fn bert_masked_lm_logits_match_transformers_at_every_rank_count() {
    check_all_ranks("bert_mlm");
}

/// Half-precision weights and activations: documented bounds (README, "Precision").
#[test]
fn half_precision_stays_within_the_documented_bounds() {
    for name in [
        "gpt2",
        "llama",
        "bert",
        "gemma2",
        "gemma3",
        "phi3",
        "olmo2",
        "stablelm",
        "cohere",
        "starcoder2",
        "granite",
        "qwen3",
    ] {
        check_half_precision(name, options(2));
    }
}

/// `name` in f16 and bf16 with `opts`, within the documented bounds.
fn check_half_precision(name: &str, opts: Options) {
    let split = opts.expert_split;
    let f16 = check_fixture(name, with_dtype(opts.clone(), WeightDType::F16));
    assert!(f16 < 2e-2, "{name} ({split:?}) f16 differs by {f16}");
    let bf16 = check_fixture(name, with_dtype(opts, WeightDType::Bf16));
    assert!(bf16 < 2.5e-1, "{name} ({split:?}) bf16 differs by {bf16}");
    eprintln!("{name} ({split:?}): f16 {f16:.2e}, bf16 {bf16:.2e}");
}

fn with_dtype(opts: Options, dtype: WeightDType) -> Options {
    Options { dtype, ..opts }
}

/// The largest difference from the reference at each unpadded position of `name`'s reference
/// batch, run as `opts` says.
fn position_diffs(name: &str, opts: Options) -> Vec<f64> {
    let refs = reference(name);
    let mut model = parallelize(fixture(name), opts).unwrap();
    let (_, expected, mask) = reference_output(&refs);
    let out = model.forward(&reference_batch(&refs)).unwrap();
    model.deparallelize();
    let width = *out.shape.last().unwrap();
    out.data
        .chunks_exact(width)
        .zip(expected.values.chunks_exact(width))
        .zip(&mask.values)
        .filter(|(_, &real)| real != 0.0)
        .map(|((got, want), _)| {
            got.iter()
                .zip(want)
                .map(|(&g, &w)| (g as f64 - w).abs())
                .fold(0.0, f64::max)
        })
        .collect()
}

/// Mixtures of experts in half precision, both ways of splitting them. The fixtures' random
/// routers are nearly uniform, so a position whose top experts are nearly tied may pick another
/// expert once the weights are rounded (in transformers at that dtype too: a discrete choice):
/// at most one position of each batch may do so; every other one stays within the dense
/// models' bounds.
#[test]
fn mixtures_of_experts_in_half_precision_stay_within_the_documented_bounds() {
    for name in MOE_FIXTURES {
        for split in [options(2), expert_parallel(2)] {
            for (dtype, bound) in [(WeightDType::F16, 2e-2), (WeightDType::Bf16, 2.5e-1)] {
                let mut diffs = position_diffs(name, with_dtype(split.clone(), dtype));
                diffs.sort_by(f64::total_cmp);
                let (rest, worst) = diffs.split_at(diffs.len() - 1);
                let rest = rest.last().copied().unwrap_or(0.0);
                eprintln!(
                    "{name} {dtype:?} ({:?}): {rest:.2e}, one position {:.2e}",
                    split.expert_split, worst[0]
                );
                assert!(
                    rest < bound,
                    "{name} {dtype:?} ({:?}): positions differ by up to {rest} besides the worst",
                    split.expert_split
                );
            }
        }
    }
}
