#!/usr/bin/env python3
"""Reconstruction metrics of SAELens-format dictionaries on the rows of a scalpel store, computed
by SAELens itself (``SAE.load_from_disk``, ``encode``/``decode``), so dictionaries trained by
scalpel and by SAELens are scored by one piece of code on the same held-out activations.

    PY=/root/.cache/scalpel/ref-venv/bin/python
    $PY scripts/eval_on_store.py --store VIEWS/eval --hook blocks.15.hook_resid_post DIR [DIR...]

Prints one JSON object per dictionary: mse (Σ over d, mean over rows), explained_variance
(1 − Σ‖x − x̂‖² / Σ‖x − mean x‖², pooled over all rows), explained_variance_saelens (SAELens's
per-batch formula averaged over batches of --batch-size rows), l0, and the fraction of latents that
never fire on the rows. For a transcoder give --hook-out: the target is read there.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from saelens_train import Store  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--hook", required=True)
    p.add_argument("--hook-out", default=None)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("dicts", nargs="+")
    args = p.parse_args()
    from sae_lens import SAE

    torch.set_num_threads(2)
    store = Store(args.store)
    ids = range(len(store.shards))
    x_all = torch.from_numpy(np.concatenate([store.kept_rows(i, args.hook) for i in ids]))
    y_all = x_all
    if args.hook_out:
        y_all = torch.from_numpy(np.concatenate([store.kept_rows(i, args.hook_out) for i in ids]))
    mean = y_all.double().mean(0)
    for d in args.dicts:
        sae = SAE.load_from_disk(d, device="cpu")
        sae.eval()
        sse = sst = l0 = 0.0
        fired = None
        ev_batches = []
        with torch.no_grad():
            for s in range(0, len(x_all), args.batch_size):
                x, y = x_all[s:s + args.batch_size], y_all[s:s + args.batch_size]
                f = sae.encode(x)
                yh = sae.decode(f)
                if hasattr(sae, "W_skip") and sae.W_skip is not None:
                    yh = yh + x @ sae.W_skip.T
                err = (y - yh).double().pow(2).sum(-1)
                sse += float(err.sum())
                sst += float((y.double() - mean).pow(2).sum())
                nz = f != 0
                l0 += float(nz.sum())
                fired = nz.any(0) if fired is None else fired | nz.any(0)
                tv = (y.double() - y.double().mean(0)).pow(2).sum(-1)
                ev_batches.append(1 - float(err.mean() / tv.mean()))
        n = len(x_all)
        print(json.dumps({
            "dict": d,
            "architecture": sae.cfg.architecture(),
            "rows": n,
            "mse": sse / n,
            "explained_variance": 1 - sse / sst,
            "explained_variance_saelens": float(np.mean(ev_batches)),
            "l0": l0 / n,
            "never_fired_fraction": float((~fired).double().mean()),
        }))


if __name__ == "__main__":
    main()
