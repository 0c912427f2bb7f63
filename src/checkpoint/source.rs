//! Model sources: what `--model` names (a Hugging Face directory, a `.gguf` file, a Hub id, or
//! nothing for the default model), resolved to a configuration and a weights location.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::gguf::GgufFile;
use crate::checkpoint::gguf_model::{config_from_gguf, GgufWeights};
use crate::checkpoint::{default_model, hub, ModelConfig, SafetensorsCheckpoint, WeightSource};
use crate::error::{Error, Result};

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local directory (config.json + safetensors) or `.gguf` file.
    Path(PathBuf),
    /// A Hugging Face Hub id, `org/name`.
    Hub(String),
    /// The default model (SmolLM2-135M-Instruct, GGUF Q4_1).
    Default,
}

impl ModelSource {
    /// Interprets a `--model` value: an existing path, else an `org/name` Hub id, else a path
    /// (which will be reported missing).
    pub fn parse(text: &str) -> Self {
        if Path::new(text).exists() || !hub::looks_like_hub_id(text) {
            ModelSource::Path(PathBuf::from(text))
        } else {
            ModelSource::Hub(text.to_string())
        }
    }
}

impl From<&str> for ModelSource {
    fn from(text: &str) -> Self {
        ModelSource::parse(text)
    }
}

impl From<&String> for ModelSource {
    fn from(text: &String) -> Self {
        ModelSource::parse(text)
    }
}

impl From<String> for ModelSource {
    fn from(text: String) -> Self {
        ModelSource::parse(&text)
    }
}

impl From<&Path> for ModelSource {
    fn from(path: &Path) -> Self {
        ModelSource::Path(path.to_path_buf())
    }
}

impl From<PathBuf> for ModelSource {
    fn from(path: PathBuf) -> Self {
        ModelSource::Path(path)
    }
}

impl From<&PathBuf> for ModelSource {
    fn from(path: &PathBuf) -> Self {
        ModelSource::Path(path.clone())
    }
}

/// Where a resolved model's weights are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WeightsLocation {
    /// A directory with `model.safetensors` or a sharded index.
    Safetensors(PathBuf),
    /// A GGUF file.
    Gguf(PathBuf),
}

impl WeightsLocation {
    /// The directory or file.
    pub fn path(&self) -> &Path {
        match self {
            WeightsLocation::Safetensors(p) | WeightsLocation::Gguf(p) => p,
        }
    }

    /// Opens the weights (headers only; tensors are read later, slice by slice).
    pub fn open(&self, config: &ModelConfig) -> Result<Box<dyn WeightSource>> {
        Ok(match self {
            WeightsLocation::Safetensors(dir) => Box::new(SafetensorsCheckpoint::open(dir)?),
            WeightsLocation::Gguf(file) => Box::new(GgufWeights::open(file, config)?),
        })
    }
}

/// A model found and understood: its configuration and where its weights are.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// Where the weights are.
    pub location: WeightsLocation,
    /// The resolved configuration.
    pub config: ModelConfig,
    /// End-of-sequence ids (generation config, else model config).
    pub eos_token_ids: Vec<u32>,
}

impl ResolvedModel {
    /// Finds the model `source` names, downloading or fetching it where needed, and validates
    /// its configuration and weight headers.
    pub fn resolve(source: &ModelSource) -> Result<Self> {
        match source {
            ModelSource::Path(path) if path.is_dir() => Self::from_directory(path),
            ModelSource::Path(path) if path.is_file() => Self::from_gguf(path),
            ModelSource::Path(path) => Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such model directory or .gguf file",
                ),
            )),
            ModelSource::Hub(id) => Self::from_directory(&hub::snapshot(id)?),
            ModelSource::Default => Self::from_gguf(&default_model::default_model_path()?),
        }
    }

    fn from_directory(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        SafetensorsCheckpoint::open(dir)?;
        let eos_token_ids = generation_eos_ids(dir).unwrap_or_else(|| config.eos_token_ids.clone());
        Ok(ResolvedModel {
            location: WeightsLocation::Safetensors(dir.to_path_buf()),
            config,
            eos_token_ids,
        })
    }

    fn from_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = config_from_gguf(&file)?;
        Ok(ResolvedModel {
            location: WeightsLocation::Gguf(path.to_path_buf()),
            eos_token_ids: config.eos_token_ids.clone(),
            config,
        })
    }
}

/// End-of-sequence ids from `generation_config.json`, if it names any.
fn generation_eos_ids(dir: &Path) -> Option<Vec<u32>> {
    #[derive(Deserialize)]
    struct GenerationConfig {
        eos_token_id: Option<serde_json::Value>,
    }
    let text = std::fs::read_to_string(dir.join("generation_config.json")).ok()?;
    match serde_json::from_str::<GenerationConfig>(&text)
        .ok()?
        .eos_token_id?
    {
        serde_json::Value::Number(n) => n.as_u64().map(|id| vec![id as u32]),
        serde_json::Value::Array(a) => a.iter().map(|x| x.as_u64().map(|id| id as u32)).collect(),
        _ => None,
    }
}
