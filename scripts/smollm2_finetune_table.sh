#!/usr/bin/env bash
# Recovery on SmolLM2-135M pruned by Wanda 2:4 (built-in wiki-en calibration, 32 x 512): SPP, LoRS and
# LoRA-then-remask fine-tuned for the same number of steps on the built-in wiki-en training text, merged,
# audited, and evaluated on the first 32 held-out wiki-en windows of 512 tokens (the other tables' protocol).
#   bash scripts/smollm2_finetune_table.sh [STEPS] [SEQLEN] [BATCH]
# Learning rates: SPP uses its reference 4e-3; LoRS's reference 2e-5 is tuned for ~100k-token batches over
# thousands of steps, so for a short budget LoRS and LoRA use 1e-3 (override with LR_LORS / LR_LORA).
set -euo pipefail
STEPS=${1:-40}
SEQ=${2:-256}
BATCH=${3:-8}
CLI=${CLI:-.venv/bin/sparse-recover}
OUT=${OUT:-runs/finetune-table}
export SPARSE_RECOVER_NO_PROGRESS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"
base="$OUT/wanda-2of4"
$CLI prune --model smollm2-135m --method wanda --pattern 2:4 --calib wiki-en --nsamples 32 --seqlen 512 \
  --run-dir "$base" --device cpu
for stage in dense prune; do
  $CLI eval --run-dir "$base" --stage "$stage" --tasks ppl --ppl-data wiki-en --seqlen 512 --limit 32 --device cpu
done
common=(--data wiki-en --seqlen "$SEQ" --max-steps "$STEPS" --batch-size "$BATCH" --micro-batch-size 4
        --val-size 64 --eval-batches 8 --eval-every "$STEPS" --save-every 20 --device cpu)
for spec in "spp ${LR_SPP:-4e-3}" "lors ${LR_LORS:-1e-3}" "lora-remask ${LR_LORA:-1e-3}"; do
  read -r method lr <<<"$spec"
  run="$OUT/$method"
  if [ ! -d "$run" ]; then cp -r "$base" "$run"; fi
  $CLI finetune --run-dir "$run" --method "$method" --lr "$lr" "${common[@]}"
  $CLI merge --run-dir "$run" --device cpu
  $CLI audit --run-dir "$run"
  $CLI eval --run-dir "$run" --stage merge --tasks ppl --ppl-data wiki-en --seqlen 512 --limit 32 --device cpu
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
key = "ppl/wiki-en/512/limit32"
base = json.load(open(f"{out}/wanda-2of4/manifest.json"))
print("\nSmolLM2-135M, Wanda 2:4, held-out wiki-en perplexity (32 x 512)")
print("| stage | ppl | trainable params | steps | tokens | train s | merge check (unmerged -> merged) |")
print("|---|---|---|---|---|---|---|")
print(f"| dense | {base['evals']['dense'][key]['ppl']:.3f} | | | | | |")
print(f"| Wanda 2:4 | {base['evals']['prune'][key]['ppl']:.3f} | | | | | |")
for method in ("spp", "lors", "lora-remask"):
    m = json.load(open(f"{out}/{method}/manifest.json"))
    ft, mg = m["stages"]["finetune"], m["stages"]["merge"]
    c = mg["ppl_check"]
    print(f"| + {method} (lr {ft['resolved']['lr']:g}) | {m['evals']['merge'][key]['ppl']:.3f} | {ft['trainable_params']:,} | "
          f"{ft['train']['steps']} | {ft['train']['tokens']:,} | {ft['train']['wall_time_s']:.0f} | "
          f"{c['unmerged']:.3f} -> {c['merged']:.3f} |")
PY
