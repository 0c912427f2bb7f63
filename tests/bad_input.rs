//! Bad input: a clear error naming the problem, a non-zero exit, and nothing left behind.

mod common;

use std::path::Path;
use std::process::Command;

use common::{binary, copy_fixture, fixture, forward_args, run, shm_segments};

/// Runs the CLI, expects failure with `needle` in the message, and no leftovers.
fn expect_failure<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S], needle: &str) {
    let before = shm_segments();
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert!(
        err.contains(needle),
        "expected `{needle}` in the error, got:\n{err}"
    );
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    assert_eq!(shm_segments(), before, "shared-memory segments left behind");
}

/// Like [`expect_failure`], with the ranks' shared memory asked for in a folder that does not
/// exist: starting any rank would fail with another message, so finding `needle` shows that the
/// arguments were refused before any rank started.
fn expect_refused_before_starting(args: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent");
    let mut args: Vec<&str> = args.to_vec();
    args.extend(["--comm-dir", absent.to_str().unwrap()]);
    expect_failure(&args, needle);
}

fn expect_generate_failure(model: &Path, ranks: &str, needle: &str) {
    let model = model.to_string_lossy();
    let args = [
        "generate",
        "--model",
        &model,
        "--ranks",
        ranks,
        "--max-new-tokens",
        "2",
        "--input-ids",
        "1,2",
    ];
    expect_failure(&args, needle);
}

#[test]
fn missing_config_is_named() {
    let dir = copy_fixture("llama");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    expect_generate_failure(dir.path(), "2", "config.json");
}

#[test]
fn missing_weights_are_named() {
    let dir = copy_fixture("gpt2");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    expect_generate_failure(dir.path(), "2", "no model.safetensors");
}

#[test]
fn unreadable_shard_is_named() {
    let dir = copy_fixture("llama");
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    expect_generate_failure(dir.path(), "2", "model-00002-of-00003.safetensors");
}

#[test]
fn unknown_model_type_is_named() {
    let dir = copy_fixture("gpt2");
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"gpt2\"", "\"mamba\""),
    )
    .unwrap();
    expect_generate_failure(dir.path(), "2", "model_type `mamba` is not supported");
    // `inspect` names the family and points to policy files.
    let inspect = Command::new(binary())
        .args(["inspect", "--model"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&inspect.stderr);
    assert_eq!(inspect.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`mamba`") && stderr.contains("--policy"),
        "{stderr}"
    );
}

#[test]
fn truncated_safetensors_is_named() {
    let dir = copy_fixture("gpt2");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    expect_generate_failure(dir.path(), "2", "truncated");
}

/// Rewrites one tensor's header entry of a single-file checkpoint, keeping the data layout.
fn rewrite_header(path: &Path, tensor: &str, edit: impl Fn(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    edit(&mut header[tensor]);
    let mut text = serde_json::to_vec(&header).unwrap();
    assert!(text.len() <= len, "edited header must not grow");
    text.resize(len, b' ');
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + len..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn tensor_with_the_wrong_shape_is_named() {
    let dir = copy_fixture("gpt2");
    // [64, 192] -> [192, 64]: same size, wrong shape.
    rewrite_header(
        &dir.path().join("model.safetensors"),
        "transformer.h.0.attn.c_attn.weight",
        |entry| {
            entry["shape"] = serde_json::json!([192, 64]);
        },
    );
    expect_generate_failure(
        dir.path(),
        "2",
        "transformer.h.0.attn.c_attn.weight` has shape [192, 64]",
    );
}

#[test]
fn tensor_with_the_wrong_dtype_is_named() {
    let dir = copy_fixture("gpt2");
    // F32 [64] -> I32 [64]: same size, not a float.
    rewrite_header(
        &dir.path().join("model.safetensors"),
        "transformer.ln_f.weight",
        |entry| {
            entry["dtype"] = serde_json::json!("I32");
        },
    );
    expect_generate_failure(dir.path(), "1", "transformer.ln_f.weight` has dtype I32");
}

#[test]
fn an_absent_comm_dir_fails_the_start_of_the_ranks() {
    // What `expect_refused_before_starting` relies on: good arguments get as far as starting
    // the ranks, and fail there.
    let model = fixture("llama");
    expect_refused_before_starting(&generate_args(&model, &["--input-ids", "1,2"]), "absent");
}

#[test]
fn too_many_ranks_is_refused_before_starting_anything() {
    let (smollm, llama) = (fixture("smollm_like"), fixture("llama"));
    for (model, ranks, needle) in [
        (&smollm, "10", "9 attention heads"),
        (&llama, "0", "at least one rank"),
    ] {
        let args = generate_args(model, &["--ranks", ranks, "--input-ids", "1,2"]);
        expect_refused_before_starting(&args, needle);
    }
}

/// `generate` on `model` with `extra` arguments.
fn generate_args<'a>(model: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["generate", "--model", model.to_str().unwrap()];
    args.extend(extra);
    args
}

#[test]
fn bad_generate_arguments_are_named_before_any_rank_starts() {
    let (llama, gpt2, bert) = (fixture("llama"), fixture("gpt2"), fixture("bert"));
    for (model, extra, needle) in [
        (
            &gpt2,
            &["--top-p", "2", "hi"][..],
            "top_p must be in (0, 1], got 2",
        ),
        (
            &gpt2,
            &["--max-new-tokens", "0", "hi"],
            "invalid value '0' for '--max-new-tokens",
        ),
        (&gpt2, &[""], "the PROMPT is empty"),
        (
            &gpt2,
            &["--max-new-tokens", "100", "hi"],
            "max_new_tokens 100 exceeds the model's context of 64",
        ),
        (
            &gpt2,
            &["--min-new-tokens", "5", "--max-new-tokens", "2", "hi"],
            "min_new_tokens (5) exceeds max_new_tokens (2)",
        ),
        (&gpt2, &["--num-beams", "0", "hi"], "num_beams (0)"),
        (
            &gpt2,
            &["--eos-token-id", "300", "hi"],
            "eos_token_id 300 is outside the vocabulary of 300",
        ),
        (
            &gpt2,
            &["--threads", "0", "hi"],
            "invalid value '0' for '--threads",
        ),
        (&llama, &["--input-ids", ""], "--input-ids"),
        (
            &llama,
            &["--input-ids", "5,103"],
            "token id 103 is outside the vocabulary of 103 tokens",
        ),
        (
            &llama,
            &["--stop", "x", "--input-ids", "5"],
            "has no tokenizer: --stop needs one",
        ),
        (
            &bert,
            &["--input-ids", "5"],
            "is an encoder and cannot generate text",
        ),
    ] {
        expect_refused_before_starting(&generate_args(model, extra), needle);
    }
}

#[test]
fn bad_chat_and_bench_arguments_are_named_before_any_rank_starts() {
    let gguf = fixture("gguf").join("tiny_llama_q8_0.gguf");
    let (gguf, llama) = (gguf.to_str().unwrap(), fixture("llama"));
    let llama = llama.to_str().unwrap();
    for (args, needle) in [
        (&["chat", "--model", gguf, ""][..], "the PROMPT is empty"),
        (&["chat", "--model", gguf, " \n"], "the PROMPT is empty"),
        (
            &["chat", "--model", gguf, "--top-p", "2", "hi"],
            "top_p must be in (0, 1], got 2",
        ),
        (
            &["chat", "--model", gguf, "--max-new-tokens", "0"],
            "invalid value '0' for '--max-new-tokens",
        ),
        (
            &["bench", "--model", llama, "--prompt-len", "0"],
            "--prompt-len must be at least 1, got 0",
        ),
        (
            &["bench", "--model", llama, "--new-tokens", "1"],
            "--new-tokens must be at least 2, got 1",
        ),
        (
            &["bench", "--model", llama, "--prompt-len", "5000"],
            "cannot bench --prompt-len 5000 --new-tokens 64",
        ),
    ] {
        expect_refused_before_starting(args, needle);
    }
}

#[test]
fn bad_prefill_and_loadtest_arguments_are_named() {
    let llama = fixture("llama");
    let llama = llama.to_str().unwrap();
    for (args, needle) in [
        (
            &["serve", "--model", llama, "--prefill-chunk-tokens", "0"][..],
            "invalid value '0' for '--prefill-chunk-tokens",
        ),
        (
            &["serve", "--model", llama, "--prefill-chunk-tokens", "fast"][..],
            "expected `auto` or a number of tokens, got `fast`",
        ),
        (
            &["serve", "--model", llama, "--prefix-cache-mb=-1"],
            "invalid value '-1' for '--prefix-cache-mb",
        ),
        (
            &["chat", "--model", llama, "--prefix-cache-mb", "lots", "hi"],
            "invalid value 'lots' for '--prefix-cache-mb",
        ),
    ] {
        expect_refused_before_starting(args, needle);
    }
    for (args, needle) in [
        (
            &[
                "loadtest",
                "--url",
                "http://127.0.0.1:9",
                "--scenario",
                "burst",
            ][..],
            "invalid value 'burst' for '--scenario",
        ),
        (
            &["loadtest", "--url", "http://127.0.0.1:9", "--turns", "0"],
            "invalid value '0' for '--turns",
        ),
    ] {
        expect_failure(args, needle);
    }
}

#[test]
fn malformed_inputs_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("llama");
    let out = dir.path().join("out.safetensors");
    let forward = |inputs: &Path, needle: &str| {
        let args = forward_args(&model, "2", inputs, &out);
        expect_refused_before_starting(&args.iter().map(String::as_str).collect::<Vec<_>>(), needle)
    };
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").unwrap();
    forward(&garbage, "is not a valid safetensors file");
    forward(
        &dir.path().join("absent.safetensors"),
        "cannot read --inputs",
    );
    // A valid file without input_ids.
    let no_ids = dir.path().join("no_ids.safetensors");
    let data = [0u8; 8];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, 1], &data).unwrap();
    safetensors::serialize_to_file([("attention_mask", view)], None, &no_ids).unwrap();
    forward(&no_ids, "has no `input_ids` tensor");
    // input_ids of the wrong dtype.
    let float_ids = dir.path().join("float_ids.safetensors");
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 2], &data).unwrap();
    safetensors::serialize_to_file([("input_ids", view)], None, &float_ids).unwrap();
    forward(&float_ids, "`input_ids` must be I64");
    // Ids outside the vocabulary of 103 tokens.
    let far_ids = dir.path().join("far_ids.safetensors");
    let data: Vec<u8> = [5i64, 103].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, 2], &data).unwrap();
    safetensors::serialize_to_file([("input_ids", view)], None, &far_ids).unwrap();
    forward(
        &far_ids,
        "token id 103 is outside the vocabulary of 103 tokens",
    );
    // An output in a folder that does not exist.
    let good = model.join("reference.safetensors");
    let nowhere = dir.path().join("absent").join("out.safetensors");
    let args = forward_args(&model, "2", &good, &nowhere);
    expect_refused_before_starting(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "cannot write --output",
    );
}
