//! GGUF checkpoints: a tiny llama-architecture file (q/k rows permuted as llama.cpp stores them,
//! Q8_0 and F16 tensors) against transformers' outputs for the same file, inspection, Hub ids
//! from the Hugging Face cache, and broken files.

mod common;

use std::path::{Path, PathBuf};

use common::{
    assert_greedy_continuation, fixture, masked_max_diff, options, read_tensors, reference_batch,
    run, run_with_env,
};
use parallelformers::{parallelize, WeightDType};

fn tiny_gguf() -> PathBuf {
    fixture("gguf").join("tiny_llama_q8_0.gguf")
}

/// Runs the tiny Q8_0 checkpoint's reference batch and greedy continuation at ranks 1–3 with
/// weights in `dtype` and compares them with transformers'.
fn check_tiny_gguf(dtype: WeightDType) {
    let refs = read_tensors(&fixture("gguf").join("tiny_llama_q8_0_reference.safetensors"));
    let mask = &refs["attention_mask"];
    for ranks in 1..=3 {
        let mut opts = options(ranks);
        opts.dtype = dtype;
        let mut model = parallelize(tiny_gguf(), opts).unwrap();
        let out = model.forward(&reference_batch(&refs)).unwrap();
        let diff = masked_max_diff(&out.data, &refs["logits"], mask);
        assert!(
            diff < 1e-4,
            "{ranks} ranks in {dtype:?} differ from transformers by {diff}"
        );
        assert_greedy_continuation(&mut model, &refs, &format!("{ranks} ranks in {dtype:?}"));
    }
}

#[test]
fn a_quantized_gguf_matches_transformers_at_one_two_and_three_ranks() {
    check_tiny_gguf(WeightDType::F32);
}

#[test]
fn a_gguf_kept_quantized_in_memory_matches_transformers_too() {
    check_tiny_gguf(WeightDType::Quantized);
}

#[test]
fn inspect_reads_a_gguf_plan_without_loading() {
    let gguf = tiny_gguf();
    let out = run(&["inspect", "--model", gguf.to_str().unwrap(), "--ranks", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("heads [3, 3, 3], kv heads [1, 1, 1]"),
        "{text}"
    );
    assert!(
        text.contains("model.layers.1.mlp.down_proj.weight"),
        "{text}"
    );
}

#[test]
fn chat_uses_the_gguf_tokenizer_and_template() {
    let gguf = tiny_gguf();
    let out = run(&[
        "chat",
        "--model",
        gguf.to_str().unwrap(),
        "--max-new-tokens",
        "4",
        "Say hi.",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A copy of the tiny GGUF with the first occurrence of `from` replaced by `to` (same length).
fn patched(from: &[u8], to: &[u8]) -> (tempfile::TempDir, PathBuf) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(tiny_gguf()).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern not in the fixture");
    bytes[at..at + to.len()].copy_from_slice(to);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn expect_failure(args: &[&str], needles: &[&str]) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure for {args:?}");
    for needle in needles {
        assert!(err.contains(needle), "expected `{needle}` in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn an_unsupported_architecture_is_named_with_the_file() {
    let mut from = b"general.architecture".to_vec();
    from.extend_from_slice(&[8, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
    from.extend_from_slice(b"llama");
    let mut to = from.clone();
    let n = to.len();
    to[n - 5..].copy_from_slice(b"gpt99");
    let (_dir, path) = patched(&from, &to);
    let path = path.to_str().unwrap();
    expect_failure(
        &["generate", "--model", path, "--input-ids", "1,2"],
        &["general.architecture `gpt99`", path],
    );
}

#[test]
fn a_truncated_gguf_is_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    let bytes = std::fs::read(tiny_gguf()).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let path = path.to_str().unwrap();
    expect_failure(
        &[
            "generate",
            "--model",
            path,
            "--ranks",
            "2",
            "--input-ids",
            "1,2",
        ],
        &[path],
    );
}

#[test]
fn chat_without_a_tokenizer_says_so() {
    let (_dir, path) = patched(b"tokenizer.ggml.tokens", b"tokenizer.ggml.tokenz");
    expect_failure(
        &["chat", "--model", path.to_str().unwrap(), "hi"],
        &["no tokenizer"],
    );
}

#[test]
fn a_chat_template_that_does_not_compile_is_named() {
    let (_dir, path) = patched(
        b"{% for message in messages %}",
        b"{% for message in messages }}",
    );
    expect_failure(
        &["chat", "--model", path.to_str().unwrap(), "hi"],
        &["tokenizer.chat_template"],
    );
}

/// Lays out `source`'s files as the Hugging Face cache does for `models--org--name`.
fn fake_hub_cache(home: &Path, repo: &str, source: &Path) {
    let root = home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = root.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs").join("main"), "0123abcd").unwrap();
    for entry in std::fs::read_dir(source).unwrap().flatten() {
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
}

#[test]
fn a_hub_id_resolves_offline_from_the_hugging_face_cache() {
    let home = tempfile::tempdir().unwrap();
    fake_hub_cache(home.path(), "tiny-org/tiny-gpt2", &fixture("gpt2"));
    let offline = Path::new("1");
    let envs = [("HF_HOME", home.path()), ("HF_HUB_OFFLINE", offline)];
    let args = [
        "generate",
        "--model",
        "tiny-org/tiny-gpt2",
        "--max-new-tokens",
        "5",
        "--input-ids",
        "3,4",
        "--json",
    ];
    let out = run_with_env(&args, &envs);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let local = run(&[
        "generate",
        "--model",
        fixture("gpt2").to_str().unwrap(),
        "--max-new-tokens",
        "5",
        "--input-ids",
        "3,4",
        "--json",
    ]);
    assert_eq!(out.stdout, local.stdout);
    let missing = run_with_env(
        &["generate", "--model", "tiny-org/absent", "--input-ids", "1"],
        &envs,
    );
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not in the Hugging Face cache"));
}

#[test]
fn an_unsupported_quantization_type_is_named_with_the_tensor() {
    // The tensor-info entry of blk.0.ffn_down.weight: name, 2 dims (96, 72), type 8 (Q8_0).
    let name = b"blk.0.ffn_down.weight";
    let mut from = (name.len() as u64).to_le_bytes().to_vec();
    from.extend_from_slice(name);
    from.extend_from_slice(&2u32.to_le_bytes());
    from.extend_from_slice(&96u64.to_le_bytes());
    from.extend_from_slice(&72u64.to_le_bytes());
    let mut to = from.clone();
    from.extend_from_slice(&8u32.to_le_bytes());
    // IQ2_XXS (16): a known ggml type that cannot be decoded.
    to.extend_from_slice(&16u32.to_le_bytes());
    let (_dir, path) = patched(&from, &to);
    expect_failure(
        &[
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--ranks",
            "2",
            "--input-ids",
            "1,2",
        ],
        &["blk.0.ffn_down.weight"],
    );
}
