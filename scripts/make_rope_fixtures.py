"""Reference values for the rotary-embedding scalings of `src/models/rope.rs`.

Generated with transformers 5.25.0 and torch 2.15.0 (CPU), run as
    /root/.cache/pf-venv/bin/python scripts/make_rope_fixtures.py
It writes tests/fixtures/rope/cases.json. Every case is a config.json-like dict that transformers
parses itself (LlamaConfig, or Gemma3TextConfig for the per-layer-type cases); its rotary
embedding module is then called with position ids 0..seq_len-1 for each listed seq_len in turn,
so the stateful updates of `dynamic_rope_update` (dynamic NTK growth and reset, longrope's
short/long switch) are recorded as transformers runs them. For each step the file holds the
module's inv_freq, attention_scaling, and the cos/sin (first half) at the last position.
"""

import json
import os

import torch
import transformers
from transformers import Gemma3TextConfig, LlamaConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "rope", "cases.json")


def factors(n, start, step):
    return [round(start + step * i, 4) for i in range(n)]


def cases(dim):
    half = dim // 2
    short = factors(half, 1.0, 0.05)
    long = factors(half, 1.0, 0.9)
    llama = []

    def add(name, config, seq_lens):
        llama.append((name, config, seq_lens))

    add("default", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, [5])
    add("default_4x_theta", {"rope_theta": 500000.0}, [5])
    add("linear", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}, [7])
    add("linear_4x_type", {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.5}}, [7])
    # below, at, above (growth), below the cache but above the original (hold), growth again,
    # below the original (reset), at the original, just above (growth from the original).
    add(
        "dynamic",
        {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
        [16, 64, 100, 80, 120, 32, 64, 65, 200],
    )
    add(
        "dynamic_4x_theta_1e6",
        {"rope_theta": 1000000.0, "rope_scaling": {"rope_type": "dynamic", "factor": 3.5}},
        [130, 10, 70, 64, 63, 500],
    )
    add(
        "yarn",
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 64}},
        [9],
    )
    add(
        "yarn_mscale",
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                             "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 0.8}},
        [9],
    )
    add(
        "yarn_mscale_only",
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                             "original_max_position_embeddings": 32, "mscale": 0.707}},
        [9],
    )
    add(
        "yarn_attention_factor_betas",
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
                             "original_max_position_embeddings": 64, "attention_factor": 0.9,
                             "beta_fast": 16, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.8}},
        [9],
    )
    add(
        "yarn_no_truncate",
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 64, "truncate": False}},
        [9],
    )
    add(
        "yarn_factor_null_4x",
        {"rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": None,
                                                 "original_max_position_embeddings": 32}},
        [9],
    )
    add(
        "longrope",
        {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
                             "long_factor": long, "original_max_position_embeddings": 64}},
        [10, 64, 65, 200, 30],
    )
    add(
        "longrope_attention_factor",
        {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
                             "long_factor": long, "original_max_position_embeddings": 64,
                             "attention_factor": 1.2, "factor": 2.0}},
        [100, 20],
    )
    # Phi-3 writes original_max_position_embeddings at the top level; it wins over the nested one.
    add(
        "longrope_top_level_original",
        {"rope_theta": 10000.0, "original_max_position_embeddings": 32,
         "rope_scaling": {"type": "longrope", "short_factor": short, "long_factor": long,
                          "original_max_position_embeddings": 128}},
        [32, 33],
    )
    add(
        "llama3",
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
        [11],
    )
    add(
        "llama3_4x",
        {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 8.0, "original_max_position_embeddings": 100}},
        [11],
    )
    gemma = [
        (
            "gemma3_nested",
            {"rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
            [12],
        ),
        (
            # The nested form reads `truncate` from the outer dict, so it is ignored here.
            "gemma3_nested_yarn_truncate_false",
            {"rope_parameters": {
                "full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 64, "truncate": False},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
            [12],
        ),
        (
            "gemma3_4x",
            {"rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
             "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
            [12],
        ),
    ]
    return llama, gemma


def record(module, layer_type, steps):
    kw = {} if layer_type is None else {"layer_type": layer_type}
    prefix = "" if layer_type is None else f"{layer_type}_"

    def state():
        scaling = module.attention_scaling if layer_type is None else getattr(module, f"{prefix}attention_scaling")
        inv = getattr(module, f"{prefix}inv_freq")
        return {"inv_freq": inv.double().tolist(), "attention_scaling": float(scaling)}

    out = [dict(seq_len=None, **state())]
    for seq_len in steps:
        x = torch.zeros(1, dtype=torch.float32)
        pos = torch.arange(seq_len)[None, :]
        cos, sin = module(x, pos, **kw)
        half = cos.shape[-1] // 2
        step = dict(seq_len=seq_len, **state())
        step["cos_last"] = cos[0, -1, :half].double().tolist()
        step["sin_last"] = sin[0, -1, :half].double().tolist()
        out.append(step)
    return out


def main():
    out = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": []}
    mpe = 64
    for dim in (8, 16):
        llama, gemma = cases(dim)
        base = {"head_dim": dim, "hidden_size": 2 * dim, "num_attention_heads": 2, "num_key_value_heads": 1,
                "num_hidden_layers": 2, "max_position_embeddings": mpe, "vocab_size": 16}
        for name, extra, steps in llama:
            config = dict(base, **extra)
            if name.startswith(("yarn", "longrope", "llama3")):
                config["max_position_embeddings"] = 256 if not name.startswith("longrope_top") else 128
            hf = LlamaConfig.from_dict(json.loads(json.dumps(config)))
            module = LlamaRotaryEmbedding(hf)
            out["cases"].append({"name": f"{name}_d{dim}", "rotary_dim": dim, "config": config,
                                 "results": {"full_attention": record(module, None, steps)}})
        for name, extra, steps in gemma:
            config = dict(base, **extra)
            config["max_position_embeddings"] = 256
            config["layer_types"] = ["sliding_attention", "full_attention"]
            hf = Gemma3TextConfig.from_dict(json.loads(json.dumps(config)))
            module = Gemma3RotaryEmbedding(hf)
            results = {lt: record(module, lt, steps) for lt in ("full_attention", "sliding_attention")}
            out["cases"].append({"name": f"{name}_d{dim}", "rotary_dim": dim, "config": config, "results": results})
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {len(out['cases'])} cases, {os.path.getsize(OUT)} bytes to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
