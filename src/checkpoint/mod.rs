//! Model sources: reading `config.json` and the weights of a checkpoint directory.
//! No model logic lives here.

pub mod config;
pub mod default_model;
pub mod gguf;
mod gguf_experts;
pub mod gguf_model;
#[cfg(test)]
mod gguf_test_file;
pub mod hub;
pub mod safetensors;
pub mod source;

use std::ops::Range;
use std::path::Path;

use candle_core::Tensor;

use crate::error::Result;
use crate::models::quantized::QuantizedMatrix;

pub use config::{Activation, Family, ModelConfig, OutputKind};
pub use safetensors::{SafetensorsCheckpoint, TensorInfo};

/// Where a rank reads weights from: tensors by their Hugging Face name, readable in blocks, so
/// that a rank reads only its own slices.
pub trait WeightSource: Send + Sync {
    /// The file or directory, for messages.
    fn location(&self) -> &Path;
    /// The shape of tensor `name` (PyTorch layout), if present.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Every tensor name.
    fn names(&self) -> Vec<String>;
    /// The block `rows × cols` of a 2-D tensor (`cols` of a 1-D one, whose `rows` is `0..1`),
    /// or the whole tensor when `block` is `None`, in the stored float dtype (f32 for
    /// quantized formats).
    fn read(&self, name: &str, block: Option<(Range<usize>, Range<usize>)>) -> Result<Tensor>;
    /// The block `rows × cols` of a 2-D tensor kept in its stored quantized blocks, or `None`
    /// where the format has none (or the block does not fall on their boundaries).
    fn read_quantized(
        &self,
        _name: &str,
        _rows: Range<usize>,
        _cols: Range<usize>,
    ) -> Result<Option<QuantizedMatrix>> {
        Ok(None)
    }
    /// The bytes [`WeightSource::read_quantized`] would return for the same block, from the
    /// headers alone (for memory forecasts); `None` where it returns none.
    fn quantized_bytes(
        &self,
        _name: &str,
        _rows: Range<usize>,
        _cols: Range<usize>,
    ) -> Result<Option<u64>> {
        Ok(None)
    }
}
