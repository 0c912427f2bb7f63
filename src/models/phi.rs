//! Phi and GPT-J: each block runs attention and the MLP in parallel on one LayerNorm and adds
//! both to the residual stream; rotary positions cover the first dimensions of each head
//! (pairs of halves for Phi, adjacent pairs for GPT-J); the LM head has a bias. GPT-J's tensors
//! reach the wiring under Phi's names through its policy's renames.

use candle_core::Tensor;

use crate::checkpoint::{Activation, ModelConfig};
use crate::comm::Communicator;
use crate::error::Result;
use crate::models::attention::{attend, HeadLayout, LayerCaches, Projected, Rotary};
use crate::models::layers::{
    activate, LayerNorm, Linear, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead,
};
use crate::models::{apply_head, layer_norm, weight_and_bias, Batch, ShardedModel};
use crate::parallel::engine::ShardLoader;

struct Block {
    norm: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    dense: RowParallelLinear,
    fc1: Linear,
    fc2: RowParallelLinear,
}

/// A rank's shard of `PhiForCausalLM` or `GPTJForCausalLM`.
pub struct Phi {
    caches: LayerCaches,
    embed: VocabParallelEmbedding,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    head: VocabParallelHead,
    rotary: Rotary,
    layout: HeadLayout,
    activation: Activation,
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
            let (q, k, v) = (
                proj("self_attn.q_proj", q_width, h, c.qkv_bias)?,
                proj("self_attn.k_proj", kv_width, h, c.qkv_bias)?,
                proj("self_attn.v_proj", kv_width, h, c.qkv_bias)?,
            );
            let dense = proj("self_attn.dense", h, q_width, c.attn_out_bias)?;
            let fc1 = proj("mlp.fc1", inner, h, true)?;
            let fc2 = proj("mlp.fc2", h, inner, true)?;
            blocks.push(Block {
                norm: layer_norm(loader, &format!("{p}.input_layernorm"), h, eps)?,
                q: q.into(),
                k: k.into(),
                v: v.into(),
                dense: dense.into(),
                fc1: fc1.into(),
                fc2: fc2.into(),
            });
        }
        // Both are split by vocabulary rows, as the policy says.
        let (head, head_bias) = weight_and_bias(loader, "lm_head", c.vocab_size, h, true)?;
        Ok(Phi {
            caches: LayerCaches::new(c.num_layers),
            embed: VocabParallelEmbedding::new(embed, plan.vocab.elements(rank).start),
            blocks,
            final_norm: layer_norm(loader, "final_layernorm", h, eps)?,
            head: VocabParallelHead::new(head, head_bias, plan.vocab.counts()),
            rotary: Rotary::partial(
                c.rotary_dim.unwrap_or(c.head_dim),
                c.rope_theta.unwrap_or(10_000.0),
                c.rotary_interleaved,
            ),
            layout: HeadLayout::of_rank(&plan, rank, c.head_dim),
            activation: c.activation,
        })
    }
}

impl ShardedModel for Phi {
    fn forward(&mut self, input: &Batch, comm: &dyn Communicator) -> Result<Tensor> {
        let past = input.past_len(self.caches.len());
        let mut x = self
            .embed
            .forward(input.ids, &[input.batch, input.seq_len], comm)?;
        let mask = input.mask(past, true, None)?;
        let angles = self
            .rotary
            .angles(&input.position_ids(past), input.batch, input.seq_len)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let normed = block.norm.forward(&x)?;
            let projected = Projected {
                q: block.q.forward(&normed)?,
                k: block.k.forward(&normed)?,
                v: block.v.forward(&normed)?,
            };
            let cache = input.use_cache.then(|| self.caches.layer(i));
            let attn = attend(projected, self.layout, Some(&angles), cache, mask.as_ref())?;
            let mlp = activate(self.activation, &block.fc1.forward(&normed)?)?;
            x = ((x + block.dense.forward(&attn, comm)?)? + block.fc2.forward(&mlp, comm)?)?;
        }
        let x = self.final_norm.forward(&x)?;
        apply_head(&self.head, &x, input.last_only, comm)
    }

    fn caches(&mut self) -> Option<&mut LayerCaches> {
        Some(&mut self.caches)
    }
}
