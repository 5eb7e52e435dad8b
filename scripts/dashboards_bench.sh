#!/usr/bin/env bash
# Dashboards benchmark: `scalpel dashboards` for a 16,384-latent TopK SAE over ~1M tokens of a
# SmolLM2-135M activation store (blocks.6.hook_resid_post), and, in the same run, SAEDashboard
# (PyPI `sae-dashboard`) for the same dictionary on a slice of the same contexts, with scalpel
# timed on that slice too (from the corpus, so that both run the model).
#
#   scripts/dashboards_bench.sh                # everything cached under ~/.cache/scalpel
#   SLICE_CONTEXTS=8 SKIP_FULL=1 scripts/dashboards_bench.sh
#
# Builds (once, reused afterwards) the store (`scalpel harvest`, ~15 min on 2 cores) and the
# dictionary (`scalpel train`, ~10 min). SAEDashboard is installed into its own venv,
# $DASH_VENV, that reuses the reference venv's torch through a .pth file (sae-dashboard pins
# versions of transformers and huggingface-hub that must not replace the reference venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/scalpel}
WORK=${WORK:-$HOME/.cache/scalpel/dashboards-bench}
REF=${REF:-$HOME/.cache/scalpel/ref-venv}
DASH_VENV=${DASH_VENV:-$HOME/.cache/scalpel/dash-venv}
HOOK=blocks.6.hook_resid_post
SLICE_CONTEXTS=${SLICE_CONTEXTS:-32}
mkdir -p "$WORK"
[ -x "$BIN" ] || cargo build --release -p scalpel

# 1. Activations: ~1M tokens of the demo corpus (contexts of 128, special tokens excluded).
if [ ! -f "$WORK/store/manifest.json" ] || [ ! -f "$WORK/harvest.json" ]; then
  "$BIN" harvest --data demo --hooks "$HOOK" --tokens 1000000 --out "$WORK/store" \
    --exclude-special-tokens --json > "$WORK/harvest.json"
fi

# 2. A 16,384-latent TopK (k 32) SAE trained on it.
DICT="$WORK/train/$HOOK"
if [ ! -f "$DICT/cfg.json" ]; then
  "$BIN" train --store "$WORK/store" --hook "$HOOK" --activation topk --d-sae 16384 --k 32 \
    --tokens 1000000 --batch 4096 --lr 1e-3 --out "$WORK/train" --json > "$WORK/train.json"
fi

# 3. scalpel over the whole store.
if [ -z "${SKIP_FULL:-}" ]; then
  rm -f "$WORK/dash.db" "$WORK/dash.db-wal" "$WORK/dash.db-shm" "$WORK/dash.db.ckpt"
  /usr/bin/time -v "$BIN" dashboards --dict "sae=$DICT" --data "$WORK/store" \
    --out "$WORK/dash.db" --json > "$WORK/scalpel.json" 2> "$WORK/scalpel.time"
  grep -E "Maximum resident|Elapsed" "$WORK/scalpel.time"
  cat "$WORK/scalpel.json"
fi

# 4. The same slice of contexts through both tools, both running the model.
SLICE_TOKENS=$((SLICE_CONTEXTS * 128))
rm -f "$WORK/slice.db" "$WORK/slice.db-wal" "$WORK/slice.db-shm" "$WORK/slice.db.ckpt"
"$BIN" dashboards --dict "sae=$DICT" --data demo --tokens "$SLICE_TOKENS" \
  --out "$WORK/slice.db" --json > "$WORK/scalpel-slice.json"
cat "$WORK/scalpel-slice.json"

if [ ! -x "$DASH_VENV/bin/python" ]; then
  PYBASE=$("$REF/bin/python" -c 'import sys; print(sys._base_executable)')
  "$PYBASE" -m venv "$DASH_VENV"
  SITE=$("$REF/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  DSITE=$("$DASH_VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  echo "$SITE" > "$DSITE/ref-venv.pth"
  "$DASH_VENV/bin/python" -m pip install sae-dashboard "pyarrow<17"
fi
"$DASH_VENV/bin/python" scripts/dashboards_bench.py --store "$WORK/store" --dict "$DICT" \
  --contexts "$SLICE_CONTEXTS" > "$WORK/saedashboard.json"
cat "$WORK/saedashboard.json"

python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
sd = json.load(open(f"{w}/saedashboard.json"))
sl = json.load(open(f"{w}/scalpel-slice.json"))
out = {"slice_tokens": sd["tokens"], "latents": sd["latents"],
       "saedashboard_tokens_per_second": sd["tokens_per_second"],
       "scalpel_slice_tokens_per_second": sl["tokens_per_second"],
       "ratio_slice": round(sl["tokens_per_second"] / sd["tokens_per_second"], 1)}
try:
    full = json.load(open(f"{w}/scalpel.json"))
    out["scalpel_store_tokens"] = full["tokens"]
    out["scalpel_store_seconds"] = full["seconds"]
    out["scalpel_store_tokens_per_second"] = full["tokens_per_second"]
except FileNotFoundError:
    pass
print(json.dumps(out))
PY
