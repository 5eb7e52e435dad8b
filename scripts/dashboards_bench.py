#!/usr/bin/env python3
"""SAEDashboard's side of the dashboards benchmark (scripts/dashboards_bench.sh).

Computes SAEDashboard (PyPI `sae-dashboard`) feature data for every latent of a SAELens
dictionary over the first N contexts of a scalpel activation store's token ids, with
SmolLM2-135M-Instruct loaded by transformers from the same GGUF scalpel uses and wrapped as a
sae-lens HookedSAETransformer (offline, as scripts/bench_harvest_tl.py does), and prints one
JSON line: tokens, latents, seconds (SaeVisRunner.run only), tokens/s, versions.

SAEDashboard takes token ids and runs the model itself (once per batch of features), so its
time includes forward passes that `scalpel dashboards --data STORE` does not make; the shell
script also times scalpel on the same contexts from the corpus, where scalpel runs the model
too.

    PY=/root/.cache/scalpel/dash-venv/bin/python
    $PY scripts/dashboards_bench.py --store STORE --dict SAE_DIR --contexts 16
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_harvest_tl as tlb  # noqa: E402  (sets up an offline HF cache on import)

import torch  # noqa: E402


def version(name):
    try:
        from importlib.metadata import version as v

        return v(name)
    except Exception:  # noqa: BLE001
        return None


def gguf_tokenizer(path):
    """SmolLM2's byte-level BPE tokenizer rebuilt from the GGUF's vocabulary and merges
    (transformers 4.56, which sae-dashboard pins, cannot convert this GGUF's tokenizer)."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    r = gguf.GGUFReader(path)

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(key):
        f = r.fields[key]
        return int(f.parts[f.data[0]][0])

    vocab = {t: i for i, t in enumerate(strings("tokenizer.ggml.tokens"))}
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    inv = {i: t for t, i in vocab.items()}
    bos = inv[scalar("tokenizer.ggml.bos_token_id")]
    eos = inv[scalar("tokenizer.ggml.eos_token_id")]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    # TransformerLens reloads the tokenizer by its path: give it one.
    out = tempfile.mkdtemp(prefix="dash_bench_tok_")
    fast.save_pretrained(out)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out)


def load_model(path):
    from transformers import AutoModelForCausalLM

    d, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--dict", required=True, help="SAELens dictionary folder")
    ap.add_argument("--contexts", type=int, default=16)
    ap.add_argument("--latents", type=int, default=0, help="first N latents (0: all)")
    ap.add_argument("--gguf", default=tlb.DEFAULT_GGUF)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--features-batch", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE, HookedSAETransformer

    sae = SAE.load_from_disk(args.dict, device="cpu")
    with open(os.path.join(args.dict, "cfg.json")) as f:
        hook = json.load(f)["metadata"]["hook_name"]
    # sae-lens may not carry the metadata over; SaeVisRunner reads the hook from both.
    if getattr(sae.cfg.metadata, "hook_name", None) is None:
        sae.cfg.metadata.hook_name = hook
    # SaeVisRunner.run calls fold_W_dec_norm(), which sae-lens refuses for a TopK SAE without
    # rescale_acts_by_decoder_norm; folding only changes units, not the work, so skip it.
    sae.fold_W_dec_norm = lambda: None
    tokens, _, _ = tlb.load_store(args.store, args.contexts, hook)
    hf_model, tokenizer = load_model(args.gguf), gguf_tokenizer(args.gguf)
    tl = tlb.make_tl(hf_model, tokenizer)
    model = HookedSAETransformer(tl.cfg, tokenizer=tl.tokenizer)
    model.load_state_dict(tl.state_dict(), strict=False)

    model.eval()
    del tl, hf_model

    n_latents = args.latents or sae.cfg.d_sae
    cfg = SaeVisConfig(
        hook_point=hook,
        features=list(range(n_latents)),
        minibatch_size_features=args.features_batch,
        minibatch_size_tokens=64,
        device="cpu",
        dtype="float32",
        verbose=False,
    )
    start = time.perf_counter()
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
    secs = time.perf_counter() - start
    n_tokens = int(tokens.numel())
    return {
        "tool": "sae-dashboard",
        "tokens": n_tokens,
        "contexts": int(tokens.shape[0]),
        "latents": n_latents,
        "features_done": len(data.feature_data_dict),
        "seconds": round(secs, 2),
        "tokens_per_second": round(n_tokens / secs, 1),
        "latent_tokens_per_second": round(n_tokens * n_latents / secs, 1),
        "threads": args.threads,
        "versions": {
            "sae_dashboard": version("sae-dashboard"),
            "sae_lens": version("sae-lens"),
            "transformer_lens": version("transformer-lens"),
            "torch": torch.__version__,
        },
    }


if __name__ == "__main__":
    # Libraries print progress on stdout; keep stdout for the one JSON line.
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        result = main()
    print(json.dumps(result), file=real_stdout)
