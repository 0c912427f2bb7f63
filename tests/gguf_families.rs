//! GGUF files of today's families as llama.cpp's `convert_hf_to_gguf.py` writes them (`llama`
//! with Llama 3's rotary scaling, `qwen3`, `gemma2`, `gemma3`, `phi3`, `granite`, `starcoder2`,
//! `olmo2`, and the mixtures of experts `qwen3moe` and Mixtral (a `llama` file with experts),
//! whose experts are stacked in one 3-D tensor per projection; Q8_0, F16 and F32 tensors),
//! against references from transformers: transformers
//! loading the same GGUF where it reads everything llama.cpp wrote, else transformers on the
//! dequantized tensors with the configuration llama.cpp reads (`scripts/make_gguf_fixtures.py`,
//! `tests/fixtures/gguf/families/<arch>_meta.json` says which). Each family: logits of a padded
//! batch and a greedy continuation at 1–3 ranks, with weights dequantized to f32 and kept
//! quantized; the tokenizer and chat template against transformers' GGUF tokenizer; and
//! `parallelformers chat` answering through the built binary.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::{
    assert_greedy_continuation, fixture, masked_max_diff, options, read_tensors, reference_batch,
    run, RefTensor,
};
use parallelformers::checkpoint::config::rope::RopeScaling;
use parallelformers::checkpoint::config::RawConfig;
use parallelformers::checkpoint::gguf::GgufFile;
use parallelformers::checkpoint::gguf_model::config_from_gguf;
use parallelformers::checkpoint::source::ResolvedModel;
use parallelformers::parallel::forecast::Forecast;
use parallelformers::text::TextSide;
use parallelformers::tokenizer::Message;
use parallelformers::{parallelize, ExpertSplit, GenerationConfig, ModelSource, WeightDType};

fn gguf(arch: &str) -> PathBuf {
    fixture("gguf/families").join(format!("{arch}.gguf"))
}

fn references(arch: &str) -> HashMap<String, RefTensor> {
    read_tensors(&fixture("gguf/families").join(format!("{arch}_reference.safetensors")))
}

fn meta(arch: &str) -> serde_json::Value {
    let path = fixture("gguf/families").join(format!("{arch}_meta.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Largest difference from the reference logits at each of 1–3 ranks with weights in `dtype`;
/// also checks the greedy continuation token for token.
fn check_family(arch: &str, dtype: WeightDType, tolerance: f64) {
    check_family_split(arch, dtype, tolerance, None);
}

/// [`check_family`] with a mixture of experts divided as `split` says.
fn check_family_split(arch: &str, dtype: WeightDType, tolerance: f64, split: Option<ExpertSplit>) {
    let refs = references(arch);
    let mask = &refs["attention_mask"];
    let mut diffs = Vec::new();
    for ranks in 1..=3 {
        let mut opts = options(ranks);
        opts.dtype = dtype;
        opts.expert_split = split;
        let mut model = parallelize(gguf(arch), opts).unwrap();
        let out = model.forward(&reference_batch(&refs)).unwrap();
        let diff = masked_max_diff(&out.data, &refs["logits"], mask);
        assert!(
            diff < tolerance,
            "{arch}: {ranks} ranks in {dtype:?} differ from the reference by {diff}"
        );
        diffs.push(format!("{diff:.3e}"));
        assert_greedy_continuation(
            &mut model,
            &refs,
            &format!("{arch}: {ranks} ranks in {dtype:?}"),
        );
    }
    eprintln!(
        "{arch} in {dtype:?} ({split:?}): max |logit - reference| at 1, 2, 3 ranks = {}",
        diffs.join(", ")
    );
}

/// The tokenizer, chat template and end-of-sequence ids the file gives, against transformers'
/// GGUF tokenizer; then the chat answer to "Hello" through the library.
fn check_text(arch: &str) {
    let refs = references(arch);
    let meta = meta(arch);
    let resolved = ResolvedModel::resolve(&ModelSource::Path(gguf(arch))).unwrap();
    assert_eq!(
        resolved.eos_token_ids,
        refs["eos_token_ids"].ids(),
        "{arch}: end-of-sequence ids"
    );
    let text = TextSide::load(&resolved)
        .unwrap()
        .expect("the file has a tokenizer");
    let probes = meta["tokenizer_probes"].as_array().unwrap();
    for (i, probe) in probes.iter().enumerate() {
        let probe = probe.as_str().unwrap();
        let ids = text
            .tokenizer
            .encode(probe, false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(
            ids,
            refs[&format!("tokenizer_probe_{i}")].ids(),
            "{arch}: {probe:?}"
        );
    }
    let prompt = text.chat_prompt(&[Message::new("user", "Hello")]).unwrap();
    assert_eq!(prompt, refs["chat_prompt_ids"].ids(), "{arch}: chat prompt");

    let mut model = parallelize(gguf(arch), options(2)).unwrap();
    let params = GenerationConfig {
        max_new_tokens: 4,
        ..GenerationConfig::default()
    };
    let answer = model.generate(&prompt, &params).unwrap();
    assert_eq!(answer.ids, refs["chat_answer_ids"].ids(), "{arch}: answer");
    assert_eq!(
        text.decode(&answer.ids).unwrap(),
        meta["chat_answer"].as_str().unwrap(),
        "{arch}: answer text"
    );
}

/// `parallelformers chat --model FILE.gguf --ranks 2 --max-new-tokens 4 "Hello"` answers with
/// the reference's text.
fn check_chat_binary(arch: &str) {
    let path = gguf(arch);
    let out = run(&[
        "chat",
        "--model",
        path.to_str().unwrap(),
        "--ranks",
        "2",
        "--max-new-tokens",
        "4",
        "Hello",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{arch}: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = meta(arch)["chat_answer"].as_str().unwrap().to_string();
    assert!(!expected.trim().is_empty());
    assert!(
        stdout.contains(expected.trim()),
        "{arch}: expected {expected:?} in the answer, got {stdout:?}"
    );
}

macro_rules! family {
    ($arch:ident) => {
        mod $arch {
            use super::*;

            #[test]
            fn logits_and_greedy_tokens_match_the_reference_at_one_two_and_three_ranks() {
                check_family(stringify!($arch), WeightDType::F32, 1e-4);
            }

            #[test]
            fn kept_quantized_in_memory_it_matches_the_reference_too() {
                check_family(stringify!($arch), WeightDType::Quantized, 1e-4);
            }

            #[test]
            fn tokenizer_chat_template_and_end_of_sequence_ids_come_from_the_file() {
                check_text(stringify!($arch));
            }

            #[test]
            fn chat_answers_through_the_binary() {
                check_chat_binary(stringify!($arch));
            }
        }
    };
}

family!(llama);
family!(qwen3);
family!(gemma2);
family!(gemma3);
family!(phi3);
family!(granite);
family!(starcoder2);
family!(olmo2);
family!(mixtral);
family!(qwen3moe);

const FAMILIES: [&str; 10] = [
    "llama",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "granite",
    "starcoder2",
    "olmo2",
    "mixtral",
    "qwen3moe",
];

/// Q8_0 stores 32 weights in 34 bytes.
const Q8_0_BLOCK: (usize, u64) = (32, 34);

/// Kept quantized, a rank holds its slice of every expert in the Q8_0 blocks of the layer's
/// stacked tensor: the gate and up projections' rows at every rank count, the down
/// projection's columns where the rank's share of the expert's width is whole blocks (else that
/// slice is dequantized to f32).
#[test]
fn each_rank_keeps_its_slice_of_every_expert_in_the_stacked_q8_0_blocks() {
    for (arch, experts, width) in [("mixtral", 4, 64), ("qwen3moe", 8, 32)] {
        let resolved = ResolvedModel::resolve(&ModelSource::Path(gguf(arch))).unwrap();
        let layers = resolved.config.num_layers;
        let mut quantized_down_slices = 0;
        for ranks in 1..=3 {
            let forecast = Forecast::of(&resolved, ranks, WeightDType::Quantized).unwrap();
            let stacked: Vec<_> = forecast
                .tensors
                .iter()
                .filter(|t| t.name.contains(".experts."))
                .collect();
            assert_eq!(stacked.len(), layers * experts * 3, "{arch}");
            for t in stacked {
                let down = t.shape == [64, width];
                assert!(down || t.shape == [width, 64], "{arch}: {t:?}");
                for (shape, bytes) in &t.slices {
                    let elements = shape.iter().product::<usize>();
                    let whole_blocks = shape[1].is_multiple_of(Q8_0_BLOCK.0);
                    let expected = match whole_blocks {
                        true => (elements / Q8_0_BLOCK.0) as u64 * Q8_0_BLOCK.1,
                        false => elements as u64 * 4,
                    };
                    assert_eq!(
                        *bytes, expected,
                        "{arch}: {} at {ranks} ranks, slice {shape:?}",
                        t.name
                    );
                    assert!(whole_blocks || (down && ranks > 1), "{arch}: {t:?}");
                    quantized_down_slices += usize::from(down && whole_blocks && ranks > 1);
                }
            }
        }
        // Mixtral's experts are 64 wide: two ranks hold 32 columns each, whole blocks.
        assert_eq!(quantized_down_slices > 0, arch == "mixtral", "{arch}");
    }
}

/// Expert parallelism on GGUF files: each rank holds whole experts (Mixtral's 4 over 3 ranks:
/// 2, 1, 1), read as whole rows of the stacked tensors and kept in their Q8_0 blocks; logits
/// and greedy tokens match the reference at 1–3 ranks, dequantized or not.
#[test]
fn whole_experts_from_the_stacked_tensors_match_the_reference_kept_quantized_or_not() {
    for arch in ["mixtral", "qwen3moe"] {
        for dtype in [WeightDType::F32, WeightDType::Quantized] {
            check_family_split(arch, dtype, 1e-4, Some(ExpertSplit::Expert));
        }
        let resolved = ResolvedModel::resolve(&ModelSource::Path(gguf(arch)))
            .and_then(|m| m.with_expert_split(Some(ExpertSplit::Expert)))
            .unwrap();
        let forecast = Forecast::of(&resolved, 3, WeightDType::Quantized).unwrap();
        for t in forecast
            .tensors
            .iter()
            .filter(|t| t.name.contains(".experts."))
        {
            let elements = t.shape.iter().product::<usize>();
            let whole = (elements / Q8_0_BLOCK.0) as u64 * Q8_0_BLOCK.1;
            let held: Vec<u64> = t.slices.iter().map(|(_, bytes)| *bytes).collect();
            // One rank holds it whole, in its blocks; the others nothing.
            assert_eq!(held.iter().filter(|&&b| b == whole).count(), 1, "{t:?}");
            assert_eq!(held.iter().filter(|&&b| b == 0).count(), 2, "{t:?}");
        }
    }
}

/// The configuration read from each file's metadata is the one of the checkpoint it was
/// converted from (as resolved from that checkpoint's `config.json`), but for the form of
/// Llama 3's rotary scaling, which llama.cpp stores as one divisor per frequency: those are
/// checked against transformers' llama3 formula.
#[test]
fn each_file_s_configuration_is_the_one_of_the_checkpoint_it_was_converted_from() {
    for arch in FAMILIES {
        let file = GgufFile::open(&gguf(arch)).unwrap();
        let got = config_from_gguf(&file).unwrap();
        let want = RawConfig::from_value(meta(arch)["hf_config"].clone())
            .and_then(RawConfig::resolve)
            .unwrap();
        assert_eq!(got.family, want.family, "{arch}");
        assert_eq!(got.model_type, want.model_type, "{arch}");
        assert_eq!(got.vocab_size, want.vocab_size, "{arch}");
        assert_eq!(got.hidden_size, want.hidden_size, "{arch}");
        assert_eq!(got.num_layers, want.num_layers, "{arch}");
        assert_eq!(got.num_heads, want.num_heads, "{arch}");
        assert_eq!(got.num_kv_heads, want.num_kv_heads, "{arch}");
        assert_eq!(got.head_dim, want.head_dim, "{arch}");
        assert_eq!(got.intermediate_size, want.intermediate_size, "{arch}");
        assert_eq!(got.max_positions, want.max_positions, "{arch}");
        assert_eq!(got.norm_eps, want.norm_eps, "{arch}");
        assert_eq!(got.activation, want.activation, "{arch}");
        assert_eq!(got.tie_word_embeddings, want.tie_word_embeddings, "{arch}");
        assert_eq!(got.bos_token_id, want.bos_token_id, "{arch}");
        assert_eq!(got.attention_windows, want.attention_windows, "{arch}");
        assert_eq!(got.rotary_dim, want.rotary_dim, "{arch}");
        assert_eq!(
            (got.qkv_bias, got.attn_out_bias, got.mlp_bias),
            (want.qkv_bias, want.attn_out_bias, want.mlp_bias),
            "{arch}"
        );
        assert_eq!(got.decoder, want.decoder, "{arch}");
        if arch != "llama" {
            assert_eq!(got.rope, want.rope, "{arch}");
            continue;
        }
        let (got, want) = (got.rope.unwrap().full, want.rope.unwrap().full);
        assert_eq!(got.theta, want.theta);
        let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_positions,
        } = want.scaling
        else {
            panic!("the llama fixture has llama3 scaling: {want:?}")
        };
        let RopeScaling::LongRope {
            short_factor,
            long_factor,
            attention_factor,
            ..
        } = got.scaling
        else {
            panic!("rope_freqs.weight is read as per-frequency divisors: {got:?}")
        };
        assert_eq!(short_factor, long_factor);
        assert_eq!(attention_factor, Some(1.0));
        let dim = short_factor.len() * 2;
        let original = original_max_positions as f64;
        for (i, divisor) in short_factor.iter().enumerate() {
            let freq = want.theta.powf(-((2 * i) as f64) / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let expected = if wavelen < original / high_freq_factor {
                1.0
            } else if wavelen > original / low_freq_factor {
                factor
            } else {
                let smooth =
                    (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            assert!(
                (divisor - expected).abs() < 1e-6 * expected,
                "frequency {i}: {divisor} vs {expected}"
            );
        }
    }
}
