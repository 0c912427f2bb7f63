//! Outputs of every fixture, at every rank count the model allows up to 4, against the
//! references transformers wrote (`scripts/make_fixtures.py`).

mod common;

use common::{fixture, masked_max_diff, options, reference, reference_batch, reference_output};
use parallelformers::{parallelize, GenerationConfig, WeightDType};

/// f32 outputs must be within this of transformers' (absolute, at unpadded positions).
const F32_TOLERANCE: f64 = 1e-4;

/// Runs the padded reference batch through `name` split over `ranks` and returns the largest
/// difference from the reference; also checks greedy generation when the fixture has it.
fn check_fixture(name: &str, ranks: usize, dtype: WeightDType) -> f64 {
    let refs = reference(name);
    let mut opts = options(ranks);
    opts.dtype = dtype;
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
    for ranks in 1..=max_ranks(name) {
        let diff = check_fixture(name, ranks, WeightDType::F32);
        assert!(
            diff < F32_TOLERANCE,
            "{name} at {ranks} ranks differs from transformers by {diff}"
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
        let f16 = check_fixture(name, 2, WeightDType::F16);
        assert!(f16 < 2e-2, "{name} f16 differs by {f16}");
        let bf16 = check_fixture(name, 2, WeightDType::Bf16);
        assert!(bf16 < 2.5e-1, "{name} bf16 differs by {bf16}");
        eprintln!("{name}: f16 {f16:.2e}, bf16 {bf16:.2e}");
    }
}
