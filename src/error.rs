//! The library's error type.
//!
//! Every variant carries the fields that explain it (the file, the tensor, the value), so that a
//! message printed to a user names the problem without a backtrace. Binaries wrap it in `anyhow`.

use std::path::PathBuf;

/// Everything that can go wrong while loading, splitting or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// A model configuration (`config.json`) is missing a field, or a field has a bad value.
    #[error("invalid model configuration {path}: {message}")]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The model's `model_type` / `architectures` is not one we can split.
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),
    /// A checkpoint file is malformed (bad header, truncated data, wrong dtype or shape).
    #[error("invalid checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("tensor `{name}` is missing from the checkpoint in {dir}")]
    MissingTensor {
        /// The tensor's name.
        name: String,
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// A tensor has a different shape from the one the configuration implies.
    #[error("tensor `{name}` has shape {actual:?}, but the configuration implies {expected:?}")]
    TensorShape {
        /// The tensor's name.
        name: String,
        /// The shape in the checkpoint.
        actual: Vec<usize>,
        /// The shape the configuration implies.
        expected: Vec<usize>,
    },
    /// The model cannot be split over this many ranks.
    #[error("cannot split the model over {ranks} ranks: {reason}")]
    TooManyRanks {
        /// The requested number of ranks.
        ranks: usize,
        /// Why not (for example the number of key/value heads).
        reason: String,
    },
    /// A request's inputs are malformed (shape, token id out of range, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A collective operation between ranks failed.
    #[error("communication between ranks failed: {0}")]
    Comm(#[from] crate::comm::CommError),
    /// A worker process failed, died or stopped answering.
    #[error("rank {rank} failed: {message}")]
    Rank {
        /// The rank that failed.
        rank: usize,
        /// What happened, with the rank's last words where known.
        message: String,
    },
    /// The model could not be fetched (Hub download, default-model package).
    #[error("cannot fetch the model: {0}")]
    Fetch(String),
    /// Starting or talking to the worker processes failed.
    #[error("worker processes: {0}")]
    Launch(String),
    /// A GGUF file is malformed or unsupported.
    #[error(transparent)]
    Gguf(#[from] crate::checkpoint::gguf::GgufError),
    /// The tokenizer could not be loaded or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::Checkpoint`] for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }

    /// Builds an [`Error::Config`] for `path`.
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}
