"""Side-by-side prefill and decode benchmark over prompt lengths: parallelformers (1 and 2 ranks;
f32, f16, and the GGUF kept quantized) against transformers/PyTorch and CTranslate2 (f32) and
llama.cpp (the same GGUF, Q4_1), each at 1 and 2 threads, on the same checkpoints, prompt token
ids and token count. Writes benchmarks/peers.md, benchmarks/peers.json and benchmarks/peers.png
with issue 4's targets (decode, at the shortest prompt) and issue 18's (prefill over prompt
lengths, decode after a long prompt) checked.

Run through scripts/bench_peers.sh, which prepares a private virtual environment (llama.cpp
compiled from source for this CPU) and the release build. Checkpoints (kept in a work directory,
outside the repository):
  smollm2  - the default model (SmolLM2-135M-Instruct GGUF Q4_1) dequantized to an f32
             Hugging Face checkpoint with transformers; llama.cpp and `--dtype quantized` read
             the GGUF file itself. Measured at every --lengths value.
  llama1b  - a random Llama-style checkpoint of about 1B parameters written by
             `examples/make_random_llama.rs`, with SmolLM2's tokenizer. Measured at the shortest
             length only (it serves issue 4's decode targets; long prompts on 1B parameters
             would take hours on two cores). No GGUF: no llama.cpp, no kept-quantized run.

At each prompt length every system prefills `prompt_ids` (the ids `parallelformers bench` uses)
and then decodes --new-tokens tokens greedily. Prefill is the wall time from the prompt to the
first token's logits; decode is the mean time of each following step, so "decode after a
2048-token prompt" is the same run's decode. Prefill computes the logits of the last prompt
position only, except in CTranslate2, whose generation computes them at every position. Best of
--repeats runs for prompts up to 512 tokens, of --long-repeats beyond. A prompt and its new
tokens must fit the model's positions (SmolLM2: 8192). parallelformers is measured by `parallelformers bench --json`
(its own warm-up runs the full prompt once); f16 runs at the shortest prompt only, for issue 4's
f16-vs-f32 decode target.

llama.cpp settings (llama-cpp-python): one context per thread count with n_ctx = the longest
prompt + --new-tokens; n_threads = n_threads_batch = threads; n_batch 2048 and n_ubatch 512,
llama.cpp's own defaults, so a long prompt goes through in 512-token micro-batches that attend to
the cache, as llama-server and llama-cli run it (a single micro-batch of the whole prompt is not
how llama.cpp is used); flash attention on, which is what llama.cpp's default ("auto") resolves
to on a CPU (the Python binding's default is off); f16 key/value cache (the default); logits of
the last position only. Before each repetition `reset()` rewinds the context to position 0, and
the next `eval` removes every cached cell from there, so each prefill starts from an empty cache.
The prompt is one `eval`, timed around it; llama.cpp's own prompt-eval counter is recorded beside
the wall time in peers.json as a check that the binding adds nothing. Each decode step is an
`eval` of the argmax token.
"""

import argparse
import gc
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "target" / "release" / "parallelformers"
MAKE_RANDOM = ROOT / "target" / "release" / "examples" / "make_random_llama"
PEERS = ("transformers", "ctranslate2", "llama.cpp")
# Order of the systems in tables and legends: f32 peers and ours, then Q4_1, then f16.
FAMILIES = ("transformers", "ctranslate2", "ours", "llama.cpp", "ours quantized", "ours f16")
# Prompts longer than this use --long-repeats.
SHORT_PROMPT = 512


def prompt_ids(length, vocab):
    """The prompt `parallelformers bench` uses (src/cli/bench.rs)."""
    return [(i * 7919 + 13) % vocab for i in range(length)]


def default_model_gguf():
    subprocess.run([str(BINARY), "inspect"], check=True, stdout=subprocess.DEVNULL)
    cache = Path(os.environ.get("PARALLELFORMERS_CACHE", Path.home() / ".cache" / "parallelformers"))
    return cache / "SmolLM2-135M-Instruct.Q4_1.gguf"


def export_smollm2(work, gguf):
    out = work / "smollm2-f32"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def unavailable_peers(skip):
    """Why each peer that will not run does not: skipped, or its package cannot be imported."""
    reasons = {peer: "skipped with --skip" for peer in skip}
    if "ctranslate2" not in skip:
        try:
            import ctranslate2  # noqa: F401
        except Exception as error:
            reasons["ctranslate2"] = f"the ctranslate2 package cannot be imported ({type(error).__name__}: {error})"
    if "llama.cpp" not in skip:
        try:
            import llama_cpp  # noqa: F401
        except Exception as error:
            log = Path(sys.prefix) / "llama-cpp-python-build.log"
            reasons["llama.cpp"] = (f"llama-cpp-python cannot be imported ({type(error).__name__}: {error}); "
                                    f"scripts/bench_peers.sh builds it from source, see {log}")
    for peer, reason in reasons.items():
        print(f"not measured: {peer}: {reason}", file=sys.stderr)
    return reasons


def versions():
    """Versions of the peers that can be imported, and the CPU."""
    import importlib.metadata

    found = {}
    for package in ("torch", "transformers", "ctranslate2", "llama-cpp-python"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    found["cpu"] = f"{cpu}, {os.cpu_count()} core(s)"
    return found


def bench_transformers(model_dir, prompts, new_tokens, threads):
    """Prefill and decode of each (ids, repeats) in `prompts`, in order. Prefill computes the
    logits of the last position only, as ours and llama.cpp do."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()

    def measure(ids, repeats):
        prompt = torch.tensor([ids])
        prefill, decode = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(prompt, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            prefill.append(time.perf_counter() - start)
            cache = out.cache
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = model(token, cache=cache, use_cache=True)
                cache = out.cache
                token = out.logits[:, -1:].argmax(-1)
            decode.append((time.perf_counter() - start) / (new_tokens - 1))
        return {"prefill_ms": min(prefill) * 1e3, "decode_tokens_per_s": 1.0 / min(decode)}

    with torch.inference_mode():
        model(torch.tensor([prompts[0][0][:8]]))  # warm-up
        results = [measure(ids, repeats) for ids, repeats in prompts]
    del model
    gc.collect()
    return results


def bench_ctranslate2(model_dir, work, prompts, new_tokens, threads):
    """Prefill and decode of each (ids, repeats) in `prompts`, in order, from one streamed
    generation: prefill is the time to the first token (CTranslate2 computes the logits of every
    prompt position), decode the time between the first and the last."""
    import ctranslate2
    from transformers import AutoTokenizer

    converted = work / f"ct2-{model_dir.name}"
    if not (converted / "model.bin").exists():
        ctranslate2.converters.TransformersConverter(str(model_dir)).convert(str(converted), quantization="float32", force=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generator = ctranslate2.Generator(str(converted), device="cpu", compute_type="float32", intra_threads=threads)

    def run(tokens, length):
        """(seconds to the first token, seconds per later token)"""
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in generator.generate_tokens(tokens, max_length=length, min_length=length,
                                                                         sampling_topk=1)]
        return stamps[0] - start, (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    def measure(ids, repeats):
        tokens = tokenizer.convert_ids_to_tokens(ids)
        runs = [run(tokens, new_tokens) for _ in range(repeats)]
        return {"prefill_ms": min(r[0] for r in runs) * 1e3, "decode_tokens_per_s": 1.0 / min(r[1] for r in runs)}

    run(tokenizer.convert_ids_to_tokens(prompts[0][0][:8]), 2)  # warm-up
    results = [measure(ids, repeats) for ids, repeats in prompts]
    del generator
    gc.collect()
    return results


def bench_llama_cpp(gguf, prompts, new_tokens, threads):
    """Prefill and decode of each (ids, repeats) in `prompts`, in order, with the settings the
    module's docstring gives and why."""
    import numpy as np
    from llama_cpp import Llama, llama_get_logits_ith, llama_perf_context, llama_perf_context_reset

    n_ctx = max(len(ids) for ids, _ in prompts) + new_tokens
    llm = Llama(str(gguf), n_ctx=n_ctx, n_batch=2048, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                flash_attn=True, verbose=False)
    vocab = llm.n_vocab()

    def greedy():
        return int(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)).argmax())

    def run(ids, steps):
        """(prefill seconds, llama.cpp's own prompt-eval seconds, seconds per decode step)"""
        llm.reset()
        llama_perf_context_reset(llm.ctx)
        start = time.perf_counter()
        llm.eval(ids)
        token = greedy()
        prefill = time.perf_counter() - start
        own = llama_perf_context(llm.ctx).t_p_eval_ms / 1e3
        start = time.perf_counter()
        for _ in range(steps):
            llm.eval([token])
            token = greedy()
        return prefill, own, (time.perf_counter() - start) / steps

    def measure(ids, repeats):
        runs = [run(ids, new_tokens - 1) for _ in range(repeats)]
        prefill, own, _ = min(runs)
        return {"prefill_ms": prefill * 1e3, "decode_tokens_per_s": 1.0 / min(r[2] for r in runs),
                "llama_cpp_prompt_eval_ms": own * 1e3}

    run(prompts[0][0][:8], 1)  # warm-up
    results = [measure(ids, repeats) for ids, repeats in prompts]
    llm.close()
    gc.collect()
    return results


def bench_ours(model, prompt_len, new_tokens, ranks, repeats, dtype):
    command = [str(BINARY), "bench", "--model", str(model), "--ranks", str(ranks), "--prompt-len",
               str(prompt_len), "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--dtype", dtype,
               "--json"]
    if ranks == 1:
        command = ["taskset", "-c", "0"] + command
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def system_name(family, threads):
    return {
        "transformers": f"transformers {threads} thread(s)",
        "ctranslate2": f"CTranslate2 {threads} thread(s)",
        "llama.cpp": f"llama.cpp {threads} thread(s), GGUF Q4_1",
        "ours": f"parallelformers {threads} rank(s), {threads} core(s)",
        "ours f16": f"parallelformers {threads} rank(s), {threads} core(s), f16",
        "ours quantized": f"parallelformers {threads} rank(s), {threads} core(s), GGUF Q4_1 kept quantized",
    }[family]


def systems(runs):
    """The (family, threads) pairs measured, in table order."""
    return sorted({(r["family"], r["threads"]) for r in runs}, key=lambda s: (FAMILIES.index(s[0]), s[1]))


def value(runs, family, threads, length, key):
    """`key` of that run, or None where it was not measured."""
    for run in runs:
        if (run["family"], run["threads"], run["prompt_len"]) == (family, threads, length):
            return run[key]
    return None


def target(name, numerator, denominator, goal, at_most, unit="x"):
    """A target on the ratio of two measurements (None where either was not measured)."""
    ratio = None if numerator is None or denominator is None else numerator / denominator
    return {"target": name, "value": ratio, "goal": f"{'<=' if at_most else '>='} "
            + (f"{goal * 100:.0f}%" if unit == "%" else f"{goal}x"),
            "met": None if ratio is None else (ratio <= goal if at_most else ratio >= goal)}


def issue4_targets(runs, length, limit, quantized):
    """Issue 4's decode and prefill targets at one prompt length (2 ranks / 2 threads)."""
    def get(family, threads, key):
        return value(runs, family, threads, length, key)

    decode, prefill = "decode_tokens_per_s", "prefill_ms"
    rows = [
        target("decode vs CTranslate2 (2 threads)", get("ours", 2, decode), get("ctranslate2", 2, decode), 1.5, False),
        target("decode vs memory-bandwidth limit", get("ours", 2, decode), limit, 0.7, False, "%"),
        target("prefill vs CTranslate2 (2 threads)", get("ours", 2, prefill), get("ctranslate2", 2, prefill), 0.7, True),
        target("decode, 2 ranks on 2 cores vs 1 rank on 1 core", get("ours", 2, decode), get("ours", 1, decode), 1.8,
               False),
        target("decode f16 vs f32 (2 ranks)", get("ours f16", 2, decode), get("ours", 2, decode), 1.7, False),
    ]
    if quantized:
        rows.append(target("decode quantized GGUF vs f32 (2 ranks)", get("ours quantized", 2, decode),
                           get("ours", 2, decode), 2.5, False))
    return rows


def issue18_targets(runs):
    """Issue 18's prefill and decode targets (2 ranks / 2 threads, prompts of 128, 2048, 4096)."""
    def get(family, length, key):
        return value(runs, family, 2, length, key)

    def per_token(family, length):
        ms = get(family, length, "prefill_ms")
        return None if ms is None else ms / length

    rows = [
        target("prefill at 2048 tokens, f32: ours / CTranslate2", get("ours", 2048, "prefill_ms"),
               get("ctranslate2", 2048, "prefill_ms"), 0.5, True),
        target("prefill at 2048 tokens, Q4_1: ours kept quantized / llama.cpp", get("ours quantized", 2048, "prefill_ms"),
               get("llama.cpp", 2048, "prefill_ms"), 0.5, True),
    ]
    for family, label in (("ours", "f32"), ("ours quantized", "kept quantized")):
        rows.append(target(f"prefill time per token, 4096 vs 128 tokens (ours {label})", per_token(family, 4096),
                           per_token(family, 128), 2, True))
    for family, label in (("ours", "f32"), ("ours quantized", "kept quantized")):
        rows.append(target(f"decode after 2048 vs after 128 tokens (ours {label})",
                           get(family, 2048, "decode_tokens_per_s"), get(family, 128, "decode_tokens_per_s"), 0.75,
                           False, "%"))
    return rows


def bench_model(name, model_dir, gguf, plan, work, args, skipped, started):
    """Every system at each prompt length of `plan`; llama.cpp and kept quantized where there is
    a GGUF file. Returns the model's part of peers.json."""
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]

    def repeats(length):
        return 1 if name == "llama1b" else args.repeats if length <= SHORT_PROMPT else args.long_repeats

    prompts = [(prompt_ids(n, vocab), repeats(n)) for n in plan]
    runners = {
        "transformers": lambda threads: bench_transformers(model_dir, prompts, args.new_tokens, threads),
        "ctranslate2": lambda threads: bench_ctranslate2(model_dir, work, prompts, args.new_tokens, threads),
    }
    if gguf:
        runners["llama.cpp"] = lambda threads: bench_llama_cpp(gguf, prompts, args.new_tokens, threads)
    runs = []

    def record(family, threads, length, measured):
        runs.append({"system": system_name(family, threads), "family": family, "threads": threads,
                     "prompt_len": length, "repeats": repeats(length), **measured})
        print(f"{name}: {system_name(family, threads)}, {length} tokens: prefill {measured['prefill_ms']:.0f} ms, "
              f"decode {measured['decode_tokens_per_s']:.1f} tokens/s [{time.perf_counter() - started:.0f} s]",
              file=sys.stderr)

    for threads in (1, 2):
        for peer, runner in runners.items():
            if peer not in skipped:
                for length, measured in zip(plan, runner(threads)):
                    record(peer, threads, length, measured)
    ours = [("ours", "f32", model_dir)] + ([("ours quantized", "quantized", gguf)] if gguf else [])
    bandwidth = None
    for ranks in (1, 2):
        for family, dtype, model in ours:
            for length in plan:
                measured = bench_ours(model, length, args.new_tokens, ranks, repeats(length), dtype)
                record(family, ranks, length, {k: measured[k] for k in ("prefill_ms", "decode_tokens_per_s")})
                if (family, ranks, length) == ("ours", 2, plan[0]):
                    bandwidth = measured["read_bandwidth_bytes_per_s"]
    f16 = bench_ours(model_dir, plan[0], args.new_tokens, 2, repeats(plan[0]), "f16")
    record("ours f16", 2, plan[0], {k: f16[k] for k in ("prefill_ms", "decode_tokens_per_s")})
    bytes_per_token = weight_bytes(model_dir)
    limit = bandwidth / bytes_per_token
    print(f"{name}: memory-bandwidth limit {limit:.1f} tokens/s ({bytes_per_token / 1e6:.0f} MB of f32 weights "
          f"per token at {bandwidth / 1e9:.1f} GB/s)", file=sys.stderr)
    result = {
        "gguf": gguf is not None,
        "weight_bytes_per_token": bytes_per_token,
        "read_bandwidth_bytes_per_s": bandwidth,
        "bandwidth_limit_tokens_per_s": limit,
        "runs": runs,
        "issue4_targets": issue4_targets(runs, plan[0], limit, gguf is not None),
    }
    if len(plan) > 1:
        result["issue18_targets"] = issue18_targets(runs)
    return result


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ours": "#d62728", "ours f16": "#ff7f0e", "ours quantized": "#9467bd", "ctranslate2": "#1f77b4",
              "transformers": "#7f7f7f", "llama.cpp": "#2ca02c"}
    panels = (("prefill, s (lower is better)", lambda r: r["prefill_ms"] / 1e3),
              ("prefill per prompt token, ms (lower is better)", lambda r: r["prefill_ms"] / r["prompt_len"]),
              ("greedy decode after the prompt, tokens/s (higher is better)", lambda r: r["decode_tokens_per_s"]))
    models = list(results)
    fig, axes = plt.subplots(len(models), 3, figsize=(18, 5 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        runs = results[model]["runs"]
        lengths = sorted({r["prompt_len"] for r in runs})
        for col, (label, measure) in enumerate(panels):
            ax = axes[row][col]
            for family, threads in systems(runs):
                points = [r for r in runs if (r["family"], r["threads"]) == (family, threads)]
                ax.plot([r["prompt_len"] for r in points], [measure(r) for r in points], marker="o",
                        color=colors[family], linestyle="-" if threads == 2 else "--",
                        label=system_name(family, threads))
            if col == 2:
                ax.axhline(results[model]["bandwidth_limit_tokens_per_s"], linestyle=":", color="black",
                           label="memory-bandwidth limit (f32)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.set_yscale("log")
            ax.set_xlabel("prompt tokens")
            ax.set_title(f"{model}: {label}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.1 / len(models), 1, 1))
    fig.savefig(path, dpi=100)


def report(results, args, lengths, skipped, found):
    def cell(v, digits):
        return "–" if v is None else f"{v:.{digits}f}"

    repeats = (f"best of {args.repeats} runs up to {SHORT_PROMPT} tokens and of {args.long_repeats} beyond"
               if lengths[-1] > SHORT_PROMPT else f"best of {args.repeats} runs")
    header = (f"Batch 1, greedy; prompts of {', '.join(map(str, lengths))} tokens (the ids `parallelformers bench` "
              f"uses), each followed by {args.new_tokens} new tokens, whose speed is the decode after that prompt; "
              f"f32 unless the row says otherwise; {repeats}. One rank or thread is confined to one core. f16 runs at "
              f"the shortest prompt only.")
    if "llama1b" in results:
        header += " llama1b: one run, at the shortest prompt only."
    if "llama.cpp" not in skipped:
        header += (" llama.cpp (llama-cpp-python built for this CPU): n_batch 2048, n_ubatch 512, flash attention, "
                   "f16 KV cache, as llama.cpp's own defaults (see scripts/bench_peers.py).")
    command = " ".join(["scripts/bench_peers.sh", *map(shlex.quote, sys.argv[1:])])
    lines = ["# Peer benchmark\n", f"{header} Command: `{command}`.\n",
             "Versions: " + "; ".join(f"{k} {v}" for k, v in found.items()) + ".\n"]
    for peer, reason in skipped.items():
        lines.append(f"- **Not measured: {peer}**: {reason}.")
    for name, result in results.items():
        runs = result["runs"]
        measured_lengths = sorted({r["prompt_len"] for r in runs})
        lines.append(f"\n## {name}\n")
        lines.append(f"Weights read per token (f32): {result['weight_bytes_per_token'] / 1e6:.0f} MB; read bandwidth "
                     f"measured by `parallelformers bench` on 2 cores: {result['read_bandwidth_bytes_per_s'] / 1e9:.1f} "
                     f"GB/s; memory-bandwidth limit: **{result['bandwidth_limit_tokens_per_s']:.1f} tokens/s**.\n")
        if not result["gguf"]:
            lines.append("No GGUF file of this checkpoint: no llama.cpp and no kept-quantized run.\n")
        for title, measure, digits in (
                ("Prefill (s)", lambda r: r["prefill_ms"] / 1e3, 2),
                ("Prefill per prompt token (ms)", lambda r: r["prefill_ms"] / r["prompt_len"], 2),
                ("Greedy decode after the prompt (tokens/s)", lambda r: r["decode_tokens_per_s"], 1)):
            lines.append(f"{title}:\n")
            lines.append("| system | " + " | ".join(f"{n} tokens" for n in measured_lengths) + " |")
            lines.append("| --- |" + " --- |" * len(measured_lengths))
            for family, threads in systems(runs):
                row = [next((measure(r) for r in runs if (r["family"], r["threads"], r["prompt_len"])
                             == (family, threads, n)), None) for n in measured_lengths]
                lines.append(f"| {system_name(family, threads)} | " + " | ".join(cell(v, digits) for v in row) + " |")
            lines.append("")
        for title, rows in ((f"Issue 4 targets ({measured_lengths[0]}-token prompt)", result["issue4_targets"]),
                            ("Issue 18 targets (measured where --lengths has 128, 2048 and 4096)",
                             result.get("issue18_targets"))):
            if rows is None:
                continue
            lines.append(f"{title}:\n\n| target | measured | goal | met |\n| --- | --- | --- | --- |")
            for t in rows:
                if t["value"] is None:
                    lines.append(f"| {t['target']} | not measured | {t['goal']} | – |")
                    continue
                shown = f"{t['value'] * 100:.0f}%" if t["goal"].endswith("%") else f"{t['value']:.2f}x"
                lines.append(f"| {t['target']} | {shown} | {t['goal']} | {'yes' if t['met'] else 'no'} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,llama1b", help="comma-separated: smollm2, llama1b")
    parser.add_argument("--lengths", default="128,512,2048,4096", help="comma-separated prompt lengths in tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help=f"runs per prompt of up to {SHORT_PROMPT} tokens")
    parser.add_argument("--long-repeats", type=int, default=1, help=f"runs per prompt of more than {SHORT_PROMPT} tokens")
    parser.add_argument("--skip", default="", help=f"comma-separated peers not to run: {', '.join(PEERS)}")
    parser.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "parallelformers-peers"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args()
    models = args.models.split(",")
    lengths = sorted({int(n) for n in args.lengths.split(",")})
    skip = [p for p in args.skip.split(",") if p]
    for name in models:
        if name not in ("smollm2", "llama1b"):
            parser.error(f"unknown model {name!r} (smollm2, llama1b)")
    for peer in skip:
        if peer not in PEERS:
            parser.error(f"unknown peer {peer!r} in --skip ({', '.join(PEERS)})")
    if lengths[0] < 1 or args.new_tokens < 2 or min(args.repeats, args.long_repeats) < 1:
        parser.error("lengths and repeats must be at least 1, --new-tokens at least 2")
    started = time.perf_counter()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    skipped = unavailable_peers(skip)
    found = versions()
    gguf = default_model_gguf()
    smollm2 = export_smollm2(work, gguf)
    dirs = {"smollm2": smollm2}
    if "llama1b" in models:
        dirs["llama1b"] = make_llama1b(work, smollm2)
    results = {}
    for name in models:
        plan = lengths if name == "smollm2" else lengths[:1]
        results[name] = bench_model(name, dirs[name], gguf if name == "smollm2" else None, plan, work, args,
                                    skipped, started)
    (out / "peers.json").write_text(json.dumps({"lengths": lengths, "new_tokens": args.new_tokens,
                                                "repeats": args.repeats, "long_repeats": args.long_repeats,
                                                "not_measured": skipped, "versions": found,
                                                "seconds": time.perf_counter() - started, "models": results},
                                               indent=2))
    (out / "peers.md").write_text(report(results, args, lengths, skipped, found))
    chart(results, out / "peers.png")
    print((out / "peers.md").read_text())
    print(f"done in {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
