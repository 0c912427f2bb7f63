//! GPT-2: learned positions, pre-LayerNorm blocks, fused q/k/v in `c_attn`, tanh GELU, LM head
//! tied to the word embedding.

use candle_core::{Device, Tensor};

use crate::checkpoint::{Activation, ModelConfig};
use crate::comm::Communicator;
use crate::error::Result;
use crate::models::attention::{attend, HeadLayout, LayerCaches, Projected};
use crate::models::layers::{
    activate, to_f32, LayerNorm, Linear, RowParallelLinear, VocabParallelEmbedding,
    VocabParallelHead,
};
use crate::models::{apply_head, check_positions, layer_norm, Batch, ShardedModel};
use crate::parallel::engine::ShardLoader;

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: RowParallelLinear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: RowParallelLinear,
}

/// A rank's shard of `GPT2LMHeadModel`.
pub struct Gpt2 {
    caches: LayerCaches,
    wte: VocabParallelEmbedding,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: VocabParallelHead,
    layout: HeadLayout,
    activation: Activation,
    max_positions: usize,
}

impl Gpt2 {
    /// Loads the rank's shard.
    pub fn load(loader: &mut ShardLoader, c: &ModelConfig) -> Result<Self> {
        let (h, inner, eps) = (c.hidden_size, c.intermediate_size, c.norm_eps);
        let plan = loader.plan().clone();
        let rank = loader.rank();
        let wte = loader.load("wte.weight", &[c.vocab_size, h])?;
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("h.{i}");
            blocks.push(Block {
                ln_1: layer_norm(loader, &format!("{p}.ln_1"), h, eps)?,
                c_attn: Linear::new(
                    loader.load(&format!("{p}.attn.c_attn.weight"), &[h, 3 * h])?,
                    Some(loader.load(&format!("{p}.attn.c_attn.bias"), &[3 * h])?),
                ),
                attn_proj: RowParallelLinear::new(
                    loader.load(&format!("{p}.attn.c_proj.weight"), &[h, h])?,
                    Some(loader.load(&format!("{p}.attn.c_proj.bias"), &[h])?),
                ),
                ln_2: layer_norm(loader, &format!("{p}.ln_2"), h, eps)?,
                c_fc: Linear::new(
                    loader.load(&format!("{p}.mlp.c_fc.weight"), &[h, inner])?,
                    Some(loader.load(&format!("{p}.mlp.c_fc.bias"), &[inner])?),
                ),
                mlp_proj: RowParallelLinear::new(
                    loader.load(&format!("{p}.mlp.c_proj.weight"), &[inner, h])?,
                    Some(loader.load(&format!("{p}.mlp.c_proj.bias"), &[h])?),
                ),
            });
        }
        let head_weight = match loader.try_load("lm_head.weight", &[c.vocab_size, h])? {
            Some(w) if c.tie_word_embeddings != Some(true) => w,
            _ => wte.clone(),
        };
        Ok(Gpt2 {
            caches: LayerCaches::new(c.num_layers),
            wte: VocabParallelEmbedding::new(wte, plan.vocab.elements(rank).start),
            wpe: to_f32(loader.load("wpe.weight", &[c.max_positions, h])?)?,
            blocks,
            ln_f: layer_norm(loader, "ln_f", h, eps)?,
            head: VocabParallelHead::new(head_weight, None, plan.vocab.counts()),
            layout: HeadLayout::of_rank(&plan, rank, c.head_dim),
            activation: c.activation,
            max_positions: c.max_positions,
        })
    }
}

impl ShardedModel for Gpt2 {
    fn forward(&mut self, input: &Batch, comm: &dyn Communicator) -> Result<Tensor> {
        let past = input.past_len(self.caches.len());
        let positions = input.position_ids(past);
        let end = positions.iter().max().map_or(0, |&p| p as usize + 1);
        check_positions(end, self.max_positions)?;
        let positions = Tensor::from_vec(positions, input.batch * input.seq_len, &Device::Cpu)?;
        let mut x = (self
            .wte
            .forward(input.ids, &[input.batch, input.seq_len], comm)?
            + self.wpe.index_select(&positions, 0)?.reshape((
                input.batch,
                input.seq_len,
                self.wpe.dim(1)?,
            ))?)?;
        let mask = input.mask(past, true, None)?;
        let width = self.layout.heads * self.layout.head_dim;
        for (i, block) in self.blocks.iter().enumerate() {
            let qkv = block.c_attn.forward(&block.ln_1.forward(&x)?)?;
            let projected = Projected {
                q: qkv.narrow(2, 0, width)?,
                k: qkv.narrow(2, width, width)?,
                v: qkv.narrow(2, 2 * width, width)?,
            };
            let cache = input.use_cache.then(|| self.caches.layer(i));
            let attn = attend(projected, self.layout, None, cache, mask.as_ref())?;
            x = (x + block.attn_proj.forward(&attn, comm)?)?;
            let hidden = activate(
                self.activation,
                &block.c_fc.forward(&block.ln_2.forward(&x)?)?,
            )?;
            x = (x + block.mlp_proj.forward(&hidden, comm)?)?;
        }
        let x = self.ln_f.forward(&x)?;
        apply_head(&self.head, &x, input.last_only, comm)
    }

    fn caches(&mut self) -> Option<&mut LayerCaches> {
        Some(&mut self.caches)
    }
}
