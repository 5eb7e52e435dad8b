"""Makes the SAELens fixtures of crates/scalpel-dict/tests with SAELens itself.

Run with the reference venv:
    /root/.cache/scalpel/ref-venv/bin/python scripts/make_sae_fixtures.py

For each architecture it builds a tiny SAE (d_in 16, d_sae 48), randomises every parameter
(non-zero biases and thresholds), saves it with SAELens's own `save_model` into
`tests/fixtures/saelens/<arch>/`, and writes `reference.safetensors` with an input `x [8, 16]`,
`feature_acts = encode(x)`, `decoded = decode(encode(x))` and `forward = forward(x)`.
It also writes `pre6/`: a flat pre-6 config (the shape of SAELens 3.x/4.x `cfg.json`) with the
topk weights, whose reference outputs equal the topk fixture's.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from sae_lens.saes.sae import SAEMetadata
from sae_lens import (
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)

OUT = Path(__file__).resolve().parent.parent / "crates/scalpel-dict/tests/fixtures/saelens"
D_IN, D_SAE, D_OUT = 16, 48, 12


def meta(hook_name, **extra):
    return SAEMetadata(
        model_name="tiny-llama",
        hook_name=hook_name,
        context_size=128,
        prepend_bos=True,
        dataset_path="fixture",
        **extra,
    )


def builds():
    yield "standard", StandardSAE(
        StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta("blocks.0.hook_resid_post"))
    )
    yield "topk", TopKSAE(
        TopKSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            k=4,
            rescale_acts_by_decoder_norm=True,
            metadata=meta("blocks.0.hook_resid_post"),
        )
    )
    yield "jumprelu", JumpReLUSAE(
        JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta("blocks.1.hook_resid_pre"))
    )
    yield "gated", GatedSAE(
        GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta("blocks.0.hook_mlp_out"))
    )
    tmeta = meta("blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out")
    yield "transcoder", Transcoder(
        TranscoderConfig(
            d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False, metadata=tmeta
        )
    )
    yield "skip_transcoder", SkipTranscoder(
        SkipTranscoderConfig(
            d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False, metadata=tmeta
        )
    )
    yield "jumprelu_transcoder", JumpReLUTranscoder(
        JumpReLUTranscoderConfig(
            d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False, metadata=tmeta
        )
    )
    # Run-time input normalisations (the fixture directory is named after them).
    yield "standard_layer_norm", StandardSAE(
        StandardSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            normalize_activations="layer_norm",
            metadata=meta("blocks.0.hook_resid_post"),
        )
    )
    yield "topk_constant_norm_rescale", TopKSAE(
        TopKSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            k=4,
            normalize_activations="constant_norm_rescale",
            metadata=meta("blocks.0.hook_resid_post"),
        )
    )


def randomise(sae, gen):
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                # Positive thresholds of the size of typical pre-activations, so some fire.
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5)
            elif name == "r_mag":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def reference(sae, x):
    with torch.no_grad():
        # encode stores the run-time normalisation state that the next decode undoes.
        f = sae.encode(x)
        decoded = sae.decode(f)
        return {
            "x": x.contiguous(),
            "feature_acts": f.contiguous(),
            "decoded": decoded.contiguous(),
            "forward": sae.forward(x).contiguous(),
        }


def main():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, D_IN, generator=gen)
    if OUT.exists():
        shutil.rmtree(OUT)
    for arch, sae in builds():
        randomise(sae, gen)
        sae.eval()
        d = OUT / arch
        sae.save_model(d)
        save_file(reference(sae, x), d / "reference.safetensors")
        if arch == "topk":
            topk = sae
        print(arch, sorted(p.name for p in d.iterdir()))

    # Pre-6 flat config, in the shape SAELens 3.x/4.x wrote (hook_point, activation_fn_str,
    # activation_fn_kwargs, boolean normalize_activations, no architecture).
    d = OUT / "pre6"
    d.mkdir()
    shutil.copy(OUT / "topk/sae_weights.safetensors", d / "sae_weights.safetensors")
    shutil.copy(OUT / "topk/reference.safetensors", d / "reference.safetensors")
    # Old SAELens had no rescale_acts_by_decoder_norm; fold it into the weights the way
    # TopKSAE.fold_W_dec_norm does so the outputs stay the same.
    topk.fold_W_dec_norm()
    save_file({k: v.contiguous() for k, v in topk.state_dict().items()}, d / "sae_weights.safetensors")
    cfg = {
        "model_name": "tiny-llama",
        "hook_point": "blocks.0.hook_resid_post",
        "hook_point_layer": 0,
        "hook_point_head_index": None,
        "dataset_path": "fixture",
        "is_dataset_tokenized": True,
        "context_size": 128,
        "use_cached_activations": False,
        "cached_activations_path": None,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "b_dec_init_method": "zeros",
        "expansion_factor": 3,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 4},
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "prepend_bos": True,
        "dtype": "torch.float32",
        "device": "cpu",
        "sae_lens_version": "3.13.1",
        "sae_lens_training_version": "3.13.1",
        "finetuning_scaling_factor": False,
    }
    (d / "cfg.json").write_text(json.dumps(cfg, indent=2))
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"total {total} bytes")
    assert total < 300_000


if __name__ == "__main__":
    main()
