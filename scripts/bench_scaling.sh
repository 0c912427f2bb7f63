#!/usr/bin/env bash
# Scaling report on this machine, on a random SmolLM2-135M-shaped Llama checkpoint:
#   1. decode, prefill and each rank's peak memory at 1 rank (confined to 1 core), 2 and 4 ranks
#      (4 ranks on 2 cores are oversubscribed), with the measured memory-bandwidth limit;
#   2. the same at 1 and 2 ranks for every weight dtype (f32, f16, bf16);
#   3. prefill latency and decode speed at 2 ranks for prompts of 32 to 2048 tokens;
#   4. f32 against quantized-in-memory on the default model (GGUF Q4_1 / Q8_0).
# Prints Markdown tables (the ones in BENCHMARKS.md). Takes a few minutes; run it on an idle
# machine.
#
#   scripts/bench_scaling.sh [CHECKPOINT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-${TMPDIR:-/tmp}/parallelformers-llama-135m}
cargo build --release --quiet --bin parallelformers --example make_random_llama
[ -f "$model/model.safetensors" ] || ./target/release/examples/make_random_llama "$model" >/dev/null
bin=./target/release/parallelformers
out=$(mktemp)
trap 'rm -f "$out"' EXIT

# bench LABEL [taskset CPUS] ARGS...: appends one JSON line tagged with LABEL.
bench() {
    local label=$1
    shift
    local prefix=()
    if [ "$1" = taskset ]; then
        prefix=(taskset -c "$2")
        shift 2
    fi
    "${prefix[@]}" "$bin" bench --json "$@" | python3 -c "import json,sys; r=json.load(sys.stdin); r['label']='$label'; print(json.dumps(r))" >>"$out"
}

bench ranks taskset 0 --model "$model" --ranks 1
bench ranks --model "$model" --ranks 2
bench ranks --model "$model" --ranks 4
for dtype in f16 bf16; do
    bench dtype taskset 0 --model "$model" --ranks 1 --dtype "$dtype"
    bench dtype --model "$model" --ranks 2 --dtype "$dtype"
done
for len in 32 512 2048; do
    bench prompt --model "$model" --ranks 2 --prompt-len "$len" --new-tokens 16 --repeats 2
done
for dtype in f32 quantized; do
    bench default taskset 0 --ranks 1 --dtype "$dtype"
    bench default --ranks 2 --dtype "$dtype"
done

python3 - "$out" <<'PY'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
def mib(b): return f"{b / 2**20:.0f}"
def pick(label, **kw):
    return [r for r in runs if r["label"] == label and all(r[k] == v for k, v in kw.items())]
def row(r, name):
    limit = r["bandwidth_limit_tokens_per_s"]
    peaks = "/".join(mib(p) for p in r["peak_memory_bytes"])
    return (f"| {name} | {r['prefill_ms']:.0f} ms | {r['decode_tokens_per_s']:.1f} tok/s | "
            f"{limit:.1f} tok/s ({r['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
            f"{r['weight_bytes_per_token'] / 1e6:.0f} MB/token) | "
            f"{100 * r['decode_tokens_per_s'] / limit:.0f} % | {peaks} MiB |")
header = ("| configuration | prefill 128 tokens | greedy decode | bandwidth limit | of limit | "
          "peak memory per rank |\n| --- | --- | --- | --- | --- | --- |")

print("### Ranks (f32)\n")
print(header)
one = pick("ranks", ranks=1)[0]
for r in pick("ranks"):
    name = {1: "1 rank, 1 core", 2: "2 ranks, 2 cores", 4: "4 ranks, 2 cores (oversubscribed)"}[r["ranks"]]
    print(row(r, name))
two = pick("ranks", ranks=2)[0]
print(f"\ndecode speed-up 2 ranks / 1 rank: {two['decode_tokens_per_s'] / one['decode_tokens_per_s']:.2f}x; "
      f"largest rank's peak memory at 2 ranks / 1 rank: "
      f"{max(two['peak_memory_bytes']) / one['peak_memory_bytes'][0]:.0%}\n")

print("### Weight dtypes\n")
print(header)
for dtype in ("f32", "f16", "bf16"):
    for ranks in (1, 2):
        r = (pick("ranks", ranks=ranks) if dtype == "f32" else pick("dtype", dtype=dtype, ranks=ranks))[0]
        print(row(r, f"{dtype}, {ranks} rank{'s' if ranks > 1 else ''}"))
for ranks in (1, 2):
    base = pick("ranks", ranks=ranks)[0]["decode_tokens_per_s"]
    ratios = ", ".join(f"{d} {pick('dtype', dtype=d, ranks=ranks)[0]['decode_tokens_per_s'] / base:.2f}x"
                       for d in ("f16", "bf16"))
    print(f"\ndecode over f32 at {ranks} rank{'s' if ranks > 1 else ''}: {ratios}")

print("\n### Prompt length (2 ranks, f32, 16 new tokens)\n")
print("| prompt tokens | prefill | greedy decode after it |\n| --- | --- | --- |")
prompts = pick("prompt") + [two]
for r in sorted(prompts, key=lambda r: r["prompt_len"]):
    print(f"| {r['prompt_len']} | {r['prefill_ms']:.0f} ms | {r['decode_tokens_per_s']:.1f} tok/s |")

print("\n### Default model (SmolLM2-135M-Instruct GGUF Q4_1): f32 against quantized in memory\n")
print(header)
for dtype in ("f32", "quantized"):
    for ranks in (1, 2):
        print(row(pick("default", dtype=dtype, ranks=ranks)[0], f"{dtype}, {ranks} rank{'s' if ranks > 1 else ''}"))
for ranks in (1, 2):
    f32, q = (pick("default", dtype=d, ranks=ranks)[0]["decode_tokens_per_s"] for d in ("f32", "quantized"))
    print(f"\nquantized decode over f32 at {ranks} rank{'s' if ranks > 1 else ''}: {q / f32:.2f}x")
PY
