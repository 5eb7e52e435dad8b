#!/usr/bin/env python3
"""Reference values for activation patching and attribution patching.

This is the ground truth the Rust circuits code is compared against. For the tiny
random llama (GQA, rotary) and gpt2 models in crates/scalpel-models/tests/fixtures/models
it builds three clean/corrupt prompt pairs that differ only at positions 2 and 5, and
then, with nothing but plain PyTorch hooks on the Hugging Face `transformers` modules:

* runs every cell of nine patching sweeps (residual stream, attention output, MLP
  output, per-head z, per-head-and-position z, q, k, v and attention pattern), once
  in the denoising direction (corrupt run, clean values patched in) and once in the
  noising direction (clean run, corrupt values patched in), recording the patched
  logit-difference metric of each cell; plus a denoising residual sweep scored with
  the answer probability;
* computes the first-order attribution-patching estimate of every such cell,
  (other_act - base_act) * dM/d(act) summed over the cell's slice, with the gradient
  taken by backpropagating through the same hooked activations.

Activations use TransformerLens's meaning (see shared/reference/hook-points.md):
q/k/v are the projections before rotary, z is the input of the output projection,
the pattern is the softmax probability matrix that multiplies v. The pattern can only
be reached inside attention, so the module-level `eager_attention_forward` of
`modeling_llama` / `modeling_gpt2` is swapped for a line-by-line copy that exposes
the probabilities to the hooks; the script proves the copy is bit-identical.

Before writing anything the script checks (and raises if any check fails):
the swapped attention reproduces stock HF logits exactly; patching any site with the
run's own values reproduces the unpatched logits exactly; patching the whole of
resid_pre[0] reproduces the other run's metric exactly; cells at positions 0 and 1
(identical prefix) leave the metric unchanged; attribution sums are consistent across
granularities (z per head/position vs per head vs attn_out); and every sweep's gradient
matches a small finite step of the same interpolated patch.

The output format is described in
crates/scalpel-circuits/tests/fixtures/patching/README.md.

Usage (from anywhere; no network; output is deterministic):

  /root/.cache/scalpel/ref-venv/bin/python scripts/make_patching_fixtures.py [OUT_DIR]
"""

import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel, LlamaForCausalLM
from transformers.models.gpt2 import modeling_gpt2
from transformers.models.llama import modeling_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(REPO, "crates", "scalpel-models", "tests", "fixtures", "models")
DEFAULT_OUT = os.path.join(REPO, "crates", "scalpel-circuits", "tests", "fixtures", "patching")

SEED = 4321
N_PAIRS = 3
SEQ = 8
CORRUPT_POSITIONS = (2, 5)

SWEEPS = [
    # name, site, grid dims after L
    ("resid_pre", "resid_pre", ("P",)),
    ("attn_out", "attn_out", ("P",)),
    ("mlp_out", "mlp_out", ("P",)),
    ("z_head", "z", ("H",)),
    ("z_head_pos", "z", ("H", "P")),
    ("q_head", "q", ("H",)),
    ("k_head", "k", ("G",)),
    ("v_head", "v", ("G",)),
    ("pattern_head", "pattern", ("H",)),
]
SITES = ["resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern"]


# ---------------------------------------------------------------------------
# hooks


class Hooks:
    """Every intervention goes through `apply(site, layer, act)`.

    `act` is the activation in TransformerLens layout: resid_pre/attn_out/mlp_out
    [b,p,d]; z/q [b,p,h,dh]; k/v [b,p,g,dh]; pattern [b,h,q,k].

    patches: {(site, layer): [(index, source, alpha)]}: act[index] is replaced by
             source[index] (alpha None) or act[index] + alpha*(source[index]-act[index]).
    cache:   dict to fill with the activation actually used downstream, or None.
    retain:  call retain_grad() on the cached activations.
    """

    def __init__(self):
        self.patches = {}
        self.cache = None
        self.retain = False
        self.calls = 0

    def reset(self):
        self.patches = {}
        self.cache = None
        self.retain = False

    def apply(self, site, layer, act):
        self.calls += 1
        for index, source, alpha in self.patches.get((site, layer), []):
            assert source.shape == act.shape, (site, layer, source.shape, act.shape)
            act = act.clone()
            if alpha is None:
                act[index] = source[index]
            else:
                act[index] = act[index] + alpha * (source[index] - act[index])
        if self.cache is not None:
            if self.retain:
                act.retain_grad()
            self.cache[(site, layer)] = act
        return act


HOOKS = Hooks()


def hooked_llama_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Copy of transformers' modeling_llama.eager_attention_forward with a pattern hook."""
    key_states = modeling_llama.repeat_kv(key, module.num_key_value_groups)
    value_states = modeling_llama.repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = HOOKS.apply("pattern", module.layer_idx, attn_weights)
    attn_weights = torch.nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


def hooked_gpt2_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Copy of transformers' modeling_gpt2.eager_attention_forward with a pattern hook."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = attn_weights.type(value.dtype)
    attn_weights = HOOKS.apply("pattern", module.layer_idx, attn_weights)
    attn_weights = torch.nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    attn_output = attn_output.transpose(1, 2)
    return attn_output, attn_weights


STOCK_EAGER = {
    "llama": modeling_llama.eager_attention_forward,
    "gpt2": modeling_gpt2.eager_attention_forward,
}


def set_attention(family, hooked):
    if family == "llama":
        modeling_llama.eager_attention_forward = hooked_llama_eager if hooked else STOCK_EAGER["llama"]
    else:
        modeling_gpt2.eager_attention_forward = hooked_gpt2_eager if hooked else STOCK_EAGER["gpt2"]


def install_hooks(model, family, dims):
    """Register the module hooks that route every site through HOOKS.apply."""
    h, g, dh, d = dims["H"], dims["G"], dims["dh"], dims["d"]

    def pre_hook_block(layer):
        def fn(mod, args, kwargs):
            if args:
                return (HOOKS.apply("resid_pre", layer, args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = HOOKS.apply("resid_pre", layer, kwargs["hidden_states"])
            return args, kwargs
        return fn

    def out_hook(site, layer):
        def fn(mod, args, output):
            if isinstance(output, tuple):
                return (HOOKS.apply(site, layer, output[0]),) + tuple(output[1:])
            return HOOKS.apply(site, layer, output)
        return fn

    def z_hook(layer):
        def fn(mod, args):
            x = args[0]
            b, p, _ = x.shape
            z = HOOKS.apply("z", layer, x.view(b, p, h, dh))
            return (z.reshape(b, p, h * dh),) + tuple(args[1:])
        return fn

    def heads_hook(site, layer, n):
        def fn(mod, args, output):
            b, p, _ = output.shape
            a = HOOKS.apply(site, layer, output.view(b, p, n, dh))
            return a.reshape(b, p, n * dh)
        return fn

    def gpt2_qkv_hook(layer):
        def fn(mod, args, output):
            b, p, _ = output.shape
            q, k, v = output.split(d, dim=2)
            q = HOOKS.apply("q", layer, q.reshape(b, p, h, dh))
            k = HOOKS.apply("k", layer, k.reshape(b, p, g, dh))
            v = HOOKS.apply("v", layer, v.reshape(b, p, g, dh))
            return torch.cat([q.reshape(b, p, d), k.reshape(b, p, d), v.reshape(b, p, d)], dim=2)
        return fn

    handles = []
    if family == "gpt2":
        blocks = model.transformer.h
        for l, blk in enumerate(blocks):
            assert blk.attn.layer_idx == l
            handles.append(blk.register_forward_pre_hook(pre_hook_block(l), with_kwargs=True))
            handles.append(blk.attn.register_forward_hook(out_hook("attn_out", l)))
            handles.append(blk.mlp.register_forward_hook(out_hook("mlp_out", l)))
            handles.append(blk.attn.c_proj.register_forward_pre_hook(z_hook(l)))
            handles.append(blk.attn.c_attn.register_forward_hook(gpt2_qkv_hook(l)))
    else:
        blocks = model.model.layers
        for l, blk in enumerate(blocks):
            assert blk.self_attn.layer_idx == l
            handles.append(blk.register_forward_pre_hook(pre_hook_block(l), with_kwargs=True))
            handles.append(blk.self_attn.register_forward_hook(out_hook("attn_out", l)))
            handles.append(blk.mlp.register_forward_hook(out_hook("mlp_out", l)))
            handles.append(blk.self_attn.o_proj.register_forward_pre_hook(z_hook(l)))
            handles.append(blk.self_attn.q_proj.register_forward_hook(heads_hook("q", l, h)))
            handles.append(blk.self_attn.k_proj.register_forward_hook(heads_hook("k", l, g)))
            handles.append(blk.self_attn.v_proj.register_forward_hook(heads_hook("v", l, g)))
    return handles


# ---------------------------------------------------------------------------
# inputs, metrics


def make_inputs(vocab):
    gen = torch.Generator().manual_seed(SEED)
    clean = torch.randint(1, vocab, (N_PAIRS, SEQ), generator=gen, dtype=torch.int64)
    corrupt = clean.clone()
    for i in range(N_PAIRS):
        for p in CORRUPT_POSITIONS:
            while True:
                t = int(torch.randint(1, vocab, (1,), generator=gen))
                if t != int(clean[i, p]):
                    break
            corrupt[i, p] = t
    answer = torch.zeros(N_PAIRS, dtype=torch.int64)
    wrong = torch.zeros(N_PAIRS, dtype=torch.int64)
    for i in range(N_PAIRS):
        a = int(torch.randint(1, vocab, (1,), generator=gen))
        while True:
            w = int(torch.randint(1, vocab, (1,), generator=gen))
            if w != a:
                break
        answer[i], wrong[i] = a, w
    assert torch.equal(clean[:, :2], corrupt[:, :2])
    diff = (clean != corrupt).nonzero()[:, 1].unique().tolist()
    assert diff == list(CORRUPT_POSITIONS), diff
    return clean, corrupt, answer, wrong


def logit_diff(logits, answer, wrong):
    last = logits[:, -1, :]
    idx = torch.arange(last.shape[0])
    return (last[idx, answer] - last[idx, wrong]).mean()


def answer_prob(logits, answer):
    last = torch.softmax(logits[:, -1, :], dim=-1)
    return last[torch.arange(last.shape[0]), answer].mean()


def forward(model, ids, patches=None, cache=None, retain=False):
    HOOKS.reset()
    HOOKS.patches = patches or {}
    HOOKS.cache = cache
    HOOKS.retain = retain
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        HOOKS.reset()


# ---------------------------------------------------------------------------
# sweeps


def grid_shape(dims, grid):
    return (dims["L"],) + tuple(dims[x] for x in grid)


def cells(dims, site, grid):
    """Yield (grid index, layer, activation index) for every cell of a sweep."""
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in grid_shape(dims, grid)]).tolist():
        if isinstance(idx, int):
            idx = [idx]
        layer, rest = idx[0], dict(zip(grid, idx[1:]))
        al = slice(None)
        if site in ("resid_pre", "attn_out", "mlp_out"):
            index = (al, rest["P"])
        elif site == "z" and "P" in rest:
            index = (al, rest["P"], rest["H"])
        elif site in ("z", "q"):
            index = (al, al, rest["H"])
        elif site in ("k", "v"):
            index = (al, al, rest["G"])
        elif site == "pattern":
            index = (al, rest["H"])
        else:
            raise ValueError(site)
        yield tuple(idx), layer, index


def run_family(family, out_dir):
    print(f"== {family}")
    torch.manual_seed(SEED)
    cls = GPT2LMHeadModel if family == "gpt2" else LlamaForCausalLM
    model = cls.from_pretrained(
        os.path.join(MODELS_DIR, family), attn_implementation="eager", dtype=torch.float32
    ).eval()
    cfg = model.config
    if family == "gpt2":
        assert not cfg.reorder_and_upcast_attn and not cfg.add_cross_attention
        n_heads = cfg.n_head
        dims = dict(L=cfg.n_layer, P=SEQ, H=n_heads, G=n_heads, d=cfg.n_embd, dh=cfg.n_embd // n_heads)
    else:
        dims = dict(
            L=cfg.num_hidden_layers, P=SEQ, H=cfg.num_attention_heads, G=cfg.num_key_value_heads,
            d=cfg.hidden_size, dh=cfg.head_dim,
        )
    print(f"   dims {dims}")
    clean, corrupt, answer, wrong = make_inputs(cfg.vocab_size)

    # 1. stock HF logits (no hooks), then hooked attention + module hooks must match bit for bit
    set_attention(family, hooked=False)
    with torch.no_grad():
        stock = {"clean": model(input_ids=clean, use_cache=False).logits,
                 "corrupt": model(input_ids=corrupt, use_cache=False).logits}
    set_attention(family, hooked=True)
    handles = install_hooks(model, family, dims)
    ids = {"clean": clean, "corrupt": corrupt}
    caches, logits = {}, {}
    with torch.no_grad():
        for run in ("clean", "corrupt"):
            caches[run] = {}
            HOOKS.calls = 0
            logits[run] = forward(model, ids[run], cache=caches[run])
            assert HOOKS.calls == len(SITES) * dims["L"], f"hooks fired {HOOKS.calls} times"
            assert torch.equal(logits[run], stock[run]), f"{family}: hooked forward differs from stock HF"
            for l in range(dims["L"]):
                pat = caches[run][("pattern", l)]
                upper = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
                assert (pat[:, :, upper] == 0).all(), "pattern must be causal"
                assert torch.allclose(pat.sum(-1), torch.ones(()), atol=1e-5)
    print("   ok: hooked attention + hooks reproduce stock HF logits exactly")

    for run in ("clean", "corrupt"):
        for key, act in caches[run].items():
            with torch.no_grad():
                lo = forward(model, ids[run], patches={key: [((slice(None),), act, None)]})
            assert torch.equal(lo, logits[run]), f"{family}: self-patch of {key} on {run} changed logits"
    print("   ok: patching every site with its own value reproduces the logits exactly")

    m = {r: logit_diff(logits[r], answer, wrong).item() for r in ("clean", "corrupt")}
    pr = {r: answer_prob(logits[r], answer).item() for r in ("clean", "corrupt")}
    gap = m["clean"] - m["corrupt"]
    print(f"   metric clean {m['clean']:.6f} corrupt {m['corrupt']:.6f} (gap {gap:.6f})")
    print(f"   prob   clean {pr['clean']:.6e} corrupt {pr['corrupt']:.6e}")
    assert abs(gap) > 0.1, "clean/corrupt metric gap too small for meaningful scores"

    out = {
        "clean": clean, "corrupt": corrupt, "answer": answer, "wrong": wrong,
        "metric.clean": torch.tensor([m["clean"]]), "metric.corrupt": torch.tensor([m["corrupt"]]),
        "prob.clean": torch.tensor([pr["clean"]]), "prob.corrupt": torch.tensor([pr["corrupt"]]),
        "logits_last.clean": logits["clean"][:, -1, :], "logits_last.corrupt": logits["corrupt"][:, -1, :],
    }

    directions = {"denoise": ("corrupt", "clean"), "noise": ("clean", "corrupt")}  # base run, source run

    # 2. activation patching sweeps
    for direction, (base, src) in directions.items():
        for name, site, grid in SWEEPS:
            res = torch.zeros(grid_shape(dims, grid))
            res_prob = torch.zeros(grid_shape(dims, grid)) if (direction, name) == ("denoise", "resid_pre") else None
            for gi, layer, index in cells(dims, site, grid):
                with torch.no_grad():
                    lo = forward(model, ids[base], patches={(site, layer): [(index, caches[src][(site, layer)], None)]})
                res[gi] = logit_diff(lo, answer, wrong)
                if res_prob is not None:
                    res_prob[gi] = answer_prob(lo, answer)
            out[f"{direction}.{name}"] = res
            if res_prob is not None:
                out["denoise_prob.resid_pre"] = res_prob

    # sanity: whole resid_pre[0] patched reproduces the source run's metric / logits exactly
    for direction, (base, src) in directions.items():
        with torch.no_grad():
            lo = forward(model, ids[base], patches={("resid_pre", 0): [((slice(None),), caches[src][("resid_pre", 0)], None)]})
        assert torch.equal(lo, logits[src]), f"{direction}: full resid_pre[0] patch != {src} logits"
        score = (logit_diff(lo, answer, wrong).item() - m["corrupt"]) / gap
        assert score == (1.0 if direction == "denoise" else 0.0), score
    print("   ok: patching all of resid_pre[0] gives the other run's logits exactly (score 1 / 0)")

    # sanity: cells at positions 0,1 (identical prefix) leave the base metric unchanged
    for direction, (base, src) in directions.items():
        for name in ("resid_pre", "attn_out", "mlp_out"):
            cell = out[f"{direction}.{name}"][:, :2]
            assert torch.equal(cell, torch.full_like(cell, m[base])), (direction, name, cell, m[base])
        cell = out[f"{direction}.z_head_pos"][:, :, :2]
        assert torch.equal(cell, torch.full_like(cell, m[base])), (direction, "z_head_pos")
        if direction == "denoise":
            cell = out["denoise_prob.resid_pre"][:, :2]
            assert torch.equal(cell, torch.full_like(cell, pr["corrupt"]))
    s = (out["denoise.resid_pre"][:, :2] - m["corrupt"]) / gap
    assert (s == 0).all()
    # at layer 0 resid_pre is the embedding, so denoising position 2 and noising position 5 both
    # run the mixed sequence (clean token at 2, corrupt token at 5): the same forward
    a, b = CORRUPT_POSITIONS
    assert out["denoise.resid_pre"][0, a] == out["noise.resid_pre"][0, b]
    assert out["denoise.resid_pre"][0, b] == out["noise.resid_pre"][0, a]
    print("   ok: P in {0,1} cells give score 0 (denoise) / base metric (noise), exactly")

    # 3. attribution patching: gradients on the base run through the same hooked activations
    grads = {}
    for direction, (base, src) in directions.items():
        cache_g = {}
        with torch.enable_grad():
            lo = forward(model, ids[base], cache=cache_g, retain=True)
            assert torch.equal(lo.detach(), logits[base])
            model.zero_grad(set_to_none=True)
            logit_diff(lo, answer, wrong).backward()
        grads[direction] = {k: v.grad.detach().clone() for k, v in cache_g.items()}
        for k in SITES:
            for l in range(dims["L"]):
                assert grads[direction][(k, l)] is not None
                assert torch.equal(cache_g[(k, l)].detach(), caches[base][(k, l)])
        for name, site, grid in SWEEPS:
            res = torch.zeros(grid_shape(dims, grid))
            for gi, layer, index in cells(dims, site, grid):
                delta = caches[src][(site, layer)] - caches[base][(site, layer)]
                res[gi] = (delta * grads[direction][(site, layer)])[index].sum()
            out[f"attr.{direction}.{name}"] = res

    # sanity: attribution consistency
    for direction in directions:
        a = lambda n: out[f"attr.{direction}.{n}"].double()
        assert torch.allclose(a("z_head_pos").sum(-1), a("z_head"), rtol=1e-4, atol=1e-6)
        # attn_out = z @ W_O + b is linear: the same first-order change either way
        assert torch.allclose(a("attn_out").sum(-1), a("z_head").sum(-1), rtol=1e-3, atol=1e-5), (
            a("attn_out").sum(-1), a("z_head").sum(-1))
        for sweep in ("resid_pre", "attn_out", "mlp_out"):
            assert (a(sweep)[:, :2] == 0).all()
        assert (a("z_head_pos")[:, :, :2] == 0).all()
    print("   ok: attr(z_head_pos) sums to attr(z_head); sum attr(attn_out) = sum attr(z_head); prefix attr = 0")

    # sanity: gradients agree with a small finite step of the interpolated patch, for the cell
    # with the largest |attr| in each sweep (float32: loose tolerance; alpha=1e-2)
    alpha = 1e-2
    for direction, (base, src) in directions.items():
        for name, site, grid in SWEEPS:
            attr = out[f"attr.{direction}.{name}"]
            flat = int(attr.abs().argmax())
            target = tuple(torch.unravel_index(torch.tensor(flat), attr.shape))
            target = tuple(int(t) for t in target)
            for gi, layer, index in cells(dims, site, grid):
                if gi != target:
                    continue
                src_act = caches[src][(site, layer)]
                with torch.no_grad():
                    lp = forward(model, ids[base], patches={(site, layer): [(index, src_act, alpha)]})
                    lm = forward(model, ids[base], patches={(site, layer): [(index, src_act, -alpha)]})
                fd = (logit_diff(lp, answer, wrong).item() - logit_diff(lm, answer, wrong).item()) / (2 * alpha)
                est = attr[gi].item()
                assert abs(fd - est) <= 2e-2 * abs(est) + 1e-3, (direction, name, gi, fd, est)
    print("   ok: attribution matches central finite differences of the interpolated patch")

    for hd in handles:
        hd.remove()
    set_attention(family, hooked=False)

    for k, v in out.items():
        if v.dtype.is_floating_point:
            out[k] = v.detach().to(torch.float32).contiguous()
        else:
            out[k] = v.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{family}.safetensors")
    save_file(out, path)
    print(f"   wrote {path}: {len(out)} tensors")
    for direction in directions:
        sc = (out[f"{direction}.resid_pre"] - m["corrupt"]) / gap
        print(f"   {direction}.resid_pre scores:\n{sc}")
    return out, m, pr


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    summary = {}
    for family in ("llama", "gpt2"):
        out, m, pr = run_family(family, out_dir)
        summary[family] = {
            "metric": m, "prob": pr,
            "keys": {k: f"{str(v.dtype).removeprefix('torch.')} {list(v.shape)}" for k, v in sorted(out.items())},
        }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({
            "generator": "scripts/make_patching_fixtures.py",
            "seed": SEED,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "models": summary,
        }, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
