#!/usr/bin/env python3
"""Write a random Qwen3-MoE-shaped checkpoint for the mixture-of-experts benchmark
(scripts/bench_moe.sh, BENCHMARKS.md "Mixtures of experts").

    python3 scripts/make_moe_bench_checkpoint.py DIR [--layers 12] [--experts 64] ...

The shape follows Qwen3-30B-A3B scaled down to about 1.3 B parameters (the defaults: hidden 1024,
12 layers, 16 query heads and 4 key/value heads of 64, 64 experts of width 512, 8 routed per token,
a vocabulary of 32000 tied to the head), f32, so that `parallelformers bench` measures decode
over the active parameters of a realistic routing on a machine with a few GiB of memory. The
weights are random (normal, std 0.02; norms 1): the numbers are speeds, not text. Needs only
NumPy and safetensors (`pip install numpy safetensors`); it writes about 5 GB with the defaults.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="where to write config.json and the weights")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--expert-width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    return parser.parse_args()


def config(args: argparse.Namespace) -> dict:
    """transformers' Qwen3MoeConfig fields for the shape asked."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "intermediate_size": 4 * args.hidden,
        "moe_intermediate_size": args.expert_width,
        "num_experts": args.experts,
        "num_experts_per_tok": args.top_k,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "vocab_size": args.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def layer(rng: np.random.Generator, args: argparse.Namespace, i: int) -> dict:
    """Layer `i`'s tensors, as transformers names them."""
    h, d = args.hidden, args.head_dim
    normal = lambda *shape: (rng.standard_normal(shape, dtype=np.float32) * 0.02)  # noqa: E731
    p = f"model.layers.{i}"
    tensors = {
        f"{p}.input_layernorm.weight": np.ones(h, np.float32),
        f"{p}.post_attention_layernorm.weight": np.ones(h, np.float32),
        f"{p}.self_attn.q_proj.weight": normal(args.heads * d, h),
        f"{p}.self_attn.k_proj.weight": normal(args.kv_heads * d, h),
        f"{p}.self_attn.v_proj.weight": normal(args.kv_heads * d, h),
        f"{p}.self_attn.o_proj.weight": normal(h, args.heads * d),
        f"{p}.self_attn.q_norm.weight": np.ones(d, np.float32),
        f"{p}.self_attn.k_norm.weight": np.ones(d, np.float32),
        f"{p}.mlp.gate.weight": normal(args.experts, h),
    }
    for e in range(args.experts):
        q = f"{p}.mlp.experts.{e}"
        tensors[f"{q}.gate_proj.weight"] = normal(args.expert_width, h)
        tensors[f"{q}.up_proj.weight"] = normal(args.expert_width, h)
        tensors[f"{q}.down_proj.weight"] = normal(h, args.expert_width)
    return tensors


def main() -> None:
    args = parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    (args.dir / "config.json").write_text(json.dumps(config(args), indent=2))
    shared = {
        "model.embed_tokens.weight": rng.standard_normal((args.vocab, args.hidden), dtype=np.float32) * 0.02,
        "model.norm.weight": np.ones(args.hidden, np.float32),
    }
    files = args.layers + 1
    index = {}
    for n in range(files):
        tensors = shared if n == args.layers else layer(rng, args, n)
        name = f"model-{n + 1:05d}-of-{files:05d}.safetensors"
        save_file(tensors, str(args.dir / name), metadata={"format": "pt"})
        index.update({key: name for key in tensors})
    (args.dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": index}, indent=1)
    )
    total, active = parameters(args)
    print(f"wrote {args.dir}: {total / 1e9:.2f} B parameters, {active / 1e9:.2f} B active per token")


def parameters(args: argparse.Namespace) -> tuple:
    """The model's parameters, and those one token reads (its top-k experts of each layer)."""
    h, d, w = args.hidden, args.head_dim, args.expert_width
    attention = (2 * args.heads * d + 2 * args.kv_heads * d) * h + args.experts * h
    expert = 3 * w * h
    embedding = args.vocab * h
    total = args.layers * (attention + args.experts * expert) + embedding
    active = args.layers * (attention + args.top_k * expert) + embedding
    return total, active


if __name__ == "__main__":
    main()
