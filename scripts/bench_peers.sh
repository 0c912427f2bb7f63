#!/usr/bin/env bash
# Runs scripts/bench_peers.py in a private virtual environment (created on first use from the
# Python Package Index) after a release build. Arguments are passed on, e.g. --models smollm2.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PEER_VENV:-.venv-bench}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch transformers safetensors gguf accelerate ctranslate2 matplotlib
fi
cargo build --release --quiet --bin parallelformers --example make_random_llama
"$venv/bin/python" scripts/bench_peers.py "$@"
