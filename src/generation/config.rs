//! Generation options with transformers' names and defaults, the model's
//! `generation_config.json` as defaults, and the checks that run before any rank works.

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};
use crate::generation::constraint::Constraint;
use crate::generation::logprobs::MAX_TOP_LOGPROBS;

/// When beam search stops (transformers' `early_stopping`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EarlyStopping {
    /// `false`: stop when the best finished score can no longer be beaten, estimated with the
    /// current length (transformers' heuristic).
    #[default]
    Heuristic,
    /// `true`: stop as soon as `num_beams` hypotheses are finished.
    Done,
    /// `"never"`: stop only when no better hypothesis can exist at any later length.
    Never,
}

impl std::str::FromStr for EarlyStopping {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "false" => Ok(EarlyStopping::Heuristic),
            "true" => Ok(EarlyStopping::Done),
            "never" => Ok(EarlyStopping::Never),
            other => Err(format!(
                "early_stopping must be true, false or never, not {other:?}"
            )),
        }
    }
}

/// `early_stopping` in a `generation_config.json`: `true`, `false` or `"never"`.
fn early_stopping_json<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<EarlyStopping>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Flag(bool),
        Word(String),
    }
    Option::<Raw>::deserialize(d)?
        .map(|raw| match raw {
            Raw::Flag(true) => Ok(EarlyStopping::Done),
            Raw::Flag(false) => Ok(EarlyStopping::Heuristic),
            Raw::Word(w) => w.parse().map_err(serde::de::Error::custom),
        })
        .transpose()
}

/// How to generate, with transformers' `GenerationConfig` names and defaults. Start from
/// [`GenerationConfig::default`] or from a model's own defaults
/// ([`ParallelModel::generation_config`](crate::ParallelModel::generation_config)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// Stop once this many seconds have passed since the generation began (the token being
    /// chosen then is kept; `None` = no limit).
    pub max_time: Option<f64>,
    /// End-of-sequence ids are suppressed until this many new tokens exist.
    pub min_new_tokens: usize,
    /// Sample from the processed distribution instead of taking its most likely token.
    pub do_sample: bool,
    /// Divides the logits before sampling (> 0).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens when sampling (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`, in (0, 1].
    pub top_p: f32,
    /// Keep the tokens whose information content is closest to the entropy, up to this mass
    /// (locally typical sampling), in (0, 1].
    pub typical_p: f32,
    /// When sampling, remove the tokens less likely than `min_p` times the most likely one,
    /// in [0, 1] (`None` = off).
    pub min_p: Option<f32>,
    /// When sampling, remove the tokens less likely than this, in [0, 1) (0 = off).
    pub epsilon_cutoff: f32,
    /// When sampling, remove the tokens less likely than `min(eta, sqrt(eta) *
    /// exp(-entropy))`, in [0, 1) (0 = off).
    pub eta_cutoff: f32,
    /// Divides positive (multiplies negative) logits of tokens already in the sequence (> 0;
    /// 1 = off).
    pub repetition_penalty: f32,
    /// Never repeat an n-gram of this size (0 = off).
    pub no_repeat_ngram_size: usize,
    /// Multiplies positive (divides negative) logits of the prompt's tokens (an
    /// encoder–decoder's encoder prompt), making them likelier above 1 (> 0; 1 = off).
    pub encoder_repetition_penalty: f32,
    /// Never generate an n-gram of this size that occurs in the prompt (an encoder–decoder's
    /// encoder prompt; 0 = off).
    pub encoder_no_repeat_ngram_size: usize,
    /// Token sequences that are never completed (transformers' `bad_words_ids`); a ban of a
    /// lone end-of-sequence id is ignored.
    pub bad_words_ids: Vec<Vec<u32>>,
    /// `(sequence, bias)`: the bias is added to the score of the sequence's last token whenever
    /// the sequence so far ends with the rest of it.
    pub sequence_bias: Vec<(Vec<u32>, f32)>,
    /// `(start, factor)`: from `start` new tokens on, end-of-sequence scores grow by their
    /// absolute value times `factor ^ (new tokens - start) - 1`.
    pub exponential_decay_length_penalty: Option<(usize, f32)>,
    /// Beams of beam search (1 = no beam search).
    pub num_beams: usize,
    /// Beam scores are divided by `length ^ length_penalty`.
    pub length_penalty: f32,
    /// When beam search stops.
    pub early_stopping: EarlyStopping,
    /// Sequences returned per prompt (at most `num_beams` with beam search).
    pub num_return_sequences: usize,
    /// End-of-sequence ids (one or several); `None` = the model's.
    pub eos_token_id: Option<Vec<u32>>,
    /// The id that pads shorter prompts of a batch on the left; `None` = the first
    /// end-of-sequence id (as transformers does).
    pub pad_token_id: Option<u32>,
    /// The first new token of an encoder–decoder (the token after a one-token start), as
    /// BART's summarisers force their BOS.
    pub forced_bos_token_id: Option<u32>,
    /// The last token allowed by `max_new_tokens` is one of these (one or several ids; a
    /// BART summariser's EOS).
    pub forced_eos_token_id: Option<Vec<u32>>,
    /// Tokens never generated.
    pub suppress_tokens: Vec<u32>,
    /// Tokens not generated as the first new token (the second after a forced BOS of a
    /// one-token start).
    pub begin_suppress_tokens: Vec<u32>,
    /// Log-softmax the processed scores again after every processor (transformers'
    /// `LogitNormalization`; beam scores add these).
    pub renormalize_logits: bool,
    /// Stop when the decoded text of a sequence ends with one of these strings.
    pub stop: Vec<String>,
    /// Seed of the sampler; `None` = the model's ([`Options::seed`](crate::Options::seed)),
    /// else a fresh one for every request.
    pub seed: Option<u64>,
    /// Report each new token's log-probability under the model's distribution (the
    /// log-softmax of the raw logits, before any processor; see
    /// [`logprobs`](crate::generation::logprobs)). OpenAI's name; transformers'
    /// `compute_transition_scores(..., normalize_logits=True)` over `output_logits`.
    pub logprobs: bool,
    /// With `logprobs`, also report the `top_logprobs` most likely tokens of each step, at most
    /// [`MAX_TOP_LOGPROBS`].
    pub top_logprobs: usize,
    /// What the new text must match (structured outputs): tokens it does not allow are never
    /// chosen, and the sequence ends once it is complete.
    pub constraint: Option<Constraint>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 20,
            max_time: None,
            min_new_tokens: 0,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            typical_p: 1.0,
            min_p: None,
            epsilon_cutoff: 0.0,
            eta_cutoff: 0.0,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            encoder_repetition_penalty: 1.0,
            encoder_no_repeat_ngram_size: 0,
            bad_words_ids: Vec::new(),
            sequence_bias: Vec::new(),
            exponential_decay_length_penalty: None,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            num_return_sequences: 1,
            eos_token_id: None,
            pad_token_id: None,
            forced_bos_token_id: None,
            forced_eos_token_id: None,
            suppress_tokens: Vec::new(),
            begin_suppress_tokens: Vec::new(),
            renormalize_logits: false,
            stop: Vec::new(),
            seed: None,
            logprobs: false,
            top_logprobs: 0,
            constraint: None,
        }
    }
}

/// `eos_token_id` may be one id or a list of ids.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Vec<u32>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(Option::<Raw>::deserialize(d)?.map(|raw| match raw {
        Raw::One(id) => vec![id],
        Raw::Many(ids) => ids,
    }))
}

/// The keys of `generation_config.json` this crate reads, with the JSON's `null`s allowed.
#[derive(Debug, Default, Deserialize)]
struct ModelDefaults {
    max_new_tokens: Option<usize>,
    min_new_tokens: Option<usize>,
    do_sample: Option<bool>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    typical_p: Option<f32>,
    min_p: Option<f32>,
    epsilon_cutoff: Option<f32>,
    eta_cutoff: Option<f32>,
    repetition_penalty: Option<f32>,
    no_repeat_ngram_size: Option<usize>,
    encoder_repetition_penalty: Option<f32>,
    encoder_no_repeat_ngram_size: Option<usize>,
    max_time: Option<f64>,
    bad_words_ids: Option<Vec<Vec<u32>>>,
    sequence_bias: Option<Vec<(Vec<u32>, f32)>>,
    exponential_decay_length_penalty: Option<(usize, f32)>,
    num_beams: Option<usize>,
    length_penalty: Option<f32>,
    #[serde(default, deserialize_with = "early_stopping_json")]
    early_stopping: Option<EarlyStopping>,
    num_return_sequences: Option<usize>,
    #[serde(default, deserialize_with = "one_or_many")]
    eos_token_id: Option<Vec<u32>>,
    pad_token_id: Option<u32>,
    forced_bos_token_id: Option<u32>,
    #[serde(default, deserialize_with = "one_or_many")]
    forced_eos_token_id: Option<Vec<u32>>,
    suppress_tokens: Option<Vec<u32>>,
    begin_suppress_tokens: Option<Vec<u32>>,
    renormalize_logits: Option<bool>,
}

impl GenerationConfig {
    /// transformers' defaults overridden by a checkpoint's `generation_config.json`, when the
    /// file exists.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(GenerationConfig::default());
        };
        Self::from_json(&text).map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))
    }

    /// transformers' defaults overridden by the keys of a `generation_config.json` text.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let m: ModelDefaults = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let d = GenerationConfig::default();
        Ok(GenerationConfig {
            max_new_tokens: m.max_new_tokens.unwrap_or(d.max_new_tokens),
            min_new_tokens: m.min_new_tokens.unwrap_or(d.min_new_tokens),
            do_sample: m.do_sample.unwrap_or(d.do_sample),
            temperature: m.temperature.unwrap_or(d.temperature),
            top_k: m.top_k.unwrap_or(d.top_k),
            top_p: m.top_p.unwrap_or(d.top_p),
            typical_p: m.typical_p.unwrap_or(d.typical_p),
            min_p: m.min_p,
            epsilon_cutoff: m.epsilon_cutoff.unwrap_or(d.epsilon_cutoff),
            eta_cutoff: m.eta_cutoff.unwrap_or(d.eta_cutoff),
            repetition_penalty: m.repetition_penalty.unwrap_or(d.repetition_penalty),
            no_repeat_ngram_size: m.no_repeat_ngram_size.unwrap_or(d.no_repeat_ngram_size),
            encoder_repetition_penalty: m
                .encoder_repetition_penalty
                .unwrap_or(d.encoder_repetition_penalty),
            encoder_no_repeat_ngram_size: m
                .encoder_no_repeat_ngram_size
                .unwrap_or(d.encoder_no_repeat_ngram_size),
            max_time: m.max_time,
            bad_words_ids: m.bad_words_ids.unwrap_or_default(),
            sequence_bias: m.sequence_bias.unwrap_or_default(),
            exponential_decay_length_penalty: m.exponential_decay_length_penalty,
            num_beams: m.num_beams.unwrap_or(d.num_beams),
            length_penalty: m.length_penalty.unwrap_or(d.length_penalty),
            early_stopping: m.early_stopping.unwrap_or(d.early_stopping),
            num_return_sequences: m.num_return_sequences.unwrap_or(d.num_return_sequences),
            eos_token_id: m.eos_token_id,
            pad_token_id: m.pad_token_id,
            forced_bos_token_id: m.forced_bos_token_id,
            forced_eos_token_id: m.forced_eos_token_id,
            suppress_tokens: m.suppress_tokens.unwrap_or_default(),
            begin_suppress_tokens: m.begin_suppress_tokens.unwrap_or_default(),
            renormalize_logits: m.renormalize_logits.unwrap_or(d.renormalize_logits),
            ..d
        })
    }

    /// Refuses contradictory or out-of-range options, naming the option and its value.
    /// `vocab_size` bounds the end-of-sequence ids; `context` is the model's longest sequence,
    /// and `longest_prompt` the longest prompt of the request.
    pub fn validate(&self, vocab_size: usize, context: usize, longest_prompt: usize) -> Result<()> {
        let fail = |message: String| Err(Error::InvalidInput(message));
        if self.do_sample && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return fail(format!(
                "temperature must be a positive number when sampling (do_sample), got {}",
                self.temperature
            ));
        }
        for (name, value) in [("top_p", self.top_p), ("typical_p", self.typical_p)] {
            if !(value > 0.0 && value <= 1.0) {
                return fail(format!("{name} must be in (0, 1], got {value}"));
            }
        }
        if let Some(p) = self.min_p.filter(|p| !(0.0..=1.0).contains(p)) {
            return fail(format!("min_p (--min-p) must be in [0, 1], got {p}"));
        }
        for (name, value) in [
            ("epsilon_cutoff", self.epsilon_cutoff),
            ("eta_cutoff", self.eta_cutoff),
        ] {
            if !(0.0..1.0).contains(&value) {
                return fail(format!(
                    "{name} (--{}) must be in [0, 1), got {value}",
                    name.replace('_', "-")
                ));
            }
        }
        if let Some((_, factor)) = self
            .exponential_decay_length_penalty
            .filter(|(_, f)| !f.is_finite())
        {
            return fail(format!(
                "exponential_decay_length_penalty (--exponential-decay-length-penalty) needs a finite factor, got {factor}"
            ));
        }
        if self.bad_words_ids.iter().any(Vec::is_empty) {
            return fail("bad_words_ids (--bad-words-ids) has an empty sequence".into());
        }
        if let Some((_, bias)) = self.sequence_bias.iter().find(|(_, b)| b.is_nan()) {
            return fail(format!(
                "sequence_bias (--sequence-bias) has a bias of {bias}"
            ));
        }
        if let Some((i, _)) = self.sequence_bias.iter().enumerate().find(|(i, (s, _))| {
            s.is_empty() || self.sequence_bias[..*i].iter().any(|(t, _)| t == s)
        }) {
            return fail(format!(
                "sequence_bias (--sequence-bias) has an empty or repeated sequence: {:?}",
                self.sequence_bias[i].0
            ));
        }
        if self.forced_eos_token_id.as_ref().is_some_and(Vec::is_empty) {
            return fail("forced_eos_token_id (--forced-eos-token-id) is an empty list".into());
        }
        let token_lists = [
            ("forced_bos_token_id", self.forced_bos_token_id.as_slice()),
            (
                "forced_eos_token_id",
                self.forced_eos_token_id.as_deref().unwrap_or_default(),
            ),
            ("suppress_tokens", &self.suppress_tokens),
            ("begin_suppress_tokens", &self.begin_suppress_tokens),
        ];
        let bad_words = self
            .bad_words_ids
            .iter()
            .map(|w| ("bad_words_ids", w.as_slice()));
        let biased = self
            .sequence_bias
            .iter()
            .map(|(s, _)| ("sequence_bias", s.as_slice()));
        for (name, ids) in token_lists.into_iter().chain(bad_words).chain(biased) {
            if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
                return fail(format!(
                    "{name} (--{}) {id} is outside the vocabulary of {vocab_size} tokens",
                    name.replace('_', "-")
                ));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return fail(format!(
                "repetition_penalty must be a positive number, got {}",
                self.repetition_penalty
            ));
        }
        if !(self.encoder_repetition_penalty > 0.0 && self.encoder_repetition_penalty.is_finite()) {
            return fail(format!(
                "encoder_repetition_penalty (--encoder-repetition-penalty) must be a positive number, got {}",
                self.encoder_repetition_penalty
            ));
        }
        if let Some(t) = self.max_time.filter(|t| !(*t > 0.0 && t.is_finite())) {
            return fail(format!(
                "max_time (--max-time) must be a positive number of seconds, got {t}"
            ));
        }
        if !self.length_penalty.is_finite() {
            return fail(format!(
                "length_penalty must be finite, got {}",
                self.length_penalty
            ));
        }
        if self.num_beams == 0 || self.num_return_sequences == 0 {
            return fail(format!(
                "num_beams ({}) and num_return_sequences ({}) must be at least 1",
                self.num_beams, self.num_return_sequences
            ));
        }
        if self.num_beams > 1 && self.num_return_sequences > self.num_beams {
            return fail(format!(
                "num_return_sequences ({}) cannot exceed num_beams ({}) with beam search",
                self.num_return_sequences, self.num_beams
            ));
        }
        if self.num_beams == 1 && !self.do_sample && self.num_return_sequences > 1 {
            return fail(format!(
                "greedy decoding returns one sequence per prompt; num_return_sequences is {} (use do_sample or num_beams)",
                self.num_return_sequences
            ));
        }
        if self.num_beams > 1 && self.do_sample {
            return fail("sampling with beams (do_sample with num_beams > 1) is not supported; use one or the other".into());
        }
        if let Some(constraint) = self.constraint.as_ref().filter(|_| self.num_beams > 1) {
            return fail(format!(
                "a {} constraint cannot be combined with beam search (num_beams {})",
                constraint.name(),
                self.num_beams
            ));
        }
        if self.num_beams > 1 && !self.stop.is_empty() {
            return fail("stop strings are not supported with beam search".into());
        }
        if self.min_new_tokens > self.max_new_tokens {
            return fail(format!(
                "min_new_tokens ({}) exceeds max_new_tokens ({})",
                self.min_new_tokens, self.max_new_tokens
            ));
        }
        if let Some(id) = self
            .eos_token_id
            .iter()
            .flatten()
            .find(|&&id| id as usize >= vocab_size)
        {
            return fail(format!(
                "eos_token_id {id} is outside the vocabulary of {vocab_size} tokens"
            ));
        }
        if self.stop.iter().any(String::is_empty) {
            return fail("a stop string is empty".into());
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return fail(format!(
                "top_logprobs (--top-logprobs) must be at most {MAX_TOP_LOGPROBS}, got {}",
                self.top_logprobs
            ));
        }
        if self.top_logprobs > 0 && !self.logprobs {
            return fail(format!(
                "top_logprobs (--top-logprobs) {} needs logprobs (--logprobs)",
                self.top_logprobs
            ));
        }
        if longest_prompt.saturating_add(self.max_new_tokens) > context {
            return fail(format!(
                "a prompt of {longest_prompt} tokens plus max_new_tokens {} exceeds the model's context of {context} positions",
                self.max_new_tokens
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_defaults_override_transformers_defaults() {
        let c = GenerationConfig::from_json(
            r#"{"do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": null,
                "eos_token_id": [2, 7], "early_stopping": "never", "transformers_version": "5"}"#,
        )
        .unwrap();
        assert!(c.do_sample);
        assert_eq!((c.temperature, c.top_p, c.top_k), (0.6, 0.9, 50));
        assert_eq!(c.eos_token_id, Some(vec![2, 7]));
        assert_eq!(c.early_stopping, EarlyStopping::Never);
        let one =
            GenerationConfig::from_json(r#"{"eos_token_id": 3, "early_stopping": true}"#).unwrap();
        assert_eq!(one.eos_token_id, Some(vec![3]));
        assert_eq!(one.early_stopping, EarlyStopping::Done);
        assert!(GenerationConfig::from_json(r#"{"early_stopping": "soon"}"#).is_err());
    }

    #[test]
    fn a_summarisers_forced_tokens_suppressions_and_min_p_are_read() {
        let c = GenerationConfig::from_json(
            r#"{"forced_bos_token_id": 0, "forced_eos_token_id": 2, "min_p": 0.05,
                "suppress_tokens": [4, 5], "begin_suppress_tokens": [6],
                "renormalize_logits": true}"#,
        )
        .unwrap();
        assert_eq!(c.forced_bos_token_id, Some(0));
        assert_eq!(c.forced_eos_token_id, Some(vec![2]));
        assert_eq!(c.min_p, Some(0.05));
        assert_eq!(
            (c.suppress_tokens, c.begin_suppress_tokens),
            (vec![4, 5], vec![6])
        );
        assert!(c.renormalize_logits);
        let c = GenerationConfig::from_json(
            r#"{"epsilon_cutoff": 0.02, "eta_cutoff": 0.001, "bad_words_ids": [[4], [5, 6]],
                "sequence_bias": [[[7], 1.5], [[8, 9], -2.0]],
                "exponential_decay_length_penalty": [3, 1.2]}"#,
        )
        .unwrap();
        assert_eq!((c.epsilon_cutoff, c.eta_cutoff), (0.02, 0.001));
        assert_eq!(c.bad_words_ids, [vec![4], vec![5, 6]]);
        assert_eq!(c.sequence_bias, [(vec![7], 1.5), (vec![8, 9], -2.0)]);
        assert_eq!(c.exponential_decay_length_penalty, Some((3, 1.2)));
        let c = GenerationConfig::from_json(
            r#"{"encoder_repetition_penalty": 1.5, "encoder_no_repeat_ngram_size": 3,
                "max_time": 2.5}"#,
        )
        .unwrap();
        assert_eq!(c.encoder_repetition_penalty, 1.5);
        assert_eq!(c.encoder_no_repeat_ngram_size, 3);
        assert_eq!(c.max_time, Some(2.5));
        let none = GenerationConfig::from_json(
            r#"{"forced_eos_token_id": null, "suppress_tokens": null, "min_p": null}"#,
        )
        .unwrap();
        assert_eq!(none, GenerationConfig::default());
    }

    #[test]
    fn contradictory_or_out_of_range_options_are_named() {
        let check = |c: GenerationConfig, needle: &str| {
            let err = c.validate(100, 64, 8).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        };
        let d = GenerationConfig::default;
        check(
            GenerationConfig {
                do_sample: true,
                temperature: 0.0,
                ..d()
            },
            "temperature",
        );
        check(
            GenerationConfig { top_p: 0.0, ..d() },
            "top_p must be in (0, 1], got 0",
        );
        check(GenerationConfig { top_p: 1.5, ..d() }, "top_p");
        check(
            GenerationConfig {
                typical_p: -1.0,
                ..d()
            },
            "typical_p",
        );
        check(
            GenerationConfig {
                repetition_penalty: 0.0,
                ..d()
            },
            "repetition_penalty",
        );
        check(
            GenerationConfig {
                num_beams: 2,
                num_return_sequences: 3,
                ..d()
            },
            "cannot exceed num_beams (2)",
        );
        check(
            GenerationConfig {
                num_return_sequences: 2,
                ..d()
            },
            "greedy decoding",
        );
        check(
            GenerationConfig {
                min_new_tokens: 30,
                ..d()
            },
            "min_new_tokens (30)",
        );
        check(
            GenerationConfig {
                eos_token_id: Some(vec![100]),
                ..d()
            },
            "eos_token_id 100",
        );
        check(
            GenerationConfig {
                max_new_tokens: 60,
                ..d()
            },
            "context of 64",
        );
        check(
            GenerationConfig {
                min_p: Some(1.5),
                ..d()
            },
            "min_p (--min-p) must be in [0, 1], got 1.5",
        );
        check(
            GenerationConfig {
                forced_eos_token_id: Some(vec![]),
                ..d()
            },
            "forced_eos_token_id (--forced-eos-token-id) is an empty list",
        );
        check(
            GenerationConfig {
                forced_bos_token_id: Some(100),
                ..d()
            },
            "forced_bos_token_id (--forced-bos-token-id) 100 is outside",
        );
        check(
            GenerationConfig {
                suppress_tokens: vec![3, 120],
                ..d()
            },
            "suppress_tokens (--suppress-tokens) 120",
        );
        check(
            GenerationConfig {
                begin_suppress_tokens: vec![101],
                ..d()
            },
            "begin_suppress_tokens (--begin-suppress-tokens) 101",
        );
        check(
            GenerationConfig {
                epsilon_cutoff: 1.0,
                ..d()
            },
            "epsilon_cutoff (--epsilon-cutoff) must be in [0, 1), got 1",
        );
        check(
            GenerationConfig {
                eta_cutoff: -0.1,
                ..d()
            },
            "eta_cutoff (--eta-cutoff)",
        );
        check(
            GenerationConfig {
                exponential_decay_length_penalty: Some((2, f32::INFINITY)),
                ..d()
            },
            "exponential_decay_length_penalty (--exponential-decay-length-penalty)",
        );
        check(
            GenerationConfig {
                bad_words_ids: vec![vec![1], vec![]],
                ..d()
            },
            "bad_words_ids (--bad-words-ids) has an empty sequence",
        );
        check(
            GenerationConfig {
                bad_words_ids: vec![vec![1, 200]],
                ..d()
            },
            "bad_words_ids (--bad-words-ids) 200 is outside",
        );
        check(
            GenerationConfig {
                sequence_bias: vec![(vec![1, 2], 1.0), (vec![1, 2], 2.0)],
                ..d()
            },
            "sequence_bias (--sequence-bias) has an empty or repeated sequence: [1, 2]",
        );
        check(
            GenerationConfig {
                sequence_bias: vec![(vec![150], 1.0)],
                ..d()
            },
            "sequence_bias (--sequence-bias) 150 is outside",
        );
        check(
            GenerationConfig {
                encoder_repetition_penalty: 0.0,
                ..d()
            },
            "encoder_repetition_penalty (--encoder-repetition-penalty) must be a positive number",
        );
        check(
            GenerationConfig {
                max_time: Some(-1.0),
                ..d()
            },
            "max_time (--max-time) must be a positive number of seconds, got -1",
        );
        check(
            GenerationConfig {
                stop: vec![String::new()],
                ..d()
            },
            "stop string",
        );
        check(
            GenerationConfig {
                logprobs: true,
                top_logprobs: 21,
                ..d()
            },
            "top_logprobs (--top-logprobs) must be at most 20, got 21",
        );
        check(
            GenerationConfig {
                top_logprobs: 3,
                ..d()
            },
            "top_logprobs (--top-logprobs) 3 needs logprobs (--logprobs)",
        );
        check(
            GenerationConfig {
                num_beams: 2,
                constraint: Some(Constraint::JsonObject),
                ..d()
            },
            "a json_object constraint cannot be combined with beam search (num_beams 2)",
        );
        assert!(GenerationConfig {
            do_sample: true,
            temperature: 0.5,
            ..d()
        }
        .validate(100, 64, 8)
        .is_ok());
    }
}
