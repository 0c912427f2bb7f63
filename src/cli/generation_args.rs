//! The generation options as command-line flags, with transformers' names; each flag that is
//! given overrides the model's `generation_config.json` defaults. (The sampler's seed is the
//! model-wide `--seed`.)

use clap::Args;
use parallelformers::{EarlyStopping, GenerationConfig};

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
    /// Penalty on tokens already in the sequence (1 = off).
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Never repeat an n-gram of this size (0 = off).
    #[arg(long)]
    no_repeat_ngram_size: Option<usize>,
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
    /// Stop a sequence once its text contains this string (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
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
            repetition_penalty,
            no_repeat_ngram_size,
            num_beams,
            length_penalty,
            early_stopping,
            num_return_sequences
        );
        if self.eos_token_id.is_some() {
            c.eos_token_id = self.eos_token_id.clone();
        }
        if !self.stop.is_empty() {
            c.stop = self.stop.clone();
        }
        c
    }
}
