#!/usr/bin/env bash
# Side-by-side: scalpel vs SAELens training a TopK SAE (k 32, 9216 latents) on SmolLM2-135M's
# blocks.15.hook_resid_post, on the same activations in the same order, same hyperparameters and
# token budget; plus a scalpel TopK transcoder (hook_mlp_in -> hook_mlp_out), which SAELens 6.54
# cannot train. Both SAEs are then scored by the same code: SAELens's own encode/decode on the
# held-out store rows (scripts/eval_on_store.py) and `scalpel eval` (CE/KL splice scores) on the
# demo corpus's held-out split.
#
#   PY=/root/.cache/scalpel/ref-venv/bin/python WORK=/tmp/dict-compare scripts/dict_compare.sh
#
# Takes ~45 minutes on 2 cores (harvest ~20, SAELens ~11, scalpel ~4 + ~3, evals ~10).
set -euo pipefail
PY=${PY:?set PY to a python with sae-lens 6.54 (../shared/tools/ref-venv.sh)}
WORK=${WORK:-/tmp/dict-compare}
TOKENS=${TOKENS:-901120}
BIN=${BIN:-target/release/scalpel}
EVAL_TOKENS=${EVAL_TOKENS:-16384}
mkdir -p "$WORK"
[ -x "$BIN" ] || cargo build --release --locked -p scalpel

# 1. Activations: ~1M tokens of the demo corpus, three hooks at layer 15.
"$BIN" harvest --data demo --hooks blocks.15.hook_resid_post,blocks.15.hook_mlp_in,blocks.15.hook_mlp_out \
  --tokens 1000000 --out "$WORK/store" --exclude-special-tokens --json > "$WORK/harvest.json"

# 2. SAELens (also writes the train/eval views of the store that scalpel reads).
"$PY" scripts/saelens_train.py --store "$WORK/store" --hook blocks.15.hook_resid_post \
  --tokens "$TOKENS" --lr 1e-3 --batch-size 4096 --k 32 --d-sae 9216 --dead-feature-window 250000 \
  --normalize-activations expected_average_only_in --b-dec-init geometric_median --seed 42 \
  --threads 2 --write-views "$WORK/views" --out "$WORK/saelens/resid15-topk32" > "$WORK/saelens.json"

# 3. scalpel, same data order (the views), same hyperparameters; SAELens's parameterisation
#    (free decoder norms, ranking by pre * |W_dec row|, gradient clipping at 1.0).
common() {
  cat <<TOML
tokens = $TOKENS
batch_size = 4096
seed = 42
b_dec_init = "geometric_median"
init_sample_rows = 16384
normalize_activations = "expected_average_only_in"
log_every_steps = 20

[data]
store = "$WORK/views/train"
shuffle_buffer_shards = 16

[train]
lr = 1e-3
k_aux = 288
dead_window = 250000
rescale_acts_by_decoder_norm = true
clip_grad_norm = 1.0
TOML
}
{ echo "out = \"$WORK/scalpel\""; common; cat <<TOML

[[dict]]
name = "resid15-topk32"
hook = "blocks.15.hook_resid_post"
activation = "topk"
d_sae = 9216
k = 32
TOML
} > "$WORK/sae.toml"
{ echo "out = \"$WORK/scalpel-tc\""; common; cat <<TOML

[[dict]]
name = "mlp15-transcoder-topk32"
hook = "blocks.15.hook_mlp_in"
hook_out = "blocks.15.hook_mlp_out"
activation = "topk"
d_sae = 9216
k = 32
TOML
} > "$WORK/tc.toml"
/usr/bin/time -v "$BIN" train "$WORK/sae.toml" > "$WORK/scalpel-train.log" 2> "$WORK/scalpel-train.err"
/usr/bin/time -v "$BIN" train "$WORK/tc.toml" > "$WORK/scalpel-tc.log" 2> "$WORK/scalpel-tc.err"

# 4. One scorer for both SAEs on the held-out rows, then the splice scores on held-out text.
"$PY" scripts/eval_on_store.py --store "$WORK/views/eval" --hook blocks.15.hook_resid_post \
  "$WORK/scalpel/resid15-topk32" "$WORK/saelens/resid15-topk32" > "$WORK/eval_on_store.jsonl"
"$PY" scripts/eval_on_store.py --store "$WORK/views/eval" --hook blocks.15.hook_mlp_in \
  --hook-out blocks.15.hook_mlp_out "$WORK/scalpel-tc/mlp15-transcoder-topk32" \
  >> "$WORK/eval_on_store.jsonl" || echo "(SAELens cannot load a topk_transcoder; see scalpel eval)"
for d in scalpel/resid15-topk32 saelens/resid15-topk32 scalpel-tc/mlp15-transcoder-topk32; do
  "$BIN" eval --dict "$WORK/$d" --tokens "$EVAL_TOKENS" --json > "$WORK/eval-$(echo "$d" | tr / -).json"
done
echo "results in $WORK"
