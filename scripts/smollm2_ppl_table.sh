#!/usr/bin/env bash
# Held-out wiki-en perplexity of SmolLM2-135M: dense, and magnitude / Wanda / SparseGPT at 50%
# unstructured and 2:4. Calibration: built-in wiki-en, N windows of L tokens (seed 0); evaluation:
# the first N windows of L tokens of the held-out part. Run directories go to runs/ppl-table/.
#   bash scripts/smollm2_ppl_table.sh [N] [L]
set -euo pipefail
N=${1:-32}
L=${2:-512}
CLI=${CLI:-.venv/bin/sparse-recover}
OUT=${OUT:-runs/ppl-table}
export SPARSE_RECOVER_NO_PROGRESS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"
rows=()
for method in magnitude wanda sparsegpt; do
  for pattern in unstructured 2:4; do
    tag="$method-${pattern/:/of}"
    extra=()
    [ "$pattern" = unstructured ] && extra=(--sparsity 0.5)
    $CLI prune --model smollm2-135m --method "$method" --pattern "$pattern" "${extra[@]}" \
      --calib wiki-en --nsamples "$N" --seqlen "$L" --run-dir "$OUT/$tag" --device cpu
    $CLI audit --run-dir "$OUT/$tag"
    $CLI eval --run-dir "$OUT/$tag" --stage prune --tasks ppl --ppl-data wiki-en --seqlen "$L" --limit "$N" --device cpu
    rows+=("$tag")
  done
done
$CLI eval --run-dir "$OUT/wanda-2of4" --stage dense --tasks ppl --ppl-data wiki-en --seqlen "$L" --limit "$N" --device cpu
python3 - "$OUT" "$N" "$L" "${rows[@]}" <<'PY'
import json, sys
out, n, l, rows = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
key = f"ppl/wiki-en/{l}/limit{n}"
def get(run, stage):
    m = json.load(open(f"{out}/{run}/manifest.json"))
    return m, m["evals"][stage][key]
m, dense = get("wanda-2of4", "dense")
print(f"\nSmolLM2-135M, held-out wiki-en perplexity ({n} windows x {l} tokens); calibration wiki-en {n} x {l}, seed 0")
print(f"| {'model':<22} | {'sparsity':>8} | {'ppl':>9} | {'prune time':>10} | {'eval time':>9} |")
print(f"|{'-'*24}|{'-'*10}|{'-'*11}|{'-'*12}|{'-'*11}|")
print(f"| {'dense':<22} | {0:>8.2%} | {dense['ppl']:>9.3f} | {'-':>10} | {dense['wall_time_s']:>8.1f}s |")
for run in rows:
    m, e = get(run, "prune")
    st = m["stages"]["prune"]
    print(f"| {run:<22} | {st['sparsity']['overall']:>8.2%} | {e['ppl']:>9.3f} | {st['wall_time_s']:>9.1f}s | {e['wall_time_s']:>8.1f}s |")
PY
