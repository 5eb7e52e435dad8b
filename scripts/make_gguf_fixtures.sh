#!/usr/bin/env bash
# Makes crates/scalpel-models/tests/fixtures/gguf/: quant_types.gguf (one tensor per GGUF type,
# quantized by candle) and quant_types_reference.safetensors (the same tensors dequantized by
# gguf-py, the independent reference that tests/gguf.rs compares candle against).
#
# Usage: scripts/make_gguf_fixtures.sh   (PYTHON overrides the reference interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/root/.cache/scalpel/ref-venv/bin/python}
cargo run --release -p scalpel-models --example make_gguf_quant_fixture
"$PYTHON" scripts/dequant_reference.py
