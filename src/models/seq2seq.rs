//! Encoder–decoders (BART, T5) as a [`ShardedModel`]: a whole forward pass runs the encoder
//! over `input_ids` and the decoder over `decoder_input_ids`; a generation runs the encoder
//! once, on its first step, keeps every decoder layer's cross-attention keys and values of the
//! encoder output in per-rank caches, and then feeds the decoder one token per step from the
//! decoder start token on.

use candle_core::Tensor;

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::models::attention::{
    attend_cached, attend_scaled, cache_of, HeadLayout, KvCache, LayerCaches, Mask, Projected,
};
use crate::models::layers::{Linear, RowParallelLinear};
use crate::models::{weight_and_bias, Batch, ShardedModel};
use crate::parallel::engine::ShardLoader;

/// One attention block's projections (self- or cross-attention), this rank's heads.
pub struct AttentionBlock {
    q: Linear,
    k: Linear,
    v: Linear,
    out: RowParallelLinear,
}

impl AttentionBlock {
    /// Loads `prefix.{q,k,v,out}` (named by `names`), `[inner, hidden]` and `[hidden, inner]`.
    pub fn load(
        loader: &mut ShardLoader,
        prefix: &str,
        names: [&str; 4],
        (hidden, inner): (usize, usize),
        bias: bool,
    ) -> Result<Self> {
        let mut proj = |name: &str, out: usize, inp: usize| {
            weight_and_bias(loader, &format!("{prefix}.{name}"), out, inp, bias)
        };
        Ok(AttentionBlock {
            q: proj(names[0], inner, hidden)?.into(),
            k: proj(names[1], inner, hidden)?.into(),
            v: proj(names[2], inner, hidden)?.into(),
            out: proj(names[3], hidden, inner)?.into(),
        })
    }

    /// Self-attention of `x` `[B, L, H]`, extending `cache` when given.
    pub fn attend_self(
        &self,
        x: &Tensor,
        scores: &Scores,
        cache: Option<&mut KvCache>,
        mask: &Mask,
        comm: &dyn Communicator,
    ) -> Result<Tensor> {
        let projected = Projected {
            q: self.q.forward(x)?,
            k: self.k.forward(x)?,
            v: self.v.forward(x)?,
        };
        let attn = attend_scaled(projected, scores.layout, None, cache, mask, scores.scale)?;
        self.out.forward(&attn, comm)
    }

    /// The keys and values of the encoder output `encoded` `[B, S, H]` this block attends to.
    pub fn cross_cache(&self, encoded: &Tensor, layout: &HeadLayout) -> Result<KvCache> {
        cache_of(&self.k.forward(encoded)?, &self.v.forward(encoded)?, layout)
    }

    /// Cross-attention of `x` `[B, L, H]` over the encoder output's cached keys and values.
    pub fn attend_cross(
        &self,
        x: &Tensor,
        scores: &Scores,
        cache: &KvCache,
        mask: &Mask,
        comm: &dyn Communicator,
    ) -> Result<Tensor> {
        let attn = attend_cached(
            &self.q.forward(x)?,
            scores.layout,
            cache,
            mask,
            scores.scale,
        )?;
        self.out.forward(&attn, comm)
    }
}

/// How attention scores are formed: this rank's heads, and the factor on `q·k`.
#[derive(Debug, Clone, Copy)]
pub struct Scores {
    /// This rank's heads.
    pub layout: HeadLayout,
    /// `1/sqrt(D)` for BART, 1 for T5.
    pub scale: f64,
}

/// One run of the decoder.
pub struct DecoderInput<'a> {
    /// Decoder token ids `[batch, len]`.
    pub ids: &'a [u32],
    /// Sequences.
    pub batch: usize,
    /// New decoder positions per sequence.
    pub len: usize,
    /// Decoder positions cached before these.
    pub past: usize,
    /// The decoder's self-attention caches, extended (`None`: a whole forward pass).
    pub caches: Option<&'a mut LayerCaches>,
    /// Per decoder layer, the encoder output's keys and values.
    pub cross: &'a LayerCaches,
    /// Which encoder positions the decoder sees (not the encoder's padding).
    pub cross_mask: &'a Mask,
    /// Only the last position's logits.
    pub last_only: bool,
}

/// What BART and T5 each wire differently.
pub trait EncoderDecoder: Send {
    /// The encoder's output `[B, S, H]` for `input` (its ids, padding mask and positions).
    fn encode(&self, input: &Batch, comm: &dyn Communicator) -> Result<Tensor>;
    /// Per decoder layer, the cross-attention keys and values of `encoded`.
    fn cross_caches(&self, encoded: &Tensor) -> Result<LayerCaches>;
    /// The decoder's logits `[B, L, V]` (`L` = 1 with `last_only`).
    fn decode(&self, input: DecoderInput, comm: &dyn Communicator) -> Result<Tensor>;
    /// Decoder layers.
    fn decoder_layers(&self) -> usize;
    /// The token every generated sequence starts from.
    fn decoder_start(&self) -> u32;
    /// The decoder's input when a forward pass gives none: `input_ids` shifted right behind
    /// the start token (BART); `None` where transformers requires `decoder_input_ids` (T5).
    fn default_decoder_input(&self, input: &Batch) -> Option<Vec<u32>>;
}

/// `ids` rows of `len` shifted one to the right behind `start` (transformers'
/// `shift_tokens_right`).
pub fn shift_right(ids: &[u32], len: usize, start: u32) -> Vec<u32> {
    ids.chunks(len.max(1))
        .flat_map(|row| std::iter::once(start).chain(row[..row.len() - 1].iter().copied()))
        .collect()
}

/// What a generation keeps between decode steps.
#[derive(Default)]
struct Generation {
    /// The decoder's self-attention caches.
    caches: LayerCaches,
    /// Per decoder layer, the encoder output's keys and values.
    cross: LayerCaches,
    /// Which encoder positions the decoder sees (not the encoder's padding).
    cross_mask: Mask,
}

/// A rank's shard of an encoder–decoder.
pub struct Seq2Seq<M> {
    model: M,
    generation: Generation,
}

impl<M: EncoderDecoder> Seq2Seq<M> {
    /// Wraps a loaded model.
    pub fn new(model: M) -> Self {
        Seq2Seq {
            model,
            generation: Generation::default(),
        }
    }

    /// Encodes `input` and returns the cross-attention caches and the encoder padding mask.
    fn encode(&self, input: &Batch, comm: &dyn Communicator) -> Result<(LayerCaches, Mask)> {
        let encoded = self.model.encode(input, comm)?;
        Ok((
            self.model.cross_caches(&encoded)?,
            cross_mask(input.attention_mask, input.batch, input.seq_len)?,
        ))
    }

    /// A whole forward pass: the encoder over `input_ids`, the decoder over its input.
    fn forward_whole(&self, input: &Batch, comm: &dyn Communicator) -> Result<Tensor> {
        let decoder_ids = match input.decoder_ids {
            Some(ids) => ids.to_vec(),
            None => self.model.default_decoder_input(input).ok_or_else(|| {
                Error::InvalidInput(
                    "this encoder–decoder needs decoder_input_ids for a forward pass".into(),
                )
            })?,
        };
        if input.batch == 0 || decoder_ids.is_empty() || decoder_ids.len() % input.batch != 0 {
            return Err(Error::InvalidInput(format!(
                "decoder_input_ids holds {} ids, not a positive number of ids for each of the {} sequences",
                decoder_ids.len(),
                input.batch
            )));
        }
        let (cross, mask) = self.encode(input, comm)?;
        self.model.decode(
            DecoderInput {
                ids: &decoder_ids,
                batch: input.batch,
                len: decoder_ids.len() / input.batch,
                past: 0,
                caches: None,
                cross: &cross,
                cross_mask: &mask,
                last_only: input.last_only,
            },
            comm,
        )
    }
}

/// The decoder's view of the encoder's `len` positions: all but the padding.
fn cross_mask(attention_mask: Option<&[u32]>, batch: usize, len: usize) -> Result<Mask> {
    Mask::all_visible(batch, len, 0).with_padding(attention_mask)
}

impl<M: EncoderDecoder> ShardedModel for Seq2Seq<M> {
    fn forward(&mut self, input: &Batch, comm: &dyn Communicator) -> Result<Tensor> {
        if !input.use_cache {
            return self.forward_whole(input, comm);
        }
        // The first step of a generation runs the encoder (whose input is never empty, so
        // the cross-attention caches hold positions from then on) and feeds the start token.
        let starts;
        let (ids, len) = if !self.generation.cross.is_empty() {
            (input.ids, input.seq_len)
        } else {
            let (cross, cross_mask) = self.encode(input, comm)?;
            self.generation = Generation {
                caches: LayerCaches::new(self.model.decoder_layers()),
                cross,
                cross_mask,
            };
            starts = vec![self.model.decoder_start(); input.batch];
            (starts.as_slice(), 1)
        };
        let g = &mut self.generation;
        let past = g.caches.len();
        self.model.decode(
            DecoderInput {
                ids,
                batch: input.batch,
                len,
                past,
                caches: Some(&mut g.caches),
                cross: &g.cross,
                cross_mask: &g.cross_mask,
                last_only: input.last_only,
            },
            comm,
        )
    }

    /// `None`: the caches of an encoder–decoder are more than one [`LayerCaches`], so
    /// continuous batching (which moves cache rows) does not take it.
    fn caches(&mut self) -> Option<&mut LayerCaches> {
        None
    }

    fn clear_cache(&mut self) {
        self.generation = Generation::default();
    }

    fn reorder_cache(&mut self, rows: &[usize]) -> Result<()> {
        let g = &mut self.generation;
        let (len, encoder_len) = (g.caches.len(), g.cross.len());
        g.caches.select(rows, len)?;
        g.cross.select(rows, encoder_len)?;
        g.cross_mask = g.cross_mask.select_rows(rows)?;
        Ok(())
    }

    fn kv_cache_bytes(&mut self) -> usize {
        self.generation.caches.bytes() + self.generation.cross.bytes()
    }

    fn cached_len(&mut self) -> usize {
        self.generation.caches.len()
    }
}

/// The decoder's causal self-attention mask after `past` cached positions (decoder inputs are
/// never padded).
pub fn decoder_mask(input: &DecoderInput) -> Mask {
    Mask::all_visible(input.batch, input.past + input.len, input.past).causal()
}

/// A generation's cross-attention caches lack decoder layer `layer`.
pub fn missing_cross(layer: usize) -> Error {
    Error::InvalidInput(format!(
        "no cross-attention keys and values for decoder layer {layer}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifting_right_puts_the_start_token_first_in_every_row() {
        assert_eq!(shift_right(&[5, 6, 7, 8, 9, 10], 3, 2), [2, 5, 6, 2, 8, 9]);
    }
}
