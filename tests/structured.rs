//! Structured outputs (issue 21): the text generated under a JSON schema always parses and
//! validates against it, under a regular expression or a Lark grammar it always matches,
//! greedy and sampled with seeds, at 1 and 2 ranks, through the library, the CLI and the
//! server (whole and streamed, sequences sharing a running batch); bad schemas and grammars
//! are refused before any rank works.
//!
//! The random `gpt2` fixture (a real byte-level tokenizer, 64 positions) writes the JSON here:
//! every schema bounds its output (enums, patterned strings with a maximum length, bounded
//! integers and arrays, no extra properties) to fewer bytes than the tokens allowed, so a
//! sequence can only end by completing its text. The default model answers a chat request in
//! any JSON object.

mod common;

use common::server::Server;
use common::{fixture, options, run};
use parallelformers::generation::constraint::Constraint;
use parallelformers::{parallelize, GenerationConfig, ParallelModel};
use serde_json::{json, Value};

/// The gpt2 fixture's end-of-sequence id.
const EOS: u32 = 186;

/// Enough new tokens for the longest text of every schema here (each token is at least a
/// byte), within the fixture's 64 positions after a two-token prompt.
const ROOM: usize = 60;

/// Schemas whose compact JSON is at most [`ROOM`] - 1 bytes.
fn schemas() -> Vec<Value> {
    let word = |max: usize| json!({"type": "string", "pattern": "^[a-z]*$", "maxLength": max});
    vec![
        // Nested objects, enums, booleans.
        json!({"type": "object",
            "properties": {
                "kind": {"enum": ["cat", "dog"]},
                "owner": {"type": "object",
                    "properties": {"name": word(4), "vip": {"type": "boolean"}},
                    "required": ["name", "vip"], "additionalProperties": false},
            },
            "required": ["kind", "owner"], "additionalProperties": false}),
        // Arrays with bounds, bounded integers.
        json!({"type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                         "minItems": 1, "maxItems": 3},
                "n": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["tags", "n"], "additionalProperties": false}),
        // An optional property, a string with both bounds.
        json!({"type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 1, "maximum": 9},
                "note": {"type": "string", "pattern": "^[a-z]*$", "minLength": 2, "maxLength": 5},
            },
            "required": ["id"], "additionalProperties": false}),
    ]
}

/// Whether `value` is valid against `schema`, for the keywords the schemas here use; the
/// error names the first violation.
fn validate(value: &Value, schema: &Value) -> Result<(), String> {
    let fail = |what: &str| Err(format!("{value} violates {what} of {schema}"));
    if let Some(options) = schema["enum"].as_array() {
        if !options.contains(value) {
            return fail("enum");
        }
    }
    match schema["type"].as_str() {
        Some("object") => {
            let Some(object) = value.as_object() else {
                return fail("type");
            };
            let properties = schema["properties"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for required in schema["required"].as_array().into_iter().flatten() {
                if !object.contains_key(required.as_str().unwrap()) {
                    return fail("required");
                }
            }
            for (key, item) in object {
                match properties.get(key) {
                    Some(sub) => validate(item, sub)?,
                    None if schema["additionalProperties"] == json!(false) => {
                        return fail("additionalProperties")
                    }
                    None => {}
                }
            }
        }
        Some("array") => {
            let Some(items) = value.as_array() else {
                return fail("type");
            };
            let bound = |key: &str| schema[key].as_u64().map(|n| n as usize);
            if bound("minItems").is_some_and(|n| items.len() < n)
                || bound("maxItems").is_some_and(|n| items.len() > n)
            {
                return fail("minItems/maxItems");
            }
            items
                .iter()
                .try_for_each(|item| validate(item, &schema["items"]))?;
        }
        Some("string") => {
            let Some(text) = value.as_str() else {
                return fail("type");
            };
            let length = text.chars().count() as u64;
            if schema["minLength"].as_u64().is_some_and(|n| length < n)
                || schema["maxLength"].as_u64().is_some_and(|n| length > n)
            {
                return fail("minLength/maxLength");
            }
            if schema["pattern"] == json!("^[a-z]*$")
                && !text.chars().all(|c| c.is_ascii_lowercase())
            {
                return fail("pattern");
            }
        }
        Some("integer") => {
            let Some(n) = value.as_i64() else {
                return fail("type");
            };
            if schema["minimum"].as_i64().is_some_and(|m| n < m)
                || schema["maximum"].as_i64().is_some_and(|m| n > m)
            {
                return fail("minimum/maximum");
            }
        }
        Some("boolean") if !value.is_boolean() => return fail("type"),
        _ => {}
    }
    Ok(())
}

/// The gpt2 fixture's tokenizer, to read the generated text.
fn tokenizer() -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(fixture("gpt2").join("tokenizer.json")).unwrap()
}

/// The text of `ids` (which must end with the end-of-sequence id: a complete text).
fn complete_text(ids: &[u32]) -> String {
    assert_eq!(ids.last(), Some(&EOS), "the sequence did not end: {ids:?}");
    tokenizer().decode(&ids[..ids.len() - 1], false).unwrap()
}

/// The JSON of a text the server answered: the fixture's end-of-sequence id is a byte of
/// its vocabulary (not a special token), so the text ends with that byte's replacement
/// character.
fn served_json(text: &str) -> Value {
    let end = tokenizer().decode(&[EOS], false).unwrap();
    let json = text.strip_suffix(end.as_str()).unwrap_or(text);
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

/// The options of a run: greedy, or sampled with `seed`.
fn config(constraint: Constraint, seed: Option<u64>) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: ROOM,
        do_sample: seed.is_some(),
        top_k: 0,
        seed,
        constraint: Some(constraint),
        ..GenerationConfig::default()
    }
}

fn gpt2(ranks: usize) -> ParallelModel {
    parallelize(fixture("gpt2"), options(ranks)).unwrap()
}

#[test]
fn json_under_a_schema_always_parses_and_validates_greedy_and_sampled_at_one_and_two_ranks() {
    for ranks in [1, 2] {
        let mut model = gpt2(ranks);
        for schema in schemas() {
            for seed in [None, Some(1), Some(2), Some(3)] {
                let constraint = Constraint::JsonSchema(schema.to_string());
                let generated = model.generate(&[5, 9], &config(constraint, seed)).unwrap();
                let text = complete_text(&generated.ids);
                let value: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{ranks} ranks, seed {seed:?}: {text:?}: {e}"));
                validate(&value, &schema)
                    .unwrap_or_else(|e| panic!("{ranks} ranks, seed {seed:?}: {e}"));
            }
        }
        model.deparallelize();
    }
}

#[test]
fn regex_and_lark_outputs_match_and_every_row_of_a_batch_keeps_its_own_state() {
    let regex = "[a-c]{2,4}-[0-9]{1,3}";
    let whole = regex::Regex::new(&format!("^(?:{regex})$")).unwrap();
    let lark = "start: \"yes\" | \"no\" | \"maybe \" NUM\nNUM: /[0-9]{1,2}/";
    let lark_whole = regex::Regex::new("^(yes|no|maybe [0-9]{1,2})$").unwrap();
    for ranks in [1, 2] {
        let mut model = gpt2(ranks);
        for seed in [None, Some(4), Some(5)] {
            let generated = model
                .generate(&[7], &config(Constraint::Regex(regex.into()), seed))
                .unwrap();
            let text = complete_text(&generated.ids);
            assert!(whole.is_match(&text), "{text:?} does not match {regex}");
            // Three prompts, three sampled sequences each: nine rows, one matcher each.
            let batch = GenerationConfig {
                num_return_sequences: if seed.is_some() { 3 } else { 1 },
                ..config(Constraint::Lark(lark.into()), seed)
            };
            let rows = model
                .generate_batch(&[vec![3], vec![8, 1], vec![2, 2, 2]], &batch, |_, _| {
                    std::ops::ControlFlow::Continue(())
                })
                .unwrap();
            for ids in &rows.sequences {
                let text = complete_text(ids);
                assert!(lark_whole.is_match(&text), "{text:?} is not of the grammar");
            }
        }
        model.deparallelize();
    }
}

#[test]
fn a_constrained_text_cut_by_max_new_tokens_is_a_prefix_of_a_valid_one() {
    let mut model = gpt2(1);
    let schema = &schemas()[0];
    let cut = GenerationConfig {
        max_new_tokens: 6,
        ..config(Constraint::JsonSchema(schema.to_string()), None)
    };
    let generated = model.generate(&[5, 9], &cut).unwrap();
    assert_eq!(generated.ids.len(), 6);
    let text = tokenizer().decode(&generated.ids, false).unwrap();
    let valid = [
        "{\"kind\":\"cat\",\"owner\":{",
        "{\"kind\":\"dog\",\"owner\":{",
    ];
    assert!(valid.iter().any(|v| v.starts_with(&text)), "{text:?}");
    model.deparallelize();
}

#[test]
fn bad_schemas_and_grammars_are_refused_before_any_rank_works() {
    let mut model = gpt2(1);
    let refusal = |model: &mut ParallelModel, constraint: Constraint| {
        model
            .generate(&[5], &config(constraint, None))
            .unwrap_err()
            .to_string()
    };
    let message = refusal(
        &mut model,
        Constraint::JsonSchema(r#"{"type": "objet"}"#.into()),
    );
    assert!(
        message.contains("json_schema does not compile"),
        "{message}"
    );
    let message = refusal(&mut model, Constraint::Lark("start: missing_rule".into()));
    assert!(message.contains("grammar does not compile"), "{message}");
    assert!(message.contains("missing_rule"), "{message}");
    let beams = GenerationConfig {
        num_beams: 2,
        ..config(Constraint::JsonObject, None)
    };
    let message = model.generate(&[5], &beams).unwrap_err().to_string();
    assert!(
        message.contains("cannot be combined with beam search"),
        "{message}"
    );
    // The ranks are fine afterwards.
    let generated = model
        .generate(&[5], &config(Constraint::Regex("ok".into()), None))
        .unwrap();
    assert_eq!(complete_text(&generated.ids), "ok");
    model.deparallelize();
}

#[test]
fn the_cli_writes_json_of_a_schema_file_and_names_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let schema_path = dir.path().join("schema.json");
    std::fs::write(&schema_path, schemas()[1].to_string()).unwrap();
    let model = fixture("gpt2");
    let model = model.to_str().unwrap();
    let schema_arg = schema_path.to_str().unwrap();
    let out = run(&[
        "generate",
        "--model",
        model,
        "--ranks",
        "2",
        "--input-ids",
        "5,9",
        "--max-new-tokens",
        "60",
        "--json-schema",
        schema_arg,
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u32> = serde_json::from_value(printed["generated_ids"].clone()).unwrap();
    let value: Value = serde_json::from_str(&complete_text(&ids)).unwrap();
    validate(&value, &schemas()[1]).unwrap();

    std::fs::write(
        &schema_path,
        r#"{"type": "array", "minItems": 3, "maxItems": 1}"#,
    )
    .unwrap();
    let grammar_path = dir.path().join("grammar.lark");
    std::fs::write(&grammar_path, "start: \"a\" | undefined_rule").unwrap();
    let missing = dir.path().join("missing.json");
    for (flag, path, needle) in [
        ("--json-schema", schema_arg, "json_schema does not compile"),
        (
            "--grammar",
            grammar_path.to_str().unwrap(),
            "undefined_rule",
        ),
        (
            "--json-schema",
            missing.to_str().unwrap(),
            "cannot read --json-schema",
        ),
    ] {
        let out = run(&["generate", "--model", model, "--input-ids", "5", flag, path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {path} was accepted");
        assert!(
            stderr.contains(&format!("{flag} {path}")) || stderr.contains(needle),
            "{stderr}"
        );
        assert!(stderr.contains(needle), "{stderr}");
    }
    let both = run(&[
        "generate",
        "--model",
        model,
        "--input-ids",
        "5",
        "--regex",
        "a",
        "--json-schema",
        schema_arg,
    ]);
    assert!(!both.status.success());
}

#[test]
fn the_server_constrains_each_sequence_of_the_running_batch_whole_and_streamed() {
    let model = fixture("gpt2");
    let server = Server::start(&["--model", model.to_str().unwrap(), "--ranks", "2"]);
    let schema = &schemas()[0];
    let format = json!({"type": "json_schema",
        "json_schema": {"name": "pet", "schema": schema, "strict": true}});
    // Several sampled choices join one running batch, each with its own matcher.
    let request = json!({"prompt": [5, 9], "max_tokens": ROOM, "n": 3, "seed": 11,
        "temperature": 1.0, "response_format": format});
    let whole = server.post("/v1/completions", &request).unwrap();
    for choice in whole["choices"].as_array().unwrap() {
        assert_eq!(choice["finish_reason"], "stop", "{choice}");
        validate(&served_json(choice["text"].as_str().unwrap()), schema).unwrap();
    }
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["n"] = json!(1);
    let mut text = String::new();
    for event in server.stream("/v1/completions", &streamed) {
        if event == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&event).unwrap();
        text.push_str(chunk["choices"][0]["text"].as_str().unwrap_or_default());
    }
    validate(&served_json(&text), schema).unwrap();
    // Cut by max_tokens: OpenAI's finish_reason "length".
    let mut short = request.clone();
    short["max_tokens"] = json!(4);
    short["n"] = json!(1);
    let cut = server.post("/v1/completions", &short).unwrap();
    assert_eq!(cut["choices"][0]["finish_reason"], "length");
    // Refusals name the field.
    let refused = |format: Value| {
        let body = json!({"prompt": "hi", "max_tokens": 4, "response_format": format});
        let (status, error) = server.post("/v1/completions", &body).unwrap_err();
        assert_eq!(status, 400, "{error}");
        (
            error["error"]["param"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            error["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    let (param, message) = refused(json!({"type": "yaml"}));
    assert_eq!(param, "response_format.type");
    assert!(message.contains("yaml"), "{message}");
    let (param, message) = refused(json!({"type": "json_schema",
        "json_schema": {"name": "bad", "schema": {"type": "strnig"}}}));
    assert_eq!(param, "response_format");
    assert!(
        message.contains("json_schema does not compile"),
        "{message}"
    );
}

#[test]
fn the_default_model_answers_a_chat_in_json() {
    let server = Server::start(&["--ranks", "2"]);
    let request = json!({
        "messages": [{"role": "user", "content": "Give the capital of France as JSON."}],
        "max_tokens": 200,
        "temperature": 0,
        "response_format": {"type": "json_object"},
    });
    let whole = server.post("/v1/chat/completions", &request).unwrap();
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "stop", "{whole}");
    let answer: Value =
        serde_json::from_str(choice["message"]["content"].as_str().unwrap()).unwrap();
    assert!(answer.is_object(), "{answer}");
    let schema = json!({"type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 20},
                       "population_millions": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["capital", "population_millions"], "additionalProperties": false});
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["temperature"] = json!(0.8);
    streamed["seed"] = json!(3);
    streamed["response_format"] = json!({"type": "json_schema",
        "json_schema": {"name": "city", "schema": schema}});
    let mut text = String::new();
    for event in server.stream("/v1/chat/completions", &streamed) {
        if event == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&event).unwrap();
        text.push_str(
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default(),
        );
    }
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    validate(&value, &schema).unwrap();
}
