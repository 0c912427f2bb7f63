//! T5 (`T5ForConditionalGeneration`): an encoder and a decoder of pre-RMSNorm blocks over a
//! shared token embedding, unscaled attention scores with a learned bias per relative-position
//! bucket (computed by each stack's first block, shared by the others), a ReLU or gated
//! feed-forward, and an LM head that, when tied to the embedding, reads the hidden state times
//! `d_model^-0.5`.

use candle_core::Tensor;

use crate::checkpoint::config::RelativeBuckets;
use crate::checkpoint::{Activation, ModelConfig};
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::models::attention::{HeadLayout, LayerCaches, Mask};
use crate::models::layers::{
    activate, gated, to_f32, Linear, RmsNorm, RowParallelLinear, VocabParallelEmbedding,
    VocabParallelHead,
};
use crate::models::seq2seq::{
    decoder_mask, missing_cross, AttentionBlock, DecoderInput, EncoderDecoder, Scores,
};
use crate::models::{apply_head, weight_and_bias, Batch};
use crate::parallel::engine::ShardLoader;

const ATTENTION: [&str; 4] = ["q", "k", "v", "o"];

/// `DenseReluDense`: `wo(act(wi x))`, or gated, `wo(act(wi_0 x) * wi_1 x)`.
struct FeedForward {
    norm: RmsNorm,
    wi: Vec<Linear>,
    wo: RowParallelLinear,
}

impl FeedForward {
    fn load(loader: &mut ShardLoader, p: &str, c: &ModelConfig, gate: bool) -> Result<Self> {
        let (h, inner) = (c.hidden_size, c.intermediate_size);
        let names: &[&str] = if gate { &["wi_0", "wi_1"] } else { &["wi"] };
        let wi = names
            .iter()
            .map(|n| {
                let name = format!("{p}.DenseReluDense.{n}");
                Ok(weight_and_bias(loader, &name, inner, h, false)?.into())
            })
            .collect::<Result<Vec<Linear>>>()?;
        Ok(FeedForward {
            norm: rms_norm(loader, &format!("{p}.layer_norm"), c)?,
            wi,
            wo: weight_and_bias(loader, &format!("{p}.DenseReluDense.wo"), h, inner, false)?.into(),
        })
    }

    /// `x + wo(...)` of the normed `x`.
    fn forward(&self, x: &Tensor, act: Activation, comm: &dyn Communicator) -> Result<Tensor> {
        let normed = self.norm.forward(x)?;
        let hidden = match self.wi.as_slice() {
            [gate, up] => gated(act, &gate.forward(&normed)?, &up.forward(&normed)?)?,
            [wi] => activate(act, &wi.forward(&normed)?)?,
            _ => {
                return Err(Error::InvalidInput(
                    "a T5 feed-forward block without wi".into(),
                ))
            }
        };
        Ok((x + self.wo.forward(&hidden, comm)?)?)
    }
}

/// An attention sub-layer: RMS norm, then attention, added to the residual.
struct AttentionLayer {
    norm: RmsNorm,
    attn: AttentionBlock,
}

impl AttentionLayer {
    fn load(loader: &mut ShardLoader, p: &str, name: &str, c: &ModelConfig) -> Result<Self> {
        let widths = (c.hidden_size, c.num_heads * c.head_dim);
        Ok(AttentionLayer {
            norm: rms_norm(loader, &format!("{p}.layer_norm"), c)?,
            attn: AttentionBlock::load(loader, &format!("{p}.{name}"), ATTENTION, widths, false)?,
        })
    }
}

fn rms_norm(loader: &mut ShardLoader, prefix: &str, c: &ModelConfig) -> Result<RmsNorm> {
    Ok(RmsNorm::new(
        loader.load(&format!("{prefix}.weight"), &[c.hidden_size])?,
        c.norm_eps,
    ))
}

struct EncoderBlock {
    attn: AttentionLayer,
    ff: FeedForward,
}

struct DecoderBlock {
    attn: AttentionLayer,
    cross: AttentionLayer,
    ff: FeedForward,
}

/// One stack's learned bias per relative-position bucket, for this rank's heads.
struct PositionBias {
    /// `[heads, buckets]` (this rank's heads).
    table: Vec<Vec<f32>>,
    buckets: RelativeBuckets,
    /// Encoder: keys before and after the query have buckets of their own.
    bidirectional: bool,
}

impl PositionBias {
    fn load(
        loader: &mut ShardLoader,
        stack: &str,
        c: &ModelConfig,
        buckets: RelativeBuckets,
        layout: &HeadLayout,
    ) -> Result<Self> {
        let name = format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight");
        let table = to_f32(loader.load(&name, &[buckets.num_buckets, c.num_heads])?)?;
        let table = table
            .narrow(1, layout.first_head, layout.heads)?
            .t()?
            .contiguous()?
            .to_vec2::<f32>()?;
        Ok(PositionBias {
            table,
            buckets,
            bidirectional: stack == "encoder",
        })
    }

    /// `mask` (of `len` queries) with this stack's bias of each key's offset from the query.
    fn scores(&self, mask: Mask, len: usize) -> Mask {
        mask.with_relative_bias(self.table.len(), len, |head, offset| {
            self.table[head][self.bucket(offset)]
        })
    }

    /// transformers' `_relative_position_bucket` of `relative` = key - query: exact buckets
    /// for short distances, logarithmic ones up to `max_distance` (computed in f32, as torch
    /// does), the last bucket beyond.
    fn bucket(&self, relative: i64) -> usize {
        let RelativeBuckets {
            mut num_buckets,
            max_distance,
        } = self.buckets;
        let mut bucket = 0;
        let distance = if self.bidirectional {
            num_buckets /= 2;
            if relative > 0 {
                bucket += num_buckets;
            }
            relative.unsigned_abs() as usize
        } else {
            (-relative.min(0)) as usize
        };
        let max_exact = num_buckets / 2;
        if distance < max_exact {
            return bucket + distance;
        }
        let log_ratio = (distance as f32 / max_exact as f32).ln()
            / (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact + (log_ratio * (num_buckets - max_exact) as f32) as usize;
        bucket + large.min(num_buckets - 1)
    }
}

/// A rank's shard of `T5ForConditionalGeneration`.
pub struct T5 {
    shared: VocabParallelEmbedding,
    encoder: Vec<EncoderBlock>,
    encoder_bias: PositionBias,
    encoder_norm: RmsNorm,
    decoder: Vec<DecoderBlock>,
    decoder_bias: PositionBias,
    decoder_norm: RmsNorm,
    head: VocabParallelHead,
    /// `d_model^-0.5` for the original T5, else 1 (T5 v1.1).
    head_scale: f64,
    scores: Scores,
    activation: Activation,
    decoder_start: u32,
}

impl T5 {
    /// Loads the rank's shard.
    pub fn load(loader: &mut ShardLoader, c: &ModelConfig) -> Result<Self> {
        let seq2seq = c.seq2seq.as_ref();
        let (Some(seq2seq), Some(buckets)) = (seq2seq, seq2seq.and_then(|s| s.relative_buckets))
        else {
            return Err(Error::InvalidInput(
                "a T5 configuration without its decoder and relative position settings".into(),
            ));
        };
        let (h, v) = (c.hidden_size, c.vocab_size);
        let plan = loader.plan().clone();
        let rank = loader.rank();
        let layout = HeadLayout::of_rank(&plan, rank, c.head_dim);
        let shared = loader.load_linear("shared.weight", &[v, h])?;
        let gate = seq2seq.gated;
        let encoder = (0..c.num_layers)
            .map(|i| {
                let p = format!("encoder.block.{i}.layer");
                Ok(EncoderBlock {
                    attn: AttentionLayer::load(loader, &format!("{p}.0"), "SelfAttention", c)?,
                    ff: FeedForward::load(loader, &format!("{p}.1"), c, gate)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder = (0..seq2seq.decoder_layers)
            .map(|i| {
                let p = format!("decoder.block.{i}.layer");
                Ok(DecoderBlock {
                    attn: AttentionLayer::load(loader, &format!("{p}.0"), "SelfAttention", c)?,
                    cross: AttentionLayer::load(loader, &format!("{p}.1"), "EncDecAttention", c)?,
                    ff: FeedForward::load(loader, &format!("{p}.2"), c, gate)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // A checkpoint holds `lm_head.weight` only when it is not the embedding (T5 v1.1).
        let head_weight = match loader.try_load_linear("lm_head.weight", &[v, h])? {
            Some(w) => w,
            None => shared.clone(),
        };
        Ok(T5 {
            shared: VocabParallelEmbedding::new(shared, plan.vocab.elements(rank).start),
            encoder,
            encoder_bias: PositionBias::load(loader, "encoder", c, buckets, &layout)?,
            encoder_norm: rms_norm(loader, "encoder.final_layer_norm", c)?,
            decoder,
            decoder_bias: PositionBias::load(loader, "decoder", c, buckets, &layout)?,
            decoder_norm: rms_norm(loader, "decoder.final_layer_norm", c)?,
            head: VocabParallelHead::new(head_weight, None, plan.vocab.counts()),
            head_scale: match seq2seq.scale_decoder_outputs {
                true => (h as f64).powf(-0.5),
                false => 1.0,
            },
            scores: Scores { layout, scale: 1.0 },
            activation: c.activation,
            decoder_start: seq2seq.decoder_start_token_id,
        })
    }
}

impl EncoderDecoder for T5 {
    fn encode(&self, input: &Batch, comm: &dyn Communicator) -> Result<Tensor> {
        let mut x = self
            .shared
            .forward(input.ids, &[input.batch, input.seq_len], comm)?;
        let mask = input.mask(0, false, None)?;
        let scores = self.encoder_bias.scores(mask, input.seq_len);
        for block in &self.encoder {
            let normed = block.attn.norm.forward(&x)?;
            let attn = block
                .attn
                .attn
                .attend_self(&normed, &self.scores, None, &scores, comm)?;
            x = (x + attn)?;
            x = block.ff.forward(&x, self.activation, comm)?;
        }
        self.encoder_norm.forward(&x)
    }

    fn cross_caches(&self, encoded: &Tensor) -> Result<LayerCaches> {
        self.decoder
            .iter()
            .map(|block| block.cross.attn.cross_cache(encoded, &self.scores.layout))
            .collect()
    }

    fn decode(&self, mut input: DecoderInput, comm: &dyn Communicator) -> Result<Tensor> {
        let mut x = self
            .shared
            .forward(input.ids, &[input.batch, input.len], comm)?;
        let scores = self.decoder_bias.scores(decoder_mask(&input), input.len);
        for (i, block) in self.decoder.iter().enumerate() {
            let cache = input.caches.as_deref_mut().map(|c| c.layer(i));
            let normed = block.attn.norm.forward(&x)?;
            let attn = block
                .attn
                .attn
                .attend_self(&normed, &self.scores, cache, &scores, comm)?;
            x = (x + attn)?;
            let cross = input.cross.get(i).ok_or_else(|| missing_cross(i))?;
            let normed = block.cross.norm.forward(&x)?;
            let attn = block.cross.attn.attend_cross(
                &normed,
                &self.scores,
                cross,
                input.cross_mask,
                comm,
            )?;
            x = (x + attn)?;
            x = block.ff.forward(&x, self.activation, comm)?;
        }
        let x = (self.decoder_norm.forward(&x)? * self.head_scale)?;
        apply_head(&self.head, &x, input.last_only, comm)
    }

    fn decoder_layers(&self) -> usize {
        self.decoder.len()
    }

    fn decoder_start(&self) -> u32 {
        self.decoder_start
    }

    fn default_decoder_input(&self, _input: &Batch) -> Option<Vec<u32>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bias(bidirectional: bool) -> PositionBias {
        PositionBias {
            table: vec![],
            buckets: RelativeBuckets {
                num_buckets: 32,
                max_distance: 128,
            },
            bidirectional,
        }
    }

    #[test]
    fn relative_buckets_follow_transformers() {
        // Values of transformers' T5Attention._relative_position_bucket (32 buckets, 128).
        let encoder = bias(true);
        let cases = [
            (0, 0),
            (1, 17),
            (-1, 1),
            (7, 23),
            (-8, 8),
            (-20, 10),
            (50, 29),
            (-127, 15),
            (500, 31),
        ];
        for (relative, bucket) in cases {
            assert_eq!(encoder.bucket(relative), bucket, "encoder, {relative}");
        }
        let decoder = bias(false);
        let cases = [
            (0, 0),
            (3, 0),
            (-1, 1),
            (-15, 15),
            (-16, 16),
            (-40, 23),
            (-1000, 31),
        ];
        for (relative, bucket) in cases {
            assert_eq!(decoder.bucket(relative), bucket, "decoder, {relative}");
        }
    }
}
