//! The switches of the Llama-style decoder block that today's families turn (Llama 3, Qwen3,
//! Gemma 1–3, Phi-3, SmolLM3, OLMo 2, StableLM, Granite, StarCoder2, Cohere, and the mixtures
//! of experts): which norm and where, q/k norms and clipping, fused projections, multipliers,
//! soft-caps, and what each layer attends with. Each family is a short list of choices here, read from its `config.json` the way
//! transformers reads it.

use super::{MoeConfig, RawConfig};

/// How a decoder normalises its hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NormKind {
    /// RMSNorm times the weight (Llama).
    Rms,
    /// RMSNorm times `1 + weight` (Gemma).
    RmsOffset,
    /// LayerNorm with weight and bias (StableLM, StarCoder2).
    LayerNorm,
    /// LayerNorm with a weight only (Cohere).
    LayerNormNoBias,
}

/// Where a decoder block places its norms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NormPlacement {
    /// `input_layernorm` before attention, `post_attention_layernorm` before the MLP (Llama).
    Pre,
    /// Gemma 2/3: each sub-block between a norm before (`input_layernorm`,
    /// `pre_feedforward_layernorm`) and one after (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`).
    Sandwich,
    /// OLMo 2: no norm before; each sub-block's output normalised (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`) before its residual.
    Post,
    /// Cohere, StableLM with `use_parallel_residual`: attention and MLP side by side on one
    /// `input_layernorm`, both added to the residual.
    Parallel,
}

/// Normalisation of queries and keys before the rotary positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum QkNorm {
    /// Each head over its own width with one weight shared by every head (`q_norm`, `k_norm`
    /// of `[head_dim]`: Qwen3, Gemma 3), of the decoder's norm kind.
    SharedPerHead,
    /// Each head over its own width with a weight of its own: LayerNorm without bias
    /// (Cohere's `q_norm` of `[heads, head_dim]`, StableLM's `q_layernorm.norms.H`).
    OwnPerHead,
    /// RMSNorm over the whole projection, every head together (OLMo 2, OLMoE): under tensor
    /// parallelism its statistics need every rank's heads.
    WholeProjection,
}

/// The MLP of a decoder block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MlpKind {
    /// `down(act(gate(x)) * up(x))` with separate `gate_proj` and `up_proj`.
    Gated,
    /// The same with `gate_proj` and `up_proj` fused into `gate_up_proj` (Phi-3).
    FusedGated,
    /// `c_proj(act(c_fc(x)))` (StarCoder2).
    Plain,
}

/// Which rotary positions a layer applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LayerRope {
    /// The model's (global) rotary parameters.
    Full,
    /// The sliding layers' own parameters (Gemma 3's local base frequency).
    Sliding,
    /// No position information (SmolLM3's NoPE layers).
    None,
}

/// The resolved switches of a Llama-style decoder.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DecoderOptions {
    /// The norm kind of every norm of the model.
    pub norm: NormKind,
    /// Where each block normalises.
    pub placement: NormPlacement,
    /// How queries and keys are normalised, if at all.
    pub qk_norm: Option<QkNorm>,
    /// Queries, keys and values are clamped to `[-c, c]` after the q/k norms (OLMoE's
    /// `clip_qkv`).
    pub clip_qkv: Option<f64>,
    /// q, k and v fused into `qkv_proj` (Phi-3).
    pub fused_qkv: bool,
    /// The MLP's layout.
    pub mlp: MlpKind,
    /// Token embeddings are multiplied by this (Gemma: the square root of the width; Granite:
    /// `embedding_multiplier`).
    pub embedding_scale: Option<f64>,
    /// Attention scores are multiplied by this instead of `head_dim^-0.5` (Gemma 2/3:
    /// `query_pre_attn_scalar^-0.5`; Granite: `attention_multiplier`).
    pub attention_scale: Option<f64>,
    /// Each sub-block's output is multiplied by this before its residual (Granite).
    pub residual_scale: Option<f64>,
    /// Logits are multiplied by this (Cohere's `logit_scale`; Granite's `1 / logits_scaling`).
    pub logit_scale: Option<f64>,
    /// Attention scores become `cap * tanh(score / cap)` (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// Logits become `cap * tanh(logit / cap)` (Gemma 2).
    pub final_softcap: Option<f64>,
    /// Per layer, the rotary positions it applies.
    pub layer_rope: Vec<LayerRope>,
    /// The mixture of experts of the sparse layers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE);
    /// `None`: every MLP is dense.
    pub moe: Option<MoeConfig>,
}

/// Whether each layer of `layers` attends over a sliding window, from `layer_types` as
/// transformers 5 writes it (`sliding_attention` / `full_attention`), else as the family's
/// config class derives it.
fn sliding_layers(raw: &RawConfig, model_type: &str, layers: usize) -> Result<Vec<bool>, String> {
    if let Some(types) = &raw.layer_types {
        if types.len() != layers {
            return Err(format!(
                "layer_types lists {} layers but the model has {layers}",
                types.len()
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                other => Err(format!(
                    "layer_types holds `{other}`; only full_attention and sliding_attention are supported"
                )),
            })
            .collect();
    }
    for (field, value) in [
        ("sliding_window_pattern", raw.sliding_window_pattern),
        ("no_rope_layer_interval", raw.no_rope_layer_interval),
    ] {
        if value == Some(0) {
            return Err(format!("the field `{field}` must be positive, got 0"));
        }
    }
    let uses_window = raw.use_sliding_window != Some(false);
    Ok((0..layers)
        .map(|i| match model_type {
            "mistral" | "mixtral" | "starcoder2" | "phi3" => true,
            // Qwen3-MoE slides on every layer when `use_sliding_window`.
            "qwen3_moe" => raw.use_sliding_window == Some(true),
            // Qwen2-MoE's config class: the odd-numbered layers (from 1) below
            // `max_window_layers`.
            "qwen2_moe" => {
                raw.use_sliding_window == Some(true)
                    && i % 2 == 0
                    && i < raw.max_window_layers.unwrap_or(28)
            }
            "qwen2" | "qwen3" => {
                raw.use_sliding_window == Some(true) && i >= raw.max_window_layers.unwrap_or(0)
            }
            "gemma2" => i % 2 == 0,
            "gemma3_text" => !(i + 1).is_multiple_of(raw.sliding_window_pattern.unwrap_or(6)),
            "smollm3" => uses_window && raw.use_sliding_window == Some(true) && !rope_layer(raw, i),
            _ => false,
        })
        .collect())
}

/// SmolLM3: whether layer `i` applies rotary positions (`no_rope_layers[i]` is 1), by default
/// every layer but each `no_rope_layer_interval`-th.
fn rope_layer(raw: &RawConfig, i: usize) -> bool {
    match &raw.no_rope_layers {
        Some(flags) => flags.get(i).is_some_and(|&f| f != 0),
        None => !(i + 1).is_multiple_of(raw.no_rope_layer_interval.unwrap_or(4)),
    }
}

impl RawConfig {
    /// The per-layer attention windows of a Llama-style decoder: `sliding_window` on its
    /// sliding layers, `None` on the others.
    pub(super) fn decoder_windows(
        &self,
        model_type: &str,
        layers: usize,
    ) -> Result<Vec<Option<usize>>, String> {
        // Qwen2(-MoE), Qwen3(-MoE) and SmolLM3 ignore `sliding_window` unless
        // `use_sliding_window`.
        let window = match model_type {
            "qwen2" | "qwen2_moe" | "qwen3" | "qwen3_moe" | "smollm3"
                if self.use_sliding_window != Some(true) =>
            {
                None
            }
            // The default of Gemma 2's and 3's config classes.
            "gemma2" | "gemma3_text" => self.sliding_window.or(Some(4096)),
            _ => self.sliding_window,
        };
        let Some(window) = window else {
            return Ok(vec![None; layers]);
        };
        if window == 0 {
            return Err("the field `sliding_window` must be positive, got 0".into());
        }
        Ok(sliding_layers(self, model_type, layers)?
            .into_iter()
            .map(|sliding| sliding.then_some(window))
            .collect())
    }

    /// The decoder switches of `model_type` (a Llama-style family), with `hidden_size`,
    /// `intermediate_size` and `layers` resolved already.
    pub(super) fn decoder_options(
        &self,
        model_type: &str,
        hidden_size: usize,
        intermediate_size: usize,
        layers: usize,
    ) -> Result<DecoderOptions, String> {
        let gemma = matches!(model_type, "gemma" | "gemma2" | "gemma3_text");
        let norm = match model_type {
            _ if gemma => NormKind::RmsOffset,
            "stablelm" | "starcoder2" => NormKind::LayerNorm,
            "cohere" => NormKind::LayerNormNoBias,
            _ => NormKind::Rms,
        };
        let placement = match model_type {
            "gemma2" | "gemma3_text" => NormPlacement::Sandwich,
            "olmo2" => NormPlacement::Post,
            "cohere" => NormPlacement::Parallel,
            "stablelm" if self.use_parallel_residual == Some(true) => NormPlacement::Parallel,
            _ => NormPlacement::Pre,
        };
        let qk_norm = match model_type {
            "qwen3" | "qwen3_moe" | "gemma3_text" => Some(QkNorm::SharedPerHead),
            "olmo2" | "olmoe" => Some(QkNorm::WholeProjection),
            "cohere" if self.use_qk_norm == Some(true) => Some(QkNorm::OwnPerHead),
            "stablelm" if self.qk_layernorm == Some(true) => Some(QkNorm::OwnPerHead),
            _ => None,
        };
        let sliding = sliding_layers(self, model_type, layers)?;
        let layer_rope = (0..layers)
            .map(|i| match model_type {
                "smollm3" if !rope_layer(self, i) => LayerRope::None,
                "gemma3_text" if sliding[i] => LayerRope::Sliding,
                _ => LayerRope::Full,
            })
            .collect();
        let positive = |value: Option<f64>, field: &str| -> Result<Option<f64>, String> {
            match value {
                Some(v) if !(v.is_finite() && v > 0.0) => Err(format!(
                    "the field `{field}` must be a positive number, got {v}"
                )),
                v => Ok(v),
            }
        };
        let query_pre_attn_scalar = positive(self.query_pre_attn_scalar, "query_pre_attn_scalar")?;
        let attention_scale = match model_type {
            "gemma2" | "gemma3_text" => Some(query_pre_attn_scalar.unwrap_or(256.0).powf(-0.5)),
            "gemma" => None,
            "granite" => positive(self.attention_multiplier, "attention_multiplier")?,
            _ => None,
        };
        let logit_scale = match model_type {
            "cohere" => Some(positive(self.logit_scale, "logit_scale")?.unwrap_or(1.0)),
            "granite" => positive(self.logits_scaling, "logits_scaling")?.map(|s| 1.0 / s),
            _ => None,
        };
        let (attn_softcap, final_softcap) = match model_type {
            "gemma2" | "gemma3_text" => (
                positive(self.attn_logit_softcapping, "attn_logit_softcapping")?,
                positive(self.final_logit_softcapping, "final_logit_softcapping")?,
            ),
            _ => (None, None),
        };
        Ok(DecoderOptions {
            norm,
            placement,
            qk_norm,
            clip_qkv: match model_type {
                "olmoe" => positive(self.clip_qkv, "clip_qkv")?,
                _ => None,
            },
            fused_qkv: model_type == "phi3",
            mlp: match model_type {
                "phi3" => MlpKind::FusedGated,
                "starcoder2" => MlpKind::Plain,
                _ => MlpKind::Gated,
            },
            embedding_scale: match model_type {
                _ if gemma => Some((hidden_size as f64).sqrt()),
                "granite" => positive(self.embedding_multiplier, "embedding_multiplier")?,
                _ => None,
            },
            attention_scale,
            residual_scale: match model_type {
                "granite" => positive(self.residual_multiplier, "residual_multiplier")?,
                _ => None,
            },
            logit_scale,
            attn_softcap,
            final_softcap,
            layer_rope,
            moe: self.moe_config(model_type, intermediate_size, layers)?,
        })
    }
}

impl super::ModelConfig {
    /// The wiring's switches in words, one line per part (empty for the families without
    /// [`DecoderOptions`]); `inspect` prints them.
    pub fn wiring_summary(&self) -> Vec<String> {
        let Some(d) = &self.decoder else {
            return Vec::new();
        };
        let mut block = vec![format!("{:?} norms, {:?} placement", d.norm, d.placement)];
        block.extend(d.qk_norm.map(|q| format!("q/k norm {q:?}")));
        block.extend(d.clip_qkv.map(|c| format!("q/k/v clipped to [-{c}, {c}]")));
        block.extend(d.fused_qkv.then(|| "fused qkv_proj".to_string()));
        block.push(format!("{:?} MLP ({:?})", d.mlp, self.activation));
        if let Some(moe) = &d.moe {
            let sparse = moe.sparse_layers.iter().filter(|&&s| s).count();
            block.push(format!(
                "{} experts of width {}, top {}{} on {sparse} of {} layers",
                moe.experts,
                moe.intermediate_size,
                moe.top_k,
                if moe.renormalize { " renormalised" } else { "" },
                moe.sparse_layers.len()
            ));
            block.extend(moe.shared_expert.map(|width| {
                format!("a shared expert of width {width} gated by sigmoid(shared_expert_gate)")
            }));
        }
        let mut scales = Vec::new();
        let named = [
            ("embedding", d.embedding_scale),
            ("attention", d.attention_scale),
            ("residual", d.residual_scale),
            ("logits", d.logit_scale),
        ];
        for (what, value) in named {
            scales.extend(value.map(|v| format!("{what} x{v:.4}")));
        }
        for (what, value) in [("attention", d.attn_softcap), ("logits", d.final_softcap)] {
            scales.extend(value.map(|v| format!("{what} soft-cap {v}")));
        }
        let mut lines = vec![format!("block: {}", block.join(", "))];
        if !scales.is_empty() {
            lines.push(format!("scales: {}", scales.join(", ")));
        }
        if let Some(rope) = &self.rope {
            let dims = self.rotary_dim.unwrap_or(self.head_dim);
            let mut text = format!(
                "rotary: {} (theta {}) on {dims} of {} dims",
                rope.full.scaling.rope_type(),
                rope.full.theta,
                self.head_dim
            );
            if let Some(sliding) = &rope.sliding {
                text.push_str(&format!(
                    "; sliding layers {} (theta {})",
                    sliding.scaling.rope_type(),
                    sliding.theta
                ));
            }
            let nope: Vec<String> = (d.layer_rope.iter().enumerate())
                .filter(|(_, r)| **r == LayerRope::None)
                .map(|(i, _)| i.to_string())
                .collect();
            if !nope.is_empty() {
                text.push_str(&format!("; none on layers {}", nope.join(", ")));
            }
            lines.push(text);
        }
        let windows: Vec<String> = (self.attention_windows.iter().enumerate())
            .filter_map(|(i, w)| w.map(|w| format!("{i}:{w}")))
            .collect();
        if !windows.is_empty() {
            lines.push(format!(
                "sliding windows (layer:width): {}",
                windows.join(", ")
            ));
        }
        lines
    }
}
