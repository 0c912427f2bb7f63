//! Models assembled from tensor-parallel blocks: one file per family wires its blocks from the
//! parts in [`layers`] and [`attention`].

pub mod attention;
pub mod bart;
pub mod bert;
pub mod elementwise;
pub mod gpt2;
pub mod kernels;
pub mod layers;
pub mod llama;
#[cfg(target_arch = "x86_64")]
pub mod matmul;
pub mod moe;
pub mod norm;
pub mod packing;
pub mod phi;
pub mod quantized;
pub mod rope;
pub mod seq2seq;
pub mod t5;

use candle_core::Tensor;

use crate::checkpoint::{Family, ModelConfig};
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::models::layers::LinearWeight;
use crate::parallel::engine::ShardLoader;

/// One forward request as the model sees it.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// Token ids, `[batch, seq_len]` row-major.
    pub ids: &'a [u32],
    /// Number of sequences.
    pub batch: usize,
    /// New positions per sequence.
    pub seq_len: usize,
    /// `[batch, cached + seq_len]`, 1 = token, 0 = padding; `None` = all tokens.
    pub attention_mask: Option<&'a [u32]>,
    /// Extend and use the key/value cache (incremental decoding).
    pub use_cache: bool,
    /// Compute the head only for the last position of each sequence.
    pub last_only: bool,
    /// Position ids `[batch, seq_len]`; `None` = the cached length onwards, as transformers'
    /// forward does (generation passes positions that skip left padding).
    pub positions: Option<&'a [u32]>,
    /// An encoder–decoder's `decoder_input_ids` `[batch, decoder_len]` for a whole forward
    /// pass (`ids` are then the encoder's); ignored by the other models.
    pub decoder_ids: Option<&'a [u32]>,
}

impl Batch<'_> {
    /// Positions already cached before this batch, given the model's cache length.
    pub fn past_len(&self, cached: usize) -> usize {
        if self.use_cache {
            cached
        } else {
            0
        }
    }

    /// Position ids `[batch, seq_len]` after `past_len` cached positions.
    pub fn position_ids(&self, past_len: usize) -> Vec<u32> {
        match self.positions {
            Some(p) => p.to_vec(),
            None => (0..self.batch)
                .flat_map(|_| (past_len..past_len + self.seq_len).map(|p| p as u32))
                .collect(),
        }
    }

    /// Which keys each position of this batch sees after `past_len` cached positions: its
    /// padding hidden, and the future too when `causal`, and keys beyond `sliding_window`.
    pub fn mask(
        &self,
        past_len: usize,
        causal: bool,
        sliding_window: Option<usize>,
    ) -> Result<attention::Mask> {
        let mask = attention::Mask::all_visible(self.batch, past_len + self.seq_len, past_len)
            .with_padding(self.attention_mask)?
            .with_window(sliding_window);
        Ok(if causal { mask.causal() } else { mask })
    }
}

/// A rank's shard of a model.
pub trait ShardedModel: Send {
    /// Runs the shard; every rank returns the same `[batch, L, D]` f32 tensor, where `D` is the
    /// vocabulary (LM heads) or the hidden size (encoders) and `L` is 1 with `last_only`.
    fn forward(&mut self, input: &Batch, comm: &dyn Communicator) -> Result<Tensor>;
    /// The key/value caches, for models that decode incrementally.
    fn caches(&mut self) -> Option<&mut attention::LayerCaches>;
    /// Runs several batches that extend caches, in one pass where the model can (reading each
    /// weight once for all: a decode step beside chunks of joining prompts), one after the
    /// other otherwise. Batch `i` extends `caches[i]`, or the model's own caches where that is
    /// `None` (at most one). Returns each batch's output.
    fn forward_segments(
        &mut self,
        batches: &[Batch],
        caches: Vec<Option<&mut attention::LayerCaches>>,
        comm: &dyn Communicator,
    ) -> Result<Vec<Tensor>> {
        let mut outputs = Vec::with_capacity(batches.len());
        for (batch, cache) in batches.iter().zip(caches) {
            let Some(cache) = cache else {
                outputs.push(self.forward(batch, comm)?);
                continue;
            };
            let own = self
                .caches()
                .ok_or_else(|| Error::InvalidInput("this model keeps no key/value cache".into()))?;
            std::mem::swap(own, cache);
            let output = self.forward(batch, comm);
            if let Some(own) = self.caches() {
                std::mem::swap(own, cache);
            }
            outputs.push(output?);
        }
        Ok(outputs)
    }
    /// Forgets every cached key and value.
    fn clear_cache(&mut self) {
        if let Some(caches) = self.caches() {
            caches.clear();
        }
    }
    /// Rearranges the cached sequences: row `i` becomes the old row `rows[i]` (beam search
    /// keeps the beams that survive a step).
    fn reorder_cache(&mut self, rows: &[usize]) -> Result<()> {
        match self.caches() {
            Some(caches) => {
                let len = caches.len();
                caches.select(rows, len)
            }
            None => Ok(()),
        }
    }
    /// Bytes held by the key/value cache.
    fn kv_cache_bytes(&mut self) -> usize {
        self.caches().map_or(0, |c| c.bytes())
    }
    /// Positions currently cached.
    fn cached_len(&mut self) -> usize {
        self.caches().map_or(0, |c| c.len())
    }
}

/// Builds the rank's shard of the model `config` describes.
pub fn load(loader: &mut ShardLoader, config: &ModelConfig) -> Result<Box<dyn ShardedModel>> {
    Ok(match config.family {
        Family::Gpt2 => Box::new(gpt2::Gpt2::load(loader, config)?),
        Family::Llama => Box::new(llama::Llama::load(loader, config)?),
        Family::Phi => Box::new(phi::Phi::load(loader, config)?),
        Family::Bert => Box::new(bert::Bert::load(loader, config)?),
        Family::Bart => Box::new(seq2seq::Seq2Seq::new(bart::Bart::load(loader, config)?)),
        Family::T5 => Box::new(seq2seq::Seq2Seq::new(t5::T5::load(loader, config)?)),
    })
}

/// Refuses positions beyond a learned position table.
pub(crate) fn check_positions(end: usize, max_positions: usize) -> Result<()> {
    if end > max_positions {
        return Err(Error::InvalidInput(format!(
            "the sequence needs {end} positions but the model has only {max_positions} (max_position_embeddings)"
        )));
    }
    Ok(())
}

/// Keeps only the last position of each sequence: `[B, L, H]` -> `[B, 1, H]`.
pub(crate) fn last_position(hidden: &Tensor) -> Result<Tensor> {
    let len = hidden.dim(1)?;
    Ok(hidden.narrow(1, len - 1, 1)?)
}

/// Applies a vocabulary head to `[B, L, H]` (only to the last position with `last_only`),
/// returning `[B, L, V]`.
pub(crate) fn apply_head(
    head: &layers::VocabParallelHead,
    hidden: &Tensor,
    last_only: bool,
    comm: &dyn Communicator,
) -> Result<Tensor> {
    let mut logits = packing::apply_head_to_each(head, &[(hidden.clone(), last_only)], comm)?;
    logits
        .pop()
        .ok_or_else(|| Error::InvalidInput("the head returned no logits".into()))
}

/// Loads `name.weight` (stored `[out, in]`) and, when `bias`, `name.bias` (`[out]`).
pub(crate) fn weight_and_bias(
    loader: &mut ShardLoader,
    name: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> Result<(LinearWeight, Option<Tensor>)> {
    let weight = loader.load_linear(&format!("{name}.weight"), &[out, inp])?;
    let bias = if bias {
        Some(loader.load(&format!("{name}.bias"), &[out])?)
    } else {
        None
    };
    Ok((weight, bias))
}

/// Loads a LayerNorm's `prefix.weight` and `prefix.bias`, both `[hidden]`.
pub(crate) fn layer_norm(
    loader: &mut ShardLoader,
    prefix: &str,
    hidden: usize,
    eps: f64,
) -> Result<layers::LayerNorm> {
    Ok(layers::LayerNorm::new(
        loader.load(&format!("{prefix}.weight"), &[hidden])?,
        loader.load(&format!("{prefix}.bias"), &[hidden])?,
        eps,
    ))
}
