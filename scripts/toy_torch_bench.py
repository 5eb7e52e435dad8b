#!/usr/bin/env python3
"""PyTorch reference side of `scalpel toy ... --bench`.

Trains the same three toy models, with the same optimiser, that scalpel's toy
trainers train, and measures training steps per second:

* superposition - Elhage et al. (2022) toy model of superposition, several
  instances (one per feature probability) trained side by side;
* induction     - 2-layer attention-only transformer on repeated random
  sequences (TransformerLens-style, written out by hand);
* grokking      - Nanda et al. (2023) one-layer transformer on modular
  addition, full batch.

One timed step = make the batch (where the toy samples data) + forward + loss +
backward + AdamW step + zero_grad. The `--warmup` steps run first and are not
timed. Everything is float32 except the grokking loss, which (as in Nanda's
code) is computed in float64.

Prints one JSON object on stdout (progress goes to stderr):

    {"toy", "steps", "seconds", "steps_per_s", "first_loss", "last_loss",
     "settings", "torch", "threads"}   (+ "train_acc" for grokking)

`first_loss` is the loss of the very first training step (the first warm-up
step if any), `last_loss` that of the last timed step.

Usage (reference venv):

    /root/.cache/scalpel/ref-venv/bin/python scripts/toy_torch_bench.py superposition
    /root/.cache/scalpel/ref-venv/bin/python scripts/toy_torch_bench.py induction --steps 300
    /root/.cache/scalpel/ref-venv/bin/python scripts/toy_torch_bench.py grokking --threads 1
"""

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# superposition


def build_superposition(args):
    """Returns (step, finish): step() trains once and returns the loss tensor."""
    n_inst, n, m, batch = args.instances, args.n_features, args.d_hidden, args.batch
    # Feature probability (1 - S) per instance: 1 down to 1e-3, geometrically.
    feat_prob = torch.tensor(np.geomspace(1.0, 1e-3, n_inst), dtype=torch.float32)
    keep_prob = feat_prob[:, None, None]  # [I, 1, 1]
    importance = args.importance_decay ** torch.arange(n, dtype=torch.float32)  # [n]

    W = torch.empty(n_inst, m, n)
    for i in range(n_inst):
        torch.nn.init.xavier_normal_(W[i])  # std = sqrt(2 / (m + n))
    W.requires_grad_(True)
    b = torch.zeros(n_inst, n, requires_grad=True)
    opt = torch.optim.AdamW(
        [W, b], lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay
    )

    def step():
        values = torch.rand(n_inst, batch, n)
        present = torch.rand(n_inst, batch, n) < keep_prob
        x = torch.where(present, values, torch.zeros(()))
        h = torch.einsum("ibn,imn->ibm", x, W)
        out = torch.relu(torch.einsum("ibm,imn->ibn", h, W) + b[:, None, :])
        per_example = ((x - out) ** 2 * importance).sum(-1)  # [I, B]
        loss = per_example.mean(dim=1).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, lambda: {}


# ---------------------------------------------------------------------------
# induction


def _linear(fan_in, fan_out, bias=True):
    w = (torch.randn(fan_in, fan_out) / math.sqrt(fan_in)).requires_grad_(True)
    b = torch.zeros(fan_out, requires_grad=True) if bias else None
    return w, b


def _layer_norm_params(d):
    return torch.ones(d, requires_grad=True), torch.zeros(d, requires_grad=True)


def build_induction(args):
    vocab, half, d, n_heads = args.vocab, args.half, args.d_model, args.heads
    if d % n_heads:
        raise SystemExit("--d-model must be divisible by --heads")
    d_head = d // n_heads
    seq = 2 * half
    batch = args.batch

    params = []

    def reg(*ts):
        params.extend(t for t in ts if t is not None)
        return ts

    (W_E,) = reg((torch.randn(vocab, d) * 0.02).requires_grad_(True))
    (W_pos,) = reg((torch.randn(seq, d) * 0.02).requires_grad_(True))
    layers = []
    for _ in range(args.layers):
        layer = {}
        layer["ln_w"], layer["ln_b"] = reg(*_layer_norm_params(d))
        for name in ("q", "k", "v"):
            layer["W_" + name], layer["b_" + name] = reg(*_linear(d, n_heads * d_head))
        layer["W_O"], layer["b_O"] = reg(*_linear(n_heads * d_head, d))
        layers.append(layer)
    ln_f_w, ln_f_b = reg(*_layer_norm_params(d))
    W_U, _ = reg(*_linear(d, vocab, bias=False))

    causal_mask = torch.full((seq, seq), float("-inf")).triu(1)  # 0 on/below diag
    scale = 1.0 / math.sqrt(d_head)

    def heads(t):  # [B, L, H*dh] -> [B, H, L, dh]
        return t.view(batch, seq, n_heads, d_head).transpose(1, 2)

    def forward(tokens):
        resid = W_E[tokens] + W_pos  # [B, L, d]
        for lyr in layers:
            x = F.layer_norm(resid, (d,), lyr["ln_w"], lyr["ln_b"], eps=1e-5)
            q = heads(x @ lyr["W_q"] + lyr["b_q"])
            k = heads(x @ lyr["W_k"] + lyr["b_k"])
            v = heads(x @ lyr["W_v"] + lyr["b_v"])
            scores = (q @ k.transpose(-1, -2)) * scale + causal_mask  # [B, H, L, L]
            pattern = torch.softmax(scores, dim=-1)
            z = (pattern @ v).transpose(1, 2).reshape(batch, seq, n_heads * d_head)
            resid = resid + z @ lyr["W_O"] + lyr["b_O"]
        x = F.layer_norm(resid, (d,), ln_f_w, ln_f_b, eps=1e-5)
        return x @ W_U  # [B, L, vocab]

    opt = torch.optim.AdamW(
        params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay
    )

    def step():
        first = torch.randint(0, vocab, (batch, half))
        tokens = torch.cat([first, first], dim=1)  # [B, 2*half]
        logits = forward(tokens)
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, lambda: {}


# ---------------------------------------------------------------------------
# grokking


def build_grokking(args, gen):
    p, d, n_heads, d_mlp = args.p, args.d_model, args.heads, args.d_mlp
    if d % n_heads:
        raise SystemExit("--d-model must be divisible by --heads")
    d_head = d // n_heads
    vocab = p + 1  # token p is "="
    n_ctx = 3

    # Dataset: every (a, b) pair; a seeded permutation picks the train split.
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    tokens_all = torch.stack([a, b, torch.full_like(a, p)], dim=1)  # [p*p, 3]
    labels_all = (a + b) % p
    perm = torch.randperm(p * p, generator=gen)
    n_train = int(args.frac_train * p * p)
    train_idx = perm[:n_train]
    tokens, labels = tokens_all[train_idx], labels_all[train_idx]
    n_rows = tokens.shape[0]

    def w(*shape):
        return (torch.randn(*shape) / math.sqrt(d)).requires_grad_(True)

    W_E = w(vocab, d)
    W_pos = w(n_ctx, d)
    W_Q, W_K, W_V = w(d, n_heads * d_head), w(d, n_heads * d_head), w(d, n_heads * d_head)
    W_O = w(n_heads * d_head, d)
    W_in, b_in = w(d, d_mlp), torch.zeros(d_mlp, requires_grad=True)
    W_out, b_out = w(d_mlp, d), torch.zeros(d, requires_grad=True)
    W_U = w(d, vocab)
    params = [W_E, W_pos, W_Q, W_K, W_V, W_O, W_in, b_in, W_out, b_out, W_U]

    causal_mask = torch.full((n_ctx, n_ctx), float("-inf")).triu(1)
    scale = 1.0 / math.sqrt(d_head)

    def heads(t):  # [N, 3, H*dh] -> [N, H, 3, dh]
        return t.view(n_rows, n_ctx, n_heads, d_head).transpose(1, 2)

    def forward():
        resid = W_E[tokens] + W_pos  # [N, 3, d]
        q, k, v = heads(resid @ W_Q), heads(resid @ W_K), heads(resid @ W_V)
        pattern = torch.softmax((q @ k.transpose(-1, -2)) * scale + causal_mask, dim=-1)
        z = (pattern @ v).transpose(1, 2).reshape(n_rows, n_ctx, n_heads * d_head)
        resid = resid + z @ W_O
        resid = resid + torch.relu(resid @ W_in + b_in) @ W_out + b_out
        return resid @ W_U  # [N, 3, vocab]

    opt = torch.optim.AdamW(
        params, lr=args.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=args.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(s / 10, 1))

    def step():
        logits = forward()[:, -1].to(torch.float64)
        loss = F.nll_loss(torch.log_softmax(logits, dim=-1), labels)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def finish():
        # Train accuracy of the final parameters (one extra, untimed forward).
        with torch.no_grad():
            acc = (forward()[:, -1].argmax(-1) == labels).float().mean().item()
        return {"train_acc": acc, "n_train": n_rows}

    return step, finish


# ---------------------------------------------------------------------------
# timing


def time_training(step, steps, warmup, label):
    first_loss = None
    for _ in range(warmup):
        loss = step()
        if first_loss is None:
            first_loss = loss.item()
    log(f"[{label}] warm-up done ({warmup} steps); timing {steps} steps")
    report_every = max(1, steps // 10)
    last = None
    start = time.perf_counter()
    for i in range(steps):
        last = step()
        if first_loss is None:
            first_loss = last.item()
        if (i + 1) % report_every == 0:
            log(f"[{label}] step {i + 1}/{steps} loss {last.item():.5f}")
    seconds = time.perf_counter() - start
    return seconds, first_loss, (last.item() if last is not None else first_loss)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="toy", required=True)

    def common(sp):
        sp.add_argument("--steps", type=int, default=200, help="timed steps")
        sp.add_argument("--warmup", type=int, default=5, help="untimed steps first")
        sp.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
        sp.add_argument("--seed", type=int, default=0)

    sp = sub.add_parser("superposition", help="Elhage et al. toy model of superposition")
    common(sp)
    sp.add_argument("--instances", type=int, default=7)
    sp.add_argument("--n-features", type=int, default=20)
    sp.add_argument("--d-hidden", type=int, default=5)
    sp.add_argument("--batch", type=int, default=1024)
    sp.add_argument("--importance-decay", type=float, default=0.9)
    sp.add_argument("--lr", type=float, default=1e-3)
    sp.add_argument("--weight-decay", type=float, default=0.0)

    sp = sub.add_parser("induction", help="2-layer attention-only transformer")
    common(sp)
    sp.add_argument("--vocab", type=int, default=64)
    sp.add_argument("--half", type=int, default=16)
    sp.add_argument("--layers", type=int, default=2)
    sp.add_argument("--heads", type=int, default=2)
    sp.add_argument("--d-model", type=int, default=64)
    sp.add_argument("--batch", type=int, default=64)
    sp.add_argument("--lr", type=float, default=1e-3)
    sp.add_argument("--weight-decay", type=float, default=0.01)

    sp = sub.add_parser("grokking", help="Nanda et al. modular addition, full batch")
    common(sp)
    sp.add_argument("--p", type=int, default=113)
    sp.add_argument("--frac-train", type=float, default=0.3)
    sp.add_argument("--d-model", type=int, default=128)
    sp.add_argument("--heads", type=int, default=4)
    sp.add_argument("--d-mlp", type=int, default=512)
    sp.add_argument("--lr", type=float, default=1e-3)
    sp.add_argument("--weight-decay", type=float, default=1.0)

    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    common = {"toy", "steps", "warmup", "threads", "seed"}
    settings = {k: v for k, v in vars(args).items() if k not in common}
    settings["seed"] = args.seed
    settings["warmup"] = args.warmup

    if args.toy == "superposition":
        step, finish = build_superposition(args)
    elif args.toy == "induction":
        step, finish = build_induction(args)
    else:
        gen = torch.Generator().manual_seed(args.seed)
        step, finish = build_grokking(args, gen)

    seconds, first_loss, last_loss = time_training(step, args.steps, args.warmup, args.toy)
    result = {
        "toy": args.toy,
        "steps": args.steps,
        "seconds": seconds,
        "steps_per_s": args.steps / seconds if seconds > 0 else None,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "settings": settings,
        "torch": torch.__version__,
        "threads": args.threads,
    }
    result.update(finish())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
