#!/usr/bin/env bash
# The GPU checks, in one call on a lent CUDA machine (see benchmarks/README.md): the CUDA tests, the organism
# recipes end to end through the CLI in bf16, and the Zephyr-7B-shaped timing; first, which attention backend
# gives the right gradients (gpu_attention_check.py). Runs with the machine's own
# torch/transformers (no install): the repository and its tests on PYTHONPATH. Logs go to $OUT (or ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/tests" PYTHONUNBUFFERED=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| cuda', torch.cuda.is_available())"
status=0
python3 benchmarks/gpu_attention_check.py 2>&1 | tee "$OUT/attention_check.log" || status=1
python3 benchmarks/gpu_precision_check.py 2>&1 | grep -v Warning | tee "$OUT/precision_check.log" || status=1
python3 -m pytest -q -rA -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log" | grep -E "PASSED|FAILED|ERROR|SKIPPED|relative|passed|failed|Error" || status=1
python3 -m rmu_analysis evaluate --model organism --json "$OUT/eval_base.json" 2>&1 | tail -4 || status=1
for method in adaptive-rmu rmu; do
  start=$EPOCHREALTIME
  python3 -m rmu_analysis unlearn --model organism --preset organism-$method --out /tmp/org-$method --no-progress \
    > "$OUT/unlearn_$method.log" 2>&1 || { status=1; tail -5 "$OUT/unlearn_$method.log"; }
  echo "organism-$method: unlearn (200 steps, bf16) took $(python3 -c "print(round($EPOCHREALTIME - $start, 1))") s"
  python3 -m rmu_analysis evaluate --model /tmp/org-$method --json "$OUT/eval_$method.json" 2>&1 | tail -4 || status=1
done
python3 benchmarks/gpu_zephyr_shape.py ${ZEPHYR_ARGS:-} --json "$OUT/zephyr_shape.json" 2>&1 | grep -v "Token indices" | tee "$OUT/zephyr_shape.log" || status=1
exit $status
