//! BART (`BartForConditionalGeneration`): an encoder and a decoder of post-LayerNorm blocks
//! over a shared token embedding, learned positions offset by 2, a LayerNorm on the embeddings,
//! and an LM head tied to the embedding plus `final_logits_bias`.

use candle_core::{Device, Tensor};

use crate::checkpoint::{Activation, ModelConfig};
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::models::attention::{HeadLayout, LayerCaches};
use crate::models::layers::{
    activate, to_f32, LayerNorm, Linear, RowParallelLinear, VocabParallelEmbedding,
    VocabParallelHead,
};
use crate::models::seq2seq::{
    decoder_mask, missing_cross, shift_right, AttentionBlock, DecoderInput, EncoderDecoder, Scores,
};
use crate::models::{apply_head, check_positions, layer_norm, weight_and_bias, Batch};
use crate::parallel::engine::ShardLoader;

/// transformers' `BartLearnedPositionalEmbedding` keeps two rows before position 0.
const POSITION_OFFSET: usize = 2;

const ATTENTION: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

/// The feed-forward block and its LayerNorm.
struct FeedForward {
    fc1: Linear,
    fc2: RowParallelLinear,
    norm: LayerNorm,
}

impl FeedForward {
    fn load(loader: &mut ShardLoader, p: &str, c: &ModelConfig) -> Result<Self> {
        let (h, inner) = (c.hidden_size, c.intermediate_size);
        Ok(FeedForward {
            fc1: weight_and_bias(loader, &format!("{p}.fc1"), inner, h, true)?.into(),
            fc2: weight_and_bias(loader, &format!("{p}.fc2"), h, inner, true)?.into(),
            norm: layer_norm(loader, &format!("{p}.final_layer_norm"), h, c.norm_eps)?,
        })
    }

    /// `norm(x + fc2(act(fc1(x))))`.
    fn forward(&self, x: &Tensor, act: Activation, comm: &dyn Communicator) -> Result<Tensor> {
        let hidden = activate(act, &self.fc1.forward(x)?)?;
        self.norm.forward(&(x + self.fc2.forward(&hidden, comm)?)?)
    }
}

/// The attention block `{p}.{name}` and the LayerNorm after it, `{p}.{name}_layer_norm`.
fn attention(
    loader: &mut ShardLoader,
    p: &str,
    name: &str,
    c: &ModelConfig,
) -> Result<(AttentionBlock, LayerNorm)> {
    let block = format!("{p}.{name}");
    let widths = (c.hidden_size, c.num_heads * c.head_dim);
    Ok((
        AttentionBlock::load(loader, &block, ATTENTION, widths, true)?,
        layer_norm(
            loader,
            &format!("{block}_layer_norm"),
            c.hidden_size,
            c.norm_eps,
        )?,
    ))
}

struct EncoderLayer {
    attn: AttentionBlock,
    attn_norm: LayerNorm,
    ff: FeedForward,
}

struct DecoderLayer {
    attn: AttentionBlock,
    attn_norm: LayerNorm,
    cross: AttentionBlock,
    cross_norm: LayerNorm,
    ff: FeedForward,
}

/// One stack's embeddings: learned positions and the LayerNorm after them.
struct Embeddings {
    positions: Tensor,
    norm: LayerNorm,
}

/// A rank's shard of `BartForConditionalGeneration`.
pub struct Bart {
    shared: VocabParallelEmbedding,
    embed_scale: f64,
    encoder_embeddings: Embeddings,
    decoder_embeddings: Embeddings,
    encoder: Vec<EncoderLayer>,
    decoder: Vec<DecoderLayer>,
    head: VocabParallelHead,
    scores: Scores,
    activation: Activation,
    max_positions: usize,
    decoder_start: u32,
}

impl Bart {
    /// Loads the rank's shard.
    pub fn load(loader: &mut ShardLoader, c: &ModelConfig) -> Result<Self> {
        let seq2seq = c.seq2seq.as_ref().ok_or_else(|| {
            Error::InvalidInput("a BART configuration without its decoder settings".into())
        })?;
        let (h, v, eps) = (c.hidden_size, c.vocab_size, c.norm_eps);
        let plan = loader.plan().clone();
        let rank = loader.rank();
        let shared = loader.load_linear("shared.weight", &[v, h])?;
        let mut embeddings = |stack: &str| -> Result<Embeddings> {
            Ok(Embeddings {
                positions: to_f32(loader.load(
                    &format!("{stack}.embed_positions.weight"),
                    &[c.max_positions + POSITION_OFFSET, h],
                )?)?,
                norm: layer_norm(loader, &format!("{stack}.layernorm_embedding"), h, eps)?,
            })
        };
        let (encoder_embeddings, decoder_embeddings) =
            (embeddings("encoder")?, embeddings("decoder")?);
        let encoder = (0..c.num_layers)
            .map(|i| {
                let p = format!("encoder.layers.{i}");
                let (attn, attn_norm) = attention(loader, &p, "self_attn", c)?;
                Ok(EncoderLayer {
                    attn,
                    attn_norm,
                    ff: FeedForward::load(loader, &p, c)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder = (0..seq2seq.decoder_layers)
            .map(|i| {
                let p = format!("decoder.layers.{i}");
                let (attn, attn_norm) = attention(loader, &p, "self_attn", c)?;
                let (cross, cross_norm) = attention(loader, &p, "encoder_attn", c)?;
                Ok(DecoderLayer {
                    attn,
                    attn_norm,
                    cross,
                    cross_norm,
                    ff: FeedForward::load(loader, &p, c)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head_weight = match loader.try_load_linear("lm_head.weight", &[v, h])? {
            Some(w) if c.tie_word_embeddings == Some(false) => w,
            _ => shared.clone(),
        };
        let vocab = plan.vocab.elements(rank);
        let bias = match loader.try_load("final_logits_bias", &[1, v])? {
            Some(b) => Some(b.narrow(1, vocab.start, vocab.len())?.flatten_all()?),
            None => None,
        };
        Ok(Bart {
            shared: VocabParallelEmbedding::new(shared, vocab.start),
            embed_scale: if seq2seq.scale_embedding {
                (h as f64).sqrt()
            } else {
                1.0
            },
            encoder_embeddings,
            decoder_embeddings,
            encoder,
            decoder,
            head: VocabParallelHead::new(head_weight, bias, plan.vocab.counts()),
            scores: Scores {
                layout: HeadLayout::of_rank(&plan, rank, c.head_dim),
                scale: 1.0 / (c.head_dim as f64).sqrt(),
            },
            activation: c.activation,
            max_positions: c.max_positions,
            decoder_start: seq2seq.decoder_start_token_id,
        })
    }

    /// `norm(scale * embed(ids) + positions)` `[batch, len, H]`.
    fn embed(
        &self,
        embeddings: &Embeddings,
        ids: &[u32],
        (batch, len): (usize, usize),
        positions: &[u32],
        comm: &dyn Communicator,
    ) -> Result<Tensor> {
        let end = positions.iter().max().map_or(0, |&p| p as usize + 1);
        check_positions(end, self.max_positions)?;
        let index: Vec<u32> = positions
            .iter()
            .map(|&p| p + POSITION_OFFSET as u32)
            .collect();
        let hidden = embeddings.positions.dim(1)?;
        let index = Tensor::from_vec(index, batch * len, &Device::Cpu)?;
        let tokens = (self.shared.forward(ids, &[batch, len], comm)? * self.embed_scale)?;
        let positions = embeddings
            .positions
            .index_select(&index, 0)?
            .reshape((batch, len, hidden))?
            .to_dtype(tokens.dtype())?;
        embeddings.norm.forward(&(tokens + positions)?)
    }
}

impl EncoderDecoder for Bart {
    fn encode(&self, input: &Batch, comm: &dyn Communicator) -> Result<Tensor> {
        let positions = input.position_ids(0);
        let shape = (input.batch, input.seq_len);
        let mut x = self.embed(&self.encoder_embeddings, input.ids, shape, &positions, comm)?;
        let mask = input.mask(0, false, None)?;
        for layer in &self.encoder {
            let attn = layer
                .attn
                .attend_self(&x, &self.scores, None, &mask, comm)?;
            x = layer.attn_norm.forward(&(x + attn)?)?;
            x = layer.ff.forward(&x, self.activation, comm)?;
        }
        Ok(x)
    }

    fn cross_caches(&self, encoded: &Tensor) -> Result<LayerCaches> {
        self.decoder
            .iter()
            .map(|layer| layer.cross.cross_cache(encoded, &self.scores.layout))
            .collect()
    }

    fn decode(&self, mut input: DecoderInput, comm: &dyn Communicator) -> Result<Tensor> {
        let positions: Vec<u32> = (0..input.batch)
            .flat_map(|_| (input.past..input.past + input.len).map(|p| p as u32))
            .collect();
        let shape = (input.batch, input.len);
        let mut x = self.embed(&self.decoder_embeddings, input.ids, shape, &positions, comm)?;
        let mask = decoder_mask(&input);
        for (i, layer) in self.decoder.iter().enumerate() {
            let cache = input.caches.as_deref_mut().map(|c| c.layer(i));
            let attn = layer
                .attn
                .attend_self(&x, &self.scores, cache, &mask, comm)?;
            x = layer.attn_norm.forward(&(x + attn)?)?;
            let cross = input.cross.get(i).ok_or_else(|| missing_cross(i))?;
            let attn = layer
                .cross
                .attend_cross(&x, &self.scores, cross, input.cross_mask, comm)?;
            x = layer.cross_norm.forward(&(x + attn)?)?;
            x = layer.ff.forward(&x, self.activation, comm)?;
        }
        apply_head(&self.head, &x, input.last_only, comm)
    }

    fn decoder_layers(&self) -> usize {
        self.decoder.len()
    }

    fn decoder_start(&self) -> u32 {
        self.decoder_start
    }

    fn default_decoder_input(&self, input: &Batch) -> Option<Vec<u32>> {
        Some(shift_right(input.ids, input.seq_len, self.decoder_start))
    }
}
