//! Generation against transformers' `generate` (tests/fixtures/generation/, written by
//! scripts/make_generation_fixtures.py) at several rank counts: greedy decoding with
//! `repetition_penalty`, `no_repeat_ngram_size` and `min_new_tokens`, left-padded batches of
//! prompts of different lengths, and beam search (2 to 5 beams, length penalties, early
//! stopping, several returned sequences with their scores), forced BOS/EOS tokens, suppressed
//! tokens, min-p and renormalised logits must give identical tokens, and log-probabilities
//! must match transformers' `compute_transition_scores` within 1e-4. Also: sampling is reproducible and
//! agreed on by every rank, a stream can be cancelled, stop strings end a sequence, and bad
//! options are refused before any rank works.

mod common;

use std::ops::ControlFlow;

use common::{fixture, options};
use parallelformers::{parallelize, ExpertSplit, GenerationConfig, Options, ParallelModel};
use serde_json::Value;

const FAMILIES: [&str; 5] = ["llama", "gpt2", "mistral", "qwen2", "smollm_like"];

/// The Llama-style families of issue 15, with fixtures from transformers 5.25.
const TODAYS_FAMILIES: [&str; 12] = [
    "llama3",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "smollm3",
    "olmo2",
    "stablelm",
    "granite",
    "starcoder2",
    "cohere",
];

/// The mixtures of experts of issue 20 (tensor-parallel experts).
const MOE_FAMILIES: [&str; 4] = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"];

fn recorded(name: &str) -> Value {
    let path = fixture("generation").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A case's options as a configuration: transformers' keys, `max_new_tokens` 10 unless the
/// case says otherwise, padding id 0 (as the fixture script uses).
fn case_config(case: &Value) -> GenerationConfig {
    let mut options = case["options"].as_object().unwrap().clone();
    options.entry("max_new_tokens").or_insert(10.into());
    let mut config = GenerationConfig::from_json(&Value::Object(options).to_string()).unwrap();
    config.pad_token_id = Some(0);
    config
}

fn prompts(case: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(case["prompts"].clone()).unwrap()
}

fn sequences(case: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(case["sequences"].clone()).unwrap()
}

fn run_batch(
    model: &mut ParallelModel,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
) -> Vec<Vec<u32>> {
    model
        .generate_batch(prompts, config, |_, _| ControlFlow::Continue(()))
        .unwrap()
        .sequences
}

/// Every recorded case of `family` at 1 to `max_ranks` ranks (the fixture's `max_ranks` at most).
fn check_recorded_cases(family: &str, max_ranks: usize) {
    check_recorded_cases_split(family, max_ranks, None);
}

/// [`check_recorded_cases`] with a mixture of experts divided as `split` says.
fn check_recorded_cases_split(family: &str, max_ranks: usize, split: Option<ExpertSplit>) {
    check_cases(family, &recorded(family), max_ranks, split);
}

/// Every case of `reference` (a family's recorded cases) at 1 to `max_ranks` ranks (the
/// fixture's `max_ranks` at most).
fn check_cases(family: &str, reference: &Value, max_ranks: usize, split: Option<ExpertSplit>) {
    let allowed: usize = serde_json::from_str::<Value>(
        &std::fs::read_to_string(fixture(family).join("meta.json")).unwrap(),
    )
    .unwrap()["max_ranks"]
        .as_u64()
        .unwrap() as usize;
    for ranks in 1..=allowed.min(max_ranks) {
        let opts = Options {
            expert_split: split,
            ..options(ranks)
        };
        let mut model = parallelize(fixture(family), opts).unwrap();
        for (name, case) in reference["cases"].as_object().unwrap() {
            let config = case_config(case);
            let got = model
                .generate_batch(&prompts(case), &config, |_, _| ControlFlow::Continue(()))
                .unwrap();
            assert_eq!(
                got.sequences,
                sequences(case),
                "{family}, {name}, {ranks} ranks"
            );
            if let Some(want) = case["sequence_scores"].as_array() {
                let scores = got.scores.expect("beam search returns scores");
                for (g, w) in scores.iter().zip(want) {
                    let w = w.as_f64().unwrap();
                    assert!(
                        (*g as f64 - w).abs() < 1e-4,
                        "{family}, {name}, {ranks} ranks: score {g} vs {w}"
                    );
                }
            }
        }
        model.deparallelize();
    }
}

#[test]
fn greedy_penalties_batches_and_beams_match_transformers_at_several_rank_counts() {
    for family in FAMILIES {
        check_recorded_cases(family, 3);
    }
}

/// Encoder–decoders (T5, BART): their processors see the decoder's tokens (its start token and
/// the new ones), as transformers' see `decoder_input_ids`, not the encoder's prompt.
#[test]
fn encoder_decoders_generate_like_transformers_at_several_rank_counts() {
    for family in ["t5", "bart"] {
        check_recorded_cases(family, 3);
    }
}

/// The logits processors of issue 21 as transformers 5.25 generates with them
/// (logits_processors.json): forced BOS and EOS tokens (a BART summariser's
/// `generation_config.json`), suppressed tokens and first tokens, sequence biases, bad words,
/// the exponential decay length penalty, the encoder repetition penalty and no-repeat n-grams,
/// `max_time`, min-p and epsilon sampling that keep one token, and beams, with renormalised
/// logits among them, with their scores.
#[test]
fn the_remaining_logits_processors_match_transformers_at_one_to_three_ranks() {
    let reference = recorded("logits_processors");
    for (family, cases) in reference["families"].as_object().unwrap() {
        check_cases(family, cases, 3, None);
    }
}

/// Today's families (Llama 3, Qwen3, Gemma 1–3, Phi-3, SmolLM3, OLMo 2, StableLM, Granite,
/// StarCoder2, Cohere) at 1 to 4 ranks: 3 and 4 ranks share key/value heads.
#[test]
fn todays_families_generate_like_transformers_at_one_to_four_ranks() {
    for family in TODAYS_FAMILIES {
        check_recorded_cases(family, 4);
    }
}

/// Mixtral, Qwen3-MoE, Qwen2-MoE and OLMoE with tensor-parallel experts at 1 to 4 ranks:
/// routing, and so every token, as transformers'.
#[test]
fn mixtures_of_experts_generate_like_transformers_at_one_to_four_ranks() {
    for family in MOE_FAMILIES {
        check_recorded_cases(family, 4);
    }
}

/// The same with expert parallelism: each rank holds whole experts.
#[test]
fn mixtures_of_experts_split_by_expert_generate_like_transformers_at_one_to_four_ranks() {
    for family in MOE_FAMILIES {
        check_recorded_cases_split(family, 4, Some(ExpertSplit::Expert));
    }
}

/// Log-probabilities of the chosen tokens and the most likely ones at each step (scores.json)
/// against transformers 5.25's `compute_transition_scores(sequences, outputs.logits,
/// beam_indices, normalize_logits=True)` and the log-softmax of its `output_logits`: greedy
/// decoding (alone, with a repetition penalty, which changes the tokens but not the model's
/// distribution, and a left-padded batch), seeded sampling whose draw is certain, and beams,
/// for a decoder-only model, GPT-2 and BART, at 1 to 3 ranks, within 1e-4.
#[test]
fn log_probabilities_match_transformers_transition_scores_at_one_to_three_ranks() {
    let reference = recorded("scores");
    let mut largest = 0f64;
    for (family, cases) in reference["families"].as_object().unwrap() {
        for ranks in 1..=3 {
            let mut model = parallelize(fixture(family), options(ranks)).unwrap();
            for (name, case) in cases["cases"].as_object().unwrap() {
                let config = GenerationConfig {
                    logprobs: true,
                    top_logprobs: case["top_logprobs"].as_u64().unwrap() as usize,
                    seed: Some(5),
                    ..case_config(case)
                };
                let got = model
                    .generate_batch(&prompts(case), &config, |_, _| ControlFlow::Continue(()))
                    .unwrap();
                let what = format!("{family}, {name}, {ranks} ranks");
                assert_eq!(got.sequences, sequences(case), "{what}");
                let logprobs = got.logprobs.expect("logprobs were asked for");
                let want = case["logprobs"].as_array().unwrap();
                assert_eq!(logprobs.len(), want.len(), "{what}");
                for (row, (got, want)) in logprobs.iter().zip(want).enumerate() {
                    let difference =
                        common::logprob_difference(got, want, &format!("{what}, row {row}"));
                    assert!(difference < 1e-4, "{what}, row {row}: {difference}");
                    largest = largest.max(difference);
                }
            }
            model.deparallelize();
        }
    }
    eprintln!("largest difference from transformers' log-probabilities: {largest:e}");
}

#[test]
fn each_row_of_a_batch_equals_its_prompt_run_alone() {
    let case = &recorded("llama")["cases"]["batched_penalty"];
    let config = case_config(case);
    let mut model = parallelize(fixture("llama"), options(2)).unwrap();
    let batched = run_batch(&mut model, &prompts(case), &config);
    for (prompt, row) in prompts(case).iter().zip(&batched) {
        assert_eq!(&model.generate(prompt, &config).unwrap().ids, row);
    }
    model.deparallelize();
}

fn sampling() -> GenerationConfig {
    GenerationConfig {
        do_sample: true,
        temperature: 1.5,
        top_k: 40,
        top_p: 0.95,
        typical_p: 0.98,
        max_new_tokens: 12,
        eos_token_id: Some(vec![]),
        seed: Some(1234),
        ..GenerationConfig::default()
    }
}

/// Every rank answers with the tokens it fed its model; the main process refuses to return
/// when they differ, so a successful run at 2 and 3 ranks is the check.
#[test]
fn sampling_is_reproducible_with_a_seed_and_every_rank_agrees() {
    let prompt = [5, 17, 42];
    for ranks in [2, 3] {
        let mut model = parallelize(fixture("llama"), options(ranks)).unwrap();
        let first = model.generate(&prompt, &sampling()).unwrap();
        assert_eq!(first.ids.len(), 12);
        assert_eq!(model.generate(&prompt, &sampling()).unwrap().ids, first.ids);
        let other_seed = GenerationConfig {
            seed: Some(99),
            ..sampling()
        };
        let other = model.generate(&prompt, &other_seed).unwrap();
        assert_ne!(
            other.ids, first.ids,
            "{ranks} ranks: the seed changes nothing"
        );
        let several = GenerationConfig {
            num_return_sequences: 3,
            ..sampling()
        };
        let sequences = model.generate(&prompt, &several).unwrap().sequences;
        assert_eq!(sequences.len(), 3);
        assert!(
            sequences.iter().any(|s| s != &sequences[0]),
            "three identical samples"
        );
        model.deparallelize();
    }
}

#[test]
fn a_cancelled_stream_returns_what_it_has_and_the_ranks_go_back_to_idle() {
    let mut model = parallelize(fixture("llama"), options(2)).unwrap();
    let config = GenerationConfig {
        max_new_tokens: 40,
        eos_token_id: Some(vec![]),
        ..GenerationConfig::default()
    };
    let full = model.generate(&[3, 4, 5], &config).unwrap();
    let mut streamed = Vec::new();
    let cancelled = model
        .generate_stream(&[3, 4, 5], &config, |token| {
            streamed.push(token);
            match streamed.len() {
                3 => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        })
        .unwrap();
    assert_eq!(cancelled.ids, full.ids[..3]);
    assert_eq!(streamed, full.ids[..3]);
    // The ranks are idle again and answer the next request normally.
    assert_eq!(model.generate(&[3, 4, 5], &config).unwrap().ids, full.ids);
    model.deparallelize();
}

#[test]
fn a_stop_string_ends_the_sequence_with_the_token_that_completes_it() {
    let mut model = parallelize(fixture("gpt2"), options(2)).unwrap();
    let config = GenerationConfig {
        max_new_tokens: 10,
        eos_token_id: Some(vec![]),
        ..GenerationConfig::default()
    };
    let full = model.generate(&[10, 20, 30], &config).unwrap().ids;
    let tokenizer =
        tokenizers::Tokenizer::from_file(fixture("gpt2").join("tokenizer.json")).unwrap();
    // The text of the first four tokens can only be complete once the fourth is there.
    let (cut, stop) = (1..=full.len())
        .map(|n| (n, tokenizer.decode(&full[..n], false).unwrap()))
        .find(|(n, text)| {
            *n >= 4
                && !text.is_empty()
                && !tokenizer
                    .decode(&full[..n - 1], false)
                    .unwrap()
                    .contains(text.as_str())
        })
        .unwrap();
    let stopped = model
        .generate(
            &[10, 20, 30],
            &GenerationConfig {
                stop: vec![stop.clone()],
                ..config.clone()
            },
        )
        .unwrap();
    assert_eq!(stopped.ids, full[..cut], "stop string {stop:?}");
    model.deparallelize();
}

#[test]
fn contradictory_options_and_long_prompts_are_refused_before_any_rank_works() {
    let mut model = parallelize(fixture("gpt2"), options(2)).unwrap();
    let refuse =
        |model: &mut ParallelModel, prompt: &[u32], config: GenerationConfig, needle: &str| {
            let err = match model.generate(prompt, &config) {
                Ok(_) => panic!("accepted {config:?}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(needle), "{err}");
        };
    let d = GenerationConfig::default;
    refuse(
        &mut model,
        &[1],
        GenerationConfig {
            do_sample: true,
            temperature: 0.0,
            ..d()
        },
        "temperature",
    );
    refuse(
        &mut model,
        &[1],
        GenerationConfig { top_p: 1.2, ..d() },
        "top_p must be in (0, 1]",
    );
    refuse(
        &mut model,
        &[1],
        GenerationConfig {
            num_beams: 2,
            num_return_sequences: 4,
            ..d()
        },
        "num_return_sequences (4) cannot exceed num_beams (2)",
    );
    refuse(
        &mut model,
        &[1],
        GenerationConfig {
            num_beams: 3,
            stop: vec!["a".into()],
            ..d()
        },
        "not supported with beam search",
    );
    // The fixture's context is 64 positions.
    refuse(
        &mut model,
        &[1; 60],
        GenerationConfig {
            max_new_tokens: 10,
            ..d()
        },
        "context of 64",
    );
    let two = GenerationConfig {
        max_new_tokens: 2,
        eos_token_id: Some(vec![]),
        ..d()
    };
    assert_eq!(model.generate(&[1, 2], &two).unwrap().ids.len(), 2);
    model.deparallelize();
}

#[test]
fn options_that_ban_every_token_stop_every_rank_with_an_error_and_the_model_stays_usable() {
    let mut model = parallelize(fixture("llama"), options(2)).unwrap();
    // No token may repeat: after the 103 tokens of the vocabulary, nothing is left.
    let exhausting = GenerationConfig {
        no_repeat_ngram_size: 1,
        max_new_tokens: 110,
        eos_token_id: Some(vec![]),
        ..GenerationConfig::default()
    };
    let err = model.generate(&[1], &exhausting).unwrap_err().to_string();
    assert!(err.contains("every token is banned"), "{err}");
    let short = GenerationConfig {
        max_new_tokens: 3,
        eos_token_id: Some(vec![]),
        ..GenerationConfig::default()
    };
    assert_eq!(model.generate(&[1, 2], &short).unwrap().ids.len(), 3);
    model.deparallelize();
}
