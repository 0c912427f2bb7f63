#!/usr/bin/env bash
# Runs scripts/bench_peers.py in a private virtual environment (created on first use from the
# Python Package Index) after a release build. Arguments are passed on, e.g. --models smollm2.
# llama.cpp is the llama-cpp-python source package compiled for this machine's CPU, once (several
# minutes on two cores); if that fails, the reason is printed here and bench_peers.py reports
# llama.cpp as not measured. The build's log stays in the venv: delete it to try again.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PEER_VENV:-.venv-bench}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch transformers safetensors gguf accelerate ctranslate2 matplotlib
fi
log=$venv/llama-cpp-python-build.log
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null && [ ! -e "$log" ]; then
  echo "building llama-cpp-python from source for this CPU (several minutes; log: $log)" >&2
  # No cached wheel (it may come from another CPU); no multimodal library (not used here).
  if ! CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" "$venv/bin/pip" install --no-cache-dir \
      --no-binary llama-cpp-python llama-cpp-python >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "llama-cpp-python could not be built (above: the end of $log); llama.cpp will be reported as not" \
      "measured. Delete $log to try again." >&2
  fi
fi
cargo build --release --quiet --bin parallelformers --example make_random_llama
"$venv/bin/python" scripts/bench_peers.py "$@"
