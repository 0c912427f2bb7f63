#!/usr/bin/env bash
# The mixture-of-experts benchmark of BENCHMARKS.md ("Mixtures of experts", issue 20): decode of
# a random Qwen3-MoE-shaped checkpoint of 1.27 B parameters (0.22 B active per token) at 2 ranks,
# both ways of splitting the experts, f32 and f16, batch 1 (against the bandwidth limit of the
# active parameters, which `bench` measures and prints in the same run) and batch 8.
#
#   scripts/bench_moe.sh [CHECKPOINT_DIR]     (default: target/bench/qwen3moe-1b)
#
# The checkpoint is written first when missing (scripts/make_moe_bench_checkpoint.py, about 5 GB;
# set PYTHON to an interpreter with numpy and safetensors, default python3). Prints one JSON
# object per run and a Markdown table of them. Run it on an otherwise idle machine: the ranks
# share the memory bus with everything else.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-target/bench/qwen3moe-1b}"
python="${PYTHON:-python3}"
if [ ! -f "$model/config.json" ]; then
    "$python" scripts/make_moe_bench_checkpoint.py "$model"
fi
cargo build --release --quiet
results="$(mktemp)"
trap 'rm -f "$results"' EXIT
for dtype in f32 f16; do
    for batch in 1 8; do
        for split in tensor expert; do
            target/release/parallelformers bench --model "$model" --ranks 2 --dtype "$dtype" \
                --expert-split "$split" --batch "$batch" --prompt-len 16 --new-tokens 64 \
                --repeats 3 --json | sed "s/^{/{\"split\":\"$split\",/" | tee -a "$results"
        done
    done
done
"$python" - "$results" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| dtype | batch | experts split | decode tokens/s | steps/s | bandwidth limit (tokens/s) | % of limit |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    limit = r["bandwidth_limit_tokens_per_s"]
    share = f"{100 * r['decode_tokens_per_s'] / limit:.0f} %" if r["batch"] == 1 and limit else "-"
    print(f"| {r['dtype']} | {r['batch']} | {r['split']} | {r['decode_tokens_per_s']:.1f} | "
          f"{r['decode_steps_per_s']:.1f} | {limit:.1f} | {share} |")
EOF
