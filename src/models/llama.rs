//! The Llama family (Llama, Mistral, Qwen2): RMSNorm, rotary positions, SwiGLU MLP with gate and
//! up projections split together, grouped-query attention with query heads split evenly, optional q/k/v
//! biases (Qwen2) and sliding-window attention (Mistral).

use candle_core::Tensor;

use crate::checkpoint::{Activation, ModelConfig};
use crate::comm::Communicator;
use crate::error::Result;
use crate::models::attention::{attend, HeadLayout, LayerCaches, Projected, Rotary};
use crate::models::layers::{
    gated, Linear, RmsNorm, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead,
};
use crate::models::{apply_head, weight_and_bias, Batch, ShardedModel};
use crate::parallel::engine::ShardLoader;

struct Layer {
    input_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: RowParallelLinear,
    post_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: RowParallelLinear,
}

/// A rank's shard of `LlamaForCausalLM`, `MistralForCausalLM` or `Qwen2ForCausalLM`.
pub struct Llama {
    caches: LayerCaches,
    embed: VocabParallelEmbedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    head: VocabParallelHead,
    rotary: Rotary,
    layout: HeadLayout,
    activation: Activation,
    sliding_window: Option<usize>,
}

impl Llama {
    /// Loads the rank's shard.
    pub fn load(loader: &mut ShardLoader, c: &ModelConfig) -> Result<Self> {
        let h = c.hidden_size;
        let (q_width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let plan = loader.plan().clone();
        let rank = loader.rank();
        let embed = loader.load_linear("embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_layers);
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
            let o = proj("self_attn.o_proj", h, q_width, c.attn_out_bias)?;
            let gate = proj("mlp.gate_proj", c.intermediate_size, h, c.mlp_bias)?;
            let up = proj("mlp.up_proj", c.intermediate_size, h, c.mlp_bias)?;
            let down = proj("mlp.down_proj", h, c.intermediate_size, c.mlp_bias)?;
            let mut norm = |name: &str| -> Result<RmsNorm> {
                Ok(RmsNorm::new(
                    loader.load(&format!("{p}.{name}.weight"), &[h])?,
                    c.norm_eps,
                ))
            };
            layers.push(Layer {
                input_norm: norm("input_layernorm")?,
                post_norm: norm("post_attention_layernorm")?,
                q: q.into(),
                k: k.into(),
                v: v.into(),
                o: o.into(),
                gate: gate.into(),
                up: up.into(),
                down: down.into(),
            });
        }
        let head_weight = match loader.try_load_linear("lm_head.weight", &[c.vocab_size, h])? {
            Some(w) if c.tie_word_embeddings != Some(true) => w,
            _ => embed.clone(),
        };
        Ok(Llama {
            caches: LayerCaches::new(c.num_layers),
            embed: VocabParallelEmbedding::new(embed, plan.vocab.elements(rank).start),
            layers,
            norm: RmsNorm::new(loader.load("norm.weight", &[h])?, c.norm_eps),
            head: VocabParallelHead::new(head_weight, None, plan.vocab.counts()),
            rotary: Rotary::new(c.head_dim, c.rope_theta.unwrap_or(10_000.0)),
            layout: HeadLayout::of_rank(&plan, rank, c.head_dim),
            activation: c.activation,
            sliding_window: c.sliding_window,
        })
    }
}

impl ShardedModel for Llama {
    fn forward(&mut self, input: &Batch, comm: &dyn Communicator) -> Result<Tensor> {
        let past = input.past_len(self.caches.len());
        let mut x = self
            .embed
            .forward(input.ids, &[input.batch, input.seq_len], comm)?;
        let mask = input.mask(past, true, self.sliding_window)?;
        let angles = self
            .rotary
            .angles(&input.position_ids(past), input.batch, input.seq_len)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = layer.input_norm.forward(&x)?;
            let projected = Projected {
                q: layer.q.forward(&normed)?,
                k: layer.k.forward(&normed)?,
                v: layer.v.forward(&normed)?,
            };
            let cache = input.use_cache.then(|| self.caches.layer(i));
            let attn = attend(projected, self.layout, Some(&angles), cache, mask.as_ref())?;
            x = (x + layer.o.forward(&attn, comm)?)?;
            let normed = layer.post_norm.forward(&x)?;
            let hidden = gated(
                self.activation,
                &layer.gate.forward(&normed)?,
                &layer.up.forward(&normed)?,
            )?;
            x = (x + layer.down.forward(&hidden, comm)?)?;
        }
        let x = self.norm.forward(&x)?;
        apply_head(&self.head, &x, input.last_only, comm)
    }

    fn caches(&mut self) -> Option<&mut LayerCaches> {
        Some(&mut self.caches)
    }
}
