#!/usr/bin/env bash
# Training speed of the toy models: scalpel's trainer and the same model and optimiser in PyTorch
# (scripts/toy_torch_bench.py), one after the other in the same run on the same machine.
#
#   scripts/toy_bench.sh [PYTHON]     PYTHON defaults to the reference venv's python
#
# Prints a markdown table of steps/s. Build first: cargo build --release.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$HOME/.cache/scalpel/ref-venv/bin/python}
BIN=target/release/scalpel
THREADS=${THREADS:-2}

ours() { "$BIN" toy "$@" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["steps_per_s"])'; }
torch() { "$PY" scripts/toy_torch_bench.py "$@" --threads "$THREADS" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["steps_per_s"])'; }

row() { # name, steps, scalpel args, torch args
  local name=$1 steps=$2 a=$3 t=$4
  local s p
  s=$(ours $a --bench "$steps")
  p=$(torch $t --steps "$steps")
  python3 -c 'import sys; n, s, p = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]); print(f"| {n} | {s:.1f} | {p:.1f} | {s / p:.2f}x |")' "$name" "$s" "$p"
}

echo "| toy (default settings) | scalpel steps/s | PyTorch steps/s | ratio |"
echo "|---|---|---|---|"
row "superposition: 7 instances, n 20, m 5, batch 1024" 2000 "superposition" "superposition"
row "induction: 2 layers x 2 heads, d_model 64, batch 64 x 32 tokens" 600 "induction" "induction"
row "grokking (default): p 31, d_model 64, d_mlp 256, full batch 480" 600 \
  "grokking" "grokking --p 31 --frac-train 0.5 --d-model 64 --heads 4 --d-mlp 256 --lr 2e-3"
row "grokking (paper): p 113, d_model 128, d_mlp 512, full batch 3830" 40 \
  "grokking --paper" "grokking"
row "grokking (paper), scalpel through candle autograd" 10 \
  "grokking --paper --autograd" "grokking"
