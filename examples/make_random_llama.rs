//! Writes a randomly initialised Llama-style checkpoint for benchmarks (no download needed).
//!
//! The default shape is SmolLM2-135M's (hidden 576, 30 layers, 9 heads, 3 KV heads,
//! intermediate 1536, vocabulary 49152, tied embeddings): about 135M parameters, 540 MB in f32.
//!
//! ```text
//! cargo run --release --example make_random_llama -- /tmp/llama-135m
//! cargo run --release --example make_random_llama -- /tmp/llama-1b --hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 8192 --vocab 32000
//! # Llama-3.2-1B's shape and rotary scaling (llama3, base 500000, factor 32, 8192 original positions):
//! cargo run --release --example make_random_llama -- /tmp/llama-3.2-1b --hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 8192 --vocab 128256 --llama3-rope
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// Parses `--name value` pairs with defaults.
fn arg(args: &[String], name: &str, default: usize) -> anyhow::Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .context("missing value")?
            .parse()
            .with_context(|| format!("bad {name}")),
        None => Ok(default),
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(
        args.first()
            .context("usage: make_random_llama OUT_DIR [--hidden N ...]")?,
    );
    let hidden = arg(&args, "--hidden", 576)?;
    let layers = arg(&args, "--layers", 30)?;
    let heads = arg(&args, "--heads", 9)?;
    let kv_heads = arg(&args, "--kv-heads", 3)?;
    let intermediate = arg(&args, "--intermediate", 1536)?;
    let vocab = arg(&args, "--vocab", 49152)?;
    let head_dim = hidden / heads;
    std::fs::create_dir_all(&out)?;
    let mut config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate, "vocab_size": vocab, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2
    });
    if args.iter().any(|a| a == "--llama3-rope") {
        config["max_position_embeddings"] = 131072.into();
        config["rope_parameters"] = serde_json::json!({
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
        });
    }
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![vocab, hidden])];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![hidden]),
            (format!("{p}.post_attention_layernorm.weight"), vec![hidden]),
            (
                format!("{p}.self_attn.q_proj.weight"),
                vec![heads * head_dim, hidden],
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv_heads * head_dim, hidden],
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv_heads * head_dim, hidden],
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                vec![hidden, heads * head_dim],
            ),
            (
                format!("{p}.mlp.gate_proj.weight"),
                vec![intermediate, hidden],
            ),
            (
                format!("{p}.mlp.up_proj.weight"),
                vec![intermediate, hidden],
            ),
            (
                format!("{p}.mlp.down_proj.weight"),
                vec![hidden, intermediate],
            ),
        ]);
    }
    shapes.push(("model.norm.weight".into(), vec![hidden]));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let is_norm = name.ends_with("norm.weight");
            (0..n)
                .flat_map(|_| {
                    let value: f32 = if is_norm {
                        1.0
                    } else {
                        rng.random_range(-0.05..=0.05)
                    };
                    value.to_le_bytes()
                })
                .collect()
        })
        .collect();
    let views: BTreeMap<String, TensorView> = shapes
        .iter()
        .zip(&data)
        .map(|((name, shape), bytes)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors"))?;
    let params: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    println!("wrote {} ({params} parameters)", out.display());
    Ok(())
}
