#!/usr/bin/env python3
"""Calls every route of Neuronpedia's inference protocol on a running `scalpel serve` through the
official client (`neuronpedia-inference-client==1.10.1`) and prints what came back as one JSON
document on stdout, for `crates/scalpel-web/tests/neuronpedia_client.rs` to check against the
library.

Usage: neuronpedia_client_check.py BASE_URL SECRET MODEL SOURCE
(BASE_URL without the `/v1`, e.g. http://127.0.0.1:8080; SOURCE a loaded dictionary such as
3-res-test.) The client itself validates every response against the protocol's models, so a
response with a missing or mistyped field fails here with the client's own error.
"""

import json
import sys
import time

import neuronpedia_inference_client as npc


def main() -> None:
    base, secret, model, source = sys.argv[1:5]
    source_set = source.split("-", 1)[1]
    prompt = "The Eiffel Tower is in Paris, the capital of"
    other = "Steering vectors change what a model writes."

    def client(key: str) -> npc.DefaultApi:
        cfg = npc.Configuration(host=base + "/v1", api_key={"SimpleSecretAuth": key})
        return npc.DefaultApi(npc.ApiClient(cfg))

    api = client(secret)
    out = {"client_version": npc.__version__}
    seconds = {}

    def timed(name, call):
        start = time.perf_counter()
        out[name] = call().to_dict()
        seconds[name] = round(time.perf_counter() - start, 4)

    timed("tokenize", lambda: api.tokenize_post(
        npc.TokenizePostRequest(model=model, text=prompt)
    ))
    timed("single", lambda: api.activation_single_post(
        npc.ActivationSinglePostRequest(prompt=prompt, model=model, source=source, index="7")
    ))
    timed("single_batch", lambda: api.activation_single_batch_post(
        npc.ActivationSingleBatchPostRequest(
            prompts=[prompt, other], model=model, source=source, index="7"
        )
    ))
    timed("all", lambda: api.activation_all_post(
        npc.ActivationAllPostRequest(
            prompt=prompt,
            model=model,
            source_set=source_set,
            selected_sources=[source],
            sort_by_token_indexes=[],
            ignore_bos=False,
            num_results=5,
        )
    ))
    timed("all_batch", lambda: api.activation_all_batch_post(
        npc.ActivationAllBatchPostRequest(
            prompts=[prompt, other],
            model=model,
            source_set=source_set,
            selected_sources=[],
            sort_by_token_indexes=[1],
            ignore_bos=True,
            num_results=3,
        )
    ))
    timed("topk", lambda: api.activation_topk_by_token_post(
        npc.ActivationTopkByTokenPostRequest(
            prompt=prompt, model=model, source=source, top_k=3, ignore_bos=False
        )
    ))
    timed("topk_batch", lambda: api.activation_topk_by_token_batch_post(
        npc.ActivationTopkByTokenBatchPostRequest(
            prompts=[prompt, other], model=model, source=source, top_k=2, ignore_bos=True
        )
    ))
    timed("source", lambda: api.activation_source_post(
        npc.ActivationSourcePostRequest(prompts=[prompt], model=model, source=source)
    ))
    timed("sae_vector", lambda: api.util_sae_vector_post(
        npc.UtilSaeVectorPostRequest(model=model, source=source, index=5)
    ))
    timed("cossim", lambda: api.util_sae_topk_by_decoder_cossim_post(
        npc.UtilSaeTopkByDecoderCossimPostRequest(
            feature=npc.NPFeature(model=model, source=source, index=5),
            model=model,
            source=source,
            num_results=4,
        )
    ))

    def steer_args(strength: float) -> dict:
        return dict(
            model=model,
            steer_method=npc.NPSteerMethod.SIMPLE_ADDITIVE,
            normalize_steering=False,
            types=[npc.NPSteerType.STEERED, npc.NPSteerType.DEFAULT],
            features=[
                npc.NPSteerFeature(model=model, source=source, index=3, strength=strength)
            ],
            n_completion_tokens=6,
            temperature=0,
            strength_multiplier=4,
            freq_penalty=0,
            seed=16,
        )

    timed("steer_zero", lambda: api.steer_completion_post(
        npc.SteerCompletionRequest(prompt=prompt, n_logprobs=2, **steer_args(0.0))
    ))
    timed("steer_strong", lambda: api.steer_completion_post(
        npc.SteerCompletionRequest(prompt=prompt, **steer_args(40.0))
    ))
    timed("steer_chat", lambda: api.steer_completion_chat_post(
        npc.SteerCompletionChatPostRequest(
            prompt=[npc.NPSteerChatMessage(role="user", content="Name a colour.")],
            steer_special_tokens=False,
            **steer_args(0.0),
        )
    ))

    # Errors come back as the client's exceptions, with the status and the JSON message.
    errors = {}
    for name, call in [
        ("wrong_secret", lambda: client(secret + "x").tokenize_post(
            npc.TokenizePostRequest(model=model, text=prompt))),
        ("unknown_source", lambda: api.util_sae_vector_post(
            npc.UtilSaeVectorPostRequest(model=model, source="99-res-none", index=0))),
        ("wrong_model", lambda: api.tokenize_post(
            npc.TokenizePostRequest(model="not-" + model, text=prompt))),
        ("unsupported_method", lambda: api.steer_completion_post(npc.SteerCompletionRequest(
            prompt=prompt, **{**steer_args(1.0), "steer_method": npc.NPSteerMethod.ORTHOGONAL_DECOMP}))),
    ]:
        try:
            call()
            errors[name] = {"status": 200}
        except npc.ApiException as e:
            errors[name] = {"status": e.status, "body": json.loads(e.body)}
    out["errors"] = errors
    out["seconds"] = seconds
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
