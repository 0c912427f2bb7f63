//! The attack suite: `parallelformers serve` under hostile clients. Each test replays one family
//! of attacks on a server of a tiny fixture (short timeouts, so the suite is quick), then checks
//! that the server still answers a normal request (`/health` and a small completion).
//!
//! HTTP side: connection floods beyond `--max-connections`, idle connections, half heads, half
//! bodies, idle keep-alive, an oversized `Content-Length`, and the OpenAI conformance points a
//! client can trip over (unknown routes and methods, the `Authorization` scheme, out-of-range
//! sampling fields, token-id prompts, chat content parts and roles, live memory in `/metrics`).
//!
//! Model side: hundreds of sequences cancelled at random moments (the deadlock between the
//! launcher and rank 0 that once wedged the server), request shapes beyond the batch's rows and
//! memory, a rank killed under load (the server restarts it), and SIGTERM while streams run or
//! with a frozen rank (the process ends within the grace and leaves nothing).
//!
//! Every loop is bounded in count and time. `PARALLELFORMERS_ATTACK_SCALE` (default 1, the CI
//! run: a few hundred connections, a few rounds of each model attack) multiplies the number of
//! connections and rounds; by hand, e.g. 20 gives thousands (figures in BENCHMARKS.md).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::server::{children, Server};
use common::{assert_all_gone, fixture};
use serde_json::{json, Value};

/// The header, body and keep-alive timeouts the servers of this suite run with.
const TIMEOUT: Duration = Duration::from_secs(1);

/// How long past a timeout a connection may take to be closed.
const MARGIN: Duration = Duration::from_secs(2);

/// The multiplier of connection counts (`PARALLELFORMERS_ATTACK_SCALE`, default 1).
fn scale() -> usize {
    std::env::var("PARALLELFORMERS_ATTACK_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1usize)
        .clamp(1, 100)
}

/// A server of the `gpt2` fixture at two ranks, with one-second timeouts and `extra` flags.
fn start(extra: &[&str]) -> Server {
    let model = fixture("gpt2");
    let seconds = TIMEOUT.as_secs().to_string();
    let mut args = vec!["--model", model.to_str().unwrap(), "--ranks", "2"];
    for flag in [
        "--header-timeout-seconds",
        "--body-timeout-seconds",
        "--keep-alive-seconds",
    ] {
        args.extend([flag, seconds.as_str()]);
    }
    args.extend(extra);
    Server::start(&args)
}

/// Asserts that the server answers `/health` and a small completion, each within 30 s (a
/// wedged server fails the test instead of hanging it).
fn assert_serving(server: &Server) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let health = agent.get(&server.url("/health")).call().unwrap();
    assert_eq!(health.status(), 200);
    let answer: Value = agent
        .post(&server.url("/v1/completions"))
        .send_json(json!({"prompt": "the model", "max_tokens": 2, "temperature": 0}))
        .expect("a normal request is answered")
        .into_json()
        .unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 2, "{answer}");
}

/// `host:port` of the server.
fn address(server: &Server) -> &str {
    server.base.trim_start_matches("http://")
}

/// A raw connection to the server.
fn connect(server: &Server) -> TcpStream {
    TcpStream::connect_timeout(&address(server).parse().unwrap(), Duration::from_secs(5)).unwrap()
}

/// A raw connection and when it was opened.
struct Opened {
    at: Instant,
    stream: TcpStream,
}

/// `count` raw connections opened from several threads, each sent `first` (may be empty);
/// those that cannot connect within [`MARGIN`] are left out. (On loopback a new connection now
/// and then meets a TIME_WAIT left by an earlier one and waits a second for its SYN to be sent
/// again; several threads keep that from holding up the rest.)
fn open_many(server: &Server, count: usize, first: &[u8]) -> Vec<Opened> {
    let address = address(server).parse().unwrap();
    let threads = 8;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t..count)
                        .step_by(threads)
                        .filter_map(|_| {
                            let mut stream = TcpStream::connect_timeout(&address, MARGIN).ok()?;
                            let at = Instant::now();
                            stream.write_all(first).ok()?;
                            Some(Opened { at, stream })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

/// Open descriptors of process `pid`.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Raises this process's soft open-file limit to its hard limit (the flood holds many sockets).
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit read and write one `rlimit`, a live local of that type.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// One response read off a raw connection: status, head and body (by `Content-Length`);
/// `None` when the connection closes (or `within` passes) before a whole response.
fn read_response(stream: &mut TcpStream, within: Duration) -> Option<(u16, String, String)> {
    let deadline = Instant::now() + within;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                let status = head.split_whitespace().nth(1)?.parse().ok()?;
                return Some((status, head.to_string(), body[..length].to_string()));
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok()?;
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
}

/// How long, from `since`, until the server closed `stream` (bytes it sends are skipped);
/// `None` if it is still open at `since + within`.
fn closed_after(stream: &mut TcpStream, since: Instant, within: Duration) -> Option<Duration> {
    let mut chunk = [0u8; 4096];
    loop {
        let left = (since + within).checked_duration_since(Instant::now())?;
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => return Some(since.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None
            }
            Err(_) => return Some(since.elapsed()),
        }
    }
}

/// A flood of idle connections beyond `--max-connections`: the excess is answered 503 and
/// closed at once, the held ones are closed after the header timeout, and the server's
/// descriptors come back to where they were.
#[test]
fn a_connection_flood_beyond_the_cap_is_refused_and_released() {
    raise_descriptor_limit();
    let cap = 100 * scale();
    let flood = 3 * cap;
    let server = start(&["--max-connections", &cap.to_string()]);
    assert_serving(&server);
    let pid = server.child.id();
    let before = descriptors(pid);

    let opened = Instant::now();
    let sockets = open_many(&server, flood, b"");
    let connected = sockets.len();
    let connecting = opened.elapsed();
    // Those over the cap have their 503 waiting; the held ones hear nothing.
    std::thread::sleep(Duration::from_millis(200));
    let during = descriptors(pid);
    let (mut busy, mut closed) = (0, 0);
    let mut held = Vec::new();
    for mut socket in sockets {
        socket.stream.set_nonblocking(true).unwrap();
        let mut first = [0u8; 12];
        match socket.stream.read(&mut first) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => held.push(socket),
            Ok(n) if first[..n].starts_with(b"HTTP/1.1 503") => busy += 1,
            // Held, then closed by the header timeout while the flood was still opening.
            Ok(0) | Err(_) => closed += 1,
            Ok(n) => panic!("{:?}", String::from_utf8_lossy(&first[..n])),
        }
    }
    eprintln!(
        "flood of {flood} connections ({connected} connected in {connecting:?}): {} held, \
         {busy} answered 503, {closed} closed without an answer; server descriptors {before} \
         before, {during} during",
        held.len()
    );
    assert!(held.len() <= cap, "{} held over a cap of {cap}", held.len());
    assert!(
        busy > 0 && busy >= connected - cap - closed,
        "only {busy} answered 503"
    );
    assert!(
        during <= before + cap + 8,
        "{during} descriptors during the flood"
    );

    // The held connections sent nothing: closed after the header timeout.
    let mut longest = Duration::ZERO;
    for socket in &mut held {
        socket.stream.set_nonblocking(false).unwrap();
        let closed = closed_after(&mut socket.stream, socket.at, TIMEOUT + MARGIN)
            .expect("an idle connection outlived the header timeout");
        longest = longest.max(closed);
    }
    eprintln!("held connections closed at most {longest:?} after opening");
    drop(held);
    let deadline = Instant::now() + MARGIN;
    let after = loop {
        let now = descriptors(pid);
        if now <= before + 2 || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("server descriptors {after} after the flood");
    assert!(
        after <= before + 2,
        "{after} descriptors after, {before} before"
    );
    assert_serving(&server);
}

/// Clients that connect and then send slowly or nothing: idle connections and half heads are
/// closed after the header timeout (a head dripped a byte at a time included), half bodies get
/// 408 after the body timeout, and idle keep-alive connections close after the keep-alive
/// timeout (but not before: a second request inside it is served).
#[test]
fn slow_and_idle_clients_are_cut_off_by_the_timeouts() {
    raise_descriptor_limit();
    let count = 20 * scale();
    let server = start(&["--max-connections", &(3 * count + 16).to_string()]);
    let started = Instant::now();
    let idle = open_many(&server, count, b"");
    let half_heads = open_many(
        &server,
        count,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty",
    );
    let half_bodies = open_many(
        &server,
        count,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
          content-length: 100\r\n\r\n{\"prompt\": ",
    );
    assert_eq!(
        idle.len() + half_heads.len() + half_bodies.len(),
        3 * count,
        "connections failed to open"
    );
    // One head dripped a byte every 100 ms: the header timeout runs from the connection's
    // start, so the drip does not keep it open (writes fail once the server has closed it).
    let mut drip = connect(&server);
    let dripping = Instant::now();
    let head =
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let cut = head.iter().find_map(|byte| {
        std::thread::sleep(Duration::from_millis(100));
        drip.write_all(&[*byte])
            .is_err()
            .then(|| dripping.elapsed())
    });
    let cut = cut.expect("a head dripped over 7 s was read to its end");
    eprintln!("a dripped head was cut off after {cut:?}");
    assert!(cut < TIMEOUT + MARGIN, "{cut:?}");

    for (what, sockets) in [("an idle", idle), ("a half-head", half_heads)] {
        for mut socket in sockets {
            let closed = closed_after(&mut socket.stream, socket.at, TIMEOUT + MARGIN)
                .unwrap_or_else(|| panic!("{what} connection stayed open"));
            assert!(
                closed >= TIMEOUT,
                "{what} connection closed after {closed:?}"
            );
        }
    }
    for mut socket in half_bodies {
        let (status, _, body) =
            read_response(&mut socket.stream, TIMEOUT + MARGIN).expect("no answer to a half body");
        assert_eq!(status, 408, "{body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert!(error["error"]["message"].as_str().unwrap().contains("body"));
        let closed = closed_after(&mut socket.stream, socket.at, TIMEOUT + MARGIN);
        assert!(closed.is_some(), "a connection stayed open after its 408");
    }
    eprintln!(
        "{count} idle, {count} half-head and {count} half-body connections ended {:?} after \
         the first opened",
        started.elapsed()
    );

    let mut keep_alive = connect(&server);
    let request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    keep_alive.write_all(request).unwrap();
    assert_eq!(read_response(&mut keep_alive, MARGIN).unwrap().0, 200);
    std::thread::sleep(TIMEOUT / 2);
    keep_alive.write_all(request).unwrap();
    assert_eq!(
        read_response(&mut keep_alive, MARGIN).unwrap().0,
        200,
        "the connection was not kept alive"
    );
    let answered = Instant::now();
    let closed = closed_after(&mut keep_alive, answered, TIMEOUT + MARGIN)
        .expect("an idle keep-alive connection stayed open");
    eprintln!("an idle keep-alive connection closed {closed:?} after its last answer");
    assert!(closed >= TIMEOUT - Duration::from_millis(100), "{closed:?}");
    assert_serving(&server);
}

/// A `Content-Length` over `--max-body-bytes` is answered 413 before any of the body is read
/// (well within a second), and the connection is closed.
#[test]
fn an_oversized_content_length_is_refused_at_once() {
    let server = start(&["--max-body-bytes", "4096"]);
    for length in ["4097", "99999999999999"] {
        let mut socket = connect(&server);
        let asked = Instant::now();
        write!(
            socket,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
             content-length: {length}\r\n\r\n"
        )
        .unwrap();
        let (status, head, body) =
            read_response(&mut socket, Duration::from_secs(5)).expect("no answer");
        let took = asked.elapsed();
        eprintln!("Content-Length {length}: {status} after {took:?}");
        assert_eq!(status, 413, "{head}\n{body}");
        assert!(took < Duration::from_millis(500), "{took:?}");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert!(error["error"]["message"].as_str().unwrap().contains(length));
        assert!(closed_after(&mut socket, asked, MARGIN).is_some());
    }
    assert_serving(&server);
}

/// What a request got: its status, the headers the conformance points look at, and its JSON
/// body.
struct Answer {
    status: u16,
    /// `WWW-Authenticate`.
    challenge: Option<String>,
    /// `Allow`.
    allow: Option<String>,
    body: Value,
}

/// Sends a request with `method`, `path`, an optional `Authorization` value and an optional
/// JSON body.
fn call(
    server: &Server,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Option<&Value>,
) -> Answer {
    let mut request = ureq::request(method, &server.url(path));
    if let Some(value) = authorization {
        request = request.set("Authorization", value);
    }
    let answer = match body {
        Some(body) => request.send_json(body.clone()),
        None => request.call(),
    };
    let response = match answer {
        Ok(response) | Err(ureq::Error::Status(_, response)) => response,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let header = |name: &str| response.header(name).map(str::to_string);
    let (status, challenge, allow) = (
        response.status(),
        header("www-authenticate"),
        header("allow"),
    );
    let text = response.into_string().unwrap();
    Answer {
        status,
        challenge,
        allow,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

/// Unknown routes are 404 and wrong methods 405 (with `Allow`), with OpenAI error bodies; the
/// API key's scheme is matched in any case and every 401 names the Bearer scheme.
#[test]
fn routes_methods_and_the_api_key_answer_as_openai_does() {
    let server = start(&["--api-key", "k3y"]);
    for (method, path) in [("GET", "/nope"), ("POST", "/v1/nothing"), ("GET", "/v1")] {
        let answer = call(&server, method, path, Some("Bearer k3y"), None);
        let body = &answer.body;
        assert_eq!(answer.status, 404, "{method} {path}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(
            body["error"]["message"],
            format!("Invalid URL ({method} {path})")
        );
    }
    for (method, path, allow) in [
        ("GET", "/v1/completions", "POST"),
        ("DELETE", "/health", "GET,HEAD"),
    ] {
        let answer = call(&server, method, path, Some("Bearer k3y"), None);
        let body = &answer.body;
        assert_eq!(answer.status, 405, "{method} {path}: {body}");
        assert_eq!(answer.allow.as_deref(), Some(allow));
        assert!(body["error"]["message"].as_str().unwrap().contains(method));
    }
    let completion = json!({"prompt": "a", "max_tokens": 1});
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let key = format!("{scheme} k3y");
        let answer = call(
            &server,
            "POST",
            "/v1/completions",
            Some(&key),
            Some(&completion),
        );
        assert_eq!(answer.status, 200, "{key}: {}", answer.body);
    }
    for presented in [None, Some("Bearer wrong"), Some("Basic k3y"), Some("k3y")] {
        let answer = call(
            &server,
            "POST",
            "/v1/completions",
            presented,
            Some(&completion),
        );
        assert_eq!(answer.status, 401, "{presented:?}");
        assert_eq!(answer.challenge.as_deref(), Some("Bearer"), "{presented:?}");
        assert_eq!(answer.body["error"]["code"], "invalid_api_key");
    }
    let answer = call(&server, "GET", "/v1/models", None, None);
    assert_eq!(
        (answer.status, answer.challenge.as_deref()),
        (401, Some("Bearer"))
    );
    assert_eq!(
        ureq::get(&server.url("/health")).call().unwrap().status(),
        200
    );
}

/// Out-of-range sampling fields are refused naming the field and value; a prompt of token ids
/// is taken (ids checked against the vocabulary); several prompts stay refused.
#[test]
fn completions_check_sampling_fields_and_take_token_id_prompts() {
    let server = start(&[]);
    let refused = |body: Value, param: &str, mentions: &str| {
        let (code, error) = server.post("/v1/completions", &body).unwrap_err();
        assert_eq!(code, 400, "{body}: {error}");
        assert_eq!(error["error"]["param"], param, "{body}: {error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(mentions), "{body}: {message}");
    };
    refused(
        json!({"prompt": "a", "temperature": 2.5}),
        "temperature",
        "2.5",
    );
    refused(
        json!({"prompt": "a", "temperature": -1}),
        "temperature",
        "-1",
    );
    refused(json!({"prompt": "a", "top_p": 0}), "top_p", "0");
    refused(json!({"prompt": "a", "top_p": 1.5}), "top_p", "1.5");
    refused(
        json!({"prompt": "a", "repetition_penalty": -2}),
        "repetition_penalty",
        "-2",
    );
    refused(json!({"prompt": "a", "n": 0}), "n", "0");
    refused(json!({"prompt": [1, 300]}), "prompt", "300");
    refused(json!({"prompt": [1, -1]}), "prompt", "-1");
    refused(json!({"prompt": []}), "prompt", "empty");
    refused(
        json!({"prompt": ["a", "b"]}),
        "prompt",
        "one prompt per request",
    );
    refused(
        json!({"prompt": [[1, 2], [3]]}),
        "prompt",
        "one prompt per request",
    );

    for prompt in [json!([1, 2, 3]), json!([[1, 2, 3]])] {
        let body = json!({"prompt": prompt, "max_tokens": 2, "temperature": 0});
        let answer = server.post("/v1/completions", &body).unwrap();
        assert_eq!(answer["usage"]["prompt_tokens"], 3, "{prompt}");
        assert_eq!(answer["usage"]["completion_tokens"], 2);
    }
    assert_serving(&server);
}

/// Chat content as a list of text parts is the same as the texts joined by newlines; other
/// parts, empty conversations and unknown roles are refused by name; `developer` is taken as
/// `system` by a template that does not know it.
#[test]
fn chat_takes_content_parts_and_checks_roles() {
    // A tiny llama whose GGUF carries a ChatML template (9 heads, 3 key/value heads: 3 ranks).
    let model = fixture("gguf").join("tiny_llama_q8_0.gguf");
    let server = Server::start(&["--model", model.to_str().unwrap(), "--ranks", "3"]);
    let chat = |messages: Value| {
        let body = json!({"messages": messages, "max_tokens": 4, "temperature": 0});
        server.post("/v1/chat/completions", &body)
    };
    let joined = chat(json!([{"role": "user", "content": "Say hi.\nPlease."}])).unwrap();
    let parts = chat(json!([{"role": "user", "content": [
        {"type": "text", "text": "Say hi."},
        {"type": "text", "text": "Please."},
    ]}]))
    .unwrap();
    assert_eq!(parts["usage"], joined["usage"]);
    assert_eq!(
        parts["choices"][0]["message"],
        joined["choices"][0]["message"]
    );

    let system = chat(json!([
        {"role": "system", "content": "You are a fox."},
        {"role": "user", "content": "Say hi."},
    ]))
    .unwrap();
    let developer = chat(json!([
        {"role": "developer", "content": "You are a fox."},
        {"role": "user", "content": "Say hi."},
    ]))
    .unwrap();
    assert_eq!(developer["usage"], system["usage"]);
    assert_eq!(developer["choices"], system["choices"]);

    let refused = |messages: Value, param: &str, mentions: &str| {
        let (code, error) = chat(messages.clone()).unwrap_err();
        assert_eq!(code, 400, "{messages}: {error}");
        assert_eq!(error["error"]["param"], param, "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(mentions), "{message}");
    };
    for part in [
        json!({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}),
        json!({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}),
    ] {
        let kind = part["type"].as_str().unwrap().to_string();
        let messages = json!([{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]);
        refused(messages, "messages[0].content[1]", &kind);
    }
    refused(json!([]), "messages", "at least one");
    refused(
        json!([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]),
        "messages[1].role",
        "wizard",
    );
    let (code, error) = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "a"}], "temperature": 3}),
        )
        .unwrap_err();
    assert_eq!(
        (code, &error["error"]["param"]),
        (400, &json!("temperature"))
    );
    assert_serving(&server);
}

/// `/metrics` reads each rank's resident memory (and the server's) when scraped: the figures
/// match what `/proc` says of the processes now.
#[test]
fn metrics_show_the_memory_processes_hold_when_scraped() {
    let server = start(&[]);
    assert_serving(&server);
    let metrics = ureq::get(&server.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let value = |prefix: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
    };
    let resident_now = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb * 1024
    };
    let close = |shown: u64, now: u64| shown.abs_diff(now) * 5 < now;
    let ranks: u64 = (0..2)
        .map(|rank| {
            value(&format!(
                "parallelformers_rank_memory_bytes{{rank=\"{rank}\",kind=\"resident\"}}"
            ))
        })
        .sum();
    let ranks_now: u64 = children(server.child.id())
        .into_iter()
        .map(resident_now)
        .sum();
    assert!(close(ranks, ranks_now), "shown {ranks}, now {ranks_now}");
    let own = value("process_resident_memory_bytes");
    let own_now = resident_now(server.child.id());
    assert!(close(own, own_now), "shown {own}, now {own_now}");
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
    let address = address(server);
    let mut stream = connect(server);
    let body = body.to_string();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    stream
}

/// Streams a completion of `body` on a raw connection from a thread of its own, which returns
/// everything that arrived before the server closed the connection.
fn stream_in_background(server: &Server, body: Value) -> std::thread::JoinHandle<String> {
    let mut stream = post_raw(server, "/v1/completions", &body);
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text
    })
}

/// Like [`stream_in_background`], but returns once the stream's first token has arrived (so
/// that it is running, however loaded the machine), the text so far included in what the
/// thread returns.
fn stream_started_in_background(server: &Server, body: Value) -> std::thread::JoinHandle<String> {
    let mut stream = post_raw(server, "/v1/completions", &body);
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut start = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&start).contains("\"text\"") {
        match stream.read(&mut byte) {
            Ok(1) => start.push(byte[0]),
            _ => break,
        }
    }
    std::thread::spawn(move || {
        let mut text = String::from_utf8_lossy(&start).into_owned();
        let _ = stream.read_to_string(&mut text);
        text
    })
}

/// The private directory of the server whose rank 0 is `rank`, from the rendezvous socket's path
/// in the rank's environment; already removed once every rank has connected.
fn rendezvous_dir(rank: u32) -> std::path::PathBuf {
    let socket =
        common::process_env(rank, "PARALLELFORMERS_RENDEZVOUS").expect("the rendezvous path");
    let directory = std::path::Path::new(&socket)
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(
        !directory.exists(),
        "{} is still there while the server runs",
        directory.display()
    );
    directory
}

/// Sends SIGTERM and asserts that the server exits successfully within a grace of 1 s plus a
/// few seconds; returns how long it took.
fn stop_within_the_grace(server: &mut Server) -> Duration {
    let signalled = Instant::now();
    let status = server.stop();
    let took = signalled.elapsed();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(1 + 6), "stopping took {took:?}");
    took
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
    assert_serving(&server);
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

    for (request, limit) in [
        (
            json!({"prompt": "a", "n": 65, "max_tokens": 2}),
            "--max-batch",
        ),
        (
            json!({"prompt": "a", "n": 64, "max_tokens": 60}),
            "--batch-memory-mib",
        ),
    ] {
        let (code, body) = server.post("/v1/completions", &request).unwrap_err();
        assert_eq!(code, 400, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(limit), "{message}");
    }

    // Each fits alone (24 rows of one reserved cache row each), two do not fit together:
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
        println!(
            "rank {pid}: peak resident memory grew by {:.1} MiB under a {budget_mib} MiB batch budget",
            growth as f64 / (1 << 20) as f64
        );
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
    assert_serving(&server);
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
                stream_in_background(&server, body)
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
        let healed = killed.elapsed();
        assert_serving(&server);
        println!(
            "restart {round}: outage seen on /health: {saw_outage}; serving again {:.2} s after the kill",
            healed.as_secs_f64()
        );
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
    let directory = rendezvous_dir(ranks[0]);
    let streams: Vec<_> = (0..2)
        .map(|_| {
            // Far longer than the grace.
            let body =
                json!({"prompt": "Once upon a time", "n": 4, "max_tokens": 2000, "stream": true});
            stream_started_in_background(&server, body)
        })
        .collect();
    let took = stop_within_the_grace(&mut server);
    println!(
        "SIGTERM with streams running, grace 1 s: stopped in {:.2} s",
        took.as_secs_f64()
    );
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
    let directory = rendezvous_dir(ranks[0]);
    let body = json!({"prompt": "Once upon a time", "max_tokens": 2000, "stream": true});
    let reader = stream_in_background(&server, body);
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: freezing a rank process of the server this test started.
    unsafe { libc::kill(ranks[1] as i32, libc::SIGSTOP) };
    let took = stop_within_the_grace(&mut server);
    println!(
        "SIGTERM with a frozen rank, grace 1 s: stopped in {:.2} s",
        took.as_secs_f64()
    );
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
