//! Slicing policies: for each architecture, a table that says how every weight is split.
//!
//! A policy is data: a list of name patterns (`*` matches any run of characters) with a
//! [`Role`] each, and the prefixes a checkpoint may put before the base model's names. Model
//! wiring asks for tensors by name; the engine looks up their role here and reads the rank's
//! slice. A new family that reuses known blocks needs a new table, not new slicing code.

mod tables;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{Family, ModelConfig};

/// A dimension of the model that is divided among ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partition {
    /// Query heads (`head_dim` elements each).
    Heads,
    /// Key/value heads (`head_dim` elements each).
    KvHeads,
    /// The MLP hidden width.
    Intermediate,
    /// Vocabulary rows.
    Vocab,
}

/// How one tensor is divided among ranks. Shapes are `[out, in]` as `nn.Linear` stores them,
/// unless `transposed` (GPT-2's `Conv1D` stores `[in, out]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Role {
    /// The output dimension is split (column-parallel linear, vocabulary-parallel embedding,
    /// their biases). A fused tensor lists one partition per part (GPT-2 `c_attn`: q, k, v) and
    /// each part is split separately.
    Column {
        /// The partition of each fused part, in storage order.
        parts: Vec<Partition>,
        /// Stored as `[in, out]`.
        #[serde(default)]
        transposed: bool,
    },
    /// The input dimension is split (row-parallel linear, followed by an all-reduce).
    Row {
        /// The partition of the input dimension.
        partition: Partition,
        /// Stored as `[in, out]`.
        #[serde(default)]
        transposed: bool,
    },
    /// Every rank holds the whole tensor (norms, position tables, biases added after a reduce).
    Replicate,
}

impl Role {
    /// A column split with a single part.
    pub fn column(partition: Partition) -> Self {
        Role::column_parts(vec![partition])
    }

    /// A column split of a fused tensor, one partition per part.
    pub fn column_parts(parts: Vec<Partition>) -> Self {
        Role::Column {
            parts,
            transposed: false,
        }
    }

    /// Whether the tensor is divided among ranks (as opposed to replicated).
    pub fn is_sliced(&self) -> bool {
        !matches!(self, Role::Replicate)
    }
}

/// One pattern and the role of the tensors it matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Tensor-name pattern relative to the base model; `*` matches any characters.
    pub pattern: String,
    /// How matching tensors are split.
    pub role: Role,
}

/// The slicing table of one architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// A name for messages (`gpt2`, `llama`, ...).
    pub name: String,
    /// Prefixes a checkpoint may put before base-model tensor names (`transformer.`, `model.`).
    pub prefixes: Vec<String>,
    /// Rules, first match wins.
    pub rules: Vec<Rule>,
}

impl Policy {
    /// The built-in policy for a resolved configuration (what transformers calls `AutoPolicy`).
    pub fn for_config(config: &ModelConfig) -> Self {
        match config.family {
            Family::Gpt2 => tables::gpt2(),
            Family::Llama => tables::llama(),
            Family::Bert => tables::bert(),
        }
    }

    /// The role of the tensor `name` (relative to the base model, or a top-level head name).
    pub fn role_of(&self, name: &str) -> Option<&Role> {
        let base = self
            .prefixes
            .iter()
            .filter(|p| !p.is_empty())
            .find_map(|p| name.strip_prefix(p.as_str()))
            .unwrap_or(name);
        self.rules
            .iter()
            .find(|rule| glob_match(&rule.pattern, base))
            .map(|rule| &rule.role)
    }
}

/// Matches `text` against `pattern`, where `*` stands for any (possibly empty) run of characters.
fn glob_match(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(text) = text.strip_prefix(head) else {
                return false;
            };
            (0..=text.len())
                .filter(|&i| text.is_char_boundary(i))
                .any(|i| glob_match(rest, &text[i..]))
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layout = |transposed: &bool| if *transposed { ", transposed" } else { "" };
        match self {
            Role::Column { parts, transposed } => {
                let names: Vec<String> = parts
                    .iter()
                    .map(|p| format!("{p:?}").to_lowercase())
                    .collect();
                write!(f, "column({}{})", names.join("+"), layout(transposed))
            }
            Role::Row {
                partition,
                transposed,
            } => {
                write!(
                    f,
                    "row({}{})",
                    format!("{partition:?}").to_lowercase(),
                    layout(transposed)
                )
            }
            Role::Replicate => write!(f, "replicate"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_matches_layer_numbers_and_nothing_else_differs() {
        assert!(glob_match(
            "h.*.attn.c_attn.weight",
            "h.11.attn.c_attn.weight"
        ));
        assert!(!glob_match(
            "h.*.attn.c_attn.weight",
            "h.11.attn.c_attn.bias"
        ));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "axxbyyc"));
    }

    #[test]
    fn gpt2_c_attn_is_a_transposed_three_part_column_split() {
        let role = tables::gpt2()
            .role_of("transformer.h.3.attn.c_attn.weight")
            .cloned();
        assert_eq!(
            role,
            Some(Role::Column {
                parts: vec![Partition::Heads; 3],
                transposed: true
            })
        );
    }

    #[test]
    fn llama_roles_follow_megatron() {
        let p = tables::llama();
        assert_eq!(
            p.role_of("model.layers.0.self_attn.k_proj.weight"),
            Some(&Role::column(Partition::KvHeads))
        );
        assert!(matches!(
            p.role_of("model.layers.0.mlp.down_proj.weight"),
            Some(Role::Row {
                partition: Partition::Intermediate,
                ..
            })
        ));
        assert_eq!(p.role_of("model.norm.weight"), Some(&Role::Replicate));
        assert_eq!(
            p.role_of("lm_head.weight"),
            Some(&Role::column(Partition::Vocab))
        );
        assert_eq!(p.role_of("model.rotary_emb.inv_freq"), None);
    }

    #[test]
    fn policies_round_trip_through_json() {
        let p = tables::bert();
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Policy>(&text).unwrap(), p);
    }
}
