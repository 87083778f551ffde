#!/usr/bin/env bash
# Held-out wiki-en perplexity of SmolLM2-135M: Wanda vs Wanda+DSnoT at 50/60/70% unstructured and 2:4,
# and magnitude vs magnitude+DSnoT at 60% (DSnoT with the reference defaults). Calibration: built-in
# wiki-en, N windows of L tokens, seed 0; evaluation: the first N windows of L held-out tokens.
#   bash scripts/smollm2_dsnot_table.sh [N] [L]
set -euo pipefail
N=${1:-32}
L=${2:-512}
CLI=${CLI:-.venv/bin/sparse-recover}
OUT=${OUT:-runs/dsnot-table}
export SPARSE_RECOVER_NO_PROGRESS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"
runs=()
for spec in "wanda unstructured 0.5" "wanda unstructured 0.6" "wanda unstructured 0.7" "wanda 2:4 -" "magnitude unstructured 0.6"; do
  read -r method pattern sparsity <<<"$spec"
  tag="$method-${pattern/:/of}${sparsity/-/}"
  extra=()
  [ "$sparsity" != "-" ] && extra=(--sparsity "$sparsity")
  $CLI prune --model smollm2-135m --method "$method" --pattern "$pattern" "${extra[@]}" --calib wiki-en \
    --nsamples "$N" --seqlen "$L" --run-dir "$OUT/$tag" --device cpu
  $CLI dsnot --run-dir "$OUT/$tag" --device cpu
  $CLI audit --run-dir "$OUT/$tag"
  for stage in prune dsnot; do
    $CLI eval --run-dir "$OUT/$tag" --stage "$stage" --tasks ppl --ppl-data wiki-en --seqlen "$L" --limit "$N" --device cpu
  done
  runs+=("$tag")
done
python3 - "$OUT" "$N" "$L" "${runs[@]}" <<'PY'
import json, sys
out, n, l, runs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
key = f"ppl/wiki-en/{l}/limit{n}"
print(f"\nSmolLM2-135M held-out wiki-en perplexity ({n} x {l}); calibration wiki-en {n} x {l}; DSnoT reference defaults")
print("| run | sparsity | pruned ppl | + DSnoT ppl | gain | swaps | prune s | dsnot s |")
print("|---|---|---|---|---|---|---|---|")
for run in runs:
    m = json.load(open(f"{out}/{run}/manifest.json"))
    p, d = m["evals"]["prune"][key]["ppl"], m["evals"]["dsnot"][key]["ppl"]
    sp, sd = m["stages"]["prune"], m["stages"]["dsnot"]
    print(f"| {run} | {sd['sparsity']['overall']:.2%} | {p:.3f} | {d:.3f} | {p - d:+.3f} ({(p - d) / p:+.1%}) | "
          f"{sd['swaps']} | {sp['wall_time_s']:.1f} | {sd['wall_time_s']:.1f} |")
PY
