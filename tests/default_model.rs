//! The default model, SmolLM2-135M-Instruct in GGUF Q4_1, end to end against transformers'
//! answers for the same file (`scripts/make_smollm2_reference.py`). The model is fetched once
//! into the user cache, as a user's first run would.

mod common;

use std::ops::ControlFlow;
use std::sync::OnceLock;

use common::{fixture, options, run, run_with_stdin};
use parallelformers::checkpoint::source::ResolvedModel;
use parallelformers::generation::PREFILL_CHUNK;
use parallelformers::parallel::ipc::ForwardInput;
use parallelformers::text::TextSide;
use parallelformers::tokenizer::Message;
use parallelformers::{parallelize, GenerationConfig, ModelSource, WeightDType};
use serde_json::Value;

/// The default model, fetched on first use (once per test binary).
fn default_model() -> &'static ResolvedModel {
    static MODEL: OnceLock<ResolvedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        ResolvedModel::resolve(&ModelSource::Default).expect("fetching the default model")
    })
}

fn text_side() -> TextSide {
    TextSide::load(default_model())
        .unwrap()
        .expect("the default model has a tokenizer")
}

fn reference(file: &str) -> Value {
    let path = fixture("smollm2").join(file);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).unwrap()
}

fn messages(value: &Value) -> Vec<Message> {
    serde_json::from_value(value.clone()).unwrap()
}

#[test]
fn the_gguf_tokenizer_encodes_and_decodes_like_transformers() {
    let text = text_side();
    let cases = reference("tokenizer_cases.json");
    for case in cases["cases"].as_array().unwrap() {
        let input = case["text"].as_str().unwrap();
        let plain = text
            .tokenizer
            .encode(input, false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(plain, ids(&case["ids"]), "ids of {input:?}");
        assert_eq!(
            text.encode(input).unwrap(),
            ids(&case["ids_with_special_tokens"]),
            "ids with special tokens of {input:?}"
        );
        assert_eq!(
            text.decode(&plain).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decoded {input:?}"
        );
    }
}

#[test]
fn the_embedded_chat_template_renders_like_transformers() {
    let text = text_side();
    let template = text
        .template
        .as_ref()
        .expect("the default model has a chat template");
    for case in reference("chat_cases.json")["cases"].as_array().unwrap() {
        let conversation = messages(&case["messages"]);
        let add = case["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            template.render(&conversation, add).unwrap(),
            case["text"].as_str().unwrap(),
            "{}",
            case["name"]
        );
        if add {
            assert_eq!(
                text.chat_prompt(&conversation).unwrap(),
                ids(&case["ids"]),
                "{}",
                case["name"]
            );
        }
    }
}

/// Checks that the default model, split over each of `rank_counts` with weights in `dtype`,
/// greedily answers every recorded chat prompt with transformers' tokens.
fn check_greedy_answers(rank_counts: &[usize], dtype: WeightDType) {
    let text = text_side();
    let answers = reference("greedy_answers.json");
    let max_new_tokens = answers["max_new_tokens"].as_u64().unwrap() as usize;
    for &ranks in rank_counts {
        let mut opts = options(ranks);
        opts.dtype = dtype;
        let mut model = parallelize(default_model().location.path(), opts).unwrap();
        for answer in answers["answers"].as_array().unwrap() {
            let prompt = text.chat_prompt(&messages(&answer["messages"])).unwrap();
            assert_eq!(prompt, ids(&answer["prompt_ids"]), "{}", answer["name"]);
            let params = GenerationConfig {
                max_new_tokens,
                ..GenerationConfig::default()
            };
            let generated = model.generate(&prompt, &params).unwrap();
            assert_eq!(
                generated.ids,
                ids(&answer["new_ids"]),
                "{} at {ranks} ranks in {dtype:?}",
                answer["name"]
            );
        }
        model.deparallelize();
    }
}

#[test]
fn greedy_answers_equal_transformers_at_one_two_and_three_ranks() {
    check_greedy_answers(&[1, 2, 3], WeightDType::F32);
}

/// Kept quantized, the weights are the same numbers (dequantized inside the kernels instead of
/// at load), so the answers are the dequantized run's, which are transformers'.
#[test]
fn quantized_in_memory_gives_the_same_greedy_answers() {
    check_greedy_answers(&[1, 2], WeightDType::Quantized);
}

#[test]
fn chat_prints_the_answer_of_transformers_for_the_readme_question() {
    default_model();
    let answers = reference("greedy_answers.json");
    let france = &answers["answers"][0];
    assert_eq!(france["name"], "capital_of_france");
    let out = run(&[
        "chat",
        "--max-new-tokens",
        "24",
        "What is the capital of France?",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        france["answer"].as_str().unwrap().trim()
    );
}

#[test]
fn interactive_chat_keeps_the_conversation_history() {
    default_model();
    let input = "What is the capital of France?\nAnd of Germany?\n";
    let out = run_with_stdin(&["chat", "--max-new-tokens", "30"], input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    // "And of Germany?" only makes sense with the first exchange in the prompt.
    assert_eq!(
        answers,
        [
            "The capital of France is Paris.",
            "The capital of Germany is Berlin."
        ]
    );
}

/// Prompts longer than a prefill chunk ([`PREFILL_CHUNK`] positions) are prefilled a chunk at
/// a time, each chunk attending to the cache of the earlier ones; the tokens greedy decoding
/// then chooses are the argmax of whole forward passes (no cache, one pass) over each prompt
/// and the tokens before, for a batch whose rows are padded differently.
#[test]
fn prompts_longer_than_a_prefill_chunk_generate_what_whole_forward_passes_choose() {
    let mut model = parallelize(default_model().location.path(), options(2)).unwrap();
    let vocab = 49_152;
    let prompt = |len: usize, seed: usize| -> Vec<u32> {
        (0..len)
            .map(|i| ((i * 7919 + seed) % (vocab - 100) + 100) as u32)
            .collect()
    };
    let prompts = [
        prompt(PREFILL_CHUNK + 90, 13),
        prompt(PREFILL_CHUNK + 20, 29),
    ];
    let config = GenerationConfig {
        max_new_tokens: 2,
        ..GenerationConfig::default()
    };
    let generated = model
        .generate_batch(&prompts, &config, |_, _| ControlFlow::Continue(()))
        .unwrap();
    for (prompt, new) in prompts.iter().zip(&generated.sequences) {
        assert_eq!(new.len(), 2, "{new:?}");
        for (j, &token) in new.iter().enumerate() {
            let ids: Vec<u32> = prompt.iter().chain(&new[..j]).copied().collect();
            let logits = model
                .forward(&ForwardInput {
                    seq_len: ids.len(),
                    input_ids: ids,
                    batch: 1,
                    attention_mask: None,
                    decoder_input_ids: None,
                })
                .unwrap();
            let last = &logits.data[logits.data.len() - vocab..];
            let argmax = (0..vocab)
                .max_by(|&a, &b| last[a].total_cmp(&last[b]))
                .unwrap();
            assert_eq!(token, argmax as u32, "token {j} after {} ids", prompt.len());
        }
    }
    model.deparallelize();
}
