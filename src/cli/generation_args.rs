//! The generation options as command-line flags, with transformers' names; each flag that is
//! given overrides the model's `generation_config.json` defaults. (The sampler's seed is the
//! model-wide `--seed`.)

use clap::Args;
use parallelformers::generation::constraint::Constraint;
use parallelformers::text::TextSide;
use parallelformers::{EarlyStopping, GenerationConfig};

use super::constraint_args::ConstraintArgs;

/// Sequences of token ids, one flag value (an alias, so that clap does not take each sequence
/// for a value of its own).
type TokenSequences = Vec<Vec<u32>>;

/// `(sequence, bias)` pairs, one flag value.
type SequenceBiases = Vec<(Vec<u32>, f32)>;

/// Flags shared by the commands that generate.
#[derive(Debug, Clone, Default, Args)]
pub struct GenerationArgs {
    /// Maximum number of new tokens, at least 1 [default: the model's, else 20; 256 for chat].
    #[arg(long, value_parser = super::at_least_one)]
    max_new_tokens: Option<usize>,
    /// End-of-sequence is suppressed until this many new tokens exist.
    #[arg(long)]
    min_new_tokens: Option<usize>,
    /// Sample instead of taking the most likely token (true or false).
    #[arg(long)]
    do_sample: Option<bool>,
    /// Divides the logits before sampling (> 0).
    #[arg(long)]
    temperature: Option<f32>,
    /// Sample among the k most likely tokens only (0 = all).
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample among the most likely tokens whose probability reaches p, in (0, 1].
    #[arg(long)]
    top_p: Option<f32>,
    /// Locally typical sampling mass, in (0, 1].
    #[arg(long)]
    typical_p: Option<f32>,
    /// When sampling, drop the tokens less likely than p times the most likely one, in [0, 1].
    #[arg(long)]
    min_p: Option<f32>,
    /// When sampling, drop the tokens less likely than this, in [0, 1) (0 = off).
    #[arg(long)]
    epsilon_cutoff: Option<f32>,
    /// When sampling, eta sampling's cutoff, in [0, 1) (0 = off).
    #[arg(long)]
    eta_cutoff: Option<f32>,
    /// Penalty on tokens already in the sequence (1 = off).
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Never repeat an n-gram of this size (0 = off).
    #[arg(long)]
    no_repeat_ngram_size: Option<usize>,
    /// Raises the prompt's tokens (an encoder–decoder's encoder prompt) above 1 (1 = off).
    #[arg(long)]
    encoder_repetition_penalty: Option<f32>,
    /// Never generate an n-gram of this size found in the (encoder's) prompt (0 = off).
    #[arg(long)]
    encoder_no_repeat_ngram_size: Option<usize>,
    /// Stop once this many seconds have passed since the generation began.
    #[arg(long)]
    max_time: Option<f64>,
    /// Token sequences never completed, as JSON: '[[4], [5, 6]]'.
    #[arg(long, value_parser = json::<TokenSequences>)]
    bad_words_ids: Option<TokenSequences>,
    /// Biases of the last token of sequences, as JSON: '[[[7], 1.5], [[8, 9], -2.0]]'.
    #[arg(long, value_parser = json::<SequenceBiases>)]
    sequence_bias: Option<SequenceBiases>,
    /// START,FACTOR: from START new tokens on, end-of-sequence scores grow by FACTOR per token.
    #[arg(long, value_parser = start_and_factor)]
    exponential_decay_length_penalty: Option<(usize, f32)>,
    /// Beams of beam search (1 = none).
    #[arg(long)]
    num_beams: Option<usize>,
    /// Exponent of the length normalisation of beam scores.
    #[arg(long)]
    length_penalty: Option<f32>,
    /// When beam search stops: true, false or never.
    #[arg(long)]
    early_stopping: Option<EarlyStopping>,
    /// Sequences returned per prompt.
    #[arg(long)]
    num_return_sequences: Option<usize>,
    /// End-of-sequence ids, comma-separated [default: the model's].
    #[arg(long, value_delimiter = ',')]
    eos_token_id: Option<Vec<u32>>,
    /// The token forced after a one-token start (an encoder–decoder's first new token).
    #[arg(long)]
    forced_bos_token_id: Option<u32>,
    /// The token(s) forced as the last new token that max-new-tokens allows, comma-separated.
    #[arg(long, value_delimiter = ',')]
    forced_eos_token_id: Option<Vec<u32>>,
    /// Token ids never generated, comma-separated.
    #[arg(long, value_delimiter = ',')]
    suppress_tokens: Option<Vec<u32>>,
    /// Token ids not generated as the first new token, comma-separated.
    #[arg(long, value_delimiter = ',')]
    begin_suppress_tokens: Option<Vec<u32>>,
    /// Log-softmax the scores again after the processors (true or false).
    #[arg(long)]
    renormalize_logits: Option<bool>,
    /// Stop a sequence once its text contains this string (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    #[command(flatten)]
    constraint: ConstraintArgs,
}

impl GenerationArgs {
    /// `defaults` with every given flag applied.
    pub fn apply(&self, defaults: &GenerationConfig) -> GenerationConfig {
        let mut c = defaults.clone();
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(value) = self.$field.clone() {
                    c.$field = value;
                }
            )*};
        }
        set!(
            max_new_tokens,
            min_new_tokens,
            do_sample,
            temperature,
            top_k,
            top_p,
            typical_p,
            epsilon_cutoff,
            eta_cutoff,
            repetition_penalty,
            no_repeat_ngram_size,
            encoder_repetition_penalty,
            encoder_no_repeat_ngram_size,
            num_beams,
            length_penalty,
            early_stopping,
            num_return_sequences,
            suppress_tokens,
            begin_suppress_tokens,
            renormalize_logits,
            bad_words_ids,
            sequence_bias
        );
        if self.eos_token_id.is_some() {
            c.eos_token_id = self.eos_token_id.clone();
        }
        if self.forced_eos_token_id.is_some() {
            c.forced_eos_token_id = self.forced_eos_token_id.clone();
        }
        c.min_p = self.min_p.or(c.min_p);
        c.max_time = self.max_time.or(c.max_time);
        c.exponential_decay_length_penalty = self
            .exponential_decay_length_penalty
            .or(c.exponential_decay_length_penalty);
        c.forced_bos_token_id = self.forced_bos_token_id.or(c.forced_bos_token_id);
        if !self.stop.is_empty() {
            c.stop = self.stop.clone();
        }
        c
    }
}

/// The flags of `generate --json` that report scores: each new token's log-probability under
/// the model's distribution (the log-softmax of the raw logits, before any processor), and the
/// most likely tokens of each step.
#[derive(Debug, Clone, Default, Args)]
pub struct ScoreArgs {
    /// Report each new token's log-probability (with --json: a "logprobs" list).
    #[arg(long, requires = "json")]
    logprobs: bool,
    /// With --logprobs, also report the N most likely tokens of each step (at most 20).
    #[arg(long, value_name = "N")]
    top_logprobs: Option<usize>,
}

impl ScoreArgs {
    /// `config` with the score flags applied (checked by
    /// [`GenerationConfig::validate`]: `--top-logprobs` at most 20, and only with
    /// `--logprobs`).
    pub fn apply(&self, mut config: GenerationConfig) -> GenerationConfig {
        config.logprobs |= self.logprobs;
        config.top_logprobs = self.top_logprobs.unwrap_or(config.top_logprobs);
        config
    }
}

impl GenerationArgs {
    /// The constraint of `--json-schema`, `--grammar` or `--regex`, compiled against `text`'s
    /// tokenizer for logits `vocab_size` wide (see [`ConstraintArgs::resolve`]).
    pub fn constraint(
        &self,
        text: Option<&TextSide>,
        vocab_size: usize,
    ) -> anyhow::Result<Option<Constraint>> {
        self.constraint.resolve(text, vocab_size)
    }
}

/// A flag's value in JSON (transformers' `generation_config.json` form).
fn json<T: serde::de::DeserializeOwned>(value: &str) -> Result<T, String> {
    serde_json::from_str(value).map_err(|e| e.to_string())
}

/// `START,FACTOR` of `--exponential-decay-length-penalty`.
fn start_and_factor(value: &str) -> Result<(usize, f32), String> {
    let (start, factor) = value
        .split_once(',')
        .ok_or("expected START,FACTOR, such as 5,1.2")?;
    let start = start.trim().parse().map_err(|e| format!("START: {e}"))?;
    let factor = factor.trim().parse().map_err(|e| format!("FACTOR: {e}"))?;
    Ok((start, factor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        generation: GenerationArgs,
    }

    #[test]
    fn the_processor_flags_take_transformers_values() {
        let args = Command::try_parse_from([
            "generate",
            "--min-p",
            "0.1",
            "--forced-bos-token-id",
            "0",
            "--forced-eos-token-id",
            "2,3",
            "--suppress-tokens",
            "4,5",
            "--begin-suppress-tokens",
            "6",
            "--renormalize-logits",
            "true",
            "--bad-words-ids",
            "[[4], [5, 6]]",
            "--sequence-bias",
            "[[[7], 1.5], [[8, 9], -2.0]]",
            "--exponential-decay-length-penalty",
            "5,1.2",
            "--epsilon-cutoff",
            "0.01",
            "--encoder-no-repeat-ngram-size",
            "3",
            "--max-time",
            "2.5",
        ])
        .unwrap();
        let c = args.generation.apply(&GenerationConfig::default());
        assert_eq!(c.min_p, Some(0.1));
        assert_eq!(c.forced_bos_token_id, Some(0));
        assert_eq!(c.forced_eos_token_id, Some(vec![2, 3]));
        assert_eq!(
            (c.suppress_tokens, c.begin_suppress_tokens),
            (vec![4, 5], vec![6])
        );
        assert!(c.renormalize_logits);
        assert_eq!(c.bad_words_ids, [vec![4], vec![5, 6]]);
        assert_eq!(c.sequence_bias, [(vec![7], 1.5), (vec![8, 9], -2.0)]);
        assert_eq!(c.exponential_decay_length_penalty, Some((5, 1.2)));
        assert_eq!(c.epsilon_cutoff, 0.01);
        assert_eq!(c.encoder_no_repeat_ngram_size, 3);
        assert_eq!(c.max_time, Some(2.5));
        let bad = Command::try_parse_from(["generate", "--exponential-decay-length-penalty", "5"]);
        assert!(bad.is_err());
    }

    #[derive(Parser)]
    struct Scored {
        #[command(flatten)]
        scores: ScoreArgs,
        #[arg(long)]
        json: bool,
    }

    #[test]
    fn the_score_flags_ask_for_log_probabilities_and_need_json() {
        let args =
            Scored::try_parse_from(["generate", "--json", "--logprobs", "--top-logprobs", "3"])
                .unwrap();
        let c = args.scores.apply(GenerationConfig::default());
        assert!(c.logprobs);
        assert_eq!(c.top_logprobs, 3);
        assert!(Scored::try_parse_from(["generate", "--logprobs"]).is_err());
        // Out of range, or without --logprobs: refused by the configuration's check, by name.
        let over =
            Scored::try_parse_from(["generate", "--json", "--logprobs", "--top-logprobs", "21"])
                .unwrap();
        let error = over
            .scores
            .apply(GenerationConfig::default())
            .validate(100, 64, 1);
        assert!(error.unwrap_err().to_string().contains("--top-logprobs"));
        let alone = Scored::try_parse_from(["generate", "--top-logprobs", "2"]).unwrap();
        let error = alone
            .scores
            .apply(GenerationConfig::default())
            .validate(100, 64, 1);
        assert!(error
            .unwrap_err()
            .to_string()
            .contains("needs logprobs (--logprobs)"));
    }
}
