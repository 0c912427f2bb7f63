//! Model sources: what `--model` names (a Hugging Face directory, a `.gguf` file, a Hub id, or
//! nothing for the default model), resolved to a configuration and a weights location.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::config::RawConfig;
use crate::checkpoint::gguf::GgufFile;
use crate::checkpoint::gguf_model::{config_from_gguf, GgufWeights};
use crate::checkpoint::{default_model, hub, ModelConfig, SafetensorsCheckpoint, WeightSource};
use crate::error::{Error, Result};
use crate::options::ExpertSplit;
use crate::policy::file::PolicyFile;
use crate::policy::Policy;
use crate::progress::ProgressSink;

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
    /// The slicing policy of a policy file, when one describes the model (else the built-in
    /// policy of its family applies).
    pub policy: Option<Policy>,
}

impl ResolvedModel {
    /// Finds the model `source` names, downloading or fetching it where needed, and validates
    /// its configuration and weight headers.
    pub fn resolve(source: &ModelSource) -> Result<Self> {
        Self::resolve_with_policy(source, None)
    }

    /// Like [`ResolvedModel::resolve`], for a model that a policy file describes (a
    /// `model_type` that reuses a known block wiring; see [`PolicyFile`]). The configuration
    /// is read with the file's spellings, and the file's rules are checked against the
    /// checkpoint's tensors.
    pub fn resolve_with_policy(source: &ModelSource, policy: Option<&PolicyFile>) -> Result<Self> {
        Self::resolve_with_progress(source, policy, None)
    }

    /// Like [`ResolvedModel::resolve_with_policy`], telling `progress` (if given) how the
    /// downloads of a Hub model or of the default model go.
    pub fn resolve_with_progress(
        source: &ModelSource,
        policy: Option<&PolicyFile>,
        progress: Option<&ProgressSink>,
    ) -> Result<Self> {
        if let Some(policy) = policy {
            return match source {
                ModelSource::Path(path) if path.is_dir() => Self::from_policy(path, policy),
                ModelSource::Hub(id) => Self::from_policy(&hub::snapshot(id, progress)?, policy),
                _ => Err(Error::InvalidInput(
                    "a policy file applies to a checkpoint directory (config.json and safetensors)"
                        .into(),
                )),
            };
        }
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
            ModelSource::Hub(id) => Self::from_directory(&hub::snapshot(id, progress)?),
            ModelSource::Default => Self::from_gguf(&default_model::default_model_path(progress)?),
        }
    }

    /// This model with its mixture of experts divided as `split` says (`None`: as its policy
    /// file says, else tensor-parallel experts); the policy it then carries is the one the
    /// ranks, `inspect` and the memory forecast follow. Asking a dense model for expert
    /// parallelism, or a policy file that holds experts whole for tensor-parallel experts, is
    /// an error that says so.
    pub fn with_expert_split(mut self, split: Option<ExpertSplit>) -> Result<Self> {
        let Some(split) = split else {
            return Ok(self);
        };
        let policy = self
            .policy
            .take()
            .unwrap_or_else(|| Policy::for_config(&self.config));
        self.policy = Some(
            policy
                .with_expert_split(split)
                .map_err(Error::InvalidInput)?,
        );
        Ok(self)
    }

    fn from_directory(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        SafetensorsCheckpoint::open(dir)?;
        Ok(Self::directory(dir, config, None))
    }

    fn from_policy(dir: &Path, policy: &PolicyFile) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let config = policy
            .rewrite_config(&text)
            .and_then(|text| {
                serde_json::from_str(&text)
                    .map_err(|e| format!("not valid: {e}"))
                    .and_then(RawConfig::from_value)
            })
            .and_then(RawConfig::resolve)
            .map_err(|message| Error::config(&path, message))?;
        let checkpoint = SafetensorsCheckpoint::open(dir)?;
        policy
            .check_coverage(
                &checkpoint
                    .tensors()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>(),
            )
            .map_err(|message| {
                Error::InvalidInput(format!("policy for {}: {message}", dir.display()))
            })?;
        let rules = policy.policy();
        if rules.expert_split() == ExpertSplit::Expert && config.expert_count() == 0 {
            return Err(Error::InvalidInput(format!(
                "policy for {}: split = \"expert\" holds whole experts, but the model (wiring `{}`) has no mixture of experts",
                dir.display(),
                policy.wiring
            )));
        }
        Ok(Self::directory(dir, config, Some(rules)))
    }

    fn directory(dir: &Path, config: ModelConfig, policy: Option<Policy>) -> Self {
        let eos_token_ids = generation_eos_ids(dir).unwrap_or_else(|| config.eos_token_ids.clone());
        ResolvedModel {
            location: WeightsLocation::Safetensors(dir.to_path_buf()),
            config,
            eos_token_ids,
            policy,
        }
    }

    fn from_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = config_from_gguf(&file)?;
        Ok(ResolvedModel {
            location: WeightsLocation::Gguf(path.to_path_buf()),
            eos_token_ids: config.eos_token_ids.clone(),
            config,
            policy: None,
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
