//! A bounded soak over loopback: cycles of a server on the default model at 2 ranks under four
//! clients that mix whole and streamed completions and chats, cancelled streams and bad
//! requests; in each cycle a rank is killed while requests run, and the test checks that
//! `/health` turns red, that every request still ends with an answer or a clean error, and that
//! the server restarts its ranks and serves again; then it stops the server and starts the
//! next. Checks that the server's memory
//! stays flat while it runs and that nothing leaks: no process, no zombie, no shared-memory
//! segment, no descriptor of the test process.
//!
//! `PARALLELFORMERS_SOAK_SECONDS` sets the duration (default 40; at least one cycle runs).

mod common;

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::server::{children, Server};
use common::{assert_all_gone, shm_segments};
use serde_json::json;

/// How each request ended.
#[derive(Default)]
struct Outcomes {
    answered: AtomicUsize,
    cancelled: AtomicUsize,
    refused: AtomicUsize,
    failed_cleanly: AtomicUsize,
}

/// Resident memory of process `pid`, in bytes.
fn resident(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// One client request of kind `n % 4`; panics on anything but an answer or a clean error.
fn one_request(base: &str, n: usize, outcomes: &Outcomes) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let completion = format!("{base}/v1/completions");
    let chat = format!("{base}/v1/chat/completions");
    let result = match n % 4 {
        0 => agent
            .post(&completion)
            .send_json(json!({"prompt": "The weather today", "max_tokens": 12, "seed": n})),
        1 => agent.post(&chat).send_json(json!({
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 12, "temperature": 0, "stream": true,
        })),
        2 => agent
            .post(&completion)
            .send_json(json!({"prompt": "Once upon a time", "max_tokens": 200, "stream": true})),
        _ => agent
            .post(&completion)
            .send_json(json!({"prompt": "x", "max_tokens": 0})),
    };
    match (n % 4, result) {
        (2, Ok(response)) => {
            // Read the first chunk, then hang up.
            let mut lines = BufReader::new(response.into_reader()).lines();
            let first = lines.next().and_then(Result::ok).unwrap_or_default();
            assert!(first.starts_with("data: "), "{first:?}");
            outcomes.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        (1, Ok(response)) => {
            let text = response.into_string().expect("a stream cut short");
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
            match text.contains("\"error\"") {
                true => outcomes.failed_cleanly.fetch_add(1, Ordering::Relaxed),
                false => outcomes.answered.fetch_add(1, Ordering::Relaxed),
            };
        }
        (_, Ok(response)) => {
            let body: serde_json::Value = response.into_json().expect("an answer that is not JSON");
            assert!(body["choices"][0]["text"].is_string(), "{body}");
            outcomes.answered.fetch_add(1, Ordering::Relaxed);
        }
        (3, Err(ureq::Error::Status(400, _))) => {
            outcomes.refused.fetch_add(1, Ordering::Relaxed);
        }
        (_, Err(ureq::Error::Status(503, response))) => {
            let body: serde_json::Value = response.into_json().expect("a 503 that is not JSON");
            assert!(body["error"]["message"].is_string(), "{body}");
            outcomes.failed_cleanly.fetch_add(1, Ordering::Relaxed);
            // As Retry-After asks, do not hammer a server that is down.
            std::thread::sleep(Duration::from_millis(50));
        }
        (kind, Err(e)) => panic!("request of kind {kind} ended badly: {e}"),
    }
}

#[test]
fn requests_cancellations_and_rank_kills_with_restarts_leak_nothing() {
    let seconds: u64 = std::env::var("PARALLELFORMERS_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let segments_before = shm_segments();
    let descriptors_before = open_descriptors();
    let outcomes = Arc::new(Outcomes::default());
    let (mut cycles, mut largest_growth) = (0usize, 0i64);
    while cycles == 0 || Instant::now() < deadline {
        cycles += 1;
        let mut server = Server::start(&["--ranks", "2"]);
        let ranks = children(server.child.id());
        assert_eq!(ranks.len(), 2);
        let running = Arc::new(AtomicBool::new(true));
        let clients: Vec<_> = (0..4)
            .map(|client| {
                let (base, running, outcomes) =
                    (server.base.clone(), running.clone(), outcomes.clone());
                std::thread::spawn(move || {
                    let mut n = client;
                    while running.load(Ordering::Relaxed) {
                        one_request(&base, n, &outcomes);
                        n += 5; // the next kind of request, with another seed
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(2));
        let warm = resident(server.child.id());
        std::thread::sleep(Duration::from_secs(6));
        let growth = resident(server.child.id()) as i64 - warm as i64;
        largest_growth = largest_growth.max(growth);
        assert!(
            growth < 16 << 20,
            "cycle {cycles}: the server grew by {growth} bytes"
        );
        // The fault: a rank dies while requests run.
        // SAFETY: signalling a rank process of the server this test started.
        unsafe { libc::kill(ranks[cycles % 2] as i32, libc::SIGKILL) };
        let killed = Instant::now();
        while ureq::get(&server.url("/health")).call().is_ok() {
            assert!(
                killed.elapsed() < Duration::from_secs(2),
                "/health stayed green"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The server restarts its ranks by itself, and serves again.
        while ureq::get(&server.url("/health")).call().is_err() {
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "cycle {cycles}: the ranks were not restarted"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let restarted = children(server.child.id());
        std::thread::sleep(Duration::from_secs(1));
        running.store(false, Ordering::Relaxed);
        for client in clients {
            client.join().expect("a client saw a request end badly");
        }
        assert!(
            server.stop().success(),
            "cycle {cycles}: the server failed to stop"
        );
        assert_all_gone(&[ranks, restarted].concat());
    }
    assert_eq!(shm_segments(), segments_before);
    assert_eq!(open_descriptors(), descriptors_before, "descriptors leaked");
    let count = |a: &AtomicUsize| a.load(Ordering::Relaxed);
    println!(
        "soak: {seconds} s, {cycles} cycles, {} answered, {} cancelled, {} refused (400), {} \
         clean errors after faults, {cycles} faults injected, largest server growth {} KiB, \
         leaks: 0",
        count(&outcomes.answered),
        count(&outcomes.cancelled),
        count(&outcomes.refused),
        count(&outcomes.failed_cleanly),
        largest_growth / 1024
    );
    assert!(count(&outcomes.answered) > 0 && count(&outcomes.cancelled) > 0);
}
