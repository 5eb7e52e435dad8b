"""Makes the fixtures of crates/scalpel-dict/tests/import.rs: tiny dictionaries (d 16, d_sae 32)
in three foreign layouts, each with the tensors in SAELens orientation and the outputs of the
source's own formulas, computed here in numpy.

Run with the reference venv:
    /root/.cache/scalpel/ref-venv/bin/python scripts/make_import_fixtures.py

- `sparsify/layers.3/`: EleutherAI sparsify (`cfg.json`, `sae.safetensors` with `encoder.weight
  [d_sae, d_in]`, `encoder.bias`, `W_dec [d_sae, d_in]`, `b_dec`); TopK as in
  `sparsify/sparse_coder.py` + `fused_encoder.py`: topk(relu((x - b_dec) @ encoder.weight^T + bias)).
- `gemma_scope/params.npz`: Gemma Scope (`W_enc [d_model, d_sae]`, `W_dec`, `b_enc`, `b_dec`,
  `threshold`); JumpReLU relu(pre) * (pre > threshold) with pre = x @ W_enc + b_enc (no b_dec
  subtraction, as Gemma Scope's tutorial code).
- `circuit_tracer/`: a transcoder set (`config.yaml`, `layer_0.safetensors` JumpReLU,
  `layer_1.safetensors` ReLU + `W_skip`), as `circuit_tracer/transcoder/single_layer_transcoder.py`:
  encode = act(x @ W_enc^T + b_enc), decode = f @ W_dec + b_dec (+ x @ W_skip^T).

Each directory gets `expected.safetensors`: `x [6, 16]`, the SAELens-orientation weights, the
feature activations `feature_acts` and the full output `forward`.
"""

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

D, D_SAE, N = 16, 32, 6
OUT = Path(__file__).resolve().parent.parent / "crates/scalpel-dict/tests/fixtures/import"
rng = np.random.default_rng(0)


def randn(*shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def sparsify():
    d = OUT / "sparsify/layers.3"
    d.mkdir(parents=True)
    k = 4
    enc_w, enc_b = randn(D_SAE, D), randn(D_SAE, scale=0.1)
    w_dec, b_dec = randn(D_SAE, D), randn(D, scale=0.1)
    cfg = {"activation": "topk", "expansion_factor": 2, "normalize_decoder": True,
           "num_latents": D_SAE, "k": k, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": D}
    (d / "cfg.json").write_text(json.dumps(cfg))
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec},
              str(d / "sae.safetensors"))
    x = randn(N, D, scale=1.0)
    pre = np.maximum((x - b_dec) @ enc_w.T + enc_b, 0)
    f = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=1)[:, :k]
    np.put_along_axis(f, idx, np.take_along_axis(pre, idx, 1), 1)
    save_file({"x": x, "W_enc": np.ascontiguousarray(enc_w.T), "b_enc": enc_b, "W_dec": w_dec,
               "b_dec": b_dec, "feature_acts": f, "forward": f @ w_dec + b_dec},
              str(d / "expected.safetensors"))


def gemma_scope():
    d = OUT / "gemma_scope"
    d.mkdir(parents=True)
    w_enc, b_enc = randn(D, D_SAE), randn(D_SAE, scale=0.1)
    w_dec, b_dec = randn(D_SAE, D), randn(D, scale=0.1)
    threshold = np.abs(randn(D_SAE, scale=0.3))
    params = {"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc, "b_dec": b_dec,
              "threshold": threshold}
    np.savez(d / "params.npz", **params)
    x = randn(N, D, scale=1.0)
    pre = x @ w_enc + b_enc
    f = np.maximum(pre, 0) * (pre > threshold)
    save_file({"x": x, **params, "feature_acts": f, "forward": f @ w_dec + b_dec},
              str(d / "expected.safetensors"))
    # A float16 copy (Gemma Scope also ships half-precision params).
    np.savez(d / "params_f16.npz", **{k: v.astype(np.float16) for k, v in params.items()})


def circuit_tracer():
    d = OUT / "circuit_tracer"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(
        "# circuit-tracer transcoder set\n"
        "model_name: \"tiny/model\"\n"
        "model_kind: transcoder_set\n"
        "feature_input_hook: \"mlp.hook_in\"\n"
        "feature_output_hook: \"hook_mlp_out\"\n"
        "scan: tiny-transcoders\n"
        "transcoders:\n"
        "  - \"layer_0.safetensors\"\n"
        "  - layer_1.safetensors  # with a skip connection\n")
    expected = {}
    x = randn(N, D, scale=1.0)
    expected["x"] = x
    for layer in range(2):
        w_enc, b_enc = randn(D_SAE, D), randn(D_SAE, scale=0.1)
        w_dec, b_dec = randn(D_SAE, D), randn(D, scale=0.1)
        t = {"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc, "b_dec": b_dec}
        pre = x @ w_enc.T + b_enc
        if layer == 0:
            thr = np.abs(randn(D_SAE, scale=0.3))
            t["activation_function.threshold"] = thr
            f = pre * (pre > thr)  # circuit-tracer's JumpReLU
            out = f @ w_dec + b_dec
        else:
            w_skip = randn(D, D)
            t["W_skip"] = w_skip
            f = np.maximum(pre, 0)
            out = f @ w_dec + b_dec + x @ w_skip.T
        save_file(t, str(d / f"layer_{layer}.safetensors"))
        expected[f"{layer}.W_enc"] = np.ascontiguousarray(w_enc.T)
        expected[f"{layer}.feature_acts"] = f
        expected[f"{layer}.forward"] = out
    save_file(expected, str(d / "expected.safetensors"))


if __name__ == "__main__":
    shutil.rmtree(OUT, ignore_errors=True)
    sparsify()
    gemma_scope()
    circuit_tracer()
