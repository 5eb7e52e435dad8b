#!/usr/bin/env python3
"""PyTorch reference for the activation-patching benchmark on SmolLM2-135M-Instruct.

scripts/patching_bench.sh runs `scalpel patch --sweep z_head_pos --method both` and saves the
prompt pairs it used; this script takes those pairs and does the same work the way a
TransformerLens user would, with plain forward hooks on the Hugging Face `transformers` model
(the GGUF dequantised to float32, eager attention). It prints one JSON object on stdout.

What is measured (everything on `--threads` CPU threads):

* the unpatched metrics: logit(answer) - logit(wrong) at the last position, averaged over the
  pairs, for the clean and the corrupt batch;
* `forward_seconds`: one plain batched forward of all clean prompts under no_grad (median of 3),
  and `forward_seconds_run_median`, the median of every plain forward timed in the run (less
  at the mercy of one burst of foreign load);
* the exact z_head_pos sweep, denoising, as `patching.get_act_patch_attn_head_out_by_pos` does
  it: every cell (layer l, head h, position p) is one full forward of the corrupt batch (all
  positions' logits computed, as TL's `run_with_hooks` would) with a hook on layer l that
  overwrites z[:, p, h, :] by the clean run's value. The whole grid (30 x 9 x P forwards) would
  take hours on a small CPU, so only `--cells` cells drawn uniformly without replacement
  (Python `random.Random(seed)`) are run; the time per cell times the number of cells is
  the extrapolated cost of the full sweep. The sampled cells and their patched metrics are
  reported so the driver can compare them with scalpel's exact grid. The per-cell time is the
  median over the sampled cells (robust to bursts of load from other processes; mean, min and
  max are reported too), and each cell is preceded by a timed unpatched forward so that its
  cost in "forwards" (median of cell / adjacent forward) is measured under matching load.
* attribution patching in the style of Neel Nanda's attribution-patching notebook: one clean
  forward caching z at every layer, one corrupt forward whose z tensors keep their gradients,
  one backward of the metric; attr[l, h, p] = sum over pairs and d_head of
  (z_clean - z_corrupt) * dM/dz_corrupt. The notebook's helper runs a forward and backward
  on both batches with the weights left trainable; here the clean run is forward-only, the
  weights are frozen (requires_grad False) and the gradient enters at the embedding output,
  the cheapest way to get the same numbers, so the reference's timing is if anything generous. The reported time is the
  median of 3 runs after one warm-up run and covers clean forward, corrupt forward, backward
  and the final products; the grid holds the estimate itself (not base metric + estimate).
  As for the cells, each run is preceded by a timed plain forward, and the median of the
  ratios is reported as `forward_equivalents_load_matched`.

z is TransformerLens's hook_z: the input of o_proj viewed as [batch, pos, n_heads, d_head].

Tokenisation matches scalpel: no special tokens (the GGUF says add_bos_token = false and
scalpel adds no BOS), answers must be one token each, and every clean and corrupt prompt must
have the same length (scalpel picks one IOI template for position sweeps); the script stops
with an error otherwise.

Usage:
  /root/.cache/scalpel/ref-venv/bin/python scripts/patching_bench.py PAIRS.jsonl \
      [--gguf PATH] [--cells 40] [--threads 2] [--seed 0]
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # silence the GGUF de-quantisation progress bar

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_GGUF = "/root/.cache/scalpel/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"


def fail(msg):
    print(f"patching_bench.py: {msg}", file=sys.stderr)
    sys.exit(1)


def load_pairs(path, tok):
    """Token ids of the pairs, exactly as scalpel builds them (no BOS, one-token answers)."""
    clean, corrupt, answer, wrong = [], [], [], []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        fail(f"{path}: no pairs")
    for i, r in enumerate(rows):
        c = tok(r["clean"], add_special_tokens=False).input_ids
        k = tok(r["corrupt"], add_special_tokens=False).input_ids
        if len(c) != len(k):
            fail(f"pair {i}: clean has {len(c)} tokens, corrupt {len(k)}")
        ids = []
        for key in ("answer", "wrong"):
            t = tok(r[key], add_special_tokens=False).input_ids
            if len(t) != 1:
                fail(f"pair {i}: {key} {r[key]!r} is {len(t)} tokens, not one")
            ids.append(t[0])
        clean.append(c)
        corrupt.append(k)
        answer.append(ids[0])
        wrong.append(ids[1])
    lengths = {len(c) for c in clean}
    if len(lengths) != 1:
        fail(f"prompts have different token lengths {sorted(lengths)}; a position sweep needs one")
    t = lambda x: torch.tensor(x, dtype=torch.int64)
    return t(clean), t(corrupt), t(answer), t(wrong)


def metric(logits, answer, wrong):
    """Mean over pairs of logit(answer) - logit(wrong) at the last position."""
    last = logits[:, -1, :]
    idx = torch.arange(last.shape[0])
    return (last[idx, answer] - last[idx, wrong]).mean()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs")
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--cells", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    transformers.utils.logging.disable_progress_bar()
    d, f = os.path.split(os.path.abspath(a.gguf))
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    load_seconds = time.perf_counter() - t0
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    L, H, dh = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    layers = model.model.layers

    clean, corrupt, answer, wrong = load_pairs(a.pairs, tok)
    n_pairs, P = clean.shape
    n_cells = L * H * P

    def run(ids):
        # One ordinary forward: logits at every position, no KV cache (as TL's run_with_hooks).
        return model(input_ids=ids, use_cache=False).logits

    # ------------------------------------------------------------------ unpatched + timing
    with torch.no_grad():
        run(clean)  # warm-up (allocator, first-call overheads)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            logits_clean = run(clean)
            times.append(time.perf_counter() - t)
        forward_seconds = statistics.median(times)
        m_clean = metric(logits_clean, answer, wrong).item()

    # clean z at every layer (hook_z = o_proj input as [b, p, H, dh])
    z_clean = {}

    def cache_hook(layer):
        def fn(mod, args):
            x = args[0]
            z_clean[layer] = x.detach().view(x.shape[0], x.shape[1], H, dh).clone()
        return fn

    handles = [layers[l].self_attn.o_proj.register_forward_pre_hook(cache_hook(l)) for l in range(L)]
    try:
        with torch.no_grad():
            m_clean_cached = metric(run(clean), answer, wrong).item()
    finally:
        for hd in handles:
            hd.remove()
    with torch.no_grad():
        m_corrupt = metric(run(corrupt), answer, wrong).item()
    assert len(z_clean) == L
    if abs(m_clean_cached - m_clean) > 1e-5:
        fail(f"clean metric not reproducible: {m_clean} vs {m_clean_cached}")

    # ------------------------------------------------------------------ exact sweep, sampled
    k = min(a.cells, n_cells)
    flat = random.Random(a.seed).sample(range(n_cells), k)

    def patch_hook(h, p, src):
        def fn(mod, args):
            x = args[0]
            z = x.view(x.shape[0], x.shape[1], H, dh).clone()
            z[:, p, h, :] = src[:, p, h, :]
            return (z.view_as(x),) + tuple(args[1:])
        return fn

    cells, values, cell_seconds, plain_seconds = [], [], [], []
    with torch.no_grad():
        run(corrupt)  # warm-up
        for i in flat:
            l, rem = divmod(i, H * P)
            h, p = divmod(rem, P)
            # an unpatched forward right before each cell, timed, so that the cell's cost can be
            # expressed in forwards measured under the same (shared-machine) load
            t = time.perf_counter()
            run(corrupt)
            plain_seconds.append(time.perf_counter() - t)
            t = time.perf_counter()
            hd = layers[l].self_attn.o_proj.register_forward_pre_hook(patch_hook(h, p, z_clean[l]))
            try:
                v = metric(run(corrupt), answer, wrong).item()
            finally:
                hd.remove()
            cell_seconds.append(time.perf_counter() - t)
            cells.append([l, h, p])
            values.append(v)
    # The median is the estimate: on a shared machine single cells catch bursts of foreign load
    # that say nothing about the method (the mean, min and max are reported too).
    seconds_per_cell = statistics.median(cell_seconds)
    cell_fe = statistics.median(c / f for c, f in zip(cell_seconds, plain_seconds))

    # ------------------------------------------------------------------ attribution patching
    def attribution():
        z_corrupt = {}

        def leaf_hook(mod, args, output):
            # Weights are frozen: let the gradient start at the embedding output instead.
            return output.detach().requires_grad_(True)

        def grad_hook(layer):
            def fn(mod, args):
                x = args[0]
                z = x.view(x.shape[0], x.shape[1], H, dh)
                z.retain_grad()
                z_corrupt[layer] = z
                return (z.view_as(x),) + tuple(args[1:])
            return fn

        cache = {}

        def clean_cache(layer):
            def fn(mod, args):
                x = args[0]
                cache[layer] = x.detach().view(x.shape[0], x.shape[1], H, dh)
            return fn

        start = time.perf_counter()
        # 1. clean forward, caching z
        hs = [layers[l].self_attn.o_proj.register_forward_pre_hook(clean_cache(l)) for l in range(L)]
        try:
            with torch.no_grad():
                run(clean)
        finally:
            for x in hs:
                x.remove()
        # 2. corrupt forward with every z on the autograd graph, 3. backward of the metric
        hs = [model.model.embed_tokens.register_forward_hook(leaf_hook)]
        hs += [layers[l].self_attn.o_proj.register_forward_pre_hook(grad_hook(l)) for l in range(L)]
        try:
            with torch.enable_grad():
                m = metric(run(corrupt), answer, wrong)
                m.backward()
        finally:
            for x in hs:
                x.remove()
        attr = torch.stack([
            ((cache[l] - z_corrupt[l].detach()) * z_corrupt[l].grad).sum(dim=(0, 3)).T  # [H, P]
            for l in range(L)
        ])
        seconds = time.perf_counter() - start
        return attr, seconds, m.item()

    attribution()  # warm-up (autograd first-call overheads)
    runs, attr_plain = [], []
    for _ in range(3):
        with torch.no_grad():  # a plain forward just before, for a load-matched ratio
            t = time.perf_counter()
            run(clean)
            attr_plain.append(time.perf_counter() - t)
        runs.append(attribution())
    attr, _, m_corrupt_grad = runs[-1]
    attr_seconds = statistics.median(r[1] for r in runs)
    attr_fe = statistics.median(r[1] / f for r, f in zip(runs, attr_plain))
    if abs(m_corrupt_grad - m_corrupt) > 1e-4:
        fail(f"corrupt metric with gradients on differs: {m_corrupt_grad} vs {m_corrupt}")

    print(json.dumps({
        "impl": f"transformers {transformers.__version__} / torch {torch.__version__} (f32, eager)",
        "gguf": os.path.abspath(a.gguf),
        "threads": a.threads,
        "pairs": n_pairs,
        "tokens_per_prompt": P,
        "clean_ids": clean.tolist(),
        "corrupt_ids": corrupt.tolist(),
        "answer_ids": answer.tolist(),
        "wrong_ids": wrong.tolist(),
        "dims": {"layers": L, "heads": H, "positions": P, "d_head": dh},
        "load_seconds": load_seconds,
        "clean": m_clean,
        "corrupt": m_corrupt,
        "forward_seconds": forward_seconds,
        "forward_seconds_all": times,
        # every unpatched batched forward timed in the run (3 above, one before each sampled
        # cell, one before each attribution run; clean and corrupt prompts have equal length)
        "forward_seconds_run_median": statistics.median(times + plain_seconds + attr_plain),
        "forward_seconds_run_count": len(times) + len(plain_seconds) + len(attr_plain),
        "exact": {
            "sweep": "z_head_pos",
            "direction": "denoise",
            "cells_total": n_cells,
            "cells_sampled": k,
            "seed": a.seed,
            "sampled_flat": flat,
            "sampled_cells": cells,
            "values": values,
            "cell_seconds": cell_seconds,
            "plain_forward_seconds": plain_seconds,
            "seconds_per_cell": seconds_per_cell,
            "seconds_per_cell_mean": sum(cell_seconds) / len(cell_seconds),
            "seconds_per_cell_min": min(cell_seconds),
            "seconds_per_cell_max": max(cell_seconds),
            "extrapolated_seconds": seconds_per_cell * n_cells,
            "forward_equivalents_per_cell": cell_fe,
            "extrapolated_forward_equivalents": cell_fe * n_cells,
        },
        "attribution": {
            "sweep": "z_head_pos",
            "direction": "denoise",
            "shape": [L, H, P],
            "values": attr.flatten().tolist(),
            "seconds": attr_seconds,
            "seconds_all": [r[1] for r in runs],
            "plain_forward_seconds": attr_plain,
            "forward_equivalents": attr_seconds / forward_seconds,
            "forward_equivalents_load_matched": attr_fe,
        },
    }))


if __name__ == "__main__":
    main()
