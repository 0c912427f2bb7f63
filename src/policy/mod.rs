//! Slicing policies: for each architecture, a table that says how every weight is split.
//!
//! A policy is data: a list of name patterns (`*` matches any run of characters) with a
//! [`Role`] each, and the prefixes a checkpoint may put before the base model's names. Model
//! wiring asks for tensors by name; the engine looks up their role here and reads the rank's
//! slice. A new family that reuses known blocks needs a new table, not new slicing code.

pub mod file;
mod tables;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{Family, ModelConfig};
use crate::options::ExpertSplit;

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
    /// The hidden width of each expert of a mixture of experts: every rank holds a slice of
    /// every expert.
    ExpertIntermediate,
    /// The hidden width of a mixture of experts' shared expert (Qwen2-MoE's
    /// `shared_expert_intermediate_size`), split like a dense MLP.
    SharedExpertIntermediate,
    /// Vocabulary rows.
    Vocab,
}

/// How one tensor is divided among ranks. Shapes are `[out, in]` as `nn.Linear` stores them,
/// unless `transposed` (GPT-2's `Conv1D` stores `[in, out]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
    /// A fused projection stored head by head (GPT-NeoX's and BLOOM's `query_key_value`: each
    /// query head's rows are `parts` consecutive blocks of the head width, its q, k and v): the
    /// rank takes the rows of its query heads.
    PerHead {
        /// Blocks per head.
        parts: usize,
    },
    /// A fused projection stored by key/value group (Falcon's new architecture: each group's
    /// query heads, then its key head and its value head): the rank takes its query heads and
    /// the key/value heads they read, reordered as all queries, then keys, then values.
    Grouped,
    /// Every rank holds the whole tensor (norms, position tables, biases added after a reduce).
    Replicate,
    /// A mixture of experts' router: every rank holds it whole, in f32 whatever the weights'
    /// dtype (rounded to half precision it flips near-tied choices of experts; llama.cpp's
    /// converter keeps it in f32 too).
    Router,
    /// A tensor of one expert of a mixture of experts, held whole by the rank that owns the
    /// expert and by no other (expert parallelism). The expert's number is the last number among
    /// the dot-separated parts of the tensor's name (`layers.3.mlp.experts.5.up_proj.weight`: 5).
    Expert,
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
        !matches!(self, Role::Replicate | Role::Router)
    }

    /// Whether the tensors of this role belong to the routed experts of a mixture of experts
    /// (split along their width, or held whole).
    pub fn holds_routed_experts(&self) -> bool {
        *self == Role::Expert || self.splits_expert_width()
    }

    /// Whether this splits an expert's width (tensor-parallel experts).
    fn splits_expert_width(&self) -> bool {
        match self {
            Role::Column { parts, .. } => parts.contains(&Partition::ExpertIntermediate),
            Role::Row { partition, .. } => *partition == Partition::ExpertIntermediate,
            _ => false,
        }
    }
}

/// The number of the expert a tensor of [`Role::Expert`] belongs to: the last number among the
/// dot-separated parts of its name.
pub fn expert_number(name: &str) -> Option<usize> {
    name.split('.').rev().find_map(|part| part.parse().ok())
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
    /// How the wiring's tensor names are spelled in the checkpoint (policy files only).
    #[serde(default)]
    pub renames: Vec<Rename>,
}

/// One of the wiring's name patterns and the checkpoint's spelling of it; their `*`s
/// correspond in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rename {
    /// The wiring's name pattern (`layers.*.self_attn.q_proj.weight`).
    pub wiring: String,
    /// The checkpoint's name pattern (`blocks.*.attn.wq.weight`).
    pub checkpoint: String,
}

impl Policy {
    /// How this policy divides a mixture of experts: [`ExpertSplit::Expert`] when its experts'
    /// tensors are held whole ([`Role::Expert`]).
    pub fn expert_split(&self) -> ExpertSplit {
        match self.rules.iter().any(|rule| rule.role == Role::Expert) {
            true => ExpertSplit::Expert,
            false => ExpertSplit::Tensor,
        }
    }

    /// This policy with its mixture of experts divided as `split` says: for
    /// [`ExpertSplit::Expert`], every tensor split along an expert's width is held whole by the
    /// rank owning its expert instead. A policy that holds experts whole cannot be turned back
    /// (it no longer says which way each tensor was split), nor can a policy without experts
    /// be split by them; both are errors that say so.
    pub fn with_expert_split(mut self, split: ExpertSplit) -> Result<Self, String> {
        let splits_width = self.rules.iter().any(|r| r.role.splits_expert_width());
        match (split, self.expert_split()) {
            (ExpertSplit::Expert, ExpertSplit::Expert) => Ok(self),
            (ExpertSplit::Tensor, ExpertSplit::Tensor) => Ok(self),
            (ExpertSplit::Tensor, ExpertSplit::Expert) => Err(format!(
                "policy `{}` holds whole experts on each rank (split = \"expert\"); \
                 tensor-parallel experts need its rules to split them by column and row",
                self.name
            )),
            (ExpertSplit::Expert, ExpertSplit::Tensor) if !splits_width => Err(format!(
                "the model (policy `{}`) has no mixture of experts to split by expert",
                self.name
            )),
            (ExpertSplit::Expert, ExpertSplit::Tensor) => {
                for rule in &mut self.rules {
                    if rule.role.splits_expert_width() {
                        rule.role = Role::Expert;
                    }
                }
                Ok(self)
            }
        }
    }

    /// The built-in policy for a resolved configuration (what transformers calls `AutoPolicy`).
    pub fn for_config(config: &ModelConfig) -> Self {
        match config.family {
            Family::Gpt2 => match config.model_type.as_str() {
                "gpt_bigcode" => tables::gpt_bigcode(),
                "opt" => tables::opt(),
                "gpt_neo" => tables::gpt_neo(),
                _ => tables::gpt2(),
            },
            Family::Llama => tables::llama(config),
            Family::Phi => match config.model_type.as_str() {
                "gptj" => tables::gptj(),
                "gpt_neox" => tables::gpt_neox(),
                "bloom" => tables::bloom(),
                "falcon" => tables::falcon(config),
                _ => tables::phi(),
            },
            Family::Bert => match config.model_type.as_str() {
                "distilbert" => tables::distilbert(),
                "albert" => tables::albert(),
                _ => tables::bert(),
            },
            Family::Bart => tables::bart(),
            Family::T5 => tables::t5(),
        }
    }

    /// The checkpoint's spelling of the wiring's tensor `name` (relative to the base model):
    /// the first rename that matches it, else the name itself.
    pub fn checkpoint_name(&self, name: &str) -> String {
        self.renames
            .iter()
            .find_map(|rename| {
                let captured = glob_captures(&rename.wiring, name)?;
                let mut pieces = rename.checkpoint.split('*');
                let mut spelled = pieces.next().unwrap_or_default().to_string();
                for (piece, value) in pieces.zip(captured) {
                    spelled.push_str(value);
                    spelled.push_str(piece);
                }
                Some(spelled)
            })
            .unwrap_or_else(|| name.to_string())
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
            .find(|rule| glob_captures(&rule.pattern, base).is_some())
            .map(|rule| &rule.role)
    }
}

/// Matches `text` against `pattern`, where `*` stands for any (possibly empty) run of
/// characters; on a match, what each `*` stood for (the shortest runs, from the left).
///
/// Each literal piece between two `*`s is placed at its first occurrence after the previous
/// one: a later placement never matches where the first one fails, because a `*` follows it.
/// The last piece must end the text. So the time is linear in the pattern and the text, where
/// backtracking over every run of every `*` would be exponential in the number of `*`s (both
/// come from files the user may not control: a policy file, a checkpoint's tensor names).
fn glob_captures<'t>(pattern: &str, text: &'t str) -> Option<Vec<&'t str>> {
    let mut pieces = pattern.split('*');
    let first = pieces.next().unwrap_or_default();
    let Some(last) = pieces.next_back() else {
        return (pattern == text).then(Vec::new);
    };
    let mut rest = text.strip_prefix(first)?;
    // The last piece is cut off first, so that no middle piece can take its characters.
    let end = rest.len().checked_sub(last.len())?;
    if !rest.ends_with(last) {
        return None;
    }
    rest = &rest[..end];
    let mut captured = Vec::new();
    for piece in pieces {
        let at = rest.find(piece)?;
        captured.push(&rest[..at]);
        rest = &rest[at + piece.len()..];
    }
    captured.push(rest);
    Some(captured)
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
            Role::PerHead { parts } => write!(f, "per_head({parts})"),
            Role::Grouped => write!(f, "grouped(q+k+v)"),
            Role::Replicate => write!(f, "replicate"),
            Role::Router => write!(f, "replicate (f32)"),
            Role::Expert => write!(f, "expert (whole)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_matches_layer_numbers_and_nothing_else_differs() {
        assert_eq!(
            glob_captures("h.*.attn.c_attn.weight", "h.11.attn.c_attn.weight"),
            Some(vec!["11"])
        );
        assert_eq!(
            glob_captures("h.*.attn.c_attn.weight", "h.11.attn.c_attn.bias"),
            None
        );
        assert_eq!(glob_captures("*", ""), Some(vec![""]));
        assert_eq!(glob_captures("a*b*c", "axxbyyc"), Some(vec!["xx", "yy"]));
        // Shortest runs from the left; the last piece ends the text.
        assert_eq!(glob_captures("*.*", "a.b.c"), Some(vec!["a", "b.c"]));
        assert_eq!(glob_captures("*b*b", "abbb"), Some(vec!["a", "b"]));
        assert_eq!(glob_captures("a*a", "a"), None);
        assert_eq!(glob_captures("ab*ba", "aba"), None);
        assert_eq!(glob_captures("**", "xy"), Some(vec!["", "xy"]));
        assert_eq!(glob_captures("x*é*", "xéé"), Some(vec!["", "é"]));
    }

    #[test]
    fn globs_with_many_stars_fail_fast() {
        // Exponential for a backtracking matcher (about 200^30 placements of the stars).
        let pattern = format!("{}b", "*a".repeat(30));
        let text = "a".repeat(200);
        assert_eq!(glob_captures(&pattern, &text), None);
        let ending = format!("{text}b");
        let matched = glob_captures(&pattern, &ending).expect("matches");
        assert_eq!(matched.len(), 30);
        assert_eq!(matched[29], "a".repeat(170));
    }

    #[test]
    fn renames_carry_what_the_stars_matched() {
        let policy = Policy {
            renames: vec![Rename {
                wiring: "layers.*.mlp.*_proj.weight".into(),
                checkpoint: "blocks.*.ffn.w_*.weight".into(),
            }],
            ..tables::llama(&decoder_config("llama"))
        };
        assert_eq!(
            policy.checkpoint_name("layers.7.mlp.gate_proj.weight"),
            "blocks.7.ffn.w_gate.weight"
        );
        assert_eq!(policy.checkpoint_name("norm.weight"), "norm.weight");
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

    /// A tiny configuration of the Llama-style `model_type`.
    fn decoder_config(model_type: &str) -> ModelConfig {
        let json = format!(
            r#"{{"model_type":"{model_type}","vocab_size":10,"hidden_size":16,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":24}}"#
        );
        crate::checkpoint::config::RawConfig::from_value(serde_json::from_str(&json).unwrap())
            .and_then(crate::checkpoint::config::RawConfig::resolve)
            .unwrap()
    }

    #[test]
    fn moe_experts_split_like_the_dense_mlp_by_their_own_width_and_routers_are_replicated() {
        let expert = |partition| Role::Column {
            parts: vec![partition],
            transposed: false,
        };
        let down = Role::Row {
            partition: Partition::ExpertIntermediate,
            transposed: false,
        };
        let mixtral = tables::llama(&decoder_config("mixtral"));
        let m = "model.layers.1.block_sparse_moe";
        for (name, role) in [
            ("gate.weight", Role::Router),
            ("experts.7.w1.weight", expert(Partition::ExpertIntermediate)),
            ("experts.7.w3.weight", expert(Partition::ExpertIntermediate)),
            ("experts.7.w2.weight", down.clone()),
        ] {
            assert_eq!(
                mixtral.role_of(&format!("{m}.{name}")),
                Some(&role),
                "{name}"
            );
        }
        let qwen = tables::llama(&decoder_config("qwen3_moe"));
        let q = "model.layers.0.mlp";
        for (name, role) in [
            ("gate.weight", Role::Router),
            (
                "experts.3.gate_proj.weight",
                expert(Partition::ExpertIntermediate),
            ),
            ("experts.3.down_proj.weight", down),
            // A dense layer's MLP.
            ("gate_proj.weight", expert(Partition::Intermediate)),
        ] {
            assert_eq!(qwen.role_of(&format!("{q}.{name}")), Some(&role), "{name}");
        }
    }

    #[test]
    fn splitting_by_expert_holds_every_expert_tensor_whole_and_nothing_else_changes() {
        let tensor = tables::llama(&decoder_config("mixtral"));
        assert_eq!(tensor.expert_split(), ExpertSplit::Tensor);
        let whole = tensor
            .clone()
            .with_expert_split(ExpertSplit::Expert)
            .unwrap();
        assert_eq!(whole.expert_split(), ExpertSplit::Expert);
        for (before, after) in tensor.rules.iter().zip(&whole.rules) {
            match before.pattern.contains("experts") {
                true => assert_eq!(after.role, Role::Expert, "{}", before.pattern),
                false => assert_eq!(after, before),
            }
        }
        // Asking again changes nothing; going back, or a dense model, is refused.
        assert_eq!(
            whole.clone().with_expert_split(ExpertSplit::Expert),
            Ok(whole.clone())
        );
        let back = whole.with_expert_split(ExpertSplit::Tensor).unwrap_err();
        assert!(back.contains("holds whole experts"), "{back}");
        let dense = tables::llama(&decoder_config("llama"));
        let err = dense.with_expert_split(ExpertSplit::Expert).unwrap_err();
        assert!(err.contains("no mixture of experts"), "{err}");
    }

    #[test]
    fn an_experts_number_is_the_last_number_in_its_name() {
        assert_eq!(
            expert_number("model.layers.3.mlp.experts.5.up_proj.weight"),
            Some(5)
        );
        assert_eq!(
            expert_number("layers.12.block_sparse_moe.experts.0.w1.weight"),
            Some(0)
        );
        assert_eq!(expert_number("norm.weight"), None);
    }

    #[test]
    fn qwen2_moe_splits_its_shared_expert_by_its_own_width_and_replicates_its_gate() {
        let p = tables::llama(&decoder_config("qwen2_moe"));
        let m = "model.layers.2.mlp";
        let shared = Role::column(Partition::SharedExpertIntermediate);
        for (name, role) in [
            ("shared_expert.gate_proj.weight", shared.clone()),
            ("shared_expert.up_proj.weight", shared),
            (
                "shared_expert.down_proj.weight",
                Role::Row {
                    partition: Partition::SharedExpertIntermediate,
                    transposed: false,
                },
            ),
            ("shared_expert_gate.weight", Role::Replicate),
            ("gate.weight", Role::Router),
            (
                "experts.5.up_proj.weight",
                Role::column(Partition::ExpertIntermediate),
            ),
            ("up_proj.weight", Role::column(Partition::Intermediate)),
        ] {
            assert_eq!(p.role_of(&format!("{m}.{name}")), Some(&role), "{name}");
        }
        // OLMoE: experts as Qwen's, q/k norms split with their heads as OLMo 2's.
        let olmoe = tables::llama(&decoder_config("olmoe"));
        assert_eq!(
            olmoe.role_of("model.layers.0.self_attn.q_norm.weight"),
            Some(&Role::column(Partition::Heads))
        );
        assert_eq!(
            olmoe.role_of(&format!("{m}.experts.0.down_proj.weight")),
            Some(&Role::Row {
                partition: Partition::ExpertIntermediate,
                transposed: false,
            })
        );
    }

    #[test]
    fn phi3_fused_projections_split_each_part_by_its_own_share() {
        let p = tables::llama(&decoder_config("phi3"));
        assert_eq!(
            p.role_of("model.layers.0.self_attn.qkv_proj.weight"),
            Some(&Role::column_parts(vec![
                Partition::Heads,
                Partition::KvHeads,
                Partition::KvHeads
            ]))
        );
        assert_eq!(
            p.role_of("model.layers.1.mlp.gate_up_proj.weight"),
            Some(&Role::column_parts(vec![Partition::Intermediate; 2]))
        );
        assert_eq!(p.role_of("model.layers.0.self_attn.q_proj.weight"), None);
    }

    #[test]
    fn olmo2_splits_its_whole_projection_qk_norms_and_qwen3_replicates_its_per_head_ones() {
        let olmo = tables::llama(&decoder_config("olmo2"));
        assert_eq!(
            olmo.role_of("model.layers.0.self_attn.k_norm.weight"),
            Some(&Role::column(Partition::KvHeads))
        );
        let qwen = tables::llama(&decoder_config("qwen3"));
        assert_eq!(
            qwen.role_of("model.layers.0.self_attn.k_norm.weight"),
            Some(&Role::Replicate)
        );
        let gemma = tables::llama(&decoder_config("gemma2"));
        assert_eq!(
            gemma.role_of("model.layers.0.pre_feedforward_layernorm.weight"),
            Some(&Role::Replicate)
        );
        let starcoder = tables::llama(&decoder_config("starcoder2"));
        assert!(matches!(
            starcoder.role_of("model.layers.0.mlp.c_proj.weight"),
            Some(Role::Row {
                partition: Partition::Intermediate,
                ..
            })
        ));
    }

    #[test]
    fn llama_roles_follow_megatron() {
        let p = tables::llama(&decoder_config("llama"));
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
    fn policies_round_trip_through_json_and_the_wire() {
        let p = tables::bert();
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Policy>(&text).unwrap(), p);
        // The ranks receive policies in their load request.
        let wire = postcard::to_stdvec(&p).unwrap();
        assert_eq!(postcard::from_bytes::<Policy>(&wire).unwrap(), p);
    }
}
