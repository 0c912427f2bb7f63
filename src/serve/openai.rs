//! The OpenAI API's shapes: requests of `/v1/completions` and `/v1/chat/completions`, their
//! answers and streamed chunks, and OpenAI-style errors.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::input::ChatMessage;
use super::logprobs::{self, TokenScore, MAX_CHAT_TOP_LOGPROBS, MAX_COMPLETION_LOGPROBS};
use crate::generation::constraint::Constraint;
use crate::generation::GenerationConfig;

/// One string or a list of strings (`prompt`, `stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single string.
    One(String),
    /// Several strings.
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The sampling fields both routes share (OpenAI's names, plus `top_k`, `min_p` and
/// `repetition_penalty` as vLLM accepts them). Unknown fields are ignored; known fields of the
/// wrong type are refused.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    /// The model name, as `/v1/models` lists it.
    pub model: Option<String>,
    /// Most new tokens (OpenAI's default: 16 for completions, the server's limit for chat).
    pub max_tokens: Option<usize>,
    /// `max_tokens` under its newer chat name.
    pub max_completion_tokens: Option<usize>,
    /// 0 = greedy; otherwise sampling at this temperature (default 1).
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: Option<usize>,
    /// Remove the tokens less likely than `min_p` times the most likely one, in [0, 1].
    pub min_p: Option<f32>,
    /// transformers' repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// Sequences per prompt.
    pub n: Option<usize>,
    /// Stop strings.
    pub stop: Option<OneOrMany>,
    /// Token ids that end a sequence as its end-of-sequence ids do (as vLLM takes them; the
    /// token is the sequence's last).
    pub stop_token_ids: Option<Vec<u32>>,
    /// OpenAI's map from a token id (as a string) to a bias in [-100, 100] added to that
    /// token's logit at every step, before the other processors (transformers' one-token
    /// `sequence_bias`).
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// Seed of the sampler.
    pub seed: Option<u64>,
    /// Stream chunks as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Structured outputs: `{"type": "text"}`, `{"type": "json_object"}` or
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` (read by
    /// [`Sampling::constraint`]).
    pub response_format: Option<Value>,
}

impl Sampling {
    /// Refuses values out of OpenAI's ranges, naming the field and the value: `temperature` in
    /// [0, 2], `top_p` in (0, 1], `min_p` in [0, 1], `repetition_penalty` positive, `n` at
    /// least 1.
    pub fn check(&self) -> Result<(), ApiError> {
        let out = |field: &str, range: &str, value: &dyn std::fmt::Display| {
            Err(ApiError::invalid(
                field,
                format!("{field} must be {range}, got {value}"),
            ))
        };
        if let Some(t) = self.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
            return out("temperature", "between 0 and 2", &t);
        }
        if let Some(p) = self.top_p.filter(|&p| !(p > 0.0 && p <= 1.0)) {
            return out("top_p", "in (0, 1]", &p);
        }
        if let Some(p) = self.min_p.filter(|p| !(0.0..=1.0).contains(p)) {
            return out("min_p", "in [0, 1]", &p);
        }
        if let Some(r) = self
            .repetition_penalty
            .filter(|&r| !(r > 0.0 && r.is_finite()))
        {
            return out("repetition_penalty", "a positive number", &r);
        }
        if self.n == Some(0) {
            return out("n", "at least 1", &0);
        }
        Ok(())
    }

    /// The constraint `response_format` asks for: none for `text` (or no field), any JSON
    /// object for `json_object`, JSON valid against the schema of `json_schema` (always
    /// enforced, whatever its `strict`). A 400 names the field that is missing or wrong.
    pub fn constraint(&self) -> Result<Option<Constraint>, ApiError> {
        let Some(format) = &self.response_format else {
            return Ok(None);
        };
        if !format.is_object() {
            return Err(ApiError::invalid(
                "response_format",
                format!("response_format must be an object such as {{\"type\": \"json_object\"}}, got {format}"),
            ));
        }
        let kind = format["type"].as_str().ok_or_else(|| {
            ApiError::invalid(
                "response_format.type",
                format!(
                    "response_format.type must be text, json_object or json_schema, got {}",
                    format["type"]
                ),
            )
        })?;
        let spec = &format["json_schema"];
        match kind {
            "text" => Ok(None),
            "json_object" => Ok(Some(Constraint::JsonObject)),
            "json_schema" if !spec.is_object() => Err(ApiError::invalid(
                "response_format.json_schema",
                "response_format.json_schema must be an object with a name and a schema",
            )),
            "json_schema" if !spec["name"].is_string() => Err(ApiError::invalid(
                "response_format.json_schema.name",
                format!("response_format.json_schema.name must be a string, got {}", spec["name"]),
            )),
            "json_schema" if !(spec["strict"].is_boolean() || spec["strict"].is_null()) => {
                Err(ApiError::invalid(
                    "response_format.json_schema.strict",
                    format!("response_format.json_schema.strict must be true or false, got {}", spec["strict"]),
                ))
            }
            "json_schema" => match &spec["schema"] {
                schema @ (Value::Object(_) | Value::Bool(_)) => {
                    Ok(Some(Constraint::JsonSchema(schema.to_string())))
                }
                other => Err(ApiError::invalid(
                    "response_format.json_schema.schema",
                    format!("response_format.json_schema.schema must be a JSON schema object, got {other}"),
                )),
            },
            other => Err(ApiError::invalid(
                "response_format.type",
                format!("response_format.type must be text, json_object or json_schema, not {other:?}"),
            )),
        }
    }

    /// The generation options of this request: each field it gives, else the model's default
    /// (its `generation_config.json`, as the CLI's `chat` and `generate` use it; greedy for a
    /// checkpoint without one). `temperature` 0 is greedy and any other samples; without it the
    /// model's `do_sample` decides, except that `n` > 1 samples. Beam search is not served
    /// (`num_beams` 1).
    pub fn config(&self, defaults: &GenerationConfig, default_max: usize) -> GenerationConfig {
        let mut config = GenerationConfig {
            max_new_tokens: self
                .max_tokens
                .or(self.max_completion_tokens)
                .unwrap_or(default_max),
            num_beams: 1,
            num_return_sequences: self.n.unwrap_or(1),
            stop: self
                .stop
                .clone()
                .map(OneOrMany::into_vec)
                .unwrap_or_default(),
            seed: self.seed,
            ..defaults.clone()
        };
        match self.temperature {
            Some(t) if t > 0.0 => (config.do_sample, config.temperature) = (true, t),
            Some(_) => config.do_sample = false,
            // Several choices of one prompt differ only when sampled: at the model's temperature.
            None if config.num_return_sequences > 1 => config.do_sample = true,
            None => {}
        }
        config.top_p = self.top_p.unwrap_or(config.top_p);
        config.top_k = self.top_k.unwrap_or(config.top_k);
        config.min_p = self.min_p.or(config.min_p);
        config.repetition_penalty = self.repetition_penalty.unwrap_or(config.repetition_penalty);
        config
    }
    /// Applies `logit_bias` and `stop_token_ids` to `config`, refusing (naming the field) a
    /// bias key that is not a token id below the model's `vocab_size`, a bias outside
    /// [-100, 100] and a stop token id outside the vocabulary. A bias replaces the model's
    /// own one-token bias of the same token; stop token ids join the end-of-sequence ids (the
    /// configuration's, else the model's `model_eos`).
    pub fn apply_token_options(
        &self,
        config: &mut GenerationConfig,
        vocab_size: usize,
        model_eos: &[u32],
    ) -> Result<(), ApiError> {
        let biases = self
            .logit_bias
            .iter()
            .flatten()
            .map(|(key, &bias)| bias_of(key, bias, vocab_size))
            .collect::<Result<Vec<_>, ApiError>>()?;
        if let Some(&(token, _)) = biases
            .iter()
            .enumerate()
            .find(|(i, (token, _))| biases[..*i].iter().any(|(t, _)| t == token))
            .map(|(_, bias)| bias)
        {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("logit_bias names token {token} twice"),
            ));
        }
        let biased =
            |sequence: &[u32]| matches!(sequence, [id] if biases.iter().any(|&(t, _)| t == *id));
        config
            .sequence_bias
            .retain(|(sequence, _)| !biased(sequence));
        config
            .sequence_bias
            .extend(biases.iter().map(|&(token, bias)| (vec![token], bias)));
        let Some(stops) = &self.stop_token_ids else {
            return Ok(());
        };
        if let Some(id) = stops.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(ApiError::invalid(
                "stop_token_ids",
                format!("stop_token_ids {id} is outside the vocabulary of {vocab_size} tokens"),
            ));
        }
        let mut eos = config
            .eos_token_id
            .clone()
            .unwrap_or_else(|| model_eos.to_vec());
        for &id in stops {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        config.eos_token_id = Some(eos);
        Ok(())
    }
}

/// One entry of `logit_bias`: its key as a token id below `vocab_size`, its bias in
/// [-100, 100].
fn bias_of(key: &str, bias: f64, vocab_size: usize) -> Result<(u32, f32), ApiError> {
    let token = key
        .parse::<u32>()
        .ok()
        .filter(|&id| (id as usize) < vocab_size)
        .ok_or_else(|| {
            ApiError::invalid(
                "logit_bias",
                format!("logit_bias keys must be token ids below the vocabulary size {vocab_size}, got {key:?}"),
            )
        })?;
    if !(-100.0..=100.0).contains(&bias) {
        return Err(ApiError::invalid(
            "logit_bias",
            format!("logit_bias of token {token} must be between -100 and 100, got {bias}"),
        ));
    }
    Ok((token, bias as f32))
}

/// The sampling a request that names none gets, as `/v1/models` and the startup line state it:
/// `temperature` 0 means greedy; `source` says where the defaults come from.
pub fn sampling_defaults(defaults: &GenerationConfig, source: &str) -> Value {
    let temperature = match defaults.do_sample {
        true => defaults.temperature,
        false => 0.0,
    };
    json!({
        "temperature": temperature,
        "top_p": defaults.top_p,
        "top_k": defaults.top_k,
        "repetition_penalty": defaults.repetition_penalty,
        "source": source,
    })
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt: a string, a list of token ids, or a list of one of those (read by
    /// [`super::input::Prompt::from_json`]).
    pub prompt: Value,
    /// Report each token's log-probability and those of the `logprobs` most likely tokens of
    /// its step (0 to 5; the legacy shape).
    pub logprobs: Option<usize>,
    /// Sampling fields.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation so far (checked by [`super::input::conversation`]).
    pub messages: Vec<ChatMessage>,
    /// Report each token's log-probability.
    pub logprobs: Option<bool>,
    /// With `logprobs`, also the `top_logprobs` most likely tokens of each step (0 to 20).
    pub top_logprobs: Option<usize>,
    /// Sampling fields.
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl CompletionRequest {
    /// How many alternatives each token reports, when `logprobs` asks for log-probabilities;
    /// more than 5 is refused.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match self.logprobs {
            Some(n) if n > MAX_COMPLETION_LOGPROBS => Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {n}"),
            )),
            other => Ok(other),
        }
    }
}

impl ChatRequest {
    /// How many alternatives each token reports, when `logprobs` is true; `top_logprobs` over
    /// 20, or given without `logprobs: true`, is refused.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (_, Some(n)) if n > MAX_CHAT_TOP_LOGPROBS => Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs must be between 0 and {MAX_CHAT_TOP_LOGPROBS}, got {n}"),
            )),
            (false, Some(n)) => Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs ({n}) needs logprobs: true"),
            )),
            (true, top) => Ok(Some(top.unwrap_or(0))),
            (false, None) => Ok(None),
        }
    }
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    /// One text or several.
    pub input: OneOrMany,
    /// The model name.
    pub model: Option<String>,
    /// `float` (default) or `base64` (little-endian f32 bytes, as the official clients ask).
    pub encoding_format: Option<String>,
}

impl EmbeddingRequest {
    /// The texts to embed (at least one; `encoding_format` must be `float` or `base64`).
    pub fn texts(&self) -> Result<Vec<String>, ApiError> {
        if let Some(format) = self
            .encoding_format
            .as_deref()
            .filter(|f| !matches!(*f, "float" | "base64"))
        {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("encoding_format must be float or base64, not {format:?}"),
            ));
        }
        let texts = self.input.clone().into_vec();
        match texts.is_empty() {
            true => Err(ApiError::invalid("input", "no input to embed")),
            false => Ok(texts),
        }
    }
}

/// One embedding as the request's `encoding_format` asks: a list of numbers, or the base64 of
/// its little-endian f32 bytes.
pub fn embedding_value(vector: &[f32], format: Option<&str>) -> Value {
    use base64::Engine;
    match format {
        Some("base64") => {
            let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        _ => json!(vector),
    }
}

/// Why a sequence ended, as OpenAI reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End of sequence or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// Which route a request came through (the shapes of its answer differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

impl Route {
    /// The `object` of a whole answer.
    fn object(self) -> &'static str {
        match self {
            Route::Completions => "text_completion",
            Route::Chat => "chat.completion",
        }
    }

    /// The `logprobs` of a choice or chunk whose tokens have `scores` (`null` without).
    pub fn logprobs(self, scores: Option<&[TokenScore]>) -> Value {
        match (self, scores) {
            (_, None) => Value::Null,
            (Route::Completions, Some(scores)) => logprobs::completion(scores),
            (Route::Chat, Some(scores)) => logprobs::chat(scores),
        }
    }

    /// One choice of a whole answer, with its tokens' `scores` when they were asked for.
    pub fn choice(
        self,
        index: usize,
        text: &str,
        finish: FinishReason,
        scores: Option<&[TokenScore]>,
    ) -> Value {
        let logprobs = self.logprobs(scores);
        match self {
            Route::Completions => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
            Route::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        }
    }

    /// One streamed chunk: a piece of text of choice `index` with the `scores` of its tokens
    /// when they were asked for, or its end.
    pub fn chunk(
        self,
        id: &str,
        model: &str,
        index: usize,
        piece: Option<(&str, Option<&[TokenScore]>)>,
        finish: Option<FinishReason>,
    ) -> Value {
        let logprobs = self.logprobs(piece.and_then(|(_, scores)| scores));
        let piece = piece.map(|(text, _)| text);
        let choice = match self {
            Route::Completions => {
                json!({"index": index, "text": piece.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish})
            }
            Route::Chat => {
                let delta = match piece {
                    Some(p) => json!({"role": "assistant", "content": p}),
                    None => json!({}),
                };
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        let object = match self {
            Route::Completions => "text_completion",
            Route::Chat => "chat.completion.chunk",
        };
        json!({"id": id, "object": object, "created": now(), "model": model, "choices": [choice]})
    }

    /// The whole answer.
    pub fn answer(
        self,
        id: &str,
        model: &str,
        choices: Vec<Value>,
        prompt_tokens: usize,
        completion_tokens: usize,
    ) -> Value {
        json!({
            "id": id,
            "object": self.object(),
            "created": now(),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        })
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An OpenAI-style error answer: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    /// 400: a field is missing, malformed or out of range.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            param: Some(param.into()).filter(|p: &String| !p.is_empty()),
            code: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 404: no model of this name.
    pub fn unknown_model(name: &str, served: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            message: format!("the model {name:?} does not exist; this server serves {served:?}"),
            retry_after: None,
        }
    }

    /// 401: the request lacks the server's API key (answered with `WWW-Authenticate: Bearer`).
    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
            message: "a valid API key is required: send `Authorization: Bearer <key>`".into(),
            retry_after: None,
        }
    }

    /// 503: the queue is full (retry after a second) or the model is down.
    pub fn unavailable(message: impl Into<String>, retry_after: Option<u64>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            param: None,
            code: None,
            message: message.into(),
            retry_after,
        }
    }

    /// 500: generation failed.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            param: None,
            code: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error with another HTTP status.
    pub fn with_status(self, status: StatusCode) -> Self {
        ApiError { status, ..self }
    }

    /// The response with `status`, asking the client to close the connection after it (the
    /// server will not read the rest of what the client sends).
    pub fn closing(self, status: StatusCode) -> Response {
        let mut response = self.with_status(status).into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(sampling: serde_json::Value) -> (Option<String>, String) {
        let sampling: Sampling = serde_json::from_value(sampling).unwrap();
        let error = sampling.check().unwrap_err();
        (error.param.clone(), error.message().to_string())
    }

    #[test]
    fn unnamed_sampling_fields_take_the_models_defaults_and_several_choices_sample() {
        let greedy = GenerationConfig::default();
        let config = |request: serde_json::Value| {
            serde_json::from_value::<Sampling>(request)
                .unwrap()
                .config(&greedy, 16)
        };
        assert!(!config(json!({})).do_sample, "the model's greedy default");
        assert!(config(json!({"n": 3})).do_sample, "several choices sample");
        assert!(!config(json!({"n": 3, "temperature": 0})).do_sample);
        let hot = config(json!({"temperature": 0.5, "top_k": 7}));
        assert!(hot.do_sample && hot.temperature == 0.5 && hot.top_k == 7);
        let sampling = GenerationConfig {
            do_sample: true,
            temperature: 0.7,
            ..GenerationConfig::default()
        };
        let plain = serde_json::from_value::<Sampling>(json!({}))
            .unwrap()
            .config(&sampling, 16);
        assert!(plain.do_sample && plain.temperature == 0.7);
    }

    #[test]
    fn sampling_values_out_of_range_are_refused_by_name_and_value() {
        assert!(Sampling::default().check().is_ok());
        let fine = json!({"temperature": 0, "top_p": 1, "repetition_penalty": 1.2, "n": 2});
        assert!(serde_json::from_value::<Sampling>(fine)
            .unwrap()
            .check()
            .is_ok());
        let (param, message) = refusal(json!({"temperature": 2.5}));
        assert_eq!(param.as_deref(), Some("temperature"));
        assert!(message.contains("2.5"), "{message}");
        assert_eq!(
            refusal(json!({"temperature": -0.1})).0.as_deref(),
            Some("temperature")
        );
        assert_eq!(refusal(json!({"top_p": 0})).0.as_deref(), Some("top_p"));
        assert_eq!(refusal(json!({"top_p": 1.01})).0.as_deref(), Some("top_p"));
        assert_eq!(refusal(json!({"min_p": 1.5})).0.as_deref(), Some("min_p"));
        let (param, message) = refusal(json!({"repetition_penalty": -1}));
        assert_eq!(param.as_deref(), Some("repetition_penalty"));
        assert!(message.contains("-1"), "{message}");
        assert_eq!(refusal(json!({"n": 0})).0.as_deref(), Some("n"));
    }

    /// `logit_bias` and `stop_token_ids` applied to `defaults` for a model of 100 tokens whose
    /// end-of-sequence id is 2, or the refusal's field and message.
    fn token_options(
        request: serde_json::Value,
        defaults: &GenerationConfig,
    ) -> Result<GenerationConfig, (Option<String>, String)> {
        let sampling: Sampling = serde_json::from_value(request).unwrap();
        let mut config = defaults.clone();
        match sampling.apply_token_options(&mut config, 100, &[2]) {
            Ok(()) => Ok(config),
            Err(e) => Err((e.param.clone(), e.message().to_string())),
        }
    }

    #[test]
    fn logit_biases_become_one_token_sequence_biases_and_stop_token_ids_end_sequences() {
        let defaults = GenerationConfig {
            sequence_bias: vec![(vec![7], 1.0), (vec![8, 9], -2.0)],
            ..GenerationConfig::default()
        };
        let config = token_options(
            json!({"logit_bias": {"7": -100, "50": 5.5}, "stop_token_ids": [11, 2]}),
            &defaults,
        )
        .unwrap();
        assert_eq!(
            config.sequence_bias,
            [(vec![8, 9], -2.0), (vec![50], 5.5), (vec![7], -100.0)],
            "the request's bias of token 7 replaces the model's"
        );
        assert_eq!(config.eos_token_id, Some(vec![2, 11]));
        let plain = token_options(json!({}), &defaults).unwrap();
        assert_eq!(plain, defaults);
    }

    #[test]
    fn bad_logit_biases_and_stop_token_ids_are_refused_by_name_and_value() {
        let d = GenerationConfig::default();
        let refused = |request| token_options(request, &d).unwrap_err();
        let (param, message) = refused(json!({"logit_bias": {"abc": 1}}));
        assert_eq!(param.as_deref(), Some("logit_bias"));
        assert!(message.contains("\"abc\""), "{message}");
        let (param, message) = refused(json!({"logit_bias": {"100": 1}}));
        assert_eq!(param.as_deref(), Some("logit_bias"));
        assert!(message.contains("\"100\""), "{message}");
        assert_eq!(
            refused(json!({"logit_bias": {"-1": 1}})).0.as_deref(),
            Some("logit_bias")
        );
        let (param, message) = refused(json!({"logit_bias": {"7": 1, "07": 2}}));
        assert_eq!(param.as_deref(), Some("logit_bias"));
        assert!(message.contains("token 7 twice"), "{message}");
        let (param, message) = refused(json!({"logit_bias": {"5": 100.5}}));
        assert_eq!(param.as_deref(), Some("logit_bias"));
        assert!(message.contains("100.5"), "{message}");
        let (param, message) = refused(json!({"stop_token_ids": [3, 100]}));
        assert_eq!(param.as_deref(), Some("stop_token_ids"));
        assert!(message.contains("100"), "{message}");
    }

    #[test]
    fn log_probability_requests_out_of_range_are_refused_by_name() {
        let chat = |request: serde_json::Value| {
            let mut request = request;
            request["messages"] = json!([]);
            serde_json::from_value::<ChatRequest>(request)
                .unwrap()
                .logprobs()
                .map_err(|e| (e.param.clone(), e.message().to_string()))
        };
        assert_eq!(chat(json!({})), Ok(None));
        assert_eq!(chat(json!({"logprobs": true})), Ok(Some(0)));
        assert_eq!(
            chat(json!({"logprobs": true, "top_logprobs": 20})),
            Ok(Some(20))
        );
        let (param, message) = chat(json!({"logprobs": true, "top_logprobs": 21})).unwrap_err();
        assert_eq!(param.as_deref(), Some("top_logprobs"));
        assert!(message.contains("21"), "{message}");
        let (param, message) = chat(json!({"top_logprobs": 2})).unwrap_err();
        assert_eq!(param.as_deref(), Some("top_logprobs"));
        assert!(message.contains("logprobs: true"), "{message}");
        assert!(chat(json!({"logprobs": false, "top_logprobs": 1})).is_err());
        let completion = |logprobs: usize| {
            serde_json::from_value::<CompletionRequest>(
                json!({"prompt": "a", "logprobs": logprobs}),
            )
            .unwrap()
            .logprobs()
            .map_err(|e| e.param.clone())
        };
        assert_eq!(completion(5), Ok(Some(5)));
        assert_eq!(completion(6), Err(Some("logprobs".into())));
    }

    #[test]
    fn response_formats_give_constraints_and_bad_ones_name_their_field() {
        let constraint = |format: serde_json::Value| {
            serde_json::from_value::<Sampling>(json!({"response_format": format}))
                .unwrap()
                .constraint()
        };
        assert_eq!(constraint(json!(null)).unwrap(), None);
        assert_eq!(constraint(json!({"type": "text"})).unwrap(), None);
        assert_eq!(
            constraint(json!({"type": "json_object"})).unwrap(),
            Some(Constraint::JsonObject)
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let given = json!({"type": "json_schema",
            "json_schema": {"name": "thing", "schema": schema, "strict": true}});
        assert_eq!(
            constraint(given).unwrap(),
            Some(Constraint::JsonSchema(schema.to_string()))
        );
        let refused = |format: serde_json::Value| {
            let error = constraint(format).unwrap_err();
            (error.param.unwrap_or_default(), error.message)
        };
        let (param, message) = refused(json!({"type": "xml"}));
        assert_eq!(param, "response_format.type");
        assert!(message.contains("\"xml\""), "{message}");
        assert_eq!(refused(json!("json")).0, "response_format");
        assert_eq!(refused(json!({"type": 3})).0, "response_format.type");
        assert_eq!(
            refused(json!({"type": "json_schema"})).0,
            "response_format.json_schema"
        );
        assert_eq!(
            refused(json!({"type": "json_schema", "json_schema": {"schema": {}}})).0,
            "response_format.json_schema.name"
        );
        assert_eq!(
            refused(json!({"type": "json_schema", "json_schema": {"name": "x", "schema": 3}})).0,
            "response_format.json_schema.schema"
        );
        assert_eq!(
            refused(json!({"type": "json_schema",
                "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}))
            .0,
            "response_format.json_schema.strict"
        );
    }

    #[test]
    fn a_401_names_the_bearer_scheme() {
        let response = ApiError::unauthorized().into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers().get(header::WWW_AUTHENTICATE).unwrap(),
            "Bearer"
        );
    }
}
