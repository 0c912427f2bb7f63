"""Side-by-side decode and prefill benchmark: parallelformers (1 and 2 ranks) against
transformers/PyTorch and CTranslate2 (1 and 2 threads) on the same checkpoints, prompt length
and token count. Writes benchmarks/peers.md, benchmarks/peers.json and benchmarks/peers.png.

Run through scripts/bench_peers.sh, which prepares a private virtual environment and the
release build. Checkpoints (kept in a work directory, outside the repository):
  smollm2  - the default model (SmolLM2-135M-Instruct GGUF Q4_1) dequantized to an f32
             Hugging Face checkpoint with transformers;
  llama1b  - a random Llama-style checkpoint of about 1B parameters written by
             `examples/make_random_llama.rs`, with SmolLM2's tokenizer.
"""

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "target" / "release" / "parallelformers"
MAKE_RANDOM = ROOT / "target" / "release" / "examples" / "make_random_llama"


def prompt_ids(length, vocab):
    """The prompt `parallelformers bench` uses (src/cli/bench.rs)."""
    return [(i * 7919 + 13) % vocab for i in range(length)]


def default_model_gguf():
    subprocess.run([str(BINARY), "inspect"], check=True, stdout=subprocess.DEVNULL)
    cache = Path(os.environ.get("PARALLELFORMERS_CACHE", Path.home() / ".cache" / "parallelformers"))
    return cache / "SmolLM2-135M-Instruct.Q4_1.gguf"


def export_smollm2(work):
    out = work / "smollm2-f32"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_model_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # transformers will not save a GGUF-loaded model; copy its (dequantized) weights into a fresh one.
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    fresh.tie_weights()
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_llama1b(work, smollm2):
    out = work / "llama1b-f32"
    if not (out / "model.safetensors").exists():
        subprocess.run(
            [str(MAKE_RANDOM), str(out), "--hidden", "2048", "--layers", "16", "--heads", "32",
             "--kv-heads", "8", "--intermediate", "8192", "--vocab", "49152"],
            check=True,
        )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, out / name)
    return out


def weight_bytes(model_dir):
    """Bytes of f32 weights one decode step reads (every matrix once; the embedding lookup
    reads one row, the (tied) LM head the whole matrix)."""
    from safetensors import safe_open

    total = 0
    with safe_open(model_dir / "model.safetensors", "np") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            n = 1
            for d in shape:
                n *= d
            total += n * 4
    return total


def best(times):
    return min(times)


def bench_transformers(model_dir, ids, new_tokens, threads, repeats):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    prompt = torch.tensor([ids])
    prefill, decode = [], []
    with torch.inference_mode():
        model(prompt[:, :8])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(prompt, use_cache=True)
            prefill.append(time.perf_counter() - start)
            past = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = model(token, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = out.logits[:, -1:].argmax(-1)
            decode.append((time.perf_counter() - start) / (new_tokens - 1))
    del model
    gc.collect()
    return {"prefill_ms": best(prefill) * 1e3, "decode_tokens_per_s": 1.0 / best(decode)}


def bench_ctranslate2(model_dir, work, ids, new_tokens, threads, repeats):
    import ctranslate2
    from transformers import AutoTokenizer

    converted = work / f"ct2-{model_dir.name}"
    if not (converted / "model.bin").exists():
        ctranslate2.converters.TransformersConverter(str(model_dir)).convert(str(converted), quantization="float32", force=True)
    tokens = AutoTokenizer.from_pretrained(model_dir).convert_ids_to_tokens(ids)
    generator = ctranslate2.Generator(str(converted), device="cpu", compute_type="float32", intra_threads=threads)

    def run(length):
        start = time.perf_counter()
        generator.generate_batch([tokens], max_length=length, min_length=length, sampling_topk=1,
                                 include_prompt_in_result=False)
        return time.perf_counter() - start

    run(2)  # warm-up
    prefill = [run(1) for _ in range(repeats)]
    total = [run(new_tokens) for _ in range(repeats)]
    del generator
    gc.collect()
    return {"prefill_ms": best(prefill) * 1e3, "decode_tokens_per_s": (new_tokens - 1) / (best(total) - best(prefill))}


def bench_ours(model, prompt_len, new_tokens, ranks, repeats, dtype="f32"):
    command = [str(BINARY), "bench", "--model", str(model), "--ranks", str(ranks), "--prompt-len",
               str(prompt_len), "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--dtype", dtype,
               "--json"]
    if ranks == 1:
        command = ["taskset", "-c", "0"] + command
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def summary(result):
    return {"prefill_ms": result["prefill_ms"], "decode_tokens_per_s": result["decode_tokens_per_s"]}


def targets(runs, limit):
    """The issue's targets as measured ratios: (name, value, goal, met)."""
    by = {r["system"]: r for r in runs}
    ct2 = by["CTranslate2 2 thread(s)"]
    one, two = by["parallelformers 1 rank(s), 1 core(s)"], by["parallelformers 2 rank(s), 2 core(s)"]
    rows = [
        ("decode vs CTranslate2 (2 threads)", two["decode_tokens_per_s"] / ct2["decode_tokens_per_s"], ">= 1.5x",
         two["decode_tokens_per_s"] / ct2["decode_tokens_per_s"] >= 1.5),
        ("decode vs memory-bandwidth limit", two["decode_tokens_per_s"] / limit, ">= 70%",
         two["decode_tokens_per_s"] / limit >= 0.7),
        ("prefill vs CTranslate2 (2 threads)", two["prefill_ms"] / ct2["prefill_ms"], "<= 0.7x",
         two["prefill_ms"] / ct2["prefill_ms"] <= 0.7),
        ("decode, 2 ranks on 2 cores vs 1 rank on 1 core", two["decode_tokens_per_s"] / one["decode_tokens_per_s"],
         ">= 1.8x", two["decode_tokens_per_s"] / one["decode_tokens_per_s"] >= 1.8),
    ]
    f16 = by.get("parallelformers 2 rank(s), 2 core(s), f16")
    if f16:
        ratio = f16["decode_tokens_per_s"] / two["decode_tokens_per_s"]
        rows.append(("decode f16 vs f32 (2 ranks)", ratio, ">= 1.7x", ratio >= 1.7))
    quantized = by.get("parallelformers 2 rank(s), 2 core(s), GGUF Q4_1 kept quantized")
    if quantized:
        ratio = quantized["decode_tokens_per_s"] / two["decode_tokens_per_s"]
        rows.append(("decode quantized GGUF vs f32 (2 ranks)", ratio, ">= 2.5x", ratio >= 2.5))
    return rows


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.6 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        systems = [r["system"] for r in results[model]["runs"]]
        for col, (key, label) in enumerate((("decode_tokens_per_s", "greedy decode, tokens/s (higher is better)"),
                                            ("prefill_ms", "prefill 128 tokens, ms (lower is better)"))):
            ax = axes[row][col]
            values = [r[key] for r in results[model]["runs"]]
            colors = ["#d62728" if s.startswith("parallelformers") else "#7f7f7f" for s in systems]
            ax.barh(systems, values, color=colors)
            if key == "decode_tokens_per_s":
                ax.axvline(results[model]["bandwidth_limit_tokens_per_s"], linestyle="--", color="black", label="memory-bandwidth limit")
                ax.legend(loc="lower right", fontsize=8)
            ax.set_title(f"{model}: {label}")
            for i, v in enumerate(values):
                ax.text(v, i, f" {v:.1f}", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,llama1b")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "parallelformers-peers"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    smollm2 = export_smollm2(work)
    dirs = {"smollm2": smollm2}
    if "llama1b" in args.models:
        dirs["llama1b"] = make_llama1b(work, smollm2)
    results = {}
    for name in args.models.split(","):
        model_dir = dirs[name]
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        ids = prompt_ids(args.prompt_len, vocab)
        repeats = args.repeats if name == "smollm2" else 1
        bytes_per_token = weight_bytes(model_dir)
        runs = []
        for threads in (1, 2):
            print(f"{name}: transformers, {threads} thread(s)", file=sys.stderr)
            runs.append({"system": f"transformers {threads} thread(s)",
                         **bench_transformers(model_dir, ids, args.new_tokens, threads, repeats)})
            print(f"{name}: CTranslate2, {threads} thread(s)", file=sys.stderr)
            runs.append({"system": f"CTranslate2 {threads} thread(s)",
                         **bench_ctranslate2(model_dir, work, ids, args.new_tokens, threads, repeats)})
        measured = {}
        for ranks in (1, 2):
            print(f"{name}: parallelformers, {ranks} rank(s)", file=sys.stderr)
            measured[ranks] = bench_ours(model_dir, args.prompt_len, args.new_tokens, ranks, repeats)
            runs.append({"system": f"parallelformers {ranks} rank(s), {ranks} core(s)", **summary(measured[ranks])})
        print(f"{name}: parallelformers, 2 ranks, f16", file=sys.stderr)
        runs.append({"system": "parallelformers 2 rank(s), 2 core(s), f16",
                     **summary(bench_ours(model_dir, args.prompt_len, args.new_tokens, 2, repeats, "f16"))})
        if name == "smollm2":
            print(f"{name}: parallelformers, 2 ranks, GGUF kept quantized", file=sys.stderr)
            runs.append({"system": "parallelformers 2 rank(s), 2 core(s), GGUF Q4_1 kept quantized",
                         **summary(bench_ours(default_model_gguf(), args.prompt_len, args.new_tokens, 2, repeats,
                                              "quantized"))})
        bandwidth = measured[2]["read_bandwidth_bytes_per_s"]
        limit = bandwidth / bytes_per_token
        results[name] = {
            "weight_bytes_per_token": bytes_per_token,
            "read_bandwidth_bytes_per_s": bandwidth,
            "bandwidth_limit_tokens_per_s": limit,
            "runs": runs,
            "targets": [{"target": t, "value": v, "goal": g, "met": m} for t, v, g, m in targets(runs, limit)],
        }
        print(f"{name}: memory-bandwidth limit {limit:.1f} tokens/s ({bytes_per_token / 1e6:.0f} MB of f32 weights "
              f"per token at {bandwidth / 1e9:.1f} GB/s)", file=sys.stderr)
    (out / "peers.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Peer benchmark\n",
             f"Batch 1, greedy, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, f32 unless the row "
             f"says otherwise; best of {args.repeats} runs (1 for llama1b). One rank or thread is confined to one "
             f"core. Command: `scripts/bench_peers.sh`.\n"]
    for name, result in results.items():
        lines.append(f"\n## {name}\n")
        lines.append(f"Weights read per token (f32): {result['weight_bytes_per_token'] / 1e6:.0f} MB; read bandwidth "
                     f"measured by `parallelformers bench` on 2 cores: {result['read_bandwidth_bytes_per_s'] / 1e9:.1f} "
                     f"GB/s; memory-bandwidth limit: **{result['bandwidth_limit_tokens_per_s']:.1f} tokens/s**.\n")
        lines.append("| system | prefill (ms) | greedy decode (tokens/s) |\n| --- | --- | --- |")
        for run in result["runs"]:
            lines.append(f"| {run['system']} | {run['prefill_ms']:.0f} | {run['decode_tokens_per_s']:.1f} |")
        lines.append("\n| target | measured | goal | met |\n| --- | --- | --- | --- |")
        for t in result["targets"]:
            value = f"{t['value'] * 100:.0f}%" if t["goal"].endswith("%") else f"{t['value']:.2f}x"
            lines.append(f"| {t['target']} | {value} | {t['goal']} | {'yes' if t['met'] else 'no'} |")
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    chart(results, out / "peers.png")
    print((out / "peers.md").read_text())


if __name__ == "__main__":
    main()
