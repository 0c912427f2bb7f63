//! Replays the minimized fuzz corpora of `tests/fixtures/fuzz/<target>/` (and the crash
//! reproducers kept there, `crash-*`) through the fuzz harness itself (`fuzz/src/lib.rs`): every
//! input must be accepted or refused with an error, never panic or break an invariant.
//!
//! `write_ipc_seeds` (ignored) writes the `ipc_frames` seed corpus into `fuzz/corpus/`; see
//! `fuzz/README.md`.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz")
        .join(target)
}

/// Runs every file of `target`'s corpus; fails naming each file that panicked.
fn replay(target: &str) {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no corpus", dir.display());
    let mut failures = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for file in &files {
        let data = std::fs::read(file).expect("corpus file");
        match catch_unwind(AssertUnwindSafe(|| harness::run_target(target, &data))) {
            Ok(Some(Ok(()))) => accepted += 1,
            Ok(Some(Err(message))) => {
                assert!(
                    !message.trim().is_empty(),
                    "{}: empty error",
                    file.display()
                );
                refused += 1;
            }
            Ok(None) => panic!("unknown fuzz target `{target}`"),
            Err(_) => failures.push(file.display().to_string()),
        }
    }
    eprintln!(
        "{target}: {} inputs, {accepted} accepted, {refused} refused",
        files.len()
    );
    assert!(failures.is_empty(), "{target}: panicked on {failures:#?}");
}

#[test]
fn safetensors_header_corpus_replays_without_panicking() {
    replay("safetensors_header");
}

#[test]
fn safetensors_index_corpus_replays_without_panicking() {
    replay("safetensors_index");
}

#[test]
fn gguf_reader_corpus_replays_without_panicking() {
    replay("gguf_reader");
}

#[test]
fn ipc_frames_corpus_replays_without_panicking() {
    replay("ipc_frames");
}

#[test]
fn config_json_corpus_replays_without_panicking() {
    replay("config_json");
}

#[test]
fn policy_file_corpus_replays_without_panicking() {
    replay("policy_file");
}

#[test]
fn every_target_has_a_corpus() {
    for target in harness::TARGETS {
        assert!(corpus_dir(target).is_dir(), "no corpus for `{target}`");
    }
}

/// Writes `fuzz/corpus/ipc_frames/`: frames of every request and reply kind, encoded with
/// `write_frame`, each behind a first byte choosing how the harness trickles them in.
#[test]
#[ignore = "writes the ipc_frames seed corpus; run by hand (fuzz/README.md)"]
fn write_ipc_seeds() {
    use parallelformers::checkpoint::config::ModelConfig;
    use parallelformers::checkpoint::source::WeightsLocation;
    use parallelformers::generation::session::{EndReason, SequenceRequest, SessionSummary};
    use parallelformers::parallel::engine::WeightBytes;
    use parallelformers::parallel::ipc::{
        write_frame, ForwardInput, GenerateRequest, GeneratedBatch, LoadSpec, Reply, Request,
        WireTensor,
    };
    use parallelformers::parallel::memory::ExpertsHeld;
    use parallelformers::{GenerationConfig, RankMemory, TokenLogprobs, WeightDType};

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("fuzz/corpus/ipc_frames");
    std::fs::create_dir_all(&out).expect("create the seed directory");
    let config = ModelConfig::from_file(&root.join("tests/fixtures/llama/config.json"))
        .expect("the llama fixture's config");
    let generation = GenerationConfig {
        do_sample: true,
        stop: vec!["\n\n".into()],
        eos_token_id: Some(vec![2]),
        seed: Some(7),
        ..GenerationConfig::default()
    };
    let sequence = SequenceRequest {
        id: 3,
        prompt: vec![1, 5, 9],
        config: generation.clone(),
        eos_token_ids: vec![2],
        seed: 11,
    };
    let memory = RankMemory {
        rank: 1,
        weights: WeightBytes {
            sliced: 1 << 20,
            replicated: 4096,
            experts: 1 << 16,
            routed: 1 << 17,
        },
        kv_cache_bytes: 65536,
        resident_bytes: 1 << 30,
        peak_bytes: 1 << 31,
        experts: Some(ExpertsHeld {
            first: 2,
            count: 3,
            of: 8,
        }),
    };
    let requests = vec![
        (
            "load",
            Request::Load(LoadSpec {
                location: WeightsLocation::Gguf("/models/tiny.gguf".into()),
                config,
                dtype: WeightDType::Quantized,
                policy: None,
                prefill: Default::default(),
            }),
        ),
        (
            "forward",
            Request::Forward(ForwardInput {
                input_ids: vec![1, 2, 3, 4, 5, 0],
                batch: 2,
                seq_len: 3,
                attention_mask: Some(vec![1, 1, 1, 1, 1, 0]),
                decoder_input_ids: Some(vec![2, 7, 2, 8]),
            }),
        ),
        (
            "generate",
            Request::Generate(GenerateRequest {
                prompts: vec![vec![1, 2], vec![3]],
                config: generation,
                eos_token_ids: vec![2, 7],
                pad_token_id: 0,
                seed: 42,
                decoder_start_token_id: None,
            }),
        ),
        ("session", Request::Session(vec![sequence.clone()])),
        ("join", Request::Join(vec![sequence])),
        ("finish", Request::Finish(vec![0, 3])),
        ("end_session", Request::EndSession),
        ("memory", Request::Memory),
        ("shutdown", Request::Shutdown),
    ];
    let replies = vec![
        (
            "hello",
            Reply::Hello {
                rank: 2,
                secret: "0123456789abcdef".into(),
            },
        ),
        (
            "loading",
            Reply::Loading {
                rank: 1,
                done: 4096,
                total: 1 << 40,
            },
        ),
        ("parallelized", Reply::Parallelized(memory)),
        (
            "forward_out",
            Reply::Forward(WireTensor {
                shape: vec![1, 2, 3],
                data: vec![0.5, -1.0, f32::MAX, f32::MIN_POSITIVE, 0.0, -0.0],
            }),
        ),
        ("token", Reply::Token { row: 1, token: 77 }),
        (
            "generated",
            Reply::Generated(GeneratedBatch {
                sequences: vec![vec![4, 5], vec![6]],
                scores: Some(vec![-0.25, -1.5]),
                logprobs: None,
                prefill_seconds: 0.01,
                decode_seconds: 0.2,
                overhead_seconds: 0.003,
                cached_prompt_tokens: 16,
            }),
        ),
        (
            "ended",
            Reply::Ended {
                id: 3,
                reason: EndReason::Failed("no token left".into()),
            },
        ),
        ("idle", Reply::Idle),
        (
            "session_ended",
            Reply::SessionEnded(SessionSummary {
                sequences: vec![(3, vec![9, 9]), (4, vec![])],
                steps: 5,
                prefill_chunks: 3,
                passes_beside_decode: 2,
                cached_prompt_tokens: 32,
                prefill_seconds: 0.1,
                decode_seconds: 0.5,
                overhead_seconds: 0.01,
            }),
        ),
        ("memory_reply", Reply::Memory(memory)),
        ("done", Reply::Done),
        ("error", Reply::Error("rank 1: out of memory".into())),
        (
            "logprobs",
            Reply::Logprobs {
                row: 2,
                logprobs: TokenLogprobs {
                    token: 7,
                    logprob: -0.5,
                    top_logprobs: vec![(7, -0.5), (3, -1.25)],
                },
            },
        ),
    ];
    let mut all = Vec::new();
    for (i, (name, request)) in requests.iter().enumerate() {
        let mut frame = Vec::new();
        write_frame(&mut frame, request).expect("encode");
        all.extend_from_slice(&frame);
        let mode = [0u8, 1, 3, 64][i % 4];
        std::fs::write(
            out.join(format!("request_{name}")),
            [&[mode][..], &frame].concat(),
        )
        .expect("write a seed");
    }
    for (i, (name, reply)) in replies.iter().enumerate() {
        let mut frame = Vec::new();
        write_frame(&mut frame, reply).expect("encode");
        all.extend_from_slice(&frame);
        let mode = [0u8, 2, 5, 255][i % 4];
        std::fs::write(
            out.join(format!("reply_{name}")),
            [&[mode][..], &frame].concat(),
        )
        .expect("write a seed");
    }
    std::fs::write(
        out.join("stream_of_everything"),
        [&[7u8][..], &all].concat(),
    )
    .expect("write a seed");
}
