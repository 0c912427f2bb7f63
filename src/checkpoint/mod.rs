//! Model sources: reading `config.json` and the weights of a checkpoint directory.
//! No model logic lives here.

pub mod config;
pub mod safetensors;

pub use config::{Activation, Family, ModelConfig, OutputKind};
pub use safetensors::{SafetensorsCheckpoint, TensorInfo};
