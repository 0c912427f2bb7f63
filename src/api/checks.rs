//! The checks a request passes before it reaches the ranks. They need only the resolved model,
//! so a caller can refuse a bad request before starting any rank (the command line checks every
//! argument so, before it calls [`parallelize`](super::parallelize)); [`ParallelModel`]
//! runs the same checks on every request.
//!
//! [`ParallelModel`]: super::ParallelModel

use crate::checkpoint::source::ResolvedModel;
use crate::error::{Error, Result};
use crate::generation::GenerationConfig;
use crate::parallel::ipc::ForwardInput;

/// Refuses a generation request `model` cannot run: an encoder, no prompt or an empty one, an
/// id outside the vocabulary, or options out of range or contradictory (see
/// [`GenerationConfig::validate`]). Starts nothing.
pub fn check_generation(
    model: &ResolvedModel,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
) -> Result<()> {
    RequestRules::new(model, None)
        .check_batch(prompts, config)
        .map(drop)
}

/// Refuses a forward pass `model` cannot run: an empty batch, a shape that does not match the
/// ids, an attention mask that is not 0s and 1s, or an id outside the vocabulary. Starts nothing.
pub fn check_forward(model: &ResolvedModel, input: &ForwardInput) -> Result<()> {
    if input.batch == 0
        || input.seq_len == 0
        || input.input_ids.len() != input.batch * input.seq_len
    {
        return Err(Error::InvalidInput(format!(
            "input_ids holds {} ids, which is not a non-empty batch {} × length {}",
            input.input_ids.len(),
            input.batch,
            input.seq_len
        )));
    }
    if let Some(mask) = &input.attention_mask {
        if mask.len() != input.input_ids.len() {
            return Err(Error::InvalidInput(format!(
                "attention_mask holds {} values but input_ids holds {}",
                mask.len(),
                input.input_ids.len()
            )));
        }
        if let Some(v) = mask.iter().find(|&&v| v > 1) {
            return Err(Error::InvalidInput(format!(
                "attention_mask value {v} is not 0 or 1"
            )));
        }
    }
    RequestRules::new(model, None).check_ids(&input.input_ids)
}

/// What generation requests are checked against, and where their defaults come from.
#[derive(Debug, Clone)]
pub(super) struct RequestRules {
    vocab_size: usize,
    max_positions: usize,
    /// The model's end-of-sequence ids.
    eos_token_ids: Vec<u32>,
    /// The seed of [`Options::seed`](crate::Options::seed).
    seed: Option<u64>,
    /// The architecture's name when it is an encoder, which cannot generate.
    encoder: Option<String>,
}

impl RequestRules {
    /// The rules of `model`, with the model-wide `seed`.
    pub(super) fn new(model: &ResolvedModel, seed: Option<u64>) -> Self {
        RequestRules {
            vocab_size: model.config.vocab_size,
            max_positions: model.config.generation_context(),
            eos_token_ids: model.eos_token_ids.clone(),
            seed,
            encoder: (!model.config.is_causal()).then(|| model.config.architecture.clone()),
        }
    }

    /// Refuses to generate with an encoder.
    pub(super) fn check_generates(&self) -> Result<()> {
        match &self.encoder {
            None => Ok(()),
            Some(architecture) => Err(Error::InvalidInput(format!(
                "{architecture} is an encoder and cannot generate text"
            ))),
        }
    }

    /// Refuses ids outside the vocabulary.
    pub(super) fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(id) => Err(Error::InvalidInput(format!(
                "token id {id} is outside the vocabulary of {} tokens",
                self.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// Checks a batch of `prompts` generated with `config`; returns the end-of-sequence ids and
    /// the seed of [`RequestRules::options`].
    pub(super) fn check_batch(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
    ) -> Result<(Vec<u32>, u64)> {
        self.check_generates()?;
        if prompts.is_empty() {
            return Err(Error::InvalidInput("no prompt to generate for".into()));
        }
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            return Err(Error::InvalidInput(format!("prompt {i} is empty")));
        }
        prompts.iter().try_for_each(|p| self.check_ids(p))?;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        self.options(config, longest)
    }

    /// Validates `config` for prompts of up to `longest` tokens; returns its end-of-sequence
    /// ids and its seed (the request's, else the model's, else a fresh one).
    pub(super) fn options(
        &self,
        config: &GenerationConfig,
        longest: usize,
    ) -> Result<(Vec<u32>, u64)> {
        config.validate(self.vocab_size, self.max_positions, longest)?;
        let eos = config
            .eos_token_id
            .clone()
            .unwrap_or_else(|| self.eos_token_ids.clone());
        if let Some(constraint) = config.constraint.as_ref().filter(|_| eos.is_empty()) {
            return Err(Error::InvalidInput(format!(
                "a {} constraint ends the sequence with an end-of-sequence id once its text is complete, and neither the request nor the model has one (eos_token_id)",
                constraint.name()
            )));
        }
        Ok((eos, config.seed.or(self.seed).unwrap_or_else(rand::random)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::source::ModelSource;

    /// Fixture `name`, resolved (no rank starts).
    fn fixture(name: &str) -> ResolvedModel {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        ResolvedModel::resolve(&ModelSource::Path(dir)).unwrap()
    }

    fn refusal(model: &ResolvedModel, prompts: &[Vec<u32>], config: GenerationConfig) -> String {
        check_generation(model, prompts, &config)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn generation_requests_are_refused_without_any_rank() {
        // The llama fixture: 103 tokens, 128 positions.
        let llama = fixture("llama");
        let d = GenerationConfig::default;
        assert!(check_generation(&llama, &[vec![1, 2]], &d()).is_ok());
        assert!(refusal(&llama, &[], d()).contains("no prompt to generate for"));
        assert!(refusal(&llama, &[vec![1], vec![]], d()).contains("prompt 1 is empty"));
        assert!(refusal(&llama, &[vec![5, 103]], d())
            .contains("token id 103 is outside the vocabulary of 103 tokens"));
        let top_p = GenerationConfig { top_p: 2.0, ..d() };
        assert!(refusal(&llama, &[vec![1]], top_p).contains("top_p must be in (0, 1], got 2"));
        let long = GenerationConfig {
            max_new_tokens: 127,
            ..d()
        };
        assert!(refusal(&llama, &[vec![1, 2]], long)
            .contains("a prompt of 2 tokens plus max_new_tokens 127 exceeds the model's context of 128 positions"));
        assert!(refusal(&fixture("bert"), &[vec![1]], d())
            .contains("is an encoder and cannot generate text"));
    }

    #[test]
    fn forward_inputs_are_refused_without_any_rank() {
        let llama = fixture("llama");
        let input = |ids: Vec<u32>, batch, seq_len, mask| ForwardInput {
            input_ids: ids,
            batch,
            seq_len,
            attention_mask: mask,
            decoder_input_ids: None,
        };
        let refusal = |input: ForwardInput| check_forward(&llama, &input).unwrap_err().to_string();
        assert!(check_forward(&llama, &input(vec![1, 2], 1, 2, Some(vec![1, 1]))).is_ok());
        assert!(refusal(input(vec![1, 2], 1, 3, None))
            .contains("input_ids holds 2 ids, which is not a non-empty batch 1 × length 3"));
        assert!(refusal(input(vec![1, 2], 1, 2, Some(vec![1])))
            .contains("attention_mask holds 1 values but input_ids holds 2"));
        assert!(refusal(input(vec![1, 2], 1, 2, Some(vec![1, 2])))
            .contains("attention_mask value 2 is not 0 or 1"));
        assert!(refusal(input(vec![1, 103], 1, 2, None))
            .contains("token id 103 is outside the vocabulary"));
    }
}
