#!/usr/bin/env python3
"""Python-side harvesting benchmark, to compare with `scalpel harvest`.

Harvests `blocks.{L}.hook_resid_post` of SmolLM2-135M-Instruct (loaded by
transformers from the same GGUF scalpel uses) over the token contexts stored in
a scalpel activation store, the way SAELens's ActivationsStore does it:
TransformerLens `HookedTransformer.run_with_cache(tokens, names_filter=[hook],
stop_at_layer=L+1)`, copying every position's activation into a preallocated
CPU buffer. If TransformerLens is missing or cannot wrap the model offline, it
falls back to plain transformers with a forward hook on `model.model.layers[L]`
that raises StopForward (the "stop early" trick), and says so in the JSON.

Prints one JSON line. Run with the reference venv, e.g.

    /root/.cache/scalpel/ref-venv/bin/python scripts/bench_harvest_tl.py /tmp/tlbench_store

Setup (once): /root/.cache/scalpel/ref-venv/bin/pip install sae-lens
(sae-lens pins transformer-lens<4, i.e. 3.x, which still has HookedTransformer;
transformer-lens 4.x removed it in favour of TransformerBridge.)
"""

import argparse
import glob
import json
import os
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A private, throw-away HF cache: TransformerLens resolves the model's config by
# hub name; we plant the GGUF-derived config.json there (see make_tl). Must be set
# before huggingface_hub is imported.
_HF_HOME = tempfile.mkdtemp(prefix="bench_tl_hf_home_")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF = "/root/.cache/scalpel/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"


class StopForward(Exception):
    pass


def load_store(store_dir, max_contexts, hook):
    shards = sorted(glob.glob(os.path.join(store_dir, "shards", "shard-*.safetensors")))
    if not shards:
        sys.exit(f"no shards under {store_dir}/shards")
    toks = []
    first_tokens = first_acts = None
    n = 0
    for i, path in enumerate(shards):
        d = load_file(path)
        t = d["tokens"].astype(np.int64)
        if i == 0:
            first_tokens = t
            if hook not in d:
                sys.exit(f"shard 0 has no tensor {hook}; tensors: {list(d)}")
            first_acts = d[hook]
        toks.append(t)
        n += t.shape[0]
        if n >= max_contexts:
            break
    tokens = torch.from_numpy(np.concatenate(toks, axis=0)[:max_contexts].copy())
    return tokens, torch.from_numpy(first_tokens.copy()), torch.from_numpy(np.asarray(first_acts).copy())


def load_hf(gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    return model, tok


def make_tl(hf_model, tokenizer):
    """Wrap the GGUF-loaded HF model in a TransformerLens HookedTransformer, offline.

    SmolLM2 is not in TL's OFFICIAL_MODEL_NAMES, but TL 3.x accepts a local
    directory holding a config.json as the model name (it then reads the config
    with AutoConfig, maps LlamaForCausalLM, and takes the weights from hf_model).
    """
    from transformer_lens import HookedTransformer

    # transformers dequantizes GGUF tensors to dense float32 at load time, but the
    # config keeps quantization_config={"quant_method": "gguf"}, which TL 3.x
    # refuses (it fears packed storage). Check the weights really are dense
    # float32 nn.Linear/Embedding, then drop the marker.
    for name, p in hf_model.named_parameters():
        if p.dtype != torch.float32:
            raise RuntimeError(f"{name} is {p.dtype}, not dense float32")
    for m in hf_model.modules():
        if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear:
            raise RuntimeError(f"non-plain Linear {type(m)}")
    if getattr(hf_model.config, "quantization_config", None) is not None:
        del hf_model.config.quantization_config
    for attr in ("hf_quantizer", "is_quantized"):
        if hasattr(hf_model, attr):
            try:
                setattr(hf_model, attr, None if attr == "hf_quantizer" else False)
            except Exception:  # noqa: BLE001
                pass
    # SmolLM2 is not in TL's OFFICIAL_MODEL_NAMES (3.9.0); register it, and plant
    # its config (from the GGUF-loaded model) in the offline HF cache so that
    # AutoConfig.from_pretrained(HF_NAME) resolves without the network.
    from transformer_lens import loading_from_pretrained as loading

    if HF_NAME not in loading.OFFICIAL_MODEL_NAMES:
        loading.OFFICIAL_MODEL_NAMES.append(HF_NAME)
    snap = "0" * 40
    repo = os.path.join(os.environ["HF_HUB_CACHE"], "models--" + HF_NAME.replace("/", "--"))
    os.makedirs(os.path.join(repo, "snapshots", snap), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(snap)
    hf_model.config.architectures = ["LlamaForCausalLM"]
    hf_model.config.to_json_file(os.path.join(repo, "snapshots", snap, "config.json"))
    tl = HookedTransformer.from_pretrained_no_processing(
        HF_NAME,
        hf_model=hf_model,
        tokenizer=tokenizer,
        device="cpu",
        dtype=torch.float32,
    )
    tl.eval()
    return tl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("store", help="scalpel activation store directory")
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--max-contexts", type=int, default=160)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force-fallback", action="store_true", help="skip TransformerLens")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    L = args.layer
    hook = f"blocks.{L}.hook_resid_post"
    tokens, tok0, acts0 = load_store(args.store, args.max_contexts, hook)
    n_ctx, ctx_len = tokens.shape

    import transformers

    hf_model, tokenizer = load_hf(args.gguf)
    d_model = hf_model.config.hidden_size
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }

    tl = None
    tl_error = None
    if not args.force_fallback:
        try:
            import transformer_lens

            tl = make_tl(hf_model, tokenizer)
            versions["transformer_lens"] = getattr(transformer_lens, "__version__", None) or _pkg_version(
                "transformer-lens"
            )
            sv = _pkg_version("sae-lens")
            if sv:
                versions["sae_lens"] = sv
        except Exception as e:  # noqa: BLE001
            tl_error = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc(file=sys.stderr)
            tl = None

    if tl is not None:
        method = "transformer_lens run_with_cache stop_at_layer"

        @torch.no_grad()
        def harvest(batch):
            _, cache = tl.run_with_cache(batch, names_filter=[hook], stop_at_layer=L + 1)
            return cache[hook]

        @torch.no_grad()
        def full_forward(batch):
            return tl(batch, return_type="logits")
    else:
        method = "transformers hook + early stop"
        captured = {}

        def fwd_hook(_mod, _inp, out):
            captured["x"] = out[0] if isinstance(out, tuple) else out
            raise StopForward

        layer_mod = hf_model.model.layers[L]

        @torch.no_grad()
        def harvest(batch):
            h = layer_mod.register_forward_hook(fwd_hook)
            try:
                hf_model(batch, use_cache=False)
            except StopForward:
                pass
            finally:
                h.remove()
            return captured.pop("x")

        @torch.no_grad()
        def full_forward(batch):
            return hf_model(batch, use_cache=False).logits

    B = args.batch
    batches = [tokens[i : i + B] for i in range(0, n_ctx, B)]

    # warm-up
    harvest(batches[0])
    full_forward(batches[0])

    # timed harvest into a preallocated CPU buffer (SAELens-style)
    buf = torch.empty((n_ctx * ctx_len, d_model), dtype=torch.float32)
    t0 = time.perf_counter()
    row = 0
    for b in batches:
        a = harvest(b)
        m = a.shape[0] * a.shape[1]
        buf[row : row + m] = a.reshape(m, d_model).to("cpu", torch.float32)
        row += m
    secs = time.perf_counter() - t0
    assert row == n_ctx * ctx_len

    # reference: plain full forward, no hooks
    t0 = time.perf_counter()
    for b in batches:
        full_forward(b)
    full_secs = time.perf_counter() - t0

    # correctness: shard 0's contexts vs the store's stored activations
    n0 = tok0.shape[0]
    if n0 <= n_ctx and torch.equal(tokens[:n0], tok0):
        mine0 = buf[: n0 * ctx_len]
    else:
        parts = []
        for i in range(0, n0, B):
            a = harvest(tok0[i : i + B])
            parts.append(a.reshape(-1, d_model))
        mine0 = torch.cat(parts, 0)
    diff = (mine0 - acts0.to(torch.float32)).abs()
    max_abs = float(diff.max())
    rel = float(diff.max() / acts0.abs().max())
    # SmolLM2 has huge activations (~1e4) at a few positions, so also report the
    # worst per-position difference relative to that position's max |act|.
    row_rel = float((diff.amax(1) / acts0.abs().amax(1).clamp_min(1e-6)).max())
    small = acts0.abs().amax(1) < 100.0
    max_abs_small = float(diff[small].max()) if bool(small.any()) else None

    out = {
        "impl": versions,
        "method": method,
        "hook": hook,
        "contexts": n_ctx,
        "ctx_len": ctx_len,
        "batch": B,
        "threads": args.threads,
        "tokens": n_ctx * ctx_len,
        "seconds": round(secs, 3),
        "tokens_per_s": round(n_ctx * ctx_len / secs, 1),
        "full_forward_seconds": round(full_secs, 3),
        "full_forward_tokens_per_s": round(n_ctx * ctx_len / full_secs, 1),
        "max_abs_diff_vs_store": max_abs,
        "max_abs_diff_rel_to_max_abs_act": rel,
        "max_row_rel_diff": row_rel,
        "max_abs_diff_rows_below_100": max_abs_small,
        "store_max_abs_act": float(acts0.abs().max()),
        "crosscheck_contexts": n0,
    }
    if tl_error:
        out["transformer_lens_error"] = tl_error
    print(json.dumps(out))


def _pkg_version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
