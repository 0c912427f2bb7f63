//! A llama-family GGUF file as a model: its configuration from the metadata, and its tensors
//! under Hugging Face names, dequantized per slice to f32 (q/k rows restored from llama.cpp's
//! rotary permutation).

use std::ops::Range;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::checkpoint::config::RawConfig;
use crate::checkpoint::gguf::{
    gguf_tensor_name, hf_tensor_name, unpermute_rotary_rows, GgufFile, GgufValue,
};
use crate::checkpoint::{ModelConfig, WeightSource};
use crate::error::{Error, Result};
use crate::models::quantized::QuantizedMatrix;

/// The transformers class and `model_type` of a GGUF `general.architecture`.
fn architecture(arch: &str) -> Option<(&'static str, &'static str)> {
    match arch {
        "llama" => Some(("llama", "LlamaForCausalLM")),
        "mistral" => Some(("mistral", "MistralForCausalLM")),
        "qwen2" => Some(("qwen2", "Qwen2ForCausalLM")),
        _ => None,
    }
}

/// Reads the model configuration from a GGUF file's metadata.
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    let arch = file.str_key("general.architecture")?;
    let (model_type, class) = architecture(arch).ok_or_else(|| {
        Error::UnsupportedModel(format!(
            "{}: general.architecture `{arch}` is not supported (supported: llama, mistral, qwen2)",
            file.path().display()
        ))
    })?;
    let key = |name: &str| format!("{arch}.{name}");
    let number = |name: &str| -> Result<usize> { Ok(file.u64_key(&key(name))? as usize) };
    let optional = |name: &str| {
        file.get(&key(name))
            .and_then(GgufValue::as_u64)
            .map(|v| v as usize)
    };
    let vocab_size = match optional("vocab_size") {
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
    let hidden = number("embedding_length")?;
    let heads = number("attention.head_count")?;
    let head_dim = optional("attention.key_length").or(optional("rope.dimension_count"));
    let eos = file
        .get("tokenizer.ggml.eos_token_id")
        .and_then(GgufValue::as_u64);
    let raw = serde_json::json!({
        "model_type": model_type,
        "architectures": [class],
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": number("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": optional("attention.head_count_kv").unwrap_or(heads),
        "head_dim": head_dim,
        "intermediate_size": number("feed_forward_length")?,
        "max_position_embeddings": optional("context_length"),
        "rms_norm_eps": file.get(&key("attention.layer_norm_rms_epsilon")).and_then(GgufValue::as_f64),
        "rope_theta": file.get(&key("rope.freq_base")).and_then(GgufValue::as_f64),
        "sliding_window": optional("attention.sliding_window"),
        "tie_word_embeddings": file.tensor("output.weight").is_none(),
        "eos_token_id": eos,
        "bos_token_id": file.get("tokenizer.ggml.bos_token_id").and_then(GgufValue::as_u64),
    });
    RawConfig::from_value(raw)
        .and_then(RawConfig::resolve)
        .map_err(|message| Error::config(file.path(), message))
}

/// The tensors of a GGUF file under Hugging Face names.
pub struct GgufWeights {
    file: GgufFile,
    /// Head width for undoing llama.cpp's q/k row permutation (`llama` and `mistral` files).
    rotary_head_dim: Option<usize>,
}

impl GgufWeights {
    /// Opens `path` for a model with `config`.
    pub fn open(path: &Path, config: &ModelConfig) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let permuted = matches!(config.model_type.as_str(), "llama" | "mistral");
        Ok(GgufWeights {
            file,
            rotary_head_dim: permuted.then_some(config.head_dim),
        })
    }

    fn is_permuted(name: &str) -> bool {
        name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.k_proj.weight")
    }
}

impl WeightSource for GgufWeights {
    fn location(&self) -> &Path {
        self.file.path()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.file
            .tensor(&gguf_tensor_name(name)?)
            .map(|t| t.shape())
    }

    fn names(&self) -> Vec<String> {
        self.file
            .tensors()
            .filter_map(|t| hf_tensor_name(&t.name))
            .collect()
    }

    fn read_quantized(
        &self,
        name: &str,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Option<QuantizedMatrix>> {
        let Some(gguf_name) = gguf_tensor_name(name) else {
            return Ok(None);
        };
        let Some((ty, bytes)) = self
            .file
            .read_blocks(&gguf_name, rows.clone(), cols.clone())?
        else {
            return Ok(None);
        };
        let matrix = QuantizedMatrix::new(ty, rows.len(), cols.len(), bytes)
            .map_err(|message| Error::checkpoint(self.file.path(), message))?;
        match self.rotary_head_dim.filter(|_| Self::is_permuted(name)) {
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

    fn read(&self, name: &str, block: Option<(Range<usize>, Range<usize>)>) -> Result<Tensor> {
        let missing = || Error::MissingTensor {
            name: name.to_string(),
            dir: self.file.path().to_path_buf(),
        };
        let gguf_name = gguf_tensor_name(name).ok_or_else(missing)?;
        let shape = self.file.tensor(&gguf_name).ok_or_else(missing)?.shape();
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
        let mut data = self.file.read_f32(&gguf_name, rows.clone(), cols.clone())?;
        if let Some(head_dim) = self.rotary_head_dim.filter(|_| Self::is_permuted(name)) {
            if rows.start % head_dim != 0 || rows.len() % head_dim != 0 {
                return Err(Error::InvalidInput(format!(
                    "tensor `{name}` can only be read in whole heads of {head_dim} rows, not rows {rows:?}"
                )));
            }
            unpermute_rotary_rows(&mut data, head_dim, cols.len())?;
        }
        let out_shape = if shape.len() == 1 {
            vec![cols.len()]
        } else {
            vec![rows.len(), cols.len()]
        };
        Ok(Tensor::from_vec(data, out_shape, &Device::Cpu)?)
    }
}
