#!/usr/bin/env bash
# The reference for bench/train_bench.py: diffusers' train_text_to_image_lora_sdxl.py, unchanged,
# from the git-ignored ref/ folder (see bench/README.md for how ref/ is filled), on a random-init
# real-size SDXL saved with save_pretrained and 64 random 1024² JPEGs, at each batch size.
#
#   bash bench/reference_train.sh          # on the GPU machine, after `source .devbundle/install.sh`
#
# Settings (environment): REF_BATCHES ("1 8"), REF_WARMUP (3), REF_STEPS (10), REF_PRECISION (bf16),
# REF_RESOLUTION (1024), REF_IMAGES (64), REF_TINY (0; 1 = the tiny SDXL, for a CPU smoke test),
# REF_WORK (/tmp/rayimg-ref), REF_WHEELS (ref/wheels), PYTHON (python3), OUT (outputs/bench).
# Results: $OUT/reference_train.json (one row per batch); full logs: $OUT/reference_logs.txt.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY=${PYTHON:-python3}
OUT=${OUT:-outputs/bench}
WORK=${REF_WORK:-/tmp/rayimg-ref}
BATCHES=${REF_BATCHES:-1 8}
RES=${REF_RESOLUTION:-1024}
TINY=""
[ "${REF_TINY:-0}" = "1" ] && TINY="--tiny"
LOGS="$OUT/reference_logs.txt"
mkdir -p "$OUT" "$WORK"
: > "$LOGS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 WANDB_MODE=disabled
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1} NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
SCRIPT=ref/diffusers/examples/text_to_image/train_text_to_image_lora_sdxl.py
if [ ! -f "$SCRIPT" ]; then
  echo "[reference] $SCRIPT is missing: fill ref/ as bench/README.md says" >&2
  exit 1
fi

# 1. the script's extra dependencies, only those the image lacks, into a private folder
"$PY" bench/reference_train.py deps --wheels "${REF_WHEELS:-ref/wheels}" --target "$WORK/site" 2>&1 | tee -a "$LOGS" || exit 1
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$WORK/site"

# 2. the save_pretrained SDXL dir (random init) and the imagefolder dataset
"$PY" bench/reference_train.py prepare $TINY --model-dir "$WORK/sdxl" --data-dir "$WORK/data-$RES" \
  --images "${REF_IMAGES:-64}" --resolution "$RES" >> "$LOGS" 2>&1
rc=$?
grep -E "^\[reference.*(saved|written|reusing)" "$LOGS"
if [ $rc -ne 0 ]; then
  echo "[reference] prepare failed (rc $rc); last lines:"; tail -n 30 "$LOGS"; exit $rc
fi

# 3. one process per batch size; each prints one REFERENCE line and merges it into the JSON
status=0
for b in $BATCHES; do
  echo "===== reference batch $b =====" >> "$LOGS"
  "$PY" bench/reference_train.py run --script "$SCRIPT" --model-dir "$WORK/sdxl" --data-dir "$WORK/data-$RES" \
    --work "$WORK" --batch "$b" --resolution "$RES" --warmup "${REF_WARMUP:-3}" --steps "${REF_STEPS:-10}" \
    --mixed-precision "${REF_PRECISION:-bf16}" --json "$OUT/reference_train.json" >> "$LOGS" 2>&1
  rc=$?
  grep -E "^REFERENCE" "$LOGS" | tail -n 1 | sed -E 's/"argv": \[[^]]*\], //' | cut -c1-500
  if [ $rc -ne 0 ]; then
    status=$rc
    echo "[reference] batch $b failed (rc $rc); last lines:"; tail -n 25 "$LOGS" | cut -c1-300
  fi
done
exit $status
