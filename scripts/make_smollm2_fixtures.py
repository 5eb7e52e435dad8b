#!/usr/bin/env python3
"""Make reference fixtures for the default model, SmolLM2-135M-Instruct (Q4_1 GGUF).

Hugging Face `transformers` loads the GGUF and dequantises it to float32; this
script runs it on a fixed English paragraph and writes, under
crates/scalpel-models/tests/fixtures/smollm2/:

  reference.safetensors  input_ids, top1 / top-20 logits / logsumexp per position,
                         and a few hook values (TransformerLens names)
  greedy.json            greedy continuations of a plain and a chat prompt
  meta.json              versions, GGUF sha256, tokenizer facts

Usage:

  /root/.cache/scalpel/ref-venv/bin/python scripts/make_smollm2_fixtures.py \
      [/root/.cache/scalpel/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf] [OUT_DIR]
"""

import hashlib
import json
import math
import os
import sys
from collections import Counter

import torch
from safetensors.torch import save_file

import gguf
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GGUF = "/root/.cache/scalpel/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = os.path.join(REPO, "crates", "scalpel-models", "tests", "fixtures", "smollm2")
EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

PARAGRAPH = (
    "On a cold morning in March 1887, Marie Duval walked the three miles from her village "
    "to the market at Lyon, carrying a basket of eggs and a letter she had not yet opened. "
    "The road was muddy; the carts were slow, and the price of bread had risen again. "
    "\"Why do they always wait until spring?\" she asked the baker, who only shrugged. "
    "By noon she had sold 42 eggs, bought thread for her mother, and read the letter twice: "
    "her brother was coming home from Marseille at last."
)
PLAIN_PROMPT = "The capital of France is"
CHAT_MESSAGE = "What is the capital of France?"
TOPK = 20
RESID_LAYERS = (0, 14, 29)
PATTERN_LAYER = 5
MLP_LAYER = 5
QK_LAYER = 3


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def close(a, b, what, atol=1e-4):
    if not torch.allclose(a, b, atol=atol, rtol=1e-4):
        raise AssertionError(f"self-check failed: {what}: max abs diff {(a - b).abs().max().item()}")


def main():
    gguf_path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_GGUF
    out_dir = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_OUT
    os.makedirs(out_dir, exist_ok=True)
    d, fname = os.path.split(os.path.abspath(gguf_path))
    digest = sha256(gguf_path)
    if digest != EXPECTED_SHA256:
        print(f"warning: GGUF sha256 {digest} differs from the expected {EXPECTED_SHA256}")

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=fname, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cfg = model.config
    n_heads, n_kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    # tokenizer facts
    default_ids = tok(PARAGRAPH).input_ids
    ids_list = tok(PARAGRAPH, add_special_tokens=False).input_ids
    tokenizer_adds_bos_by_default = bool(default_ids) and default_ids[0] == tok.bos_token_id and default_ids != ids_list
    print(f"paragraph: {len(ids_list)} tokens; default tokenisation adds specials: {default_ids != ids_list}")
    ids = torch.tensor([ids_list], dtype=torch.int64)
    p = ids.shape[1]
    pos = torch.arange(p)[None]

    layers = model.model.layers
    cap = {}
    handles = []

    def watch(key, module, want_input=False):
        def hook(mod, args, output):
            x = args[0] if want_input else (output[0] if isinstance(output, tuple) else output)
            cap[key] = x.detach().clone()
        handles.append(module.register_forward_hook(hook))

    for l in RESID_LAYERS:
        watch(f"blocks.{l}.hook_resid_post", layers[l])
    watch(f"blocks.{MLP_LAYER}.hook_mlp_out", layers[MLP_LAYER].mlp)
    watch("q3", layers[QK_LAYER].self_attn.q_proj)
    watch("k3", layers[QK_LAYER].self_attn.k_proj)
    L = PATTERN_LAYER
    watch("q5", layers[L].self_attn.q_proj)
    watch("k5", layers[L].self_attn.k_proj)
    watch("v5", layers[L].self_attn.v_proj)
    watch("z5", layers[L].self_attn.o_proj, want_input=True)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos,
                    output_attentions=True, output_hidden_states=True)
    for h in handles:
        h.remove()

    logits = out.logits[0]  # [p, v]
    ref = {"input_ids": ids}
    ref["top1"] = logits.argmax(-1).to(torch.int64)
    tv, ti = logits.topk(TOPK, dim=-1)
    ref["topk_ids"] = ti.to(torch.int64)
    ref["topk_logits"] = tv
    ref["logsumexp"] = torch.logsumexp(logits, dim=-1)
    for l in RESID_LAYERS:
        key = f"blocks.{l}.hook_resid_post"
        ref[key] = cap[key]
        if l + 1 < cfg.num_hidden_layers:  # HF's last hidden state is after the final norm
            close(cap[key], out.hidden_states[l + 1], f"{key} vs HF hidden_states")
    ref[f"blocks.{MLP_LAYER}.hook_mlp_out"] = cap[f"blocks.{MLP_LAYER}.hook_mlp_out"]
    ref[f"blocks.{QK_LAYER}.attn.hook_q"] = cap["q3"].reshape(1, p, n_heads, dh)
    ref[f"blocks.{QK_LAYER}.attn.hook_k"] = cap["k3"].reshape(1, p, n_kv, dh)

    # pattern at layer 5, recomputed from q/k with HF's rotary and checked against HF
    q = cap["q5"].reshape(1, p, n_heads, dh).transpose(1, 2)
    k = cap["k5"].reshape(1, p, n_kv, dh).transpose(1, 2)
    v = cap["v5"].reshape(1, p, n_kv, dh).transpose(1, 2)
    cos, sin = model.model.rotary_emb(q, pos)
    qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
    rep = n_heads // n_kv
    kr = kr.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = qr @ kr.transpose(-1, -2) / math.sqrt(dh)
    causal = torch.ones(p, p, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    pattern = scores.softmax(-1)
    close(pattern, out.attentions[L], "layer 5 pattern vs HF output_attentions", atol=1e-5)
    z = (pattern @ v).transpose(1, 2).reshape(1, p, n_heads * dh)
    close(z, cap["z5"], "layer 5 pattern@v vs o_proj input", atol=1e-4)
    ref[f"blocks.{L}.attn.hook_pattern"] = out.attentions[L].detach().clone()
    print("self-checks passed (pattern vs output_attentions, pattern@v vs z, resid_post vs hidden_states)")

    ref = {k: (t.to(torch.float32) if t.is_floating_point() else t).contiguous() for k, t in ref.items()}
    save_file(ref, os.path.join(out_dir, "reference.safetensors"))

    # greedy continuations
    def greedy(prompt_ids, n):
        inp = torch.tensor([prompt_ids], dtype=torch.int64)
        with torch.no_grad():
            g = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=n,
                               do_sample=False, pad_token_id=tok.pad_token_id,
                               output_logits=True, return_dict_in_generate=True)
        new = g.sequences[0, inp.shape[1]:].tolist()
        margins = []
        for step in g.logits:
            top2 = step[0].topk(2).values
            margins.append(round((top2[0] - top2[1]).item(), 4))
        return {
            "new_ids": new,
            "new_text": tok.decode(new, skip_special_tokens=False),
            "stopped_at_eos": len(new) < n,
            "top1_minus_top2_logit_per_step": margins,
        }

    plain_ids = tok(PLAIN_PROMPT, add_special_tokens=False).input_ids
    chat_text = tok.apply_chat_template([{"role": "user", "content": CHAT_MESSAGE}],
                                        add_generation_prompt=True, tokenize=False)
    chat_ids = tok(chat_text, add_special_tokens=False).input_ids
    greedy_json = {
        "plain": {"prompt": PLAIN_PROMPT, "prompt_ids": plain_ids, "max_new_tokens": 12,
                  **greedy(plain_ids, 12)},
        "chat": {"message": CHAT_MESSAGE, "prompt_text": chat_text, "prompt_ids": chat_ids,
                 "max_new_tokens": 16, **greedy(chat_ids, 16)},
        "notes": "do_sample=False, eager attention, float32 on CPU; prompts tokenised with "
                 "add_special_tokens=False; generation stops early only at eos id "
                 f"{model.generation_config.eos_token_id}",
    }
    with open(os.path.join(out_dir, "greedy.json"), "w") as f:
        json.dump(greedy_json, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(json.dumps({k: v.get("new_text") for k, v in greedy_json.items() if isinstance(v, dict)}))

    reader = gguf.GGUFReader(gguf_path)
    add_bos_field = reader.fields.get("tokenizer.ggml.add_bos_token")
    meta = {
        "generator": "scripts/make_smollm2_fixtures.py",
        "gguf_file": fname,
        "gguf_sha256": digest,
        "gguf_tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        "gguf_add_bos_token": None if add_bos_field is None else bool(add_bos_field.contents()),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "dtype": "float32 (transformers dequantises the GGUF to float32)",
        "attn_implementation": "eager",
        "paragraph": PARAGRAPH,
        "n_tokens": p,
        "tokenized_with_add_special_tokens": False,
        "hf_tokenizer_default_adds_special_tokens": default_ids != ids_list,
        "hf_tokenizer_default_adds_bos": tokenizer_adds_bos_by_default,
        "hf_tokenizer_bos_token": [tok.bos_token, tok.bos_token_id],
        "hf_tokenizer_eos_token": [tok.eos_token, tok.eos_token_id],
        "hf_tokenizer_pad_token": [tok.pad_token, tok.pad_token_id],
        "hf_config": {
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": dh,
            "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": dict(cfg.rope_parameters),
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "max_position_embeddings": cfg.max_position_embeddings,
        },
        "topk": TOPK,
        "hooks": sorted(k for k in ref if k.startswith("blocks.")),
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {out_dir}")


def _dist_version(name):
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    main()
