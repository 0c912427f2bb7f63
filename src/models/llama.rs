//! The Llama-style decoders: Llama 2/3, Mistral, Qwen2/3, Gemma 1–3, Phi-3, SmolLM3, OLMo 2,
//! StableLM, Granite, StarCoder2, Cohere, and the mixtures of experts Mixtral, Qwen2-MoE,
//! Qwen3-MoE and OLMoE.
//! One wiring — rotary positions, grouped-query attention with query heads split evenly, an MLP split by its hidden width — whose switches
//! ([`DecoderOptions`]) come from the configuration: the norm kind and placement, q/k norms and
//! clipping, fused projections, multipliers, soft-caps, per layer its window and rotary positions, and
//! whether its MLP is a mixture of experts ([`crate::models::moe`]).

use candle_core::Tensor;

use crate::checkpoint::config::{
    DecoderOptions, LayerRope, MlpKind, NormPlacement, RopeConfig, RopeConfigs,
};
use crate::checkpoint::{Activation, ModelConfig};
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::models::attention::{
    attend_with, HeadLayout, KvCache, LayerCaches, Mask, Projected, Scores,
};
use crate::models::layers::{
    activate, gated, Linear, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead,
};
use crate::models::moe::SparseMoe;
use crate::models::norm::{HeadNorm, HeadNormSpec, HeadsOf, Norm};
use crate::models::rope::{Rotary, RotaryAngles};
use crate::models::{apply_head, weight_and_bias, Batch, ShardedModel};
use crate::parallel::engine::ShardLoader;

/// The query, key and value projections of this rank's heads.
enum QkvProjection {
    /// `q_proj`, `k_proj`, `v_proj`.
    Separate { q: Linear, k: Linear, v: Linear },
    /// Phi-3's `qkv_proj`, sliced to this rank's queries, keys and values.
    Fused(Linear),
}

/// The MLP of a block, split by its hidden width.
enum Mlp {
    /// `down(act(gate(x)) * up(x))`; `gate` and `up` are one fused projection (this rank's
    /// gate rows, then its up rows) when `up` is `None`.
    Gated {
        gate: Linear,
        up: Option<Linear>,
        down: RowParallelLinear,
    },
    /// `c_proj(act(c_fc(x)))`.
    Plain { fc: Linear, proj: RowParallelLinear },
    /// A mixture of experts, each split like the gated MLP (Mixtral, Qwen2-MoE, Qwen3-MoE,
    /// OLMoE).
    Sparse(SparseMoe),
}

impl Mlp {
    fn forward(
        &self,
        x: &Tensor,
        activation: Activation,
        comm: &dyn Communicator,
    ) -> Result<Tensor> {
        match self {
            Mlp::Gated { gate, up, down } => {
                let hidden = match up {
                    Some(up) => gated(activation, &gate.forward(x)?, &up.forward(x)?)?,
                    None => {
                        let fused = gate.forward(x)?;
                        let half = fused.dim(2)? / 2;
                        gated(
                            activation,
                            &fused.narrow(2, 0, half)?,
                            &fused.narrow(2, half, half)?,
                        )?
                    }
                };
                down.forward(&hidden, comm)
            }
            Mlp::Plain { fc, proj } => proj.forward(&activate(activation, &fc.forward(x)?)?, comm),
            Mlp::Sparse(moe) => moe.forward(x, activation, comm),
        }
    }
}

/// The norms of a block; which are present depends on [`NormPlacement`].
struct BlockNorms {
    /// Before attention (and, in a parallel block, before the MLP too).
    input: Option<Norm>,
    /// After attention (sandwich, post-norm), or before the MLP (pre-norm).
    post_attention: Option<Norm>,
    /// Before the MLP (sandwich).
    pre_feedforward: Option<Norm>,
    /// After the MLP (sandwich, post-norm).
    post_feedforward: Option<Norm>,
}

struct Layer {
    norms: BlockNorms,
    qkv: QkvProjection,
    q_norm: Option<HeadNorm>,
    k_norm: Option<HeadNorm>,
    o: RowParallelLinear,
    mlp: Mlp,
    window: Option<usize>,
    rope: LayerRope,
}

/// Applies an optional norm.
fn maybe(norm: &Option<Norm>, x: &Tensor) -> Result<Tensor> {
    match norm {
        Some(norm) => norm.forward(x),
        None => Ok(x.clone()),
    }
}

/// A rank's shard of a Llama-style decoder (`LlamaForCausalLM`, `Qwen3ForCausalLM`,
/// `Gemma2ForCausalLM`, `Phi3ForCausalLM`, ...).
pub struct Llama {
    caches: LayerCaches,
    embed: VocabParallelEmbedding,
    layers: Vec<Layer>,
    norm: Norm,
    head: VocabParallelHead,
    rotary: Rotary,
    /// Gemma 3's sliding layers' own rotary positions.
    sliding_rotary: Option<Rotary>,
    layout: HeadLayout,
    activation: Activation,
    options: DecoderOptions,
    scores: Scores,
}

impl Llama {
    /// Loads the rank's shard.
    pub fn load(loader: &mut ShardLoader, c: &ModelConfig) -> Result<Self> {
        let options = c.decoder.clone().ok_or_else(|| {
            Error::UnsupportedModel(format!("{} is not a Llama-style decoder", c.model_type))
        })?;
        let h = c.hidden_size;
        let plan = loader.plan().clone();
        let rank = loader.rank();
        let layout = HeadLayout::of_rank(&plan, rank, c.head_dim);
        let embed = loader.load_linear("embed_tokens.weight", &[c.vocab_size, h])?;
        // Key/value heads an earlier rank holds too are counted there by OLMo 2's k norm.
        let kv_counted_from = match rank {
            0 => 0,
            r => plan.kv_heads.units(r - 1).end,
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            layers.push(load_layer(loader, c, &options, layout, i, kv_counted_from)?);
        }
        let head_weight = match loader.try_load_linear("lm_head.weight", &[c.vocab_size, h])? {
            Some(w) if c.tie_word_embeddings != Some(true) => w,
            _ => embed.clone(),
        };
        let rotary_dim = c.rotary_dim.unwrap_or(c.head_dim);
        let rope = c.rope.clone().unwrap_or_else(|| RopeConfigs {
            full: RopeConfig::plain(10_000.0),
            sliding: None,
        });
        let rotary = |config: &RopeConfig| Rotary::scaled(rotary_dim, config, c.rotary_interleaved);
        Ok(Llama {
            caches: LayerCaches::new(c.num_layers),
            embed: VocabParallelEmbedding::new(embed, plan.vocab.elements(rank).start),
            layers,
            norm: Norm::load(loader, "norm", options.norm, h, c.norm_eps)?,
            head: VocabParallelHead::new(head_weight, None, plan.vocab.counts()),
            rotary: rotary(&rope.full)?,
            sliding_rotary: rope.sliding.as_ref().map(rotary).transpose()?,
            layout,
            activation: c.activation,
            scores: Scores {
                scale: options
                    .attention_scale
                    .unwrap_or(1.0 / (c.head_dim as f64).sqrt()),
                softcap: options.attn_softcap,
            },
            options,
        })
    }
}

/// Loads block `i`.
fn load_layer(
    loader: &mut ShardLoader,
    c: &ModelConfig,
    options: &DecoderOptions,
    layout: HeadLayout,
    i: usize,
    kv_counted_from: usize,
) -> Result<Layer> {
    let h = c.hidden_size;
    let (q_width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let p = format!("layers.{i}");
    let mut proj = |name: &str, out: usize, inp: usize, bias: bool| {
        weight_and_bias(loader, &format!("{p}.{name}"), out, inp, bias)
    };
    let qkv = match options.fused_qkv {
        true => QkvProjection::Fused(
            proj("self_attn.qkv_proj", q_width + 2 * kv_width, h, c.qkv_bias)?.into(),
        ),
        false => QkvProjection::Separate {
            q: proj("self_attn.q_proj", q_width, h, c.qkv_bias)?.into(),
            k: proj("self_attn.k_proj", kv_width, h, c.qkv_bias)?.into(),
            v: proj("self_attn.v_proj", kv_width, h, c.qkv_bias)?.into(),
        },
    };
    let o = proj("self_attn.o_proj", h, q_width, c.attn_out_bias)?.into();
    let inter = c.intermediate_size;
    let sparse = options
        .moe
        .as_ref()
        .filter(|moe| moe.sparse_layers.get(i).copied().unwrap_or(false));
    let mlp = match (sparse, options.mlp) {
        (Some(moe), _) => Mlp::Sparse(SparseMoe::load(loader, c, moe, i)?),
        (None, MlpKind::Gated) => Mlp::Gated {
            gate: proj("mlp.gate_proj", inter, h, c.mlp_bias)?.into(),
            up: Some(proj("mlp.up_proj", inter, h, c.mlp_bias)?.into()),
            down: proj("mlp.down_proj", h, inter, c.mlp_bias)?.into(),
        },
        (None, MlpKind::FusedGated) => Mlp::Gated {
            gate: proj("mlp.gate_up_proj", 2 * inter, h, c.mlp_bias)?.into(),
            up: None,
            down: proj("mlp.down_proj", h, inter, c.mlp_bias)?.into(),
        },
        (None, MlpKind::Plain) => Mlp::Plain {
            fc: proj("mlp.c_fc", inter, h, c.mlp_bias)?.into(),
            proj: proj("mlp.c_proj", h, inter, c.mlp_bias)?.into(),
        },
    };
    let mut norm =
        |name: &str| Norm::load(loader, &format!("{p}.{name}"), options.norm, h, c.norm_eps);
    let norms = match options.placement {
        NormPlacement::Pre => BlockNorms {
            input: Some(norm("input_layernorm")?),
            post_attention: Some(norm("post_attention_layernorm")?),
            pre_feedforward: None,
            post_feedforward: None,
        },
        NormPlacement::Sandwich => BlockNorms {
            input: Some(norm("input_layernorm")?),
            post_attention: Some(norm("post_attention_layernorm")?),
            pre_feedforward: Some(norm("pre_feedforward_layernorm")?),
            post_feedforward: Some(norm("post_feedforward_layernorm")?),
        },
        NormPlacement::Post => BlockNorms {
            input: None,
            post_attention: Some(norm("post_attention_layernorm")?),
            pre_feedforward: None,
            post_feedforward: Some(norm("post_feedforward_layernorm")?),
        },
        NormPlacement::Parallel => BlockNorms {
            input: Some(norm("input_layernorm")?),
            post_attention: None,
            pre_feedforward: None,
            post_feedforward: None,
        },
    };
    let (q_norm, k_norm) = match options.qk_norm {
        Some(qk) => {
            // StableLM names its per-head norms `q_layernorm` / `k_layernorm`.
            let (q_name, k_name) = match c.model_type.as_str() {
                "stablelm" => ("q_layernorm", "k_layernorm"),
                _ => ("q_norm", "k_norm"),
            };
            let spec = |name: &str, heads_of, total_heads, counted_from_head| HeadNormSpec {
                qk,
                kind: options.norm,
                prefix: format!("{p}.self_attn.{name}"),
                heads_of,
                layout,
                total_heads,
                counted_from_head,
                eps: c.norm_eps,
            };
            (
                Some(HeadNorm::load(
                    loader,
                    &spec(q_name, HeadsOf::Queries, c.num_heads, 0),
                )?),
                Some(HeadNorm::load(
                    loader,
                    &spec(k_name, HeadsOf::Keys, c.num_kv_heads, kv_counted_from),
                )?),
            )
        }
        None => (None, None),
    };
    Ok(Layer {
        norms,
        qkv,
        q_norm,
        k_norm,
        o,
        mlp,
        window: c.attention_windows.get(i).copied().flatten(),
        rope: options
            .layer_rope
            .get(i)
            .copied()
            .unwrap_or(LayerRope::Full),
    })
}

/// What a layer's attention reads besides its input: the heads, positions and mask.
struct AttentionInputs<'a> {
    layout: HeadLayout,
    angles: Option<&'a RotaryAngles>,
    mask: &'a Mask,
    scores: Scores,
    /// Queries, keys and values are clamped to `[-c, c]` after the q/k norms (OLMoE).
    clip_qkv: Option<f64>,
}

impl Layer {
    /// Attention of this rank's heads, output projection and all-reduce included.
    fn attention(
        &self,
        x: &Tensor,
        inputs: AttentionInputs,
        cache: Option<&mut KvCache>,
        comm: &dyn Communicator,
    ) -> Result<Tensor> {
        let mut projected = match &self.qkv {
            QkvProjection::Separate { q, k, v } => Projected {
                q: q.forward(x)?,
                k: k.forward(x)?,
                v: v.forward(x)?,
            },
            QkvProjection::Fused(qkv) => Projected::split_fused(&qkv.forward(x)?, &inputs.layout)?,
        };
        if let (Some(q_norm), Some(k_norm)) = (&self.q_norm, &self.k_norm) {
            projected.q = q_norm.forward(&projected.q, comm)?;
            projected.k = k_norm.forward(&projected.k, comm)?;
        }
        if let Some(c) = inputs.clip_qkv {
            for t in [&mut projected.q, &mut projected.k, &mut projected.v] {
                *t = t.clamp(-c, c)?;
            }
        }
        let attn = attend_with(
            projected,
            inputs.layout,
            inputs.angles,
            cache,
            inputs.mask,
            inputs.scores,
        )?;
        self.o.forward(&attn, comm)
    }
}

impl ShardedModel for Llama {
    fn forward(&mut self, input: &Batch, comm: &dyn Communicator) -> Result<Tensor> {
        let past = input.past_len(self.caches.len());
        let mut x = self
            .embed
            .forward(input.ids, &[input.batch, input.seq_len], comm)?;
        if let Some(scale) = self.options.embedding_scale {
            x = (x * scale)?;
        }
        let positions = input.position_ids(past);
        let angles = self.rotary.angles(&positions, input.batch, input.seq_len)?;
        let sliding_angles = match &mut self.sliding_rotary {
            Some(rotary) => Some(rotary.angles(&positions, input.batch, input.seq_len)?),
            None => None,
        };
        // One mask per distinct window (most models have one or two).
        let mut masks: Vec<(Option<usize>, Mask)> = Vec::new();
        let residual_scale = self.options.residual_scale;
        let scaled = |t: Tensor| -> Result<Tensor> {
            Ok(match residual_scale {
                Some(s) => (t * s)?,
                None => t,
            })
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let known = masks.iter().position(|(w, _)| *w == layer.window);
            let index = match known {
                Some(index) => index,
                None => {
                    masks.push((layer.window, input.mask(past, true, layer.window)?));
                    masks.len() - 1
                }
            };
            let mask = &masks[index].1;
            let layer_angles = match layer.rope {
                LayerRope::Full => Some(&angles),
                LayerRope::Sliding => sliding_angles.as_ref().or(Some(&angles)),
                LayerRope::None => None,
            };
            let cache = input.use_cache.then(|| self.caches.layer(i));
            let norms = &layer.norms;
            let normed = maybe(&norms.input, &x)?;
            let inputs = AttentionInputs {
                layout: self.layout,
                angles: layer_angles,
                mask,
                scores: self.scores,
                clip_qkv: self.options.clip_qkv,
            };
            let attn = layer.attention(&normed, inputs, cache, comm)?;
            x = match self.options.placement {
                NormPlacement::Parallel => {
                    let mlp = layer.mlp.forward(&normed, self.activation, comm)?;
                    ((&x + scaled(attn)?)? + scaled(mlp)?)?
                }
                NormPlacement::Pre => {
                    let x = (&x + scaled(attn)?)?;
                    let mlp = layer.mlp.forward(
                        &maybe(&norms.post_attention, &x)?,
                        self.activation,
                        comm,
                    )?;
                    (&x + scaled(mlp)?)?
                }
                NormPlacement::Sandwich | NormPlacement::Post => {
                    let x = (&x + scaled(maybe(&norms.post_attention, &attn)?)?)?;
                    let mlp = layer.mlp.forward(
                        &maybe(&norms.pre_feedforward, &x)?,
                        self.activation,
                        comm,
                    )?;
                    (&x + scaled(maybe(&norms.post_feedforward, &mlp)?)?)?
                }
            };
        }
        let x = self.norm.forward(&x)?;
        let mut logits = apply_head(&self.head, &x, input.last_only, comm)?;
        if let Some(scale) = self.options.logit_scale {
            logits = (logits * scale)?;
        }
        if let Some(cap) = self.options.final_softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        Ok(logits)
    }

    fn caches(&mut self) -> Option<&mut LayerCaches> {
        Some(&mut self.caches)
    }
}
