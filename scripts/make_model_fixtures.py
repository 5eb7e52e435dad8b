#!/usr/bin/env python3
"""Make tiny random-weight reference fixtures from Hugging Face `transformers`.

For each family (llama, llama3, mistral, qwen2, gpt2) this writes, under
crates/scalpel-models/tests/fixtures/models/<name>/:

  config.json, model.safetensors   the HF model (save_pretrained, float32)
  reference.safetensors            inputs, logits and every hook activation,
                                   keyed by TransformerLens hook names
                                   (see shared/reference/hook-points.md)

Hook values are captured from the real HF modules with forward hooks; rotary,
attention scores and patterns are recomputed from the captured q/k with HF's own
rotary module, and the script asserts that they reproduce HF's own attentions,
z, residual stream and logits. Values at padded positions are NaN.

Usage (no network needed; models are built from configs with a fixed seed):

  /root/.cache/scalpel/ref-venv/bin/python scripts/make_model_fixtures.py [OUT_DIR]
"""

import json
import math
import os
import sys

import torch
from safetensors.torch import save_file

import transformers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "scalpel-models", "tests", "fixtures", "models")

SEED = 1234
VOCAB = 512
D_MODEL = 64
N_LAYERS = 2
N_HEADS = 4
N_KV_HEADS = 2
D_HEAD = 16
D_MLP = 128
PAD_ID = 0
SEQ = 10
N_PAD_ROW1 = 3

ATOL = 1e-5


def common_llama_kwargs():
    return dict(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        intermediate_size=D_MLP,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        head_dim=D_HEAD,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
    )


def family_configs():
    fams = {}
    fams["llama"] = (
        LlamaForCausalLM,
        LlamaConfig(
            **common_llama_kwargs(),
            max_position_embeddings=128,
            rope_theta=10000.0,
            tie_word_embeddings=True,
        ),
    )
    fams["llama3"] = (
        LlamaForCausalLM,
        LlamaConfig(
            **common_llama_kwargs(),
            max_position_embeddings=512,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=False,
        ),
    )
    fams["mistral"] = (
        MistralForCausalLM,
        MistralConfig(
            **common_llama_kwargs(),
            max_position_embeddings=128,
            rope_theta=10000.0,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
    )
    fams["qwen2"] = (
        Qwen2ForCausalLM,
        Qwen2Config(
            **common_llama_kwargs(),
            max_position_embeddings=128,
            rope_theta=1000000.0,
            use_sliding_window=False,
            sliding_window=None,
            tie_word_embeddings=True,
        ),
    )
    fams["gpt2"] = (
        GPT2LMHeadModel,
        GPT2Config(
            vocab_size=VOCAB,
            n_positions=128,
            n_embd=D_MODEL,
            n_layer=N_LAYERS,
            n_head=N_HEADS,
            n_inner=4 * D_MODEL,
            activation_function="gelu_new",
            layer_norm_epsilon=1e-5,
            pad_token_id=PAD_ID,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=True,
        ),
    )
    return fams


def randomise(model, gen):
    """Randomise every parameter so that norm weights and biases matter.

    Matrices: normal, std 1/sqrt(fan_in) (large enough for attention patterns far
    from uniform); embeddings std 0.5; norm weights 1 + 0.1*randn; biases 0.1*randn.
    """
    is_gpt2 = isinstance(model, GPT2LMHeadModel)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:  # norm weights
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or "wte" in name or "wpe" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 2:
                # nn.Linear weight is [out, in]; GPT-2 Conv1D weight is [in, out]
                fan_in = p.shape[0] if is_gpt2 and "lm_head" not in name else p.shape[1]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")


def make_inputs(gen):
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=gen, dtype=torch.int64)
    mask = torch.ones(2, SEQ, dtype=torch.int64)
    ids[1, :N_PAD_ROW1] = PAD_ID
    mask[1, :N_PAD_ROW1] = 0
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


class Recorder:
    def __init__(self):
        self.inp = {}
        self.out = {}
        self.handles = []

    def watch(self, key, module):
        def hook(mod, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            self.inp[key] = x.detach().clone()
            o = output[0] if isinstance(output, tuple) else output
            self.out[key] = o.detach().clone()

        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self):
        for h in self.handles:
            h.remove()


def rms_scale(x, eps):
    return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def ln_scale(x, eps):
    return torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps)


def close(a, b, what, atol=ATOL):
    if not torch.allclose(a, b, atol=atol, rtol=1e-5):
        diff = (a - b).abs().max().item()
        raise AssertionError(f"self-check failed: {what}: max abs diff {diff}")


def run_family(name, cls, config, out_root):
    print(f"== {name}")
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    config._attn_implementation = "eager"
    model = cls(config)
    model.config._attn_implementation = "eager"
    randomise(model, gen)
    model.eval()
    model.to(torch.float32)
    is_gpt2 = name == "gpt2"

    ids, mask = make_inputs(gen)
    pos = positions(mask)
    b, p = ids.shape
    real = mask.bool()  # [b,p]

    rec = Recorder()
    if is_gpt2:
        tr = model.transformer
        rec.watch("embed", tr.wte)
        rec.watch("pos_embed", tr.wpe)
        for l, blk in enumerate(tr.h):
            rec.watch(f"{l}.block", blk)
            rec.watch(f"{l}.ln1", blk.ln_1)
            rec.watch(f"{l}.c_attn", blk.attn.c_attn)
            rec.watch(f"{l}.o", blk.attn.c_proj)
            rec.watch(f"{l}.ln2", blk.ln_2)
            rec.watch(f"{l}.fc", blk.mlp.c_fc)
            rec.watch(f"{l}.act", blk.mlp.act)
            rec.watch(f"{l}.down", blk.mlp.c_proj)
            rec.watch(f"{l}.mlp", blk.mlp)
        rec.watch("lnf", tr.ln_f)
        layers = tr.h
        eps = config.layer_norm_epsilon
    else:
        mm = model.model
        rec.watch("embed", mm.embed_tokens)
        for l, blk in enumerate(mm.layers):
            rec.watch(f"{l}.block", blk)
            rec.watch(f"{l}.ln1", blk.input_layernorm)
            rec.watch(f"{l}.q", blk.self_attn.q_proj)
            rec.watch(f"{l}.k", blk.self_attn.k_proj)
            rec.watch(f"{l}.v", blk.self_attn.v_proj)
            rec.watch(f"{l}.o", blk.self_attn.o_proj)
            rec.watch(f"{l}.ln2", blk.post_attention_layernorm)
            rec.watch(f"{l}.gate", blk.mlp.gate_proj)
            rec.watch(f"{l}.up", blk.mlp.up_proj)
            rec.watch(f"{l}.act", blk.mlp.act_fn)
            rec.watch(f"{l}.down", blk.mlp.down_proj)
            rec.watch(f"{l}.mlp", blk.mlp)
        rec.watch("lnf", mm.norm)
        layers = mm.layers
        eps = config.rms_norm_eps
    rec.watch("lm_head", model.lm_head)

    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            output_attentions=True,
            output_hidden_states=True,
        )
    rec.remove()
    I, O = rec.inp, rec.out
    scale_fn = ln_scale if is_gpt2 else rms_scale
    h = N_HEADS
    kvh = h if is_gpt2 else N_KV_HEADS
    dh = D_HEAD
    d = D_MODEL

    ref = {}
    ref["hook_embed"] = O["embed"]
    if is_gpt2:
        ref["hook_pos_embed"] = O["pos_embed"]
        close(I["0.block"], O["embed"] + O["pos_embed"], "gpt2 resid_pre 0 = embed + pos_embed")
    else:
        close(I["0.block"], O["embed"], "resid_pre 0 = embed")

    # causal + padding-key mask, True = may attend
    causal = torch.ones(p, p, dtype=torch.bool).tril()
    allowed = causal[None, None, :, :] & real[:, None, None, :]  # [b,1,pq,pk]
    if not is_gpt2:
        cos, sin = model.model.rotary_emb(O["embed"], pos)

    for l in range(len(layers)):
        pre = f"blocks.{l}."
        resid_pre = I[f"{l}.block"]
        ref[pre + "hook_resid_pre"] = resid_pre
        close(I[f"{l}.ln1"], resid_pre, f"ln1 input = resid_pre {l}")
        ref[pre + "ln1.hook_scale"] = scale_fn(resid_pre, eps)
        ref[pre + "ln1.hook_normalized"] = O[f"{l}.ln1"]
        if is_gpt2:
            qkv = O[f"{l}.c_attn"]
            q, k, v = qkv.split(d, dim=2)
        else:
            q, k, v = O[f"{l}.q"], O[f"{l}.k"], O[f"{l}.v"]
        q = q.reshape(b, p, h, dh)
        k = k.reshape(b, p, kvh, dh)
        v = v.reshape(b, p, kvh, dh)
        ref[pre + "attn.hook_q"] = q
        ref[pre + "attn.hook_k"] = k
        ref[pre + "attn.hook_v"] = v
        if is_gpt2:
            qr, kr = q, k
        else:
            qr_t, kr_t = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            qr, kr = qr_t.transpose(1, 2), kr_t.transpose(1, 2)
            ref[pre + "attn.hook_rot_q"] = qr
            ref[pre + "attn.hook_rot_k"] = kr
        rep = h // kvh
        kr_full = kr.repeat_interleave(rep, dim=2)  # [b,p,h,dh]
        v_full = v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", qr, kr_full) / math.sqrt(dh)
        scores = scores.masked_fill(~allowed, float("-inf"))
        pattern = torch.softmax(scores, dim=-1)
        ref[pre + "attn.hook_attn_scores"] = scores
        ref[pre + "attn.hook_pattern"] = pattern
        # self-check against HF's own attention weights at real query positions
        hf_att = out.attentions[l]
        qmask = real[:, None, :, None].expand_as(pattern)
        close(pattern[qmask], hf_att[qmask], f"{name} layer {l} pattern vs HF output_attentions")
        z = I[f"{l}.o"]
        z = z.reshape(b, p, h, dh)
        zc = torch.einsum("bhqk,bkhd->bqhd", pattern.nan_to_num(0.0), v_full)
        rmask = real[:, :, None, None].expand_as(z)
        close(zc[rmask], z[rmask], f"{name} layer {l} pattern@v vs captured z")
        ref[pre + "attn.hook_z"] = z
        if is_gpt2:
            W = layers[l].attn.c_proj.weight  # [in=h*dh, out=d]
            Wh = W.reshape(h, dh, d)
            bias = layers[l].attn.c_proj.bias
        else:
            W = layers[l].self_attn.o_proj.weight  # [out=d, in=h*dh]
            Wh = W.T.reshape(h, dh, d)
            bias = layers[l].self_attn.o_proj.bias
        result = torch.einsum("bphe,hed->bphd", z, Wh)
        attn_out = O[f"{l}.o"]
        summed = result.sum(2) + (bias if bias is not None else 0.0)
        close(summed, attn_out, f"{name} layer {l} sum(hook_result)+bias = attn_out")
        ref[pre + "attn.hook_result"] = result
        ref[pre + "hook_attn_out"] = attn_out
        resid_mid = I[f"{l}.ln2"]
        close(resid_mid, resid_pre + attn_out, f"resid_mid {l}")
        ref[pre + "hook_resid_mid"] = resid_mid
        ref[pre + "ln2.hook_scale"] = scale_fn(resid_mid, eps)
        ref[pre + "ln2.hook_normalized"] = O[f"{l}.ln2"]
        ref[pre + "hook_mlp_in"] = I[f"{l}.mlp"]
        close(I[f"{l}.mlp"], O[f"{l}.ln2"], f"mlp_in = ln2 out {l}")
        if is_gpt2:
            ref[pre + "mlp.hook_pre"] = O[f"{l}.fc"]
        else:
            ref[pre + "mlp.hook_pre"] = O[f"{l}.gate"]
            ref[pre + "mlp.hook_pre_linear"] = O[f"{l}.up"]
            close(O[f"{l}.act"] * O[f"{l}.up"], I[f"{l}.down"], f"act(gate)*up = down input {l}")
        ref[pre + "mlp.hook_post"] = I[f"{l}.down"]
        ref[pre + "hook_mlp_out"] = O[f"{l}.mlp"]
        resid_post = O[f"{l}.block"]
        close(resid_post, resid_mid + O[f"{l}.mlp"], f"resid_post {l}")
        ref[pre + "hook_resid_post"] = resid_post
        # hidden_states[l] is the input of layer l
        close(out.hidden_states[l], resid_pre, f"HF hidden_states[{l}] = resid_pre")

    close(I["lnf"], O[f"{len(layers) - 1}.block"], "ln_final input = last resid_post")
    ref["ln_final.hook_scale"] = scale_fn(I["lnf"], eps)
    ref["ln_final.hook_normalized"] = O["lnf"]
    ref["unembed.hook_in"] = I["lm_head"]
    close(I["lm_head"], O["lnf"], "unembed input = ln_final out")
    ref["unembed.hook_out"] = O["lm_head"]
    close(O["lm_head"], out.logits, "lm_head out = logits")
    ref["logits"] = out.logits.detach().clone()

    # row 1 alone, no padding
    ids1 = ids[1:, N_PAD_ROW1:]
    with torch.no_grad():
        lo1 = model(
            input_ids=ids1,
            attention_mask=torch.ones_like(ids1),
            position_ids=torch.arange(ids1.shape[1])[None],
        ).logits
    close(lo1[0], out.logits[1, N_PAD_ROW1:], f"{name} unpadded row 1 logits vs padded", atol=1e-4)
    ref["logits_unpadded_row1"] = lo1

    # NaN at padded positions (undefined)
    for key, t in ref.items():
        t = t.detach().clone().to(torch.float32).contiguous()
        if key == "logits_unpadded_row1":
            pass
        elif key.endswith("hook_attn_scores") or key.endswith("hook_pattern"):
            t[~real[:, None, :, None].expand_as(t)] = float("nan")
        else:
            assert t.shape[:2] == (b, p), (key, t.shape)
            t[~real] = float("nan")
        ref[key] = t
    ref["input_ids"] = ids.contiguous()
    ref["attention_mask"] = mask.contiguous()

    # sanity: patterns should not be near uniform (weights big enough to matter)
    pat = ref["blocks.0.attn.hook_pattern"]
    print(f"   max pattern entry (layer 0, row 0, last query): {pat[0, :, -1].max().item():.3f}")

    out_dir = os.path.join(out_root, name)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    # no header metadata: safetensors orders it nondeterministically (versions go to meta.json)
    save_file(ref, os.path.join(out_dir, "reference.safetensors"))
    # ensure config.json keeps the legacy top-level rope keys real checkpoints use
    if not is_gpt2:
        cfg_path = os.path.join(out_dir, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        rp = cfg.get("rope_parameters") or {}
        if "rope_theta" not in cfg and "rope_theta" in rp:
            cfg["rope_theta"] = rp["rope_theta"]
        if rp.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
            cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
    # round trip: the saved directory must reproduce the logits
    reloaded = cls.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        lo2 = reloaded(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    close(lo2[real], out.logits[real], f"{name} reloaded from {out_dir}")
    print(f"   wrote {out_dir}: {len(ref)} tensors; self-checks passed")
    return model


def check_llama3_scaling(model):
    """The llama3 scaling must actually change some inverse frequencies."""
    rot = model.model.rotary_emb
    cfg = model.config
    base = cfg.rope_parameters["rope_theta"]
    plain = 1.0 / (base ** (torch.arange(0, D_HEAD, 2, dtype=torch.float) / D_HEAD))
    scaled = rot.inv_freq
    changed = ~torch.isclose(plain, scaled)
    unchanged = ~changed
    print(f"   llama3 inv_freq plain  {plain.tolist()}")
    print(f"   llama3 inv_freq scaled {scaled.tolist()}")
    ratio = plain / scaled
    assert changed.any() and unchanged.any(), "llama3 scaling must change some but not all frequencies"
    smoothed = changed & ~torch.isclose(ratio, torch.tensor(8.0))
    assert smoothed.any(), "want at least one frequency in the smoothed band"
    print(f"   llama3: {int(unchanged.sum())} unchanged, {int(smoothed.sum())} smoothed, "
          f"{int((changed & ~smoothed).sum())} divided by factor")


def main():
    out_root = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT
    torch.use_deterministic_algorithms(True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for name, (cls, cfg) in family_configs().items():
        model = run_family(name, cls, cfg, out_root)
        if name == "llama3":
            check_llama3_scaling(model)
    with open(os.path.join(out_root, "meta.json"), "w") as f:
        json.dump({
            "generator": "scripts/make_model_fixtures.py",
            "seed": SEED,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "families": list(family_configs()),
        }, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
