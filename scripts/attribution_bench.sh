#!/usr/bin/env bash
# Attribution patching's cost in forward-equivalents, scalpel beside the PyTorch reference, on
# the same 20 IOI pairs of the default model (the issue's target: at most 3 per pair).
#
#   scripts/attribution_bench.sh [--out DIR] [--threads 2]
#
# scalpel: `examples/attribution_cost` (median of 3 load-matched ratios: a plain forward with
# full logits, then the lean attribution pass over z per layer, head and position).
# Reference: `scripts/patching_bench.py` (clean forward + corrupt forward + backward with PyTorch
# forward hooks on transformers, median of 3 load-matched ratios), run with one exact cell only.
# The two attribution grids must agree to 2e-4 or the script fails. The full exact-patching
# comparison is `scripts/patching_bench.sh` (half an hour).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${REF_PYTHON:-/root/.cache/scalpel/ref-venv/bin/python}"
GGUF="${SCALPEL_GGUF:-/root/.cache/scalpel/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf}"
OUT="$REPO/target/attribution-bench"
THREADS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "attribution_bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$PY" ] || { echo "attribution_bench.sh: no reference python at $PY (see shared/tools/ref-venv.sh)" >&2; exit 1; }

cd "$REPO"
cargo build --release --locked -p scalpel -p scalpel-circuits --example attribution_cost >&2
mkdir -p "$OUT"
load() { cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?"; }
L0="$(load)"
echo "== pairs" >&2
target/release/scalpel attribute --ioi 20 --sweep z_head_pos --json --save-pairs "$OUT/pairs.jsonl" >/dev/null
echo "== scalpel" >&2
target/release/examples/attribution_cost "$OUT/pairs.jsonl" --json --compare >"$OUT/scalpel.json"
L1="$(load)"
echo "== PyTorch reference" >&2
"$PY" scripts/patching_bench.py "$OUT/pairs.jsonl" --gguf "$GGUF" --cells 1 --threads "$THREADS" \
  >"$OUT/reference.json" 2>"$OUT/reference.log" || { tail -20 "$OUT/reference.log" >&2; exit 1; }
L2="$(load)"

"$PY" - "$OUT" "$L0" "$L1" "$L2" <<'PYEOF'
import json, os, sys
out, l0, l1, l2 = sys.argv[1:]
s = json.load(open(os.path.join(out, "scalpel.json")))
r = json.load(open(os.path.join(out, "reference.json")))
ra = r["attribution"]
if s["shape"] != ra["shape"]:
    sys.exit(f"grid shapes differ: {s['shape']} vs {ra['shape']}")
d = max(abs(a - b) for a, b in zip(s["values"], ra["values"]))
rows = [
    ("pairs x tokens", f"{s['pairs']} x {s['tokens_per_prompt']}", f"{r['pairs']} x {r['tokens_per_prompt']}"),
    ("attribution, forward-equivalents (median of 3, load-matched)",
     f"**{s['forward_equivalents_median']:.2f}**", f"{ra['forward_equivalents_load_matched']:.2f}"),
    ("  the 3 ratios", ", ".join(f"{x:.2f}" for x in s["forward_equivalents"]), ""),
    ("  with the exact-patching setup shared (Patcher::new + attribution)",
     ", ".join(f"{x:.2f}" for x in s["shared_setup_forward_equivalents"]), ""),
    ("attribution, s (median)", f"{sorted(s['attribution_seconds'])[1]:.3f}", f"{ra['seconds']:.3f}"),
    ("plain forward with full logits, s (median)", f"{sorted(s['forward_seconds'])[1]:.3f}",
     f"{r['forward_seconds_run_median']:.3f}"),
    ("max abs diff of the attribution grids", f"{d:.2e} (limit 2e-4)", ""),
    ("1-min load average: start / after scalpel / after reference", f"{l0} / {l1} / {l2}", ""),
]
md = ["| | scalpel | PyTorch reference |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
open(os.path.join(out, "summary.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
if not d <= 2e-4:
    sys.exit("attribution grids disagree")
PYEOF
