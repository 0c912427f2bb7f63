//! `parallelformers serve` driven over loopback with an HTTP client: OpenAI-shaped completions
//! and chat (whole and streamed as server-sent events), the model list, health and metrics,
//! OpenAI-style errors with the right status, the queue limit, log-probabilities, `logit_bias` and
//! `stop_token_ids`, and a clean stop on SIGTERM
//! (no rank process and no shared-memory segment left).

mod common;

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::{Duration, Instant};

use common::server::{children, Server};
use common::{assert_all_gone, fixture, shm_segments};
use serde_json::{json, Value};

/// Asserts that the server's ranks are gone and that no shared-memory segment was left.
fn assert_released(ranks: &[u32], segments_before: &[String]) {
    assert_all_gone(ranks);
    assert_eq!(
        shm_segments(),
        segments_before,
        "a shared-memory segment was left"
    );
}

#[test]
fn completions_whole_and_streamed_models_health_metrics_and_a_clean_stop() {
    let segments_before = shm_segments();
    let model = fixture("gpt2");
    let mut server = Server::start(&["--model", model.to_str().unwrap(), "--ranks", "2"]);
    let ranks = children(server.child.id());
    assert_eq!(ranks.len(), 2, "two rank processes");
    let health: Value = ureq::get(&server.url("/health"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(health["status"], "ok");
    let models: Value = ureq::get(&server.url("/v1/models"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(models["data"][0]["id"], "gpt2");

    let request =
        json!({"model": "gpt2", "prompt": "the model", "max_tokens": 6, "temperature": 0});
    let whole = server.post("/v1/completions", &request).unwrap();
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 6);
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let events = server.stream("/v1/completions", &streamed);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let joined: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(joined, text, "the stream carries the same text");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );

    // Two choices, sampled with a seed, are reproducible.
    let sampled =
        json!({"prompt": "the model", "max_tokens": 5, "temperature": 1.2, "n": 2, "seed": 3});
    let first = server.post("/v1/completions", &sampled).unwrap();
    assert_eq!(first["choices"].as_array().unwrap().len(), 2);
    assert_eq!(
        server.post("/v1/completions", &sampled).unwrap()["choices"],
        first["choices"]
    );

    let generated = 6 + 6 + 2 * first["usage"]["completion_tokens"].as_u64().unwrap();
    let metrics = ureq::get(&server.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics.contains("parallelformers_requests_total{route=\"completions\",status=\"200\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "parallelformers_completion_tokens_total {generated}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("parallelformers_rank_memory_bytes{rank=\"1\",kind=\"resident\"}"));

    assert!(server.stop().success());
    assert_released(&ranks, &segments_before);
}

#[test]
fn bad_requests_get_openai_errors_with_the_right_status_and_the_server_keeps_serving() {
    let model = fixture("gpt2");
    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--max-tokens",
        "32",
        "--max-body-bytes",
        "2000",
    ]);
    let raw = |body: &str| match ureq::post(&server.url("/v1/completions"))
        .set("content-type", "application/json")
        .send_string(body)
    {
        Ok(r) => (r.status(), r.into_json::<Value>().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json::<Value>().unwrap()),
        Err(e) => panic!("{e}"),
    };
    let (status, body) = raw("{not json");
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (status, _) = raw(r#"{"prompt": 5}"#);
    assert_eq!(status, 400, "a field of the wrong type");
    let (status, body) = raw(&format!(r#"{{"prompt": "{}"}}"#, "x".repeat(5000)));
    assert_eq!(status, 413, "{body}");
    let (status, body) = raw(r#"{"prompt": "a", "max_tokens": 100000}"#);
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "max_tokens");
    let (status, body) = raw(r#"{"prompt": "a", "top_p": 0}"#);
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("top_p"));
    let (code, body) = server
        .post("/v1/completions", &json!({"model": "gpt-4", "prompt": "a"}))
        .unwrap_err();
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let (code, _) = server
        .post("/v1/chat/completions", &json!({"max_tokens": 3}))
        .unwrap_err();
    assert_eq!(code, 400, "missing messages");
    // This checkpoint has no chat template: a clear 400, not a crash.
    let (code, body) = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap_err();
    assert_eq!(code, 400, "{body}");
    let (code, _) = server
        .post("/v1/embeddings", &json!({"input": "a"}))
        .unwrap_err();
    assert_eq!(code, 400, "a model that generates does not embed");
    // Still serving.
    let ok = server
        .post("/v1/completions", &json!({"prompt": "a", "max_tokens": 2}))
        .unwrap();
    assert_eq!(ok["usage"]["completion_tokens"], 2);
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    // The default model decodes slowly enough for a long request to hold the only place.
    let server = Server::start(&["--max-queue", "1"]);
    let long = {
        let url = server.url("/v1/completions");
        std::thread::spawn(move || {
            ureq::post(&url)
                .send_json(json!({"prompt": "a", "max_tokens": 120, "stream": true}))
                .unwrap()
                .into_string()
                .unwrap()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ureq::get(&server.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
        .contains("parallelformers_queue_depth 1")
    {
        assert!(Instant::now() < deadline, "the long request never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    match ureq::post(&server.url("/v1/completions"))
        .send_json(json!({"prompt": "b", "max_tokens": 1}))
    {
        Err(ureq::Error::Status(503, response)) => {
            assert_eq!(response.header("retry-after"), Some("1"));
            let body: Value = response.into_json().unwrap();
            assert_eq!(body["error"]["type"], "server_error");
        }
        other => panic!("not refused: {:?}", other.map(|r| r.status())),
    }
    assert!(long.join().unwrap().ends_with("data: [DONE]\n\n"));
}

/// Continuous batching: a request that arrives while a long one streams joins the running
/// batch (with other options) and is answered while the long one is still streaming.
#[test]
fn a_request_joins_the_running_batch_and_ends_while_a_longer_one_streams() {
    let server = Server::start(&[]);
    let (first_chunk, first_chunk_seen) = std::sync::mpsc::channel();
    let long = {
        let url = server.url("/v1/completions");
        std::thread::spawn(move || {
            let body = json!({"prompt": "Once upon a time", "max_tokens": 150, "temperature": 0, "stream": true});
            let reader = ureq::post(&url).send_json(body).unwrap().into_reader();
            let mut chunks = Vec::new();
            for line in BufReader::new(reader).lines() {
                let line = line.unwrap();
                if let Some(data) = line.strip_prefix("data: ") {
                    if chunks.is_empty() {
                        let _ = first_chunk.send(());
                    }
                    chunks.push((Instant::now(), data.to_string()));
                }
            }
            chunks
        })
    };
    first_chunk_seen
        .recv_timeout(Duration::from_secs(60))
        .expect("the long request never streamed");
    let short = server
        .post(
            "/v1/completions",
            &json!({"prompt": "The sky is", "max_tokens": 5, "temperature": 0.8, "seed": 3}),
        )
        .unwrap();
    let short_done = Instant::now();
    assert!(short["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    let chunks = long.join().unwrap();
    assert_eq!(chunks.last().unwrap().1, "[DONE]");
    let text_chunks_after = chunks
        .iter()
        .filter(|(at, data)| *at > short_done && data.contains("\"text\""))
        .count();
    assert!(
        text_chunks_after > 0,
        "the long request did not stream after the short one ended ({} chunks)",
        chunks.len()
    );
}

/// A client that goes away mid-stream cancels its sequence: it leaves the batch after a few
/// more tokens instead of decoding to `max_tokens`, and the server goes on serving.
#[test]
fn a_client_that_disconnects_cancels_its_request() {
    let server = Server::start(&[]);
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 150, "temperature": 0, "stream": true});
    let reader = ureq::post(&server.url("/v1/completions"))
        .send_json(body)
        .unwrap()
        .into_reader();
    let mut lines = BufReader::new(reader).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("data: "), "{first}");
    drop(lines);
    let metric = |name: &str| metric(&server, name);
    let deadline = Instant::now() + Duration::from_secs(30);
    let generated = loop {
        match metric("parallelformers_completion_tokens_total") {
            Some(n) if n > 0 => break n,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the cancelled request never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        generated < 100,
        "{generated} tokens generated for a client that left"
    );
    assert_eq!(metric("parallelformers_queue_depth"), Some(0));
    let after = server
        .post(
            "/v1/completions",
            &json!({"prompt": "Hi", "max_tokens": 2, "temperature": 0}),
        )
        .unwrap();
    assert_eq!(after["usage"]["completion_tokens"], 2);
}

/// A value of `/metrics`.
fn metric(server: &Server, name: &str) -> Option<u64> {
    let text = ureq::get(&server.url("/metrics"))
        .call()
        .ok()?
        .into_string()
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
}

/// A second request sharing a prompt's first blocks takes them from the prefix cache and
/// answers the same; `/metrics` counts the hits and misses; `--prefix-cache-mb 0` turns the
/// cache off.
#[test]
fn the_prefix_cache_is_counted_in_metrics_and_a_budget_of_zero_turns_it_off() {
    let model = fixture("gpt2");
    let prompt: Vec<u32> = (0..40).map(|i| (i * 13 + 5) % 300).collect();
    let request = json!({"prompt": prompt, "max_tokens": 4, "temperature": 0});
    let mut answers = Vec::new();
    for (budget, hits, misses) in [("16", 32, 40 + 8), ("0", 0, 0)] {
        let mut server = Server::start(&[
            "--model",
            model.to_str().unwrap(),
            "--ranks",
            "2",
            "--prefix-cache-mb",
            budget,
        ]);
        let first = server.post("/v1/completions", &request).unwrap();
        let second = server.post("/v1/completions", &request).unwrap();
        assert_eq!(first["choices"][0]["text"], second["choices"][0]["text"]);
        answers.push(first["choices"][0]["text"].clone());
        let name = "parallelformers_prefix_cache";
        assert_eq!(
            metric(&server, &format!("{name}_hit_tokens_total")),
            Some(hits),
            "--prefix-cache-mb {budget}"
        );
        assert_eq!(
            metric(&server, &format!("{name}_miss_tokens_total")),
            Some(misses)
        );
        let bytes = metric(&server, &format!("{name}_bytes")).unwrap();
        assert_eq!(bytes > 0, hits > 0, "{bytes} bytes held");
        assert!(bytes <= 16 << 20);
        assert!(server.stop().success());
    }
    assert_eq!(answers[0], answers[1], "the same answer without the cache");
}

#[test]
fn an_api_key_is_required_on_the_api_routes_when_set() {
    let gpt2 = fixture("gpt2");
    let server = Server::start(&["--model", gpt2.to_str().unwrap(), "--api-key", "s3cret-key"]);
    let body = json!({"prompt": "hello", "max_tokens": 2, "temperature": 0});
    let url = server.url("/v1/completions");
    for header in [None, Some("Bearer wrong-key!"), Some("s3cret-key")] {
        let mut request = ureq::post(&url);
        if let Some(value) = header {
            request = request.set("Authorization", value);
        }
        match request.send_json(body.clone()) {
            Err(ureq::Error::Status(401, response)) => {
                let error: Value = response.into_json().unwrap();
                assert_eq!(error["error"]["code"], "invalid_api_key");
            }
            other => panic!("{header:?}: {:?}", other.map(|r| r.status())),
        }
    }
    assert!(matches!(
        ureq::get(&server.url("/v1/models")).call(),
        Err(ureq::Error::Status(401, _))
    ));
    let answer: Value = ureq::post(&url)
        .set("Authorization", "Bearer s3cret-key")
        .send_json(body)
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 2);
    assert_eq!(
        ureq::get(&server.url("/health")).call().unwrap().status(),
        200
    );
}

#[test]
fn chat_completions_apply_the_template_and_stream_on_the_default_model() {
    let server = Server::start(&["--ranks", "2"]);
    let request = json!({
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8,
        "temperature": 0,
    });
    let whole = server.post("/v1/chat/completions", &request).unwrap();
    assert_eq!(whole["object"], "chat.completion");
    let answer = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(answer.contains("Paris"), "{answer}");
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let events = server.stream("/v1/chat/completions", &streamed);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let joined: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(joined, answer);
    // A stop string ends the answer and is left out of it, as OpenAI does.
    let mut stopped = request.clone();
    stopped["stop"] = json!("Paris");
    let cut = server.post("/v1/chat/completions", &stopped).unwrap();
    let text = cut["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        answer.starts_with(text) && !text.contains("Paris"),
        "{text:?} from {answer:?}"
    );
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");

    // A request that names no sampling gets the model's defaults: this GGUF has no
    // generation_config.json, so greedy, as `/v1/models` says and as the CLI's chat answers.
    let models = server.get_json("/v1/models");
    let defaults = &models["data"][0]["sampling_defaults"];
    assert_eq!(defaults["temperature"], 0.0, "{models}");
    assert!(defaults["source"].as_str().unwrap().starts_with("built-in"));
    let plain =
        json!({"messages": [{"role": "user", "content": "What is the capital of France?"}]});
    let served = server.post("/v1/chat/completions", &plain).unwrap();
    let served = served["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(served.contains("Paris"), "{served}");
    let cli = Command::new(common::binary())
        .args(["chat", "--ranks", "2", "What is the capital of France?"])
        .output()
        .unwrap();
    assert!(cli.status.success());
    assert_eq!(String::from_utf8_lossy(&cli.stdout).trim_end(), served);
}

/// The sampling defaults of requests come from the checkpoint's `generation_config.json`.
#[test]
fn requests_that_name_no_sampling_get_the_checkpoints_generation_config() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("gpt2")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let generation = json!({"do_sample": true, "temperature": 0.7, "top_k": 5, "top_p": 0.9});
    std::fs::write(
        dir.path().join("generation_config.json"),
        generation.to_string(),
    )
    .unwrap();
    let server = Server::start(&["--model", dir.path().to_str().unwrap(), "--ranks", "2"]);
    let models = server.get_json("/v1/models");
    let defaults = &models["data"][0]["sampling_defaults"];
    assert_eq!(defaults["source"], "generation_config.json", "{models}");
    assert!((defaults["temperature"].as_f64().unwrap() - 0.7).abs() < 1e-6);
    assert_eq!(defaults["top_k"], 5);
    // Sampled: two seeds give two answers; temperature 0 in the request is greedy again.
    let answer = |extra: Value| {
        let mut request = json!({"prompt": "the model", "max_tokens": 12});
        request
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        server.post("/v1/completions", &request).unwrap()["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let sampled: std::collections::HashSet<String> =
        (0..4).map(|seed| answer(json!({"seed": seed}))).collect();
    assert!(sampled.len() > 1, "{sampled:?}");
    assert_eq!(
        answer(json!({"temperature": 0})),
        answer(json!({"temperature": 0.0}))
    );
}

#[test]
fn a_dead_rank_turns_health_red_requests_get_503_and_the_ranks_come_back() {
    let segments_before = shm_segments();
    let model = fixture("gpt2");
    let mut server = Server::start(&["--model", model.to_str().unwrap(), "--ranks", "2"]);
    let ranks = children(server.child.id());
    // SAFETY: killing a rank process this test started (through the server).
    unsafe { libc::kill(ranks[1] as i32, libc::SIGKILL) };
    let killed = Instant::now();
    loop {
        match ureq::get(&server.url("/health")).call() {
            Err(ureq::Error::Status(503, _)) => break,
            _ => assert!(
                killed.elapsed() < Duration::from_secs(2),
                "/health stayed green"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let asked = Instant::now();
    match ureq::post(&server.url("/v1/completions"))
        .send_json(json!({"prompt": "a", "max_tokens": 4}))
    {
        // The restart was quicker than this request.
        Ok(_) => {}
        Err(ureq::Error::Status(503, response)) => {
            assert!(response.header("Retry-After").is_some());
            let body: Value = response.into_json().unwrap();
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("restarting"), "{message}");
            assert!(asked.elapsed() < Duration::from_secs(1));
        }
        Err(e) => panic!("{e}"),
    }
    // The server restarts its ranks by itself.
    while ureq::get(&server.url("/health")).call().is_err() {
        assert!(killed.elapsed() < Duration::from_secs(30), "no restart");
        std::thread::sleep(Duration::from_millis(50));
    }
    let restarted = children(server.child.id());
    assert_eq!(restarted.len(), 2);
    assert!(server
        .post("/v1/completions", &json!({"prompt": "a", "max_tokens": 4}))
        .is_ok());
    server.stop();
    assert_released(&[ranks, restarted].concat(), &segments_before);
}

/// The official `openai` Python client, unchanged, against the server (completions, chat,
/// streaming, errors) and against an encoder's server (embeddings). `.ci/run` installs it
/// from the Python Package Index and names its interpreter in `PARALLELFORMERS_TEST_PYTHON`;
/// without that variable (a machine without the client) the test says so and does nothing.
#[test]
fn openai_python_client_works_unchanged() {
    let Some(python) = std::env::var_os("PARALLELFORMERS_TEST_PYTHON") else {
        common::skip(
            "openai_python_client_works_unchanged",
            "PARALLELFORMERS_TEST_PYTHON is not set (scripts/test sets it to a Python with the `openai` package)",
            Some("PARALLELFORMERS_REQUIRE_PYTHON_CLIENT"),
        );
        return;
    };
    let server = Server::start(&["--ranks", "2"]);
    let encoder = fixture("embedding");
    let embeddings = Server::start(&["--model", encoder.to_str().unwrap()]);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(&server.base)
        .arg(&embeddings.base)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn embeddings_pool_and_normalise_like_sentence_transformers() {
    let model = fixture("embedding");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("embeddings.json")).unwrap())
            .unwrap();
    let server = Server::start(&["--model", model.to_str().unwrap(), "--ranks", "2"]);
    let answer = server
        .post(
            "/v1/embeddings",
            &json!({"model": "embedding", "input": reference["texts"]}),
        )
        .unwrap();
    assert_eq!(answer["object"], "list");
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, (got, want)) in data
        .iter()
        .zip(reference["embeddings"].as_array().unwrap())
        .enumerate()
    {
        assert_eq!(got["index"], i);
        let (got, want) = (
            got["embedding"].as_array().unwrap(),
            want.as_array().unwrap(),
        );
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!((g - w).abs() < 1e-4, "text {i}: {g} vs {w}");
        }
    }
    let one = server
        .post("/v1/embeddings", &json!({"input": "dog"}))
        .unwrap();
    // Alone or in a padded batch, a text gets the same vector (up to summation order).
    let alone = one["data"][0]["embedding"].as_array().unwrap();
    let batched = answer["data"][2]["embedding"].as_array().unwrap();
    for (a, b) in alone.iter().zip(batched) {
        assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-5);
    }
    let (code, _) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "the cat", "max_tokens": 2}),
        )
        .unwrap_err();
    assert_eq!(code, 400, "an encoder does not complete text");
    let (code, _) = server
        .post(
            "/v1/embeddings",
            &json!({"input": "dog", "encoding_format": "hex"}),
        )
        .unwrap_err();
    assert_eq!(code, 400);
}

/// `loadtest`'s scenarios against the default model, scaled down: the long prompt's size, its
/// time to first token and the streams' latencies before and during it; each chat turn's
/// prompt (the history grows) and time to first token.
#[test]
fn loadtest_scenarios_measure_a_long_prompt_beside_streams_and_each_turn_of_a_chat() {
    let mut server = Server::start(&[]);
    let loadtest = |extra: &[&str]| -> Value {
        let out = common::run(&[&["loadtest", "--url", &server.base, "--json"], extra].concat());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.trim()).unwrap()
    };
    let long = loadtest(&[
        "--scenario",
        "long-prompt",
        "--streams",
        "2",
        "--seconds",
        "1",
        "--long-prompt-tokens",
        "120",
        "--max-tokens",
        "8",
    ]);
    let tokens = long["long_prompt_tokens"].as_u64().unwrap();
    assert!((60..=240).contains(&tokens), "{long}");
    assert!(long["long_ttft_s"].as_f64().unwrap() > 0.0);
    assert!(
        long["itl_before_ms"]["samples"].as_u64().unwrap() > 0,
        "{long}"
    );
    assert!(long["itl_before_ms"]["p50"].as_f64().unwrap() > 0.0);

    let chat = loadtest(&[
        "--scenario",
        "multi-turn",
        "--history-tokens",
        "100",
        "--turns",
        "2",
        "--max-tokens",
        "4",
    ]);
    let turns = chat["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2, "{chat}");
    let prompt = |turn: usize| turns[turn]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt(0) >= 50 && prompt(1) > prompt(0), "{chat}");
    assert!(turns[1]["ttft_s"].as_f64().unwrap() > 0.0);
    assert!(server.stop().success());
}

/// Mixtures of experts in continuous batching, split either way: requests sent together (so
/// that they share decode steps, each token routed to its own experts) get the answers each
/// gets alone, and both splits answer alike.
#[test]
fn a_mixture_of_experts_serves_requests_together_as_alone_split_either_way() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("qwen3_moe");
    for file in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(source.join(file), dir.path().join(file)).unwrap();
    }
    // A byte-level tokenizer whose vocabulary covers the model's 103 ids.
    std::fs::copy(
        fixture("gpt2").join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let model = dir.path().to_str().unwrap();
    let prompts = [
        vec![5, 17, 42, 8],
        vec![60, 3, 99],
        vec![1, 2, 3, 4, 5, 6, 7],
        vec![77],
    ];
    let body = |prompt: &Vec<u32>| json!({"prompt": prompt, "max_tokens": 40, "temperature": 0});
    let mut answers = Vec::new();
    for split in ["tensor", "expert"] {
        let server = Server::start(&["--model", model, "--ranks", "2", "--expert-split", split]);
        let text = |answer: Value| answer["choices"][0]["text"].as_str().unwrap().to_string();
        let alone: Vec<String> = prompts
            .iter()
            .map(|p| text(server.post("/v1/completions", &body(p)).unwrap()))
            .collect();
        let together: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = prompts
                .iter()
                .map(|p| scope.spawn(|| text(server.post("/v1/completions", &body(p)).unwrap())))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(together, alone, "{split}");
        assert!(alone.iter().all(|t| !t.is_empty()), "{alone:?}");
        answers.push(alone);
    }
    assert_eq!(answers[0], answers[1]);
}

/// The tokens a completions answer's legacy `logprobs` lists, and their log-probabilities.
fn completion_scores(choice: &Value) -> (Vec<String>, Vec<f64>) {
    let logprobs = &choice["logprobs"];
    let tokens = logprobs["tokens"].as_array().unwrap();
    let values = logprobs["token_logprobs"].as_array().unwrap();
    (
        tokens.iter().map(|t| t.as_str().unwrap().into()).collect(),
        values.iter().map(|v| v.as_f64().unwrap()).collect(),
    )
}

/// Log-probabilities (chat's and completions' shapes, whole and streamed), `logit_bias` and
/// `stop_token_ids` on GPT-2 at two ranks, with each sequence of the running batch its own
/// biases; bad values get a 400 naming the field, and the server keeps serving.
#[test]
fn logprobs_logit_bias_and_stop_token_ids_in_both_routes() {
    let model = common::copy_fixture("gpt2");
    std::fs::write(
        model.path().join("chat_template.jinja"),
        "{% for message in messages %}{{ message['content'] }}{% endfor %}",
    )
    .unwrap();
    let server = Server::start(&["--model", model.path().to_str().unwrap(), "--ranks", "2"]);
    let tokenizer =
        tokenizers::Tokenizer::from_file(fixture("gpt2").join("tokenizer.json")).unwrap();
    let text_of = |id: u32| tokenizer.decode(&[id], false).unwrap();

    // Completions: `logprobs: 2` lists every token, its offset, and up to 3 alternatives
    // (the 2 most likely and the chosen one).
    let request = json!({"prompt": "the model", "max_tokens": 6, "temperature": 0, "logprobs": 2});
    let whole = server.post("/v1/completions", &request).unwrap();
    let choice = &whole["choices"][0];
    let (tokens, values) = completion_scores(choice);
    assert_eq!(tokens.len(), 6);
    assert!(values.iter().all(|&v| v < 0.0), "{values:?}");
    let offsets: Vec<usize> =
        serde_json::from_value(choice["logprobs"]["text_offset"].clone()).unwrap();
    let lengths: Vec<usize> = tokens.iter().map(|t| t.chars().count()).collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets
        .windows(2)
        .zip(&lengths)
        .all(|(w, l)| w[1] == w[0] + l));
    for (top, (token, value)) in choice["logprobs"]["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(tokens.iter().zip(&values))
    {
        // Keyed by text: tokens that hold part of a character all read "\u{fffd}" and share
        // one key, so there may be fewer entries.
        let top = top.as_object().unwrap();
        assert!((1..=3).contains(&top.len()), "{top:?}");
        assert!(
            top.contains_key(token.as_str()),
            "{top:?} lacks the chosen {token:?}"
        );
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(best, *value, "greedy: the chosen is the most likely");
    }
    // The same numbers stream, chunk by chunk.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let events = server.stream("/v1/completions", &streamed);
    let (mut streamed_tokens, mut streamed_values) = (Vec::new(), Vec::new());
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        if !chunk["choices"][0]["logprobs"].is_null() {
            let (tokens, values) = completion_scores(&chunk["choices"][0]);
            streamed_tokens.extend(tokens);
            streamed_values.extend(values);
        }
    }
    assert_eq!(
        (streamed_tokens, streamed_values),
        (tokens.clone(), values.clone())
    );

    // Chat: `logprobs: true, top_logprobs: 3`, whole and streamed, the same numbers.
    let chat = json!({"messages": [{"role": "user", "content": "the model"}], "max_tokens": 6,
                      "temperature": 0, "logprobs": true, "top_logprobs": 3});
    let answer = server.post("/v1/chat/completions", &chat).unwrap();
    let content = answer["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(content.len(), 6);
    for entry in &content {
        assert!(entry["logprob"].as_f64().unwrap() < 0.0, "{entry}");
        assert_eq!(entry["top_logprobs"].as_array().unwrap().len(), 3);
        assert_eq!(entry["top_logprobs"][0]["token"], entry["token"], "greedy");
        assert_eq!(entry["top_logprobs"][0]["logprob"], entry["logprob"]);
    }
    // The tokens' bytes join into the answer's text (a token may hold part of a character).
    let bytes: Vec<u8> = content
        .iter()
        .flat_map(|e| serde_json::from_value::<Vec<u8>>(e["bytes"].clone()).unwrap())
        .collect();
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(String::from_utf8_lossy(&bytes), text);
    let mut streamed_chat = chat.clone();
    streamed_chat["stream"] = json!(true);
    let events = server.stream("/v1/chat/completions", &streamed_chat);
    let streamed_content: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed_content, content);
    let plain = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 2}),
        )
        .unwrap();
    assert!(plain["choices"][0]["logprobs"].is_null());

    // logit_bias: +100 makes a token every token, -100 bans the greedy first token; two
    // requests running together keep their own biases.
    let biased = |token: u32| {
        let url = server.url("/v1/completions");
        std::thread::spawn(move || {
            let body = json!({"prompt": "the model", "max_tokens": 8, "temperature": 0,
                              "logit_bias": {token.to_string(): 100}});
            ureq::post(&url)
                .send_json(body)
                .unwrap()
                .into_json::<Value>()
                .unwrap()
        })
    };
    let (fifty, sixty) = (biased(50), biased(60));
    for (answer, token) in [(fifty.join().unwrap(), 50), (sixty.join().unwrap(), 60)] {
        assert_eq!(
            answer["choices"][0]["text"],
            text_of(token).repeat(8),
            "bias of {token}"
        );
    }
    let first = &tokens[0];
    let first_id = (0..300).find(|&id| &text_of(id) == first).unwrap();
    let banned = json!({"prompt": "the model", "max_tokens": 6, "temperature": 0, "logprobs": 0,
                        "logit_bias": {first_id.to_string(): -100}});
    let without_first = server.post("/v1/completions", &banned).unwrap();
    assert_ne!(&completion_scores(&without_first["choices"][0]).0[0], first);

    // stop_token_ids: the biased token ends the sequence at once, as an end-of-sequence id;
    // stop strings still work beside it.
    let stopping = json!({"prompt": "the model", "max_tokens": 8, "temperature": 0,
                          "logit_bias": {"50": 100}, "stop_token_ids": [50]});
    let stopped = server.post("/v1/completions", &stopping).unwrap();
    assert_eq!(stopped["usage"]["completion_tokens"], 1);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    let mut by_string = stopping.clone();
    by_string.as_object_mut().unwrap().remove("stop_token_ids");
    by_string["stop"] = json!(text_of(50).repeat(3));
    let cut = server.post("/v1/completions", &by_string).unwrap();
    assert_eq!(cut["choices"][0]["text"], "");
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");

    // Bad values: 400 naming the field, for both routes.
    let message = json!([{"role": "user", "content": "a"}]);
    for (path, body, field) in [
        (
            "/v1/completions",
            json!({"prompt": "a", "logit_bias": {"x1": 5}}),
            "logit_bias",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "logit_bias": {"300": 5}}),
            "logit_bias",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": message, "logit_bias": {"5": -101}}),
            "logit_bias",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "logprobs": 6}),
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": message, "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": message, "top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "stop_token_ids": [300]}),
            "stop_token_ids",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": message, "stop_token_ids": [1, 999]}),
            "stop_token_ids",
        ),
    ] {
        let (code, error) = server.post(path, &body).unwrap_err();
        assert_eq!(
            (code, error["error"]["param"].as_str()),
            (400, Some(field)),
            "{body}: {error}"
        );
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
    let ok = server
        .post("/v1/completions", &json!({"prompt": "a", "max_tokens": 2}))
        .unwrap();
    assert_eq!(ok["usage"]["completion_tokens"], 2);
}
