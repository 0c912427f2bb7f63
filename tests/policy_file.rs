//! Policy files: the llama fixture with every tensor renamed, its configuration fields respelled
//! and a model_type of its own runs with only a policy file, as transformers does the original
//! (f32 within 1e-4 at 1, 2 and 3 ranks, identical greedy tokens); `inspect` shows the plan the
//! file gives; mistakes in a policy are reported, naming the entry, before any rank starts.

mod common;

use std::path::{Path, PathBuf};

use common::{binary, fixture, masked_max_diff, options, reference, reference_batch};
use parallelformers::{parallelize, GenerationConfig, Options};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

/// The llama fixture's names and the renamed checkpoint's, in order of replacement.
const RENAMES: [(&str, &str); 12] = [
    ("model.embed_tokens.", "backbone.tok_embeddings."),
    ("model.layers.", "backbone.blocks."),
    ("self_attn.q_proj.", "attn.wq."),
    ("self_attn.k_proj.", "attn.wk."),
    ("self_attn.v_proj.", "attn.wv."),
    ("self_attn.o_proj.", "attn.wo."),
    ("mlp.gate_proj.", "ffn.w_gate."),
    ("mlp.up_proj.", "ffn.w_up."),
    ("mlp.down_proj.", "ffn.w_down."),
    ("post_attention_layernorm.", "norm2."),
    ("input_layernorm.", "norm1."),
    ("model.norm.", "backbone.final_norm."),
];

const POLICY: &str = r#"
model_type = "tinyllm"
wiring = "llama"
prefixes = ["backbone."]

[config]
hidden_size = "d_model"
num_hidden_layers = "n_layers"

[[tensor]]
name = "tok_embeddings.weight"
wiring_name = "embed_tokens.weight"
split = "column"
partition = "vocab"

[[tensor]]
name = "head.weight"
wiring_name = "lm_head.weight"
split = "column"
partition = "vocab"

[[tensor]]
name = "blocks.*.attn.wq.weight"
wiring_name = "layers.*.self_attn.q_proj.weight"
split = "column"
partition = "heads"

[[tensor]]
name = "blocks.*.attn.wo.weight"
wiring_name = "layers.*.self_attn.o_proj.weight"
split = "row"
partition = "heads"

# First match wins: the entries above take wq and wo.
[[tensor]]
name = "blocks.*.attn.w*.weight"
wiring_name = "layers.*.self_attn.*_proj.weight"
split = "column"
partition = "kv_heads"

[[tensor]]
name = "blocks.*.ffn.w_down.weight"
wiring_name = "layers.*.mlp.down_proj.weight"
split = "row"
partition = "intermediate"

[[tensor]]
name = "blocks.*.ffn.w_*.weight"
wiring_name = "layers.*.mlp.*_proj.weight"
split = "column"
partition = "intermediate"

[[tensor]]
name = "blocks.*.norm1.weight"
wiring_name = "layers.*.input_layernorm.weight"
split = "replicate"

[[tensor]]
name = "blocks.*.norm2.weight"
wiring_name = "layers.*.post_attention_layernorm.weight"
split = "replicate"

[[tensor]]
name = "final_norm.weight"
wiring_name = "norm.weight"
split = "replicate"
"#;

/// Writes the renamed llama checkpoint into `dir`.
fn renamed_llama(dir: &Path) {
    let source = fixture("llama");
    let mut tensors: Vec<(String, Vec<u8>, safetensors::Dtype, Vec<usize>)> = Vec::new();
    for entry in std::fs::read_dir(&source).unwrap().flatten() {
        let name = entry.file_name().into_string().unwrap();
        if !name.starts_with("model-") {
            continue;
        }
        let bytes = std::fs::read(entry.path()).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        for (tensor, view) in file.tensors() {
            let renamed = match tensor.as_str() {
                "lm_head.weight" => "head.weight".to_string(),
                _ => RENAMES
                    .iter()
                    .fold(tensor, |n, (from, to)| n.replace(from, to)),
            };
            tensors.push((
                renamed,
                view.data().to_vec(),
                view.dtype(),
                view.shape().to_vec(),
            ));
        }
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, data, dtype, shape)| {
            (
                n.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    let fields = config.as_object_mut().unwrap();
    for (from, to) in [
        ("hidden_size", "d_model"),
        ("num_hidden_layers", "n_layers"),
    ] {
        let value = fields.remove(from).unwrap();
        fields.insert(to.into(), value);
    }
    fields.insert("model_type".into(), "tinyllm".into());
    fields.insert(
        "architectures".into(),
        serde_json::json!(["TinyLLMForCausalLM"]),
    );
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        source.join("generation_config.json"),
        dir.join("generation_config.json"),
    )
    .unwrap();
}

/// A renamed checkpoint and a policy file (with `edit` applied to its text) in a fresh
/// directory; the directory, the checkpoint and the policy's paths.
fn setup(edit: impl Fn(&str) -> String) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tinyllm");
    std::fs::create_dir(&model).unwrap();
    renamed_llama(&model);
    let policy = dir.path().join("tinyllm.toml");
    std::fs::write(&policy, edit(POLICY)).unwrap();
    (dir, model, policy)
}

/// Runs `model` through `policy` at each of `ranks`: logits within 1e-4 of `fixture`'s
/// reference, and `greedy`'s tokens equal to its recorded `expected` ids.
fn assert_runs_like_the_fixture(
    model: &Path,
    policy: &Path,
    fixture: &str,
    ranks: &[usize],
    greedy: &GenerationConfig,
    expected: &str,
) {
    let refs = reference(fixture);
    for &ranks in ranks {
        let mut parallel = parallelize(model, with_policy(ranks, policy)).unwrap();
        let out = parallel.forward(&reference_batch(&refs)).unwrap();
        let diff = masked_max_diff(&out.data, &refs["logits"], &refs["attention_mask"]);
        assert!(diff < 1e-4, "{fixture}, {ranks} ranks: {diff}");
        let generated = parallel
            .generate(&refs["generate_input_ids"].ids(), greedy)
            .unwrap();
        assert_eq!(
            generated.ids,
            refs[expected].ids(),
            "{fixture}, {ranks} ranks"
        );
        parallel.deparallelize();
    }
}

fn with_policy(ranks: usize, policy: &Path) -> Options {
    Options {
        policy: Some(policy.to_path_buf()),
        ..options(ranks)
    }
}

#[test]
fn a_renamed_checkpoint_runs_like_the_original_with_only_a_policy_file() {
    let (_dir, model, policy) = setup(str::to_string);
    let greedy = GenerationConfig {
        max_new_tokens: 12,
        ..GenerationConfig::default()
    };
    assert_runs_like_the_fixture(
        &model,
        &policy,
        "llama",
        &[1, 2, 3],
        &greedy,
        "generate_output_ids",
    );
    let plan = std::process::Command::new(binary())
        .args(["inspect", "--ranks", "2", "--model"])
        .arg(&model)
        .arg("--policy")
        .arg(&policy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    assert!(text.contains("policy `tinyllm`"), "{text}");
    assert!(text.contains("backbone.blocks.0.attn.wq.weight"), "{text}");
}

#[test]
fn mistakes_in_a_policy_are_named_before_any_rank_starts() {
    /// What each case changes in the policy, and what the error must say.
    type Case = (&'static str, fn(&str) -> String, &'static str);
    let cases: [Case; 7] = [
        (
            "unknown split",
            |p| p.replacen("split = \"row\"", "split = \"diagonal\"", 1),
            "diagonal",
        ),
        (
            "unknown wiring",
            |p| p.replace("wiring = \"llama\"", "wiring = \"mamba\""),
            "wiring `mamba`",
        ),
        (
            "a pattern that matches nothing",
            |p| p.replace("attn.wq.weight\"", "attn.wz.weight\""),
            "`blocks.*.attn.wz.weight` matches no tensor",
        ),
        (
            "a tensor no rule covers",
            |p| p.replace("name = \"final_norm.weight\"", "name = \"x\""),
            "covers the checkpoint's tensor `backbone.final_norm.weight`",
        ),
        (
            "a partition a replicated tensor cannot take",
            |p| {
                p.replace(
                    "split = \"replicate\"\n",
                    "split = \"replicate\"\npartition = \"heads\"\n",
                )
            },
            "a replicate split takes no partition",
        ),
        (
            "an expert split with a partition",
            |p| p.replacen("split = \"row\"", "split = \"expert\"", 1),
            "an expert split takes no partition",
        ),
        (
            "whole experts of a model without experts",
            |p| {
                p.replacen(
                    "split = \"row\"\npartition = \"intermediate\"",
                    "split = \"expert\"",
                    1,
                )
            },
            "has no mixture of experts",
        ),
    ];
    for (case, edit, needle) in cases {
        let (_dir, model, policy) = setup(edit);
        let error = match parallelize(&model, with_policy(2, &policy)) {
            Ok(_) => panic!("{case}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains(needle), "{case}: {error}");
    }
    let (_dir, model, _policy) = setup(str::to_string);
    let error = match parallelize(&model, options(2)) {
        Ok(_) => panic!("an unknown model_type was accepted without a policy"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("tinyllm"), "{error}");
}

/// The fixture `name` in a fresh directory under `model_type`, its tensors' `model.` prefix
/// spelled `decoder.`, with a policy file beside it: `policy` followed by [`DECODER_TENSORS`];
/// the directory, the checkpoint and the policy's paths.
fn under_a_model_type_of_its_own(
    name: &str,
    model_type: &str,
    policy: &str,
) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join(model_type);
    std::fs::create_dir(&model).unwrap();
    let source = fixture(name);
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, TensorView)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name.replacen("model.", "decoder.", 1), view))
        .collect();
    safetensors::serialize_to_file(views, None, &model.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    config["model_type"] = model_type.into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let policy_path = dir.path().join(format!("{model_type}.toml"));
    std::fs::write(&policy_path, format!("{policy}{DECODER_TENSORS}")).unwrap();
    (dir, model, policy_path)
}

/// The attention, embedding and norm entries of a Llama-style decoder whose tensors are the
/// wiring's own names behind `decoder.`: what the Gemma 2 and Mixtral policies below share.
const DECODER_TENSORS: &str = r#"
[[tensor]]
name = "embed_tokens.weight"
wiring_name = "embed_tokens.weight"
split = "column"
partition = "vocab"

[[tensor]]
name = "layers.*.self_attn.q_proj.weight"
wiring_name = "layers.*.self_attn.q_proj.weight"
split = "column"
partition = "heads"

[[tensor]]
name = "layers.*.self_attn.o_proj.weight"
wiring_name = "layers.*.self_attn.o_proj.weight"
split = "row"
partition = "heads"

[[tensor]]
name = "layers.*.self_attn.*_proj.weight"
wiring_name = "layers.*.self_attn.*_proj.weight"
split = "column"
partition = "kv_heads"

[[tensor]]
name = "layers.*.*_layernorm.weight"
wiring_name = "layers.*.*_layernorm.weight"
split = "replicate"

[[tensor]]
name = "norm.weight"
wiring_name = "norm.weight"
split = "replicate"
"#;

/// A Gemma 2 checkpoint under a `model_type` of its own: its sandwich norms, soft-capping and
/// alternating windows come with `wiring = "gemma2"`, read from its `config.json`.
const GEMMA2_POLICY: &str = r#"
model_type = "mygemma"
wiring = "gemma2"
prefixes = ["decoder."]

[[tensor]]
name = "layers.*.mlp.down_proj.weight"
wiring_name = "layers.*.mlp.down_proj.weight"
split = "row"
partition = "intermediate"

[[tensor]]
name = "layers.*.mlp.*_proj.weight"
wiring_name = "layers.*.mlp.*_proj.weight"
split = "column"
partition = "intermediate"
"#;

#[test]
fn a_policy_file_brings_the_switches_of_a_todays_wiring() {
    let (_dir, model, policy) = under_a_model_type_of_its_own("gemma2", "mygemma", GEMMA2_POLICY);
    let greedy = GenerationConfig {
        max_new_tokens: 12,
        eos_token_id: None,
        min_new_tokens: 12,
        ..GenerationConfig::default()
    };
    assert_runs_like_the_fixture(
        &model,
        &policy,
        "gemma2",
        &[1, 3],
        &greedy,
        "generate_min_output_ids",
    );
}

/// A Mixtral checkpoint under a `model_type` of its own, its experts held whole by the ranks
/// (`split = "expert"`): expert parallelism chosen by the policy file.
const MIXTRAL_POLICY: &str = r#"
model_type = "mymoe"
wiring = "mixtral"
prefixes = ["decoder."]

[[tensor]]
name = "lm_head.weight"
wiring_name = "lm_head.weight"
split = "column"
partition = "vocab"

[[tensor]]
name = "layers.*.block_sparse_moe.gate.weight"
wiring_name = "layers.*.block_sparse_moe.gate.weight"
split = "replicate"

[[tensor]]
name = "layers.*.block_sparse_moe.experts.*.weight"
wiring_name = "layers.*.block_sparse_moe.experts.*.weight"
split = "expert"
"#;

#[test]
fn a_policy_file_can_hold_whole_experts_on_each_rank() {
    let (_dir, model, policy) = under_a_model_type_of_its_own("mixtral", "mymoe", MIXTRAL_POLICY);
    let greedy = GenerationConfig {
        max_new_tokens: 12,
        ..GenerationConfig::default()
    };
    assert_runs_like_the_fixture(
        &model,
        &policy,
        "mixtral",
        &[1, 3],
        &greedy,
        "generate_output_ids",
    );
    // The ranks hold 2 of the 6 experts each; `inspect` shows which and their bytes.
    let parallel = parallelize(&model, with_policy(3, &policy)).unwrap();
    let held: Vec<_> = parallel
        .load_report()
        .iter()
        .map(|m| m.experts.map(|e| (e.first, e.count)))
        .collect();
    parallel.deparallelize();
    assert_eq!(held, [Some((0, 2)), Some((2, 2)), Some((4, 2))]);
    let inspect = |extra: &[&str]| {
        std::process::Command::new(binary())
            .args(["inspect", "--ranks", "3", "--model"])
            .arg(&model)
            .arg("--policy")
            .arg(&policy)
            .args(extra)
            .output()
            .unwrap()
    };
    let plan = inspect(&[]);
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    assert!(
        text.contains(
            "expert parallelism, whole experts 0-1 of 6 | experts 2-3 of 6 | experts 4-5 of 6"
        ),
        "{text}"
    );
    assert!(text.contains("rank 2: weights"), "{text}");
    assert!(
        text.contains("whole experts 120.0 KiB), experts 4-5 of 6"),
        "{text}"
    );
    // Asking such a policy for tensor-parallel experts is refused, naming the reason.
    let refused = inspect(&["--expert-split", "tensor"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(err.contains("holds whole experts"), "{err}");
}
