//! The life of a parallel model: workers exist only between `parallelize` and `deparallelize`
//! (or drop), nothing outlives them, and a library user's own program can host the ranks.

mod common;

use std::path::PathBuf;

use common::{assert_all_gone, binary, fixture, options, process_exists, shm_segments};
use parallelformers::{parallelize, GenerationConfig, Options};

#[test]
fn deparallelize_stops_every_worker_and_frees_the_shared_memory() {
    let model = parallelize(fixture("llama"), options(4)).unwrap();
    let pids = model.worker_pids();
    assert_eq!(pids.len(), 4);
    assert!(pids.iter().all(|&p| process_exists(p)));
    model.deparallelize();
    assert_all_gone(&pids);
    assert!(shm_segments().is_empty());
}

#[test]
fn dropping_the_model_stops_every_worker() {
    let model = parallelize(fixture("gpt2"), options(3)).unwrap();
    let pids = model.worker_pids();
    drop(model);
    assert_all_gone(&pids);
}

#[test]
fn an_invalid_request_is_refused_and_the_model_stays_usable() {
    let mut model = parallelize(fixture("llama"), options(2)).unwrap();
    let params = GenerationConfig {
        max_new_tokens: 3,
        ..GenerationConfig::default()
    };
    let err = model.generate(&[1, 5000], &params).unwrap_err().to_string();
    assert!(err.contains("token id 5000"), "{err}");
    assert!(model.generate(&[], &params).is_err());
    assert_eq!(model.generate(&[1, 2], &params).unwrap().ids.len(), 3);
}

#[test]
fn each_rank_holds_its_share_of_the_sliced_weights_and_all_replicated_ones() {
    let one = parallelize(fixture("llama"), options(1)).unwrap();
    let two = parallelize(fixture("llama"), options(2)).unwrap();
    let whole = one.load_report()[0].weights;
    let halves: Vec<_> = two.load_report().iter().map(|m| m.weights).collect();
    assert_eq!(halves.iter().map(|w| w.sliced).sum::<u64>(), whole.sliced);
    for w in &halves {
        assert_eq!(w.replicated, whole.replicated);
        assert!(
            w.sliced * 10 < whole.sliced * 6,
            "a rank holds {} of {} sliced bytes",
            w.sliced,
            whole.sliced
        );
    }
}

#[test]
fn the_kv_cache_is_reported_and_freed_after_generation() {
    let mut model = parallelize(fixture("mistral"), options(2)).unwrap();
    model
        .generate(
            &[1, 2, 3],
            &GenerationConfig {
                max_new_tokens: 4,
                ..GenerationConfig::default()
            },
        )
        .unwrap();
    let report = model.memory_report().unwrap();
    assert_eq!(report.len(), 2);
    assert!(report
        .iter()
        .all(|m| m.kv_cache_bytes == 0 && m.peak_bytes > 0));
}

fn library_user_example() -> PathBuf {
    let bin = binary();
    bin.parent().unwrap().join("examples/library_user")
}

#[test]
fn a_library_users_own_program_can_host_the_ranks() {
    let example = library_user_example();
    assert!(
        example.exists(),
        "build examples first: {} is missing",
        example.display()
    );
    let out = std::process::Command::new(&example)
        .args([fixture("llama").to_str().unwrap(), "2", "4,5,6"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u32> = serde_json::from_value(json["generated_ids"].clone()).unwrap();
    let mut model = parallelize(fixture("llama"), options(1)).unwrap();
    let expected = model
        .generate(
            &[4, 5, 6],
            &GenerationConfig {
                max_new_tokens: 6,
                ..GenerationConfig::default()
            },
        )
        .unwrap();
    assert_eq!(ids, expected.ids);
    let pids: Vec<u32> = serde_json::from_value(json["worker_pids"].clone()).unwrap();
    assert_eq!(pids.len(), 2);
    assert_all_gone(&pids);
}

#[test]
fn a_killed_rank_fails_the_next_request_fast_naming_the_rank_and_stops_the_others() {
    let mut model = parallelize(fixture("llama"), options(3)).unwrap();
    let pids = model.worker_pids();
    let status = std::process::Command::new("kill")
        .args(["-9", &pids[1].to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = std::time::Instant::now();
    let err = model
        .generate(
            &[1, 2, 3],
            &GenerationConfig {
                max_new_tokens: 4,
                ..GenerationConfig::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.contains("rank 1"), "{err}");
    assert!(model.failure().is_some());
    assert_all_gone(&pids);
    let again = model
        .generate(&[1], &GenerationConfig::default())
        .unwrap_err()
        .to_string();
    assert!(again.contains("stopped"), "{again}");
}

#[test]
fn the_shared_memory_can_be_backed_by_an_unnamed_file_in_a_chosen_directory() {
    let config = GenerationConfig {
        max_new_tokens: 6,
        ..GenerationConfig::default()
    };
    let mut anonymous = parallelize(fixture("llama"), options(2)).unwrap();
    let want = anonymous.generate(&[1, 2, 3], &config).unwrap().ids;
    anonymous.deparallelize();
    let dir = tempfile::tempdir().unwrap();
    let in_dir = Options {
        comm_dir: Some(dir.path().to_path_buf()),
        ..options(2)
    };
    let mut filed = parallelize(fixture("llama"), in_dir).unwrap();
    assert_eq!(filed.generate(&[1, 2, 3], &config).unwrap().ids, want);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", filed.worker_pids()[1])).unwrap();
    assert!(
        maps.contains(dir.path().to_str().unwrap()),
        "rank 1 does not map a file of the directory"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "a name was left"
    );
    filed.deparallelize();
    let missing = Options {
        comm_dir: Some("/nonexistent/comm-dir".into()),
        ..options(2)
    };
    let err = match parallelize(fixture("llama"), missing) {
        Ok(_) => panic!("a missing directory was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("/nonexistent/comm-dir"), "{err}");
}

/// A program that connects to the rendezvous socket as an impostor (a wrong secret, then a
/// malformed frame), records whether the launcher hung up on it, and then runs the real worker.
fn impostor_worker(dir: &std::path::Path) -> PathBuf {
    let script = dir.join("impostor-worker");
    let marker = dir.join("impostor.log");
    let text = format!(
        r#"#!/usr/bin/env python3
import os, socket, struct
def attempt(payload):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.environ["PARALLELFORMERS_RENDEZVOUS"])
    s.sendall(struct.pack("<I", len(payload)) + payload)
    s.settimeout(10)
    dropped = s.recv(1) == b""
    with open({marker:?}, "a") as log:
        log.write("dropped\n" if dropped else "answered\n")
if os.environ["PARALLELFORMERS_RANK"] == "1":
    secret = b"0" * 32
    attempt(bytes([0, 0, len(secret)]) + secret)  # Hello {{ rank: 0, secret: wrong }}
    attempt(b"\xff\xff\xff")
os.execv({binary:?}, [{binary:?}])
"#,
        marker = marker.to_str().unwrap(),
        binary = binary().to_str().unwrap(),
    );
    std::fs::write(&script, text).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

#[test]
fn connections_without_the_runs_secret_are_dropped_and_the_real_ranks_start() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        worker_program: Some(impostor_worker(dir.path())),
        ..options(2)
    };
    let mut model = parallelize(fixture("llama"), options).unwrap();
    let config = GenerationConfig {
        max_new_tokens: 3,
        ..GenerationConfig::default()
    };
    assert_eq!(model.generate(&[1, 2, 3], &config).unwrap().ids.len(), 3);
    model.deparallelize();
    let log = std::fs::read_to_string(dir.path().join("impostor.log")).unwrap();
    assert_eq!(log, "dropped\ndropped\n");
}
