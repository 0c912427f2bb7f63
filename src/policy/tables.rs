//! The built-in policies: GPT-2, the Llama family (Llama, Mistral, Qwen2) and BERT.

use super::{Partition, Policy, Role, Rule};
use Partition::{Heads, Intermediate, KvHeads, Vocab};

fn rule(pattern: &str, role: Role) -> Rule {
    Rule {
        pattern: pattern.to_string(),
        role,
    }
}

fn column(partition: Partition) -> Role {
    Role::column(partition)
}

fn row(partition: Partition) -> Role {
    Role::Row {
        partition,
        transposed: false,
    }
}

fn policy(name: &str, prefixes: &[&str], rules: Vec<Rule>) -> Policy {
    Policy {
        name: name.to_string(),
        prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
        rules,
        renames: Vec::new(),
    }
}

/// GPT-2: fused `c_attn` (q, k, v) and `Conv1D` weights stored `[in, out]`.
pub fn gpt2() -> Policy {
    let conv_column = |parts: Vec<Partition>| Role::Column {
        parts,
        transposed: true,
    };
    let conv_row = |partition| Role::Row {
        partition,
        transposed: true,
    };
    policy(
        "gpt2",
        &["transformer.", ""],
        vec![
            rule("wte.weight", column(Vocab)),
            rule("lm_head.weight", column(Vocab)),
            rule("h.*.attn.c_attn.weight", conv_column(vec![Heads; 3])),
            rule("h.*.attn.c_attn.bias", Role::column_parts(vec![Heads; 3])),
            rule("h.*.attn.c_proj.weight", conv_row(Heads)),
            rule("h.*.mlp.c_fc.weight", conv_column(vec![Intermediate])),
            rule("h.*.mlp.c_fc.bias", column(Intermediate)),
            rule("h.*.mlp.c_proj.weight", conv_row(Intermediate)),
            rule("wpe.weight", Role::Replicate),
            rule("h.*.ln_*", Role::Replicate),
            rule("h.*.c_proj.bias", Role::Replicate),
            rule("ln_f.*", Role::Replicate),
        ],
    )
}

/// Llama, Mistral and Qwen2: separate q/k/v (Qwen2 with biases), SwiGLU, RMSNorm.
pub fn llama() -> Policy {
    policy(
        "llama",
        &["model.", ""],
        vec![
            rule("embed_tokens.weight", column(Vocab)),
            rule("lm_head.weight", column(Vocab)),
            rule("layers.*.self_attn.q_proj.*", column(Heads)),
            rule("layers.*.self_attn.k_proj.*", column(KvHeads)),
            rule("layers.*.self_attn.v_proj.*", column(KvHeads)),
            rule("layers.*.self_attn.o_proj.weight", row(Heads)),
            rule("layers.*.mlp.gate_proj.*", column(Intermediate)),
            rule("layers.*.mlp.up_proj.*", column(Intermediate)),
            rule("layers.*.mlp.down_proj.weight", row(Intermediate)),
            rule("layers.*.self_attn.o_proj.bias", Role::Replicate),
            rule("layers.*.mlp.down_proj.bias", Role::Replicate),
            rule("layers.*.input_layernorm.weight", Role::Replicate),
            rule("layers.*.post_attention_layernorm.weight", Role::Replicate),
            rule("norm.weight", Role::Replicate),
        ],
    )
}

/// BERT (base model and masked-LM head): post-LayerNorm blocks, tied decoder.
pub fn bert() -> Policy {
    policy(
        "bert",
        &["bert.", "roberta.", ""],
        vec![
            rule("embeddings.word_embeddings.weight", column(Vocab)),
            rule("embeddings.position_embeddings.weight", Role::Replicate),
            rule("embeddings.token_type_embeddings.weight", Role::Replicate),
            rule("embeddings.LayerNorm.*", Role::Replicate),
            rule("encoder.layer.*.attention.self.query.*", column(Heads)),
            rule("encoder.layer.*.attention.self.key.*", column(Heads)),
            rule("encoder.layer.*.attention.self.value.*", column(Heads)),
            rule("encoder.layer.*.attention.output.dense.weight", row(Heads)),
            rule("encoder.layer.*.intermediate.dense.*", column(Intermediate)),
            rule("encoder.layer.*.output.dense.weight", row(Intermediate)),
            rule("encoder.layer.*.dense.bias", Role::Replicate),
            rule("encoder.layer.*.LayerNorm.*", Role::Replicate),
            rule("cls.predictions.transform.*", Role::Replicate),
            rule("cls.predictions.decoder.weight", column(Vocab)),
            rule("cls.predictions.decoder.bias", column(Vocab)),
            rule("cls.predictions.bias", column(Vocab)),
        ],
    )
}
