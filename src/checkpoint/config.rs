//! `config.json` in two stages: [`RawConfig`], a serde mirror of what transformers 4.x and 5.x
//! write (every field optional, several spellings), and [`ModelConfig`], the resolved values the
//! model code uses. All defaults and family-specific spellings are decided here, once.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

mod decoder;
mod moe;
pub mod rope;
mod seq2seq;
pub use decoder::{DecoderOptions, LayerRope, MlpKind, NormKind, NormPlacement, QkNorm};
pub use moe::{ExpertNames, MoeConfig};
pub use rope::{RopeConfig, RopeConfigs, RopeScaling};
pub use seq2seq::{RelativeBuckets, Seq2SeqConfig};

/// The block wiring a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// GPT-2: learned positions, LayerNorm, fused `c_attn`, `Conv1D` layout.
    Gpt2,
    /// Llama, Mistral, Qwen2: RMSNorm, rotary positions, SwiGLU, grouped-query attention.
    Llama,
    /// BERT: bidirectional encoder with post-LayerNorm.
    Bert,
    /// Phi, GPT-J: attention and MLP in parallel on one LayerNorm, partial rotary positions.
    Phi,
    /// BART: an encoder and a decoder of post-LayerNorm blocks, learned positions.
    Bart,
    /// T5: an encoder and a decoder of pre-RMSNorm blocks, relative position buckets.
    T5,
}

/// What the model returns from a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OutputKind {
    /// Vocabulary logits from a language-modelling head, `[B, L, V]`.
    Logits,
    /// The encoder's last hidden state, `[B, L, H]`.
    LastHiddenState,
}

/// The layout of a fused `query_key_value` projection's output rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FusedQkv {
    /// Head by head, each head's query, key and value rows together (GPT-NeoX, BLOOM, Falcon
    /// without multi-query attention).
    PerHead,
    /// By key/value group: the group's query heads, then its key, then its value (Falcon's new
    /// architecture; multi-query Falcon-7B is one group).
    Grouped,
}

/// Activation functions of the MLP blocks, named as transformers names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Activation {
    /// `gelu`: the exact, erf-based GELU.
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `silu` / `swish`.
    Silu,
    /// `relu`.
    Relu,
}

impl Activation {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "silu" | "swish" => Some(Activation::Silu),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }
}

/// One or several token ids, as `eos_token_id` may be written.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![id],
            TokenIds::Many(ids) => ids,
        }
    }
}

/// Other spellings of the fields of [`RawConfig`], canonical name first: GPT-2's, BERT's,
/// Falcon's, StarCoder2's, T5's. A file may carry a field under several of them (transformers
/// 5 writes Falcon's `num_kv_heads` beside `num_key_value_heads`); the canonical one is read,
/// else the first other spelling present, as transformers' attribute maps do.
const ALIASES: &[(&str, &[&str])] = &[
    ("hidden_size", &["n_embd", "dim"]),
    ("num_hidden_layers", &["n_layer", "n_layers", "num_layers"]),
    ("num_attention_heads", &["n_head", "n_heads", "num_heads"]),
    ("num_key_value_heads", &["num_kv_heads"]),
    ("num_local_experts", &["num_experts"]),
    (
        "intermediate_size",
        &["n_inner", "hidden_dim", "ffn_dim", "ffn_hidden_size"],
    ),
    ("max_position_embeddings", &["n_positions"]),
    (
        "norm_eps",
        &["layer_norm_epsilon", "layer_norm_eps", "norm_epsilon"],
    ),
    ("hidden_act", &["activation_function", "activation"]),
    ("rope_theta", &["rotary_emb_base"]),
    ("partial_rotary_factor", &["rotary_pct"]),
];

/// The deepest model a configuration may describe: per-layer settings are resolved before any
/// tensor is read, so an absurd layer count from an untrusted file must be an error, not an
/// allocation of its size (found by the `gguf_reader` fuzz target). The deepest models known
/// have a few hundred layers.
const MAX_LAYERS: usize = 1 << 16;

/// A serde mirror of `config.json`: every field optional; other spellings are mapped to these
/// names by [`RawConfig::from_value`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    norm_eps: Option<f64>,
    rms_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    rope_local_base_freq: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    eos_token_id: Option<TokenIds>,
    bos_token_id: Option<u32>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    type_vocab_size: Option<usize>,
    pad_token_id: Option<u32>,
    embedding_size: Option<usize>,
    num_hidden_groups: Option<usize>,
    inner_group_num: Option<usize>,
    multi_query: Option<bool>,
    do_layer_norm_before: Option<bool>,
    word_embed_proj_dim: Option<usize>,
    enable_bias: Option<bool>,
    attention_layers: Option<Vec<String>>,
    window_size: Option<usize>,
    partial_rotary_factor: Option<f64>,
    rotary_dim: Option<usize>,
    qk_layernorm: Option<bool>,
    use_parallel_residual: Option<bool>,
    new_decoder_architecture: Option<bool>,
    parallel_attn: Option<bool>,
    num_ln_in_parallel_attn: Option<usize>,
    bias: Option<bool>,
    alibi: Option<bool>,
    // The switches of today's Llama-style decoders; see `decoder.rs`.
    hidden_activation: Option<String>,
    layer_types: Option<Vec<String>>,
    max_window_layers: Option<usize>,
    sliding_window_pattern: Option<usize>,
    no_rope_layers: Option<Vec<u32>>,
    no_rope_layer_interval: Option<usize>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    embedding_multiplier: Option<f64>,
    attention_multiplier: Option<f64>,
    residual_multiplier: Option<f64>,
    logits_scaling: Option<f64>,
    logit_scale: Option<f64>,
    use_qk_norm: Option<bool>,
    use_bias: Option<bool>,
    use_qkv_bias: Option<bool>,
    qkv_bias: Option<bool>,
    clip_qkv: Option<f64>,
    // Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE); see `moe.rs`.
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    shared_expert_intermediate_size: Option<usize>,
    // Encoder–decoders (BART, T5); see `seq2seq.rs`.
    d_model: Option<usize>,
    d_kv: Option<usize>,
    d_ff: Option<usize>,
    encoder_layers: Option<usize>,
    decoder_layers: Option<usize>,
    num_decoder_layers: Option<usize>,
    encoder_attention_heads: Option<usize>,
    decoder_attention_heads: Option<usize>,
    encoder_ffn_dim: Option<usize>,
    decoder_ffn_dim: Option<usize>,
    feed_forward_proj: Option<String>,
    relative_attention_num_buckets: Option<usize>,
    relative_attention_max_distance: Option<usize>,
    scale_embedding: Option<bool>,
    normalize_before: Option<bool>,
    add_final_layer_norm: Option<bool>,
    decoder_start_token_id: Option<u32>,
    scale_decoder_outputs: Option<bool>,
}

/// The resolved configuration the model code uses: no `Option` where a default exists.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// Which block wiring to use.
    pub family: Family,
    /// The transformers class that selected the family (`architectures[0]`).
    pub architecture: String,
    /// `model_type` from the file.
    pub model_type: String,
    /// What `forward` returns.
    pub output: OutputKind,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (equal to `num_heads` without grouped-query attention).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Longest sequence of learned positions (GPT-2, BERT), or the nominal context (rotary).
    pub max_positions: usize,
    /// Epsilon of the normalisation layers.
    pub norm_eps: f64,
    /// The MLP activation.
    pub activation: Activation,
    /// Rotary parameters (base frequency and scaling), for rotary families.
    pub rope: Option<RopeConfigs>,
    /// Whether the LM head shares the word-embedding matrix; `None` means "decide from the
    /// checkpoint" (tied when it holds no separate head).
    pub tie_word_embeddings: Option<bool>,
    /// End-of-sequence ids.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
    /// Whether q/k/v projections carry biases (Qwen2, `attention_bias`).
    pub qkv_bias: bool,
    /// Whether the attention output projection carries a bias.
    pub attn_out_bias: bool,
    /// Whether the MLP projections carry biases.
    pub mlp_bias: bool,
    /// Number of token types (BERT).
    pub type_vocab_size: usize,
    /// RoBERTa's positions: each token that is not this padding id takes the next position
    /// after it, padding tokens take the padding id itself. `None`: positions `0..L`.
    pub padding_positions: Option<u32>,
    /// Width of factorized word embeddings (ELECTRA, ALBERT), projected to `hidden_size`
    /// after the embedding LayerNorm; `None`: as wide as the hidden state.
    pub embedding_size: Option<usize>,
    /// Per layer, the attention window of its sliding layers (`None`: global): GPT-Neo's local
    /// layers, and the sliding layers of the Llama-style decoders (Mistral, Qwen2/3, Gemma 2/3,
    /// Phi-3, SmolLM3, StarCoder2); empty for the other families.
    pub attention_windows: Vec<Option<usize>>,
    /// Rotary positions on the first `rotary_dim` dimensions of each head only (Phi, GPT-J);
    /// `None`: the whole head.
    pub rotary_dim: Option<usize>,
    /// Rotary pairs are adjacent dimensions (GPT-J's `rotate_every_two`), not the two halves.
    pub rotary_interleaved: bool,
    /// GPT-NeoX without `use_parallel_residual`: the MLP follows the attention instead of
    /// running beside it.
    pub sequential_residual: bool,
    /// BLOOM's ALiBi: no position embedding; each head adds its slope times the key's position
    /// to its attention scores.
    pub alibi: bool,
    /// How a fused `query_key_value` projection is laid out (GPT-NeoX, BLOOM, Falcon); `None`:
    /// separate q, k and v.
    pub fused_qkv: Option<FusedQkv>,
    /// The MLP reads a LayerNorm of its own (`post_attention_layernorm`, Falcon's `ln_mlp`),
    /// not the attention's (Phi, GPT-J, Falcon-7B).
    pub separate_mlp_norm: bool,
    /// The decoder and its inputs of an encoder–decoder (BART, T5); `None` for the others.
    pub seq2seq: Option<Seq2SeqConfig>,
    /// The switches of a Llama-style decoder; `None` for the other families.
    pub decoder: Option<DecoderOptions>,
}

impl ModelConfig {
    /// Reads and resolves `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
        RawConfig::from_value(value)
            .and_then(RawConfig::resolve)
            .map_err(|message| Error::config(path, message))
    }

    /// The longest sequence generation may reach: the learned or nominal context, without
    /// limit under dynamic NTK scaling, whose rotary frequencies grow with the sequence
    /// (transformers' purpose for it).
    pub fn generation_context(&self) -> usize {
        let dynamic = self
            .rope
            .as_ref()
            .is_some_and(|r| matches!(r.full.scaling, RopeScaling::Dynamic { .. }));
        match dynamic {
            true => usize::MAX,
            false => self.max_positions,
        }
    }

    /// The hidden width of one expert of a mixture of experts; the MLP's for dense models.
    pub fn expert_width(&self) -> usize {
        let moe = self.decoder.as_ref().and_then(|d| d.moe.as_ref());
        moe.map_or(self.intermediate_size, |m| m.intermediate_size)
    }

    /// The number of experts of each sparse layer of a mixture of experts; 0 for dense models.
    pub fn expert_count(&self) -> usize {
        let moe = self.decoder.as_ref().and_then(|d| d.moe.as_ref());
        moe.map_or(0, |m| m.experts)
    }

    /// The hidden width of a mixture of experts' shared expert (Qwen2-MoE); the MLP's for
    /// models without one.
    pub fn shared_expert_width(&self) -> usize {
        let moe = self.decoder.as_ref().and_then(|d| d.moe.as_ref());
        moe.and_then(|m| m.shared_expert)
            .unwrap_or(self.intermediate_size)
    }

    /// Whether the model generates text (has a causal LM head).
    pub fn is_causal(&self) -> bool {
        self.family != Family::Bert
    }
}

/// Maps `architectures[0]` (or `model_type`) to a family and an output kind.
fn family_of(
    model_type: &str,
    architecture: &str,
) -> std::result::Result<(Family, OutputKind), String> {
    let family = match model_type {
        "gpt2" | "gpt_bigcode" | "opt" | "gpt_neo" => Family::Gpt2,
        "llama" | "mistral" | "mixtral" | "qwen2" | "qwen2_moe" | "qwen3" | "qwen3_moe" | "gemma"
        | "gemma2" | "gemma3_text" | "phi3" | "smollm3" | "olmo2" | "olmoe" | "stablelm"
        | "granite" | "starcoder2" | "cohere" => Family::Llama,
        "gemma3" => {
            return Err("model_type `gemma3` is Gemma 3's image-and-text model; its text decoder alone (Gemma3ForCausalLM, model_type gemma3_text) is supported".into())
        }
        "bert" | "roberta" | "distilbert" | "electra" | "albert" => Family::Bert,
        "phi" | "gptj" | "gpt_neox" | "bloom" | "falcon" => Family::Phi,
        "bart" => Family::Bart,
        "t5" => Family::T5,
        other => {
            return Err(format!(
            "model_type `{other}` is not supported (supported: gpt2, gpt_bigcode, opt, gpt_neo, llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe, gemma, gemma2, gemma3_text, phi3, smollm3, olmo2, olmoe, stablelm, granite, starcoder2, cohere, phi, gptj, gpt_neox, bloom, falcon, bert, roberta, distilbert, electra, albert, bart, t5); a model whose blocks follow one of these can run with a policy file (--policy; see the README's \"Policy files\")"
        ))
        }
    };
    let output = match (family, architecture) {
        (Family::Bert, "BertForMaskedLM") => OutputKind::Logits,
        (
            Family::Bert,
            "BertModel" | "RobertaModel" | "DistilBertModel" | "ElectraModel" | "AlbertModel" | "",
        ) => OutputKind::LastHiddenState,
        (Family::Bert, other) => {
            return Err(format!(
                "architecture `{other}` is not supported for {model_type} (supported: BertModel, BertForMaskedLM, RobertaModel, DistilBertModel, ElectraModel, AlbertModel)"
            ))
        }
        (
            Family::Bart | Family::T5,
            "BartForConditionalGeneration" | "T5ForConditionalGeneration" | "",
        ) => OutputKind::Logits,
        (Family::Bart | Family::T5, other) => {
            return Err(format!(
                "architecture `{other}` is not supported for {model_type} (supported: BartForConditionalGeneration, T5ForConditionalGeneration)"
            ))
        }
        _ => OutputKind::Logits,
    };
    Ok((family, output))
}

impl RawConfig {
    /// Reads a parsed `config.json`, each field under its canonical name or one of its other
    /// spellings ([`ALIASES`]); unknown fields are ignored. The error names a field whose value
    /// has the wrong type.
    pub fn from_value(mut value: serde_json::Value) -> std::result::Result<Self, String> {
        let fields = value
            .as_object_mut()
            .ok_or("the configuration is not a JSON object")?;
        for (canonical, others) in ALIASES {
            let spelled: Vec<_> = others
                .iter()
                .filter_map(|name| fields.remove(*name))
                .collect();
            let canonical_value = fields.remove(*canonical);
            if let Some(v) = canonical_value.or(spelled.into_iter().next()) {
                fields.insert(canonical.to_string(), v);
            }
        }
        RawConfig::deserialize(&value).map_err(|e| {
            // serde_json's message does not say which field: find it by reading each alone.
            let alone = |(name, v): (&String, &serde_json::Value)| {
                let one =
                    serde_json::Value::Object([(name.clone(), v.clone())].into_iter().collect());
                RawConfig::deserialize(&one)
                    .is_err()
                    .then(|| format!("the field `{name}`: {e}"))
            };
            let fields = value.as_object().into_iter().flatten();
            fields
                .filter_map(alone)
                .next()
                .unwrap_or_else(|| e.to_string())
        })
    }

    /// Resolves defaults and spellings into a [`ModelConfig`]; the error names the field.
    pub fn resolve(mut self) -> std::result::Result<ModelConfig, String> {
        let seq2seq = self.resolve_seq2seq()?;
        let model_type = self
            .model_type
            .clone()
            .ok_or("the field `model_type` is missing")?;
        let architecture = self
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .unwrap_or_default();
        let (family, output) = family_of(&model_type, &architecture)?;
        let required = |value: Option<usize>, field: &str| -> std::result::Result<usize, String> {
            match value {
                Some(0) => Err(format!("the field `{field}` must be positive, got 0")),
                Some(v) => Ok(v),
                None => Err(format!("the field `{field}` is missing")),
            }
        };
        let vocab_size = required(self.vocab_size, "vocab_size")?;
        let hidden_size = required(self.hidden_size, "hidden_size")?;
        let num_layers = required(self.num_hidden_layers, "num_hidden_layers")?;
        if num_layers > MAX_LAYERS {
            return Err(format!(
                "the field `num_hidden_layers` ({num_layers}) is beyond any model's depth (at most {MAX_LAYERS})"
            ));
        }
        let num_heads = required(self.num_attention_heads, "num_attention_heads")?;
        let multi_query = model_type == "gpt_bigcode" && self.multi_query != Some(false);
        let num_kv_heads = required(
            self.falcon_kv_heads(&model_type, num_heads)
                .or(self.num_key_value_heads)
                .or(Some(if multi_query { 1 } else { num_heads })),
            "num_key_value_heads",
        )?;
        self.check_opt_layout(&model_type, hidden_size)?;
        let attention_windows = match family {
            Family::Llama => self.decoder_windows(&model_type, num_layers)?,
            _ => self.gpt_neo_windows(&model_type, num_layers)?,
        };
        if num_heads % num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => required(Some(d), "head_dim")?,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(format!(
                    "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_heads})"
                ))
            }
        };
        let intermediate_size = match (family, self.intermediate_size) {
            (Family::Gpt2 | Family::Phi, None) => hidden_size.checked_mul(4).ok_or_else(|| {
                format!("hidden_size ({hidden_size}) is too large: 4 x hidden_size, the default intermediate_size, overflows")
            })?,
            (_, v) => required(v, "intermediate_size")?,
        };
        let default_act = match family {
            Family::Gpt2 | Family::Phi => "gelu_new",
            Family::Llama => "silu",
            Family::Bert | Family::Bart => "gelu",
            Family::T5 => "relu",
        };
        let act_name = match model_type.as_str() {
            // Gemma 2 and 3 read `hidden_activation`; Gemma's legacy `gelu` means the tanh one.
            "gemma2" | "gemma3_text" => self
                .hidden_activation
                .as_deref()
                .unwrap_or("gelu_pytorch_tanh"),
            "gemma" | "starcoder2" => match self.hidden_act.as_deref() {
                None | Some("gelu") => "gelu_pytorch_tanh",
                Some(name) => name,
            },
            _ => self.hidden_act.as_deref().unwrap_or(default_act),
        };
        let activation = Activation::from_name(act_name)
            .ok_or_else(|| format!("hidden_act `{act_name}` is not supported"))?;
        let norm_eps = match family {
            Family::Llama => self.rms_norm_eps.or(self.norm_eps).unwrap_or(1e-6),
            Family::Gpt2 | Family::Phi => self.norm_eps.unwrap_or(1e-5),
            Family::Bert => self.norm_eps.unwrap_or(1e-12),
            // BART's LayerNorms are torch's defaults.
            Family::Bart => 1e-5,
            Family::T5 => self.norm_eps.unwrap_or(1e-6),
        };
        let rope = if matches!(family, Family::Llama | Family::Phi) {
            Some(self.rope_configs(&model_type)?)
        } else {
            None
        };
        let max_positions = self.max_position_embeddings.unwrap_or(match family {
            Family::Gpt2 => 1024,
            Family::Phi => 2048,
            Family::Bert | Family::T5 => 512,
            Family::Bart => 1024,
            Family::Llama => 4096,
        });
        let rotary_dim = self.rotary_dim_of(&model_type, head_dim)?;
        let rotary_interleaved = matches!(model_type.as_str(), "gptj" | "cohere");
        let alibi = model_type == "bloom";
        let old_falcon = model_type == "falcon" && self.new_decoder_architecture != Some(true);
        let sequential_residual = alibi
            || (model_type == "gpt_neox" && self.use_parallel_residual == Some(false))
            || (old_falcon && self.parallel_attn == Some(false));
        let fused_qkv = match model_type.as_str() {
            "gpt_neox" | "bloom" => Some(FusedQkv::PerHead),
            "falcon" if old_falcon && self.multi_query == Some(false) => Some(FusedQkv::PerHead),
            "falcon" => Some(FusedQkv::Grouped),
            _ => None,
        };
        let separate_mlp_norm = match model_type.as_str() {
            "gpt_neox" | "bloom" => true,
            "falcon" if old_falcon => sequential_residual,
            "falcon" => self.num_ln_in_parallel_attn.unwrap_or(2) == 2,
            _ => false,
        };
        let attention_bias = self.attention_bias.unwrap_or(false);
        let attn_out_bias = match model_type.as_str() {
            "falcon" => self.bias.unwrap_or(false),
            "t5" => false,
            "gptj" | "stablelm" => false,
            "starcoder2" => self.use_bias.unwrap_or(true),
            _ => family != Family::Llama || attention_bias,
        };
        let mlp_bias = match model_type.as_str() {
            "falcon" => self.bias.unwrap_or(false),
            "t5" => false,
            "starcoder2" => self.use_bias.unwrap_or(true),
            _ => family != Family::Llama || self.mlp_bias.unwrap_or(false),
        };
        if model_type == "falcon" && self.alibi == Some(true) {
            return Err(
                "Falcon with ALiBi (alibi = true, Falcon-RW) is not supported; rotary Falcon is"
                    .into(),
            );
        }
        if model_type == "falcon" && !old_falcon && self.parallel_attn == Some(false) {
            return Err(
                "Falcon's new decoder architecture with parallel_attn = false is not supported"
                    .into(),
            );
        }
        let is_qwen2 = model_type == "qwen2";
        let decoder = match family {
            Family::Llama => Some(self.decoder_options(
                &model_type,
                hidden_size,
                intermediate_size,
                num_layers,
            )?),
            _ => None,
        };
        let qkv_bias = match model_type.as_str() {
            "gpt_neo" | "gptj" => false,
            "falcon" => self.bias.unwrap_or(false),
            "opt" => self.enable_bias.unwrap_or(true),
            "stablelm" => self.use_qkv_bias.unwrap_or(false),
            "starcoder2" => self.use_bias.unwrap_or(true),
            "qwen2_moe" => self.qkv_bias.unwrap_or(true),
            _ => !matches!(family, Family::Llama | Family::T5) || is_qwen2 || attention_bias,
        };
        if let Some(groups) = [self.num_hidden_groups, self.inner_group_num]
            .into_iter()
            .flatten()
            .find(|&g| g != 1)
        {
            return Err(format!(
                "ALBERT with {groups} layer groups or layers per group is not supported (only one layer shared by every block: num_hidden_groups = inner_group_num = 1)"
            ));
        }
        let padding_positions = match model_type.as_str() {
            "roberta" => Some(self.pad_token_id.unwrap_or(1)),
            _ => None,
        };
        check_matrix_sizes(&[
            ("num_attention_heads", num_heads, "head_dim", head_dim),
            ("num_key_value_heads", num_kv_heads, "head_dim", head_dim),
            ("vocab_size", vocab_size, "hidden_size", hidden_size),
            (
                "intermediate_size",
                intermediate_size,
                "hidden_size",
                hidden_size,
            ),
            (
                "max_position_embeddings",
                max_positions,
                "hidden_size",
                hidden_size,
            ),
            (
                "num_attention_heads x head_dim",
                num_heads.saturating_mul(head_dim),
                "hidden_size",
                hidden_size,
            ),
        ])?;
        Ok(ModelConfig {
            family,
            architecture,
            model_type,
            output,
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            max_positions,
            norm_eps,
            activation,
            rope,
            tie_word_embeddings: self.tie_word_embeddings,
            eos_token_ids: self
                .eos_token_id
                .map(TokenIds::into_vec)
                .unwrap_or_default(),
            bos_token_id: self.bos_token_id,
            qkv_bias,
            attn_out_bias,
            mlp_bias,
            type_vocab_size: self.type_vocab_size.unwrap_or(2),
            padding_positions,
            embedding_size: self.embedding_size.filter(|&e| e != hidden_size),
            attention_windows,
            rotary_dim,
            rotary_interleaved,
            sequential_residual,
            alibi,
            fused_qkv,
            separate_mlp_norm,
            seq2seq,
            decoder,
        })
    }

    /// The rotary parameters in either layout; Gemma 3's sliding layers have their own (base
    /// 10,000 unless the file says otherwise), its global layers a base of 1,000,000.
    fn rope_configs(&self, model_type: &str) -> std::result::Result<RopeConfigs, String> {
        let gemma3 = model_type == "gemma3_text";
        // Phi-3's config class reads the `su` and `yarn` of its first releases as `longrope`.
        let phi3_legacy = |value: Option<&serde_json::Value>| {
            let mut value = value.cloned();
            if let Some(fields) = value.as_mut().and_then(|v| v.as_object_mut()) {
                let kind = fields.get("rope_type").or(fields.get("type"));
                if kind
                    .and_then(|k| k.as_str())
                    .is_some_and(|k| k == "su" || k == "yarn")
                {
                    fields.remove("type");
                    fields.insert("rope_type".into(), "longrope".into());
                }
            }
            value
        };
        let (rope_parameters, rope_scaling) = match model_type {
            "phi3" => (
                phi3_legacy(self.rope_parameters.as_ref()),
                phi3_legacy(self.rope_scaling.as_ref()),
            ),
            _ => (self.rope_parameters.clone(), self.rope_scaling.clone()),
        };
        let mut configs = rope::resolve_rope(&rope::RopeInput {
            rope_parameters: rope_parameters.as_ref(),
            rope_scaling: rope_scaling.as_ref(),
            rope_theta: self.rope_theta,
            rope_local_base_freq: self.rope_local_base_freq,
            max_position_embeddings: self.max_position_embeddings,
            original_max_position_embeddings: self.original_max_position_embeddings,
            default_theta: if gemma3 { 1_000_000.0 } else { 10_000.0 },
        })?;
        if gemma3 && configs.sliding.is_none() {
            configs.sliding = Some(RopeConfig {
                theta: self.rope_local_base_freq.unwrap_or(10_000.0),
                scaling: RopeScaling::None,
            });
        }
        Ok(configs)
    }

    /// The rotary width of Phi (`partial_rotary_factor` of the head) and GPT-J (`rotary_dim`).
    fn rotary_dim_of(
        &self,
        model_type: &str,
        head_dim: usize,
    ) -> std::result::Result<Option<usize>, String> {
        if model_type == "phi" && self.qk_layernorm == Some(true) {
            return Err("Phi with qk_layernorm is not supported".into());
        }
        let dim = match model_type {
            "phi" | "gpt_neox" | "phi3" | "stablelm" => {
                let default = match model_type {
                    "phi3" => 1.0,
                    "stablelm" => 0.25,
                    _ => 0.5,
                };
                let factor = rope::partial_rotary_factor(self.rope_parameters.as_ref())
                    .or(self.partial_rotary_factor)
                    .unwrap_or(default);
                (head_dim as f64 * factor) as usize
            }
            "gptj" => self.rotary_dim.unwrap_or(head_dim),
            _ => return Ok(None),
        };
        if dim == 0 || dim > head_dim || dim % 2 != 0 {
            return Err(format!(
                "the rotary width {dim} must be even and between 2 and the head width {head_dim}"
            ));
        }
        Ok(Some(dim))
    }

    /// Falcon's key/value heads when its architecture decides them: one for the original
    /// multi-query architecture (Falcon-7B, the default), every head without multi-query;
    /// `num_kv_heads` for the new architecture.
    fn falcon_kv_heads(&self, model_type: &str, heads: usize) -> Option<usize> {
        match (model_type, self.new_decoder_architecture, self.multi_query) {
            ("falcon", Some(true), _) => None,
            ("falcon", _, Some(false)) => Some(heads),
            ("falcon", _, _) => Some(1),
            _ => None,
        }
    }

    /// Refuses the OPT variants whose layout differs from the GPT-2 wiring (post-LayerNorm
    /// blocks, a projected word embedding).
    fn check_opt_layout(&self, model_type: &str, hidden: usize) -> std::result::Result<(), String> {
        if model_type != "opt" {
            return Ok(());
        }
        if self.do_layer_norm_before == Some(false) {
            return Err("OPT with do_layer_norm_before = false is not supported".into());
        }
        match self.word_embed_proj_dim {
            Some(width) if width != hidden => Err(format!(
                "OPT with word_embed_proj_dim ({width}) different from hidden_size ({hidden}) is not supported"
            )),
            _ => Ok(()),
        }
    }

    /// GPT-Neo's per-layer windows from `attention_layers` ("global" or "local").
    fn gpt_neo_windows(
        &self,
        model_type: &str,
        layers: usize,
    ) -> std::result::Result<Vec<Option<usize>>, String> {
        if model_type != "gpt_neo" {
            return Ok(Vec::new());
        }
        let kinds = self.attention_layers.clone().unwrap_or_default();
        if kinds.len() != layers {
            return Err(format!(
                "attention_layers lists {} layers but the model has {layers}",
                kinds.len()
            ));
        }
        let window = self.window_size.unwrap_or(256);
        kinds
            .iter()
            .map(|kind| match kind.as_str() {
                "global" => Ok(None),
                "local" => Ok(Some(window)),
                other => Err(format!(
                    "attention_layers holds `{other}`; only global and local are known"
                )),
            })
            .collect()
    }
}

/// Refuses sizes whose products the model code computes (projection widths, weight element
/// counts, bytes at up to 8 per element) but which would overflow: such a `config.json` is
/// corrupt, and must be an error naming the fields rather than an arithmetic overflow later.
fn check_matrix_sizes(pairs: &[(&str, usize, &str, usize)]) -> std::result::Result<(), String> {
    for &(a_field, a, b_field, b) in pairs {
        if a.checked_mul(b).and_then(|n| n.checked_mul(8)).is_none() {
            return Err(format!(
                "{a_field} ({a}) x {b_field} ({b}) is too large: the weights it describes would overflow"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(json: &str) -> std::result::Result<ModelConfig, String> {
        RawConfig::from_value(serde_json::from_str(json).unwrap())?.resolve()
    }

    const LLAMA_4X: &str = r#"{"model_type":"llama","architectures":["LlamaForCausalLM"],
        "vocab_size":100,"hidden_size":64,"num_hidden_layers":2,"num_attention_heads":8,
        "num_key_value_heads":4,"intermediate_size":96,"rms_norm_eps":1e-5,"rope_theta":500000.0,
        "rope_scaling":null,"eos_token_id":[1,2]}"#;

    #[test]
    fn falcon_s_architectures_resolve_their_heads_norms_and_fused_layout() {
        let falcon = |extra: &str| {
            resolve(&format!(
                r#"{{"model_type":"falcon","vocab_size":97,"hidden_size":64,
                "num_attention_heads":4,"num_hidden_layers":2,"num_kv_heads":2{extra}}}"#
            ))
        };
        let layout = |c: &ModelConfig| {
            (
                c.num_kv_heads,
                c.fused_qkv,
                c.separate_mlp_norm,
                c.sequential_residual,
            )
        };
        let new = falcon(r#","new_decoder_architecture":true"#).unwrap();
        assert_eq!(layout(&new), (2, Some(FusedQkv::Grouped), true, false));
        let shared_norm =
            falcon(r#","new_decoder_architecture":true,"num_ln_in_parallel_attn":1"#).unwrap();
        assert_eq!(
            layout(&shared_norm),
            (2, Some(FusedQkv::Grouped), false, false)
        );
        // Falcon-7B: the original architecture's defaults (multi-query, parallel attention).
        let seven_b = falcon("").unwrap();
        assert_eq!(layout(&seven_b), (1, Some(FusedQkv::Grouped), false, false));
        let sequential = falcon(r#","multi_query":false,"parallel_attn":false"#).unwrap();
        assert_eq!(
            layout(&sequential),
            (4, Some(FusedQkv::PerHead), true, true)
        );
        assert!(falcon(r#","alibi":true"#).unwrap_err().contains("ALiBi"));
    }

    /// transformers 5.25 writes Falcon's key/value heads under both names; the file is read
    /// the way transformers reads it, the canonical name first, not refused as a duplicate.
    #[test]
    fn a_field_written_under_two_names_is_read_by_its_canonical_name() {
        let written_by_5_25 = r#"{"model_type":"falcon","architectures":["FalconForCausalLM"],
            "vocab_size":97,"hidden_size":64,"num_attention_heads":4,"num_hidden_layers":2,
            "new_decoder_architecture":true,"num_key_value_heads":2,"num_kv_heads":2,
            "rope_parameters":{"rope_theta":10000.0,"rope_type":"default"},
            "a_field_from_the_future":{"nested":[1,2]}}"#;
        assert_eq!(resolve(written_by_5_25).unwrap().num_kv_heads, 2);
        let disagreeing = written_by_5_25.replace(r#""num_kv_heads":2"#, r#""num_kv_heads":4"#);
        assert_eq!(resolve(&disagreeing).unwrap().num_kv_heads, 2);
        let alias_only = written_by_5_25.replace(r#""num_key_value_heads":2,"#, "");
        assert_eq!(resolve(&alias_only).unwrap().num_kv_heads, 2);
        let wrong_type = written_by_5_25.replace(
            r#""num_key_value_heads":2"#,
            r#""num_key_value_heads":"two""#,
        );
        let err = resolve(&wrong_type).unwrap_err();
        assert!(
            err.contains("invalid type") && err.contains("`num_key_value_heads`"),
            "{err}"
        );
    }

    #[test]
    fn todays_families_resolve_their_switches_from_the_config() {
        let gemma2 = ModelConfig::from_file(&fixture_config("gemma2")).unwrap();
        let d = gemma2.decoder.as_ref().unwrap();
        assert_eq!(
            (d.norm, d.placement, d.attn_softcap, d.final_softcap),
            (
                NormKind::RmsOffset,
                NormPlacement::Sandwich,
                Some(2.0),
                Some(5.0)
            )
        );
        assert_eq!(gemma2.attention_windows, vec![Some(4), None, Some(4)]);
        assert_eq!(d.attention_scale, Some(24f64.powf(-0.5)));
        let gemma3 = ModelConfig::from_file(&fixture_config("gemma3")).unwrap();
        let rope = gemma3.rope.as_ref().unwrap();
        assert_eq!(rope.sliding.as_ref().map(|r| r.theta), Some(10_000.0));
        assert_eq!(
            gemma3.decoder.as_ref().unwrap().layer_rope,
            vec![LayerRope::Sliding, LayerRope::Full, LayerRope::Sliding]
        );
        let smollm3 = ModelConfig::from_file(&fixture_config("smollm3")).unwrap();
        assert_eq!(
            smollm3.decoder.unwrap().layer_rope,
            vec![
                LayerRope::Full,
                LayerRope::None,
                LayerRope::Full,
                LayerRope::None
            ]
        );
        let qwen3 = ModelConfig::from_file(&fixture_config("qwen3")).unwrap();
        assert_eq!(
            (qwen3.head_dim, qwen3.attention_windows.clone()),
            (24, vec![None, Some(4), Some(4)])
        );
        let phi3 = ModelConfig::from_file(&fixture_config("phi3")).unwrap();
        assert_eq!(phi3.rotary_dim, Some(12));
        assert_eq!(phi3.decoder.unwrap().mlp, MlpKind::FusedGated);
        let cohere = ModelConfig::from_file(&fixture_config("cohere")).unwrap();
        assert!(cohere.rotary_interleaved);
        assert_eq!(cohere.decoder.unwrap().qk_norm, Some(QkNorm::OwnPerHead));
        let gemma3_multimodal = resolve(r#"{"model_type":"gemma3"}"#).unwrap_err();
        assert!(
            gemma3_multimodal.contains("gemma3_text"),
            "{gemma3_multimodal}"
        );
    }

    /// Phi-3's first releases wrote `"type": "su"` (Phi-3-mini-128k) or `yarn`; its config class
    /// reads both as longrope.
    #[test]
    fn phi3_s_legacy_su_scaling_is_longrope() {
        let factors = serde_json::to_string(&vec![1.0; 4]).unwrap();
        let json = format!(
            r#"{{"model_type":"phi3","vocab_size":50,"hidden_size":32,"num_hidden_layers":1,
            "num_attention_heads":4,"intermediate_size":48,"max_position_embeddings":131072,
            "original_max_position_embeddings":4096,"rope_theta":10000.0,
            "rope_scaling":{{"type":"su","short_factor":{factors},"long_factor":{factors}}}}}"#
        );
        let rope = resolve(&json).unwrap().rope.unwrap();
        assert_eq!(rope.full.scaling.rope_type(), "longrope");
        let llama = json.replace(r#""model_type":"phi3""#, r#""model_type":"llama""#);
        assert!(resolve(&llama).unwrap_err().contains("`su`"));
    }

    #[test]
    fn a_zero_layer_pattern_is_an_error_naming_the_field() {
        let gemma3 = r#"{"model_type":"gemma3_text","vocab_size":50,"hidden_size":32,
            "num_hidden_layers":2,"num_attention_heads":4,"intermediate_size":48,
            "sliding_window_pattern":0}"#;
        assert!(resolve(gemma3)
            .unwrap_err()
            .contains("`sliding_window_pattern`"));
        let smollm3 = gemma3
            .replace("gemma3_text", "smollm3")
            .replace("sliding_window_pattern", "no_rope_layer_interval");
        assert!(resolve(&smollm3)
            .unwrap_err()
            .contains("`no_rope_layer_interval`"));
        let window = gemma3.replace(r#""sliding_window_pattern":0"#, r#""sliding_window":0"#);
        assert!(resolve(&window).unwrap_err().contains("`sliding_window`"));
    }

    /// Fuzz crash (`tests/fixtures/fuzz/gguf_reader/crash-oom-huge-block-count`): a
    /// GGUF's `block_count` of 2^30 made the per-layer windows allocate 8 GB.
    #[test]
    fn an_absurd_layer_count_is_refused_before_per_layer_settings_are_built() {
        let err = resolve(&LLAMA_5X.replace(
            r#""num_hidden_layers":2"#,
            r#""num_hidden_layers":1073741824"#,
        ))
        .unwrap_err();
        assert!(err.contains("`num_hidden_layers` (1073741824)"), "{err}");
    }

    fn fixture_config(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
            .join("config.json")
    }

    const LLAMA_5X: &str = r#"{"model_type":"llama","architectures":["LlamaForCausalLM"],
        "vocab_size":100,"hidden_size":64,"num_hidden_layers":2,"num_attention_heads":8,
        "num_key_value_heads":4,"intermediate_size":96,"rms_norm_eps":1e-5,
        "rope_parameters":{"rope_theta":500000.0,"rope_type":"default"},"eos_token_id":[1,2]}"#;

    #[test]
    fn transformers_4_and_5_layouts_resolve_to_the_same_config() {
        let old = resolve(LLAMA_4X).unwrap();
        let new = resolve(LLAMA_5X).unwrap();
        assert_eq!(old, new);
        assert_eq!(old.rope.as_ref().map(|r| r.full.theta), Some(500000.0));
        assert_eq!(old.head_dim, 8);
        assert_eq!(old.eos_token_ids, vec![1, 2]);
    }

    #[test]
    fn gpt2_spellings_and_defaults_are_understood() {
        let c = resolve(
            r#"{"model_type":"gpt2","architectures":["GPT2LMHeadModel"],"vocab_size":50,
            "n_embd":32,"n_layer":2,"n_head":4,"n_positions":16,"eos_token_id":7}"#,
        )
        .unwrap();
        assert_eq!(c.family, Family::Gpt2);
        assert_eq!(c.intermediate_size, 128);
        assert_eq!(c.activation, Activation::GeluTanh);
        assert_eq!(c.max_positions, 16);
        assert_eq!(c.eos_token_ids, vec![7]);
        assert!(c.qkv_bias && c.mlp_bias);
    }

    /// Fuzz crash (`tests/fixtures/fuzz/config_json/crash-gpt2-huge-hidden`): GPT-2's default
    /// intermediate size `4 * hidden_size` overflowed.
    #[test]
    fn a_huge_gpt2_hidden_size_is_an_error_not_an_overflow() {
        let err = resolve(
            r#"{"model_type":"gpt2","vocab_size":50,"n_embd":4611686018427387904,"n_layer":2,"n_head":1}"#,
        )
        .unwrap_err();
        assert!(err.contains("hidden_size (4611686018427387904)"), "{err}");
    }

    /// Fuzz crash (`tests/fixtures/fuzz/config_json/crash-llama-huge-head-dim`): an explicit
    /// `head_dim` whose product with the head count overflows the attention width.
    #[test]
    fn sizes_whose_products_overflow_are_refused_with_the_fields_named() {
        let err = resolve(
            r#"{"model_type":"llama","vocab_size":50,"hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":8,"head_dim":4611686018427387904,"intermediate_size":5}"#,
        )
        .unwrap_err();
        assert!(err.contains("num_attention_heads (8) x head_dim"), "{err}");
        let err = resolve(
            &LLAMA_4X.replace(r#""vocab_size":100"#, r#""vocab_size":4611686018427387904"#),
        )
        .unwrap_err();
        assert!(
            err.contains("vocab_size (4611686018427387904) x hidden_size (64)"),
            "{err}"
        );
    }

    #[test]
    fn unknown_model_type_is_named_in_the_error() {
        let err = resolve(r#"{"model_type":"mamba"}"#).unwrap_err();
        assert!(err.contains("`mamba`"), "{err}");
    }

    #[test]
    fn missing_field_is_named_in_the_error() {
        let err = resolve(r#"{"model_type":"llama","vocab_size":10}"#).unwrap_err();
        assert!(err.contains("hidden_size"), "{err}");
    }

    #[test]
    fn unsupported_rope_scaling_is_refused() {
        let json = LLAMA_4X.replace(
            r#""rope_scaling":null"#,
            r#""rope_scaling":{"rope_type":"su","factor":4.0}"#,
        );
        assert!(resolve(&json).unwrap_err().contains("`su`"));
    }

    #[test]
    fn qwen2_has_qkv_bias_and_llama_does_not() {
        let qwen = resolve(&LLAMA_5X.replace("\"llama\"", "\"qwen2\"")).unwrap();
        let llama = resolve(LLAMA_5X).unwrap();
        assert!(qwen.qkv_bias && !qwen.attn_out_bias);
        assert!(!llama.qkv_bias);
    }

    #[test]
    fn qwen3_moe_layers_are_sparse_unless_mlp_only_or_off_the_sparse_step() {
        let moe_of = |extra: &str| {
            let json = format!(
                r#"{{"model_type":"qwen3_moe","vocab_size":10,"hidden_size":8,"num_hidden_layers":4,
                "num_attention_heads":2,"intermediate_size":16,"num_experts":4,
                "num_experts_per_tok":2,"moe_intermediate_size":6{extra}}}"#
            );
            resolve(&json).map(|c| c.decoder.and_then(|d| d.moe))
        };
        let moe = moe_of(r#","mlp_only_layers":[0],"decoder_sparse_step":2"#)
            .unwrap()
            .unwrap();
        assert_eq!(moe.sparse_layers, [false, true, false, true]);
        assert_eq!((moe.experts, moe.top_k, moe.intermediate_size), (4, 2, 6));
        assert!(!moe.renormalize);
        let renormalized = moe_of(r#","norm_topk_prob":true"#).unwrap().unwrap();
        assert!(renormalized.renormalize && renormalized.sparse_layers.iter().all(|&s| s));
        assert!(moe_of(r#","decoder_sparse_step":0"#)
            .unwrap_err()
            .contains("decoder_sparse_step"));
        assert!(moe_of(r#","num_experts_per_tok":5"#)
            .unwrap_err()
            .contains("more than"));
        // No experts: a dense decoder.
        assert_eq!(moe_of(r#","num_experts":0"#).unwrap(), None);
        let mixtral = ModelConfig::from_file(&fixture_config("mixtral")).unwrap();
        let moe = mixtral.decoder.unwrap().moe.unwrap();
        assert!(moe.renormalize && moe.sparse_layers == [true, true]);
        assert_eq!((moe.experts, moe.intermediate_size), (6, 40));
    }

    /// A three-layer mixture of experts of `model_type` with 4 experts, top 2, and `extra`
    /// fields.
    fn moe_config(model_type: &str, extra: &str) -> std::result::Result<ModelConfig, String> {
        resolve(&format!(
            r#"{{"model_type":"{model_type}","vocab_size":10,"hidden_size":8,"num_hidden_layers":3,
            "num_attention_heads":2,"intermediate_size":16,"num_experts":4,
            "num_experts_per_tok":2{extra}}}"#
        ))
    }

    #[test]
    fn qwen2_moe_has_qkv_biases_a_shared_expert_of_its_own_width_and_dense_layers() {
        let extra = r#","moe_intermediate_size":6,"shared_expert_intermediate_size":12,
            "mlp_only_layers":[1]"#;
        let c = moe_config("qwen2_moe", extra).unwrap();
        assert!(c.qkv_bias && !c.attn_out_bias);
        let moe = c.decoder.as_ref().and_then(|d| d.moe.clone()).unwrap();
        assert_eq!(moe.sparse_layers, [true, false, true]);
        assert_eq!((moe.intermediate_size, moe.shared_expert), (6, Some(12)));
        assert!(!moe.renormalize);
        assert_eq!((c.expert_width(), c.shared_expert_width()), (6, 12));
        assert_eq!(c.intermediate_size, 16);
        // transformers' defaults: a shared expert of 5632, renormalisation off.
        let defaults = moe_config("qwen2_moe", "").unwrap();
        assert_eq!(defaults.shared_expert_width(), 5632);
        assert!(
            !moe_config("qwen2_moe", r#","qkv_bias":false"#)
                .unwrap()
                .qkv_bias
        );
        let renormalized = moe_config("qwen2_moe", r#","norm_topk_prob":true"#).unwrap();
        assert!(renormalized.decoder.unwrap().moe.unwrap().renormalize);
        // No experts: a dense decoder.
        let dense = moe_config("qwen2_moe", r#","num_experts":0"#).unwrap();
        assert_eq!(dense.decoder.unwrap().moe, None);
        for (extra, field) in [
            (
                r#","shared_expert_intermediate_size":0"#,
                "shared_expert_intermediate_size",
            ),
            (r#","moe_intermediate_size":0"#, "moe_intermediate_size"),
            (r#","decoder_sparse_step":0"#, "decoder_sparse_step"),
            (
                r#","shared_expert_intermediate_size":-1"#,
                "shared_expert_intermediate_size",
            ),
            (r#","qkv_bias":"yes""#, "qkv_bias"),
        ] {
            let err = moe_config("qwen2_moe", extra).unwrap_err();
            assert!(err.contains(field), "{extra}: {err}");
        }
    }

    #[test]
    fn qwen2_moe_slides_on_odd_numbered_layers_below_max_window_layers() {
        let windows = |extra: &str| moe_config("qwen2_moe", extra).unwrap().attention_windows;
        let sliding = r#","use_sliding_window":true,"sliding_window":4,"max_window_layers":2"#;
        assert_eq!(windows(sliding), [Some(4), None, None]);
        // transformers 5 writes `sliding_window` 0 when `use_sliding_window` is off.
        let off = r#","use_sliding_window":false,"sliding_window":0"#;
        assert_eq!(windows(off), [None, None, None]);
    }

    #[test]
    fn olmoe_splits_whole_projection_qk_norms_clips_qkv_and_routes_every_layer() {
        let c = moe_config("olmoe", r#","clip_qkv":8.0,"norm_topk_prob":true"#).unwrap();
        let d = c.decoder.as_ref().unwrap();
        assert_eq!(d.qk_norm, Some(QkNorm::WholeProjection));
        assert_eq!(d.placement, NormPlacement::Pre);
        assert_eq!(d.clip_qkv, Some(8.0));
        let moe = d.moe.as_ref().unwrap();
        // The experts are `intermediate_size` wide; every layer is sparse; no shared expert.
        assert_eq!((moe.experts, moe.intermediate_size), (4, 16));
        assert!(moe.renormalize && moe.sparse_layers == [true, true, true]);
        assert_eq!(moe.shared_expert, None);
        assert!(!c.qkv_bias && !c.attn_out_bias);
        assert_eq!(
            moe_config("olmoe", "").unwrap().decoder.unwrap().clip_qkv,
            None
        );
        for (extra, field) in [
            (r#","clip_qkv":0.0"#, "clip_qkv"),
            (r#","clip_qkv":-1.5"#, "clip_qkv"),
            (r#","num_experts":0"#, "num_experts"),
            (r#","num_experts_per_tok":0"#, "num_experts_per_tok"),
            (r#","num_experts_per_tok":5"#, "num_experts_per_tok"),
        ] {
            let err = moe_config("olmoe", extra).unwrap_err();
            assert!(err.contains(field), "{extra}: {err}");
        }
    }
}
