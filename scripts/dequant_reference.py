#!/usr/bin/env python3
"""Dequantize every tensor of a GGUF file with gguf-py, as an independent reference.

gguf-py (llama.cpp's own Python package) dequantizes each GGML type in numpy, with no code
shared with candle. `crates/scalpel-models/tests/gguf.rs` checks that candle's dequantization
of `quant_types.gguf` (written by the `make_gguf_quant_fixture` example) matches this.

Output: float32 tensors keyed by tensor name, in row-major (PyTorch/candle) shape order.

Usage:

  /root/.cache/scalpel/ref-venv/bin/python scripts/dequant_reference.py \
      [crates/scalpel-models/tests/fixtures/gguf/quant_types.gguf] [OUT.safetensors]
"""

import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.normpath(os.path.join(HERE, "..", "crates", "scalpel-models", "tests", "fixtures", "gguf"))


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(FIXTURES, "quant_types.gguf")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(FIXTURES, "quant_types_reference.safetensors")
    reader = GGUFReader(src)
    refs = {}
    for t in reader.tensors:
        # GGUF lists dimensions innermost first; numpy wants them outermost first.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        refs[t.name] = np.ascontiguousarray(values)
        print(f"{t.name:6} {t.tensor_type.name:5} {shape} max|x| {np.abs(values).max():.4g}")
    save_file(refs, out)
    print(f"wrote {out} ({len(refs)} tensors)")


if __name__ == "__main__":
    main()
