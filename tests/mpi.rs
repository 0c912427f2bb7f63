//! The MPI backend (`--backend mpi`, cargo feature `mpi`) under `mpirun` on loopback, with the
//! TCP transport forced (`--mca btl tcp,self`) so that the network path is the one exercised:
//! outputs identical to the shared-memory backend's at 2, 3 and 4 ranks (every conformance
//! fixture's forward pass, greedy generation, the default model's chat answers), and a killed
//! rank ending the job with the rank named.
//!
//! They run the binary under test, so the suite must be built with the feature (`cargo test
//! --features mpi`, which `scripts/test` runs where Open MPI is installed): one build for every
//! test. Built without it, or without `mpirun`, each test says it was skipped where a person
//! sees it, unless `PARALLELFORMERS_REQUIRE_MPI=1` (which `.ci/run` sets) makes that a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{
    assert_no_processes_tagged, binary, fixture, forward_args, generate_reference_args,
    masked_max_diff, processes_tagged, read_tensors, reference, reference_output, run, unique_tag,
};

/// Every fixture of `tests/conformance.rs`, with its heads (the most ranks it splits over).
const FIXTURES: [(&str, usize); 27] = [
    ("gpt2", 4),
    ("gpt_bigcode", 4),
    ("opt", 4),
    ("gpt_neo", 4),
    ("phi", 4),
    ("gptj", 4),
    ("gpt_neox", 4),
    ("bloom", 4),
    ("falcon", 4),
    ("falcon_mq", 4),
    ("falcon_sequential", 4),
    ("llama", 8),
    ("smollm_like", 9),
    ("mistral", 8),
    ("qwen2", 8),
    // Today's families: OLMo 2's q/k norm adds an all-reduce of its own; Gemma 2 and Cohere
    // stand for the sandwich and parallel blocks.
    ("olmo2", 4),
    ("gemma2", 4),
    ("cohere", 4),
    ("bert", 4),
    ("bert_mlm", 4),
    ("roberta", 4),
    ("distilbert", 4),
    ("electra", 4),
    ("albert", 4),
    ("bart", 8),
    ("t5", 8),
    ("t5_gated", 8),
];

/// One `mpirun` job at a time: they oversubscribe the machine's cores as it is.
static JOBS: Mutex<()> = Mutex::new(());

/// The binary under test when it was built with the `mpi` feature and `mpirun` is installed;
/// otherwise `None`, after saying so where a person sees it (`test` names the skipped test).
fn mpi_binary(test: &str) -> Option<PathBuf> {
    let found = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let why = match (cfg!(feature = "mpi"), found) {
        (true, true) => return Some(binary()),
        (false, _) => "the tests were built without the `mpi` feature (scripts/test builds with it where Open MPI is installed: cargo test --features mpi)",
        (true, false) => "mpirun is not installed (apt-get install libopenmpi-dev openmpi-bin libclang-dev)",
    };
    common::skip(test, why, Some("PARALLELFORMERS_REQUIRE_MPI"));
    None
}

/// Runs `args` on `ranks` MPI ranks over TCP, with `tag` in every rank's environment.
fn mpirun(program: &Path, ranks: usize, args: &[String], tag: &str) -> Command {
    let mut command = Command::new("mpirun");
    command
        .args(["--oversubscribe", "--mca", "btl", "tcp,self", "-n"])
        .arg(ranks.to_string())
        .arg(program)
        .args(args)
        .args(["--backend", "mpi"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("PARALLELFORMERS_TEST_TAG", tag);
    command
}

/// Runs `args` under MPI to completion; asserts that it succeeded and left no process behind.
fn run_mpi(program: &Path, ranks: usize, args: &[String]) -> Output {
    let tag = unique_tag();
    let out = mpirun(program, ranks, args, &tag)
        .output()
        .expect("cannot run mpirun");
    assert!(
        out.status.success(),
        "mpirun -n {ranks} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_processes_tagged(&tag);
    out
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[test]
fn every_fixture_s_forward_pass_under_mpi_equals_shared_memory_s_at_2_3_and_4_ranks() {
    let Some(mpi) = mpi_binary(
        "every_fixture_s_forward_pass_under_mpi_equals_shared_memory_s_at_2_3_and_4_ranks",
    ) else {
        return;
    };
    let _job = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    for (name, heads) in FIXTURES {
        let inputs = fixture(name).join("reference.safetensors");
        let refs = reference(name);
        let (key, expected, mask) = reference_output(&refs);
        for ranks in 2..=heads.min(4) {
            let (over_mpi, over_shm) = (dir.path().join("mpi"), dir.path().join("shm"));
            let args = forward_args(&fixture(name), &ranks.to_string(), &inputs, &over_mpi);
            run_mpi(&mpi, ranks, &args);
            let out = run(&forward_args(
                &fixture(name),
                &ranks.to_string(),
                &inputs,
                &over_shm,
            ));
            assert!(out.status.success(), "{name}: {out:?}");
            let (a, b) = (read_tensors(&over_mpi), read_tensors(&over_shm));
            assert_eq!(a[key].values, b[key].values, "{name} at {ranks} ranks");
            let diff = masked_max_diff(
                &a[key].values.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                expected,
                &mask,
            );
            assert!(
                diff < 1e-4,
                "{name} at {ranks} ranks: {diff} from transformers"
            );
        }
    }
}

#[test]
fn greedy_generation_and_the_default_model_s_chat_answers_are_the_same_under_mpi() {
    let Some(mpi) =
        mpi_binary("greedy_generation_and_the_default_model_s_chat_answers_are_the_same_under_mpi")
    else {
        return;
    };
    let _job = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    for name in ["llama", "gpt2", "falcon", "bart", "t5"] {
        let mut args = generate_reference_args(name);
        args.extend(strings(&["--max-new-tokens", "12"]));
        for ranks in [2, 3] {
            let over_mpi = run_mpi(&mpi, ranks, &args);
            let mut shm = args.clone();
            shm.extend(strings(&["--ranks", &ranks.to_string()]));
            let over_shm = run(&shm);
            assert!(over_shm.status.success(), "{over_shm:?}");
            assert_eq!(
                String::from_utf8_lossy(&over_mpi.stdout),
                String::from_utf8_lossy(&over_shm.stdout),
                "{name} at {ranks} ranks"
            );
        }
    }
    for question in [
        "What is the capital of France?",
        "Name three colours of the rainbow.",
    ] {
        let args = strings(&["chat", "--max-new-tokens", "40", question]);
        let over_mpi = run_mpi(&mpi, 2, &args);
        let over_shm = run(&args);
        assert!(over_shm.status.success(), "{over_shm:?}");
        let answer = String::from_utf8_lossy(&over_mpi.stdout);
        assert!(!answer.trim().is_empty(), "no answer to {question:?}");
        assert_eq!(
            answer,
            String::from_utf8_lossy(&over_shm.stdout),
            "{question}"
        );
    }
}

#[test]
fn a_killed_rank_ends_the_mpi_job_with_its_rank_named() {
    let Some(mpi) = mpi_binary("a_killed_rank_ends_the_mpi_job_with_its_rank_named") else {
        return;
    };
    let _job = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let tag = unique_tag();
    let args = strings(&[
        "generate",
        "--max-new-tokens",
        "400",
        "--min-new-tokens",
        "400",
        "Once upon a time",
    ]);
    let job = mpirun(&mpi, 3, &args, &tag)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run mpirun");
    // Rank 2, once the model is loaded and generating.
    let started = Instant::now();
    let victim = loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "rank 2 never started"
        );
        let rank_two = processes_tagged(&tag).into_iter().find(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            environ
                .split(|&b| b == 0)
                .any(|kv| kv == b"OMPI_COMM_WORLD_RANK=2")
        });
        if let Some(pid) = rank_two {
            std::thread::sleep(Duration::from_secs(3));
            break pid;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // SAFETY: kill(2) on a process of this test.
    unsafe {
        libc::kill(victim as i32, libc::SIGKILL);
    }
    let killed = Instant::now();
    let out = job.wait_with_output().expect("mpirun did not end");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job succeeded without rank 2");
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "the job took {:?} to end",
        killed.elapsed()
    );
    assert!(stderr.contains("rank 2"), "{stderr}");
    assert_no_processes_tagged(&tag);
}

#[test]
fn without_the_mpi_feature_the_backend_is_refused_with_the_way_to_get_it() {
    if cfg!(feature = "mpi") {
        // Built with the feature, the binary has the backend; the refusal is what a build
        // without it (plain `cargo test`) checks.
        common::skip(
            "without_the_mpi_feature_the_backend_is_refused_with_the_way_to_get_it",
            "the suite was built with the `mpi` feature",
            None,
        );
        return;
    }
    let out = Command::new(binary())
        .args(["chat", "--backend", "mpi", "hello"])
        .output()
        .expect("cannot run the binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--features mpi"), "{stderr}");
}
