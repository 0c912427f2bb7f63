//! Supervision: a rank killed (SIGKILL) or stopped (SIGSTOP, a process that no longer answers)
//! while loading, idle, in a forward pass or in a generation makes the caller's call fail within
//! 2 seconds, naming the rank and its last words; every other rank is stopped and reaped (no
//! process and no zombie left), no shared-memory segment remains, and the model reports itself
//! dead. If the main process dies, the ranks exit on their own.
//!
//! One test runs every phase in turn, so that every child process of this test binary belongs
//! to the phase being checked.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{assert_all_gone, binary, fixture, options, process_exists, shm_segments};
use parallelformers::{parallelize, ForwardInput, GenerationConfig, ModelSource, ParallelModel};

const DEADLINE: Duration = Duration::from_secs(2);

fn signal(pid: u32, signal: i32) {
    // SAFETY: sending a signal to a process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill {pid}");
}

/// Child processes of `parent` that run as rank `rank`.
fn ranks_of(parent: u32, rank: usize) -> Vec<u32> {
    let wanted = format!("PARALLELFORMERS_RANK={rank}");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().nth(1));
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            ppid == Some(parent.to_string().as_str())
                && environ.split(|&b| b == 0).any(|v| v == wanted.as_bytes())
        })
        .collect()
}

/// Runs `call` on `model` in a thread; returns when it ended and what it said.
fn in_thread<T: Send + 'static>(
    mut model: ParallelModel,
    call: impl FnOnce(&mut ParallelModel) -> parallelformers::Result<T> + Send + 'static,
) -> JoinHandle<(Instant, Result<T, String>, ParallelModel)> {
    std::thread::spawn(move || {
        let result = call(&mut model).map_err(|e| e.to_string());
        (Instant::now(), result, model)
    })
}

/// Checks the error of a call that failed `ended - fault` after rank `rank` was hit.
fn check_failure(what: &str, error: &str, rank: usize, fault: Instant, ended: Instant) {
    let took = ended.saturating_duration_since(fault);
    assert!(took < DEADLINE, "{what}: the error took {took:?}");
    assert!(error.contains(&format!("rank {rank}")), "{what}: {error}");
    assert!(error.contains("last words"), "{what}: {error}");
}

fn long_generation() -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: 2000,
        eos_token_id: Some(vec![]),
        ..GenerationConfig::default()
    }
}

#[test]
fn a_rank_killed_or_stopped_in_any_phase_fails_the_call_fast_and_leaves_nothing_behind() {
    let segments_before = shm_segments();
    let me = std::process::id();

    // Loading: rank 1 is killed as soon as it exists.
    let loading = std::thread::spawn(|| {
        let result = parallelize(ModelSource::Default, options(2)).map(|m| m.worker_pids());
        (Instant::now(), result.map_err(|e| e.to_string()))
    });
    let victim = loop {
        if let Some(&pid) = ranks_of(me, 1).first() {
            break pid;
        }
        std::thread::yield_now();
    };
    signal(victim, libc::SIGKILL);
    let fault = Instant::now();
    let (ended, result) = loading.join().unwrap();
    let error = result.expect_err("loading went on without rank 1");
    check_failure("loading", &error, 1, fault, ended);
    assert!(ranks_of(me, 0).is_empty() && ranks_of(me, 1).is_empty());

    // Idle, killed: the next health check names the rank.
    let mut model = parallelize(fixture("llama"), options(3)).unwrap();
    let pids = model.worker_pids();
    signal(pids[2], libc::SIGKILL);
    let fault = Instant::now();
    let error = loop {
        if let Err(e) = model.check_alive() {
            break e.to_string();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    check_failure("idle kill", &error, 2, fault, Instant::now());
    assert!(model.failure().is_some());
    assert_all_gone(&pids);

    // Idle, stopped: the heartbeat stands still and the rank is named.
    let mut model = parallelize(fixture("llama"), options(2)).unwrap();
    let pids = model.worker_pids();
    std::thread::sleep(Duration::from_millis(300));
    signal(pids[1], libc::SIGSTOP);
    let fault = Instant::now();
    let error = loop {
        if let Err(e) = model.check_alive() {
            break e.to_string();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    check_failure("idle stop", &error, 1, fault, Instant::now());
    assert!(error.contains("stopped answering"), "{error}");
    assert_all_gone(&pids);

    // A forward pass: rank 0 is killed in the middle of a long prompt.
    let model = parallelize(ModelSource::Default, options(2)).unwrap();
    let pids = model.worker_pids();
    let input = ForwardInput {
        input_ids: (0..1500).map(|i| 100 + i % 1000).collect(),
        batch: 1,
        seq_len: 1500,
        attention_mask: None,
        decoder_input_ids: None,
    };
    let forward = in_thread(model, move |m| m.forward(&input));
    std::thread::sleep(Duration::from_millis(300));
    signal(pids[0], libc::SIGKILL);
    let fault = Instant::now();
    let (ended, result, model) = forward.join().unwrap();
    check_failure("forward", &result.unwrap_err(), 0, fault, ended);
    assert!(model.failure().is_some());
    assert_all_gone(&pids);

    // A generation: rank 1 stops answering (SIGSTOP) mid-way.
    let model = parallelize(ModelSource::Default, options(2)).unwrap();
    let pids = model.worker_pids();
    let generation = in_thread(model, |m| m.generate(&[1, 2, 3], &long_generation()));
    std::thread::sleep(Duration::from_millis(500));
    signal(pids[1], libc::SIGSTOP);
    let fault = Instant::now();
    let (ended, result, _model) = generation.join().unwrap();
    let error = result.unwrap_err();
    check_failure("generation stop", &error, 1, fault, ended);
    assert!(error.contains("stopped answering"), "{error}");
    assert_all_gone(&pids);

    // A generation: rank 0 is killed mid-way.
    let model = parallelize(ModelSource::Default, options(2)).unwrap();
    let pids = model.worker_pids();
    let generation = in_thread(model, |m| m.generate(&[1, 2, 3], &long_generation()));
    std::thread::sleep(Duration::from_millis(500));
    signal(pids[0], libc::SIGKILL);
    let fault = Instant::now();
    let (ended, result, _model) = generation.join().unwrap();
    check_failure("generation kill", &result.unwrap_err(), 0, fault, ended);
    assert_all_gone(&pids);

    // The main process dies: its ranks exit on their own.
    let mut main = Command::new(binary())
        .args(["serve", "--port", "0", "--ranks", "2", "--model"])
        .arg(fixture("gpt2"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(main.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening on"), "{line}");
    let orphans: Vec<u32> = (0..2).flat_map(|r| ranks_of(main.id(), r)).collect();
    assert_eq!(orphans.len(), 2);
    // Its private directory went once the ranks had connected: a SIGKILL leaves no file.
    let socket = common::process_env(orphans[0], "PARALLELFORMERS_RENDEZVOUS").unwrap();
    let directory = std::path::Path::new(&socket)
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(!directory.exists(), "{}", directory.display());
    main.kill().unwrap();
    main.wait().unwrap();
    let fault = Instant::now();
    while orphans.iter().any(|&pid| process_exists(pid)) {
        assert!(
            fault.elapsed() < DEADLINE,
            "ranks outlived their main process"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    assert_eq!(shm_segments(), segments_before);
}
