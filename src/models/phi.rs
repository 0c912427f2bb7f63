//! Phi, GPT-J, GPT-NeoX and BLOOM: each block runs attention and the MLP in parallel and adds
//! both to the residual stream (Phi and GPT-J on one LayerNorm, GPT-NeoX on one each), or one
//! after the other (BLOOM, GPT-NeoX without `use_parallel_residual`). Rotary positions cover the
//! first dimensions of each head (pairs of halves; adjacent pairs for GPT-J); BLOOM has ALiBi
//! instead, and a LayerNorm on the embeddings. GPT-NeoX and BLOOM fuse q/k/v head by head. The
//! LM head of Phi and GPT-J has a bias. The other members' tensors reach the wiring under Phi's
//! names through their policies' renames.

use candle_core::Tensor;

use crate::checkpoint::config::FusedQkv;
use crate::checkpoint::{Activation, ModelConfig};
use crate::comm::Communicator;
use crate::error::Result;
use crate::models::attention::{alibi_slopes, attend, HeadLayout, LayerCaches, Projected, Rotary};
use crate::models::layers::{
    activate, LayerNorm, Linear, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead,
};
use crate::models::{apply_head, layer_norm, weight_and_bias, Batch, ShardedModel};
use crate::parallel::engine::ShardLoader;

/// A block's q/k/v projection.
enum Qkv {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// GPT-NeoX's `query_key_value`: each head's q, k and v one after another.
    PerHead(Linear),
    /// All queries, then keys, then values (Falcon's grouped projection as loaded).
    Fused(Linear),
}

struct Block {
    norm: LayerNorm,
    /// The MLP's own LayerNorm (GPT-NeoX).
    mlp_norm: Option<LayerNorm>,
    qkv: Qkv,
    dense: RowParallelLinear,
    fc1: Linear,
    fc2: RowParallelLinear,
}

/// A rank's shard of `PhiForCausalLM` or `GPTJForCausalLM`.
pub struct Phi {
    caches: LayerCaches,
    embed: VocabParallelEmbedding,
    /// BLOOM's LayerNorm on the embeddings.
    embed_norm: Option<LayerNorm>,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    head: VocabParallelHead,
    /// Rotary positions, or (BLOOM) none.
    rotary: Option<Rotary>,
    /// BLOOM's ALiBi slopes of this rank's heads.
    alibi: Option<Vec<f32>>,
    layout: HeadLayout,
    activation: Activation,
    sequential: bool,
}

impl Phi {
    /// Loads the rank's shard.
    pub fn load(loader: &mut ShardLoader, c: &ModelConfig) -> Result<Self> {
        let (h, inner, eps) = (c.hidden_size, c.intermediate_size, c.norm_eps);
        let (q_width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let plan = loader.plan().clone();
        let rank = loader.rank();
        let embed = loader.load_linear("embed_tokens.weight", &[c.vocab_size, h])?;
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("layers.{i}");
            let mut proj = |name: &str, out: usize, inp: usize, bias: bool| {
                weight_and_bias(loader, &format!("{p}.{name}"), out, inp, bias)
            };
            let fused = "self_attn.query_key_value";
            let qkv = match c.fused_qkv {
                Some(FusedQkv::PerHead) => {
                    Qkv::PerHead(proj(fused, 3 * q_width, h, c.qkv_bias)?.into())
                }
                Some(FusedQkv::Grouped) => {
                    Qkv::Fused(proj(fused, q_width + 2 * kv_width, h, c.qkv_bias)?.into())
                }
                None => Qkv::Separate {
                    q: proj("self_attn.q_proj", q_width, h, c.qkv_bias)?.into(),
                    k: proj("self_attn.k_proj", kv_width, h, c.qkv_bias)?.into(),
                    v: proj("self_attn.v_proj", kv_width, h, c.qkv_bias)?.into(),
                },
            };
            let dense = proj("self_attn.dense", h, q_width, c.attn_out_bias)?;
            let fc1 = proj("mlp.fc1", inner, h, c.mlp_bias)?;
            let fc2 = proj("mlp.fc2", h, inner, c.mlp_bias)?;
            let mlp_norm = format!("{p}.post_attention_layernorm");
            blocks.push(Block {
                norm: layer_norm(loader, &format!("{p}.input_layernorm"), h, eps)?,
                mlp_norm: match c.separate_mlp_norm {
                    true => Some(layer_norm(loader, &mlp_norm, h, eps)?),
                    false => None,
                },
                qkv,
                dense: dense.into(),
                fc1: fc1.into(),
                fc2: fc2.into(),
            });
        }
        // Both are split by vocabulary rows, as the policy says (GPT-NeoX's head has no bias).
        let head = match loader.try_load_linear("lm_head.weight", &[c.vocab_size, h])? {
            Some(w) if c.tie_word_embeddings != Some(true) => w,
            _ => embed.clone(),
        };
        let head_bias = loader.try_load("lm_head.bias", &[c.vocab_size])?;
        let layout = HeadLayout::of_rank(&plan, rank, c.head_dim);
        Ok(Phi {
            caches: LayerCaches::new(c.num_layers),
            embed: VocabParallelEmbedding::new(embed, plan.vocab.elements(rank).start),
            embed_norm: match c.alibi {
                true => Some(layer_norm(loader, "embed_layernorm", h, eps)?),
                false => None,
            },
            blocks,
            final_norm: layer_norm(loader, "final_layernorm", h, eps)?,
            head: VocabParallelHead::new(head, head_bias, plan.vocab.counts()),
            rotary: match (&c.rope, c.alibi) {
                (Some(rope), false) => Some(Rotary::scaled(
                    c.rotary_dim.unwrap_or(c.head_dim),
                    &rope.full,
                    c.rotary_interleaved,
                )?),
                _ => None,
            },
            alibi: c.alibi.then(|| {
                alibi_slopes(c.num_heads)[layout.first_head..layout.first_head + layout.heads]
                    .to_vec()
            }),
            layout,
            activation: c.activation,
            sequential: c.sequential_residual,
        })
    }

    /// The block's queries, keys and values for this rank's heads.
    fn project(&self, block: &Block, x: &Tensor) -> Result<Projected> {
        Ok(match &block.qkv {
            Qkv::Fused(qkv) => Projected::split_fused(&qkv.forward(x)?, &self.layout)?,
            Qkv::Separate { q, k, v } => Projected {
                q: q.forward(x)?,
                k: k.forward(x)?,
                v: v.forward(x)?,
            },
            Qkv::PerHead(qkv) => {
                let (b, l, _) = x.dims3()?;
                let (heads, d) = (self.layout.heads, self.layout.head_dim);
                let fused = qkv.forward(x)?.reshape((b, l, heads, 3, d))?;
                let part = |i: usize| -> Result<Tensor> {
                    Ok(fused.narrow(3, i, 1)?.reshape((b, l, heads * d))?)
                };
                Projected {
                    q: part(0)?,
                    k: part(1)?,
                    v: part(2)?,
                }
            }
        })
    }
}

impl ShardedModel for Phi {
    fn forward(&mut self, input: &Batch, comm: &dyn Communicator) -> Result<Tensor> {
        let past = input.past_len(self.caches.len());
        let mut x = self
            .embed
            .forward(input.ids, &[input.batch, input.seq_len], comm)?;
        if let Some(norm) = &self.embed_norm {
            x = norm.forward(&x)?;
        }
        let mut mask = input.mask(past, true, None)?;
        if let Some(slopes) = &self.alibi {
            mask = mask.with_alibi(slopes);
        }
        let angles = self
            .rotary
            .as_mut()
            .map(|r| r.angles(&input.position_ids(past), input.batch, input.seq_len))
            .transpose()?;
        for i in 0..self.blocks.len() {
            let block = &self.blocks[i];
            let normed = block.norm.forward(&x)?;
            let projected = self.project(block, &normed)?;
            let cache = input.use_cache.then(|| self.caches.layer(i));
            let attn = attend(projected, self.layout, angles.as_ref(), cache, &mask)?;
            let block = &self.blocks[i];
            let attended = block.dense.forward(&attn, comm)?;
            // The MLP reads the block's input (parallel), or its input plus the attention.
            let mlp_input = match self.sequential {
                true => (&x + &attended)?,
                false => x.clone(),
            };
            let mlp_normed = match &block.mlp_norm {
                Some(norm) => norm.forward(&mlp_input)?,
                None => normed,
            };
            let mlp = activate(self.activation, &block.fc1.forward(&mlp_normed)?)?;
            x = ((x + attended)? + block.fc2.forward(&mlp, comm)?)?;
        }
        let x = self.final_norm.forward(&x)?;
        apply_head(&self.head, &x, input.last_only, comm)
    }

    fn caches(&mut self) -> Option<&mut LayerCaches> {
        Some(&mut self.caches)
    }
}
