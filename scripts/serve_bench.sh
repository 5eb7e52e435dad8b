#!/usr/bin/env bash
# Latency of `scalpel serve` on the real default model (SmolLM2-135M-Instruct): the latent page
# (its JSON from the dashboard database, and the page itself) and the prompt explorer on a
# 64-token prompt (predictions, the full logit-lens grid, attention-free, latents of one
# dictionary). Targets: latent page <= 50 ms, explore on 64 tokens <= 1 s.
#
#   scripts/serve_bench.sh [--out DIR] [--latent-runs N] [--explore-runs N] [--port P]
#
# It builds what a server needs the way a user would: `scalpel harvest` a small store of
# `blocks.3.hook_resid_pre` from the demo corpus, `scalpel train` a small TopK SAE on it,
# `scalpel dashboards` for that SAE, then `scalpel serve --dict --db` on loopback, and times
# requests with curl (wall time of each whole request, connection included). The store, SAE and
# database are kept in DIR (default target/serve-bench) and reused by later runs. Prints a
# markdown table and writes DIR/summary.json; exits non-zero if a target is missed.
#
# Environment: SCALPEL_BIN (default ./target/release/scalpel).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${SCALPEL_BIN:-$REPO/target/release/scalpel}"
OUT="$REPO/target/serve-bench"
LATENT_RUNS=100
EXPLORE_RUNS=10
PORT=7979
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --latent-runs) LATENT_RUNS="$2"; shift 2 ;;
    --explore-runs) EXPLORE_RUNS="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -x "$BIN" ]] || { echo "no scalpel binary at $BIN (cargo build --release)" >&2; exit 2; }
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 2; }
mkdir -p "$OUT"
HOOK=blocks.3.hook_resid_pre
D_SAE=2048

if [[ ! -f "$OUT/store/manifest.json" ]]; then
  echo "== harvesting $HOOK (64k tokens of the demo corpus)" >&2
  "$BIN" -q harvest --data demo --hooks "$HOOK" --tokens 65536 --out "$OUT/store"
fi
if [[ ! -f "$OUT/sae/cfg.json" ]]; then
  echo "== training a TopK SAE ($D_SAE latents)" >&2
  "$BIN" -q train --store "$OUT/store" --hook "$HOOK" --activation topk --d-sae "$D_SAE" \
    --k 32 --tokens 65536 --batch 1024 --out "$OUT/train"
  # The trained SAELens folder: the directory holding cfg.json under the run's output.
  SAE_CFG="$(find "$OUT/train" -name cfg.json | head -1)"
  [[ -n "$SAE_CFG" ]] || { echo "training wrote no cfg.json under $OUT/train" >&2; exit 1; }
  rm -rf "$OUT/sae"
  cp -r "$(dirname "$SAE_CFG")" "$OUT/sae"
fi
if [[ ! -f "$OUT/dashboards.db" ]]; then
  echo "== computing dashboards" >&2
  "$BIN" -q dashboards --dict "bench=$OUT/sae" --data "$OUT/store" --out "$OUT/dashboards.db"
fi

echo "== starting the server on 127.0.0.1:$PORT" >&2
"$BIN" -q serve --dict "bench=$OUT/sae" --db "$OUT/dashboards.db" --port "$PORT" \
  --max-prompt-tokens 128 >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
URL="http://127.0.0.1:$PORT"
for _ in $(seq 1 300); do
  curl -sf "$URL/api/health" >/dev/null 2>&1 && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$OUT/serve.log" >&2; exit 1; }
  sleep 0.2
done
curl -sf "$URL/api/health" >/dev/null || { echo "the server did not come up" >&2; exit 1; }

# Seconds of one request (curl's total time); fails on any non-2xx answer.
timed() { curl -sf -o /dev/null -w '%{time_total}\n' "$@"; }

# A prompt of exactly 64 tokens: grow a text until /api/tokenize says 64 (BOS included).
WORDS="The river rises in the hills to the north and flows south for about two hundred \
kilometres before it reaches the sea. Several small towns grew up along its banks, where the \
water was shallow enough to cross. In the nineteenth century a canal was dug to connect it with \
the neighbouring valley, and barges carried coal, grain and timber between the two."
PROMPT=""
for w in $WORDS; do
  NEXT="${PROMPT:+$PROMPT }$w"
  N=$(curl -sf "$URL/api/tokenize" -d "{\"text\": \"$NEXT\"}" | grep -o '"id"' | wc -l)
  [[ "$N" -gt 64 ]] && break
  PROMPT="$NEXT"
  [[ "$N" -eq 64 ]] && break
done
N_TOKENS=$(curl -sf "$URL/api/tokenize" -d "{\"text\": \"$PROMPT\"}" | grep -o '"id"' | wc -l)
echo "== explore prompt: $N_TOKENS tokens" >&2

: >"$OUT/latent_api.txt"; : >"$OUT/latent_page.txt"; : >"$OUT/explore.txt"
for i in $(seq 1 "$LATENT_RUNS"); do
  L=$(( (i * 37) % D_SAE ))
  timed "$URL/api/latent/bench/$L" >>"$OUT/latent_api.txt"
  timed "$URL/latent/bench/$L" >>"$OUT/latent_page.txt"
done
BODY="{\"text\": \"$PROMPT\", \"top_k\": 5}"
timed "$URL/api/explore" -d "$BODY" >/dev/null # warm-up
for _ in $(seq 1 "$EXPLORE_RUNS"); do
  timed "$URL/api/explore" -d "$BODY" >>"$OUT/explore.txt"
done

python3 - "$OUT" "$N_TOKENS" "$(nproc)" <<'EOF'
import json, statistics, sys
out, n_tokens, cores = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def stats(name):
    xs = sorted(float(l) * 1000 for l in open(f"{out}/{name}.txt") if l.strip())
    return {"runs": len(xs), "median_ms": statistics.median(xs),
            "p95_ms": xs[min(len(xs) - 1, int(0.95 * len(xs)))], "max_ms": xs[-1]}
rows = {"latent_api": (stats("latent_api"), 50), "latent_page": (stats("latent_page"), 50),
        "explore_64": (stats("explore"), 1000)}
print(f"| request ({cores} cores) | runs | median ms | p95 ms | max ms | target ms |")
print("|---|---|---|---|---|---|")
ok = True
for name, (s, target) in rows.items():
    print(f"| {name} | {s['runs']} | {s['median_ms']:.1f} | {s['p95_ms']:.1f} | {s['max_ms']:.1f} | {target} |")
    ok &= s["p95_ms"] <= target
summary = {k: dict(v[0], target_ms=v[1]) for k, v in rows.items()}
summary.update(explore_tokens=n_tokens, cores=cores)
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
sys.exit(0 if ok else 1)
EOF
