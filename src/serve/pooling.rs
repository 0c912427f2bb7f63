//! Sentence embeddings from an encoder's last hidden states, pooled as sentence-transformers
//! does: the pooling mode of the checkpoint's `modules.json` / `1_Pooling/config.json` (mean,
//! CLS token or max over the real tokens), then L2 normalisation when a `Normalize` module is
//! listed. Without that configuration: mean pooling, normalised.

use std::path::Path;

use serde::Deserialize;

use crate::api::ParallelModel;
use crate::error::{Error, Result};
use crate::parallel::ipc::ForwardInput;

/// How token states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The mean over the real tokens.
    Mean,
    /// The first token's state.
    Cls,
    /// The per-dimension maximum over the real tokens.
    Max,
}

/// A checkpoint's pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    /// How token states are combined.
    pub mode: Mode,
    /// Whether the result is scaled to unit length.
    pub normalize: bool,
}

#[derive(Deserialize)]
struct Module {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
}

impl Pooling {
    /// The pooling `dir`'s sentence-transformers files describe (mean and normalised without
    /// them).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let default = Pooling {
            mode: Mode::Mean,
            normalize: true,
        };
        let Ok(text) = std::fs::read_to_string(dir.join("modules.json")) else {
            return Ok(default);
        };
        let bad = |file: &Path, e: String| Error::InvalidInput(format!("{}: {e}", file.display()));
        let modules: Vec<Module> = serde_json::from_str(&text)
            .map_err(|e| bad(&dir.join("modules.json"), e.to_string()))?;
        let normalize = modules.iter().any(|m| m.kind.ends_with(".Normalize"));
        let Some(pooling) = modules.iter().find(|m| m.kind.ends_with(".Pooling")) else {
            return Ok(Pooling {
                normalize,
                ..default
            });
        };
        let file = dir.join(&pooling.path).join("config.json");
        let text = std::fs::read_to_string(&file).map_err(|e| bad(&file, e.to_string()))?;
        let config: PoolingConfig =
            serde_json::from_str(&text).map_err(|e| bad(&file, e.to_string()))?;
        let mode = match (
            config.pooling_mode_mean_tokens,
            config.pooling_mode_cls_token,
            config.pooling_mode_max_tokens,
        ) {
            (true, false, false) => Mode::Mean,
            (false, true, false) => Mode::Cls,
            (false, false, true) => Mode::Max,
            _ => {
                return Err(bad(
                    &file,
                    "exactly one of pooling_mode_mean_tokens, pooling_mode_cls_token and pooling_mode_max_tokens must be set".into(),
                ))
            }
        };
        Ok(Pooling { mode, normalize })
    }

    /// One vector from the states `[len, hidden]` of a sequence whose first `real` tokens are
    /// real (the rest padding).
    pub fn pool(&self, states: &[f32], hidden: usize, real: usize) -> Vec<f32> {
        let tokens = states.chunks_exact(hidden).take(real.max(1));
        let mut v = match self.mode {
            Mode::Cls => states[..hidden].to_vec(),
            Mode::Mean => {
                let mut sum = vec![0f32; hidden];
                for token in tokens {
                    sum.iter_mut().zip(token).for_each(|(s, x)| *s += x);
                }
                sum.iter().map(|s| s / real.max(1) as f32).collect()
            }
            Mode::Max => tokens.fold(vec![f32::NEG_INFINITY; hidden], |mut max, token| {
                max.iter_mut().zip(token).for_each(|(m, x)| *m = m.max(*x));
                max
            }),
        };
        if self.normalize {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }
}

/// Runs the encoder of `model` over the token ids of several texts (one batch, padded on the
/// right) and pools each row with `pooling`: one vector per text.
pub fn embed(
    model: &mut ParallelModel,
    inputs: &[Vec<u32>],
    pooling: &Pooling,
) -> Result<Vec<Vec<f32>>> {
    let width = inputs.iter().map(Vec::len).max().unwrap_or(0);
    let input = ForwardInput {
        input_ids: inputs
            .iter()
            .flat_map(|ids| {
                ids.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, width - ids.len()))
            })
            .collect(),
        batch: inputs.len(),
        seq_len: width,
        attention_mask: Some(
            inputs
                .iter()
                .flat_map(|ids| (0..width).map(|i| u32::from(i < ids.len())))
                .collect(),
        ),
        decoder_input_ids: None,
    };
    let states = model.forward(&input)?;
    let hidden = states.shape.last().copied().unwrap_or(0);
    Ok(inputs
        .iter()
        .zip(states.data.chunks_exact(width * hidden.max(1)))
        .map(|(ids, states)| pooling.pool(states, hidden, ids.len()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_pool_the_real_tokens_only() {
        let states = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        let mean = Pooling {
            mode: Mode::Mean,
            normalize: false,
        };
        assert_eq!(mean.pool(&states, 2, 2), [2.0, 3.0]);
        let max = Pooling {
            mode: Mode::Max,
            normalize: false,
        };
        assert_eq!(max.pool(&states, 2, 2), [3.0, 4.0]);
        let cls = Pooling {
            mode: Mode::Cls,
            normalize: true,
        };
        let v = cls.pool(&states, 2, 2);
        assert!((v[0] - 1.0 / 5f32.sqrt()).abs() < 1e-6 && (v[1] - 2.0 / 5f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn the_fixture_configuration_is_mean_then_normalize() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/embedding");
        assert_eq!(
            Pooling::from_model_dir(&dir).unwrap(),
            Pooling {
                mode: Mode::Mean,
                normalize: true
            }
        );
    }
}
