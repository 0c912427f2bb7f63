//! `parallelformers serve`: an OpenAI-compatible HTTP server (axum on tokio) over a parallel
//! model. Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream:
//! true` as server-sent events ending in `data: [DONE]`), `GET /v1/models`, `GET /health`,
//! `GET /metrics` (Prometheus text). Connections are served by [`connections`], which bounds
//! how many a client may hold and how long it may take to send a request.
//!
//! One thread owns the model ([`scheduler`]); handlers queue jobs to it and relay its events.
//! Requests join the running batch between decode steps and leave it when they end (continuous
//! batching, [`ParallelModel::generate_session`]). A full queue
//! answers 503 with `Retry-After`; SIGINT/SIGTERM stop accepting, let running requests finish
//! within a grace period, and stop every rank.

pub mod admission;
pub mod connections;
pub mod guards;
pub mod input;
pub mod logprobs;
pub mod metrics;
pub mod openai;
pub mod pooling;
pub mod scheduler;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use crate::api::ParallelModel;
use crate::checkpoint::source::WeightsLocation;
use crate::error::{Error, Result};
use crate::generation::constraint::Grammars;
use crate::generation::GenerationConfig;
use crate::text::TextSide;
use admission::BatchLimits;
use connections::ConnectionLimits;
use input::Prompt;
use logprobs::TokenScore;
use openai::{ApiError, ChatRequest, CompletionRequest, FinishReason, Route, Sampling};
use pooling::Pooling;
use scheduler::{EmbedJob, Event, GenerateJob, Job, Shared};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on.
    pub address: SocketAddr,
    /// The name clients use for the model (`/v1/models`).
    pub model_name: String,
    /// Most requests waiting or running; more get 503.
    pub max_queue: usize,
    /// Most new tokens a request may ask for.
    pub max_tokens_limit: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// How long running requests may go on after a stop signal.
    pub grace: Duration,
    /// When set, every `/v1/` request must carry it as `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Most sequences decoded together (and so most choices, `n`, per request).
    pub max_batch: usize,
    /// Memory the running batch may take on each rank, in bytes (`None`: a quarter of the
    /// memory available at start, shared by the ranks).
    pub batch_memory_bytes: Option<u64>,
    /// Bounds on the connections clients hold (count, header, body and keep-alive timeouts).
    pub connections: ConnectionLimits,
}

/// How long the model thread may take to stop its ranks once the server has stopped, before
/// they are killed.
const MODEL_STOP: Duration = Duration::from_secs(7);
/// How long the connections get, once running requests were cut at the end of the grace
/// period, to carry their last events.
const LAST_WORDS: Duration = Duration::from_secs(2);

/// What every handler reads.
struct AppState {
    jobs: Mutex<Sender<Job>>,
    shared: Arc<Shared>,
    config: ServeConfig,
    text: Arc<TextSide>,
    defaults: GenerationConfig,
    context: usize,
    /// How an encoder's embeddings are pooled; `None` for models that generate.
    pooling: Option<Pooling>,
    /// What the running batch may hold.
    limits: BatchLimits,
    /// The sampling of a request that names none, as `/v1/models` states it.
    sampling: Value,
    /// The model's vocabulary (its logits' width), which bounds `logit_bias` and
    /// `stop_token_ids`.
    vocab_size: usize,
    /// The model's end-of-sequence ids, which `stop_token_ids` join.
    eos_token_ids: Vec<u32>,
    /// Compiles `response_format`s, to refuse those that do not compile before queueing.
    grammars: Grammars,
}

/// Serves `model` until SIGINT or SIGTERM; `on_ready` is called with the bound address.
pub fn serve(
    model: ParallelModel,
    config: ServeConfig,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    let text = Arc::new(TextSide::load(model.model())?.ok_or_else(|| {
        Error::InvalidInput(format!(
            "{} has no tokenizer, so it cannot be served",
            model.model().location.path().display()
        ))
    })?);
    if model.config().is_causal() {
        model.check_sessions()?;
    }
    let shared = Arc::new(Shared::new());
    shared
        .metrics
        .set_ranks(model.load_report().to_vec(), model.worker_pids());
    let defaults = model.generation_config().clone();
    let sampling = openai::sampling_defaults(&defaults, defaults_source(&model.model().location));
    tracing::info!(%sampling, "sampling defaults of requests that name none");
    let context = model.config().generation_context();
    let pooling = match (&model.model().location, model.config().is_causal()) {
        (_, true) => None,
        (WeightsLocation::Safetensors(dir), false) => Some(Pooling::from_model_dir(dir)?),
        (WeightsLocation::Gguf(_), false) => None,
    };
    let ranks = model.load_report().len();
    let limits = BatchLimits::new(
        model.config(),
        ranks,
        config.max_batch,
        config.batch_memory_bytes,
    )?;
    tracing::info!(
        max_batch = limits.max_rows,
        batch_memory_mib = limits.memory_bytes >> 20,
        "batch limits"
    );
    let (jobs, queue) = std::sync::mpsc::channel();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Launch(format!("cannot start the server's runtime: {e}")))?;
    let state = Arc::new(AppState {
        jobs: Mutex::new(jobs),
        shared: shared.clone(),
        config: config.clone(),
        text: text.clone(),
        defaults,
        context,
        pooling,
        limits: limits.clone(),
        sampling,
        vocab_size: model.config().vocab_size,
        eos_token_ids: model.model().eos_token_ids.clone(),
        grammars: Grammars::from_tokenizer(text.tokenizer.clone(), model.config().vocab_size),
    });
    let model_thread = std::thread::Builder::new()
        .name("model".into())
        .spawn({
            let shared = shared.clone();
            move || scheduler::run(model, text, queue, shared, limits)
        })
        .map_err(|e| Error::Launch(format!("cannot start the model thread: {e}")))?;
    let served = runtime.block_on(async {
        let listener = connections::bind(config.address)
            .map_err(|e| Error::Launch(format!("cannot listen on {}: {e}", config.address)))?;
        let address = listener
            .local_addr()
            .map_err(|e| Error::Launch(format!("no local address: {e}")))?;
        on_ready(address);
        let app = router(state.clone());
        let server =
            connections::serve_connections(listener, app, config.connections, stop_signal());
        let server = async {
            server
                .await
                .map_err(|e| Error::Launch(format!("the server failed: {e}")))
        };
        tokio::pin!(server);
        // Running requests get the grace period after the signal; then they are cut (each
        // hears an error), and the connections get a moment to carry that.
        tokio::select! {
            result = &mut server => result,
            _ = async { stop_signal().await; tokio::time::sleep(config.grace).await } => {
                shared.stop();
                let _ = tokio::time::timeout(LAST_WORDS, &mut server).await;
                Ok(())
            }
        }
    });
    // Closing the queue lets the model thread finish its batch and stop the ranks.
    shared.stop();
    drop(state);
    runtime.shutdown_timeout(Duration::from_secs(1));
    stop_model_thread(model_thread);
    served
}

/// Waits for the model thread to stop its ranks; past [`MODEL_STOP`] (a rank that never
/// answers holds it), kills the ranks, which ends the thread's wait, and removes their files
/// even if the thread does not get to it.
fn stop_model_thread(thread: std::thread::JoinHandle<()>) {
    let patience = |limit: Duration| {
        let deadline = Instant::now() + limit;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        thread.is_finished()
    };
    if !patience(MODEL_STOP) {
        tracing::error!("the ranks did not stop in time; killing them");
        crate::parallel::launcher::end_every_group();
        if !patience(Duration::from_secs(2)) {
            return;
        }
    }
    let _ = thread.join();
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => return interrupt.await.unwrap_or(()),
        };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate.recv() => {}
    }
}

fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(
            state.config.api_key.clone(),
            guards::require_api_key,
        ));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(guards::wrong_method)
        .fallback(guards::no_such_route)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            limit,
            guards::refuse_declared_oversize,
        ))
        .with_state(state)
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": state.config.model_name,
        "object": "model",
        "created": openai::now(),
        "owned_by": "parallelformers",
        "max_model_len": state.context,
        "sampling_defaults": state.sampling,
    }]}))
}

/// Where the sampling defaults of requests come from: the checkpoint's `generation_config.json`,
/// else transformers' defaults, which are greedy.
fn defaults_source(location: &WeightsLocation) -> &'static str {
    match location {
        WeightsLocation::Safetensors(dir) if dir.join("generation_config.json").is_file() => {
            "generation_config.json"
        }
        _ => "built-in: greedy (the checkpoint has no generation_config.json)",
    }
}

/// 200 `{"status": "ok"}` while the ranks run, 503 `{"status": "down"}` from a rank's failure
/// until they run again; both with the number of restarts so far.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let restarts = state.shared.metrics.restarts();
    match state.shared.healthy.load(Ordering::Relaxed) {
        true => (
            StatusCode::OK,
            Json(json!({"status": "ok", "restarts": restarts})),
        )
            .into_response(),
        false => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "down", "restarts": restarts})),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> String {
    state.shared.metrics.render()
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Json<CompletionRequest>, JsonRejection>,
) -> Response {
    let result = match body {
        Ok(Json(request)) => match (completion_prompt(&state, &request), request.logprobs()) {
            (Ok(ids), Ok(logprobs)) => {
                let sampling = &request.sampling;
                respond(&state, Route::Completions, ids, sampling, logprobs, 16).await
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        },
        Err(rejection) => Err(rejected(rejection)),
    };
    finish(&state, "completions", result)
}

async fn chat(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Json<ChatRequest>, JsonRejection>,
) -> Response {
    let result = match body {
        Ok(Json(request)) => match (chat_prompt(&state, &request), request.logprobs()) {
            (Ok(ids), Ok(logprobs)) => {
                let (sampling, default_max) = (&request.sampling, state.config.max_tokens_limit);
                respond(&state, Route::Chat, ids, sampling, logprobs, default_max).await
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        },
        Err(rejection) => Err(rejected(rejection)),
    };
    finish(&state, "chat", result)
}

/// The prompt ids of a completions request (its sampling fields checked first).
fn completion_prompt(
    state: &AppState,
    request: &CompletionRequest,
) -> std::result::Result<Vec<u32>, ApiError> {
    request.sampling.check()?;
    match Prompt::from_json(&request.prompt)? {
        Prompt::Text(text) => encode(&state.text, &text),
        Prompt::Tokens(ids) => {
            input::check_token_ids(&ids, state.text.tokenizer.get_vocab_size(true))?;
            Ok(ids)
        }
    }
}

/// The prompt ids of a chat request: its sampling fields and messages checked, the chat
/// template applied.
fn chat_prompt(state: &AppState, request: &ChatRequest) -> std::result::Result<Vec<u32>, ApiError> {
    request.sampling.check()?;
    let knows_developer = state
        .text
        .template
        .as_ref()
        .is_some_and(|template| template.source().contains("developer"));
    let messages = input::conversation(&request.messages, knows_developer)?;
    state
        .text
        .chat_prompt(&messages)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))
}

async fn embeddings(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Json<openai::EmbeddingRequest>, JsonRejection>,
) -> Response {
    let result = match body {
        Ok(Json(request)) => embed(&state, request).await,
        Err(rejection) => Err(rejected(rejection)),
    };
    finish(&state, "embeddings", result)
}

/// Tokenizes the inputs, has the model thread embed them, answers OpenAI's list.
async fn embed(
    state: &Arc<AppState>,
    request: openai::EmbeddingRequest,
) -> std::result::Result<Response, ApiError> {
    check_model(state, request.model.as_deref())?;
    let Some(pooling) = state.pooling else {
        return Err(ApiError::invalid(
            "model",
            "this model generates text; embeddings need an encoder checkpoint",
        ));
    };
    let texts = request.texts()?;
    state.limits.check_inputs(texts.len())?;
    let inputs = texts
        .iter()
        .map(|text| encode(&state.text, text))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if let Some(long) = inputs.iter().find(|ids| ids.len() > state.context) {
        return Err(ApiError::invalid(
            "input",
            format!(
                "an input of {} tokens exceeds the model's context of {} positions",
                long.len(),
                state.context
            ),
        ));
    }
    let tokens: usize = inputs.iter().map(Vec::len).sum();
    state.shared.metrics.prompt_tokens(tokens);
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job = Job::Embed(EmbedJob {
        inputs,
        pooling,
        reply,
    });
    enqueue(state, job)?;
    let vectors = answer
        .await
        .map_err(|_| ApiError::internal("the model thread stopped"))??;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = openai::embedding_value(&vector, request.encoding_format.as_deref());
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": state.config.model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

/// 404 when a request names another model than the one served (naming none is fine).
fn check_model(state: &AppState, name: Option<&str>) -> std::result::Result<(), ApiError> {
    match name {
        Some(name) if name != state.config.model_name => {
            Err(ApiError::unknown_model(name, &state.config.model_name))
        }
        _ => Ok(()),
    }
}

/// Hands a job to the model thread; 503 once the server is shutting down.
fn enqueue(state: &AppState, job: Job) -> std::result::Result<(), ApiError> {
    let queued = state
        .jobs
        .lock()
        .map(|jobs| jobs.send(job).is_ok())
        .unwrap_or(false);
    match queued {
        true => Ok(()),
        false => Err(ApiError::unavailable("the server is shutting down", None)),
    }
}

/// Counts the answer and turns an error into its response.
fn finish(
    state: &AppState,
    route: &'static str,
    result: std::result::Result<Response, ApiError>,
) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    state
        .shared
        .metrics
        .request(route, response.status().as_u16());
    response
}

/// A body that is not the JSON the route expects: 400 (413 when too large), naming the problem.
fn rejected(rejection: JsonRejection) -> ApiError {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::invalid("", "the request body is too large")
            .with_status(StatusCode::PAYLOAD_TOO_LARGE),
        _ => ApiError::invalid("", rejection.body_text()),
    }
}

/// The prompt's token ids (as the CLI encodes a prompt).
fn encode(text: &TextSide, prompt: &str) -> std::result::Result<Vec<u32>, ApiError> {
    let ids = text
        .encode(prompt)
        .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize the prompt: {e}")))?;
    match ids.is_empty() {
        true => Err(ApiError::invalid("prompt", "the prompt is empty")),
        false => Ok(ids),
    }
}

/// Checks the request, queues its job, and answers (a whole answer, or a stream). With
/// `logprobs` (the number of alternatives per token), the answer carries log-probabilities.
async fn respond(
    state: &Arc<AppState>,
    route: Route,
    prompt: Vec<u32>,
    sampling: &Sampling,
    logprobs: Option<usize>,
    default_max: usize,
) -> std::result::Result<Response, ApiError> {
    check_model(state, sampling.model.as_deref())?;
    if !state.shared.healthy.load(Ordering::Relaxed) {
        return Err(scheduler::outage());
    }
    let mut config = sampling.config(
        &state.defaults,
        default_max.min(state.config.max_tokens_limit),
    );
    config.logprobs = logprobs.is_some();
    config.top_logprobs = logprobs.unwrap_or(0);
    sampling.apply_token_options(&mut config, state.vocab_size, &state.eos_token_ids)?;
    config.constraint = sampling.constraint()?;
    if config.max_new_tokens > state.config.max_tokens_limit || config.max_new_tokens == 0 {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "max_tokens must be between 1 and {}, got {}",
                state.config.max_tokens_limit, config.max_new_tokens
            ),
        ));
    }
    config
        .validate(
            state.text.tokenizer.get_vocab_size(true),
            state.context,
            prompt.len(),
        )
        .map_err(|e| ApiError::invalid("", e.to_string()))?;
    if let Some(constraint) = &config.constraint {
        state
            .grammars
            .check(constraint)
            .map_err(|e| ApiError::invalid("response_format", e.to_string()))?;
    }
    state.limits.check_request(
        config.num_return_sequences.max(1),
        prompt.len() + config.max_new_tokens,
    )?;
    let metrics = &state.shared.metrics;
    if metrics.in_flight.fetch_add(1, Ordering::SeqCst) >= state.config.max_queue {
        metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::unavailable(
            "the server is busy; retry shortly",
            Some(1),
        ));
    }
    metrics.prompt_tokens(prompt.len());
    let prompt_tokens = prompt.len();
    let choices = config.num_return_sequences;
    let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
    let job = Job::Generate(Box::new(GenerateJob {
        prompt,
        config,
        events,
        arrived: Instant::now(),
    }));
    if let Err(e) = enqueue(state, job) {
        metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
        return Err(e);
    }
    let id = format!(
        "{}-{:016x}",
        if route == Route::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        rand::random::<u64>()
    );
    let release = InFlight(state.clone());
    match sampling.stream {
        true => Ok(stream(
            route,
            id,
            state.config.model_name.clone(),
            receiver,
            release,
            state.shared.stopping.subscribe(),
        )),
        false => {
            whole(
                route,
                &id,
                &state.config.model_name,
                receiver,
                choices,
                prompt_tokens,
                release,
            )
            .await
        }
    }
}

/// Decrements the queue depth when a request ends (however it ends).
struct InFlight(Arc<AppState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .shared
            .metrics
            .in_flight
            .fetch_sub(1, Ordering::SeqCst);
    }
}

/// Collects every event into one answer.
async fn whole(
    route: Route,
    id: &str,
    model: &str,
    mut events: UnboundedReceiver<Event>,
    choices: usize,
    prompt_tokens: usize,
    _in_flight: InFlight,
) -> std::result::Result<Response, ApiError> {
    let mut texts = vec![String::new(); choices];
    let mut scores: Vec<Option<Vec<TokenScore>>> = vec![None; choices];
    let mut finishes = vec![FinishReason::Stop; choices];
    let mut completion_tokens = 0;
    let mut ended = 0;
    while ended < choices {
        match events.recv().await {
            Some(Event::Text {
                index,
                piece,
                logprobs,
            }) => {
                texts[index].push_str(&piece);
                if let Some(logprobs) = logprobs {
                    scores[index].get_or_insert_with(Vec::new).extend(logprobs);
                }
            }
            Some(Event::End {
                index,
                finish,
                tokens,
            }) => {
                finishes[index] = finish;
                completion_tokens += tokens;
                ended += 1;
            }
            Some(Event::Failed(e)) => return Err(e),
            None => return Err(ApiError::internal("the model thread stopped")),
        }
    }
    let answers = texts
        .iter()
        .zip(&finishes)
        .zip(&scores)
        .enumerate()
        .map(|(i, ((text, &finish), scores))| route.choice(i, text, finish, scores.as_deref()))
        .collect();
    Ok(Json(route.answer(id, model, answers, prompt_tokens, completion_tokens)).into_response())
}

/// Relays events as OpenAI chunks (server-sent events), then `data: [DONE]`. Dropping the
/// stream (the client left) closes the channel, which finishes the row at the next step. Once
/// the server stops serving running requests (`stopping`), text not yet sent is dropped and
/// the stream ends at once with an error event and `data: [DONE]`.
fn stream(
    route: Route,
    id: String,
    model: String,
    events: UnboundedReceiver<Event>,
    in_flight: InFlight,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> Response {
    let mut failed = false;
    let events = UnboundedReceiverStream::new(events)
        .map(move |event| match *stopping.borrow() {
            true => Event::Failed(scheduler::shutting_down()),
            false => event,
        })
        .take_while(move |event| {
            let more = !failed;
            failed |= matches!(event, Event::Failed(_));
            more
        });
    let chunks = events.map(move |event| {
        let _hold = &in_flight;
        let data = match event {
            Event::Text {
                index,
                piece,
                logprobs,
            } => {
                let piece = Some((piece.as_str(), logprobs.as_deref()));
                route.chunk(&id, &model, index, piece, None)
            }
            Event::End { index, finish, .. } => route.chunk(&id, &model, index, None, Some(finish)),
            Event::Failed(e) => json!({"error": {"message": e.message(), "type": "server_error"}}),
        };
        Ok::<_, std::convert::Infallible>(SseEvent::default().data(data.to_string()))
    });
    let done = tokio_stream::once(Ok(SseEvent::default().data("[DONE]")));
    Sse::new(chunks.chain(done))
        .keep_alive(KeepAlive::default())
        .into_response()
}
