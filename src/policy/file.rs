//! Policy files: a new `model_type` that reuses a known block wiring, described as data.
//!
//! A policy file (TOML, or JSON with a `.json` extension) names the wiring the model's blocks
//! follow, how `config.json`'s fields are spelled, and for every tensor of the checkpoint which
//! tensor of the wiring it is and how it is split:
//!
//! ```toml
//! model_type = "tinyllm"        # the checkpoint's config.json `model_type`
//! wiring = "llama"              # gpt2 | llama | mistral | qwen2 | qwen3 | gemma | gemma2 | ... (WIRINGS)
//! prefixes = ["backbone.", ""]  # what may come before the names below
//!
//! [config]                      # the wiring's field name = the checkpoint's field name
//! hidden_size = "d_model"
//!
//! [[tensor]]
//! name = "blocks.*.attn.wq.weight"            # `*` matches any run of characters
//! wiring_name = "layers.*.self_attn.q_proj.weight"
//! split = "column"                  # column | row | per_head | replicate | expert
//! partition = "heads"      # heads | kv_heads | intermediate | expert_intermediate
//!                          # | shared_expert_intermediate | vocab
//! parts = 1                                   # fused parts, each split alike (q, k, v: 3)
//! transposed = false                          # stored [in, out] (GPT-2's Conv1D)
//! ```
//!
//! Everything is checked before any rank starts: the fields' values, that every pattern matches
//! a tensor of the checkpoint, and that every tensor of the checkpoint is covered by a rule.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::{glob_captures, Partition, Policy, Rename, Role, Rule};
use crate::error::{Error, Result};

/// The block wirings a policy file may name: the built-in `model_type`s. A Llama-style wiring
/// brings its family's switches (norms, q/k norms, multipliers, soft-caps, windows, rotary
/// variants), read from the checkpoint's `config.json` as for that family.
pub const WIRINGS: [&str; 20] = [
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "smollm3",
    "olmo2",
    "stablelm",
    "granite",
    "starcoder2",
    "cohere",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "bert",
];

/// A policy file as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// The checkpoint's `model_type`.
    pub model_type: String,
    /// The built-in `model_type` whose block wiring and configuration semantics apply.
    pub wiring: String,
    /// Prefixes the checkpoint may put before the tensor names.
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// `config.json` spellings: the wiring's field name = the checkpoint's field name.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// One entry per tensor pattern of the checkpoint.
    #[serde(rename = "tensor")]
    pub tensors: Vec<TensorRule>,
}

/// How the tensors one pattern matches map to the wiring and are split.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorRule {
    /// The checkpoint's name pattern (`*` matches any run of characters).
    pub name: String,
    /// The wiring's name for it, with as many `*` as `name` (`None`: a tensor the wiring does
    /// not read, loaded by no rank, such as a cached rotary table).
    pub wiring_name: Option<String>,
    /// How it is divided among ranks.
    pub split: Split,
    /// The divided dimension (column and row splits).
    pub partition: Option<Partition>,
    /// Fused parts, each divided alike (column splits; default 1).
    pub parts: Option<usize>,
    /// Stored `[in, out]` instead of `[out, in]`.
    #[serde(default)]
    pub transposed: bool,
}

/// The kinds of split a policy file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// The output dimension is divided.
    Column,
    /// The input dimension is divided (an all-reduce follows).
    Row,
    /// Stored head by head, `parts` blocks per head (a fused q/k/v of GPT-NeoX or BLOOM).
    PerHead,
    /// Every rank holds the whole tensor.
    Replicate,
    /// A tensor of one expert of a mixture of experts, held whole by the rank owning that
    /// expert (expert parallelism); its number is the last number in the tensor's name.
    Expert,
}

impl PolicyFile {
    /// Reads and checks the policy file at `path` (TOML, or JSON for `.json`).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json = path.extension().and_then(|e| e.to_str()) == Some("json");
        PolicyFile::parse(&text, json).map_err(|message| {
            Error::InvalidInput(format!("policy file {}: {message}", path.display()))
        })
    }

    /// Parses and checks a policy file's text (TOML, or JSON with `json`); the error names
    /// the problem.
    pub fn parse(text: &str, json: bool) -> std::result::Result<Self, String> {
        let file: PolicyFile = match json {
            true => serde_json::from_str(text).map_err(|e| e.to_string())?,
            false => toml::from_str(text).map_err(|e| e.to_string())?,
        };
        file.check()?;
        Ok(file)
    }

    /// Checks the values one by one; the message names the entry and the value.
    fn check(&self) -> std::result::Result<(), String> {
        if !WIRINGS.contains(&self.wiring.as_str()) {
            return Err(format!(
                "wiring `{}` is not a known block wiring (known: {})",
                self.wiring,
                WIRINGS.join(", ")
            ));
        }
        if self.tensors.is_empty() {
            return Err("it has no [[tensor]] entry".into());
        }
        for rule in &self.tensors {
            rule.role()
                .map_err(|e| format!("tensor `{}`: {e}", rule.name))?;
            let stars = |p: &str| p.matches('*').count();
            if let Some(wiring_name) = &rule.wiring_name {
                if stars(wiring_name) != stars(&rule.name) {
                    return Err(format!(
                        "tensor `{}`: wiring_name `{wiring_name}` must have as many `*` as the name",
                        rule.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// The slicing policy the ranks follow: rules on the checkpoint's names, and how the
    /// wiring's names are renamed to them.
    pub fn policy(&self) -> Policy {
        Policy {
            name: self.model_type.clone(),
            prefixes: self.prefixes.clone(),
            rules: self
                .tensors
                .iter()
                .filter_map(|t| {
                    let role = t.role().ok()?;
                    Some(Rule {
                        pattern: t.name.clone(),
                        role,
                    })
                })
                .collect(),
            renames: self
                .tensors
                .iter()
                .filter_map(|t| {
                    Some(Rename {
                        wiring: t.wiring_name.clone()?,
                        checkpoint: t.name.clone(),
                    })
                })
                .collect(),
        }
    }

    /// `config.json`'s text with the wiring's spellings and `model_type`, for the built-in
    /// parser.
    pub fn rewrite_config(&self, text: &str) -> std::result::Result<String, String> {
        let mut value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let fields = value
            .as_object_mut()
            .ok_or("the configuration is not a JSON object")?;
        match fields.get("model_type").and_then(|t| t.as_str()) {
            Some(t) if t == self.model_type => {}
            other => {
                return Err(format!(
                    "the policy is for model_type `{}`, the configuration says {:?}",
                    self.model_type, other
                ))
            }
        }
        for (wiring_field, their_field) in &self.config {
            if let Some(v) = fields.remove(their_field) {
                fields.insert(wiring_field.clone(), v);
            }
        }
        fields.insert("model_type".into(), self.wiring.clone().into());
        Ok(value.to_string())
    }

    /// Checks the rules against the checkpoint's tensor names: each pattern matches one, and
    /// each tensor is covered.
    pub fn check_coverage(&self, tensors: &[&str]) -> std::result::Result<(), String> {
        let policy = self.policy();
        if let Some(name) = tensors.iter().find(|n| policy.role_of(n).is_none()) {
            return Err(format!(
                "no [[tensor]] entry covers the checkpoint's tensor `{name}`"
            ));
        }
        for rule in &self.tensors {
            let matches = |n: &str| {
                std::iter::once("")
                    .chain(self.prefixes.iter().map(String::as_str))
                    .any(|p| {
                        n.strip_prefix(p)
                            .is_some_and(|b| glob_captures(&rule.name, b).is_some())
                    })
            };
            if !tensors.iter().any(|n| matches(n)) {
                return Err(format!(
                    "tensor `{}` matches no tensor of the checkpoint",
                    rule.name
                ));
            }
        }
        Ok(())
    }
}

impl TensorRule {
    /// The role this entry describes.
    fn role(&self) -> std::result::Result<Role, String> {
        let partition = || {
            self.partition
                .ok_or_else(|| format!("a {:?} split needs a partition", self.split).to_lowercase())
        };
        match (self.split, self.parts) {
            (Split::Column, parts) => {
                let parts = parts.unwrap_or(1);
                if parts == 0 || parts > 16 {
                    return Err(format!("parts must be between 1 and 16, got {parts}"));
                }
                Ok(Role::Column {
                    parts: vec![partition()?; parts],
                    transposed: self.transposed,
                })
            }
            (Split::Row, None) => Ok(Role::Row {
                partition: partition()?,
                transposed: self.transposed,
            }),
            (Split::PerHead, parts) if self.partition.is_none() && !self.transposed => {
                Ok(Role::PerHead {
                    parts: parts.unwrap_or(3).clamp(1, 16),
                })
            }
            (Split::Replicate, None) if self.partition.is_none() => Ok(Role::Replicate),
            (Split::Expert, None) if self.partition.is_none() && !self.transposed => {
                Ok(Role::Expert)
            }
            (split, _) => Err(format!(
                "{} split takes no {}",
                match split {
                    Split::Expert => "an expert".to_string(),
                    other => format!("a {other:?}").to_lowercase(),
                },
                if self.parts.is_some() {
                    "parts"
                } else {
                    "partition"
                }
            )),
        }
    }
}
