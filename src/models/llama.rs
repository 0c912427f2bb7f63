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
use crate::models::packing::{apply_head_to_each, Packing};
use crate::models::rope::{Rotary, RotaryAngles};
use crate::models::{weight_and_bias, Batch, ShardedModel};
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

/// What every batch's attention in a layer shares: the heads and how scores are made.
struct AttentionShape {
    layout: HeadLayout,
    scores: Scores,
    /// Queries, keys and values are clamped to `[-c, c]` after the q/k norms (OLMoE).
    clip_qkv: Option<f64>,
}

/// What one batch's attention in a layer reads besides its tokens: its rotary angles, its mask
/// and the cache it extends.
struct SegmentAttention<'a> {
    angles: Option<&'a RotaryAngles>,
    mask: &'a Mask,
    cache: Option<&'a mut KvCache>,
}

impl Layer {
    /// Attention of this rank's heads over the packed tokens `x`, each batch of `packing` over
    /// its own segment's cache, output projection and all-reduce included (once for all).
    fn attention(
        &self,
        x: &Tensor,
        shape: &AttentionShape,
        segments: Vec<SegmentAttention>,
        packing: &Packing,
        comm: &dyn Communicator,
    ) -> Result<Tensor> {
        let mut projected = match &self.qkv {
            QkvProjection::Separate { q, k, v } => Projected {
                q: q.forward(x)?,
                k: k.forward(x)?,
                v: v.forward(x)?,
            },
            QkvProjection::Fused(qkv) => Projected::split_fused(&qkv.forward(x)?, &shape.layout)?,
        };
        if let (Some(q_norm), Some(k_norm)) = (&self.q_norm, &self.k_norm) {
            projected.q = q_norm.forward(&projected.q, comm)?;
            projected.k = k_norm.forward(&projected.k, comm)?;
        }
        if let Some(c) = shape.clip_qkv {
            for t in [&mut projected.q, &mut projected.k, &mut projected.v] {
                *t = t.clamp(-c, c)?;
            }
        }
        let (qs, ks, vs) = (
            packing.unpack(&projected.q)?,
            packing.unpack(&projected.k)?,
            packing.unpack(&projected.v)?,
        );
        let outputs = segments
            .into_iter()
            .zip(qs.into_iter().zip(ks).zip(vs))
            .map(|(segment, ((q, k), v))| {
                attend_with(
                    Projected { q, k, v },
                    shape.layout,
                    segment.angles,
                    segment.cache,
                    segment.mask,
                    shape.scores,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        self.o.forward(&packing.pack(outputs)?, comm)
    }
}

/// One batch of a pass: its rotary angles and one mask per distinct window of the layers.
struct Segment {
    angles: RotaryAngles,
    /// Gemma 3's sliding layers' own angles.
    sliding_angles: Option<RotaryAngles>,
    masks: Vec<(Option<usize>, Mask)>,
    use_cache: bool,
    last_only: bool,
}

impl Segment {
    /// What `layer`'s attention reads of this batch, extending `cache`.
    fn attention<'a>(
        &'a self,
        layer: &Layer,
        cache: &'a mut KvCache,
    ) -> Result<SegmentAttention<'a>> {
        let angles = match layer.rope {
            LayerRope::Full => Some(&self.angles),
            LayerRope::Sliding => self.sliding_angles.as_ref().or(Some(&self.angles)),
            LayerRope::None => None,
        };
        let (_, mask) = self
            .masks
            .iter()
            .find(|(window, _)| *window == layer.window)
            .ok_or_else(|| Error::InvalidInput(format!("no mask for window {:?}", layer.window)))?;
        Ok(SegmentAttention {
            angles,
            mask,
            cache: self.use_cache.then_some(cache),
        })
    }
}

impl Llama {
    /// The angles and masks of batch `input` after `cached` positions.
    fn segment(&mut self, input: &Batch, cached: usize) -> Result<Segment> {
        let past = input.past_len(cached);
        let positions = input.position_ids(past);
        let angles = self.rotary.angles(&positions, input.batch, input.seq_len)?;
        let sliding_angles = match &mut self.sliding_rotary {
            Some(rotary) => Some(rotary.angles(&positions, input.batch, input.seq_len)?),
            None => None,
        };
        // One mask per distinct window (most models have one or two).
        let mut masks: Vec<(Option<usize>, Mask)> = Vec::new();
        for layer in &self.layers {
            if !masks.iter().any(|(window, _)| *window == layer.window) {
                masks.push((layer.window, input.mask(past, true, layer.window)?));
            }
        }
        Ok(Segment {
            angles,
            sliding_angles,
            masks,
            use_cache: input.use_cache,
            last_only: input.last_only,
        })
    }

    /// Runs `inputs` in one pass (see [`crate::models::packing`]), batch `i` over `caches[i]`
    /// or, where that is `None`, over the model's own caches. Returns each batch's logits.
    fn run(
        &mut self,
        inputs: &[Batch],
        caches: Vec<Option<&mut LayerCaches>>,
        comm: &dyn Communicator,
    ) -> Result<Vec<Tensor>> {
        if caches.len() != inputs.len() || caches.iter().filter(|c| c.is_none()).count() > 1 {
            return Err(Error::InvalidInput(format!(
                "{} batches need as many caches, the model's own at most once",
                inputs.len()
            )));
        }
        let segments = inputs
            .iter()
            .zip(&caches)
            .map(|(input, cache)| {
                let cached = cache.as_ref().map_or(self.caches.len(), |c| c.len());
                self.segment(input, cached)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut own = Some(&mut self.caches);
        let mut caches: Vec<&mut LayerCaches> = caches
            .into_iter()
            .map(|cache| cache.or_else(|| own.take()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::InvalidInput("the model's caches were given twice".into()))?;
        let packing = Packing::new(inputs.iter().map(|b| (b.batch, b.seq_len)).collect());
        let ids: Vec<u32> = inputs.iter().flat_map(|b| b.ids.iter().copied()).collect();
        let mut x = self.embed.forward(&ids, &packing.ids_shape(), comm)?;
        if let Some(scale) = self.options.embedding_scale {
            x = (x * scale)?;
        }
        let residual_scale = self.options.residual_scale;
        let scaled = |t: Tensor| -> Result<Tensor> {
            Ok(match residual_scale {
                Some(s) => (t * s)?,
                None => t,
            })
        };
        let shape = AttentionShape {
            layout: self.layout,
            scores: self.scores,
            clip_qkv: self.options.clip_qkv,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let attending = segments
                .iter()
                .zip(caches.iter_mut())
                .map(|(segment, cache)| segment.attention(layer, cache.layer(i)))
                .collect::<Result<_>>()?;
            let norms = &layer.norms;
            let normed = maybe(&norms.input, &x)?;
            let attn = layer.attention(&normed, &shape, attending, &packing, comm)?;
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
        let hidden: Vec<(Tensor, bool)> = packing
            .unpack(&x)?
            .into_iter()
            .zip(&segments)
            .map(|(h, segment)| (h, segment.last_only))
            .collect();
        apply_head_to_each(&self.head, &hidden, comm)?
            .into_iter()
            .map(|mut logits| {
                if let Some(scale) = self.options.logit_scale {
                    logits = (logits * scale)?;
                }
                if let Some(cap) = self.options.final_softcap {
                    logits = ((logits / cap)?.tanh()? * cap)?;
                }
                Ok(logits)
            })
            .collect()
    }
}

impl ShardedModel for Llama {
    fn forward(&mut self, input: &Batch, comm: &dyn Communicator) -> Result<Tensor> {
        self.run(&[*input], vec![None], comm)?
            .pop()
            .ok_or_else(|| Error::InvalidInput("the model returned no logits".into()))
    }

    fn forward_segments(
        &mut self,
        batches: &[Batch],
        caches: Vec<Option<&mut LayerCaches>>,
        comm: &dyn Communicator,
    ) -> Result<Vec<Tensor>> {
        self.run(batches, caches, comm)
    }

    fn caches(&mut self) -> Option<&mut LayerCaches> {
        Some(&mut self.caches)
    }
}
