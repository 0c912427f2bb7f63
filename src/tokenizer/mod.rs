//! Text in and out of the model: tokenizers, chat templates and streaming detokenization.
//!
//! * [`gguf_vocab`] builds a [`tokenizers::Tokenizer`] from the `tokenizer.ggml.*` metadata of a
//!   GGUF file, the way `transformers` does when it loads a GGUF (same ids, same added tokens,
//!   same BOS handling).
//! * [`template`] renders Hugging Face chat templates (Jinja) with the variables and environment
//!   that `transformers`' `apply_chat_template` uses.
//! * [`stream`] turns generated token ids into text pieces that never split a character, for
//!   streaming output.
//! * [`token_bytes`] reads the bytes each token stands for, for constrained decoding.
//!
//! The modules depend only on `tokenizers`, `minijinja`, `minijinja-contrib`, `serde`,
//! `serde_json`, `thiserror` and `std`.

pub mod gguf_vocab;
pub mod stream;
pub mod template;
pub mod token_bytes;

pub use gguf_vocab::{tokenizer_from_gguf, tokenizer_from_gguf_for_architecture, GgufVocab};
pub use stream::TextStream;
pub use template::{ChatTemplate, Message, TemplateError};

/// Errors from building a tokenizer from GGUF metadata or from decoding token ids.
///
/// Every variant names the GGUF metadata key (or the operation) it is about.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required metadata value is missing or empty.
    #[error("GGUF metadata `{key}` is missing or empty")]
    Missing {
        /// The metadata key, e.g. `tokenizer.ggml.tokens`.
        key: &'static str,
    },
    /// `tokenizer.ggml.model` names a tokenizer type that is not supported.
    #[error(
        "unsupported tokenizer type: GGUF metadata `{key}` = {value:?} (supported: {supported})"
    )]
    UnsupportedModel {
        /// The metadata key (`tokenizer.ggml.model`).
        key: &'static str,
        /// The value found in the file.
        value: String,
        /// The values that are supported, comma-separated.
        supported: String,
    },
    /// `tokenizer.ggml.pre` names a pre-tokenizer that is not supported for this tokenizer type.
    #[error("unsupported pre-tokenizer: GGUF metadata `{key}` = {value:?} for `tokenizer.ggml.model` = {model:?} (supported: {supported})")]
    UnsupportedPreTokenizer {
        /// The metadata key (`tokenizer.ggml.pre`).
        key: &'static str,
        /// The value found in the file.
        value: String,
        /// The tokenizer type (`tokenizer.ggml.model`).
        model: String,
        /// The values that are supported, comma-separated.
        supported: String,
    },
    /// A per-token array does not have one entry per token.
    #[error("GGUF metadata `{key}` has {len} entries but `tokenizer.ggml.tokens` has {expected}")]
    LengthMismatch {
        /// The metadata key of the array, e.g. `tokenizer.ggml.token_type`.
        key: &'static str,
        /// Its length.
        len: usize,
        /// The number of tokens.
        expected: usize,
    },
    /// A merge rule is not two tokens separated by one space.
    #[error("GGUF metadata `{key}`[{index}] = {merge:?} is not of the form \"left right\"")]
    BadMerge {
        /// The metadata key (`tokenizer.ggml.merges`).
        key: &'static str,
        /// Index of the bad entry.
        index: usize,
        /// The entry.
        merge: String,
    },
    /// A special token id does not index `tokenizer.ggml.tokens`.
    #[error(
        "GGUF metadata `{key}` = {id} is out of range for a vocabulary of {vocab_size} tokens"
    )]
    TokenIdOutOfRange {
        /// The metadata key, e.g. `tokenizer.ggml.bos_token_id`.
        key: &'static str,
        /// The id found.
        id: u32,
        /// The number of tokens in `tokenizer.ggml.tokens`.
        vocab_size: usize,
    },
    /// The `tokenizers` library rejected a component built from the metadata.
    #[error("cannot build the tokenizer's {component} from GGUF metadata: {message}")]
    Build {
        /// Which component: `BPE model`, `pre-tokenizer`, `post-processor`, `added tokens`, ...
        component: &'static str,
        /// The library's message.
        message: String,
    },
    /// Decoding token ids failed.
    #[error("cannot decode token ids: {message}")]
    Decode {
        /// The library's message.
        message: String,
    },
    /// Incremental decoding produced text that does not extend what was already streamed (only
    /// possible with a decoder whose output for a prefix changes when more ids follow).
    #[error("streamed text diverged from the full decode after {emitted_bytes} bytes")]
    StreamDiverged {
        /// How many bytes had been handed out when the divergence was found.
        emitted_bytes: usize,
    },
}

#[cfg(test)]
mod tests {
    //! Checks against the real SmolLM2-135M-Instruct GGUF vocabulary, compared with what
    //! `transformers` gives for the same file (`tests/fixtures/smollm2/`, written by
    //! `scripts/make_smollm2_reference.py`).

    use super::*;
    use serde::Deserialize;

    /// `scripts/make_smollm2_reference.py --dump-vocab PATH` output.
    #[derive(Deserialize)]
    struct DumpedVocab {
        model: String,
        pre: Option<String>,
        tokens: Vec<String>,
        token_types: Vec<i32>,
        scores: Vec<f32>,
        merges: Vec<String>,
        bos_token_id: Option<u32>,
        eos_token_id: Option<u32>,
        unknown_token_id: Option<u32>,
        padding_token_id: Option<u32>,
        add_bos_token: Option<bool>,
        add_eos_token: Option<bool>,
        chat_template: Option<String>,
    }

    #[derive(Deserialize)]
    struct TokenizerCases {
        cases: Vec<TokenizerCase>,
    }

    #[derive(Deserialize)]
    struct TokenizerCase {
        text: String,
        ids: Vec<u32>,
        ids_with_special_tokens: Vec<u32>,
        decoded: String,
        decoded_keep_special: String,
    }

    #[derive(Deserialize)]
    struct ChatCases {
        chat_template: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
        cases: Vec<ChatCase>,
    }

    #[derive(Deserialize)]
    struct ChatCase {
        name: String,
        messages: Vec<Message>,
        add_generation_prompt: bool,
        text: String,
        ids: Vec<u32>,
    }

    #[derive(Deserialize)]
    struct GreedyAnswers {
        answers: Vec<GreedyAnswer>,
    }

    #[derive(Deserialize)]
    struct GreedyAnswer {
        prompt_ids: Vec<u32>,
        new_ids: Vec<u32>,
        answer: String,
    }

    fn fixture<T: serde::de::DeserializeOwned>(name: &str) -> T {
        let path = format!(
            "{}/tests/fixtures/smollm2/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Needs the vocabulary dumped from the real GGUF (1.3 MB, not in the repository):
    ///
    /// ```text
    /// python scripts/make_smollm2_reference.py --skip-model --out /tmp/smollm2-ref --dump-vocab /tmp/smollm2_vocab.json
    /// PF_SMOLLM2_VOCAB_JSON=/tmp/smollm2_vocab.json cargo test --lib real_smollm2 -- --ignored
    /// ```
    #[test]
    #[ignore = "needs PF_SMOLLM2_VOCAB_JSON (see the doc comment)"]
    fn real_smollm2_vocabulary_matches_transformers() {
        let path = std::env::var("PF_SMOLLM2_VOCAB_JSON").expect(
            "set PF_SMOLLM2_VOCAB_JSON to the output of make_smollm2_reference.py --dump-vocab",
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let dumped: DumpedVocab =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(dumped.pre.as_deref(), Some("smollm"));
        let vocab = GgufVocab {
            model: dumped.model,
            pre: dumped.pre,
            tokens: dumped.tokens,
            token_types: dumped.token_types,
            scores: dumped.scores,
            merges: dumped.merges,
            bos_token_id: dumped.bos_token_id,
            eos_token_id: dumped.eos_token_id,
            unknown_token_id: dumped.unknown_token_id,
            padding_token_id: dumped.padding_token_id,
            add_bos_token: dumped.add_bos_token,
            add_eos_token: dumped.add_eos_token,
        };
        let tokenizer = tokenizer_from_gguf(&vocab).expect("tokenizer");
        assert_eq!(tokenizer.get_vocab_size(true), 49152);

        let decode = |ids: &[u32], skip: bool| tokenizer.decode(ids, skip).expect("decode");
        let stream = |ids: &[u32]| {
            let mut stream = TextStream::new();
            let mut out = String::new();
            for &id in ids {
                if let Some(piece) = stream.push(&tokenizer, id).expect("push") {
                    assert!(!piece.ends_with('\u{FFFD}'), "{piece:?}");
                    out.push_str(&piece);
                }
            }
            out.push_str(
                &stream
                    .finish(&tokenizer)
                    .expect("finish")
                    .unwrap_or_default(),
            );
            out
        };

        let cases: TokenizerCases = fixture("tokenizer_cases.json");
        let mut mismatches = Vec::new();
        for case in &cases.cases {
            let ids = tokenizer
                .encode(case.text.as_str(), false)
                .expect("encode")
                .get_ids()
                .to_vec();
            let with_special = tokenizer
                .encode(case.text.as_str(), true)
                .expect("encode")
                .get_ids()
                .to_vec();
            let decoded = decode(&case.ids, true);
            let kept = decode(&case.ids, false);
            let streamed = stream(&case.ids);
            if ids != case.ids
                || with_special != case.ids_with_special_tokens
                || decoded != case.decoded
                || kept != case.decoded_keep_special
                || streamed != case.decoded
            {
                mismatches.push(format!(
                    "{:?}: ids {:?} vs {:?}; with special {:?} vs {:?}; decoded {:?} vs {:?}; kept {:?} vs {:?}; streamed {:?}",
                    case.text, ids, case.ids, with_special, case.ids_with_special_tokens, decoded, case.decoded,
                    kept, case.decoded_keep_special, streamed
                ));
            }
        }
        assert!(
            mismatches.is_empty(),
            "{} of {} tokenizer cases differ:\n{}",
            mismatches.len(),
            cases.cases.len(),
            mismatches.join("\n")
        );

        let chats: ChatCases = fixture("chat_cases.json");
        assert_eq!(
            dumped.chat_template.as_deref(),
            Some(chats.chat_template.as_str())
        );
        let template = ChatTemplate::new(
            chats.chat_template.clone(),
            chats.bos_token.clone(),
            chats.eos_token.clone(),
        )
        .expect("template");
        for case in &chats.cases {
            let text = template
                .render(&case.messages, case.add_generation_prompt)
                .expect("render");
            assert_eq!(
                text, case.text,
                "chat {} (add_generation_prompt = {})",
                case.name, case.add_generation_prompt
            );
            let ids = tokenizer
                .encode(text.as_str(), false)
                .expect("encode")
                .get_ids()
                .to_vec();
            assert_eq!(ids, case.ids, "chat {} ids", case.name);
        }

        let greedy: GreedyAnswers = fixture("greedy_answers.json");
        for answer in &greedy.answers {
            assert_eq!(decode(&answer.new_ids, true), answer.answer);
            assert_eq!(stream(&answer.new_ids), answer.answer);
            let mut all = answer.prompt_ids.clone();
            all.extend(&answer.new_ids);
            assert_eq!(stream(&all), decode(&all, true));
        }

        // Random id sequences over the whole vocabulary (special tokens and partial characters
        // included): streamed pieces always add up to the full decode.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..300 {
            let mut ids = Vec::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            for _ in 0..(state % 64) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ids.push((state % 49152) as u32);
            }
            assert_eq!(stream(&ids), decode(&ids, true), "{ids:?}");
        }
    }
}
