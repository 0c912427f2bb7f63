#!/usr/bin/env bash
# Tensor-parallel scaling on this machine: decode speed and peak memory of 2 ranks on 2 cores
# against 1 rank confined to 1 core, on a random SmolLM2-135M-shaped Llama checkpoint in f32.
# Prints a Markdown table (the one in BENCHMARKS.md).
#
#   scripts/bench_scaling.sh [CHECKPOINT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-${TMPDIR:-/tmp}/parallelformers-llama-135m}
cargo build --release --quiet --bin parallelformers --example make_random_llama
[ -f "$model/model.safetensors" ] || ./target/release/examples/make_random_llama "$model" >/dev/null
bin=./target/release/parallelformers
one=$(taskset -c 0 "$bin" bench --model "$model" --ranks 1 --json)
two=$("$bin" bench --model "$model" --ranks 2 --json)
python3 - "$one" "$two" <<'PY'
import json, sys
one, two = (json.loads(a) for a in sys.argv[1:3])
def mib(b): return f"{b / 2**20:.0f} MiB"
print("| configuration | prefill 128 tokens | greedy decode | peak memory per rank |")
print("| --- | --- | --- | --- |")
for name, r in (("1 rank, 1 core (`taskset -c 0`)", one), ("2 ranks, 2 cores", two)):
    peaks = ", ".join(mib(p) for p in r["peak_memory_bytes"])
    print(f"| {name} | {r['prefill_ms']:.0f} ms | {r['decode_tokens_per_s']:.1f} tok/s | {peaks} |")
speedup = two["decode_tokens_per_s"] / one["decode_tokens_per_s"]
memory = max(two["peak_memory_bytes"]) / one["peak_memory_bytes"][0]
print()
print(f"decode speed-up 2 ranks / 1 rank: {speedup:.2f}x (target >= 1.6x)")
print(f"largest rank's peak memory at 2 ranks / 1 rank: {memory:.0%} (target <= 60%)")
PY
