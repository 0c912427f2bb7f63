//! A GGUF file as a model: its configuration from the metadata, and its tensors under Hugging
//! Face names, dequantized per slice to f32, with every transformation of llama.cpp's
//! `convert_hf_to_gguf.py` undone.
//!
//! # What each architecture maps
//!
//! The configuration is the `config.json` transformers would have for the checkpoint the file
//! was converted from, as llama.cpp interprets the file (where llama.cpp and transformers' own
//! GGUF loader disagree, llama.cpp's reading wins: it wrote the file). Keys are
//! `{arch}.{name}`:
//!
//! | GGUF key | `config.json` field |
//! |---|---|
//! | `block_count`, `embedding_length`, `feed_forward_length`, `context_length` | `num_hidden_layers`, `hidden_size`, `intermediate_size`, `max_position_embeddings` |
//! | `attention.head_count`, `attention.head_count_kv` | `num_attention_heads`, `num_key_value_heads` |
//! | `attention.key_length` (else `rope.dimension_count` for llama, mistral, granite) | `head_dim` |
//! | `attention.layer_norm_rms_epsilon` / `attention.layer_norm_epsilon` (starcoder2) | `rms_norm_eps` / `norm_epsilon` |
//! | `rope.freq_base` (`rope.freq_base_swa`: Gemma 3's sliding layers) | `rope_theta` (`rope_parameters`) |
//! | `rope.scaling.type` `linear` / `yarn` + `rope.scaling.factor`, `.original_context_length`, `.yarn_beta_fast`, `.yarn_beta_slow`, `.yarn_attn_factor` | `rope_parameters` of that type |
//! | tensor `rope_freqs.weight` (Llama 3's scaling, stored as one divisor per frequency) | `longrope` with those divisors as both lists and attention factor 1: the same frequencies |
//! | tensors `rope_factors_short/long.weight`, `rope.scaling.attn_factor`, `.original_context_length` (Phi-3) | `longrope` |
//! | `rope.dimension_count` (phi3) | `partial_rotary_factor` of the head |
//! | `attention.sliding_window`, `attention.sliding_window_pattern` (Gemma 2 default 2, Gemma 3 default 6: layer `i` slides when `i % n < n - 1`) | `sliding_window`, `layer_types` |
//! | `attn_logit_softcapping`, `final_logit_softcapping` (Gemma 2 defaults 50 and 30) | the same |
//! | `attention.scale`, `embedding_scale`, `residual_scale`, `logit_scale` (granite) | `attention_multiplier`, `embedding_multiplier`, `residual_multiplier`, `logits_scaling` |
//! | `expert_count`, `expert_used_count`, `expert_feed_forward_length` (qwen3moe; Mixtral's experts are `feed_forward_length` wide) | `num_experts` (Mixtral's `num_local_experts`), `num_experts_per_tok`, `moe_intermediate_size`, and `norm_topk_prob` true |
//! | `tokenizer.ggml.eos_token_id`, `eot_token_id`, `eom_token_id`, and the control tokens llama.cpp ends a turn on (`<end_of_turn>`, `<\|im_end\|>`, `<\|eot_id\|>`, `<\|end\|>`, `<\|eom_id\|>`) | `eos_token_id` |
//!
//! Gemma 2 and 3 scale queries by `head_dim^-0.5` (`query_pre_attn_scalar = head_dim`; the
//! hidden width over the heads for their 27B models), as llama.cpp does: no key says otherwise.
//! Phi-3's sliding window is ignored, as llama.cpp and transformers' GGUF loader ignore it;
//! StarCoder2's is transformers' default of 4096 (llama.cpp writes none), its biases are there
//! when `blk.0.attn_q.bias` is. A `llama` file with experts (`expert_count` above 0) is
//! Mixtral. llama.cpp renormalises the routing weights of both mixtures of experts and builds
//! every layer sparse, so Qwen3-MoE's `norm_topk_prob` is true (as transformers' GGUF loader
//! defaults it) and it has no dense layers; shared experts and routers other than softmax are
//! refused.
//!
//! Tensor names are [`TensorNames`]'s, and each expert's projection is a run of rows of the
//! layer's stacked expert tensor (`blk.N.ffn_gate_exps.weight` ..., see `gguf_experts.rs`).
//! The transformations undone when a tensor is read: the q/k row permutation of `llama`,
//! `mistral` and `granite` (weights and biases, [`unpermute_rotary_rows`]) and the `1 + w` of
//! every Gemma 2/3 norm weight.

use std::ops::Range;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::{json, Map, Value};

use crate::checkpoint::config::RawConfig;
use crate::checkpoint::gguf::{unpermute_rotary_rows, BlockSpan, GgufFile, GgufValue, TensorNames};
use crate::checkpoint::gguf_experts::{ExpertTensors, SizeKeys};
use crate::checkpoint::{ModelConfig, WeightSource};
use crate::error::{Error, Result};
use crate::models::quantized::QuantizedMatrix;

/// The GGUF `general.architecture` values read, with transformers' `model_type` and class.
const ARCHITECTURES: [(&str, &str, &str); 11] = [
    ("llama", "llama", "LlamaForCausalLM"),
    ("mistral", "mistral", "MistralForCausalLM"),
    ("qwen2", "qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "qwen3", "Qwen3ForCausalLM"),
    ("qwen3moe", "qwen3_moe", "Qwen3MoeForCausalLM"),
    ("gemma2", "gemma2", "Gemma2ForCausalLM"),
    ("gemma3", "gemma3_text", "Gemma3ForCausalLM"),
    ("phi3", "phi3", "Phi3ForCausalLM"),
    ("granite", "granite", "GraniteForCausalLM"),
    ("starcoder2", "starcoder2", "Starcoder2ForCausalLM"),
    ("olmo2", "olmo2", "Olmo2ForCausalLM"),
];

/// The GGUF architectures this module reads, comma-separated (for messages).
pub fn supported_architectures() -> String {
    ARCHITECTURES.map(|(arch, _, _)| arch).join(", ")
}

/// The transformers `model_type` and class of a GGUF `general.architecture`: a `llama` file
/// with experts is Mixtral (llama.cpp has no architecture of its own for it).
fn architecture(meta: &Meta) -> Result<Option<(&'static str, &'static str)>> {
    if meta.arch == "llama" && meta.opt_count("expert_count")?.is_some_and(|n| n > 0) {
        return Ok(Some(("mixtral", "MixtralForCausalLM")));
    }
    Ok(ARCHITECTURES
        .iter()
        .find(|(name, _, _)| *name == meta.arch)
        .map(|&(_, model_type, class)| (model_type, class)))
}

/// The metadata key of one expert's width: Qwen3-MoE's experts have a width of their own,
/// Mixtral's are the MLP's.
fn expert_width_key(arch: &str) -> &'static str {
    match arch {
        "qwen3moe" => "expert_feed_forward_length",
        _ => "feed_forward_length",
    }
}

/// Whether llama.cpp's converter permutes the q/k rows of `arch` (`LlamaModel.permute`).
fn permutes_rotary_rows(arch: &str) -> bool {
    matches!(arch, "llama" | "mistral" | "granite")
}

/// Whether llama.cpp's converter stores the norm weights of `arch` as `1 + w`.
fn norms_plus_one(arch: &str) -> bool {
    matches!(arch, "gemma2" | "gemma3")
}

/// Control tokens llama.cpp ends generation on by their text (`llama-vocab.cpp`'s end-of-turn
/// list, less `<|endoftext|>`, which byte-level vocabularies also use for padding).
const END_OF_TURN_TOKENS: [&str; 5] = [
    "<end_of_turn>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<|eom_id|>",
];

/// GGUF token type of control tokens.
const TOKEN_TYPE_CONTROL: u64 = 3;

/// A float written as f32 in the file, as the decimal the checkpoint's `config.json` had: the
/// shortest decimal that reads back as the same f32 (`1e-6`, not `9.99999997e-07`).
fn f32_decimal(v: f64) -> f64 {
    let single = v as f32;
    if f64::from(single) != v {
        return v;
    }
    single.to_string().parse().unwrap_or(v)
}

/// Typed reads of one file's `{arch}.*` metadata, errors naming the file and the key.
struct Meta<'a> {
    file: &'a GgufFile,
    arch: &'a str,
}

impl Meta<'_> {
    fn key(&self, name: &str) -> String {
        format!("{}.{name}", self.arch)
    }

    fn count(&self, name: &str) -> Result<usize> {
        Ok(self.file.u64_key(&self.key(name))? as usize)
    }

    fn opt_count(&self, name: &str) -> Result<Option<usize>> {
        Ok(self.file.opt_u64_key(&self.key(name))?.map(|v| v as usize))
    }

    fn opt_number(&self, name: &str) -> Result<Option<f64>> {
        Ok(self.file.opt_f64_key(&self.key(name))?.map(f32_decimal))
    }

    fn opt_str(&self, name: &str) -> Result<Option<&str>> {
        Ok(self.file.opt_str_key(&self.key(name))?)
    }

    /// An error naming the file, the key and what is wrong with its value.
    fn invalid(&self, name: &str, message: impl std::fmt::Display) -> Error {
        Error::config(
            self.file.path(),
            format!("metadata key `{}` {message}", self.key(name)),
        )
    }

    /// A positive number at `name`, if present.
    fn opt_positive(&self, name: &str) -> Result<Option<f64>> {
        match self.opt_number(name)? {
            Some(v) if !(v.is_finite() && v > 0.0) => {
                Err(self.invalid(name, format!("must be a positive number, got {v}")))
            }
            v => Ok(v),
        }
    }

    /// The whole 1-D tensor `name`, which must hold `expected` values.
    fn factors(&self, name: &str, expected: usize) -> Result<Vec<f64>> {
        let values = self.file.read_tensor_f32(name)?;
        if values.len() != expected {
            return Err(Error::config(
                self.file.path(),
                format!(
                    "tensor `{name}` has {} values; the rotary dimension needs {expected} (one per pair of dimensions)",
                    values.len()
                ),
            ));
        }
        Ok(values
            .into_iter()
            .map(|v| f32_decimal(f64::from(v)))
            .collect())
    }
}

/// Reads the model configuration from a GGUF file's metadata.
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    let arch = file.str_key("general.architecture")?;
    let meta = Meta { file, arch };
    let (model_type, class) = architecture(&meta)?.ok_or_else(|| {
        Error::UnsupportedModel(format!(
            "{}: general.architecture `{arch}` is not supported (supported: {})",
            file.path().display(),
            supported_architectures()
        ))
    })?;
    let raw = Value::Object(raw_config(&meta, model_type, class)?);
    RawConfig::from_value(raw)
        .and_then(RawConfig::resolve)
        .map_err(|message| Error::config(file.path(), message))
}

/// The transformers-style `config.json` of the file.
fn raw_config(meta: &Meta, model_type: &str, class: &str) -> Result<Map<String, Value>> {
    let (file, arch) = (meta.file, meta.arch);
    let vocab_size = match meta.opt_count("vocab_size")? {
        Some(v) => v,
        None => file
            .get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array)
            .map(<[GgufValue]>::len)
            .or_else(|| file.tensor("token_embd.weight").map(|t| t.shape()[0]))
            .ok_or_else(|| {
                Error::config(
                    file.path(),
                    "cannot tell the vocabulary size (no tokenizer.ggml.tokens)",
                )
            })?,
    };
    let hidden = meta.count("embedding_length")?;
    let heads = meta.count("attention.head_count")?;
    let layers = meta.count("block_count")?;
    if heads == 0 {
        return Err(meta.invalid("attention.head_count", "must be positive, got 0"));
    }
    let key_length = meta.opt_count("attention.key_length")?;
    if let (Some(k), Some(v)) = (key_length, meta.opt_count("attention.value_length")?) {
        if k != v {
            return Err(meta.invalid(
                "attention.value_length",
                format!("is {v}, but attention.key_length is {k}: different key and value widths are not supported"),
            ));
        }
    }
    let rope_dims = meta.opt_count("rope.dimension_count")?;
    let head_dim = match (key_length, rope_dims) {
        (Some(k), _) => k,
        (None, Some(r)) if permutes_rotary_rows(arch) => r,
        _ => hidden / heads,
    };
    if let Some(r) = rope_dims.filter(|&r| r != head_dim && arch != "phi3") {
        return Err(meta.invalid(
            "rope.dimension_count",
            format!("is {r}, but heads are {head_dim} wide: partial rotary positions are not supported for {arch}"),
        ));
    }

    let mut c = Map::new();
    c.insert("model_type".into(), json!(model_type));
    c.insert("architectures".into(), json!([class]));
    c.insert("vocab_size".into(), json!(vocab_size));
    c.insert("hidden_size".into(), json!(hidden));
    c.insert("num_hidden_layers".into(), json!(layers));
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert(
        "num_key_value_heads".into(),
        json!(meta.opt_count("attention.head_count_kv")?.unwrap_or(heads)),
    );
    c.insert("head_dim".into(), json!(head_dim));
    c.insert(
        "intermediate_size".into(),
        json!(meta.count("feed_forward_length")?),
    );
    c.insert(
        "max_position_embeddings".into(),
        json!(meta.opt_count("context_length")?),
    );
    match arch {
        "starcoder2" => {
            c.insert(
                "norm_epsilon".into(),
                json!(meta.opt_number("attention.layer_norm_epsilon")?),
            );
            let biased = file.tensor("blk.0.attn_q.bias").is_some();
            c.insert("use_bias".into(), json!(biased));
            // llama.cpp writes no window; every StarCoder2 has transformers' default of 4096,
            // which transformers' GGUF loader applies too (llama.cpp attends globally).
            let window = meta.opt_count("attention.sliding_window")?.unwrap_or(4096);
            c.insert("sliding_window".into(), json!(window));
        }
        _ => {
            c.insert(
                "rms_norm_eps".into(),
                json!(meta.opt_number("attention.layer_norm_rms_epsilon")?),
            );
        }
    }
    c.insert(
        "tie_word_embeddings".into(),
        json!(file.tensor("output.weight").is_none()),
    );
    c.insert("eos_token_id".into(), json!(eos_ids(file)?));
    c.insert(
        "bos_token_id".into(),
        json!(file.opt_u64_key("tokenizer.ggml.bos_token_id")?),
    );

    let rotary_dim = rope_dims.unwrap_or(head_dim);
    if arch == "phi3" {
        if rotary_dim == 0 || rotary_dim > head_dim {
            return Err(meta.invalid(
                "rope.dimension_count",
                format!("is {rotary_dim}, not between 1 and the head width {head_dim}"),
            ));
        }
        c.insert(
            "partial_rotary_factor".into(),
            json!(rotary_dim as f64 / head_dim as f64),
        );
    }
    let rope = rope_parameters(meta, rotary_dim)?;
    if let Some(original) = rope.get("original_max_position_embeddings") {
        c.insert("original_max_position_embeddings".into(), original.clone());
    }
    match arch {
        "gemma2" | "gemma3" => gemma(meta, &mut c, rope, layers, hidden / heads, head_dim)?,
        _ => {
            c.insert("rope_parameters".into(), Value::Object(rope));
        }
    }
    match arch {
        "llama" | "mistral" | "qwen2" => {
            c.insert(
                "sliding_window".into(),
                json!(meta.opt_count("attention.sliding_window")?),
            );
        }
        "granite" => {
            let scales = [
                ("attention.scale", "attention_multiplier"),
                ("embedding_scale", "embedding_multiplier"),
                ("residual_scale", "residual_multiplier"),
                ("logit_scale", "logits_scaling"),
            ];
            for (key, field) in scales {
                c.insert(field.into(), json!(meta.opt_positive(key)?));
            }
        }
        "olmo2" => {
            if let Some(w) = meta
                .opt_count("attention.sliding_window")?
                .filter(|&w| w > 0)
            {
                return Err(meta.invalid(
                    "attention.sliding_window",
                    format!("is {w}: OLMo 3's sliding-window layers are not supported"),
                ));
            }
        }
        _ => {}
    }
    if matches!(model_type, "mixtral" | "qwen3_moe") {
        experts(meta, &mut c, model_type)?;
    }
    Ok(c)
}

/// A mixture of experts' switches: how many experts, how many each token reads, their width,
/// and the renormalisation of the routing weights, which llama.cpp applies to both Mixtral and
/// Qwen3-MoE whatever the checkpoint's `norm_topk_prob` was (transformers' GGUF loader defaults
/// Qwen3-MoE's to true for this reason). Every layer is sparse, as llama.cpp builds them.
fn experts(meta: &Meta, c: &mut Map<String, Value>, model_type: &str) -> Result<()> {
    if let Some(n) = meta.opt_count("expert_shared_count")?.filter(|&n| n > 0) {
        return Err(meta.invalid(
            "expert_shared_count",
            format!("is {n}: shared experts are not supported"),
        ));
    }
    // llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX.
    if let Some(f) = meta.opt_count("expert_gating_func")?.filter(|&f| f != 1) {
        return Err(meta.invalid(
            "expert_gating_func",
            format!("is {f}: only the softmax router (1) is supported"),
        ));
    }
    let count = meta.count("expert_count")?;
    let used = meta.count("expert_used_count")?;
    if model_type == "qwen3_moe" {
        c.insert("num_experts".into(), json!(count));
        c.insert(
            "moe_intermediate_size".into(),
            json!(meta.count(expert_width_key(meta.arch))?),
        );
        c.insert("norm_topk_prob".into(), json!(true));
        c.insert("decoder_sparse_step".into(), json!(1));
        c.insert("mlp_only_layers".into(), json!([]));
    } else {
        c.insert("num_local_experts".into(), json!(count));
    }
    c.insert("num_experts_per_tok".into(), json!(used));
    Ok(())
}

/// The end-of-sequence ids: `eos_token_id`, the end-of-turn and end-of-message ids, and the
/// control tokens llama.cpp ends a turn on ([`END_OF_TURN_TOKENS`]).
fn eos_ids(file: &GgufFile) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = file.opt_u64_key(key)? {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .and_then(GgufValue::as_array);
    let types = file
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array);
    if let (Some(tokens), Some(types)) = (tokens, types) {
        for (id, (token, kind)) in tokens.iter().zip(types).enumerate() {
            let ends_turn = token
                .as_str()
                .is_some_and(|t| END_OF_TURN_TOKENS.contains(&t));
            if ends_turn && kind.as_u64() == Some(TOKEN_TYPE_CONTROL) && !ids.contains(&(id as u64))
            {
                ids.push(id as u64);
            }
        }
    }
    Ok(ids)
}

/// The rotary parameters (`rope_parameters` of transformers 5) of the full-attention layers:
/// base frequency and scaling (see the module docs).
fn rope_parameters(meta: &Meta, rotary_dim: usize) -> Result<Map<String, Value>> {
    let file = meta.file;
    let mut rope = Map::new();
    if let Some(theta) = meta.opt_positive("rope.freq_base")? {
        rope.insert("rope_theta".into(), json!(theta));
    }
    let scaling = meta.opt_str("rope.scaling.type")?;
    let has_freqs = file.tensor("rope_freqs.weight").is_some();
    let has_factors = file.tensor("rope_factors_long.weight").is_some()
        || file.tensor("rope_factors_short.weight").is_some();
    let factor = || -> Result<f64> {
        meta.opt_positive("rope.scaling.factor")?.ok_or_else(|| {
            meta.invalid(
                "rope.scaling.factor",
                format!("is missing; rope.scaling.type is {scaling:?}"),
            )
        })
    };
    let original = meta.opt_count("rope.scaling.original_context_length")?;
    match scaling {
        None | Some("none") if !has_freqs && !has_factors => {
            rope.insert("rope_type".into(), json!("default"));
        }
        Some("linear") if !has_freqs && !has_factors => {
            rope.insert("rope_type".into(), json!("linear"));
            rope.insert("factor".into(), json!(factor()?));
        }
        Some("yarn") if !has_freqs && !has_factors => {
            rope.insert("rope_type".into(), json!("yarn"));
            rope.insert("factor".into(), json!(factor()?));
            let original = original.ok_or_else(|| {
                meta.invalid(
                    "rope.scaling.original_context_length",
                    "is missing; yarn scaling needs it",
                )
            })?;
            rope.insert("original_max_position_embeddings".into(), json!(original));
            let optional = [
                ("rope.scaling.yarn_beta_fast", "beta_fast"),
                ("rope.scaling.yarn_beta_slow", "beta_slow"),
                ("rope.scaling.yarn_attn_factor", "attention_factor"),
            ];
            for (key, field) in optional {
                if let Some(v) = meta.opt_positive(key)? {
                    rope.insert(field.into(), json!(v));
                }
            }
        }
        None | Some("none") | Some("longrope") if has_freqs && !has_factors => {
            // Llama 3's scaling as llama.cpp stores it: each frequency divided by its factor,
            // which is transformers' longrope with one list for every length and no attention
            // factor.
            let freqs = meta.factors("rope_freqs.weight", rotary_dim / 2)?;
            rope.insert("rope_type".into(), json!("longrope"));
            rope.insert("short_factor".into(), json!(freqs));
            rope.insert("long_factor".into(), json!(freqs));
            rope.insert("attention_factor".into(), json!(1.0));
            rope.insert("factor".into(), json!(1.0));
            let context = meta.opt_count("context_length")?;
            rope.insert(
                "original_max_position_embeddings".into(),
                json!(original.or(context)),
            );
        }
        None | Some("none") | Some("longrope") if has_factors && !has_freqs => {
            // Phi-3's longrope: short factors up to the original context, long ones beyond.
            let short = meta.factors("rope_factors_short.weight", rotary_dim / 2)?;
            let long = meta.factors("rope_factors_long.weight", rotary_dim / 2)?;
            rope.insert("rope_type".into(), json!("longrope"));
            rope.insert("short_factor".into(), json!(short));
            rope.insert("long_factor".into(), json!(long));
            if let Some(attn) = meta.opt_positive("rope.scaling.attn_factor")? {
                rope.insert("attention_factor".into(), json!(attn));
            }
            let original = original.ok_or_else(|| {
                meta.invalid(
                    "rope.scaling.original_context_length",
                    "is missing; Phi-3's rope_factors_short/long need it",
                )
            })?;
            rope.insert("original_max_position_embeddings".into(), json!(original));
        }
        Some(other) if !matches!(other, "none" | "linear" | "yarn" | "longrope") => {
            return Err(meta.invalid(
                "rope.scaling.type",
                format!("is `{other}`; supported: none, linear, yarn, longrope"),
            ))
        }
        other => {
            let tensors: Vec<&str> = [
                "rope_freqs.weight",
                "rope_factors_short.weight",
                "rope_factors_long.weight",
            ]
            .into_iter()
            .filter(|t| file.tensor(t).is_some())
            .collect();
            return Err(meta.invalid(
                "rope.scaling.type",
                format!(
                    "is {other:?} with the tensors {tensors:?}: this combination of rotary scalings is not supported"
                ),
            ));
        }
    }
    Ok(rope)
}

/// Gemma 2 and 3: soft-capping, query scaling, the sliding layers and their rotary base.
fn gemma(
    meta: &Meta,
    c: &mut Map<String, Value>,
    rope: Map<String, Value>,
    layers: usize,
    width_per_head: usize,
    head_dim: usize,
) -> Result<()> {
    let gemma2 = meta.arch == "gemma2";
    // llama.cpp: the 27B models (46 layers of Gemma 2, 62 of Gemma 3) scale by the hidden width
    // per head, every other by the head width.
    let big = if gemma2 { layers == 46 } else { layers == 62 };
    let scalar = if big { width_per_head } else { head_dim };
    c.insert("query_pre_attn_scalar".into(), json!(scalar));
    // A cap of 0 is none; Gemma 2 caps by default (llama.cpp's and transformers' 50 and 30).
    let cap = |name: &str, default: Option<f64>| -> Result<Value> {
        Ok(match meta.opt_number(name)? {
            Some(0.0) => Value::Null,
            Some(v) if !(v.is_finite() && v > 0.0) => {
                return Err(meta.invalid(name, format!("must be a positive number, got {v}")))
            }
            Some(v) => json!(v),
            None => json!(default),
        })
    };
    let attn_default = gemma2.then_some(50.0);
    let final_default = gemma2.then_some(30.0);
    c.insert(
        "attn_logit_softcapping".into(),
        if gemma2 {
            cap("attn_logit_softcapping", attn_default)?
        } else {
            Value::Null
        },
    );
    c.insert(
        "final_logit_softcapping".into(),
        cap("final_logit_softcapping", final_default)?,
    );
    // Sliding layers: Gemma 2 always has them (window 4096 by default), Gemma 3 only when the
    // file gives a window.
    let window = meta.opt_count("attention.sliding_window")?;
    let sliding = match (gemma2, window) {
        (true, _) => true,
        (false, Some(w)) => w > 0,
        (false, None) => false,
    };
    let layer_types: Vec<&str> = match sliding {
        true => sliding_pattern(meta, layers, if gemma2 { 2 } else { 6 })?
            .into_iter()
            .map(|s| match s {
                true => "sliding_attention",
                false => "full_attention",
            })
            .collect(),
        false => vec!["full_attention"; layers],
    };
    c.insert("layer_types".into(), json!(layer_types));
    c.insert(
        "sliding_window".into(),
        json!(window.filter(|&w| w > 0).unwrap_or(4096)),
    );
    let swa_theta = meta.opt_positive("rope.freq_base_swa")?;
    if gemma2 {
        let full_theta = rope.get("rope_theta").and_then(Value::as_f64);
        if let Some(t) = swa_theta.filter(|&t| Some(t) != full_theta) {
            return Err(meta.invalid(
                "rope.freq_base_swa",
                format!("is {t}, unlike rope.freq_base: Gemma 2's sliding layers on their own rotary base are not supported"),
            ));
        }
        c.insert("rope_parameters".into(), Value::Object(rope));
    } else {
        let mut full = rope;
        full.entry("rope_theta").or_insert(json!(1_000_000.0));
        c.insert(
            "rope_parameters".into(),
            json!({
                "full_attention": full,
                "sliding_attention": {
                    "rope_type": "default",
                    "rope_theta": swa_theta.unwrap_or(10_000.0),
                },
            }),
        );
    }
    Ok(())
}

/// Which layers slide: `attention.sliding_window_pattern` as one flag per layer, or as a period
/// `n` (layer `i` slides when `i % n < n - 1`; 0: every layer), else `default` as a period.
fn sliding_pattern(meta: &Meta, layers: usize, default: u64) -> Result<Vec<bool>> {
    let name = "attention.sliding_window_pattern";
    let period = match meta.file.get(&meta.key(name)) {
        None => default,
        Some(GgufValue::Array(flags)) => {
            if flags.len() != layers {
                return Err(meta.invalid(
                    name,
                    format!("has {} flags for {layers} layers", flags.len()),
                ));
            }
            return flags
                .iter()
                .map(|f| {
                    f.as_bool().ok_or_else(|| {
                        meta.invalid(name, format!("holds {}, expected booleans", f.type_name()))
                    })
                })
                .collect();
        }
        Some(v) => v.as_u64().ok_or_else(|| {
            meta.invalid(
                name,
                format!(
                    "holds {}, expected a period or one flag per layer",
                    v.type_name()
                ),
            )
        })?,
    };
    Ok((0..layers as u64)
        .map(|i| period == 0 || i % period < period - 1)
        .collect())
}

/// The tensors of a GGUF file under Hugging Face names.
pub struct GgufWeights {
    file: GgufFile,
    names: TensorNames,
    /// The stacked experts of a mixture of experts, named per expert.
    experts: Option<ExpertTensors>,
    /// Head width for undoing llama.cpp's q/k row permutation (`llama`, `mistral`, `granite`).
    rotary_head_dim: Option<usize>,
    /// Norm weights are stored as `1 + w` (Gemma 2 and 3).
    norms_plus_one: bool,
}

impl GgufWeights {
    /// Opens `path` for a model with `config`.
    pub fn open(path: &Path, config: &ModelConfig) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let arch = file.str_key("general.architecture")?.to_string();
        let names = TensorNames::of(&arch).ok_or_else(|| {
            Error::UnsupportedModel(format!(
                "{}: general.architecture `{arch}` is not supported (supported: {})",
                path.display(),
                supported_architectures()
            ))
        })?;
        let moe = config.decoder.as_ref().and_then(|d| d.moe.as_ref());
        let experts = match moe {
            Some(moe) => {
                let key = |name: &str| format!("{arch}.{name}");
                let keys = SizeKeys {
                    experts: &key("expert_count"),
                    width: &key(expert_width_key(&arch)),
                    hidden: &key("embedding_length"),
                };
                Some(ExpertTensors::open(&file, moe, config.hidden_size, keys)?)
            }
            None => None,
        };
        Ok(GgufWeights {
            file,
            names,
            experts,
            rotary_head_dim: permutes_rotary_rows(&arch).then_some(config.head_dim),
            norms_plus_one: norms_plus_one(&arch),
        })
    }

    /// Where Hugging Face tensor `name` lies in the file: a whole GGUF tensor, or an expert's
    /// run of rows of a stacked one.
    fn locate(&self, name: &str) -> Option<Located> {
        if let Some(slice) = self.experts.as_ref().and_then(|e| e.locate(name)) {
            return Some(Located {
                gguf_name: slice.gguf_name,
                first_row: slice.first_row,
                shape: slice.shape.to_vec(),
            });
        }
        let gguf_name = self.names.gguf_name(name)?;
        let shape = self.file.tensor(&gguf_name)?.shape();
        Some(Located {
            gguf_name,
            first_row: 0,
            shape,
        })
    }

    /// Whether `name` (a Hugging Face name) is stored with its rows permuted.
    fn is_permuted(&self, name: &str) -> Option<usize> {
        let permuted = [
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.q_proj.bias",
            "self_attn.k_proj.bias",
        ];
        self.rotary_head_dim
            .filter(|_| permuted.iter().any(|p| name.ends_with(p)))
    }

    /// The stored blocks of the block `rows × cols` of `name` (a Hugging Face name) where it
    /// stays quantized, with the rotary head width its rows are permuted by, if any; from the
    /// header alone. `None` for a `1 + w` norm, a bias, a q/k block that splits a rotary head,
    /// and whatever [`GgufFile::block_span`] finds no blocks for.
    fn kept_quantized(
        &self,
        name: &str,
        rows: &Range<usize>,
        cols: &Range<usize>,
    ) -> Result<Option<(BlockSpan, Option<usize>)>> {
        let Some(at) = self.locate(name) else {
            return Ok(None);
        };
        if self.is_plus_one(&at.gguf_name) || name.ends_with(".bias") {
            return Ok(None);
        }
        let permuted = self.is_permuted(name);
        if permuted.is_some_and(|head_dim| {
            !rows.start.is_multiple_of(head_dim) || !rows.len().is_multiple_of(head_dim)
        }) {
            return Ok(None);
        }
        let span = self.file.block_span(&at.gguf_name, &at.rows(rows)?, cols)?;
        Ok(span.map(|span| (span, permuted)))
    }

    /// Whether GGUF tensor `gguf_name` is a norm weight stored as `1 + w`.
    fn is_plus_one(&self, gguf_name: &str) -> bool {
        self.norms_plus_one
            && gguf_name
                .strip_suffix(".weight")
                .is_some_and(|stem| stem.ends_with("norm"))
    }
}

/// Where a Hugging Face tensor lies in a GGUF file (see [`GgufWeights::locate`]).
struct Located {
    /// The GGUF tensor.
    gguf_name: String,
    /// The row of the GGUF tensor (read as a matrix) where the Hugging Face tensor's rows start.
    first_row: usize,
    /// The Hugging Face tensor's shape.
    shape: Vec<usize>,
}

impl Located {
    /// Rows `rows` of the Hugging Face tensor as rows of the GGUF tensor, which must not leave
    /// the Hugging Face tensor's (an expert's rows end where the next expert's start).
    fn rows(&self, rows: &Range<usize>) -> Result<Range<usize>> {
        if self.shape.len() == 2 && rows.end > self.shape[0] {
            return Err(Error::InvalidInput(format!(
                "rows {rows:?} of a tensor of shape {:?} stored in `{}` requested",
                self.shape, self.gguf_name
            )));
        }
        Ok(self.first_row + rows.start..self.first_row + rows.end)
    }
}

impl WeightSource for GgufWeights {
    fn location(&self) -> &Path {
        self.file.path()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.locate(name).map(|at| at.shape)
    }

    fn names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for t in self.file.tensors() {
            match self.experts.as_ref().and_then(|e| e.hf_names(&t.name)) {
                Some(experts) => names.extend(experts),
                None => names.extend(self.names.hf_name(&t.name)),
            }
        }
        names
    }

    fn read_quantized(
        &self,
        name: &str,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Option<QuantizedMatrix>> {
        let Some((span, permuted)) = self.kept_quantized(name, &rows, &cols)? else {
            return Ok(None);
        };
        let bytes = self.file.read_span(&span)?;
        let matrix = QuantizedMatrix::new(span.ggml_type, rows.len(), cols.len(), bytes)
            .map_err(|message| Error::checkpoint(self.file.path(), message))?;
        match permuted {
            Some(head_dim) => {
                // The row order is the un-permutation applied to the row numbers themselves
                // (one column), exact in f32 for any realistic row count.
                let mut order: Vec<f32> = (0..rows.len()).map(|r| r as f32).collect();
                unpermute_rotary_rows(&mut order, head_dim, 1)?;
                let order: Vec<usize> = order.into_iter().map(|r| r as usize).collect();
                Ok(Some(matrix.permute_rows(&order)))
            }
            None => Ok(Some(matrix)),
        }
    }

    fn quantized_bytes(
        &self,
        name: &str,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Option<u64>> {
        Ok(self
            .kept_quantized(name, &rows, &cols)?
            .map(|(span, _)| span.bytes() as u64))
    }

    fn read(&self, name: &str, block: Option<(Range<usize>, Range<usize>)>) -> Result<Tensor> {
        let missing = || Error::MissingTensor {
            name: name.to_string(),
            dir: self.file.path().to_path_buf(),
        };
        let at = self.locate(name).ok_or_else(missing)?;
        let (gguf_name, shape) = (&at.gguf_name, &at.shape);
        let (rows, cols) = match (block, shape.as_slice()) {
            (Some(block), _) => block,
            (None, [n]) => (0..1, 0..*n),
            (None, [r, c]) => (0..*r, 0..*c),
            (None, other) => {
                return Err(Error::checkpoint(
                    self.file.path(),
                    format!("tensor `{gguf_name}` has {} dimensions", other.len()),
                ))
            }
        };
        let mut data = self
            .file
            .read_f32(gguf_name, at.rows(&rows)?, cols.clone())?;
        if let Some(head_dim) = self.is_permuted(name) {
            // A weight's heads are runs of rows; a bias's (one value per row) runs of its values.
            let (run, width) = match shape.len() {
                1 => (cols.clone(), 1),
                _ => (rows.clone(), cols.len()),
            };
            if !run.start.is_multiple_of(head_dim) || !run.len().is_multiple_of(head_dim) {
                return Err(Error::InvalidInput(format!(
                    "tensor `{name}` can only be read in whole heads of {head_dim} rows, not rows {run:?}"
                )));
            }
            unpermute_rotary_rows(&mut data, head_dim, width)?;
        }
        if self.is_plus_one(gguf_name) {
            for v in &mut data {
                *v -= 1.0;
            }
        }
        let out_shape = if shape.len() == 1 {
            vec![cols.len()]
        } else {
            vec![rows.len(), cols.len()]
        };
        Ok(Tensor::from_vec(data, out_shape, &Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::config::rope::RopeScaling;
    use crate::checkpoint::config::ExpertNames;
    use crate::checkpoint::gguf_test_file::{gguf_file, Tensor, V};

    /// The shape keys of a small `arch` model: 64 wide, 4 heads over 2, 3 layers.
    fn shape(arch: &'static str) -> Vec<(String, V<'static>)> {
        let k = |name: &str| format!("{arch}.{name}");
        vec![
            ("general.architecture".into(), V::Str(arch)),
            (k("block_count"), V::U32(3)),
            (k("embedding_length"), V::U32(64)),
            (k("feed_forward_length"), V::U32(96)),
            (k("attention.head_count"), V::U32(4)),
            (k("attention.head_count_kv"), V::U32(2)),
            (k("context_length"), V::U32(128)),
            (k("attention.layer_norm_rms_epsilon"), V::F32(1e-6)),
            (k("vocab_size"), V::U32(100)),
        ]
    }

    fn config(kv: Vec<(String, V)>, tensors: &[(&str, &[f32])]) -> Result<ModelConfig> {
        let kv: Vec<(&str, V)> = kv.iter().map(|(k, v)| (k.as_str(), v.copy())).collect();
        let tensors: Vec<Tensor> = tensors
            .iter()
            .map(|(name, values)| Tensor::vector(name, values))
            .collect();
        let (_tmp, f) = gguf_file(&kv, &tensors);
        config_from_gguf(&f)
    }

    fn with(
        mut kv: Vec<(String, V<'static>)>,
        extra: Vec<(&str, V<'static>)>,
    ) -> Vec<(String, V<'static>)> {
        kv.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
        kv
    }

    #[test]
    fn rotary_scaling_types_map_to_transformers_rope_parameters() {
        let linear = config(
            with(
                shape("llama"),
                vec![
                    ("llama.rope.scaling.type", V::Str("linear")),
                    ("llama.rope.scaling.factor", V::F32(4.0)),
                    ("llama.rope.freq_base", V::F32(500000.0)),
                ],
            ),
            &[],
        )
        .unwrap();
        let rope = linear.rope.unwrap().full;
        assert_eq!(rope.theta, 500000.0);
        assert_eq!(rope.scaling, RopeScaling::Linear { factor: 4.0 });

        let yarn = config(
            with(
                shape("qwen3"),
                vec![
                    ("qwen3.rope.scaling.type", V::Str("yarn")),
                    ("qwen3.rope.scaling.factor", V::F32(4.0)),
                    ("qwen3.rope.scaling.original_context_length", V::U32(32)),
                    ("qwen3.rope.scaling.yarn_beta_fast", V::F32(16.0)),
                ],
            ),
            &[],
        )
        .unwrap();
        match yarn.rope.unwrap().full.scaling {
            RopeScaling::Yarn {
                factor,
                original_max_positions,
                beta_fast,
                beta_slow,
                attention_factor,
                ..
            } => {
                assert_eq!((factor, original_max_positions), (4.0, 32));
                assert_eq!((beta_fast, beta_slow, attention_factor), (16.0, 1.0, None));
            }
            other => panic!("{other:?}"),
        }

        // Phi-3's longrope: short and long factor tensors, attention factor, original context;
        // a rotary width of 12 of the 16 dimensions of a head.
        let short = [1.0f32, 1.5, 2.0, 2.5, 3.0, 3.5];
        let long = [2.0f32, 2.5, 3.0, 3.5, 4.0, 4.5];
        let phi3 = config(
            with(
                shape("phi3"),
                vec![
                    ("phi3.rope.dimension_count", V::U32(12)),
                    ("phi3.rope.scaling.attn_factor", V::F32(1.25)),
                    ("phi3.rope.scaling.original_context_length", V::U32(4)),
                    ("phi3.attention.sliding_window", V::U32(2047)),
                ],
            ),
            &[
                ("rope_factors_short.weight", &short),
                ("rope_factors_long.weight", &long),
            ],
        )
        .unwrap();
        assert_eq!(phi3.rotary_dim, Some(12));
        assert_eq!(
            phi3.attention_windows,
            vec![None; 3],
            "llama.cpp ignores Phi-3's window"
        );
        match phi3.rope.unwrap().full.scaling {
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_positions,
                attention_factor,
                ..
            } => {
                assert_eq!(short_factor, vec![1.0, 1.5, 2.0, 2.5, 3.0, 3.5]);
                assert_eq!(long_factor, vec![2.0, 2.5, 3.0, 3.5, 4.0, 4.5]);
                assert_eq!((original_max_positions, attention_factor), (4, Some(1.25)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrong_rotary_metadata_is_refused_with_the_key_and_value() {
        let unknown = config(
            with(
                shape("llama"),
                vec![("llama.rope.scaling.type", V::Str("ntk-by-parts"))],
            ),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            unknown.contains("llama.rope.scaling.type") && unknown.contains("ntk-by-parts"),
            "{unknown}"
        );
        let no_factor = config(
            with(
                shape("llama"),
                vec![("llama.rope.scaling.type", V::Str("linear"))],
            ),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            no_factor.contains("llama.rope.scaling.factor"),
            "{no_factor}"
        );
        let short = [1.0f32, 2.0, 3.0];
        let freqs = config(shape("llama"), &[("rope_freqs.weight", &short)])
            .unwrap_err()
            .to_string();
        assert!(
            freqs.contains("rope_freqs.weight") && freqs.contains("3 values"),
            "{freqs}"
        );
        let both = config(
            with(
                shape("llama"),
                vec![
                    ("llama.rope.scaling.type", V::Str("linear")),
                    ("llama.rope.scaling.factor", V::F32(2.0)),
                ],
            ),
            &[("rope_freqs.weight", &[1.0; 8])],
        )
        .unwrap_err()
        .to_string();
        assert!(both.contains("rope_freqs.weight"), "{both}");
        let partial = config(
            with(
                shape("qwen3"),
                vec![("qwen3.rope.dimension_count", V::U32(8))],
            ),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            partial.contains("qwen3.rope.dimension_count") && partial.contains('8'),
            "{partial}"
        );
    }

    #[test]
    fn gemma_sliding_layers_soft_caps_and_query_scale_follow_llama_cpp() {
        // Gemma 2 without soft-capping keys caps at 50 and 30; every second layer slides.
        let gemma2 = config(
            with(
                shape("gemma2"),
                vec![
                    ("gemma2.attention.key_length", V::U32(16)),
                    ("gemma2.attention.value_length", V::U32(16)),
                ],
            ),
            &[],
        )
        .unwrap();
        let d = gemma2.decoder.unwrap();
        assert_eq!((d.attn_softcap, d.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(d.attention_scale, Some(0.25), "head_dim 16: 16^-0.5");
        assert_eq!(gemma2.attention_windows, vec![Some(4096), None, Some(4096)]);
        // Gemma 3: a pattern given per layer, and the sliding layers' own base.
        let gemma3 = config(
            with(
                shape("gemma3"),
                vec![
                    ("gemma3.attention.sliding_window", V::U32(4)),
                    (
                        "gemma3.attention.sliding_window_pattern",
                        V::Bools(&[false, true, true]),
                    ),
                    ("gemma3.rope.freq_base_swa", V::F32(20000.0)),
                ],
            ),
            &[],
        )
        .unwrap();
        assert_eq!(gemma3.attention_windows, vec![None, Some(4), Some(4)]);
        let rope = gemma3.rope.unwrap();
        assert_eq!(rope.full.theta, 1_000_000.0);
        assert_eq!(rope.sliding.unwrap().theta, 20000.0);
        // ... as a period, and without a window: every layer global.
        let period = config(
            with(
                shape("gemma3"),
                vec![
                    ("gemma3.attention.sliding_window", V::U32(4)),
                    ("gemma3.attention.sliding_window_pattern", V::U32(2)),
                ],
            ),
            &[],
        )
        .unwrap();
        assert_eq!(period.attention_windows, vec![Some(4), None, Some(4)]);
        let none = config(shape("gemma3"), &[]).unwrap();
        assert_eq!(none.attention_windows, vec![None; 3]);
        let wrong = config(
            with(
                shape("gemma3"),
                vec![
                    ("gemma3.attention.sliding_window", V::U32(4)),
                    (
                        "gemma3.attention.sliding_window_pattern",
                        V::Bools(&[true, false]),
                    ),
                ],
            ),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            wrong.contains("sliding_window_pattern") && wrong.contains("2 flags for 3 layers"),
            "{wrong}"
        );
    }

    #[test]
    fn granite_multipliers_and_end_of_turn_tokens_are_read() {
        let granite = config(
            with(
                shape("granite"),
                vec![
                    ("granite.attention.scale", V::F32(0.2)),
                    ("granite.embedding_scale", V::F32(12.0)),
                    ("granite.residual_scale", V::F32(0.22)),
                    ("granite.logit_scale", V::F32(8.0)),
                    (
                        "tokenizer.ggml.tokens",
                        V::Strs(&["<pad>", "<eos>", "<end_of_turn>", "a", "<|im_end|>"]),
                    ),
                    ("tokenizer.ggml.token_type", V::I32s(&[3, 3, 3, 1, 1])),
                    ("tokenizer.ggml.eos_token_id", V::U32(1)),
                ],
            ),
            &[],
        )
        .unwrap();
        let d = granite.decoder.unwrap();
        assert_eq!(d.attention_scale, Some(0.2));
        assert_eq!(d.embedding_scale, Some(12.0));
        assert_eq!(d.residual_scale, Some(0.22));
        assert_eq!(d.logit_scale, Some(1.0 / 8.0));
        // `<|im_end|>` is not a control token here, so it does not end a turn.
        assert_eq!(granite.eos_token_ids, vec![1, 2]);
    }

    #[test]
    fn expert_counts_and_widths_make_mixtral_of_llama_and_qwen3_moe_of_qwen3moe() {
        let mixtral = config(
            with(
                shape("llama"),
                vec![
                    ("llama.expert_count", V::U32(4)),
                    ("llama.expert_used_count", V::U32(2)),
                ],
            ),
            &[],
        )
        .unwrap();
        assert_eq!(mixtral.model_type, "mixtral");
        let moe = mixtral.decoder.unwrap().moe.unwrap();
        assert_eq!(moe.names, ExpertNames::Mixtral);
        assert_eq!(
            (
                moe.experts,
                moe.top_k,
                moe.intermediate_size,
                moe.renormalize
            ),
            (4, 2, 96, true)
        );
        // A Qwen3-MoE file with `extra` keys and without key `without`.
        let qwen = |extra: Vec<(&'static str, V<'static>)>, without: &str| {
            let mut kv: Vec<(&str, V)> = [
                ("qwen3moe.expert_count", V::U32(8)),
                ("qwen3moe.expert_used_count", V::U32(2)),
                ("qwen3moe.expert_feed_forward_length", V::U32(32)),
            ]
            .into_iter()
            .filter(|(key, _)| *key != without)
            .collect();
            kv.extend(extra);
            config(with(shape("qwen3moe"), kv), &[])
        };
        let qwen3_moe = qwen(vec![], "").unwrap();
        assert_eq!(qwen3_moe.model_type, "qwen3_moe");
        let moe = qwen3_moe.decoder.unwrap().moe.unwrap();
        assert_eq!(moe.names, ExpertNames::Qwen);
        assert_eq!(
            (
                moe.experts,
                moe.top_k,
                moe.intermediate_size,
                moe.renormalize
            ),
            (8, 2, 32, true),
            "llama.cpp renormalises Qwen3-MoE's routing weights"
        );
        assert_eq!(moe.sparse_layers, vec![true; 3]);
        let refused = [
            (vec![("qwen3moe.expert_shared_count", V::U32(1))], ""),
            (vec![("qwen3moe.expert_gating_func", V::U32(2))], ""),
            (vec![], "qwen3moe.expert_feed_forward_length"),
        ];
        for (extra, without) in refused {
            let key = extra.first().map_or(without, |(key, _)| *key);
            let err = qwen(extra, without).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn unsupported_files_are_refused_by_name() {
        let arch = config(shape("gpt99"), &[]).unwrap_err().to_string();
        assert!(
            arch.contains("gpt99") && arch.contains(&supported_architectures()),
            "{arch}"
        );
        let olmo3 = config(
            with(
                shape("olmo2"),
                vec![("olmo2.attention.sliding_window", V::U32(4096))],
            ),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            olmo3.contains("olmo2.attention.sliding_window") && olmo3.contains("4096"),
            "{olmo3}"
        );
        let widths = config(
            with(
                shape("qwen3"),
                vec![
                    ("qwen3.attention.key_length", V::U32(16)),
                    ("qwen3.attention.value_length", V::U32(32)),
                ],
            ),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            widths.contains("qwen3.attention.value_length") && widths.contains("32"),
            "{widths}"
        );
    }
}
