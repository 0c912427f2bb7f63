//! Build a [`tokenizers::Tokenizer`] from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! A GGUF has no `tokenizer.json`: it stores the vocabulary, the merges, the token types and the
//! special token ids as metadata. This module rebuilds the tokenizer exactly the way
//! `transformers` (5.x, `transformers/integrations/gguf/gguf_tokenizer_mapping.py`) does when it
//! is given `gguf_file=...`, so that both give the same ids for the same file:
//!
//! * `tokenizer.ggml.model = "gpt2"` (byte-level BPE): a BPE model over the vocabulary (tokens not
//!   spelled in the GPT-2 byte alphabet are respelled from their UTF-8 bytes), the merges from the
//!   file, the `ByteLevel` pre-tokenizer (GPT-2 regex) and decoder. When `tokenizer.ggml.pre`
//!   names a pre-tokenizer with its own split regex (`llama-bpe`, `qwen2`, `gpt-4o`, ...) that
//!   regex is used instead, followed by `ByteLevel` without its regex. `<|endoftext|>` is always
//!   an added special token (GPT-2's default), appended as a new id when the vocabulary lacks it.
//! * `tokenizer.ggml.model = "llama"` (SentencePiece BPE with byte fallback): a BPE model with
//!   `byte_fallback` and `fuse_unk`, the merges from the file or, when it has none, rebuilt from
//!   the vocabulary and `tokenizer.ggml.scores`; the `Metaspace` pre-tokenizer (prepend `▁` to the
//!   first piece) and the `Replace ▁`, `ByteFallback`, `Fuse`, `Strip` decoder. BOS is added by
//!   default (llama.cpp's behaviour for SentencePiece vocabularies that do not say otherwise).
//!
//! In both, tokens typed *control* (3) become added special tokens (skipped when decoding with
//! `skip_special_tokens`), tokens typed *user-defined* (4) become added non-special tokens (always
//! matched whole), and the BOS/EOS/UNK/PAD tokens are added as special tokens. The post-processor
//! adds BOS when `tokenizer.ggml.add_bos_token` is true (default: false for `gpt2`, true for
//! `llama`) and EOS when `tokenizer.ggml.add_eos_token` is true.
//!
//! SentencePiece vocabularies of two architectures are built differently, as `transformers` does
//! (`gemma_tokenizer`, `phi3_tokenizer`), so they need the architecture
//! ([`tokenizer_from_gguf_for_architecture`]):
//!
//! * `gemma`, `gemma2`, `gemma3`: no space prefix (llama.cpp writes
//!   `tokenizer.ggml.add_space_prefix = false`): a `Replace(" ", "▁")` normalizer and no
//!   `Metaspace`; tokens made only of spaces are respelled with `▁`; merges, when the file has
//!   none, are rebuilt ordered by the tokens' position in the file instead of their scores;
//!   `<unk>` is the BPE's unknown token; `GemmaTokenizer`'s `<bos>`, `<eos>`, `<unk>`, `<pad>`,
//!   `<mask>` are its special tokens; the decoder does not strip a leading space.
//! * `phi3`: the space prefix comes from a `Prepend("▁")` + `Replace(" ", "▁")` normalizer, with
//!   no pre-tokenizer (only text that starts with a space tokenizes differently from Llama's).
//!
//! Not supported (error): `t5` (Unigram), `gemma4`, and other tokenizer types.

use std::collections::{HashMap, HashSet};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

use super::TokenizerError;

/// The tokenizer part of a GGUF file's metadata (`tokenizer.ggml.*`).
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE), `"llama"` (SentencePiece), ...
    pub model: String,
    /// `tokenizer.ggml.pre`: `"default"`, `"smollm"`, `"llama-bpe"`, `"qwen2"`, `"gpt-4o"`, ...
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: the vocabulary, indexed by token id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte. Empty when the file has none.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.scores` (SentencePiece). Empty when the file has none.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.merges`, each `"left right"`. Empty when the file has none.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unknown_token_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub padding_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos_token: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos_token: Option<bool>,
}

/// GGUF token type of control tokens (`<|im_start|>`, `<s>`, ...).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type of user-defined added tokens (`<think>`, ...).
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

/// Llama 3's split regex (`transformers`' `_LLAMA3_SPLIT`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex (`transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5's split regex (`transformers.models.qwen3_5.tokenization_qwen3_5.PRETOKENIZE_REGEX`).
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's Tekken split regex (`transformers`' `_TEKKEN_SPLIT`).
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o's split regex (`transformers`' `_GPT4O_SPLIT`).
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` values with their own split regex (`transformers`'
/// `GGUF_PRE_TOKENIZER_SPLITS`).
const PRE_TOKENIZER_SPLITS: &[(&str, &str)] = &[
    ("llama3", LLAMA3_SPLIT),
    ("llama-v3", LLAMA3_SPLIT),
    ("llama-bpe", LLAMA3_SPLIT),
    ("falcon3", LLAMA3_SPLIT),
    ("falcon-h1", LLAMA3_SPLIT),
    ("pixtral", LLAMA3_SPLIT),
    ("midm-2.0", LLAMA3_SPLIT),
    ("lfm2", LLAMA3_SPLIT),
    ("jina-v5-nano", LLAMA3_SPLIT),
    ("dbrx", LLAMA3_SPLIT),
    ("smaug-bpe", LLAMA3_SPLIT),
    ("tekken", TEKKEN_SPLIT),
    ("qwen2", QWEN2_SPLIT),
    ("deepseek-r1-qwen", QWEN2_SPLIT),
    ("kormo", QWEN2_SPLIT),
    ("f2llmv2", QWEN2_SPLIT),
    ("megrez", QWEN2_SPLIT),
    ("qwen35", QWEN35_SPLIT),
    ("gpt-4o", GPT4O_SPLIT),
    ("llama4", GPT4O_SPLIT),
    ("kanana2", GPT4O_SPLIT),
    ("talkie", GPT4O_SPLIT),
    ("minimax-m2", GPT4O_SPLIT),
];

/// `tokenizer.ggml.pre` values of byte-level vocabularies that `transformers` handles with the
/// plain GPT-2 `ByteLevel` pre-tokenizer, and whose llama.cpp regex is the GPT-2 one (for
/// `smollm`, `starcoder`, `refact`, `codeshell`, `command-r`, `exaone`, `minerva-7b` llama.cpp
/// additionally isolates every digit, which transformers does not; the ids still agree when the
/// vocabulary has no multi-character token containing a digit, as with SmolLM2, whose 49152
/// tokens include none). Any other value not in [`PRE_TOKENIZER_SPLITS`] is rejected rather
/// than silently tokenized with a regex the vocabulary was not trained with.
const GPT2_REGEX_PRE_TOKENIZERS: &[&str] = &[
    "default",
    "gpt2",
    "gpt-2",
    "smollm",
    "starcoder",
    "refact",
    "codeshell",
    "command-r",
    "exaone",
    "minerva-7b",
    "mpt",
    "olmo",
    "jais",
    "trillion",
];

/// Tokenizer types (`tokenizer.ggml.model`) this module builds.
const SUPPORTED_MODELS: &str = "gpt2, llama";

/// How `transformers` builds a SentencePiece (`tokenizer.ggml.model = "llama"`) vocabulary of
/// an architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SentencePieceFlavour {
    /// `LlamaTokenizer`: `Metaspace` with the space prefix.
    Llama,
    /// `GemmaTokenizer` (`gemma`, `gemma2`, `gemma3`).
    Gemma,
    /// Phi-3: the prefix from a normalizer.
    Phi3,
}

/// Build the tokenizer a GGUF file describes, as `transformers` does for the same file.
///
/// Equivalent to [`tokenizer_from_gguf_for_architecture`] for an architecture without a
/// special-cased SentencePiece tokenizer (anything but Gemma and Phi-3).
pub fn tokenizer_from_gguf(vocab: &GgufVocab) -> Result<Tokenizer, TokenizerError> {
    build(vocab, SentencePieceFlavour::Llama)
}

/// Like [`tokenizer_from_gguf`], but given `general.architecture`: `transformers` builds
/// SentencePiece (`tokenizer.ggml.model = "llama"`) vocabularies of `gemma`, `gemma2`, `gemma3`
/// and `phi3` its own way (see the module docs), and so does this.
pub fn tokenizer_from_gguf_for_architecture(
    vocab: &GgufVocab,
    architecture: &str,
) -> Result<Tokenizer, TokenizerError> {
    let flavour = match architecture {
        "gemma" | "gemma2" | "gemma3" => SentencePieceFlavour::Gemma,
        "phi3" => SentencePieceFlavour::Phi3,
        _ => SentencePieceFlavour::Llama,
    };
    build(vocab, flavour)
}

fn build(vocab: &GgufVocab, flavour: SentencePieceFlavour) -> Result<Tokenizer, TokenizerError> {
    if vocab.tokens.is_empty() {
        return Err(TokenizerError::Missing { key: KEY_TOKENS });
    }
    check_len(KEY_TOKEN_TYPE, vocab.token_types.len(), vocab.tokens.len())?;
    let model = vocab.model.as_str();
    let pre = vocab.pre.as_deref();
    let split = pre.and_then(|name| {
        PRE_TOKENIZER_SPLITS
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, regex)| *regex)
    });

    let (mut tokenizer, builder_defaults, add_bos_default) = match model {
        "gpt2" => {
            if let Some(name) = pre {
                if split.is_none() && !GPT2_REGEX_PRE_TOKENIZERS.contains(&name) {
                    return Err(unsupported_pre(model, name));
                }
            }
            // `GPT2Tokenizer`'s own unk/bos/eos default.
            (byte_level_tokenizer(vocab)?, &["<|endoftext|>"][..], false)
        }
        // `LlamaTokenizer`'s own bos, eos, unk defaults, in the order transformers adds them
        // (`GemmaTokenizer`'s: bos, eos, unk, pad, mask).
        // tokenizer.ggml.pre is not used by SentencePiece vocabularies (neither llama.cpp nor
        // transformers reads it, unless it names a split regex, see below).
        "llama" => match flavour {
            SentencePieceFlavour::Gemma => (
                gemma_tokenizer(vocab)?,
                &["<bos>", "<eos>", "<unk>", "<pad>", "<mask>"][..],
                true,
            ),
            SentencePieceFlavour::Llama | SentencePieceFlavour::Phi3 => {
                let mut tokenizer = sentencepiece_tokenizer(vocab)?;
                if flavour == SentencePieceFlavour::Phi3 {
                    use_prefix_normalizer(&mut tokenizer)?;
                }
                (tokenizer, &["<s>", "</s>", "<unk>"][..], true)
            }
        },
        "" => return Err(TokenizerError::Missing { key: KEY_MODEL }),
        other => {
            return Err(TokenizerError::UnsupportedModel {
                key: KEY_MODEL,
                value: other.to_string(),
                supported: SUPPORTED_MODELS.to_string(),
            })
        }
    };

    // The builder's tokenizer class adds its default special tokens first.
    add_tokens(
        &mut tokenizer,
        builder_defaults.iter().map(|t| special(t)).collect(),
    )?;
    add_gguf_special_tokens(&mut tokenizer, vocab)?;
    if let Some(regex) = split {
        set_split_regex(&mut tokenizer, regex)?;
    }

    // Then the wrapping tokenizer adds the named special tokens of the file that it does not
    // have yet (bos, eos, unk, pad order).
    let bos = named_token(vocab, "tokenizer.ggml.bos_token_id", vocab.bos_token_id)?;
    let eos = named_token(vocab, "tokenizer.ggml.eos_token_id", vocab.eos_token_id)?;
    let unk = named_token(
        vocab,
        "tokenizer.ggml.unknown_token_id",
        vocab.unknown_token_id,
    )?;
    let pad = named_token(
        vocab,
        "tokenizer.ggml.padding_token_id",
        vocab.padding_token_id,
    )?;
    let mut named: Vec<AddedToken> = Vec::new();
    for token in [bos, eos, unk, pad].into_iter().flatten() {
        let already = tokenizer
            .get_added_vocabulary()
            .get_added_tokens_decoder()
            .values()
            .any(|added| added.content == token)
            || named.iter().any(|added| added.content == token);
        if !already {
            named.push(special(token));
        }
    }
    add_tokens(&mut tokenizer, named)?;

    let add_bos = vocab.add_bos_token.unwrap_or(add_bos_default);
    let add_eos = vocab.add_eos_token.unwrap_or(false);
    set_post_processor(
        &mut tokenizer,
        bos.filter(|_| add_bos),
        eos.filter(|_| add_eos),
    )?;
    Ok(tokenizer)
}

fn unsupported_pre(model: &str, value: &str) -> TokenizerError {
    let mut supported: Vec<&str> = GPT2_REGEX_PRE_TOKENIZERS.to_vec();
    supported.extend(PRE_TOKENIZER_SPLITS.iter().map(|(name, _)| *name));
    TokenizerError::UnsupportedPreTokenizer {
        key: KEY_PRE,
        value: value.to_string(),
        model: model.to_string(),
        supported: supported.join(", "),
    }
}

fn check_len(key: &'static str, len: usize, expected: usize) -> Result<(), TokenizerError> {
    if len != 0 && len != expected {
        return Err(TokenizerError::LengthMismatch { key, len, expected });
    }
    Ok(())
}

fn special(content: &str) -> AddedToken {
    AddedToken::from(content, true).normalized(false)
}

fn add_tokens(tokenizer: &mut Tokenizer, tokens: Vec<AddedToken>) -> Result<(), TokenizerError> {
    if tokens.is_empty() {
        return Ok(());
    }
    tokenizer
        .add_tokens(tokens)
        .map(|_| ())
        .map_err(|e| TokenizerError::Build {
            component: "added tokens",
            message: e.to_string(),
        })
}

/// The token string a special-token id names, checked against the vocabulary.
fn named_token<'a>(
    vocab: &'a GgufVocab,
    key: &'static str,
    id: Option<u32>,
) -> Result<Option<&'a str>, TokenizerError> {
    match id {
        None => Ok(None),
        Some(id) => vocab
            .tokens
            .get(id as usize)
            .map(|token| Some(token.as_str()))
            .ok_or(TokenizerError::TokenIdOutOfRange {
                key,
                id,
                vocab_size: vocab.tokens.len(),
            }),
    }
}

/// GPT-2's byte-to-character table: printable Latin-1 bytes map to themselves, the others to
/// U+0100 and up.
pub(crate) fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(byte)
        } else {
            extra += 1;
            255 + extra
        };
        // Every code here is below U+0200, so always a valid char.
        table[byte as usize] = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
    }
    table
}

fn parse_merges(merges: &[String]) -> Result<Vec<(String, String)>, TokenizerError> {
    merges
        .iter()
        .enumerate()
        .map(|(index, merge)| {
            let mut parts = merge.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(left), Some(right), None) => Ok((left.to_string(), right.to_string())),
                _ => Err(TokenizerError::BadMerge {
                    key: KEY_MERGES,
                    index,
                    merge: merge.clone(),
                }),
            }
        })
        .collect()
}

fn bpe_error(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build {
        component: "BPE model",
        message: e.to_string(),
    }
}

/// `transformers`' `byte_level_tokenizer` + `GPT2Tokenizer`.
fn byte_level_tokenizer(vocab: &GgufVocab) -> Result<Tokenizer, TokenizerError> {
    let table = bytes_to_unicode();
    let alphabet: HashSet<char> = table.iter().copied().collect();
    // Later duplicates win, as in the Python dict comprehension.
    let map: Vocab = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(index, token)| {
            let key = if token.chars().all(|c| alphabet.contains(&c)) {
                token.clone()
            } else {
                token.bytes().map(|b| table[b as usize]).collect()
            };
            (key, index as u32)
        })
        .collect();
    let merges = parse_merges(&vocab.merges)?;
    let bpe = BPE::builder()
        .vocab_and_merges(map, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .fuse_unk(false)
        .build()
        .map_err(bpe_error)?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

/// `transformers`' `sentencepiece_tokenizer` + `LlamaTokenizer`.
fn sentencepiece_tokenizer(vocab: &GgufVocab) -> Result<Tokenizer, TokenizerError> {
    let map: Vocab = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(index, token)| (token.clone(), index as u32))
        .collect();
    let merges = if vocab.merges.is_empty() {
        if vocab.scores.is_empty() {
            return Err(TokenizerError::Missing { key: KEY_SCORES });
        }
        check_len(KEY_SCORES, vocab.scores.len(), vocab.tokens.len())?;
        generate_merges(&vocab.tokens, &vocab.scores)
    } else {
        parse_merges(&vocab.merges)?
    };
    let bpe = BPE::builder()
        .vocab_and_merges(map, merges)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(bpe_error)?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
    tokenizer.with_decoder(Some(sentencepiece_decoder(true)?));
    Ok(tokenizer)
}

/// `transformers`' `gemma_tokenizer` + `GemmaTokenizer`: tokens of spaces only respelled with
/// `▁` (the file stores them as real spaces), merges from the file or rebuilt ordered by the
/// tokens' position in the file, no space prefix.
fn gemma_tokenizer(vocab: &GgufVocab) -> Result<Tokenizer, TokenizerError> {
    let tokens: Vec<String> = vocab
        .tokens
        .iter()
        .map(|t| match !t.is_empty() && t.chars().all(|c| c == ' ') {
            true => "▁".repeat(t.chars().count()),
            false => t.clone(),
        })
        .collect();
    let map: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(index, token)| (token.clone(), index as u32))
        .collect();
    let merges = if vocab.merges.is_empty() {
        // Gemma's scores do not follow its merge order; the file's order does.
        let positions: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
        generate_merges(&tokens, &positions)
    } else {
        parse_merges(&vocab.merges)?
    };
    let bpe = BPE::builder()
        .vocab_and_merges(map, merges)
        .unk_token("<unk>".to_string())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(bpe_error)?;
    let mut tokenizer = Tokenizer::new(bpe);
    let space = Replace::new(" ", "▁").map_err(|e| TokenizerError::Build {
        component: "normalizer",
        message: e.to_string(),
    })?;
    tokenizer
        .with_normalizer(Some(space))
        .map_err(|e| TokenizerError::Build {
            component: "normalizer",
            message: e.to_string(),
        })?;
    let split = Split::new(
        SplitPattern::String(" ".to_string()),
        SplitDelimiterBehavior::MergedWithPrevious,
        false,
    )
    .map_err(|e| TokenizerError::Build {
        component: "pre-tokenizer",
        message: e.to_string(),
    })?;
    tokenizer.with_pre_tokenizer(Some(split));
    tokenizer.with_decoder(Some(sentencepiece_decoder(false)?));
    Ok(tokenizer)
}

/// The decoder of a SentencePiece vocabulary: `▁` back to spaces, byte tokens back to bytes,
/// and, where the tokenizer prepended a space, that space stripped again.
fn sentencepiece_decoder(strip_prefix_space: bool) -> Result<DecoderWrapper, TokenizerError> {
    let replace = Replace::new("▁", " ").map_err(|e| TokenizerError::Build {
        component: "decoder",
        message: e.to_string(),
    })?;
    let mut steps = vec![
        DecoderWrapper::Replace(replace),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if strip_prefix_space {
        steps.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    Ok(DecoderWrapper::Sequence(DecoderSequence::new(steps)))
}

/// `transformers`' `phi3_tokenizer`: the Llama SentencePiece tokenizer whose space prefix comes
/// from a `Prepend("▁")` + `Replace(" ", "▁")` normalizer, without a pre-tokenizer.
fn use_prefix_normalizer(tokenizer: &mut Tokenizer) -> Result<(), TokenizerError> {
    let space = Replace::new(" ", "▁").map_err(|e| TokenizerError::Build {
        component: "normalizer",
        message: e.to_string(),
    })?;
    let normalizer = NormalizerSequence::new(vec![
        NormalizerWrapper::Prepend(Prepend::new("▁".to_string())),
        NormalizerWrapper::Replace(space),
    ]);
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|e| TokenizerError::Build {
            component: "normalizer",
            message: e.to_string(),
        })?;
    tokenizer.with_pre_tokenizer(None::<PreTokenizerWrapper>);
    Ok(())
}

/// Merges implied by a SentencePiece vocabulary and its scores (`transformers`'
/// `generate_merges(vocab, vocab_scores)`): every split of every token into two vocabulary
/// tokens, ordered by the token's score (best first), then by the lengths of the two halves.
fn generate_merges(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    // `{token: index}`: later duplicates win.
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, token)| (token.as_str(), i))
        .collect();
    // `dict(zip(tokens, scores))`: insertion order of first occurrence, value of the last.
    let mut order: Vec<&str> = Vec::new();
    let mut score_of: HashMap<&str, f32> = HashMap::new();
    for (token, score) in tokens.iter().zip(scores) {
        if score_of.insert(token.as_str(), *score).is_none() {
            order.push(token.as_str());
        }
    }
    struct Merge<'a> {
        left: &'a str,
        right: &'a str,
        score: f32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut merges: Vec<Merge> = Vec::new();
    for token in order {
        let score = score_of.get(token).copied().unwrap_or(0.0);
        let mut local: Vec<(usize, usize, Merge)> = Vec::new();
        let total_chars = token.chars().count();
        for (char_pos, (byte_pos, _)) in token.char_indices().enumerate().skip(1) {
            let (left, right) = token.split_at(byte_pos);
            if let (Some(&li), Some(&ri)) = (index.get(left), index.get(right)) {
                local.push((
                    li,
                    ri,
                    Merge {
                        left,
                        right,
                        score,
                        left_chars: char_pos,
                        right_chars: total_chars - char_pos,
                    },
                ));
            }
        }
        local.sort_by_key(|(li, ri, _)| (*li, *ri));
        merges.extend(local.into_iter().map(|(_, _, merge)| merge));
    }
    // `sorted(..., key=(score, len(left), len(right)), reverse=True)`: stable, descending.
    merges.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    merges
        .into_iter()
        .map(|m| (m.left.to_string(), m.right.to_string()))
        .collect()
}

/// `transformers`' `add_gguf_special_tokens`: control tokens become special added tokens (in a
/// byte-level vocabulary only those spelled in the byte alphabet: others are llama.cpp
/// mislabels), user-defined tokens that are in the vocabulary become non-special added tokens.
fn add_gguf_special_tokens(
    tokenizer: &mut Tokenizer,
    vocab: &GgufVocab,
) -> Result<(), TokenizerError> {
    let alphabet: Option<HashSet<char>> =
        (vocab.model == "gpt2").then(|| bytes_to_unicode().iter().copied().collect());
    let control: Vec<AddedToken> = vocab
        .tokens
        .iter()
        .zip(&vocab.token_types)
        .filter(|(token, &kind)| {
            kind == TOKEN_TYPE_CONTROL
                && alphabet
                    .as_ref()
                    .is_none_or(|alphabet| token.chars().all(|c| alphabet.contains(&c)))
        })
        .map(|(token, _)| special(token))
        .collect();
    add_tokens(tokenizer, control)?;

    let known = tokenizer.get_vocab(true);
    let user_defined: Vec<AddedToken> = vocab
        .tokens
        .iter()
        .zip(&vocab.token_types)
        .filter(|(token, &kind)| {
            kind == TOKEN_TYPE_USER_DEFINED && known.contains_key(token.as_str())
        })
        .map(|(token, _)| AddedToken::from(token.as_str(), false).normalized(false))
        .collect();
    add_tokens(tokenizer, user_defined)
}

/// `transformers`' `set_split_regex`: the pre-tokenizer's own split, then `ByteLevel` without
/// its regex.
fn set_split_regex(tokenizer: &mut Tokenizer, regex: &str) -> Result<(), TokenizerError> {
    let split = Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| TokenizerError::Build {
        component: "pre-tokenizer",
        message: e.to_string(),
    })?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ])));
    Ok(())
}

/// `TokenizersBackend.update_post_processor`: `[bos] $A [eos]` for single sequences.
fn set_post_processor(
    tokenizer: &mut Tokenizer,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<(), TokenizerError> {
    let build_error = |message: String| TokenizerError::Build {
        component: "post-processor",
        message,
    };
    let mut special_tokens: Vec<(String, u32)> = Vec::new();
    for token in [bos, eos].into_iter().flatten() {
        let id = tokenizer.token_to_id(token).ok_or_else(|| {
            build_error(format!("special token {token:?} is not in the vocabulary"))
        })?;
        if !special_tokens.iter().any(|(t, _)| t == token) {
            special_tokens.push((token.to_string(), id));
        }
    }
    let bos_single = bos.map(|t| format!("{t}:0 ")).unwrap_or_default();
    let eos_single = eos.map(|t| format!(" {t}:0")).unwrap_or_default();
    let single = format!("{bos_single}$A:0{eos_single}");
    let bos_pair = bos.map(|t| format!(" {t}:1")).unwrap_or_default();
    let eos_pair = eos.map(|t| format!(" {t}:1")).unwrap_or_default();
    let pair = format!("{single}{bos_pair} $B:1{eos_pair}");
    let processor = TemplateProcessing::builder()
        .try_single(single.as_str())
        .map_err(|e| build_error(format!("template {single:?}: {e}")))?
        .try_pair(pair.as_str())
        .map_err(|e| build_error(format!("template {pair:?}: {e}")))?
        .special_tokens(special_tokens)
        .build()
        .map_err(|e| build_error(e.to_string()))?;
    tokenizer.with_post_processor(Some(processor));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary: `specials`, the 256 byte characters, then one token per merge
    /// step needed to spell each of `words`, then `extra` tokens.
    fn byte_level_vocab(
        specials: &[(&str, i32)],
        words: &[&str],
        extra: &[(&str, i32)],
    ) -> GgufVocab {
        let table = bytes_to_unicode();
        let mut tokens: Vec<String> = specials.iter().map(|(t, _)| t.to_string()).collect();
        let mut types: Vec<i32> = specials.iter().map(|(_, k)| *k).collect();
        tokens.extend(table.iter().map(|c| c.to_string()));
        types.extend(std::iter::repeat_n(1, 256));
        let mut merges = Vec::new();
        for word in words {
            let spelled: Vec<String> = word
                .bytes()
                .map(|b| table[b as usize].to_string())
                .collect();
            let mut current = spelled[0].clone();
            for piece in &spelled[1..] {
                let next = format!("{current}{piece}");
                if !tokens.contains(&next) {
                    merges.push(format!("{current} {piece}"));
                    tokens.push(next.clone());
                    types.push(1);
                }
                current = next;
            }
        }
        for (token, kind) in extra {
            tokens.push(token.to_string());
            types.push(*kind);
        }
        GgufVocab {
            model: "gpt2".into(),
            tokens,
            token_types: types,
            merges,
            ..GgufVocab::default()
        }
    }

    fn ids(tokenizer: &Tokenizer, text: &str, add_special_tokens: bool) -> Vec<u32> {
        tokenizer
            .encode(text, add_special_tokens)
            .expect("encode")
            .get_ids()
            .to_vec()
    }

    fn decode(tokenizer: &Tokenizer, ids: &[u32], skip: bool) -> String {
        tokenizer.decode(ids, skip).expect("decode")
    }

    // Expected ids below were produced by transformers 5.24 (`AutoTokenizer.from_pretrained(...,
    // gguf_file=...)`) on GGUF files written with the `gguf` package from the same vocabularies.

    fn smollm_like() -> GgufVocab {
        let mut vocab = byte_level_vocab(
            &[("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3)],
            &[
                "Hello", " world", " hello", "user", "hi", "\n\n", "12", "😀", " w",
            ],
            &[("<think>", 4), ("</think>", 4)],
        );
        vocab.pre = Some("smollm".into());
        vocab.bos_token_id = Some(1);
        vocab.eos_token_id = Some(2);
        vocab.unknown_token_id = Some(0);
        vocab.padding_token_id = Some(2);
        vocab.add_bos_token = Some(false);
        vocab
    }

    #[test]
    fn byte_level_smollm_matches_transformers() {
        let tok = tokenizer_from_gguf(&smollm_like()).expect("build");
        assert_eq!(tok.get_vocab_size(true), 284);
        let cases: &[(&str, &[u32])] = &[
            ("Hello world", &[262, 267]),
            (" hello  world\n\n", &[272, 35, 267, 277]),
            ("<|im_start|>user\nhi<|im_end|>", &[1, 275, 13, 276, 2]),
            (
                "I'm 12345 ok",
                &[76, 42, 112, 35, 278, 54, 55, 56, 35, 114, 110],
            ),
            ("é😀", &[198, 172, 281]),
            ("<think>x</think>", &[282, 123, 283]),
            ("", &[]),
            (
                "don't HELLO's",
                &[103, 114, 113, 42, 119, 35, 75, 72, 79, 79, 82, 42, 118],
            ),
        ];
        for (text, expected) in cases {
            // add_bos_token = false: the same with and without special tokens.
            assert_eq!(&ids(&tok, text, true), expected, "{text:?}");
            assert_eq!(&ids(&tok, text, false), expected, "{text:?}");
        }
        let chat = ids(&tok, "<|im_start|>user\nhi<|im_end|>", true);
        assert_eq!(decode(&tok, &chat, true), "user\nhi");
        assert_eq!(decode(&tok, &chat, false), "<|im_start|>user\nhi<|im_end|>");
        // User-defined tokens are added but not special: kept when skipping special tokens.
        assert_eq!(decode(&tok, &[282, 123, 283], true), "<think>x</think>");
        for (text, expected) in cases {
            let kept = decode(&tok, expected, false);
            assert_eq!(kept, *text);
            let skipped = decode(&tok, expected, true);
            assert_eq!(
                skipped,
                text.replace("<|im_start|>", "").replace("<|im_end|>", "")
            );
        }
    }

    #[test]
    fn byte_level_llama3_split_bos_and_endoftext() {
        let mut vocab = byte_level_vocab(
            &[],
            &[
                "Hello", " world", " hello", "user", "hi", "\n\n", "123", "😀", "'s", " HELLO",
            ],
            &[
                ("<|begin_of_text|>", 3),
                ("<|end_of_text|>", 3),
                ("<|reserved_special_token_0|>", 3),
                ("<think>", 4),
                // A control token outside the byte alphabet: a llama.cpp mislabel, not added.
                ("<｜weird｜>", 3),
            ],
        );
        let n = vocab.tokens.len() as u32;
        vocab.pre = Some("llama-bpe".into());
        vocab.bos_token_id = Some(n - 5);
        vocab.eos_token_id = Some(n - 4);
        vocab.add_bos_token = Some(true);
        let tok = tokenizer_from_gguf(&vocab).expect("build");
        // `<|endoftext|>` is appended as a new special token (id 291), as transformers does.
        assert_eq!(tok.get_vocab_size(true), 292);
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(291));
        let cases: &[(&str, &[u32])] = &[
            ("Hello world", &[259, 264]),
            (" hello  world\n\n", &[269, 32, 264, 274]),
            (
                "I'm 12345 ok",
                &[73, 39, 109, 32, 276, 52, 53, 32, 111, 107],
            ),
            ("é😀", &[195, 169, 279]),
            (
                "<think>x</think>",
                &[289, 120, 60, 47, 116, 273, 110, 107, 62],
            ),
            ("", &[]),
            ("don't HELLO's", &[100, 111, 110, 39, 116, 285, 280]),
        ];
        for (text, expected) in cases {
            assert_eq!(&ids(&tok, text, false), expected, "{text:?}");
            let mut with_bos = vec![286];
            with_bos.extend_from_slice(expected);
            assert_eq!(ids(&tok, text, true), with_bos, "{text:?}");
            assert_eq!(decode(&tok, &with_bos, true), *text);
        }
        assert_eq!(decode(&tok, &[286, 259], false), "<|begin_of_text|>Hello");
    }

    #[test]
    fn byte_level_qwen2_split_without_bos_flag() {
        let mut vocab = byte_level_vocab(
            &[],
            &["Hello", " world"],
            &[("<|begin_of_text|>", 3), ("<|end_of_text|>", 3)],
        );
        let n = vocab.tokens.len() as u32;
        vocab.pre = Some("qwen2".into());
        vocab.bos_token_id = Some(n - 2);
        vocab.eos_token_id = Some(n - 1);
        let tok = tokenizer_from_gguf(&vocab).expect("build");
        assert_eq!(tok.get_vocab_size(true), 268);
        assert_eq!(ids(&tok, "Hello world", true), [259, 264]);
        assert_eq!(
            ids(&tok, " hello  world\n\n", true),
            [32, 104, 101, 108, 108, 111, 32, 264, 10, 10]
        );
        // Qwen2 splits digits one by one.
        assert_eq!(
            ids(&tok, "I'm 12345 ok", true),
            [73, 39, 109, 32, 49, 50, 51, 52, 53, 32, 111, 107]
        );
    }

    fn spm_vocab() -> GgufVocab {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        let pieces = [
            "▁", "e", "l", "o", "h", "H", "w", "r", "d", "ll", "▁H", "llo", "▁w", "or", "ld",
            "▁Hello", "▁world", "▁wor", "He", "Hello",
        ];
        tokens.extend(pieces.iter().map(|p| p.to_string()));
        tokens.push("<think>".into());
        let mut token_types = vec![2, 3, 3];
        token_types.extend(std::iter::repeat_n(6, 256));
        token_types.extend(std::iter::repeat_n(1, pieces.len()));
        token_types.push(4);
        let mut scores = vec![0.0f32; 259];
        scores.extend((0..=pieces.len()).map(|i| -(i as f32)));
        GgufVocab {
            model: "llama".into(),
            pre: Some("default".into()),
            tokens,
            token_types,
            scores,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            unknown_token_id: Some(0),
            ..GgufVocab::default()
        }
    }

    #[test]
    fn sentencepiece_merges_from_scores_and_default_bos() {
        let tok = tokenizer_from_gguf(&spm_vocab()).expect("build");
        assert_eq!(tok.get_vocab_size(true), 280);
        let cases: &[(&str, &[u32], &str)] = &[
            ("Hello world", &[269, 260, 270, 275], "Hello world"),
            (
                " hello  world\n\n",
                &[259, 263, 260, 270, 259, 275, 13, 13],
                "hello  world\n\n",
            ),
            (
                "I'm 12345 ok",
                &[259, 76, 42, 112, 259, 52, 53, 54, 55, 56, 259, 262, 110],
                "I'm 12345 ok",
            ),
            ("é😀", &[259, 198, 172, 243, 162, 155, 131], "é😀"),
            (
                "<think>x</think>",
                &[279, 123, 63, 50, 119, 263, 108, 113, 110, 65],
                "<think>x</think>",
            ),
            ("", &[], ""),
            (
                "Hello\n<s>world",
                &[269, 260, 270, 13, 1, 265, 272, 273],
                "Hello\nworld",
            ),
            ("<s>Hello</s>", &[1, 278, 2], "Hello"),
        ];
        for (text, expected, decoded) in cases {
            assert_eq!(&ids(&tok, text, false), expected, "{text:?}");
            let mut with_bos = vec![1];
            with_bos.extend_from_slice(expected);
            // BOS is added by default for SentencePiece vocabularies.
            assert_eq!(ids(&tok, text, true), with_bos, "{text:?}");
            assert_eq!(decode(&tok, &with_bos, true), *decoded, "{text:?}");
        }
        assert_eq!(
            decode(&tok, &[1, 269, 260, 270, 275], false),
            "<s> Hello world"
        );
    }

    #[test]
    fn generate_merges_orders_like_transformers() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -0.5, -2.0];
        let merges = generate_merges(&tokens, &scores);
        let expected = [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(l, r)| (l.to_string(), r.to_string()))
            .collect();
        assert_eq!(merges, expected);
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let mut vocab = smollm_like();
        vocab.pre = Some("deepseek-llm".into());
        let err = tokenizer_from_gguf(&vocab).expect_err("unknown pre");
        let text = err.to_string();
        assert!(
            text.contains("tokenizer.ggml.pre") && text.contains("deepseek-llm"),
            "{text}"
        );

        let mut vocab = smollm_like();
        vocab.model = "t5".into();
        let text = tokenizer_from_gguf(&vocab).expect_err("t5").to_string();
        assert!(
            text.contains("tokenizer.ggml.model") && text.contains("t5"),
            "{text}"
        );

        let mut vocab = smollm_like();
        vocab.bos_token_id = Some(100_000);
        let text = tokenizer_from_gguf(&vocab).expect_err("bos").to_string();
        assert!(
            text.contains("tokenizer.ggml.bos_token_id") && text.contains("100000"),
            "{text}"
        );

        let mut vocab = smollm_like();
        vocab.merges.push("a b c".into());
        let text = tokenizer_from_gguf(&vocab).expect_err("merge").to_string();
        assert!(text.contains("tokenizer.ggml.merges"), "{text}");

        let mut vocab = smollm_like();
        vocab.token_types.pop();
        let text = tokenizer_from_gguf(&vocab).expect_err("types").to_string();
        assert!(text.contains("tokenizer.ggml.token_type"), "{text}");

        let text = tokenizer_from_gguf(&GgufVocab::default())
            .expect_err("empty")
            .to_string();
        assert!(text.contains("tokenizer.ggml.tokens"), "{text}");
    }

    /// Ids and decoding of `transformers`' `convert_gguf_tokenizer("gemma2" / "phi3", ...)` for
    /// [`spm_vocab`] with a token of two spaces appended (`transformers` 5.25).
    #[test]
    fn gemma_and_phi3_sentencepiece_as_transformers_builds_them() {
        let mut vocab = spm_vocab();
        vocab.tokens.push("  ".into());
        vocab.token_types.push(1);
        vocab.scores.push(-50.0);
        let gemma = tokenizer_from_gguf_for_architecture(&vocab, "gemma2").expect("gemma");
        // `<bos>`, `<eos>`, `<pad>`, `<mask>` appended by GemmaTokenizer; the spaces respelled.
        assert_eq!(gemma.get_vocab_size(true), 285);
        assert_eq!(gemma.token_to_id("▁▁"), Some(280));
        let phi3 = tokenizer_from_gguf_for_architecture(&vocab, "phi3").expect("phi3");
        assert_eq!(phi3.get_vocab_size(true), 281);
        let cases: &[(&Tokenizer, &str, &[u32], &str)] = &[
            (&gemma, "Hello world", &[278, 275], "Hello world"),
            (
                &gemma,
                " hello  world\n\n",
                &[259, 263, 260, 270, 259, 275, 13, 13],
                " hello  world\n\n",
            ),
            (&gemma, "  Hello", &[259, 269, 260, 270], "  Hello"),
            (&gemma, "He<think>llo", &[277, 279, 270], "He<think>llo"),
            (&phi3, "Hello world", &[269, 260, 270, 275], "Hello world"),
            (
                &phi3,
                " hello  world\n\n",
                &[259, 259, 263, 260, 270, 259, 275, 13, 13],
                " hello  world\n\n",
            ),
            (&phi3, "  Hello", &[259, 259, 269, 260, 270], "  Hello"),
            (
                &phi3,
                "He<think>llo",
                &[269, 260, 279, 259, 270],
                "He<think> llo",
            ),
        ];
        for (tok, text, ids, decoded) in cases {
            let enc = tok.encode(*text, false).expect("encode");
            assert_eq!(enc.get_ids(), *ids, "{text:?}");
            assert_eq!(tok.decode(enc.get_ids(), true).expect("decode"), *decoded);
        }
        // Other architectures keep Llama's SentencePiece tokenizer.
        let llama = tokenizer_from_gguf_for_architecture(&vocab, "llama").expect("llama");
        let enc = llama.encode("Hello world", false).expect("encode");
        assert_eq!(enc.get_ids(), &[269, 260, 270, 275]);
    }

    #[test]
    fn byte_table_is_gpt2s() {
        let table = bytes_to_unicode();
        assert_eq!(table[b'A' as usize], 'A');
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[0], 'Ā');
        assert_eq!(table[0xAD], 'Ń');
        let distinct: HashSet<char> = table.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
