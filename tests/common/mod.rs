//! Shared test harness: fixtures, their transformers references, running the CLI, and checks
//! that no worker process or shared-memory segment outlives a run.

#![allow(dead_code)]

pub mod server;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use parallelformers::Options;
use safetensors::{Dtype, SafeTensors};

/// Says, where a person running `cargo test` sees it, that `test` did not run and why, and what
/// would make it run: a line on standard error written past the test harness's capture (which
/// only takes `eprintln!`). When `required` names an environment variable (set by `.ci/run`
/// where the test can run) whose value is `1`, a skip is a failure instead.
pub fn skip(test: &str, why: &str, required: Option<&str>) {
    use std::io::Write;
    if let Some(required) = required {
        assert!(
            std::env::var(required).as_deref() != Ok("1"),
            "{test} cannot run: {why} (and {required}=1 requires it)"
        );
    }
    let line = format!("\nskipped: {test}: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// A value from process `pid`'s environment (a rank's rendezvous socket path, for one).
pub fn process_env(pid: u32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ
        .split(|&b| b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .find_map(|entry| entry.strip_prefix(&format!("{name}=")).map(str::to_string))
}

/// The directory of fixture `name`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The built `parallelformers` binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_parallelformers"))
}

/// Library options that start ranks from the built binary.
pub fn options(ranks: usize) -> Options {
    Options {
        ranks,
        threads_per_rank: Some(1),
        worker_program: Some(binary()),
        ..Options::default()
    }
}

/// A tensor from a reference file, widened to f64 for comparisons.
#[derive(Debug, Clone)]
pub struct RefTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values.
    pub values: Vec<f64>,
}

impl RefTensor {
    /// The values as token ids.
    pub fn ids(&self) -> Vec<u32> {
        self.values.iter().map(|&v| v as u32).collect()
    }
}

/// Every tensor of a safetensors file.
pub fn read_tensors(path: &Path) -> HashMap<String, RefTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("unexpected dtype {other:?} in {}", path.display()),
            };
            (
                name,
                RefTensor {
                    shape: view.shape().to_vec(),
                    values,
                },
            )
        })
        .collect()
}

/// The transformers reference outputs of fixture `name`.
pub fn reference(name: &str) -> HashMap<String, RefTensor> {
    read_tensors(&fixture(name).join("reference.safetensors"))
}

/// The padded reference batch (`input_ids`, `attention_mask`, and an encoder–decoder's
/// `decoder_input_ids`) of a reference file.
pub fn reference_batch(refs: &HashMap<String, RefTensor>) -> parallelformers::ForwardInput {
    let (ids, mask) = (&refs["input_ids"], &refs["attention_mask"]);
    parallelformers::ForwardInput {
        input_ids: ids.ids(),
        batch: ids.shape[0],
        seq_len: ids.shape[1],
        attention_mask: Some(mask.ids()),
        decoder_input_ids: refs.get("decoder_input_ids").map(RefTensor::ids),
    }
}

/// The name and value of a reference file's output (`logits`, or an encoder's
/// `last_hidden_state`), and the mask of its positions to compare: the attention mask, or for an
/// encoder–decoder, whose logits are the decoder's and whose decoder input is never padded,
/// every position.
pub fn reference_output(
    refs: &HashMap<String, RefTensor>,
) -> (&'static str, &RefTensor, RefTensor) {
    let name = match refs.contains_key("logits") {
        true => "logits",
        false => "last_hidden_state",
    };
    let mask = match refs.get("decoder_input_ids") {
        Some(decoder) => RefTensor {
            shape: decoder.shape.clone(),
            values: vec![1.0; decoder.values.len()],
        },
        None => refs["attention_mask"].clone(),
    };
    (name, &refs[name], mask)
}

/// Largest absolute difference between `actual` and `expected` `[B, L, D]` over positions
/// whose attention mask is 1.
/// Checks that `model` continues the reference's `generate_input_ids` with its
/// `generate_output_ids`: 12 greedy tokens, end-of-sequence disabled.
pub fn assert_greedy_continuation(
    model: &mut parallelformers::ParallelModel,
    refs: &HashMap<String, RefTensor>,
    label: &str,
) {
    let params = parallelformers::GenerationConfig {
        max_new_tokens: 12,
        eos_token_id: Some(vec![]),
        ..parallelformers::GenerationConfig::default()
    };
    let generated = model
        .generate(&refs["generate_input_ids"].ids(), &params)
        .unwrap();
    assert_eq!(generated.ids, refs["generate_output_ids"].ids(), "{label}");
}

pub fn masked_max_diff(actual: &[f32], expected: &RefTensor, mask: &RefTensor) -> f64 {
    assert_eq!(
        actual.len(),
        expected.values.len(),
        "output size differs from the reference"
    );
    let width = expected.shape[2];
    let mut worst = 0f64;
    for (pos, &m) in mask.values.iter().enumerate() {
        if m == 0.0 {
            continue;
        }
        for d in 0..width {
            let i = pos * width + d;
            worst = worst.max((actual[i] as f64 - expected.values[i]).abs());
        }
    }
    worst
}

/// A unique tag put into the environment of a command, inherited by its workers, so that a
/// test can find every process the command started.
pub fn unique_tag() -> String {
    format!("pf-test-{}-{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Runs the CLI with `args` and extra environment `envs`, tagging its processes with `tag`.
pub fn run_tagged<S: AsRef<std::ffi::OsStr>>(
    tag: &str,
    args: &[S],
    envs: &[(&str, &Path)],
) -> Output {
    let mut command = Command::new(binary());
    command.args(args).env("PARALLELFORMERS_TEST_TAG", tag);
    for (key, value) in envs {
        command.env(key, value);
    }
    command
        .output()
        .expect("cannot run the parallelformers binary")
}

/// Runs the CLI with extra environment variables and asserts that none of its processes
/// outlive it.
pub fn run_with_env<S: AsRef<std::ffi::OsStr>>(args: &[S], envs: &[(&str, &Path)]) -> Output {
    let tag = unique_tag();
    let out = run_tagged(&tag, args, envs);
    assert_no_processes_tagged(&tag);
    out
}

/// The arguments of `generate --json` on fixture `name` from its reference prompt's ids.
pub fn generate_reference_args(name: &str) -> Vec<String> {
    let prompt: Vec<String> = reference(name)["generate_input_ids"]
        .ids()
        .iter()
        .map(u32::to_string)
        .collect();
    vec![
        "generate".into(),
        "--model".into(),
        fixture(name).to_string_lossy().into_owned(),
        "--input-ids".into(),
        prompt.join(","),
        "--json".into(),
    ]
}

/// The arguments of `forward` over `model` with `ranks`, from `inputs` to `output`.
pub fn forward_args(model: &Path, ranks: &str, inputs: &Path, output: &Path) -> Vec<String> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    vec![
        "forward".into(),
        "--model".into(),
        path(model),
        "--ranks".into(),
        ranks.into(),
        "--inputs".into(),
        path(inputs),
        "--output".into(),
        path(output),
    ]
}

/// Runs the CLI with `input` on its standard input.
pub fn run_with_stdin(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let tag = unique_tag();
    let mut child = Command::new(binary())
        .args(args)
        .env("PARALLELFORMERS_TEST_TAG", &tag)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot run the parallelformers binary");
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .expect("cannot write to the command");
    }
    let out = child
        .wait_with_output()
        .expect("the command did not finish");
    assert_no_processes_tagged(&tag);
    out
}

/// Runs the CLI and asserts that none of its processes outlive it.
pub fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    run_with_env(args, &[])
}

/// Pids of live processes whose environment contains `PARALLELFORMERS_TEST_TAG=tag`.
pub fn processes_tagged(tag: &str) -> Vec<u32> {
    let needle = format!("PARALLELFORMERS_TEST_TAG={tag}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            environ.split(|&b| b == 0).any(|kv| kv == needle.as_bytes())
        })
        .collect()
}

/// Asserts that no process carrying `tag` exists.
pub fn assert_no_processes_tagged(tag: &str) {
    let left = processes_tagged(tag);
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

/// Asserts that none of `pids` exists any more (not even as a zombie).
pub fn assert_all_gone(pids: &[u32]) {
    for &pid in pids {
        assert!(
            !process_exists(pid),
            "worker {pid} is still there (running or zombie)"
        );
    }
}

/// Whether process `pid` still exists (a zombie counts).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Shared-memory objects of ours in `/dev/shm` (the communicator uses anonymous memfds, so
/// there must never be any).
pub fn shm_segments() -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n.contains("parallelformers"))
                .collect()
        })
        .unwrap_or_default()
}

/// Descriptors of this process that point at a communicator region.
pub fn open_comm_regions() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|target| target.to_string_lossy().contains("parallelformers"))
                .count()
        })
        .unwrap_or(0)
}

/// A fresh temporary copy of fixture `name` to break on purpose.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap().flatten() {
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// The largest difference between the log-probabilities `got` of one sequence and those
/// transformers recorded for it (`want`: tests/fixtures/generation/scores.json's entries
/// `{"token", "logprob", "top_logprobs": [[id, logprob], ...]}`), after checking that the
/// tokens and the most likely tokens of each step are the same; `what` names the sequence.
pub fn logprob_difference(
    got: &[parallelformers::TokenLogprobs],
    want: &serde_json::Value,
    what: &str,
) -> f64 {
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: one entry per new token");
    let mut largest = 0f64;
    for (step, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.token as u64,
            w["token"].as_u64().unwrap(),
            "{what}, step {step}"
        );
        let mut pairs = vec![(g.logprob, w["logprob"].as_f64().unwrap())];
        let top = w["top_logprobs"].as_array().unwrap();
        assert_eq!(g.top_logprobs.len(), top.len(), "{what}, step {step}");
        for (&(id, logprob), pair) in g.top_logprobs.iter().zip(top) {
            assert_eq!(id as u64, pair[0].as_u64().unwrap(), "{what}, step {step}");
            pairs.push((logprob, pair[1].as_f64().unwrap()));
        }
        for (g, w) in pairs {
            largest = largest.max((g as f64 - w).abs());
        }
    }
    largest
}
