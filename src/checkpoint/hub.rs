//! Hugging Face Hub ids (`org/name`), resolved through the standard Hugging Face cache:
//! `HF_HOME` chooses the cache, `HF_ENDPOINT` the server, `HF_HUB_OFFLINE=1` forbids the network
//! (then everything must already be cached). Downloads tell their progress to a
//! [`ProgressSink`], when the caller gives one.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::Cache;

use crate::error::{Error, Result};
use crate::progress::{Progress, ProgressSink, Throttle};

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

/// Fetches one file of a Hub model: from the cache, else (when online) from the server,
/// telling `progress` how the download goes. `Ok(None)` when an optional file is absent.
fn fetch(
    id: &str,
    file: &str,
    required: bool,
    progress: Option<&ProgressSink>,
) -> Result<Option<PathBuf>> {
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
        .with_progress(false)
        .build()
        .map_err(|e| Error::Fetch(format!("cannot reach the Hugging Face Hub: {e}")))?;
    let repo = api.model(id.to_string());
    let downloaded = match progress {
        Some(sink) => repo.download_with_progress(file, Download::new(sink)),
        None => repo.download(file),
    };
    match downloaded {
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

/// One download's progress, handed from hf-hub to a [`ProgressSink`] at a bounded rate.
struct Download<'a> {
    sink: &'a ProgressSink,
    file: String,
    done: u64,
    total: u64,
    throttle: Throttle,
}

impl<'a> Download<'a> {
    fn new(sink: &'a ProgressSink) -> Self {
        Download {
            sink,
            file: String::new(),
            done: 0,
            total: 0,
            throttle: Throttle::default(),
        }
    }

    fn tell(&mut self) {
        if self.throttle.due(self.done, self.total) {
            self.sink.report(&Progress::Fetching {
                file: &self.file,
                done: self.done,
                total: self.total,
            });
        }
    }
}

impl hf_hub::api::Progress for Download<'_> {
    /// The start of a download, or of an attempt after a failed one (which counts the bytes
    /// already there again).
    fn init(&mut self, size: usize, filename: &str) {
        (self.file, self.done, self.total) = (filename.to_string(), 0, size as u64);
        self.tell();
    }

    fn update(&mut self, size: usize) {
        self.done = (self.done + size as u64).min(self.total);
        self.tell();
    }

    fn finish(&mut self) {
        self.sink.report(&Progress::Fetched { file: &self.file });
    }
}

/// The local snapshot directory of Hub model `id`, with its config, weights and tokenizer
/// files, telling `progress` how the downloads go.
pub fn snapshot(id: &str, progress: Option<&ProgressSink>) -> Result<PathBuf> {
    let fetch = |file: &str, required: bool| fetch(id, file, required, progress);
    let config = fetch("config.json", true)?
        .ok_or_else(|| Error::Fetch(format!("{id} has no config.json")))?;
    for file in OPTIONAL_FILES {
        fetch(file, false)?;
    }
    match fetch("model.safetensors.index.json", false)? {
        Some(index) => {
            for shard in shard_files(&index)? {
                fetch(&shard, true)?;
            }
        }
        None => {
            fetch("model.safetensors", true)?;
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

    #[test]
    fn a_download_reports_its_bytes_from_zero_to_the_size_then_its_end() {
        use hf_hub::api::Progress as _;
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = events.clone();
        let sink = ProgressSink::new(move |event| {
            seen.lock().unwrap().push(format!("{event:?}"));
        });
        let mut download = Download::new(&sink);
        download.init(10, "model.safetensors");
        // A retry starts again and counts what was already there.
        download.init(10, "model.safetensors");
        download.update(4);
        download.update(6);
        download.finish();
        assert_eq!(
            *events.lock().unwrap(),
            [
                r#"Fetching { file: "model.safetensors", done: 0, total: 10 }"#,
                r#"Fetching { file: "model.safetensors", done: 10, total: 10 }"#,
                r#"Fetched { file: "model.safetensors" }"#,
            ]
        );
    }
}
