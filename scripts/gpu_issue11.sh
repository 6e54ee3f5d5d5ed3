#!/usr/bin/env bash
# Issue 11, item 1: the end-to-end benchmark of the real trainer (adrpo-benchmark --e2e) on ONE H100, for the 80 GB
# and the 24 GB SD3-medium configs. Run from the device tool in the repository root; results go to
# benchmarks/e2e_<config>_h100.json and, with the log, to $OUT when it is set.
#
#   bash scripts/gpu_issue11.sh                                 # both configs within BUDGET seconds (default 540)
#   BUDGET=540 bash scripts/gpu_issue11.sh sd3_medium_80gb      # one config per command: room for more variants
#
# The models (SD3-medium, CLIP-L, CLIP-bigG, T5-XXL and a CLIP ViT-L/14 reward, random init, about 16 GB on disk)
# are built once into the ADRPO cache and reused by the second config. Each config gets an equal share of the time
# left; inside it a variant is skipped when the longest variant so far would not fit (the report says so).
#
# The device image has no diffusers: carry its wheel. Once, here: echo /.whl/ >> .git/info/exclude, then
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
# and call the device tool with carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
BUDGET=${BUDGET:-540}
CONFIGS=("$@")
[ ${#CONFIGS[@]} -gt 0 ] || CONFIGS=(sd3_medium_80gb sd3_medium_24gb)
LOG=${OUT:-/tmp}/gpu_issue11.log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"

for i in "${!CONFIGS[@]}"; do
  config=${CONFIGS[$i]}
  share=$(( (BUDGET - SECONDS) / (${#CONFIGS[@]} - i) ))
  # the 80 GB config already samples 16 images per batch: its batch variant doubles that
  batch=16; [ "$config" = sd3_medium_80gb ] && batch=32
  python3 -m adrpo_diffusion.benchmark --e2e --arch sd3-medium --config "$config" --steps 4 --time_budget "$share" \
    --variant "compile:compile_transformer=true" --variant "batch$batch:rollout_batch_size=$batch" --variant "merge:rollout_merge_lora=true" \
    --output "benchmarks/e2e_${config}_h100.json" 2>&1 | tee -a "$LOG" || echo "$config: exit status $?" | tee -a "$LOG"
  [ -z "${OUT:-}" ] || cp "benchmarks/e2e_${config}_h100.json" "$OUT/" 2>/dev/null || true
done
