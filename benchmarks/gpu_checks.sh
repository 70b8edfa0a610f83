#!/usr/bin/env bash
# The checks we run on one GPU node and record in benchmarks/results/ (device named in each file):
#   1. the NCCL path of labs_lib.core.dist (all-reduce check under torchrun),
#   2. benchmarks/mfu.py: GPT-2 small bf16 training-step MFU, eager vs torch.compile, batch sweep,
#   3. a short labs_lib.train run under the gpu profile (stdlib corpus, compile, bf16, fused AdamW).
#
#   bash benchmarks/gpu_checks.sh [RESULTS_DIR]        # RESULTS_DIR gets the logs and metrics (default: build/gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-build/gpu}
mkdir -p "$results"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LABS_BUILD_DIR=${LABS_BUILD_DIR:-$PWD/build}
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$results/gpu.txt"

echo "== 1. NCCL all-reduce (labs_lib.core.dist)"
# One process per GPU; on a one-GPU machine a group of one, forced onto NCCL (NCCL refuses two ranks on one GPU).
gpus=$($py -c 'import torch; print(torch.cuda.device_count())')
timeout 120 $py -m torch.distributed.run --standalone --nproc-per-node="$gpus" -m labs_lib.core.dist --backend nccl 2>&1 \
    | tail -5 | tee "$results/dist.txt"

echo "== 2. MFU of GPT-2 small, bf16"
timeout "${MFU_TIMEOUT:-330}" $py benchmarks/mfu.py ${MFU_ARGS:-} 2>&1 | grep -v Warning | tee "$results/mfu.txt"
cp benchmarks/results/mfu_*.json "$results/" 2>/dev/null

echo "== 3. labs_lib.train, gpu profile"
rm -rf build/gpu_run
timeout "${TRAIN_TIMEOUT:-200}" $py -m labs_lib.train --profile gpu --out build/gpu_run --no-progress \
    --max-steps "${TRAIN_STEPS:-60}" --warmup-steps 10 --eval-interval 30 --checkpoint-interval 0 2>&1 | tail -8 | tee "$results/train.txt"
cp build/gpu_run/metrics.jsonl "$results/train_metrics.jsonl" 2>/dev/null
true
