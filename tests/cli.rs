//! The command-line contract: `forward`, `generate`, `inspect`, `bench`, `chat` and `--verbose`,
//! as other tools call them (a pipe to `head` included).

mod common;

use std::process::{Command, Output, Stdio};

use common::{
    assert_no_processes_tagged, binary, fixture, forward_args, generate_reference_args,
    masked_max_diff, read_tensors, reference, run, run_with_stdin, unique_tag,
};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_success(out: &std::process::Output) {
    assert!(out.status.success(), "command failed:\n{}", stderr(out));
}

/// Runs `forward` on fixture `name` with its reference batch and returns the written tensors.
fn forward_fixture(
    name: &str,
    ranks: &str,
) -> std::collections::HashMap<String, common::RefTensor> {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.safetensors");
    let model = fixture(name);
    let out = run(&forward_args(
        &model,
        ranks,
        &model.join("reference.safetensors"),
        &output,
    ));
    assert_success(&out);
    read_tensors(&output)
}

#[test]
fn forward_writes_logits_that_match_transformers() {
    let written = forward_fixture("llama", "3");
    let refs = reference("llama");
    let logits: Vec<f32> = written["logits"].values.iter().map(|&v| v as f32).collect();
    assert_eq!(written["logits"].shape, refs["logits"].shape);
    assert!(masked_max_diff(&logits, &refs["logits"], &refs["attention_mask"]) < 1e-4);
}

#[test]
fn forward_of_an_encoder_writes_last_hidden_state() {
    let written = forward_fixture("bert", "2");
    assert_eq!(written["last_hidden_state"].shape, vec![2, 10, 64]);
}

/// Runs `generate --json` on fixture `name` from its reference prompt with `extra` arguments.
fn generate_reference_prompt(name: &str, ranks: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = generate_reference_args(name);
    args.extend(
        ["--ranks", ranks]
            .iter()
            .chain(extra)
            .map(|a| a.to_string()),
    );
    let out = run(&args);
    assert_success(&out);
    serde_json::from_str(stdout(&out).trim()).unwrap()
}

fn generated_ids(json: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(json["generated_ids"].clone()).unwrap()
}

#[test]
fn generate_json_from_token_ids_matches_transformers_greedy() {
    let json = generate_reference_prompt("qwen2", "2", &["--max-new-tokens", "12"]);
    assert_eq!(
        generated_ids(&json),
        reference("qwen2")["generate_output_ids"].ids()
    );
    assert!(json.get("text").is_none(), "no tokenizer, so no text");
}

#[test]
fn min_new_tokens_suppresses_end_of_sequence_like_transformers() {
    let json = generate_reference_prompt(
        "smollm_like",
        "3",
        &["--max-new-tokens", "12", "--min-new-tokens", "12"],
    );
    assert_eq!(
        generated_ids(&json),
        reference("smollm_like")["generate_min_output_ids"].ids()
    );
}

#[test]
fn generation_flags_follow_transformers_names_and_bad_values_are_refused() {
    let sampled = [
        "--max-new-tokens",
        "10",
        "--do-sample",
        "true",
        "--temperature",
        "1.3",
        "--top-k",
        "30",
        "--top-p",
        "0.9",
        "--repetition-penalty",
        "1.2",
        "--num-return-sequences",
        "2",
        "--eos-token-id",
        "1,2",
        "--seed",
        "11",
    ];
    let one = generate_reference_prompt("llama", "2", &sampled);
    let again = generate_reference_prompt("llama", "3", &sampled);
    assert_eq!(
        one["sequences"], again["sequences"],
        "same seed, same samples"
    );
    assert_eq!(one["sequences"].as_array().unwrap().len(), 2);
    let beams = generate_reference_prompt(
        "llama",
        "2",
        &[
            "--num-beams",
            "3",
            "--num-return-sequences",
            "2",
            "--max-new-tokens",
            "6",
        ],
    );
    assert_eq!(beams["sequences"].as_array().unwrap().len(), 2);
    let model = fixture("llama");
    for (flag, value, needle) in [
        ("--top-p", "0", "top_p must be in (0, 1]"),
        (
            "--temperature",
            "-1",
            "temperature must be a positive number",
        ),
        (
            "--early-stopping",
            "soon",
            "early_stopping must be true, false or never",
        ),
    ] {
        let option = format!("{flag}={value}");
        let out = run(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--do-sample",
            "true",
            &option,
            "--input-ids",
            "1,2",
        ]);
        assert!(!out.status.success(), "{flag} {value} was accepted");
        assert!(stderr(&out).contains(needle), "{}", stderr(&out));
    }
}

/// `generate --json --logprobs --top-logprobs N` reports transformers' log-probabilities
/// (scores.json's Llama greedy case, within 1e-4); out-of-range score flags are refused before
/// any rank starts, naming the flag.
#[test]
fn generate_json_reports_log_probabilities_and_refuses_bad_score_flags() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("generation").join("scores.json")).unwrap(),
    )
    .unwrap();
    let case = &reference["families"]["llama"]["cases"]["greedy"];
    let prompt: Vec<String> = case["prompts"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.to_string())
        .collect();
    let model = fixture("llama");
    let args = |extra: &[&str]| {
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            model.to_str().unwrap().into(),
            "--ranks".into(),
            "2".into(),
            "--input-ids".into(),
            prompt.join(","),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let out = run(&args(&[
        "--max-new-tokens",
        "10",
        "--json",
        "--logprobs",
        "--top-logprobs",
        "5",
    ]));
    assert_success(&out);
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(json["generated_ids"], case["sequences"][0]);
    let got: Vec<parallelformers::TokenLogprobs> = json["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| parallelformers::TokenLogprobs {
            token: entry["token"].as_u64().unwrap() as u32,
            logprob: entry["logprob"].as_f64().unwrap() as f32,
            top_logprobs: entry["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["token"].as_u64().unwrap() as u32,
                        t["logprob"].as_f64().unwrap() as f32,
                    )
                })
                .collect(),
        })
        .collect();
    let difference = common::logprob_difference(&got, &case["logprobs"][0], "generate --json");
    assert!(difference < 1e-4, "{difference}");
    for (extra, needle) in [
        (
            &["--json", "--logprobs", "--top-logprobs", "21"][..],
            "top_logprobs (--top-logprobs) must be at most 20, got 21",
        ),
        (
            &["--json", "--top-logprobs", "2"][..],
            "top_logprobs (--top-logprobs) 2 needs logprobs (--logprobs)",
        ),
        (&["--logprobs"][..], "--json"),
    ] {
        let out = run(&args(extra));
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(stderr(&out).contains(needle), "{extra:?}: {}", stderr(&out));
    }
}

#[test]
fn generate_from_a_text_prompt_returns_text_from_the_tokenizer() {
    let model = fixture("gpt2");
    let one = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--max-new-tokens",
        "8",
        "--json",
        "the model",
    ]);
    let two = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--ranks",
        "2",
        "--max-new-tokens",
        "8",
        "--json",
        "the model",
    ]);
    assert_success(&one);
    assert_success(&two);
    let json: serde_json::Value = serde_json::from_str(stdout(&one).trim()).unwrap();
    assert!(json["text"].is_string());
    assert!(!json["generated_ids"].as_array().unwrap().is_empty());
    assert_eq!(
        stdout(&one),
        stdout(&two),
        "1 and 2 ranks generate the same"
    );
}

#[test]
fn verbose_detail_prints_every_ranks_memory() {
    let model = fixture("llama").to_string_lossy().into_owned();
    // Without --ranks: every command's default, 2.
    let generate = |level: &str| {
        let out = run(&[
            "generate",
            "--model",
            &model,
            "--max-new-tokens",
            "2",
            "--input-ids",
            "1,2,3",
            "--verbose",
            level,
        ]);
        assert_success(&out);
        stderr(&out)
    };
    let detail = generate("detail");
    for needle in [
        "rank 0",
        "rank 1",
        "weights sliced",
        "weights replicated",
        "kv cache",
        "peak resident",
    ] {
        assert!(detail.contains(needle), "missing `{needle}` in:\n{detail}");
    }
    let simple = generate("simple");
    assert_eq!(simple.lines().filter(|l| l.starts_with("rank ")).count(), 2);
}

#[test]
fn verbose_detail_names_the_experts_each_rank_holds() {
    let model = fixture("qwen3_moe").to_string_lossy().into_owned();
    let out = run(&[
        "generate",
        "--model",
        &model,
        "--ranks",
        "3",
        "--expert-split",
        "expert",
        "--max-new-tokens",
        "2",
        "--input-ids",
        "1,2,3",
        "--verbose",
        "detail",
    ]);
    assert_success(&out);
    let detail = stderr(&out);
    for held in ["experts 0-2 of 8", "experts 3-5 of 8", "experts 6-7 of 8"] {
        assert!(detail.contains(held), "missing `{held}` in:\n{detail}");
    }
    assert_eq!(detail.matches("weights of experts").count(), 3, "{detail}");
    // A value clap does not know is named with the ones it does.
    let bad = run(&["inspect", "--model", &model, "--expert-split", "experts"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("possible values: tensor, expert"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn inspect_prints_the_plan_and_memory_per_rank_without_loading() {
    let model = fixture("smollm_like");
    // Without --ranks: every command's default, 2.
    let out = run(&["inspect", "--model", model.to_str().unwrap()]);
    assert_success(&out);
    let text = stdout(&out);
    assert!(
        text.lines().next().unwrap().contains(", 2 ranks,"),
        "{text}"
    );
    assert!(text.contains("heads [5, 4], kv heads [2, 2]"), "{text}");
    assert!(text.contains("column(kvheads)"), "{text}");
    assert!(
        text.contains("rank 0: weights") && text.contains("rank 1: weights"),
        "{text}"
    );
}

#[test]
fn bench_json_reports_prefill_decode_and_peak_memory_per_rank() {
    let model = fixture("llama");
    let out = run(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--ranks",
        "2",
        "--prompt-len",
        "16",
        "--new-tokens",
        "8",
        "--repeats",
        "1",
        "--json",
    ]);
    assert_success(&out);
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert!(json["prefill_ms"].as_f64().unwrap() > 0.0);
    assert!(json["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    let peaks = json["peak_memory_bytes"].as_array().unwrap();
    assert_eq!(peaks.len(), 2);
    assert!(peaks.iter().all(|p| p.as_u64().unwrap() > 0));
}

/// A mixture of experts' decode reads its active parameters only: the bytes `bench` counts per
/// token are the model's less the experts a token is not routed to, whichever way the experts
/// are split; `--batch` decodes several sequences together.
#[test]
fn bench_counts_the_active_parameters_of_a_mixture_of_experts() {
    let model = fixture("qwen3_moe");
    let bench = |split: &str, batch: &str| {
        let out = run(&[
            "bench",
            "--model",
            model.to_str().unwrap(),
            "--ranks",
            "2",
            "--expert-split",
            split,
            "--batch",
            batch,
            "--prompt-len",
            "8",
            "--new-tokens",
            "4",
            "--repeats",
            "1",
            "--json",
        ]);
        assert_success(&out);
        serde_json::from_str::<serde_json::Value>(stdout(&out).trim()).unwrap()
    };
    let (tensor, whole) = (bench("tensor", "1"), bench("expert", "3"));
    // The fixture (f32, tied embeddings): 2 sparse layers of 8 experts, 3 projections of
    // 64 × 24 each, 2 routed per token; every other weight is read at each step.
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    let stored: usize = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .tensors()
        .iter()
        .map(|(_, view)| view.data().len())
        .sum();
    let experts = 2 * 8 * 3 * 64 * 24 * 4;
    let unread = experts - experts * 2 / 8;
    let active = tensor["weight_bytes_per_token"].as_u64().unwrap() as usize;
    // Each of 2 ranks holds the vocabulary-split embedding's half and the replicated norms: the
    // ranks together hold a few norm vectors more than the file (2 × 64 f32s each).
    assert!(
        active >= stored - unread && active - (stored - unread) < 8 * 1024,
        "{active} vs {stored} - {unread}"
    );
    assert_eq!(
        whole["weight_bytes_per_token"],
        tensor["weight_bytes_per_token"]
    );
    assert_eq!(whole["batch"], 3);
    let (tokens, steps) = (&whole["decode_tokens_per_s"], &whole["decode_steps_per_s"]);
    assert!((tokens.as_f64().unwrap() - 3.0 * steps.as_f64().unwrap()).abs() < 1e-6);
}

/// Runs the CLI with the reading end of its standard output closed before it writes anything
/// (as `| head -0`, or a `head` that has read its lines), and asserts that none of its
/// processes outlive it.
fn run_with_stdout_closed(args: &[&str]) -> Output {
    let tag = unique_tag();
    let mut child = Command::new(binary())
        .args(args)
        .env("PARALLELFORMERS_TEST_TAG", &tag)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run the parallelformers binary");
    drop(child.stdout.take());
    let out = child
        .wait_with_output()
        .expect("the command did not finish");
    assert_no_processes_tagged(&tag);
    out
}

/// Asserts that a command whose output was closed ended quietly, as `head` users expect.
fn assert_quiet_end_of_output(out: &Output) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    for needle in ["panicked", "Broken pipe", "error"] {
        assert!(!err.contains(needle), "`{needle}` in:\n{err}");
    }
}

#[test]
fn inspect_into_a_closed_pipe_ends_quietly() {
    let model = fixture("smollm_like");
    let out = run_with_stdout_closed(&["inspect", "--model", model.to_str().unwrap()]);
    assert_quiet_end_of_output(&out);
}

#[test]
fn generate_into_a_closed_pipe_ends_quietly_and_stops_its_ranks() {
    let model = fixture("gpt2");
    let model = model.to_str().unwrap();
    let streamed = [
        "--max-new-tokens",
        "40",
        "--min-new-tokens",
        "40",
        "the model",
    ];
    for extra in [&streamed[..], &["--json", "the model"]] {
        let mut args = vec!["generate", "--model", model, "--ranks", "2"];
        args.extend(extra);
        assert_quiet_end_of_output(&run_with_stdout_closed(&args));
    }
}

/// The tiny GGUF model, which has a tokenizer and a chat template.
fn chat_model() -> String {
    fixture("gguf")
        .join("tiny_llama_q8_0.gguf")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn interactive_chat_skips_empty_lines_and_ends_on_a_new_line_at_end_of_input() {
    let model = chat_model();
    let args = ["chat", "--model", &model, "--max-new-tokens", "4"];
    let out = run_with_stdin(&args, "\n   \n");
    assert_success(&out);
    assert_eq!(stdout(&out), "", "empty lines are not sent to the model");
    let err = stderr(&out);
    assert!(err.ends_with("> > > \n"), "{err:?}");
}

#[test]
fn chat_into_a_closed_pipe_ends_quietly() {
    let model = chat_model();
    let out = run_with_stdout_closed(&["chat", "--model", &model, "--max-new-tokens", "4", "hi"]);
    assert_quiet_end_of_output(&out);
}
