//! Hugging Face Hub ids (`org/name`), resolved through the standard Hugging Face cache:
//! `HF_HOME` chooses the cache, `HF_ENDPOINT` the server, `HF_HUB_OFFLINE=1` forbids the network
//! (then everything must already be cached). Downloads show a progress bar.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::Cache;

use crate::error::{Error, Result};

/// Files a model directory may hold besides its weights.
const OPTIONAL_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// Whether `text` looks like a Hub id (`org/name`) rather than a path.
pub fn looks_like_hub_id(text: &str) -> bool {
    let mut parts = text.split('/');
    let valid = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(org), Some(name), None) if valid(org) && valid(name))
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Fetches one file of a Hub model: from the cache, else (when online) from the server.
/// `Ok(None)` when an optional file is absent.
fn fetch(id: &str, file: &str, required: bool) -> Result<Option<PathBuf>> {
    if let Some(path) = Cache::from_env().model(id.to_string()).get(file) {
        return Ok(Some(path));
    }
    if offline() {
        return match required {
            true => Err(Error::Fetch(format!(
                "`{file}` of {id} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
                Cache::from_env().path().display()
            ))),
            false => Ok(None),
        };
    }
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| Error::Fetch(format!("cannot reach the Hugging Face Hub: {e}")))?;
    match api.model(id.to_string()).get(file) {
        Ok(path) => Ok(Some(path)),
        Err(e) if required => Err(Error::Fetch(format!(
            "cannot download `{file}` of {id}: {e}"
        ))),
        Err(e) => {
            tracing::debug!("{id} has no {file}: {e}");
            Ok(None)
        }
    }
}

/// The local snapshot directory of Hub model `id`, with its config, weights and tokenizer files.
pub fn snapshot(id: &str) -> Result<PathBuf> {
    let config = fetch(id, "config.json", true)?
        .ok_or_else(|| Error::Fetch(format!("{id} has no config.json")))?;
    for file in OPTIONAL_FILES {
        fetch(id, file, false)?;
    }
    match fetch(id, "model.safetensors.index.json", false)? {
        Some(index) => {
            for shard in shard_files(&index)? {
                fetch(id, &shard, true)?;
            }
        }
        None => {
            fetch(id, "model.safetensors", true)?;
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Fetch(format!("unexpected cache layout for {id}")))
}

/// The shard file names listed in a `model.safetensors.index.json`.
fn shard_files(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let parsed: Index = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(index, format!("not a valid shard index: {e}")))?;
    let mut files: Vec<String> = parsed.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_apart_from_paths() {
        assert!(looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!looks_like_hub_id("./model"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("model.gguf"));
    }
}
