//! The text side of a resolved model: its tokenizer and chat template, wherever they live
//! (`tokenizer.json` and `tokenizer_config.json` / `chat_template.jinja` beside a Hugging Face
//! checkpoint, or the `tokenizer.*` metadata of a GGUF file).

use tokenizers::Tokenizer;

use crate::checkpoint::gguf::{GgufFile, GgufValue};
use crate::checkpoint::source::{ResolvedModel, WeightsLocation};
use crate::error::{Error, Result};
use crate::tokenizer::{tokenizer_from_gguf_for_architecture, ChatTemplate, GgufVocab, Message};

/// A model's tokenizer and, where it has one, its chat template.
pub struct TextSide {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template.
    pub template: Option<ChatTemplate>,
}

impl TextSide {
    /// Loads the tokenizer and chat template of `model`; `Ok(None)` when it has no tokenizer.
    pub fn load(model: &ResolvedModel) -> Result<Option<Self>> {
        Self::load_from(&model.location)
    }

    /// Loads the tokenizer and chat template beside the weights at `location`; `Ok(None)`
    /// when there is no tokenizer.
    pub fn load_from(location: &WeightsLocation) -> Result<Option<Self>> {
        match location {
            WeightsLocation::Safetensors(dir) => {
                let path = dir.join("tokenizer.json");
                if !path.exists() {
                    return Ok(None);
                }
                let tokenizer = Tokenizer::from_file(&path).map_err(|e| {
                    Error::Tokenizer(format!("cannot load {}: {e}", path.display()))
                })?;
                let template = ChatTemplate::from_model_dir(dir)
                    .map_err(|e| Error::Tokenizer(format!("{}: {e}", dir.display())))?;
                Ok(Some(TextSide {
                    tokenizer,
                    template,
                }))
            }
            WeightsLocation::Gguf(path) => {
                let file = GgufFile::open(path)?;
                if file.get("tokenizer.ggml.tokens").is_none() {
                    return Ok(None);
                }
                let vocab = gguf_vocab(&file);
                let architecture = file
                    .get("general.architecture")
                    .and_then(GgufValue::as_str)
                    .unwrap_or_default();
                let tokenizer = tokenizer_from_gguf_for_architecture(&vocab, architecture)
                    .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
                let token =
                    |id: Option<u32>| id.and_then(|i| vocab.tokens.get(i as usize).cloned());
                let template = match file
                    .get("tokenizer.chat_template")
                    .and_then(GgufValue::as_str)
                {
                    Some(source) => Some(
                        ChatTemplate::new(
                            source,
                            token(vocab.bos_token_id),
                            token(vocab.eos_token_id),
                        )
                        .map_err(|e| {
                            Error::Tokenizer(format!(
                                "{}: tokenizer.chat_template: {e}",
                                path.display()
                            ))
                        })?,
                    ),
                    None => None,
                };
                Ok(Some(TextSide {
                    tokenizer,
                    template,
                }))
            }
        }
    }

    /// Token ids of `text` as the model's tokenizer encodes a prompt (special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot tokenize: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// The prompt ids of a conversation: the chat template rendered with a generation prompt,
    /// tokenized without adding special tokens (as transformers' `apply_chat_template` does).
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let template = self.template.as_ref().ok_or_else(|| {
            Error::Tokenizer(
                "the model has no chat template; use `generate` for raw prompts".into(),
            )
        })?;
        let text = template
            .render(messages, true)
            .map_err(|e| Error::Tokenizer(format!("the chat template failed to render: {e}")))?;
        self.encode_with(&text, false)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(format!("cannot decode: {e}")))
    }
}

/// The `tokenizer.ggml.*` metadata of a GGUF file.
fn gguf_vocab(file: &GgufFile) -> GgufVocab {
    let strings = |key: &str| -> Vec<String> {
        file.get(key)
            .and_then(GgufValue::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let numbers = |key: &str| {
        file.get(key)
            .and_then(GgufValue::as_array)
            .unwrap_or_default()
            .iter()
            .filter_map(GgufValue::as_f64)
    };
    let id = |key: &str| file.get(key).and_then(GgufValue::as_u64).map(|v| v as u32);
    let flag = |key: &str| file.get(key).and_then(GgufValue::as_bool);
    GgufVocab {
        model: file
            .get("tokenizer.ggml.model")
            .and_then(GgufValue::as_str)
            .unwrap_or_default()
            .to_string(),
        pre: file
            .get("tokenizer.ggml.pre")
            .and_then(GgufValue::as_str)
            .map(str::to_string),
        tokens: strings("tokenizer.ggml.tokens"),
        token_types: numbers("tokenizer.ggml.token_type")
            .map(|v| v as i32)
            .collect(),
        scores: numbers("tokenizer.ggml.scores").map(|v| v as f32).collect(),
        merges: strings("tokenizer.ggml.merges"),
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id"),
        unknown_token_id: id("tokenizer.ggml.unknown_token_id"),
        padding_token_id: id("tokenizer.ggml.padding_token_id"),
        add_bos_token: flag("tokenizer.ggml.add_bos_token"),
        add_eos_token: flag("tokenizer.ggml.add_eos_token"),
    }
}
