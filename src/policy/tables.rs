//! The built-in policies: the GPT-2 family (GPT-2, GPTBigCode, OPT, GPT-Neo), the Llama family
//! (Llama, Mistral, Qwen2), and BERT with the encoders that reuse its blocks under other names
//! (RoBERTa, ELECTRA, DistilBERT, ALBERT), and the encoder–decoders BART and T5.

use super::{Partition, Policy, Rename, Role, Rule};
use crate::checkpoint::config::{FusedQkv, MlpKind, QkNorm};
use crate::checkpoint::ModelConfig;
use Partition::{
    ExpertIntermediate, Heads, Intermediate, KvHeads, SharedExpertIntermediate, Vocab,
};

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

/// A policy whose tensors are the BERT wiring's under other names: for each entry, the
/// checkpoint's pattern, the wiring's pattern and the role.
fn renamed(name: &str, prefixes: &[&str], entries: &[(&str, &str, Role)]) -> Policy {
    let mut renamed = policy(
        name,
        prefixes,
        entries
            .iter()
            .map(|(checkpoint, _, role)| rule(checkpoint, role.clone()))
            .collect(),
    );
    renamed.renames = entries
        .iter()
        .map(|(checkpoint, wiring, _)| Rename {
            wiring: wiring.to_string(),
            checkpoint: checkpoint.to_string(),
        })
        .collect();
    renamed
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

/// GPTBigCode (StarCoder): GPT-2's names with linear weights, and a fused multi-query
/// `c_attn` (the queries, then the one key and value head, which every rank holds).
pub fn gpt_bigcode() -> Policy {
    policy(
        "gpt_bigcode",
        &["transformer.", ""],
        vec![
            rule("wte.weight", column(Vocab)),
            rule("lm_head.weight", column(Vocab)),
            rule(
                "h.*.attn.c_attn.*",
                Role::column_parts(vec![Heads, KvHeads, KvHeads]),
            ),
            rule("h.*.attn.c_proj.weight", row(Heads)),
            rule("h.*.mlp.c_fc.*", column(Intermediate)),
            rule("h.*.mlp.c_proj.weight", row(Intermediate)),
            rule("wpe.weight", Role::Replicate),
            rule("h.*.ln_*", Role::Replicate),
            rule("h.*.c_proj.bias", Role::Replicate),
            rule("ln_f.*", Role::Replicate),
        ],
    )
}

/// OPT: GPT-2's blocks under its own names, separate q/k/v, positions offset by 2.
pub fn opt() -> Policy {
    let l = "layers.*";
    renamed(
        "opt",
        &["model.decoder.", ""],
        &[
            ("embed_tokens.weight", "wte.weight", column(Vocab)),
            ("lm_head.weight", "lm_head.weight", column(Vocab)),
            ("embed_positions.weight", "wpe.weight", Role::Replicate),
            ("final_layer_norm.*", "ln_f.*", Role::Replicate),
            (
                &format!("{l}.self_attn.q_proj.*"),
                "h.*.attn.q_proj.*",
                column(Heads),
            ),
            (
                &format!("{l}.self_attn.k_proj.*"),
                "h.*.attn.k_proj.*",
                column(KvHeads),
            ),
            (
                &format!("{l}.self_attn.v_proj.*"),
                "h.*.attn.v_proj.*",
                column(KvHeads),
            ),
            (
                &format!("{l}.self_attn.out_proj.weight"),
                "h.*.attn.c_proj.weight",
                row(Heads),
            ),
            (
                &format!("{l}.self_attn.out_proj.bias"),
                "h.*.attn.c_proj.bias",
                Role::Replicate,
            ),
            (
                &format!("{l}.self_attn_layer_norm.*"),
                "h.*.ln_1.*",
                Role::Replicate,
            ),
            (
                &format!("{l}.final_layer_norm.*"),
                "h.*.ln_2.*",
                Role::Replicate,
            ),
            (
                &format!("{l}.fc1.*"),
                "h.*.mlp.c_fc.*",
                column(Intermediate),
            ),
            (
                &format!("{l}.fc2.weight"),
                "h.*.mlp.c_proj.weight",
                row(Intermediate),
            ),
            (
                &format!("{l}.fc2.bias"),
                "h.*.mlp.c_proj.bias",
                Role::Replicate,
            ),
        ],
    )
}

/// GPT-Neo: GPT-2's names with separate q/k/v under `attn.attention`, linear weights.
pub fn gpt_neo() -> Policy {
    let a = "h.*.attn.attention";
    renamed(
        "gpt_neo",
        &["transformer.", ""],
        &[
            ("wte.weight", "wte.weight", column(Vocab)),
            ("lm_head.weight", "lm_head.weight", column(Vocab)),
            ("wpe.weight", "wpe.weight", Role::Replicate),
            ("ln_f.*", "ln_f.*", Role::Replicate),
            (
                &format!("{a}.q_proj.weight"),
                "h.*.attn.q_proj.weight",
                column(Heads),
            ),
            (
                &format!("{a}.k_proj.weight"),
                "h.*.attn.k_proj.weight",
                column(KvHeads),
            ),
            (
                &format!("{a}.v_proj.weight"),
                "h.*.attn.v_proj.weight",
                column(KvHeads),
            ),
            (
                &format!("{a}.out_proj.weight"),
                "h.*.attn.c_proj.weight",
                row(Heads),
            ),
            (
                &format!("{a}.out_proj.bias"),
                "h.*.attn.c_proj.bias",
                Role::Replicate,
            ),
            ("h.*.ln_*", "h.*.ln_*", Role::Replicate),
            ("h.*.mlp.c_fc.*", "h.*.mlp.c_fc.*", column(Intermediate)),
            (
                "h.*.mlp.c_proj.weight",
                "h.*.mlp.c_proj.weight",
                row(Intermediate),
            ),
            (
                "h.*.mlp.c_proj.bias",
                "h.*.mlp.c_proj.bias",
                Role::Replicate,
            ),
        ],
    )
}

/// Phi: separate q/k/v, attention and MLP in parallel; the LM head and its bias split by
/// vocabulary rows.
pub fn phi() -> Policy {
    policy(
        "phi",
        &["model.", ""],
        vec![
            rule("embed_tokens.weight", column(Vocab)),
            rule("lm_head.*", column(Vocab)),
            rule("layers.*.self_attn.q_proj.*", column(Heads)),
            rule("layers.*.self_attn.k_proj.*", column(KvHeads)),
            rule("layers.*.self_attn.v_proj.*", column(KvHeads)),
            rule("layers.*.self_attn.dense.weight", row(Heads)),
            rule("layers.*.mlp.fc1.*", column(Intermediate)),
            rule("layers.*.mlp.fc2.weight", row(Intermediate)),
            rule("layers.*.self_attn.dense.bias", Role::Replicate),
            rule("layers.*.mlp.fc2.bias", Role::Replicate),
            rule("layers.*.input_layernorm.*", Role::Replicate),
            rule("final_layernorm.*", Role::Replicate),
        ],
    )
}

/// GPT-J: Phi's wiring under its own names, without attention biases.
pub fn gptj() -> Policy {
    renamed(
        "gptj",
        &["transformer.", ""],
        &[
            ("wte.weight", "embed_tokens.weight", column(Vocab)),
            ("lm_head.*", "lm_head.*", column(Vocab)),
            (
                "h.*.attn.q_proj.weight",
                "layers.*.self_attn.q_proj.weight",
                column(Heads),
            ),
            (
                "h.*.attn.k_proj.weight",
                "layers.*.self_attn.k_proj.weight",
                column(KvHeads),
            ),
            (
                "h.*.attn.v_proj.weight",
                "layers.*.self_attn.v_proj.weight",
                column(KvHeads),
            ),
            (
                "h.*.attn.out_proj.weight",
                "layers.*.self_attn.dense.weight",
                row(Heads),
            ),
            (
                "h.*.mlp.fc_in.*",
                "layers.*.mlp.fc1.*",
                column(Intermediate),
            ),
            (
                "h.*.mlp.fc_out.weight",
                "layers.*.mlp.fc2.weight",
                row(Intermediate),
            ),
            (
                "h.*.mlp.fc_out.bias",
                "layers.*.mlp.fc2.bias",
                Role::Replicate,
            ),
            ("h.*.ln_1.*", "layers.*.input_layernorm.*", Role::Replicate),
            ("ln_f.*", "final_layernorm.*", Role::Replicate),
        ],
    )
}

/// The per-layer entries of a block with one fused `query_key_value` (GPT-NeoX, BLOOM,
/// Falcon): its layers `l`, attention module `attention`, the fused projection's role, and the
/// attention's and the MLP's LayerNorms.
fn fused_block(l: &str, attention: &str, qkv: Role, norms: &[&str]) -> Vec<(String, String, Role)> {
    let entry =
        |checkpoint: String, wiring: &str, role: Role| (checkpoint, wiring.to_string(), role);
    vec![
        entry(
            format!("{l}.{attention}.query_key_value.*"),
            "layers.*.self_attn.query_key_value.*",
            qkv,
        ),
        entry(
            format!("{l}.{attention}.dense.weight"),
            "layers.*.self_attn.dense.weight",
            row(Heads),
        ),
        entry(
            format!("{l}.{attention}.dense.bias"),
            "layers.*.self_attn.dense.bias",
            Role::Replicate,
        ),
        entry(
            format!("{l}.mlp.dense_h_to_4h.*"),
            "layers.*.mlp.fc1.*",
            column(Intermediate),
        ),
        entry(
            format!("{l}.mlp.dense_4h_to_h.weight"),
            "layers.*.mlp.fc2.weight",
            row(Intermediate),
        ),
        entry(
            format!("{l}.mlp.dense_4h_to_h.bias"),
            "layers.*.mlp.fc2.bias",
            Role::Replicate,
        ),
    ]
    .into_iter()
    .chain(
        norms
            .iter()
            .zip(["input_layernorm", "post_attention_layernorm"])
            .map(|(norm, wiring)| {
                entry(
                    format!("{l}.{norm}.*"),
                    &format!("layers.*.{wiring}.*"),
                    Role::Replicate,
                )
            }),
    )
    .collect()
}

/// [`renamed`] for entries built at run time.
fn renamed_owned(name: &str, prefixes: &[&str], entries: &[(String, String, Role)]) -> Policy {
    let entries: Vec<(&str, &str, Role)> = entries
        .iter()
        .map(|(c, w, r)| (c.as_str(), w.as_str(), r.clone()))
        .collect();
    renamed(name, prefixes, &entries)
}

/// Literal entries as built at run time.
fn owned(entries: &[(&str, &str, Role)]) -> Vec<(String, String, Role)> {
    entries
        .iter()
        .map(|(c, w, r)| (c.to_string(), w.to_string(), r.clone()))
        .collect()
}

/// GPT-NeoX / Pythia: Phi's wiring under its own names, q/k/v fused head by head, a LayerNorm
/// for the MLP, an LM head without a bias.
pub fn gpt_neox() -> Policy {
    let mut entries = owned(&[
        ("embed_in.weight", "embed_tokens.weight", column(Vocab)),
        ("embed_out.weight", "lm_head.weight", column(Vocab)),
        ("final_layer_norm.*", "final_layernorm.*", Role::Replicate),
    ]);
    let norms = &["input_layernorm", "post_attention_layernorm"];
    entries.extend(fused_block(
        "layers.*",
        "attention",
        Role::PerHead { parts: 3 },
        norms,
    ));
    renamed_owned("gpt_neox", &["gpt_neox.", ""], &entries)
}

/// BLOOM: Phi's wiring under its own names, ALiBi, q/k/v fused head by head, a LayerNorm on
/// the embeddings, blocks one after the other.
pub fn bloom() -> Policy {
    let mut entries = owned(&[
        (
            "word_embeddings.weight",
            "embed_tokens.weight",
            column(Vocab),
        ),
        ("lm_head.weight", "lm_head.weight", column(Vocab)),
        (
            "word_embeddings_layernorm.*",
            "embed_layernorm.*",
            Role::Replicate,
        ),
        ("ln_f.*", "final_layernorm.*", Role::Replicate),
    ]);
    let norms = &["input_layernorm", "post_attention_layernorm"];
    entries.extend(fused_block(
        "h.*",
        "self_attention",
        Role::PerHead { parts: 3 },
        norms,
    ));
    renamed_owned("bloom", &["transformer.", ""], &entries)
}

/// Falcon: Phi's wiring under its own names; q/k/v fused by key/value group (the new
/// architecture, and multi-query Falcon-7B with one group) or head by head (neither); the
/// attention and the MLP read LayerNorms of their own (`ln_attn`, `ln_mlp`) or share
/// `input_layernorm`, and without `parallel_attn` the MLP follows on `post_attention_layernorm`.
pub fn falcon(config: &ModelConfig) -> Policy {
    let mut entries = owned(&[
        (
            "word_embeddings.weight",
            "embed_tokens.weight",
            column(Vocab),
        ),
        ("lm_head.weight", "lm_head.weight", column(Vocab)),
        ("ln_f.*", "final_layernorm.*", Role::Replicate),
    ]);
    let qkv = match config.fused_qkv {
        Some(FusedQkv::PerHead) => Role::PerHead { parts: 3 },
        _ => Role::Grouped,
    };
    let norms: &[&str] = match (config.separate_mlp_norm, config.sequential_residual) {
        (true, false) => &["ln_attn", "ln_mlp"],
        (true, true) => &["input_layernorm", "post_attention_layernorm"],
        (false, _) => &["input_layernorm"],
    };
    entries.extend(fused_block("h.*", "self_attention", qkv, norms));
    renamed_owned("falcon", &["transformer.", ""], &entries)
}

/// The Llama-style decoders: separate or fused (Phi-3's `qkv_proj`, `gate_up_proj`) q/k/v and
/// gate/up projections, a gated or plain (StarCoder2's `c_fc`/`c_proj`) MLP, every block norm
/// replicated, and q/k norms replicated unless they span the whole projection (OLMo 2's,
/// split with their heads). Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) split
/// each expert like the dense MLP and replicate the router; Qwen2-MoE's shared expert is split
/// like the dense MLP by its own width, its sigmoid gate replicated.
pub fn llama(config: &ModelConfig) -> Policy {
    let options = config.decoder.as_ref();
    let fused_qkv = options.is_some_and(|o| o.fused_qkv);
    let mlp = options.map_or(MlpKind::Gated, |o| o.mlp);
    let mut rules = vec![
        rule("embed_tokens.weight", column(Vocab)),
        rule("lm_head.weight", column(Vocab)),
        rule("layers.*.self_attn.o_proj.weight", row(Heads)),
        rule("layers.*.self_attn.o_proj.bias", Role::Replicate),
    ];
    rules.extend(match fused_qkv {
        true => vec![rule(
            "layers.*.self_attn.qkv_proj.*",
            Role::column_parts(vec![Heads, KvHeads, KvHeads]),
        )],
        false => vec![
            rule("layers.*.self_attn.q_proj.*", column(Heads)),
            rule("layers.*.self_attn.k_proj.*", column(KvHeads)),
            rule("layers.*.self_attn.v_proj.*", column(KvHeads)),
        ],
    });
    // Every expert split like a dense MLP (tensor-parallel experts); the router replicated in f32.
    if let Some(moe) = options.and_then(|o| o.moe.as_ref()) {
        let [gate, up, down] = moe.names.projections();
        let experts = format!("layers.*.{}.*", moe.names.experts());
        rules.extend([
            rule(
                &format!("layers.*.{}.weight", moe.names.router()),
                Role::Router,
            ),
            rule(
                &format!("{experts}.{gate}.weight"),
                column(ExpertIntermediate),
            ),
            rule(
                &format!("{experts}.{up}.weight"),
                column(ExpertIntermediate),
            ),
            rule(&format!("{experts}.{down}.weight"), row(ExpertIntermediate)),
        ]);
        if moe.shared_expert.is_some() {
            let shared = "layers.*.mlp.shared_expert";
            rules.extend([
                rule(
                    &format!("{shared}.{gate}.weight"),
                    column(SharedExpertIntermediate),
                ),
                rule(
                    &format!("{shared}.{up}.weight"),
                    column(SharedExpertIntermediate),
                ),
                rule(
                    &format!("{shared}.{down}.weight"),
                    row(SharedExpertIntermediate),
                ),
                rule("layers.*.mlp.shared_expert_gate.weight", Role::Replicate),
            ]);
        }
    }
    rules.extend(match mlp {
        MlpKind::Gated => vec![
            rule("layers.*.mlp.gate_proj.*", column(Intermediate)),
            rule("layers.*.mlp.up_proj.*", column(Intermediate)),
        ],
        MlpKind::FusedGated => vec![rule(
            "layers.*.mlp.gate_up_proj.*",
            Role::column_parts(vec![Intermediate, Intermediate]),
        )],
        MlpKind::Plain => vec![rule("layers.*.mlp.c_fc.*", column(Intermediate))],
    });
    let (down, down_bias) = match mlp {
        MlpKind::Plain => ("layers.*.mlp.c_proj.weight", "layers.*.mlp.c_proj.bias"),
        _ => (
            "layers.*.mlp.down_proj.weight",
            "layers.*.mlp.down_proj.bias",
        ),
    };
    rules.push(rule(down, row(Intermediate)));
    rules.push(rule(down_bias, Role::Replicate));
    if options.and_then(|o| o.qk_norm) == Some(QkNorm::WholeProjection) {
        rules.push(rule("layers.*.self_attn.q_norm.*", column(Heads)));
        rules.push(rule("layers.*.self_attn.k_norm.*", column(KvHeads)));
    }
    rules.extend([
        rule("layers.*.self_attn.q_norm.*", Role::Replicate),
        rule("layers.*.self_attn.k_norm.*", Role::Replicate),
        // Block norms, and StableLM's per-head `q_layernorm` / `k_layernorm`.
        rule("layers.*.*layernorm.*", Role::Replicate),
        rule("norm.*", Role::Replicate),
    ]);
    policy("llama", &["model.", ""], rules)
}

/// BERT (base model and masked-LM head): post-LayerNorm blocks, tied decoder.
pub fn bert() -> Policy {
    policy(
        "bert",
        &["bert.", "roberta.", "electra.", ""],
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
            // ELECTRA's projection of its narrower embeddings.
            rule("embeddings_project.*", Role::Replicate),
        ],
    )
}

/// DistilBERT: BERT's post-LayerNorm blocks under other names, without token types.
pub fn distilbert() -> Policy {
    let l = "transformer.layer.*";
    renamed(
        "distilbert",
        &["distilbert.", ""],
        &[
            (
                "embeddings.word_embeddings.weight",
                "embeddings.word_embeddings.weight",
                column(Vocab),
            ),
            (
                "embeddings.position_embeddings.weight",
                "embeddings.position_embeddings.weight",
                Role::Replicate,
            ),
            (
                "embeddings.LayerNorm.*",
                "embeddings.LayerNorm.*",
                Role::Replicate,
            ),
            (
                &format!("{l}.attention.q_lin.*"),
                "encoder.layer.*.attention.self.query.*",
                column(Heads),
            ),
            (
                &format!("{l}.attention.k_lin.*"),
                "encoder.layer.*.attention.self.key.*",
                column(Heads),
            ),
            (
                &format!("{l}.attention.v_lin.*"),
                "encoder.layer.*.attention.self.value.*",
                column(Heads),
            ),
            (
                &format!("{l}.attention.out_lin.weight"),
                "encoder.layer.*.attention.output.dense.weight",
                row(Heads),
            ),
            (
                &format!("{l}.attention.out_lin.bias"),
                "encoder.layer.*.attention.output.dense.bias",
                Role::Replicate,
            ),
            (
                &format!("{l}.sa_layer_norm.*"),
                "encoder.layer.*.attention.output.LayerNorm.*",
                Role::Replicate,
            ),
            (
                &format!("{l}.ffn.lin1.*"),
                "encoder.layer.*.intermediate.dense.*",
                column(Intermediate),
            ),
            (
                &format!("{l}.ffn.lin2.weight"),
                "encoder.layer.*.output.dense.weight",
                row(Intermediate),
            ),
            (
                &format!("{l}.ffn.lin2.bias"),
                "encoder.layer.*.output.dense.bias",
                Role::Replicate,
            ),
            (
                &format!("{l}.output_layer_norm.*"),
                "encoder.layer.*.output.LayerNorm.*",
                Role::Replicate,
            ),
        ],
    )
}

/// ALBERT: factorized embeddings, and one layer whose weights every block shares (each block
/// of the wiring reads the same tensors, which the loader reads once).
pub fn albert() -> Policy {
    let g = "encoder.albert_layer_groups.0.albert_layers.0";
    let shared = |part: &str, wiring: &str, weight: Role, bias: Role| {
        [
            (
                format!("{g}.{part}.weight"),
                format!("encoder.layer.*.{wiring}.weight"),
                weight,
            ),
            (
                format!("{g}.{part}.bias"),
                format!("encoder.layer.*.{wiring}.bias"),
                bias,
            ),
        ]
    };
    let mut entries: Vec<(String, String, Role)> = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            "embeddings.word_embeddings.weight".into(),
            column(Vocab),
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            "embeddings.position_embeddings.weight".into(),
            Role::Replicate,
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            "embeddings.token_type_embeddings.weight".into(),
            Role::Replicate,
        ),
        (
            "embeddings.LayerNorm.*".into(),
            "embeddings.LayerNorm.*".into(),
            Role::Replicate,
        ),
        (
            "encoder.embedding_hidden_mapping_in.*".into(),
            "embeddings_project.*".into(),
            Role::Replicate,
        ),
    ];
    for part in [
        shared(
            "attention.query",
            "attention.self.query",
            column(Heads),
            column(Heads),
        ),
        shared(
            "attention.key",
            "attention.self.key",
            column(Heads),
            column(Heads),
        ),
        shared(
            "attention.value",
            "attention.self.value",
            column(Heads),
            column(Heads),
        ),
        shared(
            "attention.dense",
            "attention.output.dense",
            row(Heads),
            Role::Replicate,
        ),
        shared(
            "attention.LayerNorm",
            "attention.output.LayerNorm",
            Role::Replicate,
            Role::Replicate,
        ),
        shared(
            "ffn",
            "intermediate.dense",
            column(Intermediate),
            column(Intermediate),
        ),
        shared(
            "ffn_output",
            "output.dense",
            row(Intermediate),
            Role::Replicate,
        ),
        shared(
            "full_layer_layer_norm",
            "output.LayerNorm",
            Role::Replicate,
            Role::Replicate,
        ),
    ] {
        entries.extend(part);
    }
    renamed_owned("albert", &["albert.", ""], &entries)
}

/// BART: the shared token embedding and every attention and feed-forward block of the encoder
/// and the decoder (self- and cross-attention alike) split Megatron-style; the learned
/// positions, LayerNorms and `final_logits_bias` (narrowed by each rank) are replicated.
pub fn bart() -> Policy {
    policy(
        "bart",
        &["model.", ""],
        vec![
            rule("shared.weight", column(Vocab)),
            rule("*.embed_tokens.weight", column(Vocab)),
            rule("lm_head.weight", column(Vocab)),
            rule("*_attn.q_proj.*", column(Heads)),
            rule("*_attn.k_proj.*", column(Heads)),
            rule("*_attn.v_proj.*", column(Heads)),
            rule("*_attn.out_proj.weight", row(Heads)),
            rule("*.fc1.*", column(Intermediate)),
            rule("*.fc2.weight", row(Intermediate)),
            rule("*.out_proj.bias", Role::Replicate),
            rule("*.fc2.bias", Role::Replicate),
            rule("*layer_norm*", Role::Replicate),
            rule("*.layernorm_embedding.*", Role::Replicate),
            rule("*.embed_positions.weight", Role::Replicate),
            rule("final_logits_bias", Role::Replicate),
        ],
    )
}

/// T5: the shared token embedding, the attention blocks (self- and cross-attention) and the
/// feed-forward blocks (gated or not) split Megatron-style; the relative position bias table
/// (`[buckets, heads]`, narrowed to its heads by each rank) and the RMS norms are replicated.
pub fn t5() -> Policy {
    policy(
        "t5",
        &[""],
        vec![
            rule("shared.weight", column(Vocab)),
            rule("*.embed_tokens.weight", column(Vocab)),
            rule("lm_head.weight", column(Vocab)),
            rule("*Attention.q.weight", column(Heads)),
            rule("*Attention.k.weight", column(Heads)),
            rule("*Attention.v.weight", column(Heads)),
            rule("*Attention.o.weight", row(Heads)),
            rule("*.relative_attention_bias.weight", Role::Replicate),
            rule("*.DenseReluDense.wi*.weight", column(Intermediate)),
            rule("*.DenseReluDense.wo.weight", row(Intermediate)),
            rule("*layer_norm.weight", Role::Replicate),
        ],
    )
}
