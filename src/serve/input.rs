//! A request's input as OpenAI's API may send it, checked and turned into what the model takes:
//! a completion's `prompt` (text, or token ids) and a chat's `messages` (content as a string or
//! as a list of parts; roles checked). Every refusal is a 400 naming the field and the value.

use serde::Deserialize;
use serde_json::Value;

use super::openai::ApiError;
use crate::tokenizer::Message;

/// A completion's prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Text, to be tokenized.
    Text(String),
    /// Token ids, taken as they are (checked against the vocabulary by the caller).
    Tokens(Vec<u32>),
}

impl Prompt {
    /// The prompt of a completions request: a string, a list of token ids, or a list of one of
    /// those. Several prompts in one request are refused (one prompt per request).
    pub fn from_json(prompt: &Value) -> Result<Self, ApiError> {
        let items = match prompt {
            Value::String(text) => return Ok(Prompt::Text(text.clone())),
            Value::Array(items) => items,
            other => {
                return Err(invalid_prompt(format!(
                    "prompt must be a string or a list of token ids, got {}",
                    kind(other)
                )))
            }
        };
        if items.iter().all(Value::is_number) {
            return token_ids(items, "prompt").map(Prompt::Tokens);
        }
        match items.as_slice() {
            [Value::String(text)] => Ok(Prompt::Text(text.clone())),
            [Value::Array(ids)] => token_ids(ids, "prompt[0]").map(Prompt::Tokens),
            [_] => Err(invalid_prompt(format!(
                "prompt[0] must be a string or a list of token ids, got {}",
                kind(&items[0])
            ))),
            several => Err(invalid_prompt(format!(
                "one prompt per request is supported, got {}",
                several.len()
            ))),
        }
    }
}

/// Token ids of a JSON list; `at` names the list in errors.
fn token_ids(items: &[Value], at: &str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| invalid_prompt(format!("{at}[{i}] is not a token id: {item}")))
        })
        .collect()
}

/// Refuses an empty prompt of token ids, and ids outside a vocabulary of `vocab_size`, naming
/// the first.
pub fn check_token_ids(ids: &[u32], vocab_size: usize) -> Result<(), ApiError> {
    if ids.is_empty() {
        return Err(invalid_prompt("the prompt is empty".into()));
    }
    match ids.iter().position(|&id| id as usize >= vocab_size) {
        Some(i) => Err(invalid_prompt(format!(
            "token id {} (prompt[{i}]) is outside the vocabulary of {vocab_size} tokens",
            ids[i]
        ))),
        None => Ok(()),
    }
}

fn invalid_prompt(message: String) -> ApiError {
    ApiError::invalid("prompt", message)
}

/// The JSON type of `value`, for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The roles a chat message may have (OpenAI's).
pub const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// One message of a chat request as clients send it.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// One of [`ROLES`].
    pub role: String,
    /// A string, a list of content parts (`{"type": "text", "text": ...}`), or null (an
    /// assistant message that only called tools).
    #[serde(default)]
    pub content: Value,
}

/// The conversation of a chat request, checked: at least one message, each of a known role,
/// content as text (the text parts of a list joined by newlines, as vLLM joins them; a part of
/// any other type is refused, naming the type). `developer` — OpenAI's newer name for the
/// system role — is passed on as it is when the template knows the role, and as `system` when
/// it does not, as vLLM and llama.cpp do (transformers passes roles unchanged, and templates
/// that check roles then fail).
pub fn conversation(
    messages: &[ChatMessage],
    template_knows_developer: bool,
) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must hold at least one message",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            let role = match message.role.as_str() {
                "developer" if !template_knows_developer => "system",
                known if ROLES.contains(&known) => known,
                unknown => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role"),
                        format!(
                            "messages[{i}] has the unknown role {unknown:?}; the roles are {}",
                            ROLES.join(", ")
                        ),
                    ))
                }
            };
            Ok(Message::new(role, text_of(&message.content, i)?))
        })
        .collect()
}

/// The text of message `index`'s content.
fn text_of(content: &Value, index: usize) -> Result<String, ApiError> {
    let field = format!("messages[{index}].content");
    let parts = match content {
        Value::String(text) => return Ok(text.clone()),
        Value::Null => return Ok(String::new()),
        Value::Array(parts) => parts,
        other => {
            return Err(ApiError::invalid(
                &field,
                format!(
                    "{field} must be a string or a list of content parts, got {}",
                    kind(other)
                ),
            ))
        }
    };
    let texts = parts
        .iter()
        .enumerate()
        .map(|(j, part)| {
            let at = format!("{field}[{j}]");
            match part.get("type").and_then(Value::as_str) {
                Some("text") => part.get("text").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid(&at, format!("{at} is a text part without a text string"))
                }),
                Some(other) => Err(ApiError::invalid(
                    &at,
                    format!(
                        "{at} is a content part of type {other:?}; only text parts are supported"
                    ),
                )),
                None => Err(ApiError::invalid(
                    &at,
                    format!("{at} must be an object with a string `type`, got {part}"),
                )),
            }
        })
        .collect::<Result<Vec<&str>, ApiError>>()?;
    Ok(texts.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn messages(value: Value) -> Vec<ChatMessage> {
        serde_json::from_value(value).unwrap()
    }

    fn refusal(result: Result<impl std::fmt::Debug, ApiError>) -> String {
        result.unwrap_err().message().to_string()
    }

    #[test]
    fn a_prompt_is_text_or_token_ids_and_only_one() {
        assert_eq!(
            Prompt::from_json(&json!("hi")).unwrap(),
            Prompt::Text("hi".into())
        );
        assert_eq!(
            Prompt::from_json(&json!(["hi"])).unwrap(),
            Prompt::Text("hi".into())
        );
        assert_eq!(
            Prompt::from_json(&json!([1, 2, 3])).unwrap(),
            Prompt::Tokens(vec![1, 2, 3])
        );
        assert_eq!(
            Prompt::from_json(&json!([[4, 5]])).unwrap(),
            Prompt::Tokens(vec![4, 5])
        );
        assert!(refusal(Prompt::from_json(&json!(["a", "b"]))).contains("one prompt per request"));
        assert!(refusal(Prompt::from_json(&json!([[1], [2]]))).contains("got 2"));
        assert!(
            refusal(Prompt::from_json(&json!([1, -2]))).contains("prompt[1] is not a token id: -2")
        );
        assert!(refusal(Prompt::from_json(&json!([1.5]))).contains("1.5"));
        assert!(refusal(Prompt::from_json(&json!(5))).contains("got a number"));
        assert_eq!(
            Prompt::from_json(&json!([])).unwrap(),
            Prompt::Tokens(vec![])
        );
    }

    #[test]
    fn token_ids_outside_the_vocabulary_are_named() {
        assert!(check_token_ids(&[0, 299], 300).is_ok());
        assert!(refusal(check_token_ids(&[], 300)).contains("empty"));
        let message = refusal(check_token_ids(&[1, 300], 300));
        assert!(message.contains("token id 300 (prompt[1])"), "{message}");
    }

    #[test]
    fn content_parts_are_joined_and_other_parts_refused() {
        let chat = messages(json!([
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null},
        ]));
        assert_eq!(
            conversation(&chat, false).unwrap(),
            vec![Message::new("user", "a\nb"), Message::new("assistant", "")]
        );
        let image = messages(json!([{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
        ]}]));
        let message = refusal(conversation(&image, false));
        assert!(
            message.contains("messages[0].content[1]") && message.contains("\"image_url\""),
            "{message}"
        );
        let number = messages(json!([{"role": "user", "content": 5}]));
        assert!(refusal(conversation(&number, false)).contains("got a number"));
    }

    #[test]
    fn roles_are_checked_and_developer_becomes_system_unless_the_template_knows_it() {
        assert!(refusal(conversation(&[], false)).contains("at least one message"));
        let wizard = messages(json!([{"role": "wizard", "content": "x"}]));
        let message = refusal(conversation(&wizard, false));
        assert!(message.contains("\"wizard\""), "{message}");
        let developer = messages(json!([{"role": "developer", "content": "be terse"}]));
        assert_eq!(conversation(&developer, false).unwrap()[0].role, "system");
        assert_eq!(conversation(&developer, true).unwrap()[0].role, "developer");
        let all = messages(json!(
            ROLES.map(|role| json!({"role": role, "content": "x"}))
        ));
        assert_eq!(conversation(&all, true).unwrap().len(), 5);
    }
}
