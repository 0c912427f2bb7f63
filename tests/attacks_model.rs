//! The attack suite, the model's side: what a careless or hostile client can do to the ranks
//! through the server — hundreds of sequences cancelled at random moments, request shapes
//! that would take more memory than the batch may, a rank that dies under load, a stop
//! signal while streams run — and, after each, a normal request must be answered.
//!
//! `PARALLELFORMERS_ATTACK_SCALE` multiplies the rounds (default 1, the bounded run of CI; the
//! longer run by hand and its figures are in BENCHMARKS.md).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::server::{children, Server};
use common::{assert_all_gone, fixture};
use serde_json::{json, Value};

/// How many times longer than the CI run to attack.
fn scale() -> usize {
    std::env::var("PARALLELFORMERS_ATTACK_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// A server on the tiny GPT-2 fixture at two ranks, with `args` added: the fastest model, for
/// attacks that need many sequences (its context is 64 positions).
fn start(args: &[&str]) -> Server {
    let model = fixture("gpt2");
    let mut all = vec!["--model", model.to_str().unwrap(), "--ranks", "2"];
    all.extend_from_slice(args);
    Server::start(&all)
}

/// A server on the default model at two ranks, with `args` added: for attacks that need
/// streams longer than a fixture's context.
fn start_default(args: &[&str]) -> Server {
    let mut all = vec!["--ranks", "2"];
    all.extend_from_slice(args);
    Server::start(&all)
}

/// Sends a JSON POST on a raw connection and returns it, so that the caller decides when to
/// hang up.
fn post_raw(server: &Server, path: &str, body: &Value) -> TcpStream {
    let address = server.base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    let body = body.to_string();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    stream
}

/// The `data:` payloads of a raw HTTP response whose body is a chunked event stream (as far
/// as it arrived).
fn events_of(raw: &str) -> Vec<String> {
    let mut body = String::new();
    let mut rest = raw.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            body.push_str(&after[..size.min(after.len())]);
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    body.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// Asserts that the server answers `/health` and a small completion within `limit`.
fn answers_normally(server: &Server, limit: Duration) {
    let agent = ureq::AgentBuilder::new().timeout(limit).build();
    let health: Value = agent
        .get(&server.url("/health"))
        .call()
        .expect("/health answers")
        .into_json()
        .unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    let answer: Value = agent
        .post(&server.url("/v1/completions"))
        .send_json(json!({"prompt": "the model", "max_tokens": 4, "temperature": 0}))
        .expect("a normal request is answered")
        .into_json()
        .unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 4, "{answer}");
}

/// A value from a rank's environment (the rendezvous socket's path, for one).
fn rank_env(pid: u32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ
        .split(|&b| b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .find_map(|entry| entry.strip_prefix(&format!("{name}=")).map(str::to_string))
}

/// A figure of `/proc/PID/status`, in bytes (`VmHWM`: the peak resident memory).
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// The deadlock of issue 16: a request of hundreds of sequences whose client hangs up left
/// the launcher and rank 0 each blocked writing to the other. Large batched requests, streamed
/// or not, are dropped at random moments, several at once, round after round; then a normal
/// request must be answered.
#[test]
fn hundreds_of_sequences_cancelled_at_random_moments_never_wedge_the_server() {
    let server = start(&["--max-batch", "512", "--max-tokens", "48"]);
    let started = Instant::now();
    let rounds = 6 * scale();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    };
    for round in 0..rounds {
        let clients: Vec<_> = (0..3)
            .map(|_| {
                let n = 200 + next(313);
                let body = json!({
                    "prompt": "the model", "n": n, "max_tokens": 4 + next(44),
                    "temperature": 1.0, "stream": next(2) == 0,
                });
                let hang_up_after = Duration::from_millis(next(400));
                let stream = post_raw(&server, "/v1/completions", &body);
                std::thread::spawn(move || {
                    let mut stream = stream;
                    stream
                        .set_read_timeout(Some(Duration::from_millis(20)))
                        .unwrap();
                    let until = Instant::now() + hang_up_after;
                    let mut buffer = [0u8; 4096];
                    while Instant::now() < until {
                        match stream.read(&mut buffer) {
                            Ok(0) => break,
                            _ => continue,
                        }
                    }
                    // Dropping the stream hangs up, in the middle of whatever was happening.
                })
            })
            .collect();
        for client in clients {
            client.join().unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60 * scale() as u64),
            "round {round}: the attack itself is taking too long"
        );
    }
    answers_normally(&server, Duration::from_secs(30));
    println!(
        "{rounds} rounds of 3 dropped requests of 200–512 sequences in {:.1} s; the server answers",
        started.elapsed().as_secs_f64()
    );
}

/// Admission by memory: `n` beyond the batch and shapes beyond its memory are refused with a
/// 400 naming the limit, requests that fit only one at a time wait their turn, and a flood of
/// the largest shapes that fit never takes a rank past its budget.
#[test]
fn request_shapes_beyond_the_budget_are_refused_and_no_rank_grows_past_it() {
    let budget_mib = 4u64;
    let server = start(&[
        "--max-batch",
        "64",
        "--batch-memory-mib",
        &budget_mib.to_string(),
        "--max-queue",
        "256",
    ]);
    let ranks = children(server.child.id());
    let peak_after_load: Vec<u64> = ranks.iter().map(|&p| status_bytes(p, "VmHWM")).collect();

    let (code, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "a", "n": 65, "max_tokens": 2}),
        )
        .unwrap_err();
    assert_eq!(code, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("--max-batch"), "{message}");
    let (code, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "a", "n": 64, "max_tokens": 60}),
        )
        .unwrap_err();
    assert_eq!(code, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("--batch-memory-mib"), "{message}");

    // Each fits alone (16 rows of one reserved cache row each), two do not fit together:
    // they take turns, and every one is answered.
    let flood: Vec<_> = (0..8 * scale())
        .map(|i| {
            let url = server.url("/v1/completions");
            std::thread::spawn(move || {
                let body = json!({"prompt": "the model", "n": 24, "max_tokens": 20, "seed": i});
                let answer: Value = ureq::post(&url)
                    .send_json(body)
                    .unwrap()
                    .into_json()
                    .unwrap();
                answer["choices"].as_array().unwrap().len()
            })
        })
        .collect();
    for client in flood {
        assert_eq!(client.join().unwrap(), 24);
    }
    for (&pid, before) in ranks.iter().zip(peak_after_load) {
        let growth = status_bytes(pid, "VmHWM").saturating_sub(before);
        // The cache and logits of the batch, once more for the copy a join makes, and room
        // for the allocator and the prefill's activations.
        let allowed = (2 * budget_mib + 16) << 20;
        assert!(
            growth <= allowed,
            "rank {pid} grew by {} MiB, more than {} MiB",
            growth >> 20,
            allowed >> 20
        );
    }
    answers_normally(&server, Duration::from_secs(30));
}

/// Self-healing: a rank killed while requests run; the requests it took down get a clean 503
/// (no internal text), `/health` reports the outage, the server restarts the ranks by itself
/// and serves again, and `/health` and `/metrics` count the restart.
#[test]
fn a_rank_killed_under_load_is_restarted_and_the_server_serves_again() {
    let mut server = start_default(&["--max-tokens", "4000"]);
    let mut all_ranks = Vec::new();
    for round in 1..=scale() as u64 {
        let ranks = children(server.child.id());
        assert_eq!(ranks.len(), 2);
        all_ranks.extend(&ranks);
        let streams: Vec<_> = (0..3)
            .map(|_| {
                let body = json!({"prompt": "the model", "max_tokens": 4000, "stream": true});
                let mut stream = post_raw(&server, "/v1/completions", &body);
                stream
                    .set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                std::thread::spawn(move || {
                    let mut text = String::new();
                    let _ = stream.read_to_string(&mut text);
                    text
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: killing a rank process of the server this test started.
        unsafe { libc::kill(ranks[(round % 2) as usize] as i32, libc::SIGKILL) };
        let killed = Instant::now();
        for stream in streams {
            let text = stream.join().unwrap();
            let events = events_of(&text);
            let last = events.len().saturating_sub(2);
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
            assert!(
                events[last].contains("restarting"),
                "the stream hears why: {text}"
            );
            for internal in ["last words", "panicked", "exited unexpectedly", "signal"] {
                assert!(
                    !text.contains(internal),
                    "internal text {internal:?} in {text}"
                );
            }
        }
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build();
        let mut saw_outage = false;
        loop {
            match agent.get(&server.url("/health")).call() {
                Ok(response) => {
                    let health: Value = response.into_json().unwrap();
                    if health["restarts"] == round {
                        break;
                    }
                }
                Err(ureq::Error::Status(503, response)) => {
                    let health: Value = response.into_json().unwrap();
                    assert_eq!(health["status"], "down");
                    saw_outage = true;
                }
                Err(e) => panic!("/health: {e}"),
            }
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "the server did not restart its ranks"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(saw_outage || killed.elapsed() > Duration::ZERO);
        answers_normally(&server, Duration::from_secs(30));
        let metrics = agent
            .get(&server.url("/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        assert!(
            metrics.contains(&format!("parallelformers_rank_restarts_total {round}")),
            "{metrics}"
        );
        assert_ne!(children(server.child.id()), ranks, "new rank processes");
    }
    all_ranks.extend(children(server.child.id()));
    assert!(server.stop().success());
    assert_all_gone(&all_ranks);
}

/// Stopping always stops: SIGTERM while large streams run ends the process within the grace
/// period plus a few seconds; the streams still running at the end of the grace get an error
/// event and `data: [DONE]`; the ranks and the rendezvous directory are gone.
#[test]
fn sigterm_while_streams_run_stops_within_the_grace_and_leaves_nothing() {
    let mut server = start_default(&["--grace-seconds", "1"]);
    let ranks = children(server.child.id());
    let socket = rank_env(ranks[0], "PARALLELFORMERS_RENDEZVOUS").expect("the rendezvous path");
    let directory = std::path::Path::new(&socket)
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(directory.exists());
    let streams: Vec<_> = (0..2)
        .map(|_| {
            // Far longer than the grace.
            let body =
                json!({"prompt": "Once upon a time", "n": 4, "max_tokens": 2000, "stream": true});
            let mut stream = post_raw(&server, "/v1/completions", &body);
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stream.read_to_string(&mut text);
                text
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    let status = server.stop();
    let took = signalled.elapsed();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(1 + 6), "stopping took {took:?}");
    for stream in streams {
        let events = events_of(&stream.join().unwrap());
        assert!(events.len() > 2, "{events:?}");
        assert_eq!(events[events.len() - 1], "[DONE]");
        assert!(
            events[events.len() - 2].contains("shutting down"),
            "an error event: {events:?}"
        );
    }
    assert_all_gone(&ranks);
    assert!(
        !directory.exists(),
        "{} was left behind",
        directory.display()
    );
}

/// Stopping always stops, even with a wedged rank: a rank frozen (SIGSTOP) while a stream
/// runs, then SIGTERM; the process ends within the grace period plus a few seconds, the
/// frozen rank is killed, and nothing is left behind.
#[test]
fn sigterm_with_a_frozen_rank_stops_and_leaves_nothing() {
    let mut server = start_default(&["--grace-seconds", "1"]);
    let ranks = children(server.child.id());
    let socket = rank_env(ranks[0], "PARALLELFORMERS_RENDEZVOUS").expect("the rendezvous path");
    let directory = std::path::Path::new(&socket)
        .parent()
        .unwrap()
        .to_path_buf();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 2000, "stream": true});
    let mut stream = post_raw(&server, "/v1/completions", &body);
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text
    });
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: freezing a rank process of the server this test started.
    unsafe { libc::kill(ranks[1] as i32, libc::SIGSTOP) };
    let signalled = Instant::now();
    let status = server.stop();
    let took = signalled.elapsed();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(1 + 6), "stopping took {took:?}");
    let events = events_of(&reader.join().unwrap());
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert_all_gone(&ranks);
    assert!(
        !directory.exists(),
        "{} was left behind",
        directory.display()
    );
}
