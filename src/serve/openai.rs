//! The OpenAI API's shapes: requests of `/v1/completions` and `/v1/chat/completions`, their
//! answers and streamed chunks, and OpenAI-style errors.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::input::ChatMessage;
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
    /// Sampling fields.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation so far (checked by [`super::input::conversation`]).
    pub messages: Vec<ChatMessage>,
    /// Sampling fields.
    #[serde(flatten)]
    pub sampling: Sampling,
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

    /// One choice of a whole answer.
    pub fn choice(self, index: usize, text: &str, finish: FinishReason) -> Value {
        match self {
            Route::Completions => {
                json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish})
            }
            Route::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
        }
    }

    /// One streamed chunk: a piece of text of choice `index`, or its end.
    pub fn chunk(
        self,
        id: &str,
        model: &str,
        index: usize,
        piece: Option<&str>,
        finish: Option<FinishReason>,
    ) -> Value {
        let choice = match self {
            Route::Completions => {
                json!({"index": index, "text": piece.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
            Route::Chat => {
                let delta = match piece {
                    Some(p) => json!({"role": "assistant", "content": p}),
                    None => json!({}),
                };
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
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
