#!/usr/bin/env bash
# Activation-patching benchmark on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF),
# scalpel against a PyTorch/transformers reference, which doubles as a real-model correctness
# check of scalpel's exact and attribution patching.
#
#   scripts/patching_bench.sh [N_PAIRS=20] [--out DIR] [--cells N] [--threads N] [--seed N]
#
# 1. `scalpel patch --ioi N_PAIRS --sweep z_head_pos --method both --direction denoise` runs the
#    full exact per-(layer, head, position) z sweep and attribution patching, and saves its pairs.
# 2. scripts/patching_bench.py replays those pairs in PyTorch: times a random sample of
#    `--cells` exact cells the TransformerLens way (one full forward per cell) and extrapolates
#    to the whole grid, and does notebook-style attribution patching (see its docstring).
# 3. A comparison prints a markdown table and checks agreement; any disagreement makes the
#    script exit non-zero. Tolerances (absolute, logit-difference units): unpatched metrics and
#    the sampled exact cells within 1e-4, every attribution cell within 2e-4, and the two
#    attribution grids correlated at >= 0.9999.
#
# Raw outputs go to DIR (default target/patching-bench): scalpel.json, pairs.jsonl,
# reference.json, the two stderr logs, summary.json and summary.md.
#
# Environment: SCALPEL_BIN (default ./target/release/scalpel), REF_PYTHON (default the ref venv),
# SCALPEL_GGUF (the model file; default the scalpel cache path).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${SCALPEL_BIN:-$REPO/target/release/scalpel}"
PY="${REF_PYTHON:-/root/.cache/scalpel/ref-venv/bin/python}"
GGUF="${SCALPEL_GGUF:-/root/.cache/scalpel/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf}"
# scalpel's default model is this very file; name it explicitly only when overridden
MODEL_ARGS=()
[ -n "${SCALPEL_GGUF:-}" ] && MODEL_ARGS=(--model "$SCALPEL_GGUF")

N_PAIRS=20
OUT="$REPO/target/patching-bench"
CELLS=40
THREADS=2
SEED=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --cells) CELLS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    [0-9]*) N_PAIRS="$1"; shift ;;
    *) echo "patching_bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

[ -x "$BIN" ] || { echo "patching_bench.sh: no scalpel binary at $BIN (build it with cargo build --release)" >&2; exit 1; }
[ -x "$PY" ] || { echo "patching_bench.sh: no reference python at $PY (see shared/tools/ref-venv.sh)" >&2; exit 1; }
if [ ! -f "$GGUF" ]; then
  echo "== model not cached; letting scalpel fetch it" >&2
  "$BIN" run --prompt hi >/dev/null
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

load() { cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?"; }
LOAD_S0="$(load)"
echo "== scalpel patch: $N_PAIRS IOI pairs, z_head_pos, exact + attribution (takes minutes)" >&2
"$BIN" patch ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} --ioi "$N_PAIRS" --sweep z_head_pos --method both --direction denoise \
  --json --save-pairs "$TMP/pairs.jsonl" >"$TMP/scalpel.json" 2>"$TMP/scalpel.log" || {
  tail -20 "$TMP/scalpel.log" >&2; echo "patching_bench.sh: scalpel patch failed" >&2; exit 1; }

LOAD_S1="$(load)"
echo "== PyTorch reference: $CELLS sampled exact cells + attribution, $THREADS threads" >&2
"$PY" "$REPO/scripts/patching_bench.py" "$TMP/pairs.jsonl" --gguf "$GGUF" --cells "$CELLS" \
  --threads "$THREADS" --seed "$SEED" >"$TMP/reference.json" 2>"$TMP/reference.log" || {
  tail -20 "$TMP/reference.log" >&2; echo "patching_bench.sh: reference failed" >&2; exit 1; }

LOAD_R1="$(load)"
printf '{"scalpel": ["%s", "%s"], "reference": ["%s", "%s"]}\n' "$LOAD_S0" "$LOAD_S1" "$LOAD_S1" "$LOAD_R1" >"$TMP/loadavg.json"
mkdir -p "$OUT"
cp "$TMP/scalpel.json" "$TMP/pairs.jsonl" "$TMP/reference.json" "$TMP/scalpel.log" "$TMP/reference.log" "$TMP/loadavg.json" "$OUT/"

"$PY" - "$OUT" <<'EOF'
"""Compare scalpel's z_head_pos grids with the PyTorch reference and print the table."""
import json
import math
import os
import sys

out = sys.argv[1]
s = json.load(open(os.path.join(out, "scalpel.json")))
r = json.load(open(os.path.join(out, "reference.json")))
load = json.load(open(os.path.join(out, "loadavg.json")))

# Tolerances (absolute, in logit-difference units; the metrics here are O(1..10)). Both sides
# run the same de-quantised f32 weights and differ only by f32 rounding through 30 layers,
# which in practice is a few 1e-6; the bounds leave an order of magnitude of room for other
# summation orders or thread counts while still catching any real semantic mismatch
# (wrong slice, BOS, tokenisation, head layout), which shows up at 1e-2 or more.
TOL_METRIC = 1e-4   # unpatched clean/corrupt metric
TOL_EXACT = 1e-4    # patched metric at every sampled exact cell
TOL_ATTR = 2e-4     # every cell of the attribution estimate (a backward pass: a bit looser)
MIN_CORR = 0.9999   # Pearson correlation of the two attribution grids

def grid(method):
    g = [g for g in s["grids"] if g["sweep"] == "z_head_pos" and g["method"] == method]
    if len(g) != 1:
        sys.exit(f"scalpel.json: expected one z_head_pos {method} grid, found {len(g)}")
    return g[0]

def pearson(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")

ex, at = grid("exact"), grid("attribution")
L, H, P = r["dims"]["layers"], r["dims"]["heads"], r["dims"]["positions"]
problems = []
if ex["shape"] != [L, H, P] or at["shape"] != [L, H, P]:
    problems.append(f"grid shapes {ex['shape']} / {at['shape']} != reference [{L}, {H}, {P}]")
if len(s["positions"]) != P:
    problems.append(f"scalpel has {len(s['positions'])} positions, the reference tokenised {P}")
if s["pairs"] != r["pairs"]:
    problems.append(f"pairs: scalpel {s['pairs']}, reference {r['pairs']}")

d_clean = abs(s["clean"] - r["clean"])
d_corrupt = abs(s["corrupt"] - r["corrupt"])
if max(d_clean, d_corrupt) > TOL_METRIC:
    problems.append(f"unpatched metrics differ: clean {s['clean']:.6f} vs {r['clean']:.6f}, "
                    f"corrupt {s['corrupt']:.6f} vs {r['corrupt']:.6f} (tokenisation?)")

# exact: scalpel's full grid at the reference's sampled cells
rex = r["exact"]
d_exact = [abs(ex["values"][i] - v) for i, v in zip(rex["sampled_flat"], rex["values"])]
max_d_exact = max(d_exact) if d_exact else 0.0
if max_d_exact > TOL_EXACT:
    worst = max(range(len(d_exact)), key=d_exact.__getitem__)
    problems.append(f"exact cell {rex['sampled_cells'][worst]}: scalpel "
                    f"{ex['values'][rex['sampled_flat'][worst]]:.6f}, reference {rex['values'][worst]:.6f}")

# attribution: scalpel stores base metric + estimate; the reference stores the estimate
s_attr = [v - at["corrupt"] for v in at["values"]]
r_attr = r["attribution"]["values"]
d_attr = [abs(a - b) for a, b in zip(s_attr, r_attr)]
max_d_attr = max(d_attr)
corr = pearson(s_attr, r_attr)
if not (max_d_attr <= TOL_ATTR):
    worst = max(range(len(d_attr)), key=d_attr.__getitem__)
    l, rem = divmod(worst, H * P)
    problems.append(f"attribution cell {[l, *divmod(rem, P)]}: scalpel {s_attr[worst]:.6f}, "
                    f"reference {r_attr[worst]:.6f}")
if not (corr >= MIN_CORR):
    problems.append(f"attribution grids correlate only {corr:.6f}")

cells = L * H * P
ref_sweep = rex["extrapolated_seconds"]
s_fwd, r_fwd = s["forward_seconds"], r["forward_seconds"]
s_attr_s, r_attr_s = at["seconds"], r["attribution"]["seconds"]
s_fe = (s_attr_s + s["setup_seconds"]) / s_fwd
r_fe = r["attribution"]["forward_equivalents_load_matched"]
s_sweep_fe = ex["seconds"] / s_fwd
r_sweep_fe = rex["extrapolated_forward_equivalents"]

def f(x, d=2):
    return f"{x:.{d}f}"

rows = [
    ("pairs", str(s["pairs"]), str(r["pairs"])),
    ("tokens per prompt", str(len(s["positions"])), str(P)),
    ("cells (layers x heads x positions)", f"{cells} ({L}x{H}x{P})", f"{cells}; {rex['cells_sampled']} timed"),
    ("unpatched metric clean / corrupt", f"{s['clean']:.4f} / {s['corrupt']:.4f}", f"{r['clean']:.4f} / {r['corrupt']:.4f}"),
    ("exact z_head_pos sweep, s", f"{f(ex['seconds'], 1)} ({ex['runs']} runs)",
     f"{f(ref_sweep, 1)} (extrapolated: median {f(rex['seconds_per_cell'], 3)} s/cell x {cells}; "
     f"cells ranged {f(rex['seconds_per_cell_min'], 2)}..{f(rex['seconds_per_cell_max'], 2)} s)"),
    ("exact sweep wall-clock ratio (reference / scalpel)", f"**{f(ref_sweep / ex['seconds'], 1)}x**", ""),
    ("exact sweep, forward-equivalents", f(s_sweep_fe, 0), f"{f(r_sweep_fe, 0)} "
     f"({f(rex['forward_equivalents_per_cell'], 2)} per cell, load-matched)"),
    ("exact sweep work ratio (reference / scalpel forward-equivalents)", f"**{f(r_sweep_fe / s_sweep_fe, 1)}x**", ""),
    ("plain forward of the clean batch, s", f(s_fwd, 3),
     f"{f(r['forward_seconds_run_median'], 3)} (median of all {r['forward_seconds_run_count']} timed "
     f"in the run; of the first 3: {f(r_fwd, 3)})"),
    ("setup (clean + corrupt cached forwards), s", f(s["setup_seconds"], 2), "(inside attribution)"),
    ("attribution patching, s", f(s_attr_s, 2), f(r_attr_s, 2) + " (clean fwd + corrupt fwd + backward, median of 3)"),
    ("attribution, forward-equivalents", f(s_fe, 1), f(r_fe, 1) + " (load-matched)"),
    ("1-min load average before / after (2 cores)", f"{load['scalpel'][0]} / {load['scalpel'][1]}",
     f"{load['reference'][0]} / {load['reference'][1]}"),
    ("scalpel exact vs attribution correlation", f(ex.get("correlation_with_exact", float("nan")), 4), ""),
]
checks = [
    ("max abs diff, unpatched metrics", f"{max(d_clean, d_corrupt):.2e}", f"<= {TOL_METRIC:g}"),
    (f"max abs diff, exact values at the {len(d_exact)} sampled cells", f"{max_d_exact:.2e}", f"<= {TOL_EXACT:g}"),
    ("max abs diff, attribution grids (all cells)", f"{max_d_attr:.2e}", f"<= {TOL_ATTR:g}"),
    ("correlation, scalpel vs reference attribution", f"{corr:.6f}", f">= {MIN_CORR}"),
]
md = [
    f"Activation patching, SmolLM2-135M-Instruct (Q4_1 GGUF, f32 compute), IOI denoising, "
    f"z per (layer, head, position), metric = mean logit(answer) - logit(wrong). "
    f"Reference: {r['impl']}, {r['threads']} threads.",
    "",
    "| | scalpel | PyTorch reference |",
    "|---|---|---|",
    *[f"| {a} | {b} | {c} |" for a, b, c in rows],
    "",
    "| check | value | tolerance |",
    "|---|---|---|",
    *[f"| {a} | {b} | {c} |" for a, b, c in checks],
    "",
    "Forward-equivalents (cost in units of one plain batched forward of the clean prompts): "
    "scalpel attribution = (attribution seconds + setup_seconds) / forward_seconds (setup = the "
    "cached clean and corrupt forwards); reference attribution = wall time of clean forward + "
    "corrupt forward + backward / a plain forward timed just before it (median of 3 such ratios). "
    "Exact sweep: scalpel = sweep seconds / forward_seconds; reference = cells x median over the "
    "sampled cells of (patched forward / plain forward timed just before it). The reference's "
    "exact sweep time is extrapolated from the sampled cells (one full forward of the corrupt "
    "batch each, as TransformerLens does it). The machine is shared, so wall-clock figures move "
    "with foreign load (see the load averages); the forward-equivalent ratios are the steadier "
    "comparison of the methods, the wall-clock ratio also includes each side's forward speed.",
]
text = "\n".join(md)
print(text)
with open(os.path.join(out, "summary.md"), "w") as fh:
    fh.write(text + "\n")
summary = {
    "pairs": s["pairs"], "tokens_per_prompt": P, "cells": cells,
    "scalpel_exact_seconds": ex["seconds"], "reference_exact_seconds_extrapolated": ref_sweep,
    "speed_ratio": ref_sweep / ex["seconds"],
    "scalpel_attribution_seconds": s_attr_s, "scalpel_setup_seconds": s["setup_seconds"],
    "scalpel_forward_seconds": s_fwd, "scalpel_forward_equivalents": s_fe,
    "reference_attribution_seconds": r_attr_s, "reference_forward_seconds": r_fwd,
    "reference_forward_equivalents": r_fe,
    "scalpel_exact_forward_equivalents": s_sweep_fe,
    "reference_exact_forward_equivalents": r_sweep_fe,
    "work_ratio": r_sweep_fe / s_sweep_fe,
    "loadavg": load,
    "attribution_correlation": corr, "max_abs_diff_exact": max_d_exact,
    "max_abs_diff_attribution": max_d_attr, "max_abs_diff_metrics": max(d_clean, d_corrupt),
    "tolerances": {"metric": TOL_METRIC, "exact": TOL_EXACT, "attribution": TOL_ATTR, "min_corr": MIN_CORR},
    "problems": problems,
}
with open(os.path.join(out, "summary.json"), "w") as fh:
    json.dump(summary, fh, indent=2)
    fh.write("\n")
if problems:
    print("\nFAILED:", file=sys.stderr)
    for p in problems:
        print("  - " + p, file=sys.stderr)
    sys.exit(1)
print(f"\nok: scalpel agrees with the reference (raw JSON in {out})", file=sys.stderr)
EOF
