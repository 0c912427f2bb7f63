//! BERT: a bidirectional encoder with post-LayerNorm blocks; `BertModel` returns the last hidden
//! state, `BertForMaskedLM` adds the prediction head whose decoder is tied to the word embedding.

use candle_core::{Device, Tensor};

use crate::checkpoint::{Activation, ModelConfig, OutputKind};
use crate::comm::Communicator;
use crate::error::Result;
use crate::models::attention::{attend, HeadLayout, Projected};
use crate::models::layers::{
    activate, to_f32, LayerNorm, Linear, RowParallelLinear, VocabParallelEmbedding,
    VocabParallelHead,
};
use crate::models::{
    apply_head, check_positions, last_position, layer_norm, weight_and_bias, Batch, ShardedModel,
};
use crate::parallel::engine::ShardLoader;

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: RowParallelLinear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: RowParallelLinear,
    output_norm: LayerNorm,
}

/// The masked-LM prediction head.
struct MlmHead {
    transform: Linear,
    norm: LayerNorm,
    decoder: VocabParallelHead,
}

/// A rank's shard of `BertModel` or `BertForMaskedLM`.
pub struct Bert {
    word: VocabParallelEmbedding,
    position: Tensor,
    /// Token type 0's embedding (DistilBERT has none).
    token_type: Option<Tensor>,
    embed_norm: LayerNorm,
    /// Factorized embeddings' projection to the hidden width (ELECTRA, ALBERT), replicated.
    project: Option<Linear>,
    layers: Vec<Layer>,
    mlm: Option<MlmHead>,
    layout: HeadLayout,
    activation: Activation,
    max_positions: usize,
    /// RoBERTa's padding id for positions (see [`ModelConfig::padding_positions`]).
    padding_positions: Option<u32>,
}

impl Bert {
    /// Position ids `[batch, seq_len]`: `0..L` for BERT; for RoBERTa, as transformers'
    /// `create_position_ids_from_input_ids` numbers them (from the padding id + 1, skipping
    /// padding tokens, which take the padding id).
    fn position_ids(&self, input: &Batch) -> Vec<u32> {
        match self.padding_positions {
            Some(pad) => padding_aware_positions(input.ids, input.seq_len, pad),
            None => input.position_ids(0),
        }
    }

    /// Loads the rank's shard.
    pub fn load(loader: &mut ShardLoader, c: &ModelConfig) -> Result<Self> {
        let (h, inner, eps) = (c.hidden_size, c.intermediate_size, c.norm_eps);
        let e = c.embedding_size.unwrap_or(h);
        let plan = loader.plan().clone();
        let rank = loader.rank();
        let word = loader.load("embeddings.word_embeddings.weight", &[c.vocab_size, e])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("encoder.layer.{i}");
            let proj = |loader: &mut ShardLoader, name: &str, out: usize, inp: usize| {
                weight_and_bias(loader, &format!("{p}.{name}"), out, inp, true)
            };
            layers.push(Layer {
                query: proj(loader, "attention.self.query", h, h)?.into(),
                key: proj(loader, "attention.self.key", h, h)?.into(),
                value: proj(loader, "attention.self.value", h, h)?.into(),
                attn_out: proj(loader, "attention.output.dense", h, h)?.into(),
                attn_norm: layer_norm(loader, &format!("{p}.attention.output.LayerNorm"), h, eps)?,
                intermediate: proj(loader, "intermediate.dense", inner, h)?.into(),
                output: proj(loader, "output.dense", h, inner)?.into(),
                output_norm: layer_norm(loader, &format!("{p}.output.LayerNorm"), h, eps)?,
            });
        }
        let mlm = if c.output == OutputKind::Logits {
            let transform = weight_and_bias(loader, "cls.predictions.transform.dense", h, h, true)?;
            let decoder =
                match loader.try_load("cls.predictions.decoder.weight", &[c.vocab_size, h])? {
                    Some(w) if c.tie_word_embeddings == Some(false) => w,
                    _ => word.clone(),
                };
            let bias = match loader.try_load("cls.predictions.bias", &[c.vocab_size])? {
                Some(b) => Some(b),
                None => loader.try_load("cls.predictions.decoder.bias", &[c.vocab_size])?,
            };
            Some(MlmHead {
                transform: transform.into(),
                norm: layer_norm(loader, "cls.predictions.transform.LayerNorm", h, eps)?,
                decoder: VocabParallelHead::new(decoder, bias, plan.vocab.counts()),
            })
        } else {
            None
        };
        Ok(Bert {
            word: VocabParallelEmbedding::new(word, plan.vocab.elements(rank).start),
            position: to_f32(loader.load(
                "embeddings.position_embeddings.weight",
                &[c.max_positions, e],
            )?)?,
            token_type: loader
                .try_load(
                    "embeddings.token_type_embeddings.weight",
                    &[c.type_vocab_size, e],
                )?
                .map(|table| to_f32(table.narrow(0, 0, 1)?))
                .transpose()?,
            embed_norm: layer_norm(loader, "embeddings.LayerNorm", e, eps)?,
            project: match c.embedding_size {
                Some(_) => Some(weight_and_bias(loader, "embeddings_project", h, e, true)?.into()),
                None => None,
            },
            layers,
            mlm,
            layout: HeadLayout::of_rank(&plan, rank, c.head_dim),
            activation: c.activation,
            max_positions: c.max_positions,
            padding_positions: c.padding_positions,
        })
    }
}

impl ShardedModel for Bert {
    fn forward(&mut self, input: &Batch, comm: &dyn Communicator) -> Result<Tensor> {
        let positions = self.position_ids(input);
        let end = positions.iter().max().map_or(0, |&p| p as usize + 1);
        check_positions(end, self.max_positions)?;
        let hidden = self.position.dim(1)?;
        let positions = Tensor::from_vec(positions, input.batch * input.seq_len, &Device::Cpu)?;
        let x = (self
            .word
            .forward(input.ids, &[input.batch, input.seq_len], comm)?
            + self.position.index_select(&positions, 0)?.reshape((
                input.batch,
                input.seq_len,
                hidden,
            ))?)?;
        let x = match &self.token_type {
            Some(token_type) => x.broadcast_add(token_type)?,
            None => x,
        };
        let mut x = self.embed_norm.forward(&x)?;
        if let Some(project) = &self.project {
            x = project.forward(&x)?;
        }
        let mask = input.mask(0, false, None)?;
        for layer in &self.layers {
            let projected = Projected {
                q: layer.query.forward(&x)?,
                k: layer.key.forward(&x)?,
                v: layer.value.forward(&x)?,
            };
            let attn = attend(projected, self.layout, None, None, &mask)?;
            x = layer
                .attn_norm
                .forward(&(layer.attn_out.forward(&attn, comm)? + &x)?)?;
            let hidden = activate(self.activation, &layer.intermediate.forward(&x)?)?;
            x = layer
                .output_norm
                .forward(&(layer.output.forward(&hidden, comm)? + &x)?)?;
        }
        if input.last_only {
            x = last_position(&x)?;
        }
        match &self.mlm {
            Some(head) => {
                let t = head
                    .norm
                    .forward(&activate(self.activation, &head.transform.forward(&x)?)?)?;
                apply_head(&head.decoder, &t, false, comm)
            }
            None => Ok(x.to_dtype(candle_core::DType::F32)?),
        }
    }

    fn caches(&mut self) -> Option<&mut crate::models::attention::LayerCaches> {
        None
    }
}

/// RoBERTa's positions of `ids` (rows of `seq_len`): the padding id `pad` for padding tokens,
/// `pad + n` for the n-th other token of the row.
fn padding_aware_positions(ids: &[u32], seq_len: usize, pad: u32) -> Vec<u32> {
    ids.chunks(seq_len.max(1))
        .flat_map(|row| {
            let mut real = 0;
            row.iter().map(move |&id| match id == pad {
                true => pad,
                false => {
                    real += 1;
                    pad + real
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roberta_positions_skip_padding_tokens_wherever_they_are() {
        assert_eq!(
            padding_aware_positions(&[5, 1, 7, 9, 1, 1], 3, 1),
            [2, 1, 3, 2, 1, 1]
        );
    }
}
