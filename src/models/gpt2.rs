//! The GPT-2 family: learned positions, pre-LayerNorm blocks, an MLP of two linears, an LM head
//! tied to the word embedding. Members differ in a few switches ([`Variant`]):
//! GPT-2 (fused q/k/v in `c_attn`, `Conv1D` weights stored `[in, out]`), GPTBigCode (fused
//! multi-query `c_attn`, linear weights), OPT (separate q/k/v, positions offset by 2) and
//! GPT-Neo (separate q/k/v without biases, unscaled attention scores, local attention layers).
//! The other members' tensors reach the wiring under GPT-2's names through their policies'
//! renames.

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

/// How a member of the family differs from GPT-2.
#[derive(Debug, Clone, Copy)]
struct Variant {
    /// Weights stored `[in, out]` (`Conv1D`).
    conv1d: bool,
    /// q, k and v in one `c_attn` projection (else `q_proj`, `k_proj`, `v_proj`).
    fused_qkv: bool,
    /// Rows of the position table before position 0 (OPT: 2).
    position_offset: usize,
    /// Attention scores divided by the square root of the head width (not in GPT-Neo).
    scaled: bool,
}

impl Variant {
    fn of(model_type: &str) -> Self {
        let gpt2 = Variant {
            conv1d: true,
            fused_qkv: true,
            position_offset: 0,
            scaled: true,
        };
        let separate = Variant {
            conv1d: false,
            fused_qkv: false,
            ..gpt2
        };
        match model_type {
            "gpt_bigcode" => Variant {
                conv1d: false,
                ..gpt2
            },
            "opt" => Variant {
                position_offset: 2,
                ..separate
            },
            "gpt_neo" => Variant {
                scaled: false,
                ..separate
            },
            _ => gpt2,
        }
    }
}

/// A block's q/k/v projection.
enum Qkv {
    Fused(Linear),
    Separate { q: Linear, k: Linear, v: Linear },
}

struct Block {
    ln_1: LayerNorm,
    qkv: Qkv,
    attn_proj: RowParallelLinear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: RowParallelLinear,
    /// Local attention window (GPT-Neo's local layers).
    window: Option<usize>,
}

/// A rank's shard of a model of the GPT-2 family.
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
    variant: Variant,
}

/// Loads `name.weight` (a linear of `out × inp`, stored as the variant stores it) and, when
/// `bias`, `name.bias`.
fn projection(
    loader: &mut ShardLoader,
    variant: Variant,
    name: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let shape = match variant.conv1d {
        true => [inp, out],
        false => [out, inp],
    };
    let weight = loader.load(&format!("{name}.weight"), &shape)?;
    let bias = match bias {
        true => Some(loader.load(&format!("{name}.bias"), &[out])?),
        false => None,
    };
    Ok((weight, bias))
}

impl Gpt2 {
    /// Loads the rank's shard.
    pub fn load(loader: &mut ShardLoader, c: &ModelConfig) -> Result<Self> {
        let variant = Variant::of(&c.model_type);
        let (h, inner, eps) = (c.hidden_size, c.intermediate_size, c.norm_eps);
        let (q_width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let plan = loader.plan().clone();
        let rank = loader.rank();
        let wte = loader.load("wte.weight", &[c.vocab_size, h])?;
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("h.{i}");
            let mut linear = |name: &str, out: usize, inp: usize, bias: bool| {
                projection(loader, variant, &format!("{p}.{name}"), out, inp, bias)
            };
            let qkv = match variant.fused_qkv {
                true => {
                    let (w, b) = linear("attn.c_attn", q_width + 2 * kv_width, h, c.qkv_bias)?;
                    Qkv::Fused(Linear::new(w, b))
                }
                false => {
                    let (q, qb) = linear("attn.q_proj", q_width, h, c.qkv_bias)?;
                    let (k, kb) = linear("attn.k_proj", kv_width, h, c.qkv_bias)?;
                    let (v, vb) = linear("attn.v_proj", kv_width, h, c.qkv_bias)?;
                    Qkv::Separate {
                        q: Linear::new(q, qb),
                        k: Linear::new(k, kb),
                        v: Linear::new(v, vb),
                    }
                }
            };
            let (attn_proj, attn_proj_bias) = linear("attn.c_proj", h, q_width, true)?;
            let (c_fc, c_fc_bias) = linear("mlp.c_fc", inner, h, true)?;
            let (mlp_proj, mlp_proj_bias) = linear("mlp.c_proj", h, inner, true)?;
            blocks.push(Block {
                ln_1: layer_norm(loader, &format!("{p}.ln_1"), h, eps)?,
                qkv,
                attn_proj: RowParallelLinear::new(attn_proj, attn_proj_bias),
                ln_2: layer_norm(loader, &format!("{p}.ln_2"), h, eps)?,
                c_fc: Linear::new(c_fc, c_fc_bias),
                mlp_proj: RowParallelLinear::new(mlp_proj, mlp_proj_bias),
                window: c.attention_windows.get(i).copied().flatten(),
            });
        }
        let head_weight = match loader.try_load("lm_head.weight", &[c.vocab_size, h])? {
            Some(w) if c.tie_word_embeddings != Some(true) => w,
            _ => wte.clone(),
        };
        let positions = c.max_positions + variant.position_offset;
        Ok(Gpt2 {
            caches: LayerCaches::new(c.num_layers),
            wte: VocabParallelEmbedding::new(wte, plan.vocab.elements(rank).start),
            wpe: to_f32(loader.load("wpe.weight", &[positions, h])?)?,
            blocks,
            ln_f: layer_norm(loader, "ln_f", h, eps)?,
            head: VocabParallelHead::new(head_weight, None, plan.vocab.counts()),
            layout: HeadLayout::of_rank(&plan, rank, c.head_dim),
            activation: c.activation,
            max_positions: c.max_positions,
            variant,
        })
    }

    /// The block's queries, keys and values for this rank's heads.
    fn project(&self, block: &Block, x: &Tensor) -> Result<Projected> {
        let mut projected = match &block.qkv {
            Qkv::Fused(c_attn) => Projected::split_fused(&c_attn.forward(x)?, &self.layout)?,
            Qkv::Separate { q, k, v } => Projected {
                q: q.forward(x)?,
                k: k.forward(x)?,
                v: v.forward(x)?,
            },
        };
        if !self.variant.scaled {
            // Attention divides scores by √d; GPT-Neo's are not divided.
            projected.q = (projected.q * (self.layout.head_dim as f64).sqrt())?;
        }
        Ok(projected)
    }
}

impl ShardedModel for Gpt2 {
    fn forward(&mut self, input: &Batch, comm: &dyn Communicator) -> Result<Tensor> {
        let past = input.past_len(self.caches.len());
        let offset = self.variant.position_offset as u32;
        let positions: Vec<u32> = input
            .position_ids(past)
            .into_iter()
            .map(|p| p + offset)
            .collect();
        let end = positions
            .iter()
            .max()
            .map_or(0, |&p| (p - offset) as usize + 1);
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
        let global = input.mask(past, true, None)?;
        let window = self.blocks.iter().find_map(|b| b.window);
        let local = window
            .map(|w| input.mask(past, true, Some(w)))
            .transpose()?;
        for i in 0..self.blocks.len() {
            let block = &self.blocks[i];
            let projected = self.project(block, &block.ln_1.forward(&x)?)?;
            let mask = match (block.window, &local) {
                (Some(_), Some(local)) => local,
                _ => &global,
            };
            let cache = input.use_cache.then(|| self.caches.layer(i));
            let attn = attend(projected, self.layout, None, cache, mask)?;
            let block = &self.blocks[i];
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
